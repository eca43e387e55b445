"""Objective quality figures of a protected track against its clean original (CPU, numpy).

PESQ and STOI are speech metrics (ITU-T P.862.2 wide-band, and short-time intelligibility): they
are reported because listeners and reviewers know them, but for music the masking figures
(`mask_energy_above`, `nmr_db`, from pipeline.perceptual) are the appropriate ones.
"""

from __future__ import annotations

import numpy as np

METRIC_RATE = 16_000  # Hz: PESQ wide-band and STOI work at 16 kHz


def segmental_snr_db(clean: np.ndarray, protected: np.ndarray, sample_rate: int, frame_seconds: float = 0.02) -> float:
    """Mean per-frame SNR over 20 ms frames, each clamped to [-10, 35] dB (the usual convention),
    on [samples, channels] arrays; frames of digital silence are skipped."""
    frame = max(1, round(frame_seconds * sample_rate))
    n = (clean.shape[0] // frame) * frame
    if n == 0:
        return float("nan")
    signal = (clean[:n].astype(np.float64) ** 2).reshape(-1, frame, clean.shape[1]).sum(axis=(1, 2))
    noise = ((protected[:n].astype(np.float64) - clean[:n]) ** 2).reshape(-1, frame, clean.shape[1]).sum(axis=(1, 2))
    voiced = signal > 0
    if not voiced.any():
        return float("nan")
    snr = 10 * np.log10(signal[voiced] / np.maximum(noise[voiced], 1e-20))
    return float(np.clip(snr, -10, 35).mean())


def _mono16k(samples: np.ndarray, sample_rate: int) -> np.ndarray:
    import soxr

    mono = samples.astype(np.float64).mean(axis=1)
    return soxr.resample(mono, sample_rate, METRIC_RATE) if sample_rate != METRIC_RATE else mono


def pesq_wb(clean: np.ndarray, protected: np.ndarray, sample_rate: int) -> float:
    """Wide-band PESQ (MOS-LQO, 1.0-4.64) on the 16 kHz mono down-mix; NaN where PESQ refuses
    (silence, too short)."""
    from pesq import pesq

    try:
        return float(pesq(METRIC_RATE, _mono16k(clean, sample_rate), _mono16k(protected, sample_rate), "wb"))
    except Exception:  # pesq raises on silence ("No utterances detected") and very short input
        return float("nan")


def stoi(clean: np.ndarray, protected: np.ndarray, sample_rate: int) -> float:
    """STOI (0-1) on the 16 kHz mono down-mix; NaN where it cannot be computed."""
    from pystoi import stoi as compute_stoi

    try:
        return float(compute_stoi(_mono16k(clean, sample_rate), _mono16k(protected, sample_rate), METRIC_RATE))
    except Exception:
        return float("nan")
