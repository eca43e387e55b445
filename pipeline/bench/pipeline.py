"""Section 3, the real Ray Data pipeline (:func:`pipeline.stages.pipeline.run`) from tar shards on
disk to written shards and manifests, against an engine reference timed at the same steps, batch,
precision and torch threads, per placement of the protect actor (PLACEMENTS)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from pipeline.bench.common import ALPHA, EPS, PLACEMENTS, SIGMA, TRACK_RATE, WINDOW_SECONDS, cpu_meter, log
from pipeline.bench.engine import bench_engine
from pipeline.bench.results import BenchReport, BenchSettings, PipelineResult
from pipeline.config import PipelineConfig, config_from_dict
from pipeline.demo import DemoTrack, write_demo_catalog
from pipeline.encoders.load import LoadedEncoder, load_encoder
from pipeline.io.output import OutputFolder
from pipeline.records import ShardStats
from pipeline.stages.pipeline import init_ray, ray_running, run, shutdown_ray


def write_catalog(folder: Path, tracks: int, per_shard: int, seed: int = 0) -> list[Path]:
    """`tracks` 10 s 44.1 kHz stereo FLAC tracks (one window each) in tars of `per_shard` tracks."""
    songs = [
        DemoTrack(
            f"bench-{number:05d}",
            WINDOW_SECONDS,
            TRACK_RATE,
            2,
            "FLAC",
            "PCM_16",
            "flac",
            80 + 7 * (number % 11),
            150.0 + 13 * (number % 9),
            seed=number,
        )
        for number in range(tracks)
    ]
    shards = [songs[begin : begin + per_shard] for begin in range(0, tracks, per_shard)]
    return write_demo_catalog(folder, seed, shards)


def actor_threads(placement: str, device: str = "cpu") -> int:
    """Torch threads of the protect actor for a placement (PLACEMENTS): on CPU all cores but one
    when dedicated, all cores when shared; one on CUDA (the GPU does the work)."""
    if placement not in PLACEMENTS:
        raise ValueError(f"unknown placement {placement!r} (known: {', '.join(PLACEMENTS)})")
    if device.startswith("cuda"):
        return 1
    cores = os.cpu_count() or 1
    return max(1, cores - 1) if placement == "dedicated" else cores


def measurement_forwards(precision: str, musicldm_view: bool = True) -> int:
    """fp32 no-grad forwards per window the pipeline runs beyond `pgd` (TrackProtector._measure):
    the written audio (1), the clean audio again unless pgd's own e(x) was fp32 with the plain view
    (bf16: +1), and the MusicLDM view of both (+2)."""
    return 1 + (precision != "fp32") + (2 if musicldm_view else 0)


def pipeline_config(
    input_dir: Path,
    output_dir: Path,
    amodel: str,
    steps: int,
    precision: str,
    batch: int,
    device: str = "cpu",
    placement: str = "shared",
    io_overrides: dict[str, Any] | None = None,
) -> PipelineConfig:
    """The section's run config; `io_overrides` adds io.* settings (e.g. files_per_unit)."""
    cuda = device.startswith("cuda")
    threads = actor_threads(placement, device)
    return config_from_dict(
        {
            "io": {"input": str(input_dir), "output": str(output_dir), "overwrite": True, **(io_overrides or {})},
            "audio": {"window_seconds": WINDOW_SECONDS, "overlap_seconds": 1.0, "on_error": "passthrough"},
            "encoder": {"checkpoint": f"random:{amodel}:0", "device": device},
            "attack": {
                "eps": EPS,
                "alpha": ALPHA,
                "steps": steps,
                "sigma": SIGMA,
                "target_delta_e": float("inf"),
                "precision": precision,
                "seed": 0,
            },
            "runtime": {
                "num_actors": 1,
                "num_gpus_per_actor": 1.0 if cuda else 0.0,
                # dedicated: the actor reserves the cores its threads use, so Ray schedules the
                # CPU stages (io_cpus each) on the rest; shared: it reserves one and uses all.
                "num_cpus_per_actor": float(threads) if placement == "dedicated" and not cuda else 1.0,
                "torch_threads": threads,
                "tracks_per_call": batch,
                "batch_windows": batch,
                "io_cpus": 0.25,
                "progress": False,
            },
        }
    )


def bench_pipeline(
    amodel: str,
    steps: int,
    precision: str,
    batch: int,
    input_dir: Path,
    output_dir: Path,
    *,
    device: str = "cpu",
    placement: str = "shared",
    io_overrides: dict[str, Any] | None = None,
) -> PipelineResult:
    """Run the real pipeline once over the catalog in `input_dir` (Ray must be up or is started)."""
    cfg = pipeline_config(input_dir, output_dir, amodel, steps, precision, batch, device, placement, io_overrides)
    init_ray(cfg)
    result = run(cfg)
    stats = result.this_run
    if stats.ok != stats.items or stats.items == 0:
        raise RuntimeError(f"pipeline benchmark run failed: {stats.ok}/{stats.items} ok, errors {stats.errors}")
    # Commit times from the completion markers' mtimes (written by the shard writer as it commits;
    # the driver may receive the summaries later, and in bunches).
    folder = OutputFolder(str(output_dir))
    commits = []
    for marker in output_dir.glob("*" + folder.marker_name("")):
        windows = ShardStats.from_json(marker.read_text()).windows
        commits.append((marker.stat().st_mtime_ns / 1e9, windows))
    commits.sort()
    steady_seconds = commits[-1][0] - commits[0][0] if len(commits) > 1 else 0.0
    steady_windows = sum(w for _, w in commits[1:])
    out = PipelineResult(
        amodel=amodel,
        precision=precision,
        batch=batch,
        steps=steps,
        tracks=stats.items,
        shards=result.processed_shards,
        windows=stats.windows,
        ok=stats.ok,
        wall_seconds=result.wall_seconds,
        steady_seconds=steady_seconds,
        steady_windows=steady_windows,
        extra_forwards=measurement_forwards(precision, cfg.quality.musicldm_view),
        placement=placement,
        actor_threads=cfg.runtime.torch_threads or 1,
    )
    log(
        f"pipeline {amodel} B={batch} {precision} {placement} ({out.actor_threads} threads): "
        f"{out.windows} windows in {out.wall_seconds:.1f} s wall, "
        f"{out.windows_per_s:.3f} windows/s steady"
    )
    return out


def choose_pipeline_batch(settings: BenchSettings) -> int:
    """The batch the pipeline runs at: --pipeline-batch, else the largest benchmarked batch that
    still gives at least two shards (one shard per protect call; steady state needs two)."""
    if settings.pipeline_batch:
        return settings.pipeline_batch
    fitting = [b for b in settings.batch_sizes if 2 * b <= settings.pipeline_tracks]
    return max(fitting) if fitting else min(settings.batch_sizes)


def run_pipelines(settings: BenchSettings, report: BenchReport, device: str) -> list[PipelineResult]:
    """Per model, precision and placement: the engine reference (in this process, the actor's
    thread count, same batch/precision/steps), then the pipeline run it is compared with."""
    batch = choose_pipeline_batch(settings)
    placements = ["dedicated"] if device.startswith("cuda") else settings.pipeline_placements
    started_ray = not ray_running()
    own_threads = torch.get_num_threads()
    results = []
    try:
        with tempfile.TemporaryDirectory(prefix="unlearnable-bench-") as tmp:
            input_dir = Path(tmp) / "input"
            write_catalog(input_dir, settings.pipeline_tracks, batch)
            for amodel in settings.amodels:
                encoder = load_encoder(f"random:{amodel}:0", device=device)
                for precision in settings.pipeline_precisions:
                    for placement in placements:
                        case = (amodel, precision, batch, placement)
                        results.append(_pipeline_case(settings, report, case, encoder, input_dir, device))
                del encoder
    finally:
        torch.set_num_threads(own_threads)
        if started_ray:
            shutdown_ray()
    return results


def _pipeline_case(
    settings: BenchSettings,
    report: BenchReport,
    case: tuple[str, str, int, str],
    encoder: LoadedEncoder,
    input_dir: Path,
    device: str,
) -> PipelineResult:
    """One pipeline row: its engine reference at the actor's threads, then the pipeline run."""
    amodel, precision, batch, placement = case
    steps = settings.pipeline_steps
    torch.set_num_threads(actor_threads(placement, device))
    engine, forward = bench_engine(
        amodel,
        steps,
        [batch],
        [precision],
        device=device,
        repeats=settings.pipeline_repeats,
        warmup=1,
        warmup_steps=1,
        encoder=encoder,
    )
    report.pipeline_engine += engine
    log(f"engine reference {amodel} {precision} {placement}: {engine[0].windows_per_s:.3f} windows/s")
    output_dir = input_dir.parent / f"out-{amodel}-{precision}-{placement}"
    with cpu_meter(f"pipeline {amodel} {precision} {placement}", report.contention):
        result = bench_pipeline(
            amodel, steps, precision, batch, input_dir, output_dir, device=device, placement=placement
        )
    result.engine_windows_per_s = engine[0].windows_per_s
    result.extra_forward_seconds = forward[0].seconds_per_window
    shutil.rmtree(output_dir, ignore_errors=True)
    return result
