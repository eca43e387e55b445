"""Psychoacoustic masking threshold of a clean signal, and the perceptual projection of δ onto it.

Plain torch, differentiable where it needs to be, no I/O. The model follows the classic
frame-wise recipe used by MPEG-1 psychoacoustic model 1 and by Qin et al. (2019) for
imperceptible adversarial audio, in Johnston's (1988) band formulation:

1. STFT power per frame, normalised so that a full-scale sine peaks at 96 dB SPL.
2. Energy per critical band (Bark), spread across bands with Schroeder's spreading function.
3. Tonal/noise masker offset per band from the frame's spectral flatness: tonal frames mask
   14.5 + z dB below the spread energy, noise-like frames 5.5 dB below.
4. Per-bin threshold = band threshold shared over its bins, floored by the absolute threshold
   of hearing (Terhardt's formula).

Why by hand: no maintained Python package exposes a differentiable masking threshold (the
MPEG reference code is C, and Qin et al.'s is TensorFlow research code). The STFT is torch's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SPL_FULL_SCALE_DB = 96.0  # a full-scale sine's peak bin, by the usual convention


@dataclass(frozen=True)
class MaskingConfig:
    """STFT geometry (samples at the signal's own rate)."""

    n_fft: int = 2048
    hop: int = 512


def bark(freq_hz: torch.Tensor) -> torch.Tensor:
    """Zwicker's critical-band rate z(f) in Bark."""
    return 13.0 * torch.atan(0.00076 * freq_hz) + 3.5 * torch.atan((freq_hz / 7500.0) ** 2)


def absolute_threshold_db(freq_hz: torch.Tensor) -> torch.Tensor:
    """Terhardt's threshold in quiet, dB SPL; clamped to [-20, 120] outside the audible range."""
    khz = freq_hz.clamp(min=20.0) / 1000.0
    ath = 3.64 * khz**-0.8 - 6.5 * torch.exp(-0.6 * (khz - 3.3) ** 2) + 1e-3 * khz**4
    return ath.clamp(-20.0, 120.0)


def power_spectrum_spl(signal: torch.Tensor, sample_rate: int, cfg: MaskingConfig = MaskingConfig()) -> torch.Tensor:
    """Power per STFT bin in linear SPL units (10^(dB/10)), signal [N, samples] -> [N, bins, frames]."""
    window = torch.hann_window(cfg.n_fft, device=signal.device, dtype=torch.float32)
    return _stft(signal, cfg, window).abs() ** 2 / _reference(window)


def _stft(signal: torch.Tensor, cfg: MaskingConfig, window: torch.Tensor) -> torch.Tensor:
    return torch.stft(
        signal.float(), cfg.n_fft, cfg.hop, window=window, center=True, pad_mode="constant", return_complex=True
    )


def _reference(window: torch.Tensor) -> torch.Tensor:
    """|X|² that maps to 0 dB SPL: a full-scale sine's peak bin, (Σw/2)², sits at 96 dB SPL."""
    return (window.sum() / 2) ** 2 / 10 ** (SPL_FULL_SCALE_DB / 10)


def _band_layout(sample_rate: int, cfg: MaskingConfig, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
    freqs = torch.linspace(0, sample_rate / 2, cfg.n_fft // 2 + 1, device=device)
    band = bark(freqs).floor().long()  # integer critical band of each bin
    n_bands = int(band.max().item()) + 1
    return freqs, band, n_bands


@torch.no_grad()
def masking_threshold(signal: torch.Tensor, sample_rate: int, cfg: MaskingConfig = MaskingConfig()) -> torch.Tensor:
    """Per-bin masking threshold of `signal` [N, samples] as linear SPL power [N, bins, frames].

    Noise whose power per bin stays under this threshold is masked by the signal (inaudible).
    """
    power = power_spectrum_spl(signal, sample_rate, cfg)  # [N, F, T]
    freqs, band, n_bands = _band_layout(sample_rate, cfg, signal.device)
    one_hot = torch.nn.functional.one_hot(band, n_bands).to(power.dtype)  # [F, B]
    energy = torch.einsum("nft,fb->nbt", power, one_hot)  # band energies [N, B, T]

    z = torch.arange(n_bands, device=signal.device, dtype=power.dtype)
    dz = z[:, None] - z[None, :]  # maskee - masker, in Bark
    spread_db = 15.81 + 7.5 * (dz + 0.474) - 17.5 * torch.sqrt(1 + (dz + 0.474) ** 2)
    spread = 10 ** (spread_db / 10)  # [maskee, masker]
    spread_energy = torch.einsum("ab,nbt->nat", spread, energy)

    # Tonality from spectral flatness (geometric / arithmetic mean) of each frame.
    eps = 1e-10
    flatness_db = 10 * torch.log10(
        torch.exp(torch.log(power + eps).mean(dim=1)) / (power.mean(dim=1) + eps) + eps
    )  # [N, T], ≤ 0
    tonality = (flatness_db / -60.0).clamp(0.0, 1.0)[:, None, :]  # [N, 1, T]
    offset_db = tonality * (14.5 + z[None, :, None]) + (1 - tonality) * 5.5
    band_threshold = spread_energy * 10 ** (-offset_db / 10)  # [N, B, T]

    bins_per_band = one_hot.sum(dim=0).clamp(min=1)  # [B]
    per_bin = torch.einsum("nbt,fb->nft", band_threshold / bins_per_band[None, :, None], one_hot)
    quiet = 10 ** (absolute_threshold_db(freqs) / 10)[None, :, None]
    return torch.maximum(per_bin, quiet)


def project_below_threshold(
    delta: torch.Tensor, threshold: torch.Tensor, sample_rate: int, cfg: MaskingConfig = MaskingConfig()
) -> torch.Tensor:
    """Scale each STFT bin of δ [N, samples] down to the masking threshold [N, bins, frames]
    where it exceeds it, and resynthesise (inverse STFT). Bins already below are untouched."""
    window = torch.hann_window(cfg.n_fft, device=delta.device, dtype=torch.float32)
    spec = _stft(delta, cfg, window)
    power = spec.abs() ** 2 / _reference(window)
    gain = torch.sqrt(threshold / power.clamp(min=1e-20)).clamp(max=1.0)
    out = torch.istft(spec * gain, cfg.n_fft, cfg.hop, window=window, center=True, length=delta.shape[-1])
    return out.to(delta.dtype)


@dataclass
class Audibility:
    """How audible δ is against the clean signal's masking threshold, per item [N]."""

    energy_above_share: torch.Tensor  # share of δ's energy above the threshold (0 = fully masked)
    nmr_db: torch.Tensor  # noise-to-mask ratio: 10·log10(mean over bins and frames of P_δ / θ)


@torch.no_grad()
def audibility(
    clean: torch.Tensor, delta: torch.Tensor, sample_rate: int, cfg: MaskingConfig = MaskingConfig()
) -> Audibility:
    """Masking figures of δ [N, samples] against `clean` [N, samples]."""
    threshold = masking_threshold(clean, sample_rate, cfg)
    power = power_spectrum_spl(delta, sample_rate, cfg)
    excess = (power - threshold).clamp(min=0)
    share = excess.sum(dim=(1, 2)) / power.sum(dim=(1, 2)).clamp(min=1e-20)
    nmr = 10 * torch.log10((power / threshold).mean(dim=(1, 2)).clamp(min=1e-20))
    return Audibility(energy_above_share=share, nmr_db=nmr)
