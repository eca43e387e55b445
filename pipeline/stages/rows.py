"""The plain columns that travel between stages (str, int, bytes, lists of them), one row per key."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

# Column names, in one place.
SHARD_ID, SHARD_URL, SHARD_ITEMS, INDEX = "shard_id", "shard_url", "shard_items", "index"
KEY, KIND, STATUS, ERROR = "key", "kind", "status", "error"
MEMBER_NAMES, MEMBER_DATA, AUDIO_MEMBER = "member_names", "member_data", "audio_member"
PCM, N_SAMPLES, CHANNELS, SAMPLE_RATE = "pcm", "n_samples", "channels", "sample_rate"
OUT_FORMAT, OUT_SUBTYPE, OUT_EXT = "out_format", "out_subtype", "out_ext"
OUT_BITRATE = "out_bitrate"  # kbps of a lossy re-encode (audio.lossy_output: same); 0: lossless output
AUDIO_BYTES = "audio_bytes"
# A long track is several rows (see stages/segments.py); every other row is segment 0 of 1.
SEGMENT, SEGMENTS, SEGMENT_START, TRACK_SAMPLES = "segment", "segments", "segment_start", "track_samples"
CLEAN_PCM = "clean_pcm"  # the clean float32 PCM, carried from the actor to the encode stage (then dropped)
# Filled by the encode stage, which decodes what it wrote and compares it with the clean PCM.
LOSSY_OUTPUT, LINF_WRITTEN, EPS_BOUND_HOLDS = "lossy_output", "linf_written", "eps_bound_holds"
DELTA_E_WRITTEN = "delta_e_written"
WRITTEN = (LOSSY_OUTPUT, LINF_WRITTEN, EPS_BOUND_HOLDS, DELTA_E_WRITTEN)
STATS = (  # per-item figures filled by the protect and quality stages, copied into the manifest
    "n_windows",
    "delta_e_mean",
    "delta_e_min",
    "cos_mean",
    "delta_e_musicldm",
    "linf",
    "l2",
    "snr_db",
    "segsnr_db",
    "pesq_wb",
    "stoi",
    "visqol_moslqo",
    "mask_energy_above",
    "nmr_db",
    "capped_share",
    "objective",
    "steps_mean",
    "seconds",
)
# Filled by the quality stage for every row (stages/quality.py): whether ViSQOL scored the item, and
# where each scored excerpt starts (seconds in the track) with its MOS-LQO, as JSON lists of floats
# (plain str columns: an all-empty batch of Arrow lists would have no value type).
VISQOL_MEASURED = "visqol_measured"
VISQOL_STARTS, VISQOL_SCORES = "visqol_excerpt_starts_s", "visqol_excerpt_moslqo"
VISQOL = (VISQOL_MEASURED, VISQOL_STARTS, VISQOL_SCORES)
DELTA_E_BY_ENCODER = "delta_e_by_encoder"  # JSON object: encoder id -> mean Δe (an ensemble has several)
ENCODER_ID = "encoder_id"

KIND_SAMPLE = "sample"
KIND_SHARD = "shard"  # a row that stands for the shard itself (shard-level error, or an empty shard)


def batch_to_rows(batch: dict[str, Any]) -> list[dict[str, Any]]:
    """Ray's column batch -> list of row dicts (numpy scalars turned into Python values)."""
    columns = list(batch)
    n = len(batch[columns[0]]) if columns else 0
    rows = []
    for i in range(n):
        row = {}
        for c in columns:
            value = batch[c][i]
            if isinstance(value, np.generic):
                value = value.item()
            elif isinstance(value, np.ndarray) and value.dtype == object:
                value = list(value)
            row[c] = value
        rows.append(row)
    return rows


def rows_to_batch(rows: list[dict[str, Any]], columns: list[str]) -> dict[str, Any]:
    """List of row dicts -> column batch with exactly `columns` (lists; Ray builds Arrow from them)."""
    return {c: [row.get(c) for row in rows] for c in columns}


def visqol_lists(row: dict[str, Any]) -> tuple[list[float], list[float]]:
    """A row's ViSQOL excerpts: (starts in the track, seconds; their MOS-LQO), from its JSON columns
    (both empty when absent or malformed)."""
    starts = [float(v) for v in json.loads(row.get(VISQOL_STARTS) or "[]")]
    scores = [float(v) for v in json.loads(row.get(VISQOL_SCORES) or "[]")]
    if len(starts) != len(scores) or not all(math.isfinite(v) for v in (*starts, *scores)):
        return [], []
    return starts, scores
