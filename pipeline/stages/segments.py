"""Long tracks travel as segment rows, so that no protect actor ever holds a whole long track.

The read stage cuts a track longer than `audio.segment_seconds` into segments that overlap by
`audio.overlap_seconds` (the same plan as CLAP windows, one level up: `windows.plan_windows`).
Each segment row is protected like a track of its own. The shard writer gathers the segments of
a track and crossfades the protected segments back together with `windows.crossfade_weights`
(a convex combination, so |x' − x| ≤ ε still holds), puts the result back on the output grid and
encodes it. Per-window figures (Δe, steps, masking) are combined weighted by window count;
quality figures (segmental SNR, PESQ, STOI) weighted by segment duration; ViSQOL's MOS-LQO is the
minimum over the segments that scored an excerpt (each excerpt of the track is scored by one
segment, stages/quality.py), and the track counts as measured if any segment was; L∞/L2/SNR are
measured again on the assembled track. Windows and excerpts inside the crossfades were measured by
their segment before the crossfade (a documented approximation; the crossfades are ~1 s of every
`segment_seconds`).

Plain numpy: no Ray here. The writer (stages/write.py) calls :func:`assemble`.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from pipeline.core.protect import difference_figures
from pipeline.core.windows import WindowPlan, crossfade_weights, plan_windows
from pipeline.io.audio import quantize_within
from pipeline.records import SampleStatus
from pipeline.stages import rows as R

# Per-window figures: averaged over segments weighted by their window count.
WINDOW_WEIGHTED = (
    "delta_e_mean",
    "cos_mean",
    "delta_e_musicldm",
    "mask_energy_above",
    "nmr_db",
    "capped_share",
    "objective",
    "steps_mean",
)
# Figures of the audio as a whole: averaged weighted by segment duration.
DURATION_WEIGHTED = ("segsnr_db", "pesq_wb", "stoi")


def segment_plan(n_samples: int, sample_rate: int, segment_seconds: float, overlap_seconds: float) -> WindowPlan:
    """Where each segment of a track starts (samples); a single segment when the track is short
    (or `segment_seconds` is infinite)."""
    if not math.isfinite(segment_seconds) or n_samples <= segment_seconds * sample_rate:
        return WindowPlan(n_samples, n_samples, 0, (0,))
    segment = max(1, round(segment_seconds * sample_rate))
    overlap = min(round(overlap_seconds * sample_rate), segment - 1)
    return plan_windows(n_samples, segment, overlap)


def segment_count(row: dict[str, Any], segment_seconds: float, overlap_seconds: float) -> int:
    """How many rows :func:`track_rows` makes of `row`."""
    if row[R.STATUS] != SampleStatus.OK or not row[R.PCM]:
        return 1
    return len(segment_plan(row[R.N_SAMPLES], row[R.SAMPLE_RATE], segment_seconds, overlap_seconds).starts)


def track_rows(row: dict[str, Any], segment_seconds: float, overlap_seconds: float) -> list[dict[str, Any]]:
    """A decoded track row (float32 PCM) -> itself as segment 0 of 1, or its segment rows when it
    is longer than `segment_seconds`. Rows that carry no audio get the segment columns too, so
    that every row has the same columns."""
    defaults = {R.SEGMENT: 0, R.SEGMENTS: 1, R.SEGMENT_START: 0, R.TRACK_SAMPLES: int(row.get(R.N_SAMPLES) or 0)}
    row = {**row, **defaults}
    if row[R.STATUS] != SampleStatus.OK or not row[R.PCM]:
        return [row]
    plan = segment_plan(row[R.N_SAMPLES], row[R.SAMPLE_RATE], segment_seconds, overlap_seconds)
    if len(plan.starts) == 1:
        return [row]
    samples = np.frombuffer(row[R.PCM], dtype=np.float32).reshape(row[R.N_SAMPLES], row[R.CHANNELS])
    return split_rows(row, samples, plan)


def split_rows(row: dict[str, Any], samples: np.ndarray, plan: WindowPlan) -> list[dict[str, Any]]:
    """One row per segment of `samples` ([samples, channels] float32). The first segment keeps
    the item's non-audio members; the audio member's original bytes travel with no segment (the
    writer fetches them again from the input shard only if the track fails and must pass through)."""
    rows = []
    data, audio = row[R.MEMBER_DATA], row[R.AUDIO_MEMBER]
    for index, (start, length) in enumerate(zip(plan.starts, plan.lengths)):
        members = [b"" if i == audio or index > 0 else d for i, d in enumerate(data)]
        rows.append(
            {
                **row,
                R.MEMBER_DATA: members,
                R.PCM: np.ascontiguousarray(samples[start : start + length]).tobytes(),
                R.N_SAMPLES: length,
                R.SEGMENT: index,
                R.SEGMENTS: len(plan.starts),
                R.SEGMENT_START: start,
                R.TRACK_SAMPLES: plan.n_samples,
            }
        )
    return rows


def is_segment(row: dict[str, Any]) -> bool:
    """True for a row that is one segment of a longer track (to be assembled by the writer)."""
    return int(row.get(R.SEGMENTS) or 1) > 1


def assemble(rows: list[dict[str, Any]], eps: float) -> dict[str, Any]:
    """The segment rows of one track -> one track row with float32 PCM (protected) and CLEAN_PCM,
    ready for encoding; a failed segment fails the track with that segment's error."""
    rows = sorted(rows, key=lambda r: r[R.SEGMENT])
    first = rows[0]
    track: dict[str, Any] = {
        **first,
        R.SEGMENT: 0,
        R.SEGMENTS: 1,
        R.SEGMENT_START: 0,
        R.N_SAMPLES: first[R.TRACK_SAMPLES],
        R.PCM: b"",
        R.CLEAN_PCM: b"",
    }
    failed = [r for r in rows if r[R.STATUS] != SampleStatus.OK]
    if failed:
        segment = failed[0]
        track.update(
            {
                R.STATUS: SampleStatus.ERROR,
                R.ERROR: f"{segment[R.ERROR]} (segment {segment[R.SEGMENT] + 1}/{len(rows)})",
            }
        )
        return track
    channels, n = first[R.CHANNELS], first[R.TRACK_SAMPLES]
    plan = WindowPlan(
        n_samples=n,
        window=max(r[R.N_SAMPLES] for r in rows),
        overlap=_overlap(rows),
        starts=tuple(r[R.SEGMENT_START] for r in rows),
    )
    clean = np.empty((n, channels), dtype=np.float32)
    proposed = np.zeros((n, channels), dtype=np.float32)
    for row, weight in zip(rows, crossfade_weights(plan)):
        start, length = row[R.SEGMENT_START], row[R.N_SAMPLES]
        clean[start : start + length] = np.frombuffer(row[R.CLEAN_PCM], dtype=np.float32).reshape(length, channels)
        protected = np.frombuffer(row[R.PCM], dtype=np.float32).reshape(length, channels)
        proposed[start : start + length] += weight[:, None] * protected
    protected = np.empty_like(clean)
    chunk = 1 << 20
    for begin in range(0, n, chunk):  # crossfaded values are within ε but off the output grid
        protected[begin : begin + chunk] = quantize_within(
            clean[begin : begin + chunk], proposed[begin : begin + chunk], eps, first[R.OUT_SUBTYPE]
        )
    del proposed
    track[R.PCM] = protected.tobytes()
    track[R.CLEAN_PCM] = clean.tobytes()
    track.update(combine_figures(rows))
    track["linf"], track["l2"], track["snr_db"] = difference_figures(clean, protected)
    return track


def _overlap(rows: list[dict[str, Any]]) -> int:
    """The nominal crossfade length: the overlap of the first two segments (later pairs overlap
    by the same amount, except the last, which is aligned to the track's end and overlaps more)."""
    a, b = rows[0], rows[1]
    return a[R.SEGMENT_START] + a[R.N_SAMPLES] - b[R.SEGMENT_START]


def combine_figures(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-track figures from per-segment ones (see the module docstring for the weights)."""
    windows = np.array([float(r["n_windows"]) for r in rows])
    durations = np.array([float(r[R.N_SAMPLES]) for r in rows])
    out: dict[str, Any] = {
        "n_windows": int(windows.sum()),
        "delta_e_min": float(min(float(r["delta_e_min"]) for r in rows)),
        "seconds": float(sum(float(r["seconds"]) for r in rows)),
    }
    for name in WINDOW_WEIGHTED:
        out[name] = _weighted([float(r[name]) for r in rows], windows)
    for name in DURATION_WEIGHTED:
        out[name] = _weighted([float(r[name]) for r in rows], durations)
    out.update(combine_visqol(rows))
    by_encoder: dict[str, list[float]] = {}
    for row in rows:
        for encoder_id, value in json.loads(row.get(R.DELTA_E_BY_ENCODER) or "{}").items():
            by_encoder.setdefault(encoder_id, []).append(value)
    out[R.DELTA_E_BY_ENCODER] = json.dumps(
        {k: _weighted(v, windows) for k, v in by_encoder.items() if len(v) == len(rows)}, sort_keys=True
    )
    return out


def combine_visqol(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The track's ViSQOL columns from its segments': the worst (minimum) finite MOS-LQO, measured
    if any segment was, and every scored excerpt in track order."""
    scores = [float(r.get("visqol_moslqo", float("nan"))) for r in rows]
    finite = [v for v in scores if math.isfinite(v)]
    excerpts = sorted(pair for r in rows for pair in zip(*R.visqol_lists(r)))
    return {
        "visqol_moslqo": min(finite) if finite else float("nan"),
        R.VISQOL_MEASURED: any(bool(r.get(R.VISQOL_MEASURED, False)) for r in rows),
        R.VISQOL_STARTS: json.dumps([start for start, _ in excerpts]),
        R.VISQOL_SCORES: json.dumps([score for _, score in excerpts]),
    }


def _weighted(values: list[float], weights: np.ndarray) -> float:
    """Weighted mean of the finite values (NaN when none is finite: a figure that was not computed)."""
    pairs = [(v, w) for v, w in zip(values, weights) if math.isfinite(v)]
    if not pairs:
        return float("nan")
    total = sum(w for _, w in pairs)
    return float(sum(v * w for v, w in pairs) / total)
