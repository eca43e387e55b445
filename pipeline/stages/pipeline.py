"""Wire the stages into one streaming Ray Data job: pending shard URLs -> read (CPU) -> protect
(actor pool with the encoder) -> quality (CPU: SNR, PESQ, STOI, ViSQOL) -> encode (CPU) -> shard
writer (one actor) -> per-shard summaries."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pipeline.config import ConfigError, PipelineConfig
from pipeline.encoder import RANDOM_WARNING, CheckpointSpec
from pipeline.manifest import merge_stats
from pipeline.metrics import DriverMetrics, NoopMetrics
from pipeline.records import ShardStats
from pipeline.shards import OutputFolder, ShardRef, list_shards
from pipeline.stages import rows as R
from pipeline.stages.protect import ProtectActor
from pipeline.stages.quality import QualitySettings, quality_batch
from pipeline.stages.read import ReadSettings, read_shard
from pipeline.stages.write import EncodeSettings, ShardWriter, WriteSettings, encode_batch
from pipeline.views import get_view

logger = logging.getLogger(__name__)

WRITER_CPUS = 0.1  # the shard writer only concatenates bytes and uploads


@dataclass
class RunPlan:
    """What a run will do, before any work starts."""

    shards: list[ShardRef]
    pending: list[ShardRef]
    skipped: list[str] = field(default_factory=list)  # shard ids already completed (resume)


@dataclass
class RunSummary:
    """Totals after a run: this run's shards, and every completed shard under the output."""

    processed_shards: int
    skipped_shards: int
    this_run: ShardStats
    all_outputs: ShardStats
    wall_seconds: float
    random_encoder: bool
    failed_shards: list[tuple[str, str]] = field(default_factory=list)  # (shard id, why): no marker, rerun


def plan(cfg: PipelineConfig) -> RunPlan:
    """List input shards and split them into pending and already-completed ones."""
    options = cfg.io.storage.storage_options()
    shards = list_shards(cfg.io.input, options)
    done = set() if cfg.io.overwrite else OutputFolder(cfg.io.output, options).completed()
    pending = [s for s in shards if s.shard_id not in done]
    return RunPlan(shards=shards, pending=pending, skipped=sorted(s.shard_id for s in shards if s.shard_id in done))


def init_ray(cfg: PipelineConfig) -> None:
    """Connect to RAY_ADDRESS / runtime.ray_address, or start a local Ray (the embedded default)."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    address = cfg.runtime.ray_address or os.environ.get("RAY_ADDRESS")
    env = {"env_vars": {"HF_HUB_OFFLINE": "1"}} if cfg.encoder.hub_offline else {}
    if address:
        ray.init(address=address, runtime_env=env or None, log_to_driver=True)
    else:
        ray.init(
            include_dashboard=False,
            runtime_env=env or None,
            log_to_driver=True,
            logging_level=logging.WARNING,
        )


class Progress:
    """Prints one line per committed shard: shards done / total, items, Δe so far, ETA."""

    def __init__(self, total: int, enabled: bool, stream: Any = None):
        self.total, self.enabled = total, enabled
        self.stream = stream or sys.stdout
        self.started = time.perf_counter()
        self.done = self.items = self.ok = self.error = 0
        self.delta_e_sum = 0.0

    def update(self, summary: dict[str, Any]) -> None:
        self.done += 1
        self.items += int(summary["items"])
        self.ok += int(summary["ok"])
        self.error += int(summary["error"])
        self.delta_e_sum += float(summary["delta_e_sum"])
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.started
        eta = elapsed / self.done * (self.total - self.done)
        mean = self.delta_e_sum / self.ok if self.ok else float("nan")
        if summary.get("failed"):
            print(
                f"[{self.done}/{self.total} shards] {summary['shard_id']}: FAILED ({summary['failed']}); "
                "no marker written, a rerun retries it",
                file=self.stream,
                flush=True,
            )
            return
        print(
            f"[{self.done}/{self.total} shards] {summary['shard_id']}: items {self.items} "
            f"(ok {self.ok}, error {self.error}) | Δe mean {mean:.3f} | "
            f"{self.items / elapsed:.2f} items/s | ETA {_clock(eta)}",
            file=self.stream,
            flush=True,
        )


def _clock(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def build_dataset(cfg: PipelineConfig, pending: list[ShardRef]) -> Any:
    """The lazy Ray dataset of per-shard summaries (nothing runs until it is iterated)."""
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.enable_operator_progress_bars = False
    options = cfg.io.storage.storage_options()
    rt = cfg.runtime
    read_settings = ReadSettings(
        extensions=tuple(e.lower() for e in cfg.audio.extensions),
        max_member_bytes=int(cfg.audio.max_member_mb * (1 << 20)),
        storage_options=options,
        lossy_output=cfg.audio.lossy_output,
        segment_seconds=cfg.audio.segment_seconds,
        overlap_seconds=cfg.audio.overlap_seconds,
    )
    write_settings = WriteSettings(
        output=cfg.io.output,
        storage_options=options,
        on_error=cfg.audio.on_error,
        config_hash=cfg.output_hash(),
        target_delta_e=cfg.attack.target_delta_e,
        eps=cfg.attack.eps,
        max_member_bytes=read_settings.max_member_bytes,
    )
    items = [{R.SHARD_ID: s.shard_id, R.SHARD_URL: s.url} for s in pending]
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    ds = ds.flat_map(read_shard, fn_kwargs={"settings": read_settings}, num_cpus=rt.io_cpus)
    ds = ds.map_batches(
        ProtectActor,
        fn_constructor_kwargs={"cfg": cfg},
        batch_size=rt.tracks_per_call,
        compute=ray.data.ActorPoolStrategy(size=rt.num_actors),
        num_gpus=rt.num_gpus_per_actor,
        num_cpus=rt.num_cpus_per_actor,
        batch_format="numpy",
    )
    q = cfg.quality
    ds = ds.map_batches(
        quality_batch,
        fn_kwargs={
            "settings": QualitySettings(
                segsnr=q.segsnr,
                pesq=q.pesq,
                stoi=q.stoi,
                visqol=q.visqol,
                visqol_share=q.visqol_share,
                visqol_excerpt_seconds=q.visqol_excerpt_seconds,
                visqol_excerpts=q.visqol_excerpts,
                segment_seconds=cfg.audio.segment_seconds,
                overlap_seconds=cfg.audio.overlap_seconds,
            )
        },
        batch_size=1,
        num_cpus=rt.io_cpus,
        batch_format="numpy",
    )
    ds = ds.map_batches(
        encode_batch,
        fn_kwargs={"settings": EncodeSettings(eps=cfg.attack.eps)},
        batch_size=rt.tracks_per_call,
        num_cpus=rt.io_cpus,
        batch_format="numpy",
    )
    ds = ds.map_batches(
        ShardWriter,
        fn_constructor_kwargs={"settings": write_settings},
        batch_size=None,
        compute=ray.data.ActorPoolStrategy(size=1),
        # Not io_cpus: equal resources would let Ray fuse the encode tasks into this single actor,
        # and encoding must stay parallel.
        num_cpus=WRITER_CPUS,
        batch_format="numpy",
    )
    return ds


def run(
    cfg: PipelineConfig,
    on_summary: Callable[[dict[str, Any]], None] | None = None,
    metrics: NoopMetrics | None = None,
) -> RunSummary:
    """Protect every pending shard of `cfg.io.input` into `cfg.io.output`; returns totals merged
    from the stats markers on storage. `metrics` defaults to a Prometheus endpoint on
    runtime.metrics_port (none when that is null)."""
    started = time.perf_counter()
    for name in cfg.attack.eot_views:
        try:
            get_view(name)
        except KeyError as exc:
            raise ConfigError(f"attack.eot_views: {exc.args[0]}") from exc
    options = cfg.io.storage.storage_options()
    random_encoder = CheckpointSpec.parse(cfg.encoder.checkpoint, cfg.encoder.amodel).is_random
    if random_encoder:
        print("WARNING: " + RANDOM_WARNING.format(spec=cfg.encoder.checkpoint), file=sys.stderr, flush=True)
    run_plan = plan(cfg)
    out = OutputFolder(cfg.io.output, options)
    out.ensure()
    out.write_atomic("_config.yaml", cfg.to_yaml().encode())
    for shard in run_plan.pending:
        out.remove_stale(shard.shard_id)
    progress = Progress(len(run_plan.pending), cfg.runtime.progress)
    if cfg.runtime.progress:
        print(
            f"{len(run_plan.shards)} shard(s) found, {len(run_plan.skipped)} already complete, "
            f"{len(run_plan.pending)} to protect -> {cfg.io.output}",
            flush=True,
        )
    this_run = ShardStats()
    owns_metrics = metrics is None
    if metrics is None:
        port = cfg.runtime.metrics_port
        metrics = DriverMetrics(port, addr=cfg.runtime.metrics_addr) if port is not None else NoopMetrics()
    metrics.shards_total(len(run_plan.pending))
    input_urls = {s.shard_id: s.url for s in run_plan.pending}
    failed: list[tuple[str, str]] = []
    try:
        if run_plan.pending:
            init_ray(cfg)
            for summary in build_dataset(cfg, run_plan.pending).iter_rows():
                progress.update(summary)
                stats = ShardStats.from_json(summary["stats_json"])
                this_run = this_run + stats
                if on_summary is not None:
                    on_summary(summary)
                if summary["failed"]:
                    failed.append((summary["shard_id"], summary["failed"]))
                    continue
                metrics.record_committed_shard(
                    out,
                    summary["shard_id"],
                    stats,
                    input_url=input_urls.get(summary["shard_id"]),
                    storage_options=options,
                )
    finally:
        if owns_metrics:
            metrics.stop()
    return RunSummary(
        processed_shards=progress.done,
        skipped_shards=len(run_plan.skipped),
        this_run=this_run,
        all_outputs=merge_stats(out),
        wall_seconds=time.perf_counter() - started,
        random_encoder=random_encoder,
        failed_shards=failed,
    )
