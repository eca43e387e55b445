"""Section 4, memory: peak RSS of a fresh process whose protect actor handles the read stage's rows
of one short vs one long mono 44.1 kHz track."""

from __future__ import annotations

import gc
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.bench.common import (
    ALPHA,
    EPS,
    SIGMA,
    TRACK_RATE,
    WINDOW_SECONDS,
    log,
    proc_status_kib,
    release_free_memory,
    reset_peak_rss,
    run_child,
)
from pipeline.bench.results import MemoryResult
from pipeline.config import config_from_dict
from pipeline.demo import synthesize
from pipeline.io.audio import OutputFormat, encode
from pipeline.io.shards import Sample
from pipeline.records import SampleStatus
from pipeline.stages import rows as R
from pipeline.stages.protect import ProtectActor
from pipeline.stages.read import ReadSettings, sample_row
from pipeline.stages.segments import track_rows


def memory_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Inside a fresh process: what a protect actor holds for one mono 44.1 kHz track of
    spec['seconds']. The track goes through the read stage's own code (FLAC bytes -> decoded row
    -> segment rows of `audio.segment_seconds`); the rows' PCM is parked on disk (in a run it
    waits in Ray's object store, not in the actor); the peak-RSS mark is reset
    (/proc/self/clear_refs); then `ProtectActor` handles the rows in calls of
    `runtime.tracks_per_call`, as Ray hands them over. Peak RSS is then the actor's own."""
    threads = int(spec.get("threads") or os.cpu_count() or 1)
    cfg = config_from_dict(
        {
            "encoder": {"checkpoint": f"random:{spec['amodel']}:0", "device": spec.get("device", "cpu")},
            "attack": {
                "eps": EPS,
                "alpha": ALPHA,
                "sigma": SIGMA,
                "steps": int(spec["steps"]),
                "precision": spec["precision"],
                "target_delta_e": 1e9,  # early stop off
            },
            "audio": {"window_seconds": WINDOW_SECONDS, "overlap_seconds": 1.0},
            "runtime": {"batch_windows": int(spec["batch"]), "torch_threads": threads},
        }
    )
    n = round(float(spec["seconds"]) * TRACK_RATE)
    clip = synthesize(WINDOW_SECONDS, TRACK_RATE, 1, 120, 220.0, 0)[:, 0]
    track = np.resize(clip, n).astype(np.float32).reshape(n, 1)
    flac = encode(track, TRACK_RATE, OutputFormat("FLAC", "PCM_16", "flac"))
    del track
    settings = ReadSettings(extensions=("flac",), max_member_bytes=1 << 31, storage_options={})
    row = sample_row(Sample(key="memory", names=["memory.flac"], data=[flac]), settings)
    del flac, clip
    rows = track_rows(row, cfg.audio.segment_seconds, cfg.audio.overlap_seconds)
    del row
    parked = tempfile.TemporaryDirectory(prefix="bench-memory-")
    for i, r in enumerate(rows):
        path = Path(parked.name) / f"{i}.pcm"
        path.write_bytes(r[R.PCM])
        r[R.PCM] = str(path)
    gc.collect()
    release_free_memory()
    actor = ProtectActor(cfg)
    rss_before = proc_status_kib("VmRSS")
    reset_peak_rss()
    started = time.perf_counter()
    windows = 0
    per_call = cfg.runtime.tracks_per_call
    for begin in range(0, len(rows), per_call):
        call = [{**r, R.PCM: Path(r[R.PCM]).read_bytes()} for r in rows[begin : begin + per_call]]
        out = actor(R.rows_to_batch(call, list(call[0])))
        del call
        if any(status != SampleStatus.OK for status in out[R.STATUS]):
            raise RuntimeError(f"memory benchmark: protect failed: {out[R.ERROR]}")
        windows += int(sum(out["n_windows"]))
        del out
    seconds = time.perf_counter() - started
    parked.cleanup()
    return {
        "track_seconds": float(spec["seconds"]),
        "windows": windows,
        "segments": len(rows),
        "rss_before_mib": rss_before / 1024,
        "peak_mib": proc_status_kib("VmHWM") / 1024,
        "protect_seconds": seconds,
        "amodel": spec["amodel"],
        "steps": int(spec["steps"]),
        "batch": int(spec["batch"]),
        "precision": spec["precision"],
    }


def bench_memory(
    seconds: float,
    *,
    amodel: str,
    steps: int,
    batch: int,
    precision: str = "fp32",
    device: str = "cpu",
    threads: int = 0,
) -> MemoryResult:
    """Run :func:`memory_child` in a subprocess (its own peak RSS) and parse its JSON line."""
    spec = {
        "seconds": seconds,
        "amodel": amodel,
        "steps": steps,
        "batch": batch,
        "precision": precision,
        "device": device,
        "threads": threads,
    }
    result = MemoryResult(**run_child("--memory-child", spec))
    log(
        f"memory {seconds / 60:.0f} min: {result.windows} windows, peak {result.peak_mib:.0f} MiB "
        f"(before protect {result.rss_before_mib:.0f} MiB), {result.protect_seconds:.1f} s"
    )
    return result
