"""Driver metrics scraped over HTTP from a real prometheus_client server; actor metrics in real Ray."""

from __future__ import annotations

import subprocess
import sys
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pipeline.io.manifest import commit_shard
from pipeline.io.output import OutputFolder
from pipeline.io.shards import build_tar
from pipeline.records import ManifestRow, SampleStatus, ShardStats
from pipeline.stages.metrics import (
    DELTA_E_BUCKETS,
    ActorMetrics,
    DriverMetrics,
    NoopMetrics,
)


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} from the live endpoint."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def stats(**kw) -> ShardStats:
    base = dict(shards=1, encoder_id="laion:music_audioset_epoch_15_esc_90.14.pt", config_hash="abc123")
    base.update(kw)
    return ShardStats(**base)


def test_driver_metrics_served_and_match_inputs(tmp_path):
    a = stats(
        items=10,
        ok=8,
        error=2,
        passthrough=1,
        dropped=1,
        windows=40,
        audio_seconds=300.5,
        accelerator_seconds=12.25,
        wall_seconds=20.0,
        delta_e_sum=4.0,
        delta_e_below_target=1,
        errors={"decode": 1, "too short": 1},
    )
    b = stats(
        items=5,
        ok=4,
        error=1,
        dropped=1,
        windows=17,
        audio_seconds=120.0,
        accelerator_seconds=5.75,
        wall_seconds=8.0,
        delta_e_sum=2.4,
        errors={"decode": 1},
    )
    metrics = DriverMetrics(0, addr="127.0.0.1")
    try:
        assert metrics.port and metrics.port > 0
        metrics.shards_total(3)
        metrics.shard_done(a, bytes_in=1000, bytes_out=1200)
        metrics.shard_done(b, bytes_in=500)
        metrics.observe_items([0.05, 0.45, 0.55, 1.3, float("nan")], pgd_steps=120.0)
        m = scrape(metrics.port)
    finally:
        metrics.stop()

    assert m[("unlearnable_items_total", (("status", "ok"),))] == 12
    assert m[("unlearnable_items_total", (("status", "error"),))] == 3
    assert m[("unlearnable_failed_items_total", (("outcome", "passthrough"),))] == 1
    assert m[("unlearnable_failed_items_total", (("outcome", "dropped"),))] == 2
    assert m[("unlearnable_windows_total", ())] == 57
    assert m[("unlearnable_accelerator_seconds_total", ())] == pytest.approx(18.0)
    assert m[("unlearnable_audio_seconds_total", ())] == pytest.approx(420.5)
    assert m[("unlearnable_shard_wall_seconds_total", ())] == pytest.approx(28.0)
    assert m[("unlearnable_errors_total", (("kind", "decode"),))] == 2
    assert m[("unlearnable_errors_total", (("kind", "too short"),))] == 1
    assert m[("unlearnable_delta_e_below_target_total", ())] == 1
    assert m[("unlearnable_bytes_in_total", ())] == 1500
    assert m[("unlearnable_bytes_out_total", ())] == 1200
    assert m[("unlearnable_pgd_steps_total", ())] == 120
    assert m[("unlearnable_shards_total", ())] == 3
    assert m[("unlearnable_shards_done", ())] == 2
    assert m[("unlearnable_delta_e_mean", ())] == pytest.approx(6.4 / 12)
    assert m[("unlearnable_last_shard_timestamp_seconds", ())] > 1.6e9
    info = [k for k in m if k[0] == "unlearnable_run_info"]
    assert info == [
        (
            "unlearnable_run_info",
            (
                ("config_hash", "abc123"),
                ("encoder_id", "laion:music_audioset_epoch_15_esc_90.14.pt"),
                ("random", "false"),
            ),
        )
    ]
    # Histogram: 4 finite values (NaN skipped), cumulative buckets 0.1 .. 1.4.
    assert m[("unlearnable_delta_e_count", ())] == 4
    assert m[("unlearnable_delta_e_sum", ())] == pytest.approx(2.35)
    assert m[("unlearnable_delta_e_bucket", (("le", "0.1"),))] == 1
    assert m[("unlearnable_delta_e_bucket", (("le", "0.5"),))] == 2
    assert m[("unlearnable_delta_e_bucket", (("le", "1.3"),))] == 4
    assert m[("unlearnable_delta_e_bucket", (("le", "+Inf"),))] == 4
    assert len([k for k in m if k[0] == "unlearnable_delta_e_bucket"]) == len(DELTA_E_BUCKETS) + 1
    # Every name is ours (private registry: no process/python collectors).
    assert all(name.startswith("unlearnable_") for name, _ in m)


def test_two_driver_metrics_coexist_and_error_kinds_are_bounded():
    one, two = DriverMetrics(None), DriverMetrics(None)  # private registries: no name clash
    assert one.port is None
    many = stats(error=60, errors={f"kind{i}": 1 for i in range(60)})
    one.shard_done(many)
    kinds = {s.labels["kind"] for s in one.errors.collect()[0].samples if s.name.endswith("_total")}
    assert len(kinds) == 51 and "other" in kinds  # 50 kinds, then "other"
    two.stop()
    one.stop()


def test_record_committed_shard_reads_manifest_and_sizes(tmp_path):
    out = OutputFolder(str(tmp_path / "out"))
    out.ensure()
    rows = [
        ManifestRow(key="a", status=SampleStatus.OK, n_windows=3, steps_mean=10.0, delta_e_mean=0.6),
        ManifestRow(key="b", status=SampleStatus.OK, n_windows=2, steps_mean=5.0, delta_e_mean=0.3),
        ManifestRow(key="c", status=SampleStatus.ERROR, error="decode: bad"),
    ]
    s = stats(items=3, ok=2, error=1, windows=5, delta_e_sum=0.9, errors={"decode": 1})
    tar = build_tar([("a.flac", b"x" * 100), ("b.flac", b"y" * 50)])
    commit_shard(out, "shard-000000", tar, rows, s)
    src = tmp_path / "in.tar"
    src.write_bytes(b"z" * 4096)
    metrics = DriverMetrics(0, addr="127.0.0.1")
    try:
        metrics.record_committed_shard(out, "shard-000000", s, input_url=str(src))
        metrics.record_committed_shard(out, "missing", stats(items=1, ok=1))  # never raises
        m = scrape(metrics.port)
    finally:
        metrics.stop()
    assert m[("unlearnable_pgd_steps_total", ())] == 40
    assert m[("unlearnable_delta_e_count", ())] == 2
    assert m[("unlearnable_bytes_in_total", ())] == 4096
    assert m[("unlearnable_bytes_out_total", ())] == len(tar)
    assert m[("unlearnable_items_total", (("status", "ok"),))] == 3


def test_noop_metrics_has_every_method():
    noop = NoopMetrics()
    noop.shards_total(1)
    noop.shard_done(ShardStats())
    noop.observe_items([0.1])
    noop.record_committed_shard(None, "x", ShardStats())
    noop.batch_done(1, 0.1, 10, {"pgd": 1})
    noop.stop()
    # Every public method of the real driver metrics exists on the no-op one and takes the same
    # arguments, so the driver can hold either.
    import inspect

    for name, method in inspect.getmembers(DriverMetrics, inspect.isfunction):
        if not name.startswith("_"):
            assert hasattr(NoopMetrics, name), f"NoopMetrics lacks DriverMetrics.{name}"
            params = list(inspect.signature(method).parameters.values())[1:]
            required = [None for p in params if p.default is p.empty and p.kind is p.POSITIONAL_OR_KEYWORD]
            getattr(noop, name)(*required)


def test_actor_metrics_noop_without_ray():
    # A fresh interpreter: Ray is importable but not initialised there.
    code = (
        "from pipeline.stages.metrics import ActorMetrics\n"
        "m = ActorMetrics()\n"
        "m.batch_done(4, 1.0, 40, {'pgd': 1})\n"
        "import ray; assert not ray.is_initialized()\n"
        "print('active', m.active)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "active False" in result.stdout


def test_actor_metrics_in_real_ray_actor(ray_session):
    ray = ray_session

    @ray.remote(num_cpus=0.1)
    class Probe:
        def __init__(self):
            self.metrics = ActorMetrics()

        def record(self) -> bool:
            self.metrics.batch_done(windows=6, seconds=1.2, steps=60, errors={"pgd": 1, "decode": 2})
            self.metrics.batch_done(windows=0, seconds=0.0, steps=0, errors={})
            return self.metrics.active

    probe = Probe.remote()
    assert ray.get(probe.record.remote(), timeout=120) is True
    # In the driver too (Ray initialised here): active, and recording never raises.
    local = ActorMetrics()
    assert local.active
    local.batch_done(2, 0.5, 20, {"x": 1})
    assert local.active
    ray.kill(probe)


@pytest.mark.slow
def test_driver_endpoint_during_a_real_run_matches_manifests(tmp_path, ray_session):
    """Scrape the driver's endpoint while the real pipeline runs; at the end the counters equal
    what the manifests and markers say."""
    import threading
    import urllib.request

    import pyarrow.parquet as pq
    from prometheus_client.parser import text_string_to_metric_families

    from pipeline.config import config_from_dict
    from pipeline.stages.metrics import DriverMetrics
    from pipeline.stages.pipeline import run
    from tests.factories import audio_bytes, write_shard

    for shard in range(2):
        write_shard(
            tmp_path / "in" / f"s{shard}.tar",
            [(f"k{shard}{i}.wav", audio_bytes(1.0, 16000, 1, seed=shard * 10 + i)) for i in range(2)]
            + [(f"bad{shard}.wav", b"not audio")],
        )
    cfg = config_from_dict(
        {
            "io": {"input": str(tmp_path / "in"), "output": str(tmp_path / "out")},
            "encoder": {"checkpoint": "random:HTSAT-tiny:0", "device": "cpu"},
            "attack": {"steps": 1, "precision": "fp32"},
            "quality": {"visqol": "off"},  # not what this test checks (tests/core/test_quality.py, test_segments.py)
            "runtime": {"tracks_per_call": 1, "batch_windows": 2, "progress": False},
        }
    )
    metrics = DriverMetrics(0, addr="127.0.0.1")
    url = f"http://127.0.0.1:{metrics.port}/metrics"
    scrapes: list[str] = []
    done = threading.Event()

    def scrape() -> None:
        while not done.is_set():
            scrapes.append(urllib.request.urlopen(url, timeout=5).read().decode())
            done.wait(0.5)

    thread = threading.Thread(target=scrape, daemon=True)
    thread.start()
    try:
        run(cfg, metrics=metrics)
        final = urllib.request.urlopen(url, timeout=5).read().decode()
    finally:
        done.set()
        thread.join(timeout=10)
        metrics.stop()
    assert len(scrapes) >= 2  # the endpoint answered while the run was going

    values: dict[tuple[str, tuple], float] = {}
    for family in text_string_to_metric_families(final):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    rows = [r for f in sorted((tmp_path / "out").glob("*.parquet")) for r in pq.read_table(f).to_pylist()]
    ok = sum(r["status"] == "ok" for r in rows)
    error = sum(r["status"] == "error" for r in rows)
    assert (ok, error) == (4, 2)
    items = {labels: v for (name, labels), v in values.items() if name == "unlearnable_items_total"}
    assert sum(v for labels, v in items.items() if ("status", "ok") in labels) == ok
    assert sum(v for labels, v in items.items() if ("status", "error") in labels) == error
