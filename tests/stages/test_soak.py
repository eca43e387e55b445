"""Soak: 1,000 short items over 50 shards through the real pipeline (tiny random encoder, no
gradient step: δ₀ is scored and written; what is soaked is the streaming, batching and memory,
not the optimiser, which the engine tests cover). The encoder is the transformers backend's tiny
preset (`random:hf:tiny:0`, a real `ClapAudioModelWithProjection`): it costs a quarter of random
HTSAT-tiny per window on CPU (3.5 vs 17 s per 20-item shard, 1 thread), which takes the soak from
~15 to ~6 minutes; the laion path's memory is bounded by the memory benchmark's test instead.
Every key is accounted for, and neither the driver's nor the protect actor's memory keeps growing
across the run. Prints items/s and peak RSS.

Preemption round: mid-run the protect actor is SIGKILLed once (after 10 shards committed) and the
shard writer once (after 25); Ray restarts them, and still every key is written exactly once with
no failed shard. The actor's memory samples then come from its successor (a fresh process, so a
restart can only lower them: the growth bound still catches a leak).

Marked `soak`, not `slow`: it needs several minutes of an otherwise idle 2-core machine; `.ci/run`
runs it last (`pytest -m soak -s`)."""

from __future__ import annotations

import os
import resource
import signal
import threading
import time
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


def _actor_pids(title: bytes = b"ProtectActor") -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if title in f.read():
                        pids.append(int(entry))
            except OSError:
                continue
    return pids


def _preempt(out, done: threading.Event, killed: list[str]) -> None:
    """SIGKILL the protect actor after 10 committed shards and the shard writer after 25."""
    plan = [
        (10, b"MapWorker(MapBatches(ProtectActor))", "protect actor"),
        (25, b"MapWorker(MapBatches(ShardWriter))", "writer"),
    ]
    while plan and not done.is_set():
        markers = len(list(out.glob("*.stats.json"))) if out.exists() else 0
        at, title, name = plan[0]
        pids = _actor_pids(title) if markers >= at else []
        if pids:
            os.kill(pids[0], signal.SIGKILL)
            killed.append(f"{name} at {markers} shards")
            plan.pop(0)
        time.sleep(0.2)


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
            "encoder": {"checkpoint": "random:hf:tiny:0", "device": "cpu"},
            "attack": {"steps": 0, "precision": "fp32"},
            "quality": {"masking": False, "musicldm_view": False, "segsnr": False, "visqol": "off"},
            "runtime": {"tracks_per_call": 20, "batch_windows": 10, "progress": False},
        }
    )
    samples: list[tuple[int, float, float]] = []  # (shards done, driver MiB, actor MiB)

    def sample(summary: dict) -> None:
        actors = _actor_pids()
        samples.append((len(samples) + 1, _rss_mib(os.getpid()), max((_rss_mib(p) for p in actors), default=0.0)))

    done, killed = threading.Event(), []
    killer = threading.Thread(target=_preempt, args=(tmp_path / "out", done, killed))
    killer.start()
    try:
        summary = run(cfg, on_summary=sample)
    finally:
        done.set()
        killer.join()
    rate = summary.this_run.items / summary.wall_seconds
    peak_driver = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    peak_actor = max(s[2] for s in samples)
    print(f"\nsoak: {summary.this_run.items} items in {summary.wall_seconds:.0f} s = {rate:.2f} items/s; "
          f"peak RSS driver {peak_driver:.0f} MiB, protect actor {peak_actor:.0f} MiB; killed: {killed}")  # fmt: skip
    assert len(killed) == 2, killed

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
