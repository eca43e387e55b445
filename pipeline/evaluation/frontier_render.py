"""`unlearnable frontier`'s outputs: the summary per case, frontier.md, frontier.png (matplotlib,
the evaluation extra) and rows.parquet."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.evaluation.extra import require

if TYPE_CHECKING:
    from pipeline.evaluation.frontier import CatalogTrack, FrontierRow, ResolvedCase

GOOD_MOS = 4.0  # MOS-LQO at or above this counts as "good" in the share column
TARGET_LINES_MOS = (4.0, 4.5)


def _median(values: list[float]) -> float:
    finite = [v for v in values if np.isfinite(v)]
    return float(np.median(finite)) if finite else float("nan")


def _min(values: list[float]) -> float:
    finite = [v for v in values if np.isfinite(v)]
    return float(np.min(finite)) if finite else float("nan")


def _share_good(values: list[float]) -> float:
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean([v >= GOOD_MOS for v in finite])) if finite else float("nan")


def _fmt(value: float, digits: int = 2) -> str:
    return "–" if not np.isfinite(value) else f"{value:.{digits}f}"


def _percent(share: float) -> str:
    return "–" if not np.isfinite(share) else f"{100 * share:.0f} %"


def summary(rows: list[FrontierRow], cases: list[ResolvedCase]) -> list[dict[str, Any]]:
    """Per case: median/min MOS-LQO, share ≥ 4.0, medians of Δe (both views), NMR dB and SNR dB."""
    out = []
    for resolved in cases:
        mine = [r for r in rows if r.case == resolved.case.label]
        ok = [r for r in mine if not r.error]
        out.append(
            {
                "case": resolved.case.label,
                "mode": resolved.mode,
                "level": resolved.level,
                "excerpts": len(ok),
                "errors": len(mine) - len(ok),
                "mos_median": _median([r.visqol_moslqo for r in ok]),
                "mos_min": _min([r.visqol_moslqo for r in ok]),
                "share_good": _share_good([r.visqol_moslqo for r in ok]),
                "delta_e_median": _median([r.delta_e for r in ok]),
                "delta_e_musicldm_median": _median([r.delta_e_musicldm for r in ok]),
                "nmr_db_median": _median([r.nmr_db for r in ok]),
                "snr_db_median": _median([r.snr_db for r in ok]),
                "mos_band_limited": _median([r.visqol_moslqo for r in ok if r.full_band is False]),
                "mos_full_band": _median([r.visqol_moslqo for r in ok if r.full_band is True]),
            }
        )
    return out


def render_markdown(
    rows: list[FrontierRow],
    cases: list[ResolvedCase],
    tracks: list[CatalogTrack],
    settings: dict[str, Any],
    random_encoder: bool,
    encoder_ids: list[str],
) -> str:
    """frontier.md: settings, the per-case table, band-limited vs full-band MOS, the per-track table."""
    lines = ["# Quality vs efficacy frontier", ""]
    if random_encoder:
        lines += [
            "> **RANDOM ENCODER WEIGHTS.** These Δe figures show the mechanism (how far δ moves a CLAP "
            "of this architecture), not protection against a real CLAP. The ViSQOL figures are real.",
            "",
        ]
    lines += [
        f"- encoder(s): {', '.join(encoder_ids)}",
        *(f"- {name}: {value}" for name, value in settings.items()),
        f"- ViSQOL v3 audio mode, MOS-LQO 1-4.73 (4.73: indistinguishable from the clean excerpt); "
        f"good: ≥ {GOOD_MOS:g}",
        "- Δe: fp32 ‖CLAP(x+δ) − CLAP(x)‖₂ of the audio as written; clean 48 kHz view and MusicLDM's view "
        "(16 kHz, 8 kHz band)",
        "",
        "## Per case",
        "",
        "| case | mode | level | excerpts | median MOS | min MOS | share ≥ 4.0 | median Δe | median Δe MusicLDM "
        "| median NMR dB | median SNR dB | errors |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    table = summary(rows, cases)
    for s in table:
        lines.append(
            f"| {s['case']} | {s['mode']} | {s['level']:g} | {s['excerpts']} | {_fmt(s['mos_median'])} "
            f"| {_fmt(s['mos_min'])} | {_percent(s['share_good'])} | {_fmt(s['delta_e_median'], 3)} "
            f"| {_fmt(s['delta_e_musicldm_median'], 3)} | {_fmt(s['nmr_db_median'], 1)} "
            f"| {_fmt(s['snr_db_median'], 1)} | {s['errors']} |"
        )
    if any(t.full_band is not None for t in tracks):
        lines += [
            "",
            "## Band-limited vs full-band tracks (median MOS-LQO)",
            "",
            "Band-limited: catalog.json's measured bandwidth (60 dB below the peak) under 18 kHz. ViSQOL is "
            "harsh on δ in bands where the clean track is empty.",
            "",
            "| case | band-limited | full-band |",
            "|---|---:|---:|",
        ]
        for s in table:
            lines.append(f"| {s['case']} | {_fmt(s['mos_band_limited'])} | {_fmt(s['mos_full_band'])} |")
    labels = [c.case.label for c in cases]
    lines += [
        "",
        "## Per track (median MOS-LQO / median Δe clean view over the track's excerpts)",
        "",
        "| track | genre | bandwidth kHz | " + " | ".join(labels) + " |",
        "|---|---|---:|" + "---:|" * len(labels),
    ]
    for track in tracks:
        cells = []
        for label in labels:
            mine = [r for r in rows if r.case == label and r.track == track.path.name and not r.error]
            mos = _median([r.visqol_moslqo for r in mine])
            cells.append(f"{_fmt(mos)} / {_fmt(_median([r.delta_e for r in mine]), 3)}")
        bandwidth = _fmt(track.bandwidth_hz / 1000, 1)
        lines.append(f"| {track.path.name} | {track.genre or '–'} | {bandwidth} | " + " | ".join(cells) + " |")
    errors = [r for r in rows if r.error]
    if errors:
        lines += ["", "## Errors", ""] + [f"- {r.case} {r.track}@{r.position:g}: {r.error}" for r in errors]
    return "\n".join(lines) + "\n"


def render_figure(
    rows: list[FrontierRow], cases: list[ResolvedCase], path: Path, target_delta_e: float, random_encoder: bool
) -> None:
    """frontier.png: median Δe (clean view | MusicLDM view) against the median MOS-LQO (top row) and
    the worst excerpt's MOS-LQO (bottom row), one line per mode through its levels; MOS lines at
    4.0/4.5, and the Δe target where early stopping was on (target ≤ 2, the largest possible Δe)."""
    Figure = require("matplotlib.figure", "unlearnable frontier").Figure

    table = summary(rows, cases)
    fig = Figure(figsize=(12, 9), dpi=100, layout="constrained")
    columns = [("delta_e_median", "clean 48 kHz view"), ("delta_e_musicldm_median", "MusicLDM view")]
    quality = [("mos_median", "median"), ("mos_min", "worst excerpt's")]
    modes = list(dict.fromkeys(s["mode"] for s in table))
    for row, (mos_key, mos_label) in enumerate(quality):
        for col, (column, view) in enumerate(columns):
            ax = fig.add_subplot(2, 2, 2 * row + col + 1)
            for mode in modes:
                points = sorted((s for s in table if s["mode"] == mode), key=lambda s: s["level"])
                x = [s[column] for s in points]
                y = [s[mos_key] for s in points]
                ax.plot(x, y, marker="o", label=mode)
                for s, xi, yi in zip(points, x, y):
                    if np.isfinite(xi) and np.isfinite(yi):
                        text = f"s{s['level']:g}" if mode == "spectral" else f"{s['level']:g}"
                        ax.annotate(text, (xi, yi), textcoords="offset points", xytext=(4, -10), fontsize=7)
            for mos in TARGET_LINES_MOS:
                ax.axhline(mos, color="grey", linestyle="--", linewidth=1)
            xs = [s[column] for s in table if np.isfinite(s[column])]
            ys = [s[mos_key] for s in table if np.isfinite(s[mos_key])]
            right = max(xs, default=0.1)
            if target_delta_e <= 2.0:
                target_label = f"Δe target {target_delta_e:g}"
                ax.axvline(target_delta_e, color="black", linestyle=":", linewidth=1.2, label=target_label)
                right = max(right, target_delta_e)
            ax.set_xlim(0.0, 1.15 * right)
            ax.set_ylim(min([*ys, min(TARGET_LINES_MOS)]) - 0.15, 4.8)  # MOS-LQO tops out at 4.73
            ax.set_xlabel(f"median Δe, {view}")
            ax.set_ylabel(f"{mos_label} ViSQOL MOS-LQO")
            ax.grid(alpha=0.3)
            ax.legend(loc="lower left", fontsize=8)
    title = "Quality vs efficacy (points: ε for linf/masking, strength s1-s5 for spectral)"
    if random_encoder:
        title = "RANDOM ENCODER WEIGHTS: Δe shows the mechanism, not real protection\n" + title
    fig.suptitle(title)
    fig.savefig(path, format="png")


def write_outputs(out: Path, rows: list[FrontierRow], markdown: str, cases: list[ResolvedCase], random: bool) -> None:
    """rows.parquet, frontier.md and frontier.png in `out`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist([asdict(r) for r in rows]), out / "rows.parquet")
    (out / "frontier.md").write_text(markdown)
    render_figure(rows, cases, out / "frontier.png", cases[0].cfg.attack.target_delta_e, random)
