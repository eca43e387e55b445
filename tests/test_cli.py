"""The command line as a user runs it: embed, protect's argument handling, the demo, jobs/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jobs.protect_catalog import build_argv
from pipeline.cli import main
from tests.factories import audio_bytes

ROOT = Path(__file__).resolve().parents[1]


def test_embed_writes_one_unit_vector(tmp_path: Path, tiny_encoder, capsys) -> None:
    import torch

    from pipeline.encoders.base import ClapView
    from pipeline.io.audio import decode

    wav = tmp_path / "in.wav"
    wav.write_bytes(audio_bytes(3.0, 44100, 2))
    out = tmp_path / "e.npy"
    assert main(["embed", str(wav), "--checkpoint", "random:HTSAT-tiny:0", "--device", "cpu", "--out", str(out)]) == 0
    vector = np.load(out)
    assert vector.shape == (512,) and vector.dtype == np.float32
    assert abs(np.linalg.norm(vector) - 1) < 1e-5
    # Same as the 48 kHz mono repeat-padded view through the encoder directly.
    decoded = decode(wav.read_bytes())
    x = torch.from_numpy(decoded.samples.T.copy())[None]
    with torch.no_grad():
        expected = tiny_encoder.model(ClapView(44100)(x, torch.tensor([x.shape[-1]])))[0].numpy()
    np.testing.assert_allclose(vector, expected, atol=1e-5)
    assert "random" in capsys.readouterr().err.lower()


def test_protect_needs_input_and_output(tmp_path: Path, capsys) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("attack: {steps: 1}\n")
    assert main(["protect", "--config", str(cfg)]) == 2
    assert "io.input and io.output are required" in capsys.readouterr().err


def test_bad_override_is_a_clear_error(tmp_path: Path, capsys) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("{}\n")
    assert main(["protect", "--config", str(cfg), "--input", "x", "--output", "y", "--set", "attack.stepz=1"]) == 2
    assert "unknown key" in capsys.readouterr().err


def test_missing_input_is_a_clear_error(tmp_path: Path, capsys) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("{}\n")
    assert (
        main(
            [
                "protect",
                "--config",
                str(cfg),
                "--input",
                str(tmp_path / "nope"),
                "--output",
                str(tmp_path / "o"),
            ]
        )
        == 1
    )
    assert "not found" in capsys.readouterr().err


def test_job_entrypoint_reads_environment() -> None:
    argv = build_argv(
        ["--config", "/etc/u/config.yaml"],
        {"UNLEARNABLE_INPUT": "s3://a/in/", "AWS_ENDPOINT_URL": "http://s3:9000"},
    )
    assert argv == [
        "protect",
        "--config",
        "/etc/u/config.yaml",
        "--input",
        "s3://a/in/",
        "--set",
        "io.storage.endpoint_url=http://s3:9000",
    ]


@pytest.mark.slow
def test_demo_command_as_in_readme(tmp_path: Path) -> None:
    """`unlearnable demo` (README's first command) in a fresh process: real Ray, real laion-clap code."""
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "demo", "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "[2/2 shards]" in result.stdout
    assert "protects NOTHING" in result.stderr
    assert (tmp_path / "protected" / "shard-000001.stats.json").exists()
    assert "| ok                |        6 |" in result.stdout


def test_robustness_job_entrypoint_reads_environment() -> None:
    from jobs.robustness import build_argv as robustness_argv

    env = {"UNLEARNABLE_OUTPUT": "s3://a/out/", "UNLEARNABLE_INPUT": "s3://a/in/"}
    assert robustness_argv(["--count", "5"], env) == [
        "robustness", "--count", "5", "--input", "s3://a/out/", "--clean", "s3://a/in/"
    ]  # fmt: skip
    assert robustness_argv(["--input", "x", "--clean", "y"], env) == ["robustness", "--input", "x", "--clean", "y"]


def test_status_and_help_import_no_heavy_library(tmp_path: Path) -> None:
    """`status` and `--help` only read storage: torch, ray and the evaluation libraries stay out."""
    from tests.factories import write_shard

    write_shard(tmp_path / "in" / "s-000.tar", [("k.wav", audio_bytes(0.5, 16000, 1))])
    config = tmp_path / "c.yaml"
    config.write_text(f"io: {{input: {tmp_path / 'in'}, output: {tmp_path / 'out'}}}\n")
    heavy = ["torch", "ray", "matplotlib", "diffusers", "librosa", "transformers", "laion_clap"]
    script = (
        "import contextlib, io, sys\n"
        "from pipeline.cli import main\n"
        f"assert main(['status', '--config', {str(config)!r}]) == 0\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "    main(['--help'])\n"
        f"print(sorted(m for m in {heavy!r} if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "shards: 1 total, 0 complete, 1 pending" in done.stdout
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout
