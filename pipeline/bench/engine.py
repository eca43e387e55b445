"""Section 1, the bare engine: `pgd` on in-memory 48 kHz mono windows per batch size and
precision (optionally `torch.compile`d), and the fp32 no-grad forward per window."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from pipeline.bench.common import attack_params, clip_48k, log, median_seconds, sync_for
from pipeline.bench.results import EngineResult, ForwardResult
from pipeline.core.engine import pgd
from pipeline.encoders.base import CLAP_RATE, ClapView
from pipeline.encoders.load import load_encoder


def bench_engine(
    amodel: str,
    steps: int,
    batch_sizes: Sequence[int],
    precisions: Sequence[str],
    *,
    device: str = "cpu",
    compile: bool = False,
    repeats: int = 3,
    warmup: int = 1,
    warmup_steps: int | None = None,
    encoder: Any = None,
) -> tuple[list[EngineResult], list[ForwardResult]]:
    """Time `pgd` on in-memory [B, 1, 480000] windows (48 kHz mono, ClapView(48000)).

    Returns one EngineResult per (batch, precision[, compiled]) and, per batch, the fp32 no-grad
    forward time per window. Warm-up calls run `warmup_steps` steps (default: `steps`), so a
    50-step measurement need not pay for a 50-step warm-up.
    """
    loaded = encoder if encoder is not None else load_encoder(f"random:{amodel}:0", device=device)
    dev = loaded.device
    sync = sync_for(dev)
    view = ClapView(CLAP_RATE).to(dev)
    runners: list[tuple[bool, Any]] = [(False, loaded.model)]
    if compile:
        runners.append((True, torch.compile(loaded.model)))
    clips = [clip_48k(i) for i in range(max(batch_sizes))]
    results: list[EngineResult] = []
    forwards: list[ForwardResult] = []
    for batch in batch_sizes:
        x = torch.stack(clips[:batch])[:, None, :].to(dev)  # [B, 1, 480000]
        for compiled, model in runners:

            def embed(x_rows: torch.Tensor, _rows: torch.Tensor, model: Any = model) -> torch.Tensor:
                return model(view(x_rows))

            for precision in precisions:
                params = attack_params(steps, precision)

                def call(params: Any = params, embed: Any = embed, x_in: torch.Tensor = x) -> Any:
                    return pgd(embed, x_in, params, generator=torch.Generator().manual_seed(0))

                label = f"{amodel} B={batch} {precision}{' compiled' if compiled else ''}"
                if compiled:
                    started = time.perf_counter()
                    call()
                    log(f"engine {label}: first call (compile) {time.perf_counter() - started:.1f} s")
                if warmup_steps is not None:
                    short = attack_params(warmup_steps, precision)
                    for _ in range(warmup):
                        pgd(embed, x, short, generator=torch.Generator().manual_seed(0))
                    seconds = median_seconds(call, repeats, 0, sync)
                else:
                    seconds = median_seconds(call, repeats, warmup, sync)
                results.append(
                    EngineResult(
                        amodel, precision, batch, steps, seconds, compiled, repeats, threads=torch.get_num_threads()
                    )
                )
                log(f"engine {label}: {seconds:.2f} s/call, {batch / seconds:.3f} windows/s")

        def forward(x: torch.Tensor = x) -> Any:
            with torch.no_grad():
                return loaded.model(view(x))

        fwd = median_seconds(forward, repeats, warmup, sync)
        forwards.append(ForwardResult(amodel, batch, fwd / batch))
    return results, forwards
