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

`fixed_shape=True` (both methods) runs every step on the whole batch instead: a finished window's
δ, best and optimiser state are kept by masks (`torch.where`), `rows` is always every window, and
the loop looks at the host only once every FIXED_SHAPE_CHECK_EVERY steps (to stop when all are
done): a static shape without a sync per step, which CUDA graphs / torch.compile can capture.
It gives the same δ as the default loop (tests/core/test_engine.py).
"""

from __future__ import annotations

import contextlib
import math
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
    # Every step runs the whole batch, finished windows masked instead of dropped: no nonzero(), no
    # host round trip per step (a CUDA graph / torch.compile can capture it); same δ as the default.
    fixed_shape: bool = False


@dataclass
class PGDResult:
    """Per-window outcome. Shapes: delta like x; the rest [B]."""

    delta: torch.Tensor  # best δ found per window, |δ| ≤ ε
    delta_e: torch.Tensor  # Δe of that δ, measured in the working precision (float32 tensor)
    cos: torch.Tensor  # cosine(e(x+δ), e(x)) of that δ
    steps: torch.Tensor  # gradient steps run per window (int64)
    clean_embedding: torch.Tensor  # e(x) [B, D] in the working precision, as float32
    capped_share: torch.Tensor | None = None  # spectral_attack: share of δ's energy the L∞ cap removed [B]


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(device_type=device.type, dtype=dtype)


def project(delta: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """Keep x+δ inside [-1, 1] where possible, and |δ| ≤ ε always (the ε clip comes last)."""
    delta = torch.maximum(torch.minimum(delta, 1.0 - x), -1.0 - x)
    return delta.clamp(-eps, eps)


class _Best:
    """The best δ seen per window (by Δe) with its Δe and cosine; optionally the share of its
    energy an L∞ cap removed (`raw` is δ before the cap)."""

    def __init__(self, start: torch.Tensor, clean: torch.Tensor, distance: DistanceFn):
        batch, device = start.shape[0], start.device
        self.clean = clean
        self.distance = distance
        self.delta = start.clone()
        self.delta_e = torch.full((batch,), -1.0, device=device)
        self.cos = torch.ones(batch, device=device)
        self.capped_share = torch.zeros(batch, device=device)

    def record(
        self, index: torch.Tensor, adv: torch.Tensor, candidate: torch.Tensor, raw: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Score `candidate` δ of windows `index` (adv = e(x+δ)); keep improvements; return their Δe."""
        delta_e = self.distance(adv, self.clean[index])
        better = delta_e > self.delta_e[index]
        chosen = index[better]
        self.delta[chosen] = candidate[better].detach()
        self.delta_e[chosen] = delta_e[better].detach()
        cos = torch.nn.functional.cosine_similarity(adv[better], self.clean[chosen], dim=-1)
        if cos.ndim > 1:  # an ensemble: [b, encoders] -> mean over encoders
            cos = cos.mean(dim=1)
        self.cos[chosen] = cos.detach()
        if raw is not None:
            removed = (raw[better] - candidate[better]).detach().pow(2).sum(dim=(1, 2))
            self.capped_share[chosen] = removed / raw[better].detach().pow(2).sum(dim=(1, 2)).clamp(min=1e-20)
        return delta_e.detach()

    def result(self, steps: torch.Tensor, with_capped_share: bool = True) -> PGDResult:
        """The PGDResult of the best δ per window, after `steps` [B] steps."""
        share = self.capped_share if with_capped_share else None
        return PGDResult(self.delta, self.delta_e, self.cos, steps, self.clean, capped_share=share)

    def record_all(
        self, adv: torch.Tensor, candidate: torch.Tensor, live: torch.Tensor, raw: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Fixed shape: score `candidate` δ of every window; keep improvements of `live` windows
        ([B] bool) only, by masking (no data-dependent indexing); return every window's Δe."""
        delta_e = self.distance(adv, self.clean).detach()
        better = (delta_e > self.delta_e) & live
        rows = better.view(-1, *([1] * (candidate.ndim - 1)))
        self.delta = torch.where(rows, candidate.detach(), self.delta)
        self.delta_e = torch.where(better, delta_e, self.delta_e)
        cos = torch.nn.functional.cosine_similarity(adv, self.clean, dim=-1)
        if cos.ndim > 1:
            cos = cos.mean(dim=1)
        self.cos = torch.where(better, cos.detach(), self.cos)
        if raw is not None:
            removed = (raw - candidate).detach().pow(2).sum(dim=(1, 2))
            share = removed / raw.detach().pow(2).sum(dim=(1, 2)).clamp(min=1e-20)
            self.capped_share = torch.where(better, share, self.capped_share)
        return delta_e


# Fixed-shape loops look at the host once every this many steps (all windows at the target: stop).
FIXED_SHAPE_CHECK_EVERY = 8


def _rows(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A [B] mask shaped to broadcast over `like` [B, ...]."""
    return mask.view(-1, *([1] * (like.ndim - 1)))


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

    best = _Best(delta, clean, distance)
    steps_run = torch.zeros(batch, dtype=torch.int64, device=device)
    active = torch.ones(batch, dtype=torch.bool, device=device)
    scale = params.loss_scale if params.precision == "fp16" else 1.0

    if params.fixed_shape:
        for step in range(params.steps):
            if step % FIXED_SHAPE_CHECK_EVERY == 0 and step and not bool(active.any()):
                break
            current = delta.clone().requires_grad_(True)
            with _autocast(device, params.precision):
                adv = embed(x + current, every).float()
            (grad,) = torch.autograd.grad(distance(adv, clean).sum() * scale, current)
            scored = best.record_all(adv.detach(), current, active)
            steps_run += active.long()
            active = active & (scored < params.target_delta_e)
            stepped = delta + params.alpha * torch.nan_to_num(grad).sign()
            if constrain is not None:
                stepped = constrain(stepped, every)
            delta = torch.where(_rows(active, delta), project(stepped, x, params.eps) * keep, delta)
        with torch.no_grad(), _autocast(device, params.precision):
            adv = embed(x + delta, every).float()
        best.record_all(adv, delta, active)
        return best.result(steps_run, with_capped_share=False)

    for _ in range(params.steps):
        index = active.nonzero().squeeze(1)
        if index.numel() == 0:
            break
        current = delta[index].clone().requires_grad_(True)
        with _autocast(device, params.precision):
            adv = embed(x[index] + current, index).float()
        delta_e = distance(adv, clean[index])
        (grad,) = torch.autograd.grad(delta_e.sum() * scale, current)
        scored = best.record(index, adv.detach(), current)
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
        best.record(index, adv, delta[index])

    return best.result(steps_run, with_capped_share=False)


# ---------------------------------------------------------------------------------------------
# The perceptual method: δ lives in the STFT domain, bounded per bin by a budget, found with Adam.
#
#     W    ~ N(0, σ_w²)                           real [B, C, bins, frames, 2] (re, im), no constraint
#     S    = budget · tanh(|W|) · W/|W|            complex: |S| < budget in every bin, by construction
#     δ    = clip(iSTFT(S), −ε, ε), in range       the L∞ cap is a final hard cap (its effect is reported)
#     repeat `steps` times: Adam ascent on Δe = ||e(x+δ) − e₀||₂ w.r.t. W, cosine-decayed step size
#
# The budget (pipeline.core.perceptual.allowed_amplitude) is the music's masking threshold, so δ's energy
# goes where the music masks it and nowhere else; no alternating projections fight each other.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpectralParams:
    """Settings of :func:`spectral_attack`. Amplitudes linear, full scale 1.0; STFT in samples."""

    eps: float  # hard L∞ cap on δ
    steps: int  # Adam steps at most
    lr: float = 0.1  # Adam step size on W (W is dimensionless: tanh(|W|) is the share of the budget used)
    init_scale: float = 0.5  # std of W₀: δ₀ uses about half the budget, at random phase
    n_fft: int = 2048
    hop: int = 512
    target_delta_e: float = float("inf")
    precision: str = "fp32"
    fixed_shape: bool = False  # as PGDParams.fixed_shape


def spectrum_from_weights(weights: torch.Tensor, budget: torch.Tensor) -> torch.Tensor:
    """Complex spectrum budget · tanh(|W|) · W/|W|: weights [..., bins, frames, 2], budget
    [..., bins, frames] -> complex [..., bins, frames], |S| < budget in every bin."""
    radius = weights.norm(dim=-1).clamp(min=1e-12)
    gain = budget * torch.tanh(radius) / radius
    return torch.complex(weights[..., 0] * gain, weights[..., 1] * gain)


def spectral_attack(
    embed: EmbedFn,
    x: torch.Tensor,
    budget: torch.Tensor,
    params: SpectralParams,
    *,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    mask: torch.Tensor | None = None,
    distance: DistanceFn = l2_distance,
) -> PGDResult:
    """Find δ per window, bounded per STFT bin by `budget`, that pushes e(x+δ) away from e(x).

    Args:
        embed: as for :func:`pgd`.
        x: clean windows [B, C, samples], full scale 1.0.
        budget: largest |STFT(δ)| per bin [B, C, bins, frames] (zero: no δ in that bin).
        params: the attack settings.
        noise: standard-normal start weights [B, C, bins, frames, 2]; drawn from `generator` when None.
        mask: 1 where x holds real samples, 0 on padding (broadcastable to x); δ is 0 there.
        distance: as for :func:`pgd`.

    Returns:
        PGDResult; `capped_share` holds the share of the chosen δ's energy the L∞ cap removed.
    """
    batch, channels, samples = x.shape
    device = x.device
    x = x.detach()
    keep = torch.ones_like(x) if mask is None else mask.to(x.dtype).expand_as(x)
    window = torch.hann_window(params.n_fft, device=device)
    shape = (*budget.shape, 2)
    if noise is None:
        noise = torch.randn(shape, generator=generator, dtype=torch.float32)
    weights = noise.to(device=device, dtype=torch.float32) * params.init_scale
    first_moment = torch.zeros_like(weights)
    second_moment = torch.zeros_like(weights)

    def synthesize(w: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(capped δ, uncapped δ) [b, C, samples] of weights `w` for windows `rows`."""
        bound = budget[rows].reshape(-1, *budget.shape[2:])
        spectrum = spectrum_from_weights(w.reshape(-1, *w.shape[2:]), bound)
        raw = torch.istft(spectrum, params.n_fft, params.hop, window=window, center=True, length=samples)
        # A spectrum bounded bin by bin is not the STFT of any signal: the synthesised δ leaks into
        # neighbouring bins and frames. One round of re-analysis, clipping to the budget and
        # re-synthesis takes most of that leakage back (differentiable, so Adam sees it).
        again = torch.stft(
            raw, params.n_fft, params.hop, window=window, center=True, pad_mode="constant", return_complex=True
        )
        again = again * (bound / again.abs().clamp(min=1e-12)).clamp(max=1.0)
        raw = torch.istft(again, params.n_fft, params.hop, window=window, center=True, length=samples)
        raw = raw.reshape(len(rows), channels, samples) * keep[rows]
        return project(raw, x[rows], params.eps), raw

    every = torch.arange(batch, device=device)
    with torch.no_grad(), _autocast(device, params.precision):
        clean = embed(x, every).float()

    best = _Best(torch.zeros_like(x), clean, distance)
    steps_run = torch.zeros(batch, dtype=torch.int64, device=device)
    active = torch.ones(batch, dtype=torch.bool, device=device)
    beta1, beta2 = 0.9, 0.999

    def adam_step(step: int, grad: torch.Tensor, m: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Adam ascent with a cosine-decayed step size: (weight increment, new m, new v)."""
        m = beta1 * m + (1 - beta1) * grad
        v = beta2 * v + (1 - beta2) * grad.square()
        lr = params.lr * (0.55 + 0.45 * math.cos(math.pi * step / max(1, params.steps)))
        step_size = lr * math.sqrt(1 - beta2 ** (step + 1)) / (1 - beta1 ** (step + 1))
        return step_size * m / (v.sqrt() + 1e-8), m, v

    if params.fixed_shape:
        for step in range(params.steps):
            if step % FIXED_SHAPE_CHECK_EVERY == 0 and step and not bool(active.any()):
                break
            current = weights.clone().requires_grad_(True)
            delta, raw = synthesize(current, every)
            with _autocast(device, params.precision):
                adv = embed(x + delta, every).float()
            (grad,) = torch.autograd.grad(distance(adv, clean).sum(), current)
            scored = best.record_all(adv.detach(), delta, active, raw)
            steps_run += active.long()
            active = active & (scored < params.target_delta_e)
            increment, m, v = adam_step(step, torch.nan_to_num(grad), first_moment, second_moment)
            moving = _rows(active, weights)
            first_moment = torch.where(moving, m, first_moment)
            second_moment = torch.where(moving, v, second_moment)
            weights = torch.where(moving, weights + increment, weights)
        with torch.no_grad():
            delta, raw = synthesize(weights, every)
            with _autocast(device, params.precision):
                adv = embed(x + delta, every).float()
            best.record_all(adv, delta, active, raw)
        return best.result(steps_run)

    for step in range(params.steps):
        index = active.nonzero().squeeze(1)
        if index.numel() == 0:
            break
        current = weights[index].clone().requires_grad_(True)
        delta, raw = synthesize(current, index)
        with _autocast(device, params.precision):
            adv = embed(x[index] + delta, index).float()
        delta_e = distance(adv, clean[index])
        (grad,) = torch.autograd.grad(delta_e.sum(), current)
        scored = best.record(index, adv.detach(), delta, raw)
        steps_run[index] += 1
        reached = scored >= params.target_delta_e
        active[index[reached]] = False
        moving = index[~reached]
        # Adam ascent (per window; finished windows keep their state), cosine-decayed step size.
        increment, m, v = adam_step(step, torch.nan_to_num(grad[~reached]), first_moment[moving], second_moment[moving])
        first_moment[moving], second_moment[moving] = m, v
        weights[moving] += increment

    index = active.nonzero().squeeze(1)
    if index.numel() > 0:
        with torch.no_grad():
            delta, raw = synthesize(weights[index], index)
            with _autocast(device, params.precision):
                adv = embed(x[index] + delta, index).float()
            best.record(index, adv, delta, raw)
    return best.result(steps_run)
