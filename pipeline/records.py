"""Typed manifest rows and shard statistics, and the one Arrow schema of the Parquet manifest."""

from __future__ import annotations

import dataclasses
import enum
import json
import typing
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa


class SampleStatus(str, enum.Enum):
    """Outcome of one sample (one WebDataset key)."""

    OK = "ok"
    ERROR = "error"

    def __str__(self) -> str:  # "ok", not "SampleStatus.OK", in messages and labels
        return self.value

    __format__ = str.__format__


def error_kind(message: str) -> str:
    """The kind of an error message: the text before its first ':' (manifest error_kinds, the
    `kind` label of the error metrics, the report's error table)."""
    return message.split(":", 1)[0].strip()[:60] or "unknown"


@dataclass
class ManifestRow:
    """One row of `<shard>.parquet`: one WebDataset key of the input shard, failed or not.

    Example::

        row = ManifestRow(key="track-001", status=SampleStatus.ERROR, error="decode: ...")
        row.to_dict()["status"]  # "error"
    """

    key: str
    status: SampleStatus
    error: str = ""
    input_member: str = ""  # tar member name of the audio in the input shard
    output_member: str = ""  # tar member name written (may change extension: mp3 -> flac)
    output_format: str = ""  # e.g. "FLAC/PCM_16", "MP3/MPEG_LAYER_III@128kbps" (lossy_output: same)
    lossy_output: bool = False  # written in a lossy codec: no ε bound, see linf_written
    written: bool = False  # whether the key is present in the output shard
    duration_s: float = 0.0  # seconds
    sample_rate: int = 0  # Hz, of the track as stored
    channels: int = 0
    n_windows: int = 0
    delta_e_mean: float = float("nan")  # ||CLAP(x+δ) - CLAP(x)||₂ over windows, fp32, on the written audio
    delta_e_min: float = float("nan")
    cos_mean: float = float("nan")  # cosine(CLAP(x+δ), CLAP(x)) over windows
    delta_e_musicldm: float = float("nan")  # Δe through MusicLDM's view (16 kHz round trip, peak norm)
    # Δe of the written bytes decoded again: = delta_e_mean when they decode to exactly the samples
    # the actor measured (lossless outputs); NaN for lossy outputs (no encoder in the encode stage:
    # measure with `unlearnable robustness`, see docs/architecture.md).
    delta_e_written: float = float("nan")
    linf: float = float("nan")  # max |x' - x| of the protected samples before encoding (full scale 1.0)
    linf_written: float = float("nan")  # max |decoded output - clean input| after alignment (lossy: codec noise)
    eps_bound_holds: bool = False  # lossless output and linf_written ≤ ε + 1 LSB of its grid
    l2: float = float("nan")  # ||x' - x||₂ over all samples and channels
    snr_db: float = float("nan")  # 10·log10(Σx² / Σ(x'-x)²)
    segsnr_db: float = float("nan")  # segmental SNR over 20 ms frames, each clamped to [-10, 35] dB
    pesq_wb: float = float("nan")  # wide-band PESQ (16 kHz mono; a speech metric, NaN when off)
    stoi: float = float("nan")  # STOI (16 kHz mono; a speech metric, NaN when off)
    # ViSQOL v3 audio mode, MOS-LQO 1-4.73 (48 kHz mono, protected vs clean): the worst (minimum) over
    # the item's scored excerpts; NaN unless visqol_measured (quality.visqol measures a share of items).
    visqol_moslqo: float = float("nan")
    visqol_measured: bool = False  # whether ViSQOL scored at least one excerpt of this item
    visqol_excerpt_starts_s: list[float] = field(default_factory=list)  # start of each scored excerpt, s
    visqol_excerpt_moslqo: list[float] = field(default_factory=list)  # MOS-LQO of each (same order)
    mask_energy_above: float = float("nan")  # share of δ's energy above the clean signal's masking threshold
    nmr_db: float = float("nan")  # total noise-to-mask ratio over critical bands, dB (≤ 0: δ masked on average)
    capped_share: float = float("nan")  # spectral mode: share of δ's energy the L∞ cap ε removed (0: cap unused)
    delta_e_by_encoder: dict[str, float] = field(default_factory=dict)  # encoder id -> mean Δe (ensembles)
    objective: float = float("nan")  # the PGD objective: Δe, or the mean/min over an ensemble's encoders
    steps_mean: float = float("nan")  # PGD steps actually run per window (early stop lowers it)
    seconds: float = 0.0  # accelerator seconds spent on this track
    encoder_id: str = ""
    config_hash: str = ""

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["status"] = self.status.value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ManifestRow:
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        kwargs["status"] = SampleStatus(kwargs["status"])
        if isinstance(kwargs.get("delta_e_by_encoder"), list):  # Arrow maps read back as pairs
            kwargs["delta_e_by_encoder"] = dict(kwargs["delta_e_by_encoder"])
        for name in ("visqol_excerpt_starts_s", "visqol_excerpt_moslqo"):
            if kwargs.get(name) is not None:  # Arrow lists may read back as numpy arrays
                kwargs[name] = [float(v) for v in kwargs[name]]
        return cls(**kwargs)


def _arrow_type(annotation: Any) -> pa.DataType:
    """Arrow type of a ManifestRow field annotation."""
    if annotation is SampleStatus or annotation is str:
        return pa.string()
    simple = {bool: pa.bool_(), int: pa.int32(), float: pa.float64()}
    if annotation in simple:
        return simple[annotation]
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is list:
        return pa.list_(_arrow_type(args[0]))
    if origin is dict:
        return pa.map_(_arrow_type(args[0]), _arrow_type(args[1]))
    raise TypeError(f"no Arrow type for {annotation!r}")


# The Parquet manifest's schema, derived from ManifestRow (field order = column order).
MANIFEST_SCHEMA = pa.schema(
    [(name, _arrow_type(hint)) for name, hint in typing.get_type_hints(ManifestRow).items() if not name.startswith("_")]
)
assert MANIFEST_SCHEMA.names == [f.name for f in dataclasses.fields(ManifestRow)]


def manifest_table(rows: list[ManifestRow]) -> pa.Table:
    """Rows -> Arrow table with MANIFEST_SCHEMA (column order and types fixed)."""
    dicts = [r.to_dict() for r in rows]
    return pa.Table.from_pylist(dicts, schema=MANIFEST_SCHEMA)


@dataclass
class ShardStats:
    """Per-shard totals, written as `<shard>.stats.json` (the completion marker). Mergeable with `+`."""

    shards: int = 0
    items: int = 0
    ok: int = 0
    error: int = 0
    passthrough: int = 0  # failed items whose original bytes were written unchanged
    dropped: int = 0  # failed items left out of the output shard
    windows: int = 0
    audio_seconds: float = 0.0
    accelerator_seconds: float = 0.0
    wall_seconds: float = 0.0
    delta_e_sum: float = 0.0  # sum of per-item delta_e_mean over ok items (mean = delta_e_sum / ok)
    delta_e_below_target: int = 0  # ok items whose delta_e_min is under the target
    errors: dict[str, int] = field(default_factory=dict)  # error kind -> count (bounded)
    encoder_id: str = ""
    config_hash: str = ""
    # A single shard's input when it was protected: {"url", "size" (bytes), "etag" or "mtime"}; {} in sums
    input: dict[str, Any] = field(default_factory=dict)

    MAX_ERROR_KINDS = 50

    def __add__(self, other: ShardStats) -> ShardStats:
        errors = dict(self.errors)
        for kind, count in other.errors.items():
            if kind in errors or len(errors) < self.MAX_ERROR_KINDS:
                errors[kind] = errors.get(kind, 0) + count
            else:
                errors["other"] = errors.get("other", 0) + count
        summed = {
            f.name: getattr(self, f.name) + getattr(other, f.name)
            for f in dataclasses.fields(self)
            if f.name not in ("errors", "encoder_id", "config_hash", "input")
        }
        return ShardStats(
            **summed,
            errors=errors,
            encoder_id=self.encoder_id or other.encoder_id,
            config_hash=self.config_hash or other.config_hash,
        )

    @property
    def delta_e_mean(self) -> float:
        return self.delta_e_sum / self.ok if self.ok else float("nan")

    def add_error(self, message: str) -> None:
        """Count an error by its kind: the text before the first ':' of its message."""
        kind = error_kind(message)
        if kind not in self.errors and len(self.errors) >= self.MAX_ERROR_KINDS:
            kind = "other"
        self.errors[kind] = self.errors.get(kind, 0) + 1

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True, indent=1)

    @classmethod
    def from_json(cls, text: str) -> ShardStats:
        data = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
