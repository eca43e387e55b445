"""Psychoacoustic masking threshold of a clean signal, the per-bin budget it gives δ, and how
audible a given δ is against it. Plain torch, no I/O.

The model (per STFT frame; Hann window 2048, hop 512 at the signal's own rate):

1. Power per bin in dB SPL, by the usual convention that a full-scale sine's peak bin sits at
   96 dB SPL (MPEG-1 psychoacoustic model 1, ISO/IEC 11172-3 Annex D).
2. Energy per critical band (integer Bark, Zwicker's z(f)), spread across bands with Schroeder's
   spreading function (Schroeder, Atal & Hall 1979), as in Johnston (1988), "Transform coding of
   audio signals using perceptual noise criteria".
3. Tonal/noise masker offset per band from the frame's spectral flatness (Johnston 1988): tonal
   frames mask 14.5 + z dB below the spread energy, noise-like frames 5.5 dB below.
4. The band threshold is shared over its bins. The spread is capped at `spread_ceiling_db` above
   the band's OWN energy: masking reaches neighbouring bands, but a band the music leaves empty
   (above a band-limited master's cutoff, say) gets no budget of its own from its loud neighbours.
5. Threshold in quiet (Terhardt 1979) as a floor ONLY where the music itself is louder than it
   (`quiet_floor="below_music"`). The 96 dB SPL convention fixes a playback level nobody knows;
   as an unconditional floor (`quiet_floor="absolute"`, the legacy model, kept for comparison) it
   handed most of δ's budget to bands where the music has no energy, where listeners and ViSQOL
   hear it first (docs/quality.md).
6. Nowhere below `noise_floor_db` (-25 dB SPL per bin): the noise of a TPDF-dithered 16-bit master
   (rounding noise LSB²/4 per sample is -25.6 dB SPL per bin at this STFT). Every 16-bit master
   carries that noise already, and rounding δ to a 16-bit output grid adds as much; calling it
   audible would make every band-limited 16-bit track fail the model by construction.

The budget (:func:`allowed_amplitude`) is that threshold as an STFT magnitude per bin, scaled by
a margin in dB and zero above a passband (what the conditioner sees: CLAP's mel stops at 14 kHz,
MusicLDM trains on 16 kHz audio). :func:`synthesize` turns a spectrum bounded by it into δ.

Why by hand: no maintained Python package exposes a differentiable masking threshold (the
MPEG reference code is C, and Qin et al.'s imperceptible-audio code is TensorFlow research
code). STFT and inverse STFT are torch's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SPL_FULL_SCALE_DB = 96.0  # a full-scale sine's peak bin, by the usual convention


@dataclass(frozen=True)
class MaskingConfig:
    """STFT geometry (samples at the signal's own rate) and the model's two choices."""

    n_fft: int = 2048
    hop: int = 512
    quiet_floor: str = "below_music"  # below_music | absolute (legacy: floor everywhere)
    spread_ceiling_db: float | None = 10.0  # spread at most this far above a band's own energy; None: no cap
    noise_floor_db: float = -25.0  # dB SPL per bin: the threshold never goes below a dithered 16-bit floor
    guard_frames: int = 7  # budget: the min of the threshold over this many frames centred on each (odd)


LEGACY_MASKING = MaskingConfig(quiet_floor="absolute", spread_ceiling_db=None)  # the model before docs/quality.md


def bark(freq_hz: torch.Tensor) -> torch.Tensor:
    """Zwicker's critical-band rate z(f) in Bark."""
    return 13.0 * torch.atan(0.00076 * freq_hz) + 3.5 * torch.atan((freq_hz / 7500.0) ** 2)


def absolute_threshold_db(freq_hz: torch.Tensor) -> torch.Tensor:
    """Terhardt's threshold in quiet, dB SPL; clamped to [-20, 120] outside the audible range."""
    khz = freq_hz.clamp(min=20.0) / 1000.0
    ath = 3.64 * khz**-0.8 - 6.5 * torch.exp(-0.6 * (khz - 3.3) ** 2) + 1e-3 * khz**4
    return ath.clamp(-20.0, 120.0)


def _window(cfg: MaskingConfig, device: torch.device) -> torch.Tensor:
    return torch.hann_window(cfg.n_fft, device=device, dtype=torch.float32)


def stft(signal: torch.Tensor, cfg: MaskingConfig = MaskingConfig()) -> torch.Tensor:
    """Complex STFT [N, bins, frames] of `signal` [N, samples] (centred, zero-padded, Hann)."""
    return torch.stft(
        signal.float(),
        cfg.n_fft,
        cfg.hop,
        window=_window(cfg, signal.device),
        center=True,
        pad_mode="constant",
        return_complex=True,
    )


def synthesize(spectrum: torch.Tensor, length: int, cfg: MaskingConfig = MaskingConfig()) -> torch.Tensor:
    """Inverse of :func:`stft`: complex [N, bins, frames] -> [N, length] samples (differentiable)."""
    return torch.istft(spectrum, cfg.n_fft, cfg.hop, window=_window(cfg, spectrum.device), center=True, length=length)


def spl_reference(cfg: MaskingConfig = MaskingConfig()) -> float:
    """|X|² that maps to 0 dB SPL: a full-scale sine's peak bin, (Σw/2)², sits at 96 dB SPL."""
    window_sum = float(_window(cfg, torch.device("cpu")).sum())
    return (window_sum / 2) ** 2 / 10 ** (SPL_FULL_SCALE_DB / 10)


def power_spectrum_spl(signal: torch.Tensor, sample_rate: int, cfg: MaskingConfig = MaskingConfig()) -> torch.Tensor:
    """Power per STFT bin in linear SPL units (10^(dB/10)), signal [N, samples] -> [N, bins, frames]."""
    return stft(signal, cfg).abs() ** 2 / spl_reference(cfg)


def bin_frequencies(sample_rate: int, cfg: MaskingConfig, device: torch.device | None = None) -> torch.Tensor:
    """Centre frequency (Hz) of each STFT bin: [bins]."""
    return torch.linspace(0, sample_rate / 2, cfg.n_fft // 2 + 1, device=device)


def critical_bands(sample_rate: int, cfg: MaskingConfig, device: torch.device | None = None) -> torch.Tensor:
    """One-hot [bins, bands] of each STFT bin's integer critical band (Bark)."""
    band = bark(bin_frequencies(sample_rate, cfg, device)).floor().long()
    return torch.nn.functional.one_hot(band, int(band.max().item()) + 1).float()


@torch.no_grad()
def masking_threshold(signal: torch.Tensor, sample_rate: int, cfg: MaskingConfig = MaskingConfig()) -> torch.Tensor:
    """Per-bin masking threshold of `signal` [N, samples] as linear SPL power [N, bins, frames].

    Noise whose power per bin stays under this threshold is masked by the signal (inaudible).
    """
    if cfg.quiet_floor not in ("below_music", "absolute"):
        raise ValueError(f"quiet_floor must be below_music or absolute, got {cfg.quiet_floor!r}")
    power = power_spectrum_spl(signal, sample_rate, cfg)  # [N, F, T]
    freqs = bin_frequencies(sample_rate, cfg, signal.device)
    one_hot = critical_bands(sample_rate, cfg, signal.device)  # [F, B]
    n_bands = one_hot.shape[1]
    energy = torch.einsum("nft,fb->nbt", power, one_hot)  # band energies [N, B, T]

    z = torch.arange(n_bands, device=signal.device, dtype=power.dtype)
    dz = z[:, None] - z[None, :]  # maskee - masker, in Bark
    spread_db = 15.81 + 7.5 * (dz + 0.474) - 17.5 * torch.sqrt(1 + (dz + 0.474) ** 2)
    spread = 10 ** (spread_db / 10)  # [maskee, masker]
    spread_energy = torch.einsum("ab,nbt->nat", spread, energy)
    if cfg.spread_ceiling_db is not None:
        spread_energy = torch.minimum(spread_energy, energy * 10 ** (cfg.spread_ceiling_db / 10))

    # Tonality from spectral flatness (geometric / arithmetic mean) of each frame.
    tiny = 1e-10
    flatness_db = 10 * torch.log10(
        torch.exp(torch.log(power + tiny).mean(dim=1)) / (power.mean(dim=1) + tiny) + tiny
    )  # [N, T], ≤ 0
    tonality = (flatness_db / -60.0).clamp(0.0, 1.0)[:, None, :]  # [N, 1, T]
    offset_db = tonality * (14.5 + z[None, :, None]) + (1 - tonality) * 5.5
    band_threshold = spread_energy * 10 ** (-offset_db / 10)  # [N, B, T]

    bins_per_band = one_hot.sum(dim=0).clamp(min=1)  # [B]
    per_bin = torch.einsum("nbt,fb->nft", band_threshold / bins_per_band[None, :, None], one_hot)
    quiet = (10 ** (absolute_threshold_db(freqs) / 10))[None, :, None]
    if cfg.quiet_floor == "absolute":
        threshold = torch.maximum(per_bin, quiet)
    else:  # the threshold in quiet lifts the budget only where the music's band is above it
        band_power = torch.einsum("nbt,fb->nft", energy / bins_per_band[None, :, None], one_hot)
        threshold = torch.where(band_power > quiet, torch.maximum(per_bin, quiet), per_bin)
    return threshold.clamp(min=10 ** (cfg.noise_floor_db / 10))


def allowed_amplitude(
    threshold: torch.Tensor,
    sample_rate: int,
    cfg: MaskingConfig = MaskingConfig(),
    *,
    margin_db: float = 0.0,
    passband_hz: float | None = None,
) -> torch.Tensor:
    """The budget: largest |STFT| per bin [N, bins, frames] that keeps δ `margin_db` dB relative to
    `threshold` (negative: under it), zero above `passband_hz` (None: the whole band).

    Each frame's budget is the smallest over `cfg.guard_frames` frames centred on it: a frame's δ
    spreads over the whole 2048-sample window when synthesised (±3 hops of 512), and must not ring
    into a quieter neighbour (pre-echo before an onset, noise in a gap). Measured: with 3 frames a
    band-limited blues track's NMR was +1.3 dB, with 7 frames -0.04 dB (docs/quality.md)."""
    if cfg.guard_frames < 1 or cfg.guard_frames % 2 == 0:
        raise ValueError(f"guard_frames must be odd and >= 1, got {cfg.guard_frames}")
    threshold = -torch.nn.functional.max_pool1d(
        -threshold, kernel_size=cfg.guard_frames, stride=1, padding=cfg.guard_frames // 2
    )
    amplitude = torch.sqrt(threshold * spl_reference(cfg)) * 10 ** (margin_db / 20)
    if passband_hz is not None:
        keep = bin_frequencies(sample_rate, cfg, threshold.device) <= passband_hz
        amplitude = amplitude * keep[None, :, None].to(amplitude.dtype)
    return amplitude


def project_below_threshold(
    delta: torch.Tensor, threshold: torch.Tensor, sample_rate: int, cfg: MaskingConfig = MaskingConfig()
) -> torch.Tensor:
    """Scale each STFT bin of δ [N, samples] down to the masking threshold [N, bins, frames]
    where it exceeds it, and resynthesise (inverse STFT). Bins already below are untouched.
    (The legacy `masking` mode's projection, one of its alternating steps.)"""
    spec = stft(delta, cfg)
    power = spec.abs() ** 2 / spl_reference(cfg)
    gain = torch.sqrt(threshold / power.clamp(min=1e-20)).clamp(max=1.0)
    return synthesize(spec * gain, delta.shape[-1], cfg).to(delta.dtype)


@dataclass
class Audibility:
    """How audible δ is against the clean signal's masking threshold, per item [N]."""

    energy_above_share: torch.Tensor  # share of δ's energy in bins above the threshold (0 = fully masked)
    nmr_db: torch.Tensor  # total noise-to-mask ratio (dB): mean over frames and critical bands of P_δ / θ


@torch.no_grad()
def audibility(
    clean: torch.Tensor, delta: torch.Tensor, sample_rate: int, cfg: MaskingConfig = MaskingConfig()
) -> Audibility:
    """Masking figures of δ [N, samples] against `clean` [N, samples].

    NMR is the total NMR of PEAQ (ITU-R BS.1387): δ's energy per critical band and frame over the
    masking threshold's, averaged linearly over bands and frames, in dB (≤ 0: masked on average)."""
    threshold = masking_threshold(clean, sample_rate, cfg)
    power = power_spectrum_spl(delta, sample_rate, cfg)
    excess = (power - threshold).clamp(min=0)
    share = excess.sum(dim=(1, 2)) / power.sum(dim=(1, 2)).clamp(min=1e-20)
    bands = critical_bands(sample_rate, cfg, clean.device)
    ratio = torch.einsum("nft,fb->nbt", power, bands) / torch.einsum("nft,fb->nbt", threshold, bands)
    nmr = 10 * torch.log10(ratio.mean(dim=(1, 2)).clamp(min=1e-20))
    return Audibility(energy_above_share=share, nmr_db=nmr)
