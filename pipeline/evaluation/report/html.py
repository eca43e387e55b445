"""The report's page: CSS and `render`, the whole self-contained HTML document."""

from __future__ import annotations

import base64
import datetime as dt
import html
from collections import Counter
from collections.abc import Mapping
from typing import Any

import numpy as np

from pipeline.evaluation.report.figures import delta_e_figure, finite, img, quality_figure
from pipeline.evaluation.report.read import (
    BASE_QUALITY,
    CLIP_SECONDS,
    LISTEN_ITEMS,
    MOS_TARGET,
    NOT_QUALITY,
    QUALITY_LABELS,
    OutputData,
)
from pipeline.evaluation.report.sections import examples_section, listening_section, visqol_section
from pipeline.evaluation.report.tables import fmt, fmt_duration, html_table, markdown_to_html, percentiles
from pipeline.records import SampleStatus, error_kind

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
    ok = status == SampleStatus.OK
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
        (str(SampleStatus.OK), f"{s.ok:,}"),
        ("errors", f"{s.error:,}"),
        ("audio", fmt_duration(s.audio_seconds)),
        ("windows", f"{s.windows:,}"),
        ("Δe mean", fmt(s.delta_e_mean)),
        (f"Δe min ≥ {target:g}", f"{reached / max(1, int(ok.sum())):.1%}"),
        (f"MOS-LQO ≥ {MOS_TARGET:g}", mos_share),
        (
            "accel. s / audio s",
            fmt(s.accelerator_seconds / s.audio_seconds if s.audio_seconds else float("nan")),
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
                [str(SampleStatus.OK), s.ok],
                [str(SampleStatus.ERROR), s.error],
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
        parts.append(img(delta_e_figure(de[ok], de_min[ok], target), "Δe histogram"))
        parts.append(
            html_table(
                ["", "n", "min", "p5", "median", "p95", "max", "mean"],
                [["Δe mean", *percentiles(de[ok])], ["Δe min (worst window)", *percentiles(de_min[ok])]],
            )
        )
    else:
        parts.append("<p class='note'>No ok item with a Δe.</p>")

    parts.append(visqol_section(data, top))

    parts.append("<h2 id='quality'>Quality of δ and PGD effort</h2>")
    quality = [
        n for n in (*BASE_QUALITY, *data.extra_columns) if n in c and n not in NOT_QUALITY and finite(c[n][ok]).size
    ]
    quality.append("seconds")
    parts.append(img(quality_figure({n: c[n][ok] for n in quality}, quality), "quality distributions"))
    parts.append(
        html_table(
            ["metric", "n", "min", "p5", "median", "p95", "max", "mean"],
            [[QUALITY_LABELS.get(n, n), *percentiles(c[n][ok])] for n in quality],
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
    err_idx = np.flatnonzero(status == SampleStatus.ERROR)
    if err_idx.size:
        kinds: Counter[str] = Counter()
        example: dict[str, tuple[str, str, str]] = {}
        outcome: dict[str, Counter[str]] = {}
        for i in err_idx:
            message = str(c["error"][i])
            kind = error_kind(message)
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
    if data.robustness_md:
        parts.append("<p class='note'>robustness.md</p>" + markdown_to_html(data.robustness_md))
    if data.robustness_png:
        b64 = base64.b64encode(data.robustness_png).decode("ascii")
        parts.append(img(b64, "Δe retained per attack and run"))
    if data.robustness_table is not None:
        t = data.robustness_table
        rows = [list(r.values()) for r in t.to_pylist()]
        parts.append(
            f"<details><summary>robustness.parquet ({t.num_rows} rows: run × item × attack)</summary>"
            + html_table(t.column_names, rows)
            + "</details>"
        )
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
