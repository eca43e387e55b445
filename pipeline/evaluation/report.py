"""`unlearnable report`: one self-contained HTML page about a run's output folder.

Reads every `<shard>.parquet` manifest and `<shard>.stats.json` marker under an output folder (local
or s3://), plus `_config.yaml`, `robustness.parquet` / `robustness.md` when present, and writes an
HTML file with its PNG figures and audio clips embedded (base64): Δe against the target, ViSQOL
MOS-LQO against its target, quality distributions, slowest and worst items, errors by kind, and,
from the clean input (the run's `_config.yaml` io.input, or `--clean`), clean vs protected
spectrograms with the spectrum of δ and A/B players (short FLAC clips) of the lowest-MOS-LQO and
lowest-Δe items. Nothing is fetched from the network by the page itself.

Example::

    unlearnable report --output s3://bucket/protected/ \
        --endpoint-url http://127.0.0.1:8333 --addressing-style path --out report.html
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import html
import io
import logging
import math
import posixpath
import sys
import tarfile
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from pipeline.io.output import OutputFolder
from pipeline.io.shards import list_shards
from pipeline.io.storage import filesystem, open_url
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
    return data


def read_members(url: str, names: set[str], storage_options: Mapping[str, Any] | None = None) -> dict[str, bytes]:
    """Stream a tar and return the bytes of the wanted members (stops once all are found)."""
    found: dict[str, bytes] = {}
    fs, path = filesystem(url, storage_options)
    with fs.open(path, "rb") as raw, tarfile.open(fileobj=raw, mode="r|*") as tar:
        for member in tar:
            if member.name in names and member.isfile():
                handle = tar.extractfile(member)
                found[member.name] = handle.read() if handle is not None else b""
                if len(found) == len(names):
                    break
    return found


# ----------------------------------------------------------------------------------------- figures


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _png(fig: Any) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _img(b64: str, alt: str) -> str:
    return f'<img src="data:image/png;base64,{b64}" alt="{html.escape(alt)}">'


def _finite(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=float)
    return values[np.isfinite(values)]


def delta_e_figure(mean: np.ndarray, minimum: np.ndarray, target: float) -> str:
    fig = _figure(10, 3.6)
    ax = fig.add_subplot()
    mean, minimum = _finite(mean), _finite(minimum)
    top = max(1.4, float(np.max(mean, initial=0.0)), float(np.max(minimum, initial=0.0))) * 1.02
    bins = np.linspace(0.0, top, 57)
    ax.hist(mean, bins=bins, alpha=0.75, label=f"Δe mean per item (n={mean.size})", color="#3465a4")
    ax.hist(
        minimum,
        bins=bins,
        histtype="step",
        linewidth=1.6,
        label="Δe min per item (worst window)",
        color="#cc0000",
    )
    ax.axvline(target, color="black", linestyle="--", linewidth=1.4, label=f"target {target:g}")
    ax.set_xlabel("Δe = ‖CLAP(x+δ) − CLAP(x)‖₂ (fp32, on the written audio)")
    ax.set_ylabel("items")
    ax.legend(loc="upper right")
    ax.grid(alpha=0.3)
    return _png(fig)


def mos_figure(moslqo: np.ndarray, measured: int, total: int) -> str:
    """Histogram of per-item ViSQOL MOS-LQO with the target (4.0) and 4.5 marked."""
    from matplotlib.ticker import MaxNLocator

    fig = _figure(12, 3.4)
    ax = fig.add_subplot()
    values = _finite(moslqo)
    low = min(3.0, float(np.floor(np.min(values, initial=3.0) * 4) / 4))
    ax.hist(values, bins=np.arange(low, MOS_CEILING + 0.05, 0.05), color="#75507b", alpha=0.85,
            label=f"MOS-LQO per item (worst excerpt)\n{measured:,} of {total:,} ok items measured")  # fmt: skip
    ax.axvline(MOS_TARGET, color="black", linestyle="--", linewidth=1.4, label=f"target {MOS_TARGET:g}")
    ax.axvline(MOS_HIGH, color="gray", linestyle=":", linewidth=1.4, label=f"{MOS_HIGH:g}")
    ax.axvline(MOS_CEILING, color="#4e9a06", linewidth=1, label=f"identical copy ({MOS_CEILING:g})")
    ax.set_xlim(low, MOS_CEILING + 0.07)
    ax.set_xlabel("ViSQOL v3 audio mode MOS-LQO (48 kHz mono, protected vs clean)")
    ax.set_ylabel("items")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)  # outside: never over a bar
    ax.grid(alpha=0.3)
    return _png(fig)


def quality_figure(columns: dict[str, np.ndarray], names: list[str]) -> str:
    from matplotlib.ticker import MaxNLocator

    cols = 3
    rows = math.ceil(len(names) / cols)
    fig = _figure(12, 3.0 * rows)
    for i, name in enumerate(names):
        ax = fig.add_subplot(rows, cols, i + 1)
        values = _finite(columns[name])
        if values.size:
            lo, hi = float(values.min()), float(values.max())
            if hi - lo <= 1e-9 * max(1.0, abs(hi)):  # one value: a narrow bar around it, not ±0.5
                pad = max(abs(hi) * 0.05, 1e-6)
                lo, hi = lo - pad, hi + pad
            ax.hist(values, bins=np.linspace(lo, hi, 41), color="#4e9a06", alpha=0.85)
            ax.axvline(float(np.median(values)), color="black", linewidth=1, linestyle=":")
        else:
            ax.text(0.5, 0.5, "no finite values", ha="center", va="center", transform=ax.transAxes)
        ax.xaxis.set_major_locator(MaxNLocator(5))  # long tick labels (0.00295) must not collide
        ax.set_title(f"{QUALITY_LABELS.get(name, name)}  (n={values.size})", fontsize=10)
        ax.grid(alpha=0.3)
    return _png(fig)


def _mono(samples: np.ndarray) -> np.ndarray:
    return samples.mean(axis=1) if samples.ndim == 2 else samples


def _stft_db(x: np.ndarray, n_fft: int = 2048, hop: int = 512) -> np.ndarray:
    """|STFT| in dB re full-scale sine, [freq, frames]."""
    if x.size < n_fft:
        x = np.pad(x, (0, n_fft - x.size))
    window = np.hanning(n_fft).astype(np.float32)
    frames = np.lib.stride_tricks.sliding_window_view(x, n_fft)[::hop] * window
    magnitude = np.abs(np.fft.rfft(frames, axis=1)).T * (2.0 / window.sum())
    return 20.0 * np.log10(np.maximum(magnitude, 1e-10))


def _welch_db(x: np.ndarray, n_fft: int = 4096) -> np.ndarray:
    """Average magnitude spectrum in dB re full-scale sine."""
    spec = _stft_db(x, n_fft=n_fft, hop=n_fft // 2)
    return 10.0 * np.log10(np.maximum(np.mean(10.0 ** (spec / 10.0), axis=1), 1e-20))


def spectrogram_figure(clean: np.ndarray, protected: np.ndarray, rate: int, title: str) -> str:
    n = min(clean.shape[0], protected.shape[0], int(SPECTRO_SECONDS * rate))
    x, y = _mono(clean[:n]), _mono(protected[:n])
    delta = y - x
    s_clean, s_prot, s_delta = _stft_db(x), _stft_db(y), _stft_db(delta)
    extent = (0.0, n / rate, 0.0, rate / 2000.0)
    fig = _figure(12, 6.6)
    fig.suptitle(title, fontsize=11)
    vmax = float(np.max(s_clean, initial=-120.0))
    panels = [
        (s_clean, "clean x", vmax - 90, vmax),
        (s_prot, "protected x+δ", vmax - 90, vmax),
        (s_delta, "δ = protected − clean", None, None),
    ]
    for i, (spec, label, lo, hi) in enumerate(panels):
        ax = fig.add_subplot(2, 2, i + 1)
        if lo is None:
            hi = float(np.percentile(s_delta, 99.5))
            lo = hi - 60
        im = ax.imshow(spec, origin="lower", aspect="auto", extent=extent, vmin=lo, vmax=hi, cmap="magma")
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("s")
        ax.set_ylabel("kHz")
        fig.colorbar(im, ax=ax, label="dBFS")
    ax = fig.add_subplot(2, 2, 4)
    freqs = np.fft.rfftfreq(4096, 1.0 / rate) / 1000.0
    ax.plot(freqs, _welch_db(x), label="clean", color="#3465a4", linewidth=1)
    ax.plot(freqs, _welch_db(delta), label="δ", color="#cc0000", linewidth=1)
    for fmax, label in ((MUSICLDM_FMAX, "MusicLDM fmax"), (CLAP_FMAX, "CLAP fmax")):
        if fmax < rate / 2:
            ax.axvline(fmax / 1000.0, color="gray", linestyle="--", linewidth=1)
            ax.text(
                fmax / 1000.0, 0.97, label + " ", transform=ax.get_xaxis_transform(), fontsize=8,
                rotation=90, ha="right", va="top", color="dimgray",
            )  # fmt: skip
    ax.set_xlabel("kHz")
    ax.set_ylabel("dBFS (mean spectrum)")
    ax.set_title("spectrum of δ vs clean", fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)  # outside: never over a line
    ax.grid(alpha=0.3)
    return _png(fig)


# ------------------------------------------------------------------------------------------- HTML


CSS = """
body { font-family: system-ui, -apple-system, "DejaVu Sans", sans-serif; margin: 24px auto; max-width: 1240px;
       color: #222; line-height: 1.4; padding: 0 16px; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { border-bottom: 1px solid #ccc; padding-bottom: 4px; margin-top: 1.6em; }
.meta { color: #555; font-size: 0.9em; }
.banner { background: #fce94f; border: 2px solid #c4a000; padding: 12px 16px; font-weight: 600;
          margin: 16px 0; }
.warn { background: #fff3cd; border-left: 4px solid #e0a800; padding: 8px 12px; }
.note { color: #555; font-size: 0.9em; }
table { border-collapse: collapse; margin: 8px 0 16px; font-size: 0.88em; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #f2f2f2; }
tr:nth-child(even) td { background: #fafafa; }
img { max-width: 100%; height: auto; display: block; margin: 8px 0; }
.cards { display: flex; flex-wrap: wrap; gap: 10px; margin: 12px 0; }
.card { border: 1px solid #ddd; border-radius: 6px; padding: 8px 14px; min-width: 120px; }
.card .v { font-size: 1.35em; font-weight: 600; } .card .k { color: #666; font-size: 0.82em; }
code, pre { font-family: "DejaVu Sans Mono", monospace; font-size: 0.85em; }
pre { background: #f6f6f6; padding: 8px; overflow-x: auto; }
.ab { display: flex; flex-wrap: wrap; gap: 18px; align-items: center; margin: 4px 0 14px; }
.ab div { display: flex; align-items: center; gap: 8px; }
.ab .label { font-weight: 600; min-width: 7.5em; }
"""


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value)).lower()
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if math.isnan(value):
            return "–"
        magnitude = abs(value)
        if value != 0 and (magnitude >= 1e6 or magnitude < 0.1):
            return f"{value:.{digits}g}"  # 0.00298, 1.23e+07
        if magnitude >= 1000:
            return f"{value:,.0f}"
        if magnitude >= 10:
            return f"{value:.1f}"
        return f"{value:.{digits}f}"
    return str(value)


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:,.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.1f} s"


def html_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], numeric: Sequence[bool] | None = None) -> str:
    if numeric is None:
        numeric = [
            all(isinstance(r[i], (int, float, np.number)) for r in rows if r[i] is not None)
            for i in range(len(headers))
        ]
    head = "".join(
        f'<th class="{"num" if n else ""}">{html.escape(h)}</th>' for h, n in zip(headers, numeric, strict=True)
    )
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="{"num" if n else ""}">{html.escape(_fmt(v))}</td>' for v, n in zip(row, numeric, strict=True)
        )
        + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def markdown_to_html(text: str) -> str:
    """Headings, pipe tables and paragraphs of a small Markdown file (everything escaped)."""
    parts: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].rstrip()
        if line.startswith("|"):
            block = []
            while i < len(lines) and lines[i].strip().startswith("|"):
                block.append([c.strip() for c in lines[i].strip().strip("|").split("|")])
                i += 1
            body = [r for r in block[1:] if not all(set(c) <= set("-: ") for c in r)]
            parts.append(html_table(block[0], body, numeric=[False] * len(block[0])))
            continue
        if line.startswith("#"):
            level = min(6, len(line) - len(line.lstrip("#")) + 2)
            parts.append(f"<h{level}>{html.escape(line.lstrip('#').strip())}</h{level}>")
        elif line.strip():
            parts.append(f"<p>{html.escape(line)}</p>")
        i += 1
    return "\n".join(parts)


def _percentiles(values: np.ndarray) -> list[Any]:
    v = _finite(values)
    if not v.size:
        return [0, *([float("nan")] * 6)]
    p = np.percentile(v, [5, 50, 95])
    return [
        int(v.size),
        float(v.min()),
        float(p[0]),
        float(p[1]),
        float(p[2]),
        float(v.max()),
        float(v.mean()),
    ]


def _error_kind(message: str) -> str:
    return message.split(":", 1)[0].strip()[:60] or "unknown"


@dataclass
class Example:
    """One item shown with spectrograms or A/B players."""

    shard_id: str
    key: str
    input_member: str
    output_member: str
    delta_e: float
    snr_db: float
    why: str
    moslqo: float = float("nan")
    clip_start_s: float | None = None  # A/B clip start in the track, seconds (None: the middle)


def _example(data: OutputData, idx: int, why: str, clip_start_s: float | None = None) -> Example:
    c = data.columns
    mos = c.get("visqol_moslqo")
    return Example(
        shard_id=str(c["shard_id"][idx]),
        key=str(c["key"][idx]),
        input_member=str(c["input_member"][idx]),
        output_member=str(c["output_member"][idx]),
        delta_e=float(c["delta_e_mean"][idx]),
        snr_db=float(c["snr_db"][idx]),
        why=why,
        moslqo=float("nan") if mos is None or mos[idx] is None else float(mos[idx]),
        clip_start_s=clip_start_s,
    )


def _written_ok(data: OutputData) -> np.ndarray:
    c = data.columns
    return (c["status"] == "ok") & c["written"].astype(bool) & (c["output_member"] != "")


def pick_examples(data: OutputData, n: int) -> list[Example]:
    """Lowest, median and highest Δe among written ok items, then evenly spaced ones."""
    c = data.columns
    ok = np.flatnonzero(_written_ok(data) & np.isfinite(c["delta_e_mean"].astype(float)))
    if not ok.size or n <= 0:
        return []
    order = ok[np.argsort(c["delta_e_mean"][ok].astype(float), kind="stable")]
    picks = [(0, "lowest Δe"), (len(order) // 2, "median Δe"), (len(order) - 1, "highest Δe")]
    if n > 3:
        picks += [(round(p), "") for p in np.linspace(0, len(order) - 1, n)[1:-1]]
    chosen: list[Example] = []
    seen: set[int] = set()
    for position, why in picks:
        idx = int(order[position])
        if idx in seen:
            continue
        seen.add(idx)
        chosen.append(_example(data, idx, why))
        if len(chosen) >= n:
            break
    return chosen


def pick_listening(data: OutputData, n: int, clip_seconds: float = CLIP_SECONDS) -> list[Example]:
    """The `n` written ok items with the lowest ViSQOL MOS-LQO (clip: the middle of their worst
    excerpt), then the `n` with the lowest Δe mean (clip: the middle of the track), each item once."""
    if n <= 0:
        return []
    written = _written_ok(data)
    mos, de = data.floats("visqol_moslqo"), data.floats("delta_e_mean")
    starts, scores = data.lists("visqol_excerpt_starts_s"), data.lists("visqol_excerpt_moslqo")
    chosen: dict[int, Example] = {}
    by_mos = np.flatnonzero(written & np.isfinite(mos) & data.flags("visqol_measured"))
    for idx in by_mos[np.argsort(mos[by_mos], kind="stable")][:n]:
        clip = None
        if starts[idx] and len(starts[idx]) == len(scores[idx]):
            worst = starts[idx][int(np.argmin(scores[idx]))]
            clip = worst + (data.visqol_excerpt_seconds - clip_seconds) / 2  # centred on it (clip_bounds clamps)
        chosen[int(idx)] = _example(data, int(idx), "lowest MOS-LQO", clip)
    by_de = np.flatnonzero(written & np.isfinite(de))
    for idx in by_de[np.argsort(de[by_de], kind="stable")][:n]:
        if int(idx) in chosen:
            chosen[int(idx)].why += ", lowest Δe"
        else:
            chosen[int(idx)] = _example(data, int(idx), "lowest Δe")
    return list(chosen.values())


ItemRenderer = Callable[[Example, Any, Any], str]  # (item, clean DecodedAudio, protected DecodedAudio) -> HTML


def render_items(
    data: OutputData,
    clean_url: str,
    items: list[Example],
    storage_options: Mapping[str, Any] | None,
    render_item: ItemRenderer,
) -> dict[tuple[str, str], str]:
    """HTML for each item from its clean input member and its protected output member, read from
    the tars and decoded one item at a time; a problem becomes a warning paragraph for the items
    it touches, never an exception."""
    from pipeline.io.audio import decode

    out: dict[tuple[str, str], str] = {}
    try:
        clean_shards = {ref.shard_id: ref.url for ref in list_shards(clean_url, storage_options)}
    except Exception as exc:
        warning = f"<p class='warn'>Cannot list clean shards at {html.escape(clean_url)}: {html.escape(str(exc))}</p>"
        return {(ex.shard_id, ex.key): warning for ex in items}
    folder = OutputFolder(data.url, storage_options)
    by_shard: dict[str, list[Example]] = {}
    for ex in items:
        by_shard.setdefault(ex.shard_id, []).append(ex)
    for shard_id, shard_items in by_shard.items():
        try:
            if shard_id not in clean_shards:
                raise ReportError(f"no clean shard {shard_id}.tar under {clean_url}")
            clean = read_members(clean_shards[shard_id], {e.input_member for e in shard_items}, storage_options)
            protected = read_members(
                folder.url + f"/{shard_id}.tar", {e.output_member for e in shard_items}, storage_options
            )
            for ex in shard_items:
                if ex.input_member not in clean or ex.output_member not in protected:
                    out[(shard_id, ex.key)] = "<p class='warn'>member missing from a shard</p>"
                    continue
                x = decode(clean[ex.input_member], min_seconds=0.0)
                y = decode(protected[ex.output_member], min_seconds=0.0)
                if x.sample_rate != y.sample_rate:
                    out[(shard_id, ex.key)] = "<p class='warn'>sample rates differ</p>"
                    continue
                out[(shard_id, ex.key)] = render_item(ex, x, y)
        except Exception as exc:  # one unreadable shard must not sink the report
            logger.warning("clean vs protected for %s: %s", shard_id, exc)
            for ex in shard_items:
                out.setdefault(
                    (shard_id, ex.key),
                    f"<p class='warn'>{html.escape(type(exc).__name__)}: {html.escape(str(exc))}</p>",
                )
    return out


def _no_clean_note(data: OutputData, what: str) -> str:
    return (
        f"<p class='note'>Pass <code>--clean</code> with the input shards {html.escape(what)}: the output "
        "folder has no <code>_config.yaml</code> naming them (io.input).</p>"
    )


def examples_section(data: OutputData, clean_url: str | None, n: int, storage_options: Mapping[str, Any] | None) -> str:
    parts = ["<h2 id='spectrograms'>Clean vs protected</h2>"]
    examples = pick_examples(data, n)
    if not clean_url:
        parts.append(_no_clean_note(data, "to compare clean and protected audio"))
        return "\n".join(parts)
    if not examples:
        parts.append("<p class='note'>No written ok item to show.</p>")
        return "\n".join(parts)

    def spectrograms(ex: Example, x: Any, y: Any) -> str:
        title = f"{ex.shard_id} / {ex.key}: Δe {ex.delta_e:.3f}, SNR {ex.snr_db:.1f} dB ({ex.why or 'sample'})"
        return _img(spectrogram_figure(x.samples, y.samples, x.sample_rate, title), title)

    figures = render_items(data, clean_url, examples, storage_options, spectrograms)
    parts.append(
        f"<p class='note'>First {SPECTRO_SECONDS:g} s of each track, channels averaged. "
        "δ's panel has its own colour scale. Dashed lines: where MusicLDM's and CLAP's mel front ends "
        "stop; δ above them never reaches that model.</p>"
    )
    for ex in examples:
        where = html.escape(f"{ex.shard_id}, {ex.why or 'sample'}")
        parts.append(f"<h3>{html.escape(ex.key)} <span class='note'>({where})</span></h3>")
        parts.append(figures.get((ex.shard_id, ex.key), ""))
    return "\n".join(parts)


def flac_clip(samples: np.ndarray, rate: int, subtype: str = "PCM_16") -> bytes:
    """[samples, channels] float32 -> FLAC bytes (PCM_16, or PCM_24 for sources finer than 16 bits)."""
    import soundfile as sf

    buffer = io.BytesIO()
    sf.write(buffer, np.clip(samples, -1.0, 1.0), rate, format="FLAC", subtype=subtype)
    return buffer.getvalue()


def audio_player(data: bytes, label: str) -> str:
    """One labelled HTML <audio> element with `data` (FLAC) embedded as base64."""
    b64 = base64.b64encode(data).decode("ascii")
    return (
        f"<div><span class='label'>{html.escape(label)}</span>"
        f"<audio controls preload='metadata' src='data:audio/flac;base64,{b64}'></audio></div>"
    )


def clip_bounds(n_samples: int, rate: int, clip_seconds: float, start_s: float | None) -> tuple[int, int]:
    """(start, stop) samples of a clip of `clip_seconds` from `start_s` (None: centred in the track),
    moved back inside a shorter track; the whole track when it is shorter than the clip."""
    length = min(n_samples, max(1, round(clip_seconds * rate)))
    start = round(start_s * rate) if start_s is not None else (n_samples - length) // 2
    start = min(max(0, start), n_samples - length)
    return start, start + length


def listening_section(
    data: OutputData,
    clean_url: str | None,
    n: int,
    clip_seconds: float,
    storage_options: Mapping[str, Any] | None,
    budget_bytes: int = LISTEN_BUDGET_BYTES,
) -> str:
    """A/B players (clean, protected) of the lowest-MOS-LQO and lowest-Δe items, FLAC clips of
    `clip_seconds`, at most `budget_bytes` of audio in all."""
    parts = ["<h2 id='listen'>Listen: clean (A) vs protected (B)</h2>"]
    items = pick_listening(data, n, clip_seconds)
    if n <= 0:
        parts.append("<p class='note'>Listening clips switched off (--listen 0).</p>")
        return "\n".join(parts)
    if not clean_url:
        parts.append(_no_clean_note(data, "to listen to clean and protected clips"))
        return "\n".join(parts)
    if not items:
        parts.append("<p class='note'>No written ok item to play.</p>")
        return "\n".join(parts)
    spent = [0]

    def players(ex: Example, x: Any, y: Any) -> str:
        rate = x.sample_rate
        n_samples = min(x.samples.shape[0], y.samples.shape[0])
        start, stop = clip_bounds(n_samples, rate, clip_seconds, ex.clip_start_s)
        subtype = "PCM_16" if x.subtype in ("PCM_16", "PCM_S8", "PCM_U8") and y.subtype == x.subtype else "PCM_24"
        a = flac_clip(x.samples[start:stop], rate, subtype)
        b = flac_clip(y.samples[start:stop], rate, subtype)
        if spent[0] + len(a) + len(b) > budget_bytes:
            return "<p class='note'>Left out: the page's audio budget is spent.</p>"
        spent[0] += len(a) + len(b)
        span = f"{start / rate:.1f}–{stop / rate:.1f} s of {n_samples / rate:.1f} s, {rate:,} Hz, FLAC {subtype}"
        return (
            f"<div class='ab'>{audio_player(a, 'A · clean')}{audio_player(b, 'B · protected')}"
            f"<span class='note'>{html.escape(span)}</span></div>"
        )

    clips = render_items(data, clean_url, items, storage_options, players)
    parts.append(
        f"<p class='note'>Clips of {clip_seconds:g} s, lossless (FLAC), cut from the clean input member and the "
        "written output member at the same samples. Lowest MOS-LQO items play the middle of their worst ViSQOL "
        "excerpt; lowest Δe items the middle of the track. Listen on headphones at a normal level.</p>"
    )
    for ex in items:
        figures = f"MOS-LQO {_fmt(ex.moslqo, 2)}, Δe {_fmt(ex.delta_e)}, SNR {_fmt(ex.snr_db)} dB"
        where = html.escape(f"{ex.shard_id}, {ex.why}; {figures}")
        parts.append(f"<h3>{html.escape(ex.key)} <span class='note'>({where})</span></h3>")
        parts.append(clips.get((ex.shard_id, ex.key), ""))
    return "\n".join(parts)


def visqol_section(data: OutputData, top: int) -> str:
    """ViSQOL MOS-LQO against the target: histogram, measured / total, percentiles, lowest items."""
    c = data.columns
    ok = c["status"] == "ok"
    mos = data.floats("visqol_moslqo")
    measured = ok & data.flags("visqol_measured") & np.isfinite(mos)
    total, n = int(ok.sum()), int(measured.sum())
    parts = [f"<h2 id='visqol'>Listening quality: ViSQOL MOS-LQO against the target ({MOS_TARGET:g})</h2>"]
    parts.append(
        "<p class='note'>ViSQOL v3, audio mode (48 kHz mono down-mix, protected against clean; 4.73 = "
        "indistinguishable). Each measured item's figure is its worst (lowest) excerpt; "
        "<code>visqol_excerpt_starts_s</code> says which excerpts were scored. Items are measured on a "
        "sample chosen by a hash of the key (<code>quality.visqol</code>, <code>visqol_share</code>).</p>"
    )
    if not n:
        parts.append(
            f"<p class='note'>No item has a ViSQOL figure (0 of {total:,} ok items measured): "
            "<code>quality.visqol</code> was off, or the manifests predate the column.</p>"
        )
        return "\n".join(parts)
    values = mos[measured]
    parts.append(_img(mos_figure(values, n, total), "MOS-LQO histogram"))
    below = int(np.sum(values < MOS_TARGET))
    parts.append(
        html_table(
            ["", "value"],
            [
                ["ok items measured", f"{n:,} of {total:,} ({n / max(1, total):.1%})"],
                [f"measured items with MOS-LQO ≥ {MOS_TARGET:g} (target)", f"{n - below:,} ({1 - below / n:.1%})"],
                [f"measured items with MOS-LQO ≥ {MOS_HIGH:g}", f"{int(np.sum(values >= MOS_HIGH)):,}"],
            ],
            numeric=[False, True],
        )
    )
    parts.append(
        html_table(
            ["", "n", "min", "p5", "median", "p95", "max", "mean"],
            [["MOS-LQO (worst excerpt per item)", *_percentiles(values)]],
        )
    )
    idx = np.flatnonzero(measured)
    lowest = idx[np.argsort(mos[idx], kind="stable")][:top]
    starts, segsnr = data.lists("visqol_excerpt_starts_s"), data.floats("segsnr_db")
    parts.append(f"<h3>Lowest MOS-LQO (top {top})</h3>")
    parts.append(
        html_table(
            ["shard", "key", "MOS-LQO", "excerpts at (s)", "Δe mean", "SNR dB", "seg. SNR dB", "format"],
            [
                [
                    c["shard_id"][i],
                    c["key"][i],
                    float(mos[i]),
                    ", ".join(f"{v:.1f}" for v in starts[i]),
                    float(c["delta_e_mean"][i]),
                    float(c["snr_db"][i]),
                    float(segsnr[i]),
                    c["output_format"][i],
                ]
                for i in lowest
            ],
            numeric=[False, False, True, False, True, True, True, False],
        )
    )
    return "\n".join(parts)


def render(
    data: OutputData,
    clean_url: str | None = None,
    examples: int = 3,
    top: int = 15,
    target: float | None = None,
    storage_options: Mapping[str, Any] | None = None,
    listen: int = LISTEN_ITEMS,
    clip_seconds: float = CLIP_SECONDS,
) -> str:
    """The whole HTML page. The clean input is `clean_url` if given, else the run's io.input from
    its `_config.yaml` (read with the same `storage_options`)."""
    c, s = data.columns, data.stats
    target = data.target if target is None else target
    clean_source = "--clean" if clean_url else "_config.yaml io.input"
    clean_url = clean_url or data.clean_input
    status = c["status"]
    ok = status == "ok"
    parts: list[str] = []
    encoders = data.encoder_ids
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts.append("<h1>Music Unlearnable: protection report</h1>")
    parts.append(
        f"<p class='meta'>output <code>{html.escape(data.url)}</code> · generated {now} · "
        f"encoder {html.escape(', '.join(encoders) or '?')} · config {html.escape(s.config_hash or '?')}"
        + (f" · clean input <code>{html.escape(clean_url)}</code> ({clean_source})" if clean_url else "")
        + "</p>"
    )
    if any(e.startswith("random:") for e in encoders):
        parts.append(
            "<div class='banner'>Random CLAP weights were used (encoder "
            + html.escape(", ".join(e for e in encoders if e.startswith("random:")))
            + "): these outputs protect nothing. The figures below show the machinery runs; they say nothing "
            "about protection against a real CLAP-conditioned model.</div>"
        )
    if data.orphans:
        parts.append(
            f"<p class='warn'>{len(data.orphans)} manifest(s) without a completion marker "
            f"(interrupted shards, left out): {html.escape(', '.join(data.orphans[:10]))}"
            f"{' …' if len(data.orphans) > 10 else ''}</p>"
        )

    de = c["delta_e_mean"].astype(float)
    de_min = c["delta_e_min"].astype(float)
    reached = int(np.sum(ok & (de_min >= target)))
    mos = data.floats("visqol_moslqo")
    mos_measured = ok & data.flags("visqol_measured") & np.isfinite(mos)
    mos_n = int(mos_measured.sum())
    mos_share = f"{np.mean(mos[mos_measured] >= MOS_TARGET):.1%} of {mos_n:,}" if mos_n else "–"
    cards = [
        ("shards", f"{len(data.shards):,}"),
        ("items", f"{s.items:,}"),
        ("ok", f"{s.ok:,}"),
        ("errors", f"{s.error:,}"),
        ("audio", _duration(s.audio_seconds)),
        ("windows", f"{s.windows:,}"),
        ("Δe mean", _fmt(s.delta_e_mean)),
        (f"Δe min ≥ {target:g}", f"{reached / max(1, int(ok.sum())):.1%}"),
        (f"MOS-LQO ≥ {MOS_TARGET:g}", mos_share),
        (
            "accel. s / audio s",
            _fmt(s.accelerator_seconds / s.audio_seconds if s.audio_seconds else float("nan")),
        ),
    ]
    parts.append(
        "<div class='cards'>"
        + "".join(
            f"<div class='card'><div class='v'>{html.escape(v)}</div><div class='k'>{html.escape(k)}</div></div>"
            for k, v in cards
        )
        + "</div>"
    )
    parts.append(
        html_table(
            ["", "count"],
            [
                ["items", s.items],
                ["ok", s.ok],
                ["error", s.error],
                ["  passthrough (original bytes written)", s.passthrough],
                ["  dropped (left out of the output)", s.dropped],
                ["ok items with Δe min under the target", s.delta_e_below_target],
                ["accelerator seconds", s.accelerator_seconds],
                ["writer wall seconds (summed over shards)", s.wall_seconds],
            ],
        )
    )

    parts.append(f"<h2 id='delta-e'>Δe against the target ({target:g})</h2>")
    if np.isfinite(de[ok]).any():
        parts.append(_img(delta_e_figure(de[ok], de_min[ok], target), "Δe histogram"))
        parts.append(
            html_table(
                ["", "n", "min", "p5", "median", "p95", "max", "mean"],
                [["Δe mean", *_percentiles(de[ok])], ["Δe min (worst window)", *_percentiles(de_min[ok])]],
            )
        )
    else:
        parts.append("<p class='note'>No ok item with a Δe.</p>")

    parts.append(visqol_section(data, top))

    parts.append("<h2 id='quality'>Quality of δ and PGD effort</h2>")
    quality = [
        n for n in (*BASE_QUALITY, *data.extra_columns) if n in c and n not in NOT_QUALITY and _finite(c[n][ok]).size
    ]
    quality.append("seconds")
    parts.append(_img(quality_figure({n: c[n][ok] for n in quality}, quality), "quality distributions"))
    parts.append(
        html_table(
            ["metric", "n", "min", "p5", "median", "p95", "max", "mean"],
            [[QUALITY_LABELS.get(n, n), *_percentiles(c[n][ok])] for n in quality],
            numeric=[False, *([True] * 7)],
        )
    )

    ok_idx = np.flatnonzero(ok)
    seconds = c["seconds"].astype(float)
    duration = c["duration_s"].astype(float)
    parts.append(f"<h2 id='slowest'>Slowest items (top {top} by accelerator seconds)</h2>")
    slow = ok_idx[np.argsort(-np.nan_to_num(seconds[ok_idx], nan=-1.0), kind="stable")][:top]
    parts.append(
        html_table(
            ["shard", "key", "duration s", "accel. s", "s per audio s", "windows", "steps/window", "Δe mean"],
            [
                [
                    c["shard_id"][i],
                    c["key"][i],
                    duration[i],
                    seconds[i],
                    seconds[i] / duration[i] if duration[i] else float("nan"),
                    int(c["n_windows"][i]),
                    float(c["steps_mean"][i]),
                    float(de[i]),
                ]
                for i in slow
            ],
        )
    )
    parts.append(f"<h2 id='worst'>Worst items (top {top} by lowest Δe mean)</h2>")
    worst = ok_idx[np.argsort(np.nan_to_num(de[ok_idx], nan=-1.0), kind="stable")][:top]
    parts.append(
        html_table(
            ["shard", "key", "Δe mean", "Δe min", "cos", "SNR dB", "L∞", "steps/window", "format"],
            [
                [
                    c["shard_id"][i],
                    c["key"][i],
                    float(de[i]),
                    float(de_min[i]),
                    float(c["cos_mean"][i]),
                    float(c["snr_db"][i]),
                    float(c["linf"][i]),
                    float(c["steps_mean"][i]),
                    c["output_format"][i],
                ]
                for i in worst
            ],
        )
    )

    parts.append("<h2 id='errors'>Errors</h2>")
    err_idx = np.flatnonzero(status == "error")
    if err_idx.size:
        kinds: Counter[str] = Counter()
        example: dict[str, tuple[str, str, str]] = {}
        outcome: dict[str, Counter[str]] = {}
        for i in err_idx:
            message = str(c["error"][i])
            kind = _error_kind(message)
            kinds[kind] += 1
            example.setdefault(kind, (str(c["shard_id"][i]), str(c["key"][i]), message[:200]))
            level = "shard" if c["key"][i] == "__shard__" else ("passthrough" if c["written"][i] else "dropped")
            outcome.setdefault(kind, Counter())[level] += 1
        parts.append(
            html_table(
                [
                    "kind",
                    "count",
                    "share",
                    "passthrough",
                    "dropped",
                    "shard-level",
                    "example shard",
                    "example key",
                    "example message",
                ],
                [
                    [
                        k,
                        n,
                        f"{n / err_idx.size:.1%}",
                        outcome[k]["passthrough"],
                        outcome[k]["dropped"],
                        outcome[k]["shard"],
                        *example[k],
                    ]
                    for k, n in kinds.most_common()
                ],
                numeric=[False, True, True, True, True, True, False, False, False],
            )
        )
    else:
        parts.append("<p class='note'>No errors.</p>")

    parts.append(examples_section(data, clean_url, examples, storage_options))
    parts.append(listening_section(data, clean_url, listen, clip_seconds, storage_options))

    parts.append("<h2 id='robustness'>Robustness</h2>")
    if data.robustness_table is not None:
        t = data.robustness_table
        rows = [list(r.values()) for r in t.to_pylist()]
        parts.append("<p class='note'>robustness.parquet</p>" + html_table(t.column_names, rows))
    if data.robustness_md:
        parts.append("<p class='note'>robustness.md</p>" + markdown_to_html(data.robustness_md))
    if data.robustness_table is None and not data.robustness_md:
        parts.append("<p class='note'>No robustness.parquet or robustness.md at the output root.</p>")

    if data.config_text:
        parts.append(
            "<h2 id='config'>Configuration</h2><details><summary>_config.yaml</summary><pre>"
            + html.escape(data.config_text)
            + "</pre></details>"
        )
    body = "\n".join(parts)
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>Protection report: {html.escape(data.url)}</title><style>{CSS}</style></head>"
        f"<body>\n{body}\n</body></html>\n"
    )


# ------------------------------------------------------------------------------------------- CLI


def storage_options_from(args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.config import StorageConfig, load_config

    storage = load_config(args.config).io.storage if args.config else StorageConfig()
    storage = StorageConfig(
        endpoint_url=args.endpoint_url or storage.endpoint_url,
        region=args.region or storage.region,
        addressing_style=args.addressing_style or storage.addressing_style,
        anon=args.anon or storage.anon,
    )
    return storage.storage_options()


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Arguments of `unlearnable report` (pass a subparser to add them to it)."""
    p = parser or argparse.ArgumentParser(prog="unlearnable report", description=__doc__.split("\n\n")[0])
    p.add_argument("--output", required=True, help="the run's output folder (local or s3://bucket/prefix/)")
    p.add_argument("--out", default="report.html", help="HTML file to write (local path or s3://…)")
    p.add_argument(
        "--clean",
        help="the input shards (folder, s3:// prefix, glob) for spectrograms and A/B clips "
        "(default: io.input of the run's _config.yaml)",
    )
    p.add_argument("--examples", type=int, default=3, help="items with spectrograms (lowest, median, highest Δe, …)")
    p.add_argument(
        "--listen", type=int, default=LISTEN_ITEMS, help="items with A/B clips per list (lowest MOS-LQO, lowest Δe)"
    )
    p.add_argument("--clip-seconds", type=float, default=CLIP_SECONDS, help="length of each A/B clip, seconds")
    p.add_argument("--top", type=int, default=15, help="rows of the slowest / worst tables")
    p.add_argument("--target", type=float, help="Δe target (default: attack.target_delta_e of _config.yaml, else 0.5)")
    p.add_argument("--config", help="YAML config whose io.storage section gives the S3 client settings")
    p.add_argument("--endpoint-url", help="S3 endpoint, e.g. http://127.0.0.1:8333")
    p.add_argument("--region", help="S3 region")
    p.add_argument("--addressing-style", choices=["path", "virtual"], help="S3 addressing style")
    p.add_argument("--anon", action="store_true", help="anonymous S3 access")
    p.set_defaults(func=cmd_report)
    return p


def cmd_report(args: argparse.Namespace) -> int:
    options = storage_options_from(args)
    data = load_output(args.output, options)
    page = render(
        data,
        clean_url=args.clean,
        examples=args.examples,
        top=args.top,
        target=args.target,
        storage_options=options,
        listen=args.listen,
        clip_seconds=args.clip_seconds,
    )
    with open_url(args.out, "wb", options) as f:
        f.write(page.encode("utf-8"))
    print(
        f"{args.out}: {len(data.shards)} shard(s), {data.n_rows} manifest row(s), "
        f"Δe mean {data.stats.delta_e_mean:.3f}, {len(page) / 1e6:.1f} MB"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return cmd_report(args)
    except ReportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
