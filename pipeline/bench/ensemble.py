"""Section 6, an encoder ensemble: PGD through TrackProtector's ensemble embed and mean distance
for 1, 2, 3 random encoders, seconds per step per window and peak memory, each size in a fresh
process."""

from __future__ import annotations

import gc
import os
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch

from pipeline.bench.common import (
    Contention,
    attack_params,
    clip_48k,
    cpu_meter,
    log,
    median_seconds,
    proc_status_kib,
    release_free_memory,
    reset_peak_rss,
    run_child,
    sync_for,
)
from pipeline.bench.results import EnsembleResult
from pipeline.core.engine import pgd
from pipeline.core.protect import TrackProtector
from pipeline.encoders.base import CLAP_RATE, CLAP_SAMPLES
from pipeline.encoders.load import load_encoder


def ensemble_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Inside a fresh process: time `pgd` against spec['encoders'] encoders at once, as
    TrackProtector runs an ensemble (its `embed_fn` -> [b, k, D], its mean `distance`), on an
    in-memory batch of 10 s 48 kHz mono windows; report the median call time, the time of each PGD
    step and the memory the calls add on top of the loaded encoders."""
    torch.set_num_threads(int(spec.get("threads") or os.cpu_count() or 1))
    k, batch, steps = int(spec["encoders"]), int(spec["batch"]), int(spec["steps"])
    repeats, warmup = int(spec.get("repeats", 3)), int(spec.get("warmup", 1))
    device = spec.get("device", "cpu")
    encoders = [load_encoder(f"random:{spec['amodel']}:{i}", device=device) for i in range(k)]
    dev = encoders[0].device
    cuda = dev.type == "cuda"

    def mib() -> float:
        return torch.cuda.memory_allocated(dev) / (1 << 20) if cuda else proc_status_kib("VmRSS") / 1024

    loaded = mib()
    # Built directly, not with stages.protect.build_protector: the bench times exactly these attack
    # settings (attack_params: early stop off, the precision as given, never resolved per device) and
    # the bare ensemble embed, without the config's defaults (perceptual weighting, EOT views).
    protector = TrackProtector(
        encoders,
        attack_params(steps, spec["precision"]),
        batch_windows=batch,
        ensemble="mean",
        measure_musicldm=False,
        measure_masking=False,
    )
    x = torch.stack([clip_48k(i) for i in range(batch)])[:, None, :].to(dev)  # [B, 1, 480000]
    lengths = torch.full((batch,), CLAP_SAMPLES, device=dev)
    ensemble_embed = protector.embed_fn(CLAP_RATE, lengths, ("clean48k",), random=True)
    sync = sync_for(dev)
    marks: list[tuple[float, bool]] = []  # (time, a gradient step's forward?) per embed call

    def embed(x_rows: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        if sync:
            sync()
        marks.append((time.perf_counter(), x_rows.requires_grad))
        return ensemble_embed(x_rows, rows)

    params = attack_params(steps, spec["precision"])

    def call() -> Any:
        return pgd(embed, x, params, generator=torch.Generator().manual_seed(0), distance=protector.distance)

    gc.collect()
    release_free_memory()
    before = mib()
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    else:
        reset_peak_rss()
    for _ in range(warmup):
        call()
    marks.clear()
    seconds = median_seconds(call, repeats, 0, sync)
    # A step runs from its forward's start to the next embed call's (the next step or the scoring forward).
    step_seconds = [marks[i + 1][0] - t for i, (t, grad) in enumerate(marks[:-1]) if grad]
    peak = torch.cuda.max_memory_allocated(dev) / (1 << 20) if cuda else proc_status_kib("VmHWM") / 1024
    return {
        "encoders": k,
        "amodel": spec["amodel"],
        "precision": spec["precision"],
        "batch": batch,
        "steps": steps,
        "seconds": seconds,
        "seconds_per_step_window": statistics.median(step_seconds) / batch,
        "min_seconds_per_step_window": min(step_seconds) / batch,
        "loaded_mib": loaded,
        "before_mib": before,
        "peak_mib": peak,
        "memory_kind": "CUDA allocated" if cuda else "RSS",
        "repeats": repeats,
        "peak_increase_mib": peak - before,
    }


def bench_ensemble(
    sizes: Sequence[int],
    *,
    amodel: str = "HTSAT-tiny",
    steps: int = 3,
    batch: int = 2,
    precision: str = "fp32",
    device: str = "cpu",
    threads: int = 0,
    repeats: int = 3,
    warmup: int = 1,
    meter: list[Contention] | None = None,
) -> list[EnsembleResult]:
    """Run :func:`ensemble_child` in a subprocess per ensemble size; ratios against the first size."""
    results: list[EnsembleResult] = []
    for k in sizes:
        spec = {
            "encoders": k,
            "amodel": amodel,
            "steps": steps,
            "batch": batch,
            "precision": precision,
            "device": device,
            "threads": threads,
            "repeats": repeats,
            "warmup": warmup,
        }
        with cpu_meter(f"ensemble k={k}", meter if meter is not None else []):
            result = EnsembleResult(**run_child("--ensemble-child", spec))
        first = results[0] if results else result
        if first.seconds_per_step_window > 0:
            result.ratio_vs_one = result.seconds_per_step_window / first.seconds_per_step_window
        if first.peak_increase_mib > 0:
            result.increase_ratio_vs_one = result.peak_increase_mib / first.peak_increase_mib
        results.append(result)
        log(
            f"ensemble k={k}: {result.seconds:.2f} s/call, {result.seconds_per_step_window:.3f} s per step per window "
            f"(×{result.ratio_vs_one:.2f}), peak +{result.peak_increase_mib:.0f} MiB {result.memory_kind}"
        )
    return results
