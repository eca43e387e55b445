"""PGD engine: the ε budget holds exactly, early stop works, runs are deterministic, and on the
random laion-clap encoder PGD beats random noise of the same L∞ by a wide margin."""

from __future__ import annotations

import pytest
import torch

from pipeline.core.engine import PGDParams, pgd
from pipeline.encoders.base import CLAP_SAMPLES


def f32(value: float) -> float:
    """ε as the float32 tensors hold it: the bound is exact in the tensors' own precision."""
    return torch.tensor(value, dtype=torch.float32).item()


class StubEncoder:
    """A tiny differentiable embedder (fixed random projection) for millisecond engine tests."""

    def __init__(self, samples: int, dim: int = 16, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.weight = torch.randn(samples, dim, generator=g)

    def __call__(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(torch.tanh(x.flatten(1) @ self.weight), dim=-1)


def _x(batch: int = 4, samples: int = 256, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(batch, samples, generator=g) * 2 - 1) * 0.9
    x[0, :10] = 1.0  # samples at full scale: δ must not push them past it
    x[1, :10] = -1.0
    return x


def test_budget_and_range_hold_exactly() -> None:
    x = _x()
    params = PGDParams(eps=0.01, alpha=0.004, steps=10, sigma=0.02)
    result = pgd(StubEncoder(256), x, params, generator=torch.Generator().manual_seed(0))
    assert result.delta.abs().max().item() <= f32(params.eps)
    adv = x + result.delta
    assert adv.max().item() <= 1.0 and adv.min().item() >= -1.0
    assert result.delta_e.shape == (4,) and (result.delta_e > 0).all()
    assert (result.steps == 10).all()


def test_mask_zeroes_padding() -> None:
    x = _x()
    mask = torch.ones_like(x)
    mask[:, 200:] = 0
    result = pgd(
        StubEncoder(256),
        x,
        PGDParams(0.01, 0.004, 3, 0.01),
        generator=torch.Generator().manual_seed(0),
        mask=mask,
    )
    assert result.delta[:, 200:].abs().max().item() == 0.0


def test_early_stop_per_window() -> None:
    x = _x()
    easy = PGDParams(eps=0.05, alpha=0.01, steps=30, sigma=0.01, target_delta_e=0.05)
    result = pgd(StubEncoder(256), x, easy, generator=torch.Generator().manual_seed(0))
    assert (result.delta_e >= 0.05).all()
    assert (result.steps < 30).all()
    never = PGDParams(eps=0.05, alpha=0.01, steps=5, sigma=0.01, target_delta_e=10.0)
    assert (pgd(StubEncoder(256), x, never, generator=torch.Generator().manual_seed(0)).steps == 5).all()


def test_keeps_best_delta_seen() -> None:
    """The δ returned per window is the best of every δ the engine evaluated, not the last one:
    with a large step Δe swings from step to step, and the result is the maximum seen."""
    x = _x()
    stub, every = StubEncoder(256), torch.arange(4)
    clean = stub(x, every)
    best_seen, last_seen = torch.zeros(4), torch.zeros(4)

    def embed(x_rows: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        out = stub(x_rows, rows)
        if not torch.equal(x_rows, x[rows]):  # an evaluation of x + δ, not the clean embedding
            distance = (out - clean[rows]).norm(dim=-1).detach()
            best_seen[rows] = torch.maximum(best_seen[rows], distance)
            last_seen[rows] = distance
        return out

    result = pgd(embed, x, PGDParams(0.02, 0.02, 8, 0.01), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(result.delta_e, best_seen, atol=1e-5, rtol=1e-5)
    assert (last_seen < best_seen - 1e-4).any()  # the last δ was worse somewhere: "best" is not "last"
    measured = (stub(x + result.delta, every) - clean).norm(dim=-1)
    torch.testing.assert_close(measured, result.delta_e, atol=1e-5, rtol=1e-5)


def test_steps_that_improve_nothing_are_fine() -> None:
    """alpha = 0: after the first evaluation no window ever improves (empty update sets)."""
    x = _x()
    result = pgd(StubEncoder(256), x, PGDParams(0.01, 0.0, 3, 0.01), generator=torch.Generator().manual_seed(0))
    assert (result.steps == 3).all() and (result.delta_e > 0).all()


def test_ensemble_shaped_embeddings() -> None:
    """[b, encoders, D] embeddings with a reducing distance (as TrackProtector's ensembles use)."""
    stubs = [StubEncoder(256, seed=1), StubEncoder(256, seed=2)]

    def embed(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return torch.stack([stub(x, rows) for stub in stubs], dim=1)

    def worst(adv: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
        return (adv - clean).norm(dim=-1).min(dim=1).values

    x = _x()
    result = pgd(embed, x, PGDParams(0.01, 0.004, 4, 0.01), generator=torch.Generator().manual_seed(0), distance=worst)
    every = torch.arange(4)
    measured = worst(embed(x + result.delta, every), embed(x, every))
    torch.testing.assert_close(measured, result.delta_e, atol=1e-5, rtol=1e-5)
    assert result.cos.shape == (4,)


def test_deterministic_for_a_seed() -> None:
    x = _x()
    params = PGDParams(0.01, 0.004, 5, 0.01)
    a = pgd(StubEncoder(256), x, params, generator=torch.Generator().manual_seed(7))
    b = pgd(StubEncoder(256), x, params, generator=torch.Generator().manual_seed(7))
    c = pgd(StubEncoder(256), x, params, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a.delta, b.delta) and torch.equal(a.delta_e, b.delta_e)
    assert not torch.equal(a.delta, c.delta)


@pytest.mark.parametrize("precision", ["bf16"])
def test_autocast_precision_runs_on_cpu(precision: str) -> None:
    result = pgd(
        StubEncoder(256),
        _x(),
        PGDParams(0.01, 0.004, 2, 0.01, precision=precision),
        generator=torch.Generator().manual_seed(0),
    )
    assert result.delta.abs().max().item() <= f32(0.01)


def test_pgd_beats_uniform_noise_on_random_clap(tiny_encoder) -> None:
    """12 sign steps on random HTSAT-tiny vs uniform noise of the same ε (ENVIRONMENT.md: 0.30 vs 0.003)."""
    g = torch.Generator().manual_seed(0)
    t = torch.arange(CLAP_SAMPLES) / 48_000
    x = (0.3 * torch.sin(2 * torch.pi * 220 * t) + 0.05 * torch.randn(CLAP_SAMPLES, generator=g))[None]
    model = tiny_encoder.model

    def embed(batch: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return model(batch)

    eps = 0.003
    result = pgd(embed, x, PGDParams(eps=eps, alpha=0.0006, steps=6, sigma=eps / 4), generator=g)
    with torch.no_grad():
        noise = (torch.rand(x.shape, generator=g) * 2 - 1) * eps
        noise_delta_e = (model(x + noise) - model(x)).norm(dim=-1).item()
    assert result.delta.abs().max().item() <= f32(eps)
    assert result.delta_e.item() > 10 * noise_delta_e
    assert result.delta_e.item() > 0.05


def _both_shapes(run) -> tuple:
    """`run(fixed_shape)` -> PGDResult, for the default and the fixed-shape loop."""
    return run(False), run(True)


def test_fixed_shape_pgd_gives_the_same_result() -> None:
    """The fixed-shape loop (finished windows masked, never dropped) finds the same δ, Δe, cosine
    and step counts as the default loop, early stop and a constraint included; every embed call
    sees the whole batch (a static shape a CUDA graph can capture)."""
    x = _x(batch=6)
    encoder = StubEncoder(256)
    shapes: dict[bool, set[int]] = {False: set(), True: set()}

    def run(fixed: bool):
        def embed(rows_x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            shapes[fixed].add(rows_x.shape[0])
            return encoder(rows_x, rows)

        def halve_odd_samples(delta: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            out = delta.clone()
            out[:, 1::2] *= 0.5
            return out

        # Δe targets the windows reach at different steps (measured below: some stop early, some never).
        params = PGDParams(eps=0.03, alpha=0.006, steps=20, sigma=0.01, target_delta_e=0.2, fixed_shape=fixed)
        return pgd(embed, x, params, generator=torch.Generator().manual_seed(0), constrain=halve_odd_samples)

    dynamic, fixed = _both_shapes(run)
    assert len(set(dynamic.steps.tolist())) > 1 and (dynamic.steps < 20).any()  # early stop happened
    assert torch.equal(dynamic.steps, fixed.steps)
    torch.testing.assert_close(fixed.delta, dynamic.delta, rtol=0, atol=1e-6)
    torch.testing.assert_close(fixed.delta_e, dynamic.delta_e, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fixed.cos, dynamic.cos, rtol=1e-5, atol=1e-6)
    assert shapes[True] == {6} and len(shapes[False]) > 1


def test_fixed_shape_spectral_attack_gives_the_same_result() -> None:
    from pipeline.core.engine import SpectralParams, spectral_attack

    g = torch.Generator().manual_seed(3)
    x = (torch.rand(4, 1, 1024, generator=g) * 2 - 1) * 0.5
    budget = torch.rand(4, 1, 129, 17, generator=g) * 0.01
    noise = torch.randn(4, 1, 129, 17, 2, generator=g)
    encoder = StubEncoder(1024)

    def run(fixed: bool):
        params = SpectralParams(eps=0.02, steps=12, lr=0.2, n_fft=256, hop=64, target_delta_e=0.08, fixed_shape=fixed)
        return spectral_attack(encoder, x, budget, params, noise=noise)

    dynamic, fixed = _both_shapes(run)
    assert (dynamic.steps < 12).any() and len(set(dynamic.steps.tolist())) > 1
    assert torch.equal(dynamic.steps, fixed.steps)
    torch.testing.assert_close(fixed.delta, dynamic.delta, rtol=0, atol=1e-6)
    torch.testing.assert_close(fixed.delta_e, dynamic.delta_e, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fixed.capped_share, dynamic.capped_share, rtol=1e-4, atol=1e-6)
