"""Whole tracks through TrackProtector on the real (random-weight) laion-clap encoder."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.core.engine import PGDParams
from pipeline.core.protect import Track, TrackProtector
from pipeline.demo import synthesize

EPS = 0.003


@pytest.fixture(scope="module")
def protector(tiny_encoder) -> TrackProtector:
    params = PGDParams(eps=EPS, alpha=0.0006, steps=2, sigma=EPS / 4, target_delta_e=0.5)
    return TrackProtector(
        tiny_encoder, params, window_seconds=10.0, overlap_seconds=1.0, batch_windows=4, seed=0, perceptual="linf"
    )


def _pcm16(samples: np.ndarray) -> np.ndarray:
    return (np.round(samples * 32768) / 32768).astype(np.float32)


def test_tracks_of_mixed_shapes_share_a_call(protector: TrackProtector) -> None:
    tracks = [
        Track("long-stereo", _pcm16(synthesize(12.5, 22050, 2, 120, 220.0)), 22050, "PCM_16"),
        Track("short-mono", _pcm16(synthesize(2.0, 16000, 1, 90, 330.0)), 16000, "PCM_16"),
        Track("float-6ch", synthesize(1.0, 8000, 6, 100, 200.0), 8000, "FLOAT"),
    ]
    results = protector.protect(tracks)
    assert [r.key for r in results] == [t.key for t in tracks]
    for track, result in zip(tracks, results):
        assert not result.error, result.error
        assert result.samples.shape == track.samples.shape
        diff = np.abs(result.samples.astype(np.float64) - track.samples)
        assert diff.max() <= EPS + 1e-7
        assert result.linf == pytest.approx(diff.max())
        assert result.delta_e_mean > 0 and result.delta_e_min <= result.delta_e_mean
        assert 0 < result.cos_mean < 1
        assert result.steps_mean == 2
        assert result.snr_db > 30
    assert results[0].n_windows == 2 and results[1].n_windows == 1
    pcm_grid = results[0].samples * 32768
    np.testing.assert_array_equal(pcm_grid, np.round(pcm_grid))  # written exactly as PCM_16


def test_same_seed_same_result(protector: TrackProtector) -> None:
    track = Track("a", _pcm16(synthesize(3.0, 16000, 1, 120, 220.0)), 16000, "PCM_16")
    first = protector.protect([track])[0]
    second = protector.protect([track])[0]
    np.testing.assert_array_equal(first.samples, second.samples)
    assert first.delta_e_mean == second.delta_e_mean


def test_silence_is_protected(protector: TrackProtector) -> None:
    track = Track("silence", np.zeros((16000, 1), dtype=np.float32), 16000, "PCM_16")
    result = protector.protect([track])[0]
    assert not result.error and np.abs(result.samples).max() <= EPS


def test_precision_resolution_warns_about_emulated_bf16(monkeypatch, caplog) -> None:
    import logging

    import torch

    from pipeline import api as stage

    cpu = torch.device("cpu")
    monkeypatch.setattr(stage, "native_low_precision", lambda device: False)
    monkeypatch.setattr("pipeline.encoders.load.native_low_precision", lambda device: False)
    assert stage.resolve_precision("auto", cpu) == "fp32"
    with caplog.at_level(logging.WARNING, logger=stage.logger.name):
        assert stage.resolve_precision("bf16", cpu) == "bf16"  # the user's choice stands...
    assert "emulated" in caplog.text and "attack.precision auto or fp32" in caplog.text  # ...with a warning
    caplog.clear()
    monkeypatch.setattr(stage, "native_low_precision", lambda device: True)
    monkeypatch.setattr("pipeline.encoders.load.native_low_precision", lambda device: True)
    with caplog.at_level(logging.WARNING, logger=stage.logger.name):
        assert stage.resolve_precision("bf16", cpu) == "bf16"
        assert stage.resolve_precision("fp32", cpu) == "fp32"
    assert caplog.text == ""


@pytest.mark.gpu
def test_spectral_protection_on_cuda_in_bf16_holds_the_bound() -> None:
    """The default method on the accelerator in bf16 autocast: the written δ stays inside ε, and the
    embedding moved, on the GPU and measured again on the CPU (same random weights) on the first 10 s."""
    import torch

    from pipeline.encoders.load import load_encoder

    encoder = load_encoder("random:HTSAT-tiny:0", device="cuda")
    params = PGDParams(eps=0.05, alpha=0.0, steps=5, sigma=0.0, precision="bf16")
    protector = TrackProtector(encoder, params, batch_windows=4, seed=0)
    track = Track("t", synthesize(12.0, 44_100, 2, 120, 220.0), 44_100, "FLOAT")
    [result] = protector.protect([track])
    assert not result.error, result.error
    assert np.abs(result.samples.astype(np.float64) - track.samples).max() <= 0.05 + 1e-7
    assert result.delta_e_mean > 0
    cpu = TrackProtector(load_encoder("random:HTSAT-tiny:0", device="cpu"), params, batch_windows=4)
    x = torch.from_numpy(np.ascontiguousarray(result.samples[:441_000].T))[None]
    clean = torch.from_numpy(np.ascontiguousarray(track.samples[:441_000].T))[None]
    lengths = torch.tensor([441_000])
    embed = cpu.embed_fn(44_100, lengths, ("clean48k",), random=False)
    with torch.no_grad():
        cpu_delta_e = (embed(x, torch.arange(1)) - embed(clean, torch.arange(1))).norm(dim=-1).item()
    assert cpu_delta_e > 0
