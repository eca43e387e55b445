"""Smoke tests of the benchmark (pipeline/bench/): argument handling, report rendering, the
pipeline section's catalog, and the engine + baseline measurements at the smallest size
(HTSAT-tiny, 1 step, batch 1)."""

from __future__ import annotations

import io
import math
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from pipeline.bench import pipeline as bench_pipeline
from pipeline.bench.baseline import bench_baseline
from pipeline.bench.common import GPU_MODES, GPU_NOT_AVAILABLE, TRACK_RATE, WINDOW_SECONDS, Contention, minutes
from pipeline.bench.engine import bench_engine
from pipeline.bench.gpu import gpu_embed
from pipeline.bench.memory import bench_memory
from pipeline.bench.page import render_markdown
from pipeline.bench.pipeline import actor_threads, choose_pipeline_batch, measurement_forwards, pipeline_config
from pipeline.bench.render import render_contention, render_memory, render_tables
from pipeline.bench.results import (
    BaselineResult,
    BenchReport,
    EngineResult,
    ForwardResult,
    GpuResult,
    MemoryResult,
    PipelineResult,
)
from pipeline.bench.runner import build_parser, main, settings_from_args
from pipeline.core.engine import PGDParams, pgd
from pipeline.demo import synthesize


def test_parser_quick_and_full_profiles(monkeypatch):
    monkeypatch.setattr("pipeline.encoders.load.native_low_precision", lambda device: True)
    quick = settings_from_args(build_parser().parse_args(["--quick"]))
    assert quick.amodels == ["HTSAT-tiny"]
    assert quick.steps == 2 and quick.batch_sizes == [1, 2]
    assert quick.pipeline_tracks == 2 and quick.memory_seconds == [60.0, 180.0]
    assert choose_pipeline_batch(quick) == 1  # two shards of one track

    full = settings_from_args(
        build_parser().parse_args(["--amodels", "HTSAT-base", "--steps", "3", "--batch-sizes", "4,1,2"])
    )
    assert full.amodels == ["HTSAT-base"] and full.steps == 3
    assert full.batch_sizes == [1, 2, 4]
    assert full.precisions == ["fp32", "bf16"]
    assert choose_pipeline_batch(full) == 4  # 12 tracks: three shards of four
    assert full.pipeline_steps == 50 and full.pipeline_precisions == ["bf16"]
    assert full.pipeline_placements == ["dedicated", "shared"]

    assert full.precision_note == ""

    # bf16 emulated (an AVX2-only CPU): the defaults time fp32 alone and say why; explicit wins
    monkeypatch.setattr("pipeline.encoders.load.native_low_precision", lambda device: False)
    emulated = settings_from_args(build_parser().parse_args(["--device", "cpu"]))
    assert emulated.precisions == ["fp32"] and emulated.pipeline_precisions == ["fp32"]
    assert "bf16 left out" in emulated.precision_note
    explicit = settings_from_args(build_parser().parse_args(["--precisions", "fp32,bf16"]))
    assert explicit.precisions == ["fp32", "bf16"] and explicit.pipeline_precisions == ["fp32"]
    assert explicit.precision_note == ""

    with pytest.raises(ValueError):
        settings_from_args(build_parser().parse_args(["--precisions", "int8"]))
    assert main(["--parts", "nonsense"]) == 2
    assert main(["--pipeline-placements", "nowhere"]) == 2


def test_placements_and_measurement_forwards(monkeypatch):
    monkeypatch.setattr(bench_pipeline.os, "cpu_count", lambda: 8)
    assert actor_threads("dedicated") == 7 and actor_threads("shared") == 8
    assert actor_threads("dedicated", "cuda:0") == 1
    monkeypatch.setattr(bench_pipeline.os, "cpu_count", lambda: 1)
    assert actor_threads("dedicated") == 1  # never zero threads
    with pytest.raises(ValueError):
        actor_threads("elsewhere")
    cfg = pipeline_config(Path("in"), Path("out"), "HTSAT-tiny", 2, "bf16", 4, "cpu", "dedicated")
    assert cfg.runtime.torch_threads == 1 and cfg.runtime.num_cpus_per_actor == 1.0
    # the written audio; the clean audio again unless pgd's e(x) was fp32; the MusicLDM view of both
    assert measurement_forwards("fp32") == 3 and measurement_forwards("bf16") == 4
    assert measurement_forwards("fp32", musicldm_view=False) == 1


def test_render_from_synthetic_results():
    settings = settings_from_args(build_parser().parse_args(["--quick"]))
    report = BenchReport(settings=settings, machine={"CPU": "test"}, command="python -m pipeline.bench", date="d")
    report.engine = [
        EngineResult("HTSAT-tiny", "fp32", 1, 2, 1.0),
        EngineResult("HTSAT-tiny", "bf16", 2, 2, 1.0),
    ]
    report.forward = [ForwardResult("HTSAT-tiny", 1, 0.1)]
    report.baseline = [BaselineResult("HTSAT-tiny", 2, 2.0)]
    report.pipeline = [
        PipelineResult(
            "HTSAT-tiny", "fp32", 1, 2, tracks=2, shards=2, windows=2, ok=2, wall_seconds=4.0,
            steady_seconds=1.25, steady_windows=1, engine_windows_per_s=1.0, extra_forward_seconds=0.1,
            placement="dedicated", actor_threads=1,
        )
    ]  # fmt: skip
    report.memory = [
        MemoryResult(60, 7, 900, 1000, 10.0, "HTSAT-tiny", 1, 2),
        MemoryResult(180, 20, 950, 1100, 30.0, "HTSAT-tiny", 1, 2),
    ]
    p = report.pipeline[0]
    assert p.windows_per_s == pytest.approx(0.8)
    assert p.efficiency == pytest.approx(0.8)
    assert p.efficiency_equivalent == pytest.approx(0.88)
    text = render_markdown(report)
    assert "4.00× (bf16, B=2)" in text  # best engine 2 windows/s vs baseline 0.5
    assert "**1.10**" in text and "(target ≤ 1.20: met)" in text
    assert GPU_NOT_AVAILABLE in text
    assert "python -m pipeline.bench" in text
    assert "**0.800** NOT met" in text  # dedicated rows carry the ≥ 0.9 verdict
    assert report.to_dict()["pipeline"][0]["efficiency"] == pytest.approx(0.8)


def test_gpu_section_renders_every_mode():
    settings = settings_from_args(build_parser().parse_args(["--gpu-modes", "eager,cudagraphs"]))
    assert settings.gpu_modes == ["eager", "cudagraphs"]
    with pytest.raises(ValueError):
        settings_from_args(build_parser().parse_args(["--gpu-modes", "eager,graphs"]))
    report = BenchReport(settings=settings, machine={"GPU": "test"}, command="c", date="d")
    report.gpu_note = "GPU: test card"
    report.gpu = [
        GpuResult(8, 50, "bf16", 2.0, 600.0),
        GpuResult(16, 50, "bf16", float("nan"), 600.0, error="out of memory: x"),
        GpuResult(8, 50, "bf16", 1.0, 600.0, mode="cudagraphs", compile_seconds=42.0),
    ]
    assert report.gpu[2].windows_per_s == pytest.approx(8.0) and report.gpu[2].realtime == pytest.approx(80.0)
    text = render_tables(report)
    gpu_rows = [line for line in text.splitlines() if line.startswith(("| eager", "| cudagraphs"))]
    assert len(gpu_rows) == 3
    assert gpu_rows[2].startswith("| cudagraphs | 8 | 50 | bf16 | 42.0 | 1.000 | 8.00 | 80 |")
    assert "out of memory" in gpu_rows[1]


@pytest.mark.parametrize("mode", GPU_MODES)
def test_gpu_embed_modes_give_eager_pgd(mode):
    """Each GPU mode's embed (on CPU the CUDA graphs are skipped, the wrapper is not) gives pgd the
    same δ as the eager model: gradients reach the input through the compiled call and the copy."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.Tanh(), torch.nn.Linear(16, 8))
    model.requires_grad_(False)

    def view(x):  # [B, 1, 64] -> [B, 64]
        return x.mean(dim=1)

    x = torch.rand(3, 1, 64) - 0.5
    params = PGDParams(eps=0.05, alpha=0.01, steps=3, sigma=0.01)
    expected = pgd(gpu_embed(model, view, "eager"), x, params, generator=torch.Generator().manual_seed(1))
    got = pgd(gpu_embed(model, view, mode), x, params, generator=torch.Generator().manual_seed(1))
    assert torch.equal(got.steps, expected.steps)
    torch.testing.assert_close(got.delta, expected.delta, atol=1e-6, rtol=0)
    torch.testing.assert_close(got.delta_e, expected.delta_e, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError):
        gpu_embed(model, view, "graphs")


def test_engine_and_baseline_smallest(tiny_encoder):
    engine, forward = bench_engine(
        "HTSAT-tiny", 1, [1], ["fp32"], device="cpu", repeats=1, warmup=0, encoder=tiny_encoder
    )
    assert [(e.amodel, e.precision, e.batch, e.steps, e.compiled) for e in engine] == [
        ("HTSAT-tiny", "fp32", 1, 1, False)
    ]
    for value in (engine[0].seconds, engine[0].windows_per_s, engine[0].steps_per_s, engine[0].realtime):
        assert value > 0 and math.isfinite(value)
    assert len(forward) == 1 and forward[0].seconds_per_window > 0

    baseline = bench_baseline("HTSAT-tiny", 1, device="cpu", repeats=1, warmup=0)
    assert baseline.amodel == "HTSAT-tiny" and baseline.steps == 1
    assert baseline.seconds_per_window > 0 and baseline.windows_per_s > 0


@pytest.mark.slow
def test_memory_child_process():
    result = bench_memory(20.0, amodel="HTSAT-tiny", steps=0, batch=2, threads=2)
    assert result.windows == 3
    assert result.peak_mib >= result.rss_before_mib > 0
    assert result.protect_seconds > 0


def test_layouts_section_renders_ratios_to_shards():
    settings = settings_from_args(build_parser().parse_args(["--quick"]))
    report = BenchReport(settings=settings, machine={"CPU": "test"}, command="c", date="d")

    def row(layout: str, steady_seconds: float) -> PipelineResult:
        return PipelineResult(
            "HTSAT-tiny", "fp32", 2, 2, tracks=8, shards=4, windows=8, ok=8, wall_seconds=20.0,
            steady_seconds=steady_seconds, steady_windows=6, layout=layout,
        )  # fmt: skip

    report.layouts = [row("shards", 3.0), row("files", 3.2), row("parquet", 4.0)]
    text = render_markdown(report)
    assert "### Layouts" in text
    assert "| files | 4 | 8 | 20.0 | 1.875 | **0.938** met | 1.000 |" in text
    assert "| parquet | 4 | 8 | 20.0 | 1.500 | **0.750** NOT met |" in text
    assert report.to_dict()["layouts"][1]["windows_per_s"] == pytest.approx(1.875)


def test_gpu_benchmark_script_dry_run_on_cpu(tmp_path):
    """jobs/gpu_benchmark.sh, the prepared GPU lease script, run on the CPU with the smallest
    settings: both parts write their tables and the log, and the exit status is the parts'."""
    root = Path(__file__).resolve().parents[2]
    env = {
        **os.environ,
        "OUT": str(tmp_path),
        "BENCH_DEVICE": "cpu",
        "BENCH_WHEELS": "",  # this venv, not wheels fetched for the GPU image's Python
        "BENCH_ARGS": "--quick --steps 1 --batch-sizes 1 --repeats 1 --warmup 0",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    done = subprocess.run(
        ["bash", str(root / "jobs" / "gpu_benchmark.sh")], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert {"gpu.md", "gpu.json", "engine.md", "engine.json", "run.log"} <= {p.name for p in tmp_path.iterdir()}
    assert GPU_NOT_AVAILABLE in (tmp_path / "gpu.md").read_text()
    engine_page = (tmp_path / "engine.md").read_text()
    assert "| HTSAT-tiny | fp32 | 1 |" in engine_page and "### Baseline vs engine" in engine_page
    assert "torch" in (tmp_path / "run.log").read_text()


def test_pipeline_catalog_is_the_demo_synthesis(tmp_path):
    """The pipeline section's catalog: `tracks` 10 s 44.1 kHz stereo FLAC tracks in shards of
    `per_shard`, each track the demo's synthesis with its own seed (different audio per track)."""
    paths = bench_pipeline.write_catalog(tmp_path, 5, 2)
    assert [p.name for p in paths] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    with tarfile.open(paths[2]) as tar:
        assert tar.getnames() == ["bench-00004.flac", "bench-00004.json"]
    audio = {}
    for path in paths[:1]:
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".flac"):
                    samples, rate = sf.read(io.BytesIO(tar.extractfile(member).read()), dtype="float32")
                    audio[member.name] = samples
                    assert rate == TRACK_RATE and samples.shape == (round(WINDOW_SECONDS * TRACK_RATE), 2)
    assert list(audio) == ["bench-00000.flac", "bench-00001.flac"]
    expected = synthesize(WINDOW_SECONDS, TRACK_RATE, 2, 87, 163.0, 1)
    np.testing.assert_allclose(audio["bench-00001.flac"], expected, atol=1 / 32768)
    assert not np.allclose(audio["bench-00000.flac"], audio["bench-00001.flac"], atol=1e-3)


def test_memory_and_contention_sections_render_their_verdicts():
    settings = settings_from_args(build_parser().parse_args(["--quick", "--precisions", "fp32"]))
    report = BenchReport(settings=settings, machine={}, command="c", date="d")
    report.memory = [
        MemoryResult(60, 7, 900, 1000, 10.0, "HTSAT-tiny", 1, 2),
        MemoryResult(1800, 200, 950, 1500, 300.0, "HTSAT-tiny", 1, 2, segments=6),
    ]
    memory = "\n".join(render_memory(report))
    assert "| 30 min | 6 | 200 | 950 | 1500 | 550 | 1.50 | 300.0 |" in memory
    assert "**1.50** (target ≤ 1.20: NOT met)" in memory and "runtime.tracks_per_call" in memory
    report.contention = [Contention("engine HTSAT-tiny", 10.0, 60.0, 40.0), Contention("pipeline x", 5.0, 90.0, 5.0)]
    contention = "\n".join(render_contention(report))
    assert "| engine HTSAT-tiny | 10 | 60 | 40 | 20 |" in contention
    assert "during: engine HTSAT-tiny**" in contention  # pipeline rows never count as noisy
    assert minutes(90) == "1.5 min"


def test_runner_imports_no_pipeline_stack():
    """The GPU lease image (jobs/gpu_benchmark.sh) has torch and laion-clap but not Ray Data's stack:
    the engine, baseline and GPU sections must run without importing it."""
    code = "import sys, pipeline.bench.runner; print(sorted({'pyarrow', 'ray', 'fsspec', 'yaml'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_fixed_shape_benchmark_runs_and_compares(capsys):
    from pipeline.bench.fixed_shape import main as fixed_shape_main

    assert fixed_shape_main(["--batch", "2", "--steps", "1", "--repeats", "1", "--warmup", "0", "--threads", "2"]) == 0
    line = capsys.readouterr().out
    assert "fixed ÷ default time" in line and "same Δe: True" in line and "(random weights)" in line
