"""Soak: 1,000 short items over 50 shards through the real pipeline (tiny random encoder, no
gradient step: δ₀ is scored and written; what is soaked is the streaming, batching and memory,
not the optimiser, which the engine tests cover). Every key is accounted for, and neither the
driver's nor the protect actor's memory keeps growing across the run. Prints items/s and peak RSS.

Marked `soak`, not `slow`: it needs ~15 minutes of an otherwise idle 2-core machine; `.ci/run` runs
it last (`pytest -m soak -s`)."""

from __future__ import annotations

import os
import resource
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.config import config_from_dict
from tests.factories import audio_bytes, write_shard

SHARDS, PER_SHARD = 50, 20


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _actor_pids() -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if b"ProtectActor" in f.read():
                        pids.append(int(entry))
            except OSError:
                continue
    return pids


@pytest.mark.soak
def test_soak_thousand_items(tmp_path: Path, ray_session) -> None:
    from pipeline.stages.pipeline import run

    clip = audio_bytes(0.25, 16_000, 1)
    for shard in range(SHARDS):
        write_shard(
            tmp_path / "in" / f"soak-{shard:03d}.tar", [(f"k{shard:03d}-{i:02d}.wav", clip) for i in range(PER_SHARD)]
        )
    cfg = config_from_dict(
        {
            "io": {"input": str(tmp_path / "in"), "output": str(tmp_path / "out")},
            "encoder": {"checkpoint": "random:HTSAT-tiny:0", "device": "cpu"},
            "attack": {"steps": 0, "precision": "fp32"},
            "quality": {"masking": False, "musicldm_view": False, "segsnr": False, "visqol": "off"},
            "runtime": {"tracks_per_call": 20, "batch_windows": 10, "progress": False},
        }
    )
    samples: list[tuple[int, float, float]] = []  # (shards done, driver MiB, actor MiB)

    def sample(summary: dict) -> None:
        actors = _actor_pids()
        samples.append((len(samples) + 1, _rss_mib(os.getpid()), max((_rss_mib(p) for p in actors), default=0.0)))

    summary = run(cfg, on_summary=sample)
    rate = summary.this_run.items / summary.wall_seconds
    peak_driver = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    peak_actor = max(s[2] for s in samples)
    print(f"\nsoak: {summary.this_run.items} items in {summary.wall_seconds:.0f} s = {rate:.2f} items/s; "
          f"peak RSS driver {peak_driver:.0f} MiB, protect actor {peak_actor:.0f} MiB")  # fmt: skip

    assert summary.processed_shards == SHARDS and not summary.failed_shards
    keys = [r["key"] for f in sorted((tmp_path / "out").glob("*.parquet")) for r in pq.read_table(f).to_pylist()]
    assert len(keys) == len(set(keys)) == SHARDS * PER_SHARD
    assert summary.all_outputs.ok == SHARDS * PER_SHARD
    # Memory: peaks of the last third stay within a bound of the first third's (a leak of a few
    # MB per shard would cross it; batch-to-batch allocator swings stay well inside).
    third = max(1, len(samples) // 3)
    first, last = samples[:third], samples[-third:]
    assert max(s[1] for s in last) - max(s[1] for s in first) < 200, samples  # driver MiB
    assert max(s[2] for s in last) - max(s[2] for s in first) < 500, samples  # protect actor MiB
