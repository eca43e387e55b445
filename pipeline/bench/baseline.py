"""Section 2, the baseline: laion-clap's own audio path in a naive per-item fp32 loop (weights not
frozen), the same work per window as the engine's `pgd`."""

from __future__ import annotations

import torch

from pipeline.bench.common import ALPHA, EPS, SIGMA, clip_48k, log, median_seconds, sync_for
from pipeline.bench.results import BaselineResult
from pipeline.encoders.base import set_hub_offline
from pipeline.encoders.load import pick_device


def bench_baseline(
    amodel: str, steps: int, *, device: str = "cpu", repeats: int = 3, warmup: int = 1
) -> BaselineResult:
    """laion-clap's own `CLAP.get_audio_embedding`, one window at a time, fp32, weights trainable:
    e(x) once, then `steps` × (forward, ||e(x+δ) − e(x)||, backward, sign step), then a scoring
    forward — the same work per window as the engine's `pgd`, done the naive way."""
    set_hub_offline()  # laion_clap's import fetches tokenizers otherwise
    # laion_clap's own model code, needed by this section alone (and only after set_hub_offline).
    from laion_clap.clap_module.factory import create_model

    dev = pick_device(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model, _ = create_model(amodel, "transformer", precision="fp32", device=dev)
    model.eval()  # no SpecAugment; parameters keep requires_grad=True (not frozen)
    sync = sync_for(dev)
    clean_wave = clip_48k(0).to(dev)

    def one_window() -> None:
        with torch.no_grad():
            clean = model.get_audio_embedding([{"waveform": clean_wave}])
        delta = (torch.randn_like(clean_wave) * SIGMA).clamp(-EPS, EPS).requires_grad_(True)
        for _ in range(steps):
            adv = model.get_audio_embedding([{"waveform": clean_wave + delta}])
            loss = (adv - clean).norm()
            loss.backward()
            with torch.no_grad():
                delta += ALPHA * delta.grad.sign()
                delta.copy_(torch.maximum(torch.minimum(delta, 1 - clean_wave), -1 - clean_wave).clamp(-EPS, EPS))
            delta.grad = None
        with torch.no_grad():
            model.get_audio_embedding([{"waveform": clean_wave + delta}])

    seconds = median_seconds(one_window, repeats, warmup, sync)
    log(f"baseline {amodel}: {seconds:.2f} s/window")
    return BaselineResult(amodel, steps, seconds, repeats)
