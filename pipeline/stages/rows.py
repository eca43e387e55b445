"""The row that travels between stages, one per WebDataset key (or per segment of a long track):
plain columns only (str, int, float, bool, bytes, lists of them), so Ray builds Arrow blocks from
them. `TrackRow` is the one definition of its columns and their types; the name constants below are
its keys (checked at import), for code that indexes rows."""

from __future__ import annotations

import json
import math
from typing import Any, TypedDict

import numpy as np


class TrackRow(TypedDict, total=False):
    """Columns of a stage row, in the order stages add them."""

    # the read stage's input: one row per unit of work (stages/pipeline.py)
    layout: str  # shards | files | parquet (io.input_format)
    unit_files: str  # files layout: JSON list of the unit's paths under SHARD_URL (the tree's root)
    # read stage (stages/read.py)
    shard_id: str
    shard_url: str
    shard_items: int  # keys in the input shard (every row of the shard carries it)
    index: int  # position of the key in the input shard
    key: str
    kind: str  # KIND_SAMPLE, or KIND_SHARD for a row standing for the shard itself
    status: str  # records.SampleStatus value
    error: str  # "<kind>: <detail>" when status is error
    member_names: list[str]  # tar members of the key (the audio member and its companions)
    member_data: list[bytes]  # their bytes (the audio member's are dropped from segment rows)
    audio_member: str
    pcm: bytes  # float32 [n_samples, channels] interleaved; δ-protected after the protect stage
    n_samples: int  # samples per channel of this row's audio
    channels: int
    sample_rate: int  # Hz
    out_format: str
    out_subtype: str
    out_ext: str
    out_bitrate: int  # kbps of a lossy re-encode (audio.lossy_output: same); 0: lossless output
    # long tracks (stages/segments.py); every other row is segment 0 of 1
    segment: int
    segments: int
    segment_start: int  # samples
    track_samples: int  # samples per channel of the whole track
    # protect stage (stages/protect.py) and quality stage (stages/quality.py): the STATS figures
    clean_pcm: bytes  # the clean PCM, carried to the encode stage (then dropped)
    n_windows: int
    delta_e_mean: float
    delta_e_min: float
    cos_mean: float
    delta_e_musicldm: float
    linf: float
    l2: float
    snr_db: float
    segsnr_db: float
    pesq_wb: float
    stoi: float
    visqol_moslqo: float
    mask_energy_above: float
    nmr_db: float
    capped_share: float
    objective: float
    steps_mean: float
    seconds: float
    delta_e_by_encoder: str  # JSON object: encoder id -> mean Δe
    encoder_id: str
    visqol_measured: bool
    visqol_excerpt_starts_s: str  # JSON list of floats (an all-empty Arrow list column has no type)
    visqol_excerpt_moslqo: str  # JSON list of floats
    # encode stage (stages/write.py): the written bytes, decoded again and measured
    audio_bytes: bytes
    lossy_output: bool
    linf_written: float
    eps_bound_holds: bool
    delta_e_written: float


# Column names (keys of TrackRow).
LAYOUT, UNIT_FILES = "layout", "unit_files"
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

_NAMES = [v for k, v in dict(globals()).items() if k.isupper() and isinstance(v, str)]
_NAMES += [*WRITTEN, *STATS, *VISQOL]
assert set(_NAMES) <= set(TrackRow.__annotations__), set(_NAMES) - set(TrackRow.__annotations__)

KIND_SAMPLE = "sample"
KIND_SHARD = "shard"  # a row that stands for the shard itself (shard-level error, or an empty shard)
KIND_COPY = "copy"  # files layout, io.copy_other_files: a non-audio file copied to the output as it is


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
