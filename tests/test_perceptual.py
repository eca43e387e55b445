"""Masking model sanity, perceptual PGD, EOT through the MusicLDM view, quality figures."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from pipeline.demo import synthesize
from pipeline.engine import PGDParams
from pipeline.perceptual import absolute_threshold_db, audibility, masking_threshold, project_below_threshold
from pipeline.protect import Track, TrackProtector
from pipeline.quality import pesq_wb, segmental_snr_db, stoi
from pipeline.views import CODEC_VIEW, VIEWS, musicldm, peak_normalise, round_trip

RATE = 16_000


def _db_at(threshold: torch.Tensor, hz: float, frame: int = 10) -> float:
    bin_index = round(hz / (RATE / 2) * (threshold.shape[1] - 1))
    return 10 * torch.log10(threshold[0, bin_index, frame]).item()


def test_pure_tone_masks_its_neighbourhood_not_distant_bands() -> None:
    t = torch.arange(RATE) / RATE
    tone = 0.5 * torch.sin(2 * torch.pi * 1000 * t)[None]
    threshold = masking_threshold(tone, RATE)
    quiet = masking_threshold(torch.zeros(1, RATE), RATE)
    near, far_low, far_high = _db_at(threshold, 1000), _db_at(threshold, 200), _db_at(threshold, 6000)
    assert near > _db_at(quiet, 1000) + 30  # the tone raises the threshold around itself a lot
    assert _db_at(threshold, 1100) > _db_at(quiet, 1100) + 20
    assert far_low == pytest.approx(_db_at(quiet, 200), abs=1.0)  # distant bands: threshold in quiet
    assert far_high == pytest.approx(_db_at(quiet, 6000), abs=1.0)
    assert _db_at(quiet, 1000) == pytest.approx(absolute_threshold_db(torch.tensor(1000.0)).item(), abs=0.5)


def test_projection_lowers_audibility() -> None:
    g = torch.Generator().manual_seed(0)
    clean = torch.from_numpy(synthesize(1.0, RATE, 1, 120, 220.0)[:, 0])[None]
    delta = 0.003 * (torch.rand(1, RATE, generator=g) * 2 - 1)
    threshold = masking_threshold(clean, RATE)
    shaped = project_below_threshold(delta, threshold, RATE)
    before, after = audibility(clean, delta, RATE), audibility(clean, shaped, RATE)
    assert after.energy_above_share.item() < 0.5 * before.energy_above_share.item()
    assert after.nmr_db.item() < before.nmr_db.item() - 3


def _protector(tiny_encoder, **kwargs) -> TrackProtector:
    params = PGDParams(eps=0.003, alpha=0.0006, steps=kwargs.pop("steps", 3), sigma=0.00075)
    return TrackProtector(tiny_encoder, params, batch_windows=2, **kwargs)


def test_masking_mode_is_less_audible_than_linf_at_equal_eps(tiny_encoder) -> None:
    samples = synthesize(4.0, RATE, 1, 120, 220.0)
    track = Track("t", samples, RATE, "FLOAT")
    linf = _protector(tiny_encoder, perceptual="linf").protect([track])[0]
    masked = _protector(tiny_encoder, perceptual="masking").protect([track])[0]
    assert not linf.error and not masked.error
    assert masked.linf <= 0.003 + 1e-7
    assert masked.mask_energy_above < linf.mask_energy_above
    assert masked.nmr_db < linf.nmr_db - 3
    assert masked.delta_e_mean > 0


def test_musicldm_view_matches_its_definition() -> None:
    x = torch.randn(2, 480_000) * 0.1
    view = musicldm(x, None)
    expected = peak_normalise(round_trip(x, 16_000))
    torch.testing.assert_close(view, expected)
    assert view.abs().amax(dim=-1).max().item() == pytest.approx(0.5, abs=1e-5)
    spectrum = torch.fft.rfft(view[0]).abs()
    assert spectrum[int(9000 / 24_000 * spectrum.shape[0]) :].max() < 1e-2 * spectrum.max()  # nothing above 8 kHz
    for name, fn in VIEWS.items():
        if CODEC_VIEW.match(name) and shutil.which("ffmpeg") is None:
            continue  # codec views run the ffmpeg binary (tests/test_lossy.py covers them with it)
        assert fn(x, torch.Generator().manual_seed(0)).shape == x.shape, name


@pytest.mark.slow
def test_eot_retains_more_delta_e_after_16k_round_trip(tiny_encoder) -> None:
    """Optimising through the MusicLDM view keeps more Δe in that view than optimising without it."""
    samples = synthesize(10.0, 48_000, 1, 120, 220.0)
    track = Track("t", samples, 48_000, "FLOAT")
    plain = _protector(tiny_encoder, steps=6, eot_views=("clean48k",)).protect([track])[0]
    eot = _protector(tiny_encoder, steps=6, eot_views=("musicldm",)).protect([track])[0]
    assert not plain.error and not eot.error
    assert eot.delta_e_musicldm > plain.delta_e_musicldm


def test_quality_figures() -> None:
    clean = synthesize(3.0, 44_100, 2, 120, 220.0)
    rng = np.random.default_rng(0)
    slight = clean + rng.uniform(-0.001, 0.001, clean.shape).astype(np.float32)
    heavy = clean + rng.uniform(-0.1, 0.1, clean.shape).astype(np.float32)
    assert segmental_snr_db(clean, slight, 44_100) > segmental_snr_db(clean, heavy, 44_100)
    assert 1.0 <= pesq_wb(clean, heavy, 44_100) < pesq_wb(clean, slight, 44_100) <= 4.7
    assert stoi(clean, slight, 44_100) > stoi(clean, heavy, 44_100)
    assert np.isnan(pesq_wb(np.zeros_like(clean), np.zeros_like(clean), 44_100))


def test_passband_keeps_delta_below_cutoff(tiny_encoder) -> None:
    rate = 48_000
    track = Track("t", synthesize(2.0, rate, 1, 120, 220.0), rate, "FLOAT")
    result = _protector(tiny_encoder, steps=2, passband_hz=8000.0).protect([track])[0]
    assert not result.error and result.linf <= 0.003 + 1e-7
    delta = (result.samples - track.samples)[:, 0].astype(np.float64)
    spectrum = np.abs(np.fft.rfft(delta)) ** 2
    freqs = np.fft.rfftfreq(delta.shape[0], 1 / rate)
    above = spectrum[freqs > 9000].sum() / spectrum.sum()
    assert above < 0.05  # the ε clip after the low-pass leaks a little; plain sign steps are ~80 % up there
