"""The EOT transforms (pipeline/core/eot.py) and their views: shapes, identity without a
generator, gradients, and that each does what its name says on 1 s signals at 48 kHz."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.core.eot import RATE, TRANSFORMS, mix_view
from pipeline.core.views import VIEWS, get_view

T = RATE  # 1 s


def _sine(freq: float, batch: int = 2, amplitude: float = 0.3) -> torch.Tensor:
    t = torch.arange(T) / RATE
    return (amplitude * torch.sin(2 * math.pi * freq * t)).repeat(batch, 1)


def _band_energy(x: torch.Tensor, low: float, high: float) -> float:
    spectrum = torch.fft.rfft(x, dim=-1).abs() ** 2
    freqs = torch.fft.rfftfreq(x.shape[-1], 1 / RATE)
    return float(spectrum[..., (freqs >= low) & (freqs < high)].sum())


def _peak_hz(x: torch.Tensor) -> float:
    spectrum = torch.fft.rfft(x[0], dim=-1).abs()
    return float(torch.fft.rfftfreq(x.shape[-1], 1 / RATE)[spectrum.argmax()])


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_transform_shape_identity_and_gradient(name: str) -> None:
    fn = get_view(name)
    assert fn is VIEWS[name]
    x = (_sine(440.0) + 0.05 * torch.randn(2, T, generator=torch.Generator().manual_seed(1))).requires_grad_()
    assert torch.equal(fn(x, None), x)  # the deterministic view (reference, scoring) is the identity
    y = fn(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert not torch.allclose(y, x, atol=1e-6), "a drawn transform changes the audio"
    (y * torch.randn(y.shape, generator=torch.Generator().manual_seed(2))).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    again = fn(x.detach(), torch.Generator().manual_seed(0))
    assert torch.allclose(again, y.detach(), atol=1e-5), "same generator state, same draw"


def test_noise_snr_in_range() -> None:
    x = _sine(440.0, batch=8)
    y = TRANSFORMS["noise"](x, torch.Generator().manual_seed(0))
    snr = 10 * torch.log10(x.pow(2).mean(-1) / (y - x).pow(2).mean(-1))
    assert ((snr > 9.5) & (snr < 40.5)).all(), snr


def test_lowpass_and_resample_remove_the_top_band() -> None:
    x = _sine(440.0) + _sine(18_000.0, amplitude=0.1)  # above every drawn cutoff (≤ 12 kHz; ≤ 15 kHz)
    for name in ("lowpass", "resample_any"):
        y = TRANSFORMS[name](x, torch.Generator().manual_seed(0))
        assert _band_energy(y, 17_000, 19_000) < 0.05 * _band_energy(x, 17_000, 19_000), name
        assert _band_energy(y, 400, 500) > 0.8 * _band_energy(x, 400, 500), name


def test_highpass_removes_the_bass() -> None:
    x = _sine(30.0) + _sine(3000.0)
    y = TRANSFORMS["highpass"](x, torch.Generator().manual_seed(0))
    assert _band_energy(y, 20, 40) < 0.2 * _band_energy(x, 20, 40)
    assert _band_energy(y, 2900, 3100) > 0.9 * _band_energy(x, 2900, 3100)


def test_speed_moves_the_pitch() -> None:
    g = torch.Generator().manual_seed(3)
    y = TRANSFORMS["speed"](_sine(1000.0), g)
    factor = _peak_hz(y) / 1000.0
    assert 0.79 < factor < 1.26 and abs(factor - 1.0) > 0.005


def test_quantise_is_straight_through_and_on_a_grid() -> None:
    x = _sine(440.0).requires_grad_()
    y = TRANSFORMS["quantise"](x, torch.Generator().manual_seed(0))
    levels = [2.0 ** (b - 1) for b in range(8, 13)]
    assert any(torch.allclose(y * n, torch.round(y * n), atol=1e-3) for n in levels)
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_compress_and_limit_reduce_the_peak() -> None:
    x = _sine(440.0) * torch.linspace(0.05, 1.0, T)  # a crescendo
    for name in ("compress", "limit"):
        y = TRANSFORMS[name](x, torch.Generator().manual_seed(0))
        assert y.abs().amax() < 0.95 * x.abs().amax(), name
        assert torch.allclose(y[:, :200], x[:, :200], atol=1e-3) or name == "limit", name


def test_reverb_adds_a_tail_and_gate_removes_a_floor() -> None:
    burst = torch.zeros(2, T)
    burst[:, :2400] = _sine(440.0)[:, :2400]
    wet = TRANSFORMS["reverb"](burst, torch.Generator().manual_seed(0))
    assert wet[:, 4800:].pow(2).sum() > 1e-4 and burst[:, 4800:].pow(2).sum() == 0
    noisy = _sine(440.0) * (torch.arange(T) < T // 2) + 0.003 * torch.randn(
        2, T, generator=torch.Generator().manual_seed(4)
    )
    gated = TRANSFORMS["spectral_gate"](noisy, torch.Generator().manual_seed(0))
    assert gated[:, T // 2 + 4096 :].pow(2).mean() < 0.5 * noisy[:, T // 2 + 4096 :].pow(2).mean()


def test_mix_view_draws_per_item_and_validates_names() -> None:
    view = get_view("mix:noise+lowpass")
    assert view is get_view("mix:noise+lowpass")  # made once
    x = _sine(440.0, batch=6) + _sine(15_000.0, batch=6, amplitude=0.1)
    y = view(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and torch.equal(view(x, None), x)
    lowpassed = [
        _band_energy(y[i : i + 1], 14_000, 16_000) < 0.05 * _band_energy(x[i : i + 1], 14_000, 16_000) for i in range(6)
    ]
    assert 0 < sum(lowpassed) < 6, "with six items both transforms are drawn (seed 0)"
    with pytest.raises(KeyError, match="unknown EOT transform"):
        get_view("mix:noise+nope")
    with pytest.raises(KeyError):
        mix_view([])
