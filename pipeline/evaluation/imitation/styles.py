"""Synthetic music of distinct styles (tempo, key, timbre, envelope, drums) for the imitation test's
`--make-catalog`: whether an imitator learned a style is measurable."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Style:
    name: str
    tempo_bpm: float
    root_hz: float
    scale: tuple[int, ...]  # semitones of the scale
    harmonics: int  # brightness
    rolloff: float  # harmonic amplitude ∝ rolloff**(h-1)
    envelope: str  # pad | pluck
    notes_per_beat: int
    kick: float
    hat: float
    snare: float


MAJOR, MINOR, PENTA = (0, 2, 4, 5, 7, 9, 11), (0, 2, 3, 5, 7, 8, 10), (0, 3, 5, 7, 10)
STYLES: tuple[Style, ...] = (
    Style("ambient-pad", 68, 110.0, MAJOR, 3, 0.3, "pad", 1, 0.0, 0.0, 0.0),
    Style("fast-bright-pluck", 160, 440.0, MINOR, 10, 0.8, "pluck", 4, 0.5, 0.5, 0.3),
    Style("mid-tempo-keys", 100, 220.0, MAJOR, 5, 0.5, "pluck", 2, 0.4, 0.15, 0.0),
    Style("drum-heavy", 128, 82.4, PENTA, 2, 0.2, "pluck", 1, 0.9, 0.7, 0.6),
    Style("slow-minor-strings", 80, 146.8, MINOR, 8, 0.7, "pad", 1, 0.2, 0.0, 0.0),
    Style("high-bells", 112, 880.0, PENTA, 4, 0.6, "pluck", 2, 0.0, 0.3, 0.0),
    Style("bass-groove", 96, 55.0, MINOR, 6, 0.6, "pluck", 2, 0.6, 0.2, 0.4),
    Style("organ-chords", 120, 196.0, MAJOR, 12, 0.9, "pad", 1, 0.3, 0.3, 0.0),
)


def synthesize_style(style: Style, seconds: float, rate: int, seed: int) -> np.ndarray:
    """One track of `style`, float32 [samples, 1], peak 0.7: a melody in the style's key, tempo,
    timbre and envelope over its drum pattern; the seed picks the notes, phases and a ±3 % tempo."""
    rng = np.random.default_rng(seed)
    n = round(seconds * rate)
    t = np.arange(n) / rate
    tempo = style.tempo_bpm * (1 + rng.uniform(-0.03, 0.03))
    beat = 60.0 / tempo
    step = beat / style.notes_per_beat
    tonal = np.zeros(n)
    for start_index in range(math.ceil(seconds / step)):
        start = start_index * step
        begin, end = round(start * rate), min(n, round((start + step * (4 if style.envelope == "pad" else 1.5)) * rate))
        if begin >= n:
            break
        local = t[begin:end] - start
        degree = style.scale[rng.integers(len(style.scale))] + 12 * int(rng.integers(0, 2))
        freq = style.root_hz * 2 ** (degree / 12)
        env = (
            np.minimum(local / 0.3, 1.0) * np.exp(-local * 0.8)
            if style.envelope == "pad"
            else np.exp(-local * 9.0) * np.minimum(local / 0.003, 1.0)
        )
        note = np.zeros_like(local)
        for h in range(1, style.harmonics + 1):
            if freq * h < rate / 2:
                note += style.rolloff ** (h - 1) * np.sin(2 * np.pi * freq * h * local + rng.uniform(0, 2 * np.pi))
        tonal[begin:end] += env * note
    phase = np.mod(t, beat)
    kick = np.sin(2 * np.pi * (45 + 110 * np.exp(-phase * 30)) * phase) * np.exp(-phase * 10)
    hat_phase = np.mod(t + beat / 2, beat / 2)
    hat = np.diff(rng.standard_normal(n) * np.exp(-hat_phase * 80), prepend=0.0)
    snare_phase = np.mod(t + beat, 2 * beat)
    snare = rng.standard_normal(n) * np.exp(-snare_phase * 25)
    mono = 0.5 * tonal / max(1e-9, np.abs(tonal).max()) + style.kick * kick + 0.3 * style.hat * hat
    mono += 0.3 * style.snare * snare
    mono *= 0.7 / max(1e-9, np.abs(mono).max())
    return mono.astype(np.float32)[:, None]
