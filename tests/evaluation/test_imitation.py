"""Imitation test harness: end to end at the smallest size (2 tracks, 3 training steps, 2 DDIM steps)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("diffusers") is None,
    reason="diffusers is not installed (pip install 'diffusers==0.42.1'); the imitation test needs it",
)

ROOT = Path(__file__).resolve().parents[2]
TINY = [
    "encoder.device=cpu",
    "catalog.styles=2",
    "catalog.seconds=1.28",
    "mel.crop_seconds=1.28",
    "attack.steps=1",
    "model.block_out_channels=[8, 16]",
    "model.down_block_types=[DownBlock2D, DownBlock2D]",
    "model.up_block_types=[UpBlock2D, UpBlock2D]",
    "model.norm_num_groups=4",
    "train.steps=3",
    "train.checkpoint_every=2",
    "train.threads=2",
    "sample.steps=2",
    "sample.griffin_lim_iters=2",
    "progress=false",
]


def test_configs_load():
    from pipeline.evaluation.imitation import load_imitation_config

    for name in ("imitation-cpu.yaml", "imitation-gpu.yaml"):
        cfg = load_imitation_config(ROOT / "configs" / name)
        assert cfg.mel.sample_rate == 16000 and cfg.mel.n_mels == 64 and cfg.mel.hop == 160
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError):
        load_imitation_config(None, ["mel.crop_seconds=1.01"])  # 101 frames: not divisible by 4
    with pytest.raises(ConfigError):
        load_imitation_config(None, ["model.nonsense=1"])


def test_styles_are_distinct():
    from pipeline.evaluation.imitation import STYLES, synthesize_style

    a = synthesize_style(STYLES[0], 1.0, 16000, seed=0)
    b = synthesize_style(STYLES[1], 1.0, 16000, seed=0)
    assert a.shape == (16000, 1) and a.dtype == np.float32
    assert np.abs(a).max() == pytest.approx(0.7, rel=1e-3)
    assert not np.allclose(a, b)
    assert np.array_equal(a, synthesize_style(STYLES[0], 1.0, 16000, seed=0))


def test_mel_front_end_and_griffin_lim():
    import torch

    from pipeline.evaluation.imitation import STYLES, MelFrontEnd, load_imitation_config, synthesize_style

    cfg = load_imitation_config(None, ["mel.crop_seconds=1.28"])
    front = MelFrontEnd(cfg.mel)
    x = synthesize_style(STYLES[2], 1.28, 16000, seed=1)[:, 0]
    logmel = front(torch.from_numpy(x)[None])
    assert logmel.shape == (1, 64, 128)
    audio = front.griffin_lim(logmel[0].numpy(), iters=4)
    assert audio.shape == (20480,) and np.isfinite(audio).all()


def test_imitate_end_to_end(tmp_path, capsys):
    import pyarrow.parquet as pq

    from pipeline.evaluation.imitation import MODELS, RANDOM_NOTE, main

    out = tmp_path / "imitation"
    # 4 tracks over 2 styles; partial coverage: one more imitator with half of each style protected
    argv = ["--make-catalog", "4", "--out", str(out), "--protected-share", "50,100"]
    for item in TINY:
        argv += ["--set", item]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[0] == RANDOM_NOTE

    for name in ("imitation.parquet", "imitation.md", "similarity.png", "summary.json", "prepared.pt"):
        assert (out / name).is_file(), name
    for model in MODELS:
        assert (out / f"ckpt-{model}.pt").is_file()
    assert (out / "imitation.md").read_text().splitlines()[0] == RANDOM_NOTE
    assert (out / "similarity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    rows = pq.read_table(out / "imitation.parquet").to_pylist()
    # 4 tracks × (4 models × 2 modes + the Griffin-Lim reference)
    assert len(rows) == 4 * 9
    assert {(r["model"], r["mode"]) for r in rows} >= {(m, "conditional") for m in MODELS}
    for column in ("sim_protecting", "sim_held_out", "sim_protecting_centred", "mel_l1", "mel_profile_l1"):
        assert all(np.isfinite(r[column]) for r in rows), column
    assert all(-1.0 <= r["sim_protecting"] <= 1.0 for r in rows)

    summary = json.loads((out / "summary.json").read_text())
    assert summary["first_line"] == RANDOM_NOTE
    assert set(summary["loss_end"]) == {*MODELS, "protected@50"}
    assert all(np.isfinite(v) for v in summary["loss_end"].values())
    assert set(summary["gaps"]) == {"clean − protected", "clean − noise", "noise − protected"}
    assert summary["condition_delta_e"]["protected"] > 0
    assert summary["encoders"] == {"protecting": "random:HTSAT-tiny:0", "held_out": "random:HTSAT-tiny:1"}

    assert (out / "ckpt-protected@50.pt").is_file()
    half = [r for r in rows if r["model"] == "protected@50" and r["mode"] == "conditional"]
    assert len(half) == 4 and sum(r["covered"] for r in half) == 2  # one of each style's two tracks
    assert all(r["covered"] for r in rows if r["model"] == "protected")
    assert not any(r["covered"] for r in rows if r["model"] in ("clean", "noise"))
    assert [c["model"] for c in summary["coverage"]] == ["clean", "protected@50", "protected"]
    assert [c["covered"] for c in summary["coverage"]] == [0, 2, 4]
    assert "| 50% | protected@50 | 4 (2) |" in (out / "imitation.md").read_text()

    import torch

    state = torch.load(out / "ckpt-clean.pt", weights_only=True)
    assert state["step"] == 3 and len(state["losses"]) == 3
    assert any(k.startswith("unet.") for k in state["model"])

    # A second run resumes: prepared data and finished checkpoints are reused, same numbers.
    capsys.readouterr()
    assert main(argv) == 0
    again = json.loads((out / "summary.json").read_text())
    assert again["loss_end"] == summary["loss_end"]


def test_attack_and_encoder_sections_are_the_jobs() -> None:
    """The imitation config's encoder/attack sections carry the job's keys; the protector's config
    is the job's PipelineConfig with this test's attack defaults and no extra statistics."""
    from pipeline.config import AttackConfig, EncoderConfig
    from pipeline.evaluation.imitation import load_imitation_config

    cfg = load_imitation_config(None, ["attack.strength=2", "encoder.held_out=random:HTSAT-tiny:5"])
    assert isinstance(cfg.attack, AttackConfig) and isinstance(cfg.encoder, EncoderConfig)
    job = cfg.attack.protect_config(cfg.encoder)
    assert type(job.attack) is AttackConfig and type(job.encoder) is EncoderConfig
    assert (job.attack.eps, job.attack.steps, job.attack.strength, job.attack.precision) == (0.003, 12, 2, "fp32")
    assert job.runtime.batch_windows == cfg.attack.batch_windows == 8
    assert not job.quality.musicldm_view and not job.quality.masking
    assert job.encoder.checkpoint == cfg.encoder.checkpoint and cfg.encoder.held_out == "random:HTSAT-tiny:5"


def test_partial_coverage_is_nested_per_style_and_mixes_rows() -> None:
    import torch

    from pipeline.evaluation.imitation.coverage import add_coverage, covered_items, parse_shares

    assert parse_shares("25,50,100") == (0.25, 0.5, 1.0)
    with pytest.raises(ValueError):
        parse_shares("0,50")
    styles = ["a"] * 4 + ["b"] * 8
    quarter, half = covered_items(styles, 0.25, 0), covered_items(styles, 0.5, 0)
    assert sum(quarter[:4]) == 1 and sum(quarter[4:]) == 2 and sum(half[:4]) == 2 and sum(half[4:]) == 4
    assert all(h for q, h in zip(quarter, half) if q), "a smaller share's tracks are a subset of a larger one's"
    n, crops = len(styles), 2
    data = {"styles": styles}
    for variant, value in (("clean", 0.0), ("protected", 1.0)):
        data[f"{variant}/wave"] = torch.full((n * crops, 5), value)
        data[f"{variant}/logmel"] = torch.full((n * crops, 3, 4), value)
        data[f"{variant}/cond"] = torch.full((n * crops, 6), value)
    assert add_coverage(data, (0.5, 1.0), crops, 0) == ["protected@50"]
    rows = torch.tensor(half).repeat_interleave(crops)
    for part in ("wave", "logmel", "cond"):
        mixed = data[f"protected@50/{part}"]
        assert torch.equal(mixed.flatten(1).mean(1), rows.float()), part
