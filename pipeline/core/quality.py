"""Objective quality figures of a protected track against its clean original (CPU, numpy).

PESQ and STOI are speech metrics (ITU-T P.862.2 wide-band, and short-time intelligibility): they
are reported because listeners and reviewers know them, but for music the masking figures
(`mask_energy_above`, `nmr_db`, from pipeline.core.perceptual) and ViSQOL v3 in audio mode (MOS-LQO,
`visqol_moslqo`, measured on excerpts of a share of the items) are the appropriate ones.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

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


VISQOL_RATE = 48_000  # Hz: ViSQOL v3 audio mode works at 48 kHz
VISQOL_MIN_SECONDS = 1.0  # ViSQOL's patches need about a second; shorter input scores NaN without a call
VISQOL_MODES = ("off", "sample", "all")


def visqol_moslqo(clean: np.ndarray, protected: np.ndarray, sample_rate: int) -> float:
    """ViSQOL v3 audio-mode MOS-LQO (1.0-4.73; 4.73 = indistinguishable) of `protected` against
    `clean`, both [samples, channels] at `sample_rate` Hz, on the 48 kHz mono down-mix.

    Uses the pure-Python `visqol-python` port of Google's ViSQOL v3 (audio mode, SVR model, its
    default global alignment). About 0.2 s per audio second with numba (a dependency of librosa;
    its first call in a fresh environment compiles for ~10 s, later processes load the cache),
    several times that without. NaN where ViSQOL cannot score the input: digital silence in the
    reference, shorter than VISQOL_MIN_SECONDS (ViSQOL needs 45 frames, ~0.96 s), or an input
    ViSQOL refuses. 1-D arrays are taken as mono."""
    clean, protected = (a.reshape(-1, 1) if a.ndim == 1 else a for a in (clean, protected))
    if clean.shape != protected.shape or clean.ndim != 2 or clean.shape[0] < VISQOL_MIN_SECONDS * sample_rate:
        return float("nan")
    reference, degraded = _mono48k(clean, sample_rate), _mono48k(protected, sample_rate)
    if not np.any(reference) or not (np.isfinite(reference).all() and np.isfinite(degraded).all()):
        return float("nan")
    try:
        score = float(_visqol_api().measure_from_arrays(reference, degraded, VISQOL_RATE).moslqo)
    except Exception:  # ViSQOL raises on input it cannot align or patch
        return float("nan")
    return score if math.isfinite(score) else float("nan")


def _mono48k(samples: np.ndarray, sample_rate: int) -> np.ndarray:
    """[samples, channels] at `sample_rate` -> float64 mono at 48 kHz (soxr, high quality)."""
    import soxr

    mono = samples.astype(np.float64).mean(axis=1)
    return soxr.resample(mono, sample_rate, VISQOL_RATE) if sample_rate != VISQOL_RATE else mono


_VISQOL = None


def _visqol_api():
    """One ViSQOL audio-mode instance per process (building it loads the SVR model)."""
    global _VISQOL
    if _VISQOL is None:
        from visqol import VisqolApi

        api = VisqolApi()
        api.create(mode="audio")
        _VISQOL = api
    return _VISQOL


def visqol_selected(key: str, mode: str, share: float) -> bool:
    """Whether the item `key` gets a ViSQOL figure under `quality.visqol` = `mode` (off | sample |
    all). In sample mode the choice is a hash of the key (SHA-256, first 8 bytes as a fraction of
    2^64) under `share`: no RNG state, so reruns, resumed runs and every segment of a long track
    agree, and about `share` of the items are chosen."""
    if mode == "all":
        return True
    if mode != "sample" or share <= 0:
        return False
    digest = hashlib.sha256(b"visqol\x00" + key.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < share


def visqol_excerpts(n_samples: int, sample_rate: int, excerpt_seconds: float, count: int) -> list[tuple[int, int]]:
    """(start, length) in samples of `count` excerpts of `excerpt_seconds` spread evenly over a
    track of `n_samples`: excerpt i is centred at (2i + 1) / (2 count) of the room it can move in
    (one excerpt: the middle of the track). A track no longer than one excerpt is one excerpt,
    the whole track. Coinciding excerpts are kept once."""
    length = max(1, round(excerpt_seconds * sample_rate))
    if n_samples <= length:
        return [(0, n_samples)] if n_samples > 0 else []
    room = n_samples - length
    starts = sorted({round(room * (2 * i + 1) / (2 * count)) for i in range(max(1, count))})
    return [(s, length) for s in starts]


def visqol_owned_excerpts(
    track_samples: int,
    segment_start: int,
    segment_samples: int,
    segment_starts: tuple[int, ...],
    sample_rate: int,
    excerpt_seconds: float,
    count: int,
) -> list[tuple[int, int]]:
    """The track's excerpts (:func:`visqol_excerpts`) that the segment starting at `segment_start`
    measures, as (start in the track, length) samples, each within the segment.

    A long track travels as overlapping segments (`segment_starts`, each `segment_samples` long,
    cut at the track's end): each excerpt is measured by one segment, the first that holds it
    whole, else the first that holds its midpoint, the excerpt then shifted to lie inside that
    segment (and cut to it if the segment is shorter). Excerpts whose midpoint no listed segment
    holds are left out. A track of one segment measures its excerpts unchanged."""
    owned = []
    bounds = [(s, min(segment_samples, track_samples - s)) for s in segment_starts]
    for start, length in visqol_excerpts(track_samples, sample_rate, excerpt_seconds, count):
        whole = [b for b in bounds if b[0] <= start and start + length <= b[0] + b[1]]
        if whole:
            owner = whole[0]
        else:
            middle = start + length // 2
            owner = next((b for b in bounds if b[0] <= middle < b[0] + b[1]), None)
        if owner is None or owner[0] != segment_start:
            continue
        length = min(length, owner[1])
        start = min(max(start, owner[0]), owner[0] + owner[1] - length)
        owned.append((start, length))
    return owned


@dataclass(frozen=True)
class VisqolFigure:
    """ViSQOL of one item (or one segment): the worst excerpt's MOS-LQO and every scored excerpt."""

    moslqo: float = float("nan")  # min over the scored excerpts; NaN when none was scored
    starts_s: tuple[float, ...] = ()  # where each scored excerpt starts in the track, seconds
    scores: tuple[float, ...] = ()  # MOS-LQO of each scored excerpt (same order as starts_s)

    @property
    def measured(self) -> bool:
        return bool(self.starts_s)


def visqol_figure(
    clean: np.ndarray, protected: np.ndarray, sample_rate: int, excerpts: list[tuple[int, int]], offset: int = 0
) -> VisqolFigure:
    """MOS-LQO of `protected` against `clean` ([samples, channels] at `sample_rate` Hz) on each
    excerpt (start, length in samples, counted from `offset`: the position of the arrays in the
    track); the item's figure is the minimum (the worst excerpt). Excerpts ViSQOL cannot score
    (silence, under a second) are left out; none scored: NaN, not measured."""
    starts, scores = [], []
    for start, length in excerpts:
        begin = start - offset
        score = visqol_moslqo(clean[begin : begin + length], protected[begin : begin + length], sample_rate)
        if math.isfinite(score):
            starts.append(start / sample_rate)
            scores.append(score)
    if not scores:
        return VisqolFigure()
    return VisqolFigure(min(scores), tuple(starts), tuple(scores))
