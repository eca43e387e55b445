"""The benchmark's result tables as Markdown: one function per section, `render_tables` (what a
run prints) puts them together; the whole page around them is `page.render_markdown`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from pipeline.bench.common import minutes
from pipeline.bench.results import (
    HTSAT_BASE_GFLOP_FORWARD,
    HTSAT_BASE_GFLOP_STEP,
    BenchReport,
    EngineResult,
    EnsembleResult,
)


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _f(value: float, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and (math.isnan(value) or math.isinf(value))):
        return "–"
    return f"{value:.{digits}f}"


def _find_engine(report: BenchReport, amodel: str, precision: str, batch: int) -> EngineResult | None:
    return next(
        (
            e
            for e in report.engine
            if e.amodel == amodel and e.precision == precision and e.batch == batch and not e.compiled
        ),
        None,
    )


def render_engine(report: BenchReport) -> list[str]:
    """The engine table (one row per model, precision and batch)."""
    s = report.settings
    out: list[str] = []
    out.append(f"### Engine (`core.engine.pgd`, in-memory 48 kHz mono windows, {s.steps} PGD steps, early stop off)\n")
    rows = []
    for e in report.engine:
        rows.append(
            [
                e.amodel,
                e.precision + (" + compile" if e.compiled else ""),
                e.batch,
                _f(e.seconds),
                _f(e.windows_per_s, 3),
                _f(e.steps_per_s, 2),
                _f(e.realtime, 2),
            ]
        )
    out.append(
        _table(
            [
                "model",
                "precision",
                "batch",
                "s / call (median)",
                "windows/s",
                "PGD steps/s",
                "× realtime",
            ],
            rows,
        )
    )
    out.append(
        "\nA call = clean forward + steps × (forward + backward w.r.t. δ) + scoring forward, "
        "on B windows. "
        "PGD steps/s counts window-steps (B per batched step). × realtime = windows/s × 10 s."
    )
    return out


def render_baseline(report: BenchReport) -> list[str]:
    """The baseline table: laion-clap's loop and the engine's speedup over it."""
    s = report.settings
    out: list[str] = []
    out.append(
        f"\n### Baseline vs engine (laion-clap `CLAP.get_audio_embedding`, one window at a time, fp32, "
        f"weights not frozen, {s.steps} steps)\n"
    )
    rows = []
    for b in report.baseline:
        same = _find_engine(report, b.amodel, "fp32", 1)
        engines = [e for e in report.engine if e.amodel == b.amodel and not e.compiled]
        best = max(engines, key=lambda e: e.windows_per_s) if engines else None
        rows.append(
            [
                b.amodel,
                _f(b.seconds_per_window),
                _f(b.windows_per_s, 3),
                (_f(same.windows_per_s / b.windows_per_s) + "×") if same else "–",
                f"{_f(best.windows_per_s / b.windows_per_s)}× ({best.precision}, B={best.batch})" if best else "–",
                (("met" if best.windows_per_s / b.windows_per_s >= 2 else "NOT met") if best else "–"),
            ]
        )
    out.append(
        _table(
            [
                "model",
                "baseline s / window",
                "baseline windows/s",
                "speedup, engine fp32 B=1",
                "speedup, best engine",
                "target ≥ 2×",
            ],
            rows,
        )
    )
    return out


def render_pipeline(report: BenchReport) -> list[str]:
    """The pipeline table: windows/s and efficiency against the engine reference."""
    s = report.settings
    out: list[str] = []
    p0 = report.pipeline[0]
    out.append(
        f"\n### Pipeline (Ray Data, tar shards on disk → written shards + manifests; "
        f"{p0.tracks} tracks × 10 s "
        f"44.1 kHz stereo FLAC, {p0.shards} shards of {p0.batch}, batch {p0.batch}, {p0.steps} steps)\n"
    )
    rows = []
    for p in report.pipeline:
        verdict = ("met" if p.efficiency >= 0.9 else "NOT met") if p.placement == "dedicated" else "(context)"
        rows.append(
            [
                p.amodel,
                p.precision,
                p.placement,
                p.actor_threads,
                p.windows,
                _f(p.wall_seconds, 1),
                _f(p.windows_per_s, 3),
                _f(p.engine_windows_per_s, 3),
                f"**{_f(p.efficiency, 3)}** {verdict}",
                f"{_f(p.efficiency_equivalent)} (+{p.extra_forwards} fwd)",
            ]
        )
    out.append(
        _table(
            [
                "model",
                "precision",
                "placement",
                "actor threads",
                "windows",
                "wall s",
                "windows/s (steady)",
                "engine windows/s (same threads)",
                "efficiency (target ≥ 0.9)",
                "efficiency, engine-equivalent",
            ],
            rows,
        )
    )
    out.append(
        "\nEach row has its own engine reference, timed in this section just before the pipeline "
        f"run: `pgd` on in-memory 48 kHz mono windows at the same steps, batch, precision and torch "
        f"threads ({s.pipeline_repeats} timed call(s) after a 1-step warm-up). "
        "*dedicated*: the actor's cores are its own (on CPU `runtime.num_cpus_per_actor` = torch "
        "threads = cores − 1, and Ray schedules the decode, quality, encode and write tasks on the "
        "remaining core; on a GPU node the accelerator is the GPU); this is the placement the ≥ 0.9 "
        "target is about. *shared* (CPU only): the actor's torch threads use every core, so each CPU "
        "stage preempts one of its OpenMP threads and the other waits at the next barrier; shown for "
        "context, it is the faster setting in absolute windows/s only when the engine scales well "
        "with cores. wall = `run(cfg)` with Ray already up (listing, actor start-up, encoder build "
        "included); steady = first → last committed shard; efficiency = steady ÷ engine. The pipeline "
        "also measures the audio as written with fp32 no-grad forwards the engine does not run "
        "(written audio; clean audio again in bf16; MusicLDM view of both): *engine-equivalent* "
        "credits them as work, (1/engine + n_fwd·t_fwd) × pipeline windows/s, t_fwd timed at the same "
        "threads."
    )
    return out


def render_layouts(report: BenchReport) -> list[str]:
    """The layouts table: the same audio as shards, a file tree and Parquet, throughput ratios."""
    base = next((r for r in report.layouts if r.layout == "shards"), report.layouts[0])
    first = report.layouts[0]
    out = [
        f"\n### Layouts (the same {first.tracks} tracks × 10 s 44.1 kHz stereo FLAC as tar shards, a tree of "
        f"files and Parquet; {first.amodel}, {first.precision}, {first.steps} steps, batch {first.batch}, "
        f"{first.placement} placement)\n"
    ]
    rows = []
    for r in report.layouts:
        ratio = r.windows_per_s / base.windows_per_s
        verdict = "" if r is base else (" met" if ratio >= 0.9 else " NOT met")
        rows.append(
            [
                r.layout,
                r.shards,
                r.windows,
                _f(r.wall_seconds, 1),
                _f(r.windows_per_s, 3),
                f"**{_f(ratio, 3)}**{verdict}",
                _f(r.windows_per_s_wall / base.windows_per_s_wall, 3),
            ]
        )
    headers = ["layout", "units", "windows", "wall s", "windows/s (steady)", "÷ shards, steady (≥ 0.9)"]
    out.append(_table([*headers, "÷ shards, wall"], rows))
    out.append(
        "\nOne pipeline run per layout in this order, same config and catalog (`pipeline/bench/layouts.py`); "
        "a unit is a shard, a group of files (`io.files_per_unit` = tracks per shard) or a Parquet file. "
        "steady = first → last committed unit, as in the pipeline section."
    )
    return out


def render_memory(report: BenchReport) -> list[str]:
    """The memory table and the long ÷ short peak RSS verdict."""
    out: list[str] = []
    m0 = report.memory[0]
    out.append(
        f"\n### Memory (peak RSS of a protect actor; `ProtectActor` on the read stage's rows, mono 44.1 kHz, "
        f"{m0.amodel}, "
        f"{m0.steps} step(s), batch {m0.batch}, {m0.precision})\n"
    )
    rows = []
    for m in report.memory:
        rows.append(
            [
                minutes(m.track_seconds),
                m.segments,
                m.windows,
                f"{m.rss_before_mib:.0f}",
                f"{m.peak_mib:.0f}",
                f"{m.protect_increase_mib:.0f}",
                f"{m.peak_mib / report.memory[0].peak_mib:.2f}",
                _f(m.protect_seconds, 1),
            ]
        )
    out.append(
        _table(
            [
                "track",
                "rows (segments)",
                "windows",
                "RSS before protect (MiB)",
                "peak RSS (MiB)",
                "peak − before (MiB)",
                "peak ratio vs shortest",
                "protect s",
            ],
            rows,
        )
    )
    ratio = report.memory[-1].peak_mib / report.memory[0].peak_mib
    verdict = "met" if ratio <= 1.2 else "NOT met"
    out.append(
        f"\nPeak RSS {minutes(report.memory[-1].track_seconds)} ÷ "
        f"{minutes(report.memory[0].track_seconds)}: "
        f"**{ratio:.2f}** (target ≤ 1.20: {verdict})."
    )
    if ratio > 1.2:
        out.append(
            "The actor holds `runtime.tracks_per_call` rows of at most `audio.segment_seconds` each "
            "(their PCM, every window's δ until the blend, quantisation temporaries); check those "
            "settings against the tracks' lengths."
        )
    return out


def render_contention(report: BenchReport) -> list[str]:
    """CPU use of the machine during each section."""
    out: list[str] = []
    out.append("\n### CPU contention during each section\n")
    rows = [
        [c.section, _f(c.wall_seconds, 0), _f(c.busy_pct, 0), _f(c.own_pct, 0), _f(c.other_pct, 0)]
        for c in report.contention
    ]
    out.append(_table(["section", "wall s", "machine busy %", "this process %", "other processes %"], rows))
    noisy = [c.section for c in report.contention if "pipeline" not in c.section and c.other_pct > 10]
    out.append(
        "\nShares of all cores, from /proc/stat and getrusage (in the pipeline rows the Ray workers "
        "count as other processes). "
        + (
            f"**Other work used > 10 % of the machine during: {', '.join(noisy)}** — those timings are "
            "inflated; rerun on an idle machine (`--wait-idle 600`) before trusting their ratios."
            if noisy
            else "No other work above 10 % of the machine during the timed sections."
        )
    )
    return out


def render_gpu(report: BenchReport) -> list[str]:
    """The GPU section: one row per mode and batch, or why it was not measured."""
    out: list[str] = []
    out.append("\n### GPU\n")
    if report.gpu:
        rows = [
            [
                g.mode,
                g.batch,
                g.steps,
                g.precision,
                _f(g.compile_seconds, 1) if g.mode != "eager" else "–",
                _f(g.seconds, 3) if not g.error else g.error,
                _f(g.windows_per_s, 2),
                _f(g.realtime, 0),
                _f(g.tflops, 1),
                _f(g.matmul_tflops, 1),
                f"{100 * g.tflops / g.matmul_tflops:.0f} %" if not g.error else "–",
            ]
            for g in report.gpu
        ]
        out.append(report.gpu_note + ", HTSAT-base\n")
        out.append(
            _table(
                [
                    "mode",
                    "batch",
                    "steps",
                    "precision",
                    "first call s",
                    "s / call",
                    "windows/s",
                    "× realtime",
                    "achieved TFLOP/s",
                    "bf16 matmul TFLOP/s",
                    "of ceiling",
                ],
                rows,
            )
        )
        out.append(
            f"\nFLOP per window = steps × {HTSAT_BASE_GFLOP_STEP:.0f} GFLOP + "
            f"2 × {HTSAT_BASE_GFLOP_FORWARD:.0f} "
            "GFLOP (clean and scoring forwards); ceiling = measured 8192³ bf16 `torch.matmul`."
        )
    else:
        out.append(report.gpu_note)
    return out


def render_ensemble(results: Sequence[EnsembleResult]) -> str:
    """The table "Ensemble: time per PGD step" (one row per ensemble size)."""
    e0 = results[0]
    out = [
        f"\n### Ensemble: time per PGD step ({e0.amodel} × k, random seeds 0..k−1, TrackProtector embed + mean "
        f"distance, in-memory 48 kHz mono windows, batch {e0.batch}, {e0.steps} steps, {e0.precision}, "
        f"{e0.repeats} repeats)\n"
    ]
    rows = [
        [
            e.encoders,
            _f(e.seconds),
            _f(e.seconds_per_step_window, 3),
            _f(e.min_seconds_per_step_window, 3),
            f"{_f(e.ratio_vs_one)}×",
            f"{e.loaded_mib:.0f}",
            f"{e.peak_increase_mib:.0f}",
            f"{_f(e.increase_ratio_vs_one)}×",
        ]
        for e in results
    ]
    out.append(
        _table(
            [
                "encoders",
                "s / call",
                "s per PGD step per window (median)",
                "(fastest step)",
                f"vs {e0.encoders}",
                f"{e0.memory_kind} with encoders loaded (MiB)",
                f"peak {e0.memory_kind} increase (MiB)",
                f"vs {e0.encoders}",
            ],
            rows,
        )
    )
    out.append(
        "\nA call = clean forward + steps × (forward + backward w.r.t. δ through every encoder) + scoring "
        "forward. Each step is timed on its own (its forward's start → the next forward's start) and "
        "divided by the batch; the median over all timed steps is compared with one encoder. Each size "
        "runs in its own process (`--ensemble-child`); the increase is the peak during the calls "
        "(warm-up included) minus the figure just before them (encoders and batch already in memory)."
    )
    return "\n".join(out)


def render_tables(report: BenchReport) -> str:
    """The result tables (what the run prints): each section that has results, then the GPU's."""
    out: list[str] = []
    for present, render in (
        (report.engine, render_engine),
        (report.baseline, render_baseline),
        (report.pipeline, render_pipeline),
        (report.layouts, render_layouts),
        (report.memory, render_memory),
    ):
        if present:
            out += render(report)
    if report.ensemble:
        out.append(render_ensemble(report.ensemble))
    if report.contention:
        out += render_contention(report)
    out += render_gpu(report)
    return "\n".join(out)
