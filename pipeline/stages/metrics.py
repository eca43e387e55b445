"""Prometheus metrics of a run, every metric name in one place (prefix `unlearnable_`).

Two sides:

* `DriverMetrics` lives in the driver (the process that iterates the Ray dataset). It serves
  `/metrics` with prometheus_client from its own registry and is fed once per committed shard from
  the shard's `ShardStats` (and, for per-item Δe and PGD steps, from the shard's manifest).
* `ActorMetrics` lives in each protect actor and records through `ray.util.metrics`, which Ray's
  metrics agent exports on every node (names there get Ray's `ray_` prefix). Without a running
  Ray it is a no-op.

`NoopMetrics` has every method of both and does nothing (unit tests, `--metrics-port` unset).
Metrics never break a run: failures to read a manifest or a size are logged and skipped.
"""

from __future__ import annotations

import io
import logging
import math
import time
from collections.abc import Iterable, Mapping
from typing import Any

from pipeline.records import SampleStatus, ShardStats

logger = logging.getLogger(__name__)

PREFIX = "unlearnable_"

# Driver-side names (prometheus_client appends `_total` to counters on the wire).
ITEMS = PREFIX + "items"  # counter, label status=ok|error
FAILED_ITEMS = PREFIX + "failed_items"  # counter, label outcome=passthrough|dropped
WINDOWS = PREFIX + "windows"  # counter
PGD_STEPS = PREFIX + "pgd_steps"  # counter (Σ steps_mean·n_windows from the manifests)
ACCELERATOR_SECONDS = PREFIX + "accelerator_seconds"  # counter
AUDIO_SECONDS = PREFIX + "audio_seconds"  # counter
SHARD_WALL_SECONDS = PREFIX + "shard_wall_seconds"  # counter (writer-side seconds per shard, summed)
ERRORS = PREFIX + "errors"  # counter, label kind (bounded, see MAX_ERROR_KINDS)
DELTA_E_BELOW_TARGET = PREFIX + "delta_e_below_target"  # counter of ok items under the target
BYTES_IN = PREFIX + "bytes_in"  # counter, input shard bytes
BYTES_OUT = PREFIX + "bytes_out"  # counter, output shard bytes
SHARDS_TOTAL = PREFIX + "shards_total"  # gauge: shards this run will do
SHARDS_DONE = PREFIX + "shards_done"  # gauge: shards this run has committed
DELTA_E = PREFIX + "delta_e"  # histogram of per-item Δe (delta_e_mean of ok items)
DELTA_E_MEAN = PREFIX + "delta_e_mean"  # gauge: running mean Δe of ok items this run
LAST_SHARD_TIME = PREFIX + "last_shard_timestamp_seconds"  # gauge: unix time of the last commit
RUN_INFO = PREFIX + "run_info"  # gauge = 1, labels encoder_id, config_hash, random

# Actor-side names (ray.util.metrics).
ACTOR_WINDOWS = PREFIX + "actor_windows"  # counter
ACTOR_WINDOW_SECONDS = PREFIX + "actor_window_seconds"  # histogram, seconds per window
ACTOR_PGD_STEPS = PREFIX + "actor_pgd_steps"  # counter
ACTOR_ERRORS = PREFIX + "actor_errors"  # counter, tag kind (bounded)

DELTA_E_BUCKETS = tuple(round(0.1 * i, 1) for i in range(1, 15))  # 0.1 .. 1.4 (+Inf added)
WINDOW_SECONDS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
MAX_ERROR_KINDS = ShardStats.MAX_ERROR_KINDS  # distinct `kind` labels; later kinds count as "other"


class _KindBound:
    """Keeps a label's distinct values bounded: after `limit` kinds, new ones become 'other'."""

    def __init__(self, limit: int = MAX_ERROR_KINDS):
        self.limit = limit
        self.seen: set[str] = set()

    def __call__(self, kind: str) -> str:
        kind = (kind or "unknown")[:60]
        if kind in self.seen:
            return kind
        if len(self.seen) >= self.limit:
            return "other"
        self.seen.add(kind)
        return kind


class NoopMetrics:
    """Every method of DriverMetrics and ActorMetrics; does nothing."""

    port: int | None = None
    active = False

    def shards_total(self, n: int) -> None:
        pass

    def shard_done(self, stats: ShardStats, bytes_in: int | None = None, bytes_out: int | None = None) -> None:
        pass

    def observe_items(self, delta_e_values: Iterable[float], pgd_steps: float = 0.0) -> None:
        pass

    def record_committed_shard(self, *args: Any, **kwargs: Any) -> None:
        pass

    def batch_done(self, windows: int, seconds: float, steps: int, errors: Mapping[str, int] | None = None) -> None:
        pass

    def stop(self) -> None:
        pass


class DriverMetrics(NoopMetrics):
    """Serves `/metrics` on `addr:port` from a private CollectorRegistry (port None: record only,
    serve nothing; port 0: an ephemeral port, see `.port`).

    Example::

        metrics = DriverMetrics(9108)
        metrics.shards_total(len(pending))
        metrics.shard_done(stats)        # once per committed shard
        metrics.observe_items([0.41, 0.52])
        metrics.stop()
    """

    active = True

    def __init__(self, port: int | None, addr: str = "0.0.0.0"):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.items = Counter(ITEMS, "Items (WebDataset keys) processed, by outcome.", ["status"], registry=r)
        self.failed_items = Counter(
            FAILED_ITEMS, "Failed items by what happened to them in the output.", ["outcome"], registry=r
        )
        self.windows = Counter(WINDOWS, "Audio windows protected.", registry=r)
        self.pgd_steps = Counter(PGD_STEPS, "PGD steps run (sum over windows, from the manifests).", registry=r)
        self.accelerator_seconds = Counter(ACCELERATOR_SECONDS, "Accelerator seconds spent in PGD.", registry=r)
        self.audio_seconds = Counter(AUDIO_SECONDS, "Seconds of audio processed.", registry=r)
        self.shard_wall_seconds = Counter(SHARD_WALL_SECONDS, "Writer wall seconds per shard, summed.", registry=r)
        self.errors = Counter(ERRORS, "Failed items by error kind (bounded label).", ["kind"], registry=r)
        self.below_target = Counter(DELTA_E_BELOW_TARGET, "Ok items whose Δe min is under the target.", registry=r)
        self.bytes_in = Counter(BYTES_IN, "Bytes of input shards read.", registry=r)
        self.bytes_out = Counter(BYTES_OUT, "Bytes of output shards written.", registry=r)
        self.shards_total_gauge = Gauge(SHARDS_TOTAL, "Shards this run will protect.", registry=r)
        self.shards_done_gauge = Gauge(SHARDS_DONE, "Shards this run has committed.", registry=r)
        self.delta_e = Histogram(
            DELTA_E,
            "Per-item Δe (CLAP embedding shift, fp32) of ok items.",
            buckets=DELTA_E_BUCKETS,
            registry=r,
        )
        self.delta_e_mean = Gauge(DELTA_E_MEAN, "Mean Δe of ok items committed this run.", registry=r)
        self.last_shard = Gauge(LAST_SHARD_TIME, "Unix time of the last committed shard.", registry=r)
        self.run_info = Gauge(
            RUN_INFO,
            "1, labelled with the run's encoder and config.",
            ["encoder_id", "config_hash", "random"],
            registry=r,
        )
        self._kind = _KindBound()
        self._ok = 0
        self._delta_e_sum = 0.0
        self._info: tuple[str, str] | None = None
        self.server: Any = None
        self.thread: Any = None
        self.port: int | None = None
        if port is not None:
            from prometheus_client import start_http_server

            self.server, self.thread = start_http_server(port, addr=addr, registry=r)
            self.port = int(self.server.server_port)
            logger.info("metrics on http://%s:%d/metrics", addr, self.port)

    def shards_total(self, n: int) -> None:
        self.shards_total_gauge.set(n)

    def shard_done(self, stats: ShardStats, bytes_in: int | None = None, bytes_out: int | None = None) -> None:
        """Add one committed shard's totals."""
        self.items.labels(status=SampleStatus.OK).inc(stats.ok)
        self.items.labels(status=SampleStatus.ERROR).inc(stats.error)
        self.failed_items.labels(outcome="passthrough").inc(stats.passthrough)
        self.failed_items.labels(outcome="dropped").inc(stats.dropped)
        self.windows.inc(stats.windows)
        self.accelerator_seconds.inc(max(0.0, stats.accelerator_seconds))
        self.audio_seconds.inc(max(0.0, stats.audio_seconds))
        self.shard_wall_seconds.inc(max(0.0, stats.wall_seconds))
        self.below_target.inc(stats.delta_e_below_target)
        for kind, count in stats.errors.items():
            self.errors.labels(kind=self._kind(kind)).inc(count)
        if bytes_in:
            self.bytes_in.inc(bytes_in)
        if bytes_out:
            self.bytes_out.inc(bytes_out)
        self.shards_done_gauge.inc(stats.shards or 1)
        self._ok += stats.ok
        if math.isfinite(stats.delta_e_sum):
            self._delta_e_sum += stats.delta_e_sum
        if self._ok:
            self.delta_e_mean.set(self._delta_e_sum / self._ok)
        self.last_shard.set(time.time())
        info = (stats.encoder_id, stats.config_hash)
        if any(info) and info != self._info:
            self.run_info.clear()
            random = str(stats.encoder_id.startswith("random:")).lower()
            self.run_info.labels(encoder_id=info[0], config_hash=info[1], random=random).set(1)
            self._info = info

    def observe_items(self, delta_e_values: Iterable[float], pgd_steps: float = 0.0) -> None:
        """Per-item Δe of ok items (NaN skipped) into the histogram; `pgd_steps` added to the counter."""
        for value in delta_e_values:
            if value is not None and math.isfinite(value):
                self.delta_e.observe(float(value))
        if pgd_steps and math.isfinite(pgd_steps) and pgd_steps > 0:
            self.pgd_steps.inc(pgd_steps)

    def record_committed_shard(
        self,
        out: Any,
        shard_id: str,
        stats: ShardStats,
        input_url: str | None = None,
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        """Everything about one committed shard: its stats, per-item Δe and PGD steps from
        `<shard>.parquet`, and the sizes of the input and output tars. `out` is an OutputFolder."""
        bytes_in = bytes_out = None
        try:
            bytes_out = int(out.fs.size(out.key(f"{shard_id}.tar")))
        except Exception as exc:  # a metric is never worth a failed run
            logger.debug("metrics: no size for %s.tar: %s", shard_id, exc)
        if input_url:
            try:
                from pipeline.io.storage import filesystem

                fs, path = filesystem(input_url, storage_options)
                bytes_in = int(fs.size(path))
            except Exception as exc:
                logger.debug("metrics: no size for %s: %s", input_url, exc)
        self.shard_done(stats, bytes_in=bytes_in, bytes_out=bytes_out)
        try:
            import pyarrow.parquet as pq

            with out.fs.open(out.key(f"{shard_id}.parquet"), "rb") as f:
                table = pq.read_table(
                    io.BytesIO(f.read()), columns=["status", "delta_e_mean", "steps_mean", "n_windows"]
                )
            rows = table.to_pylist()
        except Exception as exc:
            logger.warning("metrics: cannot read the manifest of %s: %s", shard_id, exc)
            return
        ok = [r for r in rows if r["status"] == SampleStatus.OK]
        steps = sum(
            (r["steps_mean"] or 0.0) * (r["n_windows"] or 0)
            for r in ok
            if r["steps_mean"] is not None and math.isfinite(r["steps_mean"])
        )
        self.observe_items([r["delta_e_mean"] for r in ok if r["delta_e_mean"] is not None], pgd_steps=steps)

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
        if self.thread is not None:
            self.thread.join(timeout=5)
            self.thread = None


class ActorMetrics(NoopMetrics):
    """Per-actor metrics through `ray.util.metrics` (exported by Ray's metrics agent). A no-op when
    Ray is not importable or not initialised in this process."""

    def __init__(self) -> None:
        self.active = False
        self._kind = _KindBound()
        try:
            import ray

            if not ray.is_initialized():
                return
            from ray.util.metrics import Counter, Histogram

            self.windows = Counter(ACTOR_WINDOWS, description="Audio windows protected by this actor.")
            self.window_seconds = Histogram(
                ACTOR_WINDOW_SECONDS,
                description="Accelerator seconds per window (one observation per window).",
                boundaries=list(WINDOW_SECONDS_BUCKETS),
            )
            self.pgd_steps = Counter(ACTOR_PGD_STEPS, description="PGD steps run by this actor.")
            self.errors = Counter(ACTOR_ERRORS, description="Failed tracks by error kind.", tag_keys=("kind",))
            self.active = True
        except Exception as exc:  # metrics never stop an actor from working
            logger.warning("actor metrics disabled: %s", exc)
            self.active = False

    def batch_done(self, windows: int, seconds: float, steps: int, errors: Mapping[str, int] | None = None) -> None:
        """One protect call: `windows` windows in `seconds` accelerator seconds, `steps` PGD steps,
        `errors` failed tracks by kind."""
        if not self.active:
            return
        try:
            if windows > 0:
                self.windows.inc(windows)
                per_window = max(0.0, seconds) / windows
                for _ in range(windows):
                    self.window_seconds.observe(per_window)
            if steps > 0:
                self.pgd_steps.inc(steps)
            for kind, count in (errors or {}).items():
                if count > 0:
                    self.errors.inc(count, tags={"kind": self._kind(kind)})
        except Exception as exc:
            logger.warning("actor metrics failed, disabling: %s", exc)
            self.active = False
