"""Bandwidth rules (mapa.bandwidth): hand-computed values, recovery of sigma, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import mapa
from mapa.bandwidth import RULES, bandwidth_from_noise, estimate_noise_std, select_bandwidth
from kernel_reference import BACKENDS

SQRT2 = math.sqrt(2.0)


# ---------------------------------------------------------------- bandwidth_from_noise


@pytest.mark.parametrize(
    "sigma, dim, expected",
    [
        (1.0, 1, SQRT2),  # low D: h = sqrt(2) sigma (difference of two noisy points)
        (1.0, 2, SQRT2),  # (2/2)^(1/4) = 1
        (0.5, 2, SQRT2 / 2),
        (1.0, 32, 2.0 * SQRT2),  # (32/2)^(1/4) = 2
        (3.0, 162, 9.0 * SQRT2),  # (162/2)^(1/4) = 81^(1/4) = 3
        (0.1, 20, 0.1 * SQRT2 * 10**0.25),
        (2.0, np.int64(100), 2.0 * SQRT2 * 50**0.25),
        (np.float32(0.25), 2, 0.25 * SQRT2),
    ],
)
def test_bandwidth_from_noise_values(sigma, dim, expected):
    h = bandwidth_from_noise(sigma, dim)
    assert isinstance(h, float)
    assert h == pytest.approx(expected, rel=1e-12)


def test_bandwidth_from_noise_documented_ratios():
    # module docstring: 1.41 sigma at D = 2, 2.5 sigma at D = 20, 3.8 sigma at D = 100,
    # inside the measured best ranges of MAPA.md (1.4-1.5, 2.4-3.5, 3.5-6.7)
    assert bandwidth_from_noise(1.0, 2) == pytest.approx(1.41, abs=0.05)
    assert bandwidth_from_noise(1.0, 20) == pytest.approx(2.5, abs=0.05)
    assert bandwidth_from_noise(1.0, 100) == pytest.approx(3.8, abs=0.05)  # 3.76
    assert 1.4 <= bandwidth_from_noise(1.0, 2) <= 1.5
    assert 2.4 <= bandwidth_from_noise(1.0, 20) <= 3.5
    assert 3.5 <= bandwidth_from_noise(1.0, 100) <= 6.7


def test_bandwidth_from_noise_is_linear_and_monotone():
    for d in (1, 5, 50):
        assert bandwidth_from_noise(3.0, d) == pytest.approx(3.0 * bandwidth_from_noise(1.0, d))
    hs = [bandwidth_from_noise(1.0, d) for d in range(1, 200)]
    assert all(a <= b for a, b in zip(hs, hs[1:]))


@pytest.mark.parametrize("sigma", [0.0, -1.0, math.nan, math.inf, "1.0", None, True])
def test_bandwidth_from_noise_bad_sigma(sigma):
    with pytest.raises(ValueError, match=r"noise_std must be a finite float > 0"):
        bandwidth_from_noise(sigma, 3)


@pytest.mark.parametrize("dim", [0, -2, 2.5, "3", None, True])
def test_bandwidth_from_noise_bad_dim(dim):
    with pytest.raises(ValueError, match=r"dim must be a positive integer"):
        bandwidth_from_noise(1.0, dim)


# ---------------------------------------------------------------- rules: hand-computed


def test_nn_rule_hand_computed():
    # 1-D points 0, 1, 3: nearest squared distances 1, 1, 4 -> median 1
    # sigma^2 = 1 / (2 * 1) -> sigma = sqrt(1/2); h = sqrt(2) * sigma * max(1, (1/2)^(1/4)) = 1
    X = np.array([[0.0], [1.0], [3.0]])
    assert estimate_noise_std(X) == pytest.approx(math.sqrt(0.5), rel=1e-12)
    assert select_bandwidth(X, rule="nn") == pytest.approx(1.0, rel=1e-12)
    # the same line in D = 2, along the unit direction (0.6, 0.8)
    X2 = np.array([[0.0, 0.0], [0.6, 0.8], [1.8, 2.4]])
    # nearest squared distances 1, 1, 4 -> median 1 -> sigma^2 = 1 / (2 * 2)
    assert estimate_noise_std(X2) == pytest.approx(0.5, rel=1e-12)
    assert select_bandwidth(X2, rule="nn") == pytest.approx(SQRT2 * 0.5, rel=1e-12)


def test_nn_rule_ignores_exact_duplicates_when_median_is_zero():
    # nearest squared distances 0, 0, 0, 4: the median is 0, so the positive ones
    # are used: median 4 -> sigma = sqrt(4 / 2) = sqrt(2) -> h = sqrt(2) * sqrt(2) = 2
    X = np.array([[0.0], [0.0], [0.0], [2.0]])
    assert estimate_noise_std(X) == pytest.approx(SQRT2, rel=1e-12)
    assert select_bandwidth(X, "nn") == pytest.approx(2.0, rel=1e-12)


def test_scott_rule_hand_computed():
    # two points 0 and 2: per-feature std 1, N = 2, D = 1: h = 1 * 2^(-1/5)
    assert select_bandwidth(np.array([[0.0], [2.0]]), rule="scott") == pytest.approx(2 ** (-0.2), rel=1e-12)
    # D = 2, stds 1 and 3 (mean 2), N = 2: h = 2 * 2^(-1/6)
    X = np.array([[0.0, 0.0], [2.0, 6.0]])
    assert select_bandwidth(X, rule="scott") == pytest.approx(2.0 * 2 ** (-1 / 6), rel=1e-12)


def test_rules_are_translation_invariant_and_scale_equivariant():
    X = _noisy_line(1000, 2, 0.1, length=6.0, seed=0)  # dense enough for every rule
    for rule in RULES:
        h = select_bandwidth(X, rule)
        assert select_bandwidth(X + 1e3, rule) == pytest.approx(h, rel=1e-6)
        assert select_bandwidth(3.0 * X, rule) == pytest.approx(3.0 * h, rel=1e-9)


def test_nn_rule_subsample_is_deterministic():
    X = np.random.default_rng(1).standard_normal((300, 3))
    a = estimate_noise_std(X, sample=50, seed=3)
    assert estimate_noise_std(X, sample=50, seed=3) == a
    # subsampling the queries only: close to the full estimate
    assert a == pytest.approx(estimate_noise_std(X), rel=0.3)
    assert estimate_noise_std(X, sample=300) == estimate_noise_std(X)


# ---------------------------------------------------------------- rules: statistical accuracy


def _noisy_line(n, d, sigma, length, seed):
    rng = np.random.default_rng(seed)
    direction = rng.standard_normal(d)
    direction /= np.linalg.norm(direction)
    t = np.linspace(0.0, length, n)
    return t[:, None] * direction + sigma * rng.standard_normal((n, d))


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("sigma", [0.1, 2.0])
def test_nn_rule_recovers_sigma_when_noise_dominates(seed, sigma):
    # D = 50, 500 points along a line with spacing 2 sigma: the neighbour distance
    # is dominated by noise (2 sigma^2 D = 100 sigma^2 against 4 sigma^2 of spacing).
    X = _noisy_line(500, 50, sigma, length=1000 * sigma, seed=seed)
    assert estimate_noise_std(X) == pytest.approx(sigma, rel=0.2)
    assert select_bandwidth(X, "nn") == pytest.approx(bandwidth_from_noise(sigma, 50), rel=0.2)


def test_nn_rule_underestimates_dense_low_dimensional_data_and_lpca_does_not():
    # Documented: in D = 2 the noise fills a tube whose points have much closer
    # neighbours than sigma, so "nn" is far too small; "lpca" (and "auto",
    # which picks it here) measures the tube's width.
    X = _noisy_line(2000, 2, 0.1, length=6.0, seed=0)
    assert estimate_noise_std(X, method="nn") < 0.3 * 0.1
    assert estimate_noise_std(X, method="lpca") == pytest.approx(0.1, rel=0.25)
    assert estimate_noise_std(X) == estimate_noise_std(X, method="lpca")


def test_lpca_refuses_data_too_sparse_for_its_dimension():
    X = _noisy_line(60, 50, 0.1, length=6.0, seed=0)
    with pytest.raises(ValueError, match=r"'lpca' noise estimate needs balls"):
        estimate_noise_std(X, method="lpca")
    # "auto" falls back to "nn" there
    assert estimate_noise_std(X) == estimate_noise_std(X, method="nn")


# ---------------------------------------------------------------- rules: errors


def test_unknown_rule():
    with pytest.raises(ValueError, match=r"unknown bandwidth rule 'silverman'"):
        select_bandwidth(np.zeros((3, 2)), rule="silverman")


def test_nn_rule_needs_two_points():
    with pytest.raises(ValueError, match=r"'nn' noise estimate needs at least 2 points"):
        select_bandwidth(np.ones((1, 3)), "nn")


def test_nn_rule_all_duplicates():
    with pytest.raises(ValueError, match=r"noise estimate 'nn' failed: all sampled points have an exact duplicate"):
        select_bandwidth(np.ones((5, 3)), "nn")


def test_scott_rule_zero_spread():
    with pytest.raises(ValueError, match=r"bandwidth rule 'scott' failed: X has zero spread"):
        select_bandwidth(np.ones((5, 3)), "scott")


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_rules_refuse_non_finite_X(rule, bad):
    X = np.random.default_rng(0).standard_normal((10, 2))
    X[3, 1] = bad
    with pytest.raises(ValueError, match=r"X contains NaN or inf"):
        select_bandwidth(X, rule)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_estimate_noise_std_refuses_non_finite_X(bad):
    X = np.random.default_rng(0).standard_normal((10, 2))
    X[3, 1] = bad
    with pytest.raises(ValueError, match=r"X contains NaN or inf"):
        estimate_noise_std(X)


@pytest.mark.parametrize("rule", RULES)
def test_rules_refuse_wrong_ndim(rule):
    with pytest.raises(ValueError, match=r"X must be 2-D"):
        select_bandwidth(np.arange(5.0), rule)
    with pytest.raises(ValueError, match=r"X must be 2-D"):
        estimate_noise_std(np.arange(5.0))


# ---------------------------------------------------------------- rules through the kernel


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rule", RULES)
def test_kernel_bandwidth_rule_equals_explicit_float(backend, rule):
    X = _noisy_line(80, 6, 0.3, length=10.0, seed=2)
    Y = X[:5] + 0.1
    h = select_bandwidth(X, rule)
    np.testing.assert_array_equal(
        mapa.log_posterior(X, bandwidth=rule, backend=backend), mapa.log_posterior(X, bandwidth=h, backend=backend)
    )
    # with queries the rule still looks at the references X only
    np.testing.assert_array_equal(
        mapa.log_normalizer(X, Y, bandwidth=rule, backend=backend), mapa.log_normalizer(X, Y, bandwidth=h, backend=backend)
    )
    # torch input and float32 input use the same rule on the same values
    np.testing.assert_allclose(
        mapa.log_normalizer(torch.from_numpy(X), bandwidth=rule, backend=backend).numpy(),
        mapa.log_normalizer(X, bandwidth=h, backend=backend),
        rtol=1e-12,
    )


def test_kernel_bandwidth_accepts_numpy_and_torch_scalars():
    X = np.random.default_rng(0).standard_normal((10, 2))
    expected = mapa.log_normalizer(X, bandwidth=0.5)
    for h in (np.float32(0.5), np.float64(0.5), torch.tensor(0.5), 1 / 2):
        np.testing.assert_allclose(mapa.log_normalizer(X, bandwidth=h), expected, rtol=1e-12)


def test_kernel_rule_errors_surface():
    with pytest.raises(ValueError, match=r"'nn' noise estimate needs at least 2 points"):
        mapa.log_normalizer(np.ones((1, 2)), bandwidth="nn")
    with pytest.raises(ValueError, match=r"bandwidth rule 'scott' failed"):
        mapa.log_normalizer(np.ones((4, 2)), bandwidth="scott")
