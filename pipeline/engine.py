"""Projected gradient ascent on Δe = ||e(x+δ) − e(x)||₂ — plain torch, no I/O, no Ray, no config.

The whole method in one function, :func:`pgd`:

    e₀   = e(x)                                   computed once, no gradient
    δ₀   ~ N(0, σ²), clipped to [−ε, ε]
    repeat `steps` times, for windows not yet at the target:
        Δe = ||e(x+δ) − e₀||₂                     forward + backward w.r.t. δ only
        remember δ if it is the best seen for its window
        δ ← δ + α·sign(∇δ Δe)                     ascent step
        δ ← constrain(δ)                          optional: e.g. shape δ under a masking threshold
        δ ← clip(δ, −1−x, 1−x), then clip(δ, −ε, ε)   projection: stay in range, never leave the L∞ ball
    a last forward scores the final δ

`embed(x_rows, rows)` maps the windows `rows` of the batch (any shape [b, ...]) to embeddings
[b, D]; it owns every preprocessing step (down-mix, resampling, padding), so δ lives in the
input's own domain. `rows` (int64 [b]) says which windows are present once early stop shrinks
the batch, for per-window preprocessing such as padding by length.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

EmbedFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
DistanceFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def l2_distance(adv: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """Δe = ||e(x+δ) − e(x)||₂ per window: [b, D] -> [b]."""
    return (adv - clean).norm(dim=-1)


@dataclass(frozen=True)
class PGDParams:
    """Attack settings. Amplitudes are linear, full scale 1.0."""

    eps: float  # L∞ bound on δ
    alpha: float  # step size of each sign step
    steps: int  # gradient steps at most
    sigma: float  # std of the Gaussian start δ₀
    target_delta_e: float = float("inf")  # a window stops once its Δe reaches this
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast; fp16 uses a constant loss scale)
    loss_scale: float = 1024.0  # fp16 only: keeps small gradients from underflowing (signs unchanged)


@dataclass
class PGDResult:
    """Per-window outcome. Shapes: delta like x; the rest [B]."""

    delta: torch.Tensor  # best δ found per window, |δ| ≤ ε
    delta_e: torch.Tensor  # Δe of that δ, measured in the working precision (float32 tensor)
    cos: torch.Tensor  # cosine(e(x+δ), e(x)) of that δ
    steps: torch.Tensor  # gradient steps run per window (int64)
    clean_embedding: torch.Tensor  # e(x) [B, D] in the working precision, as float32


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(device_type=device.type, dtype=dtype)


def project(delta: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """Keep x+δ inside [-1, 1] where possible, and |δ| ≤ ε always (the ε clip comes last)."""
    delta = torch.maximum(torch.minimum(delta, 1.0 - x), -1.0 - x)
    return delta.clamp(-eps, eps)


def pgd(
    embed: EmbedFn,
    x: torch.Tensor,
    params: PGDParams,
    *,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    mask: torch.Tensor | None = None,
    constrain: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    distance: DistanceFn = l2_distance,
) -> PGDResult:
    """Find δ per window that pushes e(x+δ) away from e(x).

    Args:
        embed: (x_rows [b, ...], rows [b]) -> [b, D] embeddings (gradient must reach x_rows).
        x: clean windows [B, ...], full scale 1.0.
        params: the attack settings.
        noise: standard-normal start noise shaped like x (per-window seeding); drawn from
            `generator` on the CPU when None.
        generator: CPU generator for the start noise when `noise` is None.
        mask: 1 where x holds real samples, 0 on padding (broadcastable to x); δ is 0 there.
        constrain: (δ_rows, rows) -> δ_rows, applied after each step and before the L∞
            projection (a perceptual projection, say); the ε bound still holds exactly.
        distance: (e(x+δ), e(x)) -> [b], the objective; L2 by default. An encoder ensemble
            returns [b, K, D] embeddings and reduces per-encoder distances (mean or min).

    Returns:
        PGDResult with the best δ seen per window and its Δe, cosine and step count.
    """
    batch = x.shape[0]
    device = x.device
    x = x.detach()
    keep = torch.ones_like(x) if mask is None else mask.to(x.dtype).expand_as(x)
    if noise is None:
        noise = torch.randn(x.shape, generator=generator, dtype=torch.float32)
    delta = project(noise.to(device=device, dtype=x.dtype) * params.sigma, x, params.eps) * keep

    every = torch.arange(batch, device=device)
    with torch.no_grad(), _autocast(device, params.precision):
        clean = embed(x, every).float()

    best_delta = delta.clone()
    best_delta_e = torch.full((batch,), -1.0, device=device)
    best_cos = torch.ones(batch, device=device)
    steps_run = torch.zeros(batch, dtype=torch.int64, device=device)
    active = torch.ones(batch, dtype=torch.bool, device=device)
    scale = params.loss_scale if params.precision == "fp16" else 1.0

    def record(index: torch.Tensor, adv: torch.Tensor, candidate: torch.Tensor) -> torch.Tensor:
        """Score `candidate` δ for windows `index`; keep improvements; return their Δe."""
        delta_e = distance(adv, clean[index])
        better = delta_e > best_delta_e[index]
        chosen = index[better]
        best_delta[chosen] = candidate[better].detach()
        best_delta_e[chosen] = delta_e[better].detach()
        cos = torch.nn.functional.cosine_similarity(adv[better], clean[chosen], dim=-1)
        if cos.ndim > 1:  # an ensemble: [b, encoders] -> mean over encoders
            cos = cos.mean(dim=1)
        best_cos[chosen] = cos.detach()
        return delta_e.detach()

    for _ in range(params.steps):
        index = active.nonzero().squeeze(1)
        if index.numel() == 0:
            break
        current = delta[index].clone().requires_grad_(True)
        with _autocast(device, params.precision):
            adv = embed(x[index] + current, index).float()
        delta_e = distance(adv, clean[index])
        (grad,) = torch.autograd.grad(delta_e.sum() * scale, current)
        scored = record(index, adv.detach(), current)
        steps_run[index] += 1
        reached = scored >= params.target_delta_e
        active[index[reached]] = False
        moving = index[~reached]
        stepped = delta[moving] + params.alpha * torch.nan_to_num(grad[~reached]).sign()
        if constrain is not None:
            stepped = constrain(stepped, moving)
        delta[moving] = project(stepped, x[moving], params.eps) * keep[moving]

    # Score the δ left by the last step (or δ₀ when steps = 0) of windows still below the target.
    index = active.nonzero().squeeze(1)
    if index.numel() > 0:
        with torch.no_grad(), _autocast(device, params.precision):
            adv = embed(x[index] + delta[index], index).float()
        record(index, adv, delta[index])

    return PGDResult(
        delta=best_delta,
        delta_e=best_delta_e,
        cos=best_cos,
        steps=steps_run,
        clean_embedding=clean,
    )
