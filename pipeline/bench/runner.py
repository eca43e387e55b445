"""`python -m pipeline.bench` / `unlearnable bench`: the command line (profiles, parser, settings),
the run of the chosen sections in order, and the report it prints and writes."""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pipeline.bench.baseline import bench_baseline
from pipeline.bench.common import (
    GPU_MODES,
    GPU_NOT_AVAILABLE,
    PARTS,
    PLACEMENTS,
    cpu_meter,
    log,
    machine_info,
    minutes,
    wait_for_idle,
)
from pipeline.bench.engine import bench_engine
from pipeline.bench.ensemble import bench_ensemble, ensemble_child
from pipeline.bench.gpu import bench_gpu
from pipeline.bench.page import render_markdown
from pipeline.bench.render import render_tables
from pipeline.bench.results import BenchReport, BenchSettings
from pipeline.encoders.base import set_hub_offline
from pipeline.encoders.load import emulated_precision_note, pick_device

QUICK = {
    "amodels": ["HTSAT-tiny"],
    "steps": 2,
    "batch_sizes": [1, 2],
    "precisions": None,  # fp32, plus bf16 where the device runs it in hardware (default_precisions)
    "pipeline_tracks": 2,
    "memory_seconds": [60.0, 180.0],
    "repeats": 3,
    "warmup": 1,
    "gpu_batch_sizes": [1, 4],
    "gpu_steps": 5,
    "ensemble_batch": 1,
    "ensemble_steps": 2,
    "pipeline_steps": 2,
    "pipeline_precisions": None,  # bf16 where native, else fp32
    "pipeline_repeats": 1,
}
# Sections run only when named in --parts (they start services of their own).
OPT_IN_PARTS = ("service",)
FULL = {
    "amodels": ["HTSAT-tiny", "HTSAT-base"],
    "steps": 5,
    "batch_sizes": [1, 2, 4],
    "precisions": None,
    "pipeline_tracks": 12,
    "memory_seconds": [60.0, 1800.0],
    "repeats": 3,
    "warmup": 1,
    "gpu_batch_sizes": [8, 16, 32, 64],
    "gpu_steps": 50,
    "ensemble_batch": 2,
    "ensemble_steps": 3,
    "pipeline_steps": 50,  # attack.steps' default: what a catalog run does per window
    "pipeline_precisions": None,  # bf16 where native, else fp32
    "pipeline_repeats": 1,
}
# Where the protect actor's compute runs relative to the CPU stages (decode, quality, encode, write):
#   dedicated: the accelerator is the actor's own. On CPU the actor takes all cores but one
#              (torch threads = runtime.num_cpus_per_actor = cores - 1), the CPU stages the rest;
#              on CUDA the actor has the GPU. The engine reference runs with the same threads.
#   shared:    CPU only: the actor's torch threads = all cores, so every CPU stage preempts them.


def run_benchmark(settings: BenchSettings, command: str = "") -> BenchReport:
    """Run the sections of `settings.parts` in their fixed order on one device; the report."""
    started = time.perf_counter()
    device = str(pick_device(settings.device))
    report = BenchReport(
        settings=settings,
        machine=machine_info(device),
        command=command,
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    )
    parts = set(settings.parts)
    if settings.precision_note:
        report.notes.append(settings.precision_note)
    if settings.wait_idle > 0:
        busy = wait_for_idle(settings.wait_idle)
        report.notes.append(f"Machine {100 * busy:.0f} % busy (other work) when the run started.")
    for part, run_part in (
        ("engine", _run_engine),
        ("baseline", _run_baseline),
        ("pipeline", _run_pipeline),
        ("layouts", _run_layouts),
        ("memory", _run_memory),
        ("ensemble", _run_ensemble),
        ("gpu", _run_gpu),
        ("service", _run_service),
    ):
        if part in parts:
            run_part(settings, report, device)
    if "gpu" not in parts:
        report.gpu_note = "GPU: not run (--parts)"
    report.seconds = time.perf_counter() - started
    return report


def _threads(settings: BenchSettings) -> int:
    return settings.threads or (os.cpu_count() or 1)


def _run_engine(settings: BenchSettings, report: BenchReport, device: str) -> None:
    for amodel in settings.amodels:
        with cpu_meter(f"engine {amodel}", report.contention):
            engine, forward = bench_engine(
                amodel,
                settings.steps,
                settings.batch_sizes,
                settings.precisions,
                device=device,
                compile=settings.compile,
                repeats=settings.repeats,
                warmup=settings.warmup,
            )
        report.engine += engine
        report.forward += forward


def _run_baseline(settings: BenchSettings, report: BenchReport, device: str) -> None:
    for amodel in settings.amodels:
        with cpu_meter(f"baseline {amodel}", report.contention):
            report.baseline.append(
                bench_baseline(amodel, settings.steps, device=device, repeats=settings.repeats, warmup=settings.warmup)
            )


def _run_pipeline(settings: BenchSettings, report: BenchReport, device: str) -> None:
    # The Ray Data stages (pyarrow, fsspec, yaml) only when the section runs: the GPU lease image
    # (jobs/gpu_benchmark.sh) runs the engine, baseline and GPU sections without them.
    from pipeline.bench.pipeline import run_pipelines

    report.pipeline = run_pipelines(settings, report, device)


def _run_layouts(settings: BenchSettings, report: BenchReport, device: str) -> None:
    from pipeline.bench.layouts import run_layouts

    report.layouts = run_layouts(settings, report, device)


def _run_memory(settings: BenchSettings, report: BenchReport, device: str) -> None:
    from pipeline.bench.memory import bench_memory  # the stages' code, as _run_pipeline

    for seconds in settings.memory_seconds:
        with cpu_meter(f"memory {minutes(seconds)}", report.contention):
            report.memory.append(
                bench_memory(
                    seconds,
                    amodel=settings.memory_amodel,
                    steps=settings.memory_steps,
                    batch=max(settings.batch_sizes),
                    device=device,
                    threads=_threads(settings),
                )
            )


def _run_ensemble(settings: BenchSettings, report: BenchReport, device: str) -> None:
    report.ensemble = bench_ensemble(
        settings.ensemble_sizes,
        amodel=settings.ensemble_amodel,
        steps=settings.ensemble_steps,
        batch=settings.ensemble_batch,
        precision=settings.ensemble_precision,
        device=device,
        threads=_threads(settings),
        repeats=settings.repeats,
        warmup=settings.warmup,
        meter=report.contention,
    )


def _run_gpu(settings: BenchSettings, report: BenchReport, device: str) -> None:
    if not torch.cuda.is_available():
        report.gpu_note = GPU_NOT_AVAILABLE
        return
    report.gpu = bench_gpu(
        settings.gpu_batch_sizes,
        settings.gpu_steps,
        modes=settings.gpu_modes,
        repeats=settings.repeats,
        warmup=settings.warmup,
    )
    report.gpu_note = f"GPU: {torch.cuda.get_device_name(0)}"


def _run_service(settings: BenchSettings, report: BenchReport, device: str) -> None:
    from pipeline.bench.service import bench_service  # Ray Serve only when the section runs

    with cpu_meter("service", report.contention):
        result = bench_service()
    report.notes.append("Ingest service (pipeline/bench/service.py, docs/service.md):\n\n" + result.markdown())


def _csv(kind: type) -> Callable[[str], list[Any]]:
    def parse(text: str) -> list[Any]:
        values = [kind(v.strip()) for v in text.split(",") if v.strip()]
        if not values:
            raise argparse.ArgumentTypeError("expected a comma-separated list")
        return values

    return parse


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog or "python -m pipeline.bench",
        description="Benchmark the PGD engine, the Ray Data pipeline and laion-clap's naive loop in one run.",
    )
    p.add_argument("--amodels", type=_csv(str), help="comma-separated HTSAT models (default HTSAT-tiny,HTSAT-base)")
    p.add_argument("--steps", type=int, help="PGD steps per window, early stop off (default 5; quick 2)")
    p.add_argument("--batch-sizes", type=_csv(int), help="engine batch sizes (default 1,2,4; quick 1,2)")
    p.add_argument("--precisions", type=_csv(str), help="fp32,bf16 (default both; fp32 alone where bf16 is emulated)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd encoders (minutes on CPU)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="small run, < 3 minutes on 2 cores (prints; writes only with --out)",
    )
    p.add_argument("--out", help="write the Markdown report here (default docs/benchmarks.md for a full run)")
    p.add_argument("--json", help="also write the raw results as JSON")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    p.add_argument("--repeats", type=int, help="timed repeats per measurement (median; default 3)")
    p.add_argument("--warmup", type=int, help="untimed warm-up runs per measurement (default 1)")
    p.add_argument("--pipeline-tracks", type=int, help="10 s tracks in the pipeline catalog (default 12; quick 2)")
    p.add_argument("--pipeline-batch", type=int, default=0, help="pipeline batch (default: largest leaving ≥ 2 shards)")
    p.add_argument("--pipeline-steps", type=int, help="PGD steps in the pipeline section (default 50; quick 2)")
    p.add_argument(
        "--pipeline-precisions", type=_csv(str), help="pipeline precisions (default bf16; fp32 where bf16 is emulated)"
    )
    p.add_argument(
        "--pipeline-placements",
        type=_csv(str),
        default=list(PLACEMENTS),
        help="dedicated (actor on cores − 1, CPU stages on the rest) and/or shared (actor threads on all cores)",
    )
    p.add_argument("--pipeline-repeats", type=int, help="timed engine-reference calls per pipeline case (default 1)")
    p.add_argument("--memory-seconds", type=_csv(float), help="track lengths for the memory case (default 60,1800)")
    p.add_argument("--memory-amodel", default="HTSAT-tiny", help="encoder of the memory case (default HTSAT-tiny)")
    p.add_argument("--memory-steps", type=int, default=1, help="PGD steps in the memory case (default 1)")
    p.add_argument("--gpu-batch-sizes", type=_csv(int), help="GPU sweep (default 8,16,32,64)")
    p.add_argument("--gpu-steps", type=int, help="GPU PGD steps (default 50)")
    p.add_argument(
        "--gpu-modes",
        type=_csv(str),
        default=list(GPU_MODES),
        help="GPU modes: eager sweeps the batch sizes; compiled / cudagraphs run at its fastest batch "
        "(default eager,compiled,cudagraphs)",
    )
    p.add_argument("--ensemble-sizes", type=_csv(int), help="encoders per ensemble (default 1,2,3)")
    p.add_argument("--ensemble-batch", type=int, help="windows per batch in the ensemble part (default 2; quick 1)")
    p.add_argument("--ensemble-steps", type=int, help="PGD steps in the ensemble part (default 3; quick 2)")
    p.add_argument("--parts", type=_csv(str), default=list(PARTS), help="sections to run (default all)")
    p.add_argument(
        "--wait-idle",
        type=float,
        default=0.0,
        help="first wait up to this many seconds for other work on the machine to finish (default 0)",
    )
    p.add_argument("--memory-child", help=argparse.SUPPRESS)
    p.add_argument("--ensemble-child", help=argparse.SUPPRESS)
    return p


def default_precisions(device: str) -> tuple[list[str], list[str], str]:
    """(engine precisions, pipeline precisions, note) when none are given: fp32 and bf16 where the
    device runs bf16 in hardware, else fp32 alone (emulated bf16 measures the emulation, not the
    engine: ~15× slower than fp32 on an AVX2-only CPU)."""
    slow = emulated_precision_note(pick_device(device), "bf16")
    if not slow:
        return ["fp32", "bf16"], ["bf16"], ""
    return ["fp32"], ["fp32"], f"bf16 left out: {slow}; pass --precisions fp32,bf16 to time the emulation anyway."


def settings_from_args(args: argparse.Namespace) -> BenchSettings:
    profile = QUICK if args.quick else FULL
    precision_note = ""
    if args.precisions is None or args.pipeline_precisions is None:
        engine_precisions, pipeline_precisions, precision_note = default_precisions(args.device)
        profile = {**profile, "precisions": engine_precisions, "pipeline_precisions": pipeline_precisions}

    def pick(name: str) -> Any:
        value = getattr(args, name)
        return profile[name] if value is None else value

    settings = BenchSettings(
        amodels=pick("amodels"),
        steps=pick("steps"),
        batch_sizes=sorted(set(pick("batch_sizes"))),
        precisions=pick("precisions"),
        compile=args.compile,
        quick=args.quick,
        device=args.device,
        threads=args.threads,
        repeats=pick("repeats"),
        warmup=pick("warmup"),
        pipeline_tracks=pick("pipeline_tracks"),
        pipeline_batch=args.pipeline_batch,
        pipeline_steps=pick("pipeline_steps"),
        pipeline_precisions=pick("pipeline_precisions"),
        pipeline_placements=args.pipeline_placements,
        pipeline_repeats=pick("pipeline_repeats"),
        memory_seconds=pick("memory_seconds"),
        memory_amodel=args.memory_amodel,
        memory_steps=args.memory_steps,
        gpu_batch_sizes=pick("gpu_batch_sizes"),
        gpu_steps=pick("gpu_steps"),
        gpu_modes=args.gpu_modes,
        ensemble_sizes=args.ensemble_sizes or [1, 2, 3],
        ensemble_batch=pick("ensemble_batch"),
        ensemble_steps=pick("ensemble_steps"),
        parts=args.parts,
        wait_idle=args.wait_idle,
        precision_note=precision_note if args.precisions is None else "",
    )
    bad = [p for p in (*settings.precisions, *settings.pipeline_precisions) if p not in ("fp32", "bf16", "fp16")]
    unknown = [p for p in settings.parts if p not in (*PARTS, *OPT_IN_PARTS)]
    unknown += [p for p in settings.pipeline_placements if p not in PLACEMENTS]
    unknown += [m for m in settings.gpu_modes if m not in GPU_MODES]
    if (
        bad
        or unknown
        or min(settings.steps, settings.pipeline_steps) < 0
        or min(settings.batch_sizes) < 1
        or settings.pipeline_tracks < 1
        or settings.pipeline_repeats < 1
    ):
        raise ValueError(
            f"invalid settings: precisions {bad or 'ok'}, parts/placements {unknown or 'ok'} "
            f"(known {', '.join(PARTS)}; {', '.join(PLACEMENTS)}; {', '.join(GPU_MODES)}), "
            "steps ≥ 0, batch sizes ≥ 1, pipeline tracks ≥ 1, pipeline repeats ≥ 1"
        )
    if min(settings.ensemble_sizes) < 1 or settings.ensemble_batch < 1 or settings.ensemble_steps < 1:
        raise ValueError("invalid settings: ensemble sizes, batch and steps must be ≥ 1")
    return settings


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m pipeline.bench` and `unlearnable bench`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if "HF_HUB_OFFLINE" not in os.environ:
        set_hub_offline()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if args.memory_child:
        from pipeline.bench.memory import memory_child  # the stages' code, as _run_pipeline

        print(json.dumps(memory_child(json.loads(args.memory_child))), flush=True)
        return 0
    if args.ensemble_child:
        logging.getLogger("pipeline.encoders.load").setLevel(logging.ERROR)
        print(json.dumps(ensemble_child(json.loads(args.ensemble_child))), flush=True)
        return 0
    logging.getLogger("pipeline.encoders.load").setLevel(logging.ERROR)  # the random-weights warning, per load
    try:
        settings = settings_from_args(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    torch.set_num_threads(settings.threads or (os.cpu_count() or 1))
    out = args.out if args.out is not None else (None if settings.quick else "docs/benchmarks.md")
    command = "python -m pipeline.bench" + (" " + shlex.join(argv) if argv else "")
    report = run_benchmark(settings, command)
    print(render_tables(report), flush=True)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(render_markdown(report))
        log(f"wrote {out}")
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2, default=str))
    return 0
