"""Shared helpers for the kernel tests: backend list, tolerance table, references.

The references here are deliberately naive: an explicit (M, N) float64 matrix
of squared distances from explicit differences, and ``scipy.special.logsumexp``.
They share no code with the package.
"""

from __future__ import annotations

import numpy as np
from scipy.special import logsumexp

import mapa

# Every numeric test runs on each backend that loads here; "cpp" and "numba"
# join automatically once they build.
BACKENDS = mapa.available_backends()
ALL_BACKEND_NAMES = ("cpp", "numba", "numpy")

DTYPES = (np.float32, np.float64)

# Entries of log q below this are not held to the absolute tolerance (their
# probabilities are below 1e-13; float32 cannot promise digits there).
LOGQ_FLOOR = -30.0

# One tolerance table for the whole kernel suite, by working dtype.
#   logq_atol / logq_rtol: log q entries above LOGQ_FLOOR, log-normalisers
#   mass_rtol / mass_atol: probabilities and sums of them (kept mass, W, s)
#   mean_atol: posterior-weighted means, in units of the data spread
TOL = {
    np.dtype(np.float64): dict(logq_atol=1e-10, logq_rtol=1e-10, mass_rtol=1e-9, mass_atol=1e-12, mean_atol=1e-9),
    np.dtype(np.float32): dict(logq_atol=1e-4, logq_rtol=1e-6, mass_rtol=3e-4, mass_atol=1e-6, mean_atol=1e-3),
}


def tol(dtype) -> dict:
    return TOL[np.dtype(dtype)]


# ---------------------------------------------------------------- data


def make_data(n, d, *, dtype=np.float64, offset=0.0, seed=0, spread=1.0):
    """Gaussian points of the given spread, shifted by ``offset`` in every coordinate."""
    rng = np.random.default_rng(seed)
    return (offset + spread * rng.standard_normal((n, d))).astype(dtype)


def make_clusters(n, d, h, *, dtype=np.float64, offset=0.0, seed=0, n_clusters=5):
    """Points in tight clusters of width ~h around centres spread over ~1, so that
    q is non-trivial (several entries above LOGQ_FLOOR) even for tiny h."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, d))
    labels = rng.integers(0, n_clusters, size=n)
    return (offset + centres[labels] + h * rng.standard_normal((n, d))).astype(dtype)


# ---------------------------------------------------------------- references


def ref_logits(X, Y, h, exclude_self=False):
    """-||y_m - x_i||^2 / (2 h^2) in float64 from explicit differences; self -inf."""
    Xf = np.asarray(X, dtype=np.float64)
    Yf = np.asarray(Y, dtype=np.float64)
    diff = Yf[:, None, :] - Xf[None, :, :]
    logits = -(diff**2).sum(axis=-1) / (2.0 * h * h)
    if exclude_self:
        np.fill_diagonal(logits, -np.inf)
    return logits


def ref_log_normalizer(X, Y, h, exclude_self=False):
    return logsumexp(ref_logits(X, Y, h, exclude_self), axis=1)


def ref_log_posterior(X, Y, h, exclude_self=False):
    logits = ref_logits(X, Y, h, exclude_self)
    return logits - logsumexp(logits, axis=1, keepdims=True)


def ref_targets(X, h, exclude_self=False):
    """(W, means, s) of MAPA.md section 3 from the explicit q matrix (rows n, columns i)."""
    Xf = np.asarray(X, dtype=np.float64)
    q = np.exp(ref_log_posterior(Xf, Xf, h, exclude_self))
    W = q.sum(axis=0)
    S1 = q.T @ Xf
    s = q.T @ (Xf**2).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(W[:, None] > 0, S1 / W[:, None], Xf)
    return W, means, s


# ---------------------------------------------------------------- checks


def to_numpy(a):
    """Any kernel output (NumPy array or torch tensor) as a float64/int64 NumPy array."""
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    return np.asarray(a)


def assert_logq_close(actual, ref, dtype, *, floor=LOGQ_FLOOR, what="log q"):
    """Entries of ``ref`` above ``floor`` match; entries that are -inf in ``ref`` are -inf."""
    t = tol(dtype)
    a = to_numpy(actual).astype(np.float64)
    assert a.shape == ref.shape, (a.shape, ref.shape)
    assert not np.isnan(a).any(), f"{what}: NaN in output"
    neginf = np.isneginf(ref)
    np.testing.assert_array_equal(np.isneginf(a[neginf]), True, err_msg=f"{what}: expected -inf entries")
    keep = ref > floor
    np.testing.assert_allclose(a[keep], ref[keep], rtol=t["logq_rtol"], atol=t["logq_atol"], err_msg=what)
    # below the floor: still no larger than the floor plus slack (no spurious mass)
    low = ~keep & ~neginf
    if low.any():
        assert (a[low] <= floor + 1.0).all(), f"{what}: entries below {floor} came out too large"


def assert_lognorm_close(actual, ref, dtype, what="log normaliser"):
    t = tol(dtype)
    a = to_numpy(actual).astype(np.float64)
    assert a.shape == ref.shape
    assert np.isfinite(a).all(), f"{what}: non-finite values"
    np.testing.assert_allclose(a, ref, rtol=t["logq_rtol"], atol=t["logq_atol"], err_msg=what)


def check_topk(res, X, Y, h, k, dtype, exclude_self=False):
    """Check a TopKPosterior against the explicit reference, tolerant to near-ties."""
    t = tol(dtype)
    R = ref_log_posterior(X, Y, h, exclude_self)
    M, N = R.shape
    idx = to_numpy(res.indices)
    lp = to_numpy(res.log_prob).astype(np.float64)
    assert idx.shape == (M, k) and lp.shape == (M, k)
    assert idx.dtype == np.int64
    assert to_numpy(res.log_prob).dtype == np.dtype(dtype)
    assert ((idx >= 0) & (idx < N)).all()
    for m in range(M):
        assert len(set(idx[m].tolist())) == k, f"row {m}: repeated indices {idx[m]}"
    if exclude_self:
        assert (idx != np.arange(M)[:, None]).all(), "self index returned with exclude_self"
    # sorted descending; ties between identical reference points: lower index first
    assert (np.diff(lp, axis=1) <= 0).all(), "log_prob not sorted descending"
    Xa = np.asarray(X)
    same_point = (Xa[idx[:, 1:]] == Xa[idx[:, :-1]]).all(axis=-1) & (np.diff(lp, axis=1) == 0)
    assert (np.diff(idx, axis=1)[same_point] > 0).all(), "tied entries not ordered by index"
    # each returned entry is the true log q of that index
    ref_at = np.take_along_axis(R, idx, axis=1)
    keep = ref_at > LOGQ_FLOOR
    np.testing.assert_allclose(lp[keep], ref_at[keep], rtol=t["logq_rtol"], atol=t["logq_atol"])
    # the kept values are the k largest (as values: robust to near-ties)
    top = -np.sort(-R, axis=1)[:, :k]
    keep = top > LOGQ_FLOOR
    np.testing.assert_allclose(lp[keep], top[keep], rtol=t["logq_rtol"], atol=t["logq_atol"])
    # normaliser over all N references and kept mass
    assert_lognorm_close(res.log_norm, ref_log_normalizer(X, Y, h, exclude_self), dtype)
    kept = to_numpy(res.kept_mass).astype(np.float64)
    np.testing.assert_allclose(kept, np.exp(top).sum(axis=1), rtol=t["mass_rtol"], atol=t["mass_atol"])
    assert (kept <= 1.0 + t["mass_rtol"]).all()


def check_targets(res, X, h, dtype, exclude_self=False):
    t = tol(dtype)
    W_ref, m_ref, s_ref = ref_targets(X, h, exclude_self)
    W = to_numpy(res.weights).astype(np.float64)
    means = to_numpy(res.means).astype(np.float64)
    s = to_numpy(res.sq_norms).astype(np.float64)
    N, D = np.shape(X)
    assert W.shape == (N,) and means.shape == (N, D) and s.shape == (N,)
    for a in (res.weights, res.means, res.sq_norms):
        assert to_numpy(a).dtype == np.dtype(dtype)
    np.testing.assert_allclose(W, W_ref, rtol=t["mass_rtol"], atol=t["mass_atol"], err_msg="weights")
    np.testing.assert_allclose(W.sum(), N, rtol=t["mass_rtol"], err_msg="sum of weights != number of rows")
    Xf = np.asarray(X, dtype=np.float64)
    scale2 = float((Xf**2).sum(axis=1).max())
    np.testing.assert_allclose(s, s_ref, rtol=t["mass_rtol"], atol=t["mass_atol"] * scale2, err_msg="sq_norms")
    # means are ill-conditioned where W is tiny: check them where the column carries mass
    spread = float(np.ptp(Xf, axis=0).max()) or 1.0
    ok = W_ref > 1e-6
    np.testing.assert_allclose(
        means[ok], m_ref[ok], rtol=t["logq_rtol"], atol=t["mean_atol"] * spread, err_msg="means"
    )
    assert np.isfinite(means).all()
