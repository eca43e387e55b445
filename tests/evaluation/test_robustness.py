"""The robustness suite: each attack does what its name says (real ffmpeg, pedalboard, noisereduce,
soxr, scipy on short clips), the runner's figures are defined as documented, the CLI writes the
Parquet, Markdown and PNG, neural attacks without a checkpoint are reported as unmeasured."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.config import config_from_dict
from pipeline.evaluation.robustness import (
    MUSICLDM_VIEW,
    NEURAL,
    QUICK,
    SUITE,
    AttackError,
    AttackSpec,
    NeuralAttacks,
    evaluate,
    main,
    resolve,
    summary_table,
)

pytestmark = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg not installed (.ci/run installs it)")
RATE = 44_100


def _tone(freq: float = 440.0, seconds: float = 1.0, channels: int = 2, harmonic: float = 0.05) -> np.ndarray:
    t = np.arange(round(seconds * RATE)) / RATE
    x = 0.3 * np.sin(2 * np.pi * freq * t) + harmonic * np.sin(2 * np.pi * 3 * freq * t)
    return np.repeat(x[:, None], channels, axis=1).astype(np.float32)


def _peak_hz(x: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(x[:, 0]))
    return float(np.fft.rfftfreq(len(x), 1 / rate)[spectrum.argmax()])


def test_suite_covers_the_benchmark_ranges() -> None:
    families = {s.family for s in SUITE.values()}
    assert families >= {
        "mp3", "opus", "aac", "vorbis", "stretch", "pitch", "reverb", "compressor", "limiter", "lowshelf",
        "highshelf", "peak", "lowpass", "highpass", "noise", "smooth", "quantise", "denoise", "resample", "chain",
    }  # fmt: skip
    strengths = {f: {s.strength for s in SUITE.values() if s.family == f} for f in families}
    assert {"8", "320"} <= strengths["mp3"] and {"6", "96"} <= strengths["opus"]
    assert {"0.8", "1.25"} <= strengths["stretch"] and {"-2", "+2"} <= strengths["pitch"]
    assert {"40db", "10db"} <= strengths["noise"] and "16k" in strengths["resample"]
    assert set(QUICK) <= set(SUITE)
    assert resolve(["mp3", "noise_10db"], list(NEURAL))[:5] == [f"mp3_{k}" for k in (8, 32, 64, 128, 320)]
    assert resolve(None, list(NEURAL))[-len(NEURAL) - 1 :] == [MUSICLDM_VIEW, *NEURAL]
    with pytest.raises(ValueError, match="unknown attack"):
        resolve(["mp3_999"], list(NEURAL))


def test_codecs_go_through_ffmpeg_and_lower_bitrates_hurt_more() -> None:
    x = _tone(seconds=2.0) + 0.02 * np.random.default_rng(0).standard_normal((2 * RATE, 2)).astype(np.float32)
    errors = {}
    for name in ("mp3_8", "mp3_320", "opus_6", "opus_96", "aac_32", "vorbis_192"):
        y, rate = SUITE[name].fn(x, RATE, 0)
        assert rate == RATE and y.shape == x.shape and np.isfinite(y).all()
        errors[name] = float(np.linalg.norm(y - x) / np.linalg.norm(x))
        assert errors[name] > 1e-4, name  # a real lossy round trip changed the samples
    assert errors["mp3_8"] > errors["mp3_320"] and errors["opus_6"] > errors["opus_96"]


def test_effects_do_what_their_names_say() -> None:
    x = _tone()
    y, _ = SUITE["pitch_+2"].fn(x, RATE, 0)
    assert len(y) == len(x) and _peak_hz(y, RATE) / 440.0 == pytest.approx(2 ** (2 / 12), rel=0.02)
    y, _ = SUITE["stretch_1.25"].fn(x, RATE, 0)
    assert len(y) == pytest.approx(len(x) / 1.25, rel=0.01) and _peak_hz(y, RATE) == pytest.approx(440.0, rel=0.02)
    y, _ = SUITE["noise_10db"].fn(x, RATE, 7)
    snr = 10 * np.log10(np.mean(x.astype(np.float64) ** 2) / np.mean((y - x).astype(np.float64) ** 2))
    assert snr == pytest.approx(10.0, abs=0.3)
    assert np.array_equal(SUITE["noise_10db"].fn(x, RATE, 7)[0], y), "a seed fixes the draw"
    y, _ = SUITE["quantise_8bit"].fn(x, RATE, 0)
    assert np.allclose(y * 128, np.round(y * 128), atol=1e-4)
    hf = _tone(12_000.0, harmonic=0.0)
    mid = slice(RATE // 4, -RATE // 4)  # away from the filters' edge transients
    assert np.abs(SUITE["lowpass_8k"].fn(hf, RATE, 0)[0][mid]).max() < 0.01 * np.abs(hf).max()
    assert np.abs(SUITE["resample_16k"].fn(hf, RATE, 0)[0][mid]).max() < 0.02 * np.abs(hf).max()
    assert np.abs(SUITE["highpass_1000"].fn(_tone(100.0, harmonic=0.0), RATE, 0)[0][mid]).max() < 0.05
    burst = np.zeros_like(x)
    burst[:2000] = x[:2000]
    assert np.abs(SUITE["reverb_0.9"].fn(burst, RATE, 0)[0][RATE // 2 :]).max() > 1e-3  # a tail where there was silence
    loud = _tone() * 3
    assert np.abs(SUITE["compressor_-30db_8to1"].fn(loud, RATE, 0)[0]).max() < 0.8 * np.abs(loud).max()
    for name in ("lowshelf_+6db", "highshelf_-6db", "peak_+6db", "smooth_15", "limiter_-6db"):
        y, _ = SUITE[name].fn(x, RATE, 0)
        assert y.shape == x.shape and not np.allclose(y, x, atol=1e-4), name
    noisy = x.copy()
    noisy[RATE // 2 :] = 0.0
    noisy += 0.01 * np.random.default_rng(1).standard_normal(noisy.shape).astype(np.float32)
    gated, _ = SUITE["denoise_stationary"].fn(noisy, RATE, 0)
    assert np.mean(gated[RATE // 2 + 4096 :] ** 2) < 0.3 * np.mean(noisy[RATE // 2 + 4096 :] ** 2)


def test_training_chain_resamples_normalises_and_crops() -> None:
    x = _tone()
    y, rate = SUITE["chain_train16k"].fn(x, RATE, 3)
    assert rate == 16_000 and np.abs(y).max() == pytest.approx(0.5, abs=1e-4)
    assert 16_000 - int(0.24 * 16_000) <= len(y) <= 16_000


def test_neural_attacks_need_a_local_checkpoint(tmp_path: Path) -> None:
    neural = NeuralAttacks({"encodec": str(tmp_path / "missing")})
    assert not neural.available("encodec") and "not found" in neural.why("encodec")
    assert not neural.available("demucs") and "--checkpoint demucs=PATH" in neural.why("demucs")
    with pytest.raises(ValueError, match="no neural attack"):
        NeuralAttacks({"wavegan": "x"})


def test_cli_two_runs_side_by_side(protected_run, tmp_path: Path, capsys, monkeypatch) -> None:
    clean, protected = protected_run

    def broken(x: np.ndarray, rate: int, seed: int):
        raise AttackError("ffmpeg refused the input")

    monkeypatch.setitem(SUITE, "broken_1", AttackSpec("broken_1", "broken", "1", "none", broken))
    out = tmp_path / "report"
    args = ["--input", str(protected), "--label", "a", "--compare", f"b={protected}", "--clean", str(clean)]
    args += [
        "--count",
        "1",
        "--attacks",
        "resample_44k,noise_20db,encodec,broken_1",
        "--mos-seconds",
        "1.5",
        "--out",
        str(out),
    ]
    args += ["--set", "encoder.checkpoint=random:HTSAT-tiny:0", "--set", "encoder.device=cpu"]
    assert main(args) == 0
    rows = pq.read_table(out / "robustness.parquet").to_pylist()
    attacks = ("resample_44k", "noise_20db", "encodec", "broken_1")
    assert {(r["run"], r["attack"]) for r in rows} == {(run, a) for run in "ab" for a in attacks}
    broken_rows = [r for r in rows if r["attack"] == "broken_1"]
    assert all(r["error"] == "AttackError: ffmpeg refused the input" and r["delta_e_before"] > 0 for r in broken_rows)
    measured = [r for r in rows if not r["error"]]
    for r in measured:
        assert r["retained"] == pytest.approx(r["delta_e_attacked"] / r["delta_e_before"])
        assert r["above_target"] == (r["delta_e_attacked"] >= 0.5)
        if r["run"] == "a":  # ViSQOL scores the first run's attacked audio
            assert 1.0 <= r["mos_lqo"] <= 4.75
        else:
            assert math.isnan(r["mos_lqo"])
    resample = [r for r in measured if r["attack"] == "resample_44k"]  # 44.1 kHz -> 44.1 kHz: the identity
    assert all(r["retained"] == pytest.approx(1.0, abs=1e-4) and r["delta_e_attack_on_clean"] < 1e-4 for r in resample)
    noise = [r for r in measured if r["attack"] == "noise_20db"]
    assert all(r["delta_e_attack_on_clean"] > 0 for r in noise)
    assert all(r["mos_lqo"] < 4.5 for r in noise if r["run"] == "a")
    assert all(r["error"].startswith("unmeasured: needs a local checkpoint") for r in rows if r["attack"] == "encodec")
    text = (out / "robustness.md").read_text()
    assert text.startswith("RANDOM CLAP WEIGHTS") and "retained `a`" in text and "gain `b` − `a`" in text
    assert (
        "| encodec | unmeasured" in text
        and "| broken_1 | AttackError: ffmpeg refused" in text
        and "| noise_20db |" in capsys.readouterr().out
    )
    assert (out / "robustness.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "- `a`: 1 items" in text and "EOT views ['clean48k']" in text and "measured (interleaved" in text


@pytest.mark.slow
def test_every_attack_runs_on_a_protected_item(protected_run) -> None:
    """One strength of every attack family (each family's code path; the strengths of a family
    differ only in a parameter, and test_suite_covers_the_benchmark_ranges checks the ranges),
    MusicLDM's view, and the neural attacks without a checkpoint."""
    clean, protected = protected_run
    cfg = config_from_dict({"encoder": {"checkpoint": "random:HTSAT-tiny:0", "device": "cpu"}})
    families: dict[str, str] = {}
    for spec in SUITE.values():
        families.setdefault(spec.family, spec.name)
    chosen = {*families.values(), "mp3_320", "resample_44k", "mp3_8", "denoise_nonstationary", MUSICLDM_VIEW, *NEURAL}
    rows = evaluate(cfg, {"p": str(protected)}, str(clean), count=1, attacks=sorted(chosen), mos_seconds=0.0)
    assert {r.attack for r in rows} == chosen
    failed = [(r.attack, r.error) for r in rows if r.error and not r.error.startswith("unmeasured")]
    assert not failed, failed
    for row in rows:
        if not row.error:
            assert row.delta_e_before > 0 and math.isfinite(row.delta_e_attacked) and row.delta_e_attacked >= 0
    mild = {r.attack: r.retained for r in rows if r.attack in ("mp3_320", "resample_44k")}
    assert mild["resample_44k"] == pytest.approx(1.0, abs=1e-3) or mild["resample_44k"] > 0.9
    assert mild["mp3_320"] > 0.3
    assert "| mp3_8 |" in summary_table(rows, 0.5)


def test_encodec_attack_runs_from_a_local_checkpoint(tmp_path: Path) -> None:
    """The neural-codec path on a tiny randomly initialised EncodecModel saved like a real one
    (save_pretrained): the code path a downloaded checkpoint takes, not a measurement."""
    transformers = pytest.importorskip("transformers")
    config = transformers.EncodecConfig(
        sampling_rate=16_000, audio_channels=1, num_filters=4, hidden_size=16, codebook_size=64, codebook_dim=16,
        upsampling_ratios=[4, 4, 2, 2], target_bandwidths=[1.5], num_lstm_layers=1, compress=2,
    )  # fmt: skip
    transformers.EncodecModel(config).save_pretrained(tmp_path / "encodec")
    neural = NeuralAttacks({"encodec": str(tmp_path / "encodec")})
    assert neural.available("encodec")
    x = _tone(seconds=1.0)
    y, rate = neural.run("encodec", x, RATE)
    assert rate == 16_000 and y.shape == (16_000, 2) and y.dtype == np.float32 and np.isfinite(y).all()
    assert not np.allclose(y, 0.0)
