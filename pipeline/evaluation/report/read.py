"""Reading a run's output folder for the report: manifests, markers, `_config.yaml`, robustness
results, and members of the clean / protected tars (pipeline.io.shards.read_samples)."""

from __future__ import annotations

import io
import logging
import posixpath
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from pipeline.io.output import OutputFolder
from pipeline.io.shards import read_samples
from pipeline.io.tree import UNIT_PREFIX
from pipeline.records import MANIFEST_SCHEMA, ShardStats

logger = logging.getLogger(__name__)

DEFAULT_TARGET = 0.5
# Manifest quality columns, in display order; columns with no finite value (switched off) are left out.
BASE_QUALITY = (
    "snr_db",
    "segsnr_db",
    "linf",
    "cos_mean",
    "delta_e_musicldm",
    "mask_energy_above",
    "nmr_db",
    "capped_share",
    "pesq_wb",
    "stoi",
    "steps_mean",
)
QUALITY_LABELS = {
    "snr_db": "SNR of δ (dB)",
    "segsnr_db": "segmental SNR (dB)",
    "linf": "L∞ of δ (full scale 1.0)",
    "cos_mean": "cosine(CLAP(x+δ), CLAP(x))",
    "delta_e_musicldm": "Δe through MusicLDM's view",
    "mask_energy_above": "share of δ energy above the masking threshold",
    "steps_mean": "PGD steps per window",
    "pesq_wb": "PESQ wide-band (a speech metric)",
    "stoi": "STOI (a speech metric)",
    "nmr_db": "noise-to-mask ratio (dB)",
    "capped_share": "share of δ energy cut by the ε cap",
    "seconds": "accelerator seconds per item",
}
# ViSQOL has its own section (target lines, measured share): not repeated among the quality plots.
NOT_QUALITY = {
    "delta_e_mean",
    "delta_e_min",
    "duration_s",
    "sample_rate",
    "channels",
    "n_windows",
    "seconds",
    "visqol_moslqo",
}
MOS_TARGET = 4.0  # ViSQOL MOS-LQO an item should reach (issue 15: imperceptible by measurement)
MOS_HIGH = 4.5  # marked too: near ViSQOL v3's ceiling of 4.73 for an identical copy
MOS_CEILING = 4.73
CLIP_SECONDS = 6.0  # length of each A/B clip
LISTEN_ITEMS = 3  # items per listening list (lowest MOS-LQO, lowest Δe)
LISTEN_BUDGET_BYTES = 12_000_000  # FLAC bytes of all clips together (the page grows by 4/3 of it)
MANIFEST_NAMES = set(MANIFEST_SCHEMA.names)
SPECTRO_SECONDS = 20.0  # only the first seconds of a track go into its spectrograms
CLAP_FMAX = 14_000.0  # CLAP's mel front end stops here
MUSICLDM_FMAX = 8_000.0  # MusicLDM trains on 16 kHz audio, mels up to 8 kHz
BATCH_FILES = 256  # manifests fetched per fs.cat call


class ReportError(RuntimeError):
    """The output folder cannot be reported on (nothing there, unreadable)."""


@dataclass
class OutputData:
    """Everything read from an output folder."""

    url: str
    columns: dict[str, np.ndarray]  # one entry per manifest column (+ shard_id), all rows of all shards
    stats: ShardStats  # markers summed
    shards: list[str]  # completed shard ids
    orphans: list[str] = field(default_factory=list)  # manifests without a marker (interrupted)
    config: dict[str, Any] = field(default_factory=dict)
    config_text: str = ""
    robustness_table: pa.Table | None = None
    robustness_md: str = ""
    robustness_png: bytes = b""  # the robustness command's plot (retained Δe per attack and run)
    extra_columns: list[str] = field(default_factory=list)  # numeric columns beyond the schema

    @property
    def n_rows(self) -> int:
        return len(self.columns.get("key", []))

    @property
    def target(self) -> float:
        value = (self.config.get("attack") or {}).get("target_delta_e")
        try:
            return float(value) if value is not None else DEFAULT_TARGET
        except (TypeError, ValueError):
            return DEFAULT_TARGET

    @property
    def clean_input(self) -> str | None:
        """The run's input shards, as its `_config.yaml` names them (io.input); None if unknown."""
        value = (self.config.get("io") or {}).get("input")
        return str(value) if value else None

    @property
    def visqol_excerpt_seconds(self) -> float:
        value = (self.config.get("quality") or {}).get("visqol_excerpt_seconds")
        try:
            return float(value) if value is not None else 10.0
        except (TypeError, ValueError):
            return 10.0

    def floats(self, name: str) -> np.ndarray:
        """A numeric column as float64 (NaN for nulls; all NaN when no manifest has the column)."""
        values = self.columns.get(name)
        if values is None:
            return np.full(self.n_rows, np.nan)
        return np.array([np.nan if v is None else float(v) for v in values], dtype=float)

    def flags(self, name: str) -> np.ndarray:
        """A bool column (False for nulls and for manifests without the column)."""
        values = self.columns.get(name)
        if values is None:
            return np.zeros(self.n_rows, dtype=bool)
        return np.array([bool(v) if v is not None else False for v in values], dtype=bool)

    def lists(self, name: str) -> list[list[float]]:
        """A list<float> column as Python lists ([] for nulls and missing columns)."""
        values = self.columns.get(name)
        if values is None:
            return [[] for _ in range(self.n_rows)]
        return [[float(x) for x in v] if v is not None else [] for v in values]

    @property
    def encoder_ids(self) -> list[str]:
        ids = {str(e) for e in self.columns.get("encoder_id", []) if e}
        if self.stats.encoder_id:
            ids.add(self.stats.encoder_id)
        return sorted(ids)


# ----------------------------------------------------------------------------------------- reading


def _read_optional(out: OutputFolder, name: str) -> bytes | None:
    try:
        with out.fs.open(out.key(name), "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def load_output(url: str, storage_options: Mapping[str, Any] | None = None) -> OutputData:
    """Read manifests, markers, config and robustness results under `url`.

    Raises:
        ReportError: the folder does not exist or holds no completed shard.
    """
    out = OutputFolder(url, storage_options)
    try:
        names = [posixpath.basename(n) for n in out.fs.ls(out.path, detail=False)]
    except FileNotFoundError as exc:
        raise ReportError(f"output folder not found: {url}") from exc
    markers = sorted(n[: -len(".stats.json")] for n in names if n.endswith(".stats.json"))
    manifests = {n[: -len(".parquet")] for n in names if n.endswith(".parquet") and n != "robustness.parquet"}
    if any(m.startswith(UNIT_PREFIX) for m in markers):  # a tree / dataset output: other .parquet files are data
        manifests = {m for m in manifests if m.startswith(UNIT_PREFIX)}
    shards = [s for s in markers if s in manifests]
    orphans = sorted(manifests - set(markers))
    if not shards:
        raise ReportError(f"no completed shard (<id>.parquet + <id>.stats.json) under {url}")

    stats = ShardStats()
    tables: list[pa.Table] = []
    for start in range(0, len(shards), BATCH_FILES):
        chunk = shards[start : start + BATCH_FILES]
        paths = [out.key(f"{s}.parquet") for s in chunk] + [out.key(out.marker_name(s)) for s in chunk]
        # keyed by basename: filesystems spell the returned paths their own way (protocol, slashes)
        blobs = {posixpath.basename(k): v for k, v in out.fs.cat(paths).items()}
        for shard_id in chunk:
            stats = stats + ShardStats.from_json(blobs[out.marker_name(shard_id)].decode())
            table = pq.read_table(io.BytesIO(blobs[f"{shard_id}.parquet"]))
            tables.append(table.append_column("shard_id", pa.array([shard_id] * table.num_rows, pa.string())))
    table = pa.concat_tables(tables, promote_options="permissive")
    columns = {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}
    extra = [
        f.name
        for f in table.schema
        if f.name not in MANIFEST_NAMES
        and f.name != "shard_id"
        and (pa.types.is_floating(f.type) or pa.types.is_integer(f.type))
    ]
    for name in extra:
        columns[name] = np.asarray(table.column(name).to_pylist(), dtype=float)  # nulls -> nan

    data = OutputData(url=url, columns=columns, stats=stats, shards=shards, orphans=orphans, extra_columns=extra)
    config_bytes = _read_optional(out, "_config.yaml")
    if config_bytes:
        data.config_text = config_bytes.decode("utf-8", "replace")
        try:
            loaded = yaml.safe_load(data.config_text)
            data.config = loaded if isinstance(loaded, dict) else {}
        except yaml.YAMLError as exc:
            logger.warning("_config.yaml unreadable: %s", exc)
    robustness = _read_optional(out, "robustness.parquet")
    if robustness:
        data.robustness_table = pq.read_table(io.BytesIO(robustness))
    robustness_md = _read_optional(out, "robustness.md")
    if robustness_md:
        data.robustness_md = robustness_md.decode("utf-8", "replace")
    data.robustness_png = _read_optional(out, "robustness.png") or b""
    return data


def read_members(url: str, names: set[str], storage_options: Mapping[str, Any] | None = None) -> dict[str, bytes]:
    """The bytes of the wanted members of a tar (read with pipeline.io.shards.read_samples).

    Raises:
        ReportError: the tar cannot be read (its shard-level error) and none of the members was found.
    """
    samples, error = read_samples(url, storage_options)
    found = {
        name: data for sample in samples for name, data in zip(sample.names, sample.data, strict=True) if name in names
    }
    if error and not found:
        raise ReportError(error)
    return found
