"""Section 5, the GPU: HTSAT-base bf16 PGD on CUDA, an eager batch-size sweep, then torch.compile
and CUDA graphs at the fastest batch, against a measured bf16 matmul ceiling."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from pipeline.bench.common import GPU_MODES, attack_params, clip_48k, log, median_seconds, sync_for
from pipeline.bench.results import GpuResult
from pipeline.core.engine import pgd
from pipeline.encoders.base import CLAP_RATE, ClapView
from pipeline.encoders.load import load_encoder


def matmul_ceiling_tflops(n: int = 8192, repeats: int = 20) -> float:
    """Measured bf16 dense matmul TFLOP/s on the current CUDA device."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        torch.matmul(a, b)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        torch.matmul(a, b)
    torch.cuda.synchronize()
    return 2 * n**3 * repeats / (time.perf_counter() - started) / 1e12


def gpu_embed(model: Any, view: Any, mode: str) -> Callable[[Any, Any], Any]:
    """pgd's embed through `model` run eagerly, `torch.compile`d, or compiled with CUDA graphs
    (mode="reduce-overhead": one graph replay per forward and per backward instead of a launch per
    kernel). Graph outputs live in buffers the next replay overwrites, so that mode marks
    each call as a new step and hands pgd a copy ([b, 512], negligible)."""
    if mode not in GPU_MODES:
        raise ValueError(f"unknown GPU mode {mode!r}; expected one of {', '.join(GPU_MODES)}")
    forward = model
    if mode == "compiled":
        forward = torch.compile(model)
    elif mode == "cudagraphs":
        forward = torch.compile(model, mode="reduce-overhead")

    def embed(x_rows: Any, _rows: Any) -> Any:
        if mode != "cudagraphs":
            return forward(view(x_rows))
        torch.compiler.cudagraph_mark_step_begin()
        return forward(view(x_rows)).clone()

    return embed


def bench_gpu(
    batch_sizes: Sequence[int],
    steps: int = 50,
    *,
    modes: Sequence[str] = GPU_MODES,
    repeats: int = 3,
    warmup: int = 1,
) -> list[GpuResult]:
    """HTSAT-base bf16 PGD on CUDA: an eager batch-size sweep (stops at the first out-of-memory),
    then the other `modes` at the eager sweep's fastest batch. A compiled mode's first call (2 PGD
    steps: compiling and capturing the no-grad and the gradient graphs) is timed on its own."""
    ceiling = matmul_ceiling_tflops()
    loaded = load_encoder("random:HTSAT-base:0", device="cuda")
    dev = loaded.device
    view = ClapView(CLAP_RATE).to(dev)
    sync = sync_for(dev)
    params = attack_params(steps, "bf16")
    short = attack_params(min(steps, 2), "bf16")
    base = torch.stack([clip_48k(i) for i in range(8)])

    def run_case(batch: int, mode: str) -> GpuResult:
        x = base[torch.arange(batch) % base.shape[0]][:, None, :].to(dev)
        try:
            embed = gpu_embed(loaded.model, view, mode)
            compile_seconds = 0.0
            if mode != "eager":
                started = time.perf_counter()
                pgd(embed, x, short, generator=torch.Generator().manual_seed(0))
                if sync is not None:
                    sync()
                compile_seconds = time.perf_counter() - started
                log(f"gpu B={batch} {mode}: first call {compile_seconds:.1f} s")
            seconds = median_seconds(
                lambda: pgd(embed, x, params, generator=torch.Generator().manual_seed(0)), repeats, warmup, sync
            )
        except torch.cuda.OutOfMemoryError as exc:
            torch.cuda.empty_cache()
            return GpuResult(batch, steps, "bf16", float("nan"), ceiling, f"out of memory: {exc}"[:80], mode)
        log(f"gpu B={batch} {mode}: {batch / seconds:.2f} windows/s")
        return GpuResult(batch, steps, "bf16", seconds, ceiling, mode=mode, compile_seconds=compile_seconds)

    results = []
    for batch in batch_sizes:
        results.append(run_case(batch, "eager"))
        if results[-1].error:
            break
    measured = [r for r in results if not r.error]
    if not measured:
        return results
    best = max(measured, key=lambda r: r.windows_per_s).batch
    for mode in modes:
        if mode != "eager":
            results.append(run_case(best, mode))
    return results
