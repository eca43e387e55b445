"""Windowing covers every sample; blending is convex, so per-window bounds survive it."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.core.windows import blend, crossfade_weights, plan_windows


@pytest.mark.parametrize("n", [1, 999, 1000, 1001, 1900, 2500, 10_007])
def test_windows_cover_every_sample(n: int) -> None:
    plan = plan_windows(n, window=1000, overlap=100)
    covered = np.zeros(n, dtype=int)
    for start, length in zip(plan.starts, plan.lengths):
        assert start >= 0 and start + length <= n
        covered[start : start + length] += 1
    assert covered.min() >= 1
    assert plan.starts[-1] + plan.lengths[-1] == n


@pytest.mark.parametrize("n", [1000, 1700, 2500, 10_007])
def test_weights_sum_to_one(n: int) -> None:
    plan = plan_windows(n, window=1000, overlap=100)
    total = np.zeros(n)
    for start, w in zip(plan.starts, crossfade_weights(plan)):
        assert (w >= 0).all()
        total[start : start + len(w)] += w
    np.testing.assert_allclose(total, 1.0, atol=1e-6)


def test_blend_keeps_eps_bound(rng: np.random.Generator) -> None:
    eps = 0.003
    plan = plan_windows(3456, window=1000, overlap=200)
    deltas = [rng.choice([-eps, eps], size=(2, length)).astype(np.float32) for length in plan.lengths]
    out = blend(plan, deltas)
    assert out.shape == (2, 3456)
    assert np.abs(out).max() <= eps * (1 + 1e-6)
    # Outside overlaps each sample is exactly its window's δ.
    np.testing.assert_array_equal(out[:, 300:700], deltas[0][:, 300:700])


def test_bad_plans_are_refused() -> None:
    with pytest.raises(ValueError):
        plan_windows(0, 1000, 100)
    with pytest.raises(ValueError):
        plan_windows(10, 1000, 1000)
