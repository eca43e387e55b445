"""Split a track into overlapping CLAP windows and blend per-window δ back into one track-long δ.

All sizes are in samples at the track's own rate. Blending is a convex combination (weights ≥ 0
that sum to 1 at every sample), so a blended δ keeps every per-window bound: |δ| ≤ ε and
x + δ ∈ [-1, 1] hold for the track whenever they hold for each window.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class WindowPlan:
    """Where each window of one track starts, and how long it is.

    Example::

        plan = plan_windows(n_samples=25 * 44100, window=441000, overlap=44100)
        plan.starts  # (0, 396900, 661500): the last window ends exactly at the track's end
    """

    n_samples: int  # track length
    window: int  # nominal window length
    overlap: int  # nominal crossfade length between neighbours
    starts: tuple[int, ...]

    @property
    def lengths(self) -> tuple[int, ...]:
        """Real samples per window (shorter than `window` only for a track shorter than one)."""
        return tuple(min(self.window, self.n_samples - s) for s in self.starts)


def plan_windows(n_samples: int, window: int, overlap: int) -> WindowPlan:
    """Cover every sample of a track with windows of `window` samples overlapping by ≥ `overlap`.

    Windows advance by `window - overlap`; the last one is aligned to the track's end (so it may
    overlap its neighbour by more). A track shorter than one window gets a single short window.
    """
    if n_samples <= 0:
        raise ValueError(f"a track needs at least one sample, got {n_samples}")
    if not 0 <= overlap < window:
        raise ValueError(f"overlap must be in [0, window), got overlap={overlap} window={window}")
    if n_samples <= window:
        return WindowPlan(n_samples, window, overlap, (0,))
    hop = window - overlap
    starts = list(range(0, n_samples - window, hop))
    starts.append(n_samples - window)
    return WindowPlan(n_samples, window, overlap, tuple(starts))


def crossfade_weights(plan: WindowPlan) -> list[np.ndarray]:
    """Per-window blend weights, float32 [length] each, summing to exactly 1 at every track sample.

    Each window ramps linearly over `overlap` samples at edges shared with a neighbour (not at the
    track's own start and end); the weights are then normalised by their sum.
    """
    raw: list[np.ndarray] = []
    last = len(plan.starts) - 1
    for index, length in enumerate(plan.lengths):
        w = np.ones(length, dtype=np.float64)
        ramp_len = min(plan.overlap, length // 2)
        if ramp_len > 0:
            ramp = (np.arange(ramp_len, dtype=np.float64) + 0.5) / ramp_len
            if index > 0:
                w[:ramp_len] = ramp
            if index < last:
                w[-ramp_len:] = ramp[::-1]
        raw.append(w)
    total = np.zeros(plan.n_samples, dtype=np.float64)
    for start, w in zip(plan.starts, raw):
        total[start : start + len(w)] += w
    return [(w / total[s : s + len(w)]).astype(np.float32) for s, w in zip(plan.starts, raw)]


def blend(plan: WindowPlan, deltas: list[np.ndarray]) -> np.ndarray:
    """Blend per-window δ ([channels, length] each) into one δ of shape [channels, n_samples]."""
    if len(deltas) != len(plan.starts):
        raise ValueError(f"expected {len(plan.starts)} window deltas, got {len(deltas)}")
    channels = deltas[0].shape[0]
    out = np.zeros((channels, plan.n_samples), dtype=np.float32)
    for start, length, weight, delta in zip(plan.starts, plan.lengths, crossfade_weights(plan), deltas):
        out[:, start : start + length] += weight[None, :] * delta[:, :length]
    return out
