"""Differentiable stand-ins for a purifying attacker's transforms, for expectation over
transformation (EOT) in the attack. Plain torch, no I/O.

Every transform maps CLAP's 48 kHz mono input [B, samples] to the same shape. With a generator
it draws its strength per item from the attack suite's range (pipeline/evaluation/robustness:
the measured attacks use maintained libraries; these are the gradients through them); without
one (the deterministic view: the clean reference e(x) and the final scoring) it is the identity,
so Δe is always scored on the audio as written.

Differentiable: noise, EQ (shelves and a peak), low/high-pass, reverb, compression, limiting,
smoothing, resampling, speed change (time stretch + pitch shift by resampling: a tempo change of
0.8-1.25 or ±2 semitones scales the spectrum like the real effects; the phase vocoder's
artefacts are not modelled). Straight-through (BPDA): re-quantisation, the spectral gate's mask
(the mask is computed from the audio and held constant in the backward pass).

`mix_view([...])` draws one of several transforms per item and step: the cost of a step grows by
one CLAP forward/backward whatever the number of transforms in the mix.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

RATE = 48_000  # Hz: CLAP's input rate; every transform here works at it

EotFn = Callable[[torch.Tensor, torch.Generator | None], torch.Tensor]


def _uniform(generator: torch.Generator, n: int, low: float, high: float) -> torch.Tensor:
    """[n, 1] uniform draws in [low, high] (CPU; moved to the data's device by the caller)."""
    return low + (high - low) * torch.rand(n, 1, generator=generator)


def _freqs(n_samples: int, device: torch.device) -> torch.Tensor:
    """rfft bin frequencies in Hz for `n_samples` at RATE: [n_samples // 2 + 1]."""
    return torch.fft.rfftfreq(n_samples, d=1.0 / RATE).to(device)


def _apply_gain_curve(x: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
    """Zero-phase filter: multiply the spectrum of x [B, T] by gain [B, T // 2 + 1] (linear)."""
    spectrum = torch.fft.rfft(x, dim=-1)
    return torch.fft.irfft(spectrum * gain.to(spectrum.dtype), n=x.shape[-1], dim=-1)


def noise(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """White noise at an SNR drawn in [10, 40] dB per item (identity without a generator)."""
    if generator is None:
        return x
    snr_db = _uniform(generator, x.shape[0], 10.0, 40.0).to(x.device)
    power = x.detach().pow(2).mean(dim=-1, keepdim=True).clamp(min=1e-10)
    z = torch.randn(x.shape, generator=generator).to(x.device, x.dtype)
    return x + z * (power / 10 ** (snr_db / 10)).sqrt()


def _shelf(f: torch.Tensor, corner: torch.Tensor, gain_db: torch.Tensor, low: bool) -> torch.Tensor:
    """Magnitude (dB) of a shelf: a logistic step of `gain_db` around `corner` on a log-frequency axis."""
    octaves = torch.log2(f.clamp(min=1.0) / corner)
    step = torch.sigmoid(-2.0 * octaves) if low else torch.sigmoid(2.0 * octaves)
    return gain_db * step


def eq(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """A random EQ per item: low shelf (60-400 Hz), high shelf (2-10 kHz) and one peak (200 Hz-8
    kHz, Q 0.5-4), each ±6 dB, as a zero-phase magnitude curve (identity without a generator)."""
    if generator is None:
        return x
    n = x.shape[0]
    f = _freqs(x.shape[-1], x.device)[None]
    low_f = torch.exp(_uniform(generator, n, math.log(60), math.log(400))).to(x.device)
    high_f = torch.exp(_uniform(generator, n, math.log(2000), math.log(10000))).to(x.device)
    peak_f = torch.exp(_uniform(generator, n, math.log(200), math.log(8000))).to(x.device)
    q = _uniform(generator, n, 0.5, 4.0).to(x.device)
    gains = [_uniform(generator, n, -6.0, 6.0).to(x.device) for _ in range(3)]
    peak_width = 1.0 / q  # octaves, roughly the bandwidth of a peak of this Q
    peak = gains[2] * torch.exp(-0.5 * (torch.log2(f.clamp(min=1.0) / peak_f) / (peak_width / 2)) ** 2)
    db = _shelf(f, low_f, gains[0], low=True) + _shelf(f, high_f, gains[1], low=False) + peak
    return _apply_gain_curve(x, 10 ** (db / 20))


def _pass(x: torch.Tensor, cutoff: torch.Tensor, low: bool, order: int = 4) -> torch.Tensor:
    """Butterworth-shaped magnitude low/high-pass at `cutoff` [B, 1] Hz, zero phase."""
    f = _freqs(x.shape[-1], x.device)[None]
    ratio = (f / cutoff) if low else (cutoff / f.clamp(min=1.0))
    return _apply_gain_curve(x, 1.0 / torch.sqrt(1.0 + ratio ** (2 * order)))


def lowpass(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Low-pass at a cutoff drawn in [3, 12] kHz (log-uniform) per item."""
    if generator is None:
        return x
    cutoff = torch.exp(_uniform(generator, x.shape[0], math.log(3000), math.log(12000))).to(x.device)
    return _pass(x, cutoff, low=True)


def highpass(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """High-pass at a cutoff drawn in [50, 500] Hz (log-uniform) per item."""
    if generator is None:
        return x
    cutoff = torch.exp(_uniform(generator, x.shape[0], math.log(50), math.log(500))).to(x.device)
    return _pass(x, cutoff, low=False)


def reverb(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Convolution with a synthetic room: exponentially decaying noise, RT60 0.2-1.5 s, wet share
    0.1-0.5 (FFT convolution, truncated to the input's length)."""
    if generator is None:
        return x
    n, length = x.shape
    ir_len = int(1.5 * RATE)
    rt60 = _uniform(generator, n, 0.2, 1.5)
    wet = _uniform(generator, n, 0.1, 0.5).to(x.device, x.dtype)
    t = torch.arange(ir_len) / RATE
    ir = torch.randn(n, ir_len, generator=generator) * torch.exp(-6.9078 * t[None] / rt60)  # -60 dB at rt60
    ir = (ir / ir.norm(dim=-1, keepdim=True)).to(x.device, x.dtype)
    size = length + ir_len
    tail = torch.fft.irfft(torch.fft.rfft(x, n=size) * torch.fft.rfft(ir, n=size), n=size)[..., :length]
    return (1 - wet) * x + wet * tail


def _moving_average(x: torch.Tensor, width: int) -> torch.Tensor:
    """Centred moving average over an odd `width` of x [B, T], same length, the window cut at the
    edges (a cumulative sum in float64: O(T) whatever the width)."""
    half = width // 2
    ones = torch.ones_like(x[:1])
    sums = []
    for signal in (x, ones):
        c = torch.nn.functional.pad(signal.double(), (half + 1, half)).cumsum(-1)
        sums.append(c[..., width:] - c[..., :-width])
    return (sums[0] / sums[1]).to(x.dtype)


def _envelope(x: torch.Tensor, seconds: float = 0.01) -> torch.Tensor:
    """RMS envelope over `seconds` windows [B, T] (moving average of x², same length)."""
    width = max(1, int(seconds * RATE)) | 1
    return _moving_average(x.pow(2), width).clamp(min=1e-10).sqrt()


def compress(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """A feed-forward compressor: threshold 10-30 dB below the item's peak RMS, ratio 2-8, 10 ms
    RMS detector, no make-up gain (differentiable through the detector too)."""
    if generator is None:
        return x
    env = _envelope(x)
    peak = env.detach().amax(dim=-1, keepdim=True)
    threshold = peak * 10 ** (-_uniform(generator, x.shape[0], 10.0, 30.0).to(x.device) / 20)
    ratio = _uniform(generator, x.shape[0], 2.0, 8.0).to(x.device)
    over = (env / threshold).clamp(min=1.0)
    return x * over ** (1.0 / ratio - 1.0)


def limit(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """A brick-wall limiter: gain = min(1, ceiling / |x| over 1 ms), ceiling 1-12 dB under the peak."""
    if generator is None:
        return x
    env = torch.nn.functional.max_pool1d(x.abs()[:, None], 49, stride=1, padding=24)[:, 0]
    ceiling = env.detach().amax(dim=-1, keepdim=True) * 10 ** (
        -_uniform(generator, x.shape[0], 1.0, 12.0).to(x.device) / 20
    )
    return x * (ceiling / env.clamp(min=1e-10)).clamp(max=1.0)


def smooth(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Moving average over an odd width of 3-11 samples (one width per call)."""
    if generator is None:
        return x
    width = 2 * int(torch.randint(1, 6, (1,), generator=generator)) + 1
    return torch.nn.functional.avg_pool1d(x[:, None], width, stride=1, padding=width // 2, count_include_pad=False)[
        :, 0
    ]


def quantise(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Re-quantisation to 8-12 bits (one depth per call), straight-through gradient."""
    if generator is None:
        return x
    levels = 2.0 ** (int(torch.randint(8, 13, (1,), generator=generator)) - 1)
    return x + (torch.round(x * levels) / levels - x).detach()


def spectral_gate(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Stationary spectral gating (noisereduce's method): per frequency, the noise floor is a low
    quantile (10-30 %) of the magnitude over time; bins under floor × 1.5-3 are attenuated by a
    smooth mask. The mask is held constant in the backward pass (BPDA); STFT 2048/512."""
    if generator is None:
        return x
    window = torch.hann_window(2048, device=x.device, dtype=x.dtype)
    spec = torch.stft(x, 2048, 512, window=window, return_complex=True)
    mag = spec.abs().detach()
    q = float(_uniform(generator, 1, 0.1, 0.3))
    factor = float(_uniform(generator, 1, 1.5, 3.0))
    k = max(1, int(q * mag.shape[-1]))
    floor = mag.kthvalue(k, dim=-1, keepdim=True).values * factor
    mask = torch.sigmoid(8.0 * (torch.log(mag + 1e-9) - torch.log(floor + 1e-9)))
    return torch.istft(spec * mask, 2048, 512, window=window, length=x.shape[-1])


def _resample_linear(x: torch.Tensor, factor: float) -> torch.Tensor:
    """x [B, T] read at `factor` × its speed (band-limited by a low-pass first when speeding up),
    linear interpolation, cropped or zero-padded to T. Differentiable."""
    length = x.shape[-1]
    if factor > 1.0:
        x = _pass(x, torch.full((x.shape[0], 1), 0.45 * RATE / factor, device=x.device), low=True, order=8)
    new_len = max(2, round(length / factor))
    out = torch.nn.functional.interpolate(x[:, None], size=new_len, mode="linear", align_corners=False)[:, 0]
    if new_len >= length:
        return out[..., :length]
    return torch.nn.functional.pad(out, (0, length - new_len))


def speed(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Speed change by 0.8-1.25 (one factor per call): the resampling part of a time stretch or a
    ±2-semitone pitch shift (2^(±2/12) = 0.89-1.12)."""
    if generator is None:
        return x
    factor = float(torch.exp(_uniform(generator, 1, math.log(0.8), math.log(1.25))))
    return _resample_linear(x, factor)


def resample_any(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """A sample-rate round trip through a rate drawn from 8/11.025/16/22.05/32 kHz: everything
    above its Nyquist removed (zero-phase brick wall with a short roll-off)."""
    if generator is None:
        return x
    rates = (8000, 11025, 16000, 22050, 32000)
    rate = rates[int(torch.randint(0, len(rates), (1,), generator=generator))]
    return _pass(x, torch.full((x.shape[0], 1), 0.47 * rate, device=x.device), low=True, order=16)


TRANSFORMS: dict[str, EotFn] = {
    "noise": noise,
    "eq": eq,
    "lowpass": lowpass,
    "highpass": highpass,
    "reverb": reverb,
    "compress": compress,
    "limit": limit,
    "smooth": smooth,
    "quantise": quantise,
    "spectral_gate": spectral_gate,
    "speed": speed,
    "resample_any": resample_any,
}


def mix_view(names: list[str] | tuple[str, ...], transforms: dict[str, EotFn] | None = None) -> EotFn:
    """A view that applies one transform of `names`, drawn per item and call (identity without a
    generator). `transforms` maps names to functions (default TRANSFORMS)."""
    table = transforms if transforms is not None else TRANSFORMS
    unknown = [n for n in names if n not in table]
    if unknown or not names:
        raise KeyError(f"unknown EOT transform(s) {unknown or names}; known: {sorted(table)}")
    fns = [table[n] for n in names]

    def view(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if generator is None:
            return x
        picks = torch.randint(0, len(fns), (x.shape[0],), generator=generator).tolist()
        return torch.cat([fns[p](item[None], generator) for item, p in zip(x, picks)])

    view.__name__ = "mix:" + "+".join(names)
    return view
