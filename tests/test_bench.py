"""Smoke tests of the benchmark (pipeline/bench.py): argument handling, report rendering, and the
engine + baseline measurements at the smallest size (HTSAT-tiny, 1 step, batch 1)."""

from __future__ import annotations

import math

import pytest

from pipeline import bench


def test_parser_quick_and_full_profiles(monkeypatch):
    monkeypatch.setattr("pipeline.encoders.load.native_low_precision", lambda device: True)
    quick = bench.settings_from_args(bench.build_parser().parse_args(["--quick"]))
    assert quick.amodels == ["HTSAT-tiny"]
    assert quick.steps == 2 and quick.batch_sizes == [1, 2]
    assert quick.pipeline_tracks == 2 and quick.memory_seconds == [60.0, 180.0]
    assert bench.choose_pipeline_batch(quick) == 1  # two shards of one track

    full = bench.settings_from_args(
        bench.build_parser().parse_args(["--amodels", "HTSAT-base", "--steps", "3", "--batch-sizes", "4,1,2"])
    )
    assert full.amodels == ["HTSAT-base"] and full.steps == 3
    assert full.batch_sizes == [1, 2, 4]
    assert full.precisions == ["fp32", "bf16"]
    assert bench.choose_pipeline_batch(full) == 4  # 12 tracks: three shards of four
    assert full.pipeline_steps == 50 and full.pipeline_precisions == ["bf16"]
    assert full.pipeline_placements == ["dedicated", "shared"]

    assert full.precision_note == ""

    # bf16 emulated (an AVX2-only CPU): the defaults time fp32 alone and say why; explicit wins
    monkeypatch.setattr("pipeline.encoders.load.native_low_precision", lambda device: False)
    emulated = bench.settings_from_args(bench.build_parser().parse_args(["--device", "cpu"]))
    assert emulated.precisions == ["fp32"] and emulated.pipeline_precisions == ["fp32"]
    assert "bf16 left out" in emulated.precision_note
    explicit = bench.settings_from_args(bench.build_parser().parse_args(["--precisions", "fp32,bf16"]))
    assert explicit.precisions == ["fp32", "bf16"] and explicit.pipeline_precisions == ["fp32"]
    assert explicit.precision_note == ""

    with pytest.raises(ValueError):
        bench.settings_from_args(bench.build_parser().parse_args(["--precisions", "int8"]))
    assert bench.main(["--parts", "nonsense"]) == 2
    assert bench.main(["--pipeline-placements", "nowhere"]) == 2


def test_placements_and_measurement_forwards(monkeypatch):
    monkeypatch.setattr(bench.os, "cpu_count", lambda: 8)
    assert bench.actor_threads("dedicated") == 7 and bench.actor_threads("shared") == 8
    assert bench.actor_threads("dedicated", "cuda:0") == 1
    monkeypatch.setattr(bench.os, "cpu_count", lambda: 1)
    assert bench.actor_threads("dedicated") == 1  # never zero threads
    with pytest.raises(ValueError):
        bench.actor_threads("elsewhere")
    cfg = bench.pipeline_config(bench.Path("in"), bench.Path("out"), "HTSAT-tiny", 2, "bf16", 4, "cpu", "dedicated")
    assert cfg.runtime.torch_threads == 1 and cfg.runtime.num_cpus_per_actor == 1.0
    # the written audio; the clean audio again unless pgd's e(x) was fp32; the MusicLDM view of both
    assert bench.measurement_forwards("fp32") == 3 and bench.measurement_forwards("bf16") == 4
    assert bench.measurement_forwards("fp32", musicldm_view=False) == 1


def test_render_from_synthetic_results():
    settings = bench.settings_from_args(bench.build_parser().parse_args(["--quick"]))
    report = bench.BenchReport(settings=settings, machine={"CPU": "test"}, command="python -m pipeline.bench", date="d")
    report.engine = [
        bench.EngineResult("HTSAT-tiny", "fp32", 1, 2, 1.0),
        bench.EngineResult("HTSAT-tiny", "bf16", 2, 2, 1.0),
    ]
    report.forward = [bench.ForwardResult("HTSAT-tiny", 1, 0.1)]
    report.baseline = [bench.BaselineResult("HTSAT-tiny", 2, 2.0)]
    report.pipeline = [
        bench.PipelineResult(
            "HTSAT-tiny", "fp32", 1, 2, tracks=2, shards=2, windows=2, ok=2, wall_seconds=4.0,
            steady_seconds=1.25, steady_windows=1, engine_windows_per_s=1.0, extra_forward_seconds=0.1,
            placement="dedicated", actor_threads=1,
        )
    ]  # fmt: skip
    report.memory = [
        bench.MemoryResult(60, 7, 900, 1000, 10.0, "HTSAT-tiny", 1, 2),
        bench.MemoryResult(180, 20, 950, 1100, 30.0, "HTSAT-tiny", 1, 2),
    ]
    p = report.pipeline[0]
    assert p.windows_per_s == pytest.approx(0.8)
    assert p.efficiency == pytest.approx(0.8)
    assert p.efficiency_equivalent == pytest.approx(0.88)
    text = bench.render_markdown(report)
    assert "4.00× (bf16, B=2)" in text  # best engine 2 windows/s vs baseline 0.5
    assert "**1.10**" in text and "(target ≤ 1.20: met)" in text
    assert bench.GPU_NOT_AVAILABLE in text
    assert "python -m pipeline.bench" in text
    assert "**0.800** NOT met" in text  # dedicated rows carry the ≥ 0.9 verdict
    assert report.to_dict()["pipeline"][0]["efficiency"] == pytest.approx(0.8)


def test_gpu_section_renders_every_mode():
    settings = bench.settings_from_args(bench.build_parser().parse_args(["--gpu-modes", "eager,cudagraphs"]))
    assert settings.gpu_modes == ["eager", "cudagraphs"]
    with pytest.raises(ValueError):
        bench.settings_from_args(bench.build_parser().parse_args(["--gpu-modes", "eager,graphs"]))
    report = bench.BenchReport(settings=settings, machine={"GPU": "test"}, command="c", date="d")
    report.gpu_note = "GPU: test card"
    report.gpu = [
        bench.GpuResult(8, 50, "bf16", 2.0, 600.0),
        bench.GpuResult(16, 50, "bf16", float("nan"), 600.0, error="out of memory: x"),
        bench.GpuResult(8, 50, "bf16", 1.0, 600.0, mode="cudagraphs", compile_seconds=42.0),
    ]
    assert report.gpu[2].windows_per_s == pytest.approx(8.0) and report.gpu[2].realtime == pytest.approx(80.0)
    text = bench.render_tables(report)
    gpu_rows = [line for line in text.splitlines() if line.startswith(("| eager", "| cudagraphs"))]
    assert len(gpu_rows) == 3
    assert gpu_rows[2].startswith("| cudagraphs | 8 | 50 | bf16 | 42.0 | 1.000 | 8.00 | 80 |")
    assert "out of memory" in gpu_rows[1]


@pytest.mark.parametrize("mode", bench.GPU_MODES)
def test_gpu_embed_modes_give_eager_pgd(mode):
    """Each GPU mode's embed (on CPU the CUDA graphs are skipped, the wrapper is not) gives pgd the
    same δ as the eager model: gradients reach the input through the compiled call and the copy."""
    import torch

    from pipeline.core.engine import PGDParams, pgd

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.Tanh(), torch.nn.Linear(16, 8))
    model.requires_grad_(False)

    def view(x):  # [B, 1, 64] -> [B, 64]
        return x.mean(dim=1)

    x = torch.rand(3, 1, 64) - 0.5
    params = PGDParams(eps=0.05, alpha=0.01, steps=3, sigma=0.01)
    expected = pgd(bench.gpu_embed(model, view, "eager"), x, params, generator=torch.Generator().manual_seed(1))
    got = pgd(bench.gpu_embed(model, view, mode), x, params, generator=torch.Generator().manual_seed(1))
    assert torch.equal(got.steps, expected.steps)
    torch.testing.assert_close(got.delta, expected.delta, atol=1e-6, rtol=0)
    torch.testing.assert_close(got.delta_e, expected.delta_e, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError):
        bench.gpu_embed(model, view, "graphs")


def test_engine_and_baseline_smallest(tiny_encoder):
    engine, forward = bench.bench_engine(
        "HTSAT-tiny", 1, [1], ["fp32"], device="cpu", repeats=1, warmup=0, encoder=tiny_encoder
    )
    assert [(e.amodel, e.precision, e.batch, e.steps, e.compiled) for e in engine] == [
        ("HTSAT-tiny", "fp32", 1, 1, False)
    ]
    for value in (engine[0].seconds, engine[0].windows_per_s, engine[0].steps_per_s, engine[0].realtime):
        assert value > 0 and math.isfinite(value)
    assert len(forward) == 1 and forward[0].seconds_per_window > 0

    baseline = bench.bench_baseline("HTSAT-tiny", 1, device="cpu", repeats=1, warmup=0)
    assert baseline.amodel == "HTSAT-tiny" and baseline.steps == 1
    assert baseline.seconds_per_window > 0 and baseline.windows_per_s > 0


@pytest.mark.slow
def test_memory_child_process():
    result = bench.bench_memory(20.0, amodel="HTSAT-tiny", steps=0, batch=2, threads=2)
    assert result.windows == 3
    assert result.peak_mib >= result.rss_before_mib > 0
    assert result.protect_seconds > 0


def test_gpu_benchmark_script_dry_run_on_cpu(tmp_path):
    """jobs/gpu_benchmark.sh, the prepared GPU lease script, run on the CPU with the smallest
    settings: both parts write their tables and the log, and the exit status is the parts'."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
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
    assert bench.GPU_NOT_AVAILABLE in (tmp_path / "gpu.md").read_text()
    engine_page = (tmp_path / "engine.md").read_text()
    assert "| HTSAT-tiny | fp32 | 1 |" in engine_page and "### Baseline vs engine" in engine_page
    assert "torch" in (tmp_path / "run.log").read_text()
