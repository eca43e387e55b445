"""Masking model sanity, perceptual PGD, EOT through the MusicLDM view, quality figures."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from pipeline.config import STRENGTH_MARGIN_DB
from pipeline.core.engine import PGDParams, SpectralParams, spectral_attack
from pipeline.core.perceptual import (
    LEGACY_MASKING,
    MaskingConfig,
    absolute_threshold_db,
    allowed_amplitude,
    audibility,
    bin_frequencies,
    masking_threshold,
    project_below_threshold,
)
from pipeline.core.protect import Track, TrackProtector
from pipeline.core.quality import pesq_wb, segmental_snr_db, stoi
from pipeline.core.views import CODEC_VIEW, VIEWS, musicldm, peak_normalise, round_trip
from pipeline.demo import synthesize

RATE = 16_000


def _db_at(threshold: torch.Tensor, hz: float, frame: int = 10) -> float:
    bin_index = round(hz / (RATE / 2) * (threshold.shape[1] - 1))
    return 10 * torch.log10(threshold[0, bin_index, frame]).item()


def test_pure_tone_masks_its_neighbourhood_not_distant_bands() -> None:
    t = torch.arange(RATE) / RATE
    tone = 0.5 * torch.sin(2 * torch.pi * 1000 * t)[None]
    legacy = masking_threshold(tone, RATE, LEGACY_MASKING)
    threshold = masking_threshold(tone, RATE)
    quiet = masking_threshold(torch.zeros(1, RATE), RATE, LEGACY_MASKING)
    assert _db_at(quiet, 1000) == pytest.approx(absolute_threshold_db(torch.tensor(1000.0)).item(), abs=0.5)
    for model in (legacy, threshold):
        assert _db_at(model, 1000) > _db_at(quiet, 1000) + 30  # the tone raises the threshold around itself
    assert _db_at(legacy, 1100) > _db_at(quiet, 1100) + 20  # legacy: spread fills the next (empty) band
    assert (threshold <= legacy * 1.0001).all()  # the music-relative model never gives more budget
    # Distant bands: the legacy model hands them the threshold in quiet; the music-relative model
    # gives them nothing above the 16-bit noise floor, since the tone leaves them empty.
    for hz in (200, 6000):
        assert _db_at(legacy, hz) == pytest.approx(_db_at(quiet, hz), abs=1.0)
        assert _db_at(threshold, hz) == pytest.approx(MaskingConfig().noise_floor_db, abs=0.5)
        assert _db_at(threshold, hz) < _db_at(quiet, hz) - 10


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
    kwargs.setdefault("perceptual", "linf")
    kwargs.setdefault("passband_hz", None)
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
            continue  # codec views run the ffmpeg binary (tests/io/test_lossy.py covers them with it)
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


# --------------------------------------------------------------------------- the model after issue 15


def _band_limited_noise(seconds: float, rate: int, cutoff_hz: float, seed: int = 0) -> torch.Tensor:
    """Music-like stand-in with nothing above `cutoff_hz`: white noise at -20 dBFS, low-passed."""
    import julius

    g = torch.Generator().manual_seed(seed)
    noise = 0.1 * torch.randn(1, round(seconds * rate), generator=g)
    return julius.lowpass_filter(noise, cutoff_hz / rate)


def test_empty_bands_get_no_budget_from_the_threshold_in_quiet() -> None:
    """Above a band-limited track's cutoff the legacy model's budget is the threshold in quiet on
    the 96 dB SPL convention; the new one gives nothing beyond a dithered 16-bit floor there."""
    rate = 44_100
    clean = _band_limited_noise(2.0, rate, 8000.0)
    new, legacy = masking_threshold(clean, rate), masking_threshold(clean, rate, LEGACY_MASKING)
    freqs = bin_frequencies(rate, MaskingConfig())
    empty = freqs > 14_000
    floor = 10 ** (MaskingConfig().noise_floor_db / 10)
    assert new[0, empty, 5:-5].max().item() <= floor * 1.001
    assert legacy[0, empty, 5:-5].min().item() > 100 * floor  # > 20 dB more budget where the music has nothing
    music = (freqs > 500) & (freqs < 6000)  # where the music is: both models mask alike (no quiet floor effect)
    ratio = (new[0, music, 5:-5] / legacy[0, music, 5:-5]).median().item()
    assert 0.5 < ratio <= 1.0 + 1e-6


def test_budget_is_zero_above_the_passband_and_follows_the_margin() -> None:
    rate = 44_100
    threshold = masking_threshold(_band_limited_noise(1.0, rate, 16_000.0), rate)
    full = allowed_amplitude(threshold, rate)
    lower = allowed_amplitude(threshold, rate, margin_db=-6.0, passband_hz=8000.0)
    freqs = bin_frequencies(rate, MaskingConfig())
    assert lower[0, freqs > 8000].abs().max().item() == 0.0
    below = freqs <= 8000
    torch.testing.assert_close(lower[0, below], full[0, below] * 10 ** (-6 / 20))


def _spectral(tiny_encoder, x: torch.Tensor, rate: int, steps: int, margin_db: float, eps: float = 0.05):
    protector = TrackProtector(tiny_encoder, PGDParams(eps, 0.0, steps, 0.0), perceptual="spectral",
                               margin_db=margin_db, passband_hz=14_000.0)  # fmt: skip
    budget = protector.budget(x, rate)
    embed = protector.embed_fn(rate, torch.tensor([x.shape[-1]] * x.shape[0]), ("clean48k",), random=False)
    params = SpectralParams(eps=eps, steps=steps, lr=0.1)
    noise = torch.randn((*budget.shape, 2), generator=torch.Generator().manual_seed(0))
    return spectral_attack(embed, x, budget, params, noise=noise), budget


def test_spectral_attack_holds_the_budget_and_the_cap(tiny_encoder) -> None:
    rate = 44_100
    x = _band_limited_noise(3.0, rate, 8000.0)[None]  # [1, 1, samples]
    start, _ = _spectral(tiny_encoder, x, rate, steps=0, margin_db=-3.0)
    result, _ = _spectral(tiny_encoder, x, rate, steps=3, margin_db=-3.0)
    again, _ = _spectral(tiny_encoder, x, rate, steps=3, margin_db=-3.0)
    delta = result.delta[0]
    torch.testing.assert_close(delta, again.delta[0])  # deterministic for given start weights
    assert result.delta_e.item() > start.delta_e.item() > 0  # Adam moved the embedding further than δ₀
    assert delta.abs().max().item() <= 0.05 + 1e-7
    assert 0.0 <= result.capped_share.item() <= 1.0
    # Measured against the clean signal's threshold, δ stays under it (3 dB margin, leakage included).
    masked = audibility(x[0], delta, rate)
    assert masked.nmr_db.item() < 0.0
    # Nothing above the 14 kHz passband, nothing to speak of above the music's 8 kHz.
    spectrum = torch.fft.rfft(delta[0].double()).abs() ** 2
    freqs = torch.fft.rfftfreq(delta.shape[-1], 1 / rate)
    assert spectrum[freqs > 14_500].sum() / spectrum.sum() < 1e-4
    assert spectrum[freqs > 9_000].sum() / spectrum.sum() < 0.01


def test_a_tighter_cap_is_reported(tiny_encoder) -> None:
    rate = 44_100
    x = _band_limited_noise(2.0, rate, 8000.0)[None]
    loose, _ = _spectral(tiny_encoder, x, rate, steps=1, margin_db=0.0, eps=0.5)
    tight, _ = _spectral(tiny_encoder, x, rate, steps=1, margin_db=0.0, eps=0.002)
    assert loose.capped_share.item() == pytest.approx(0.0, abs=1e-6)
    assert tight.capped_share.item() > 0.05 and tight.delta.abs().max().item() <= 0.002 + 1e-8


def test_spectral_mode_through_the_track_protector(tiny_encoder) -> None:
    """The default mode end to end on a stereo track: under the masking threshold (NMR ≤ 0 dB),
    inside ε, the embedding moved, the cap's effect reported."""
    rate = 44_100
    left = _band_limited_noise(4.0, rate, 10_000.0, seed=1)[0].numpy()
    right = _band_limited_noise(4.0, rate, 10_000.0, seed=2)[0].numpy()
    track = Track("t", np.stack([left, right], axis=1), rate, "PCM_24")
    protector = TrackProtector(tiny_encoder, PGDParams(0.05, 0.0, 2, 0.0), perceptual="spectral",
                               margin_db=STRENGTH_MARGIN_DB[3], passband_hz=14_000.0, batch_windows=2)  # fmt: skip
    result = protector.protect([track])[0]
    assert not result.error
    assert result.delta_e_mean > 0 and result.nmr_db <= 0.0
    assert result.linf <= 0.05 + 1e-6 and 0.0 <= result.capped_share <= 1.0
