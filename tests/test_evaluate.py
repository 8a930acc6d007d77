"""mapa.evaluate and mapa.plots: distances, exact log-likelihoods, compare() and its figures."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mapa import datasets, evaluate, plots

PNG = b"\x89PNG\r\n\x1a\n"


def test_total_variation_identical_is_zero_disjoint_is_one():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((5, 8))
    log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    np.testing.assert_allclose(evaluate.total_variation(log_p, log_p), 0.0, atol=1e-15)
    with np.errstate(divide="ignore"):  # log(0) = -inf is the point
        a = np.log(np.array([[0.5, 0.5, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]))
        b = np.log(np.array([[0.0, 0.0, 0.25, 0.75], [0.0, 0.0, 0.0, 1.0]]))
        one_hot = np.log(np.array([[1.0, 0.0]]))
    np.testing.assert_allclose(evaluate.total_variation(a, b), 1.0)
    half = np.log(np.array([[0.5, 0.5]]))
    np.testing.assert_allclose(evaluate.total_variation(half, one_hot), 0.5)
    with pytest.raises(ValueError, match="same shape"):
        evaluate.total_variation(log_p, log_p[:, :3])


def _gaussian_logpdf(X, cov):
    X = np.asarray(X, dtype=np.float64)
    sign, logdet = np.linalg.slogdet(cov)
    sol = np.linalg.solve(cov, X.T).T
    return -0.5 * ((X * sol).sum(axis=1) + logdet + X.shape[1] * math.log(2 * math.pi))


def test_true_log_likelihood_matches_closed_form_for_linear():
    ds = datasets.load("linear", n_train=10, n_test=400, seed=2)
    W = np.array([[1.0], [0.5]])
    expected = _gaussian_logpdf(ds.X_test, W @ W.T + ds.noise_std**2 * np.eye(2))
    got = evaluate.true_log_likelihood(ds)
    assert got.shape == (400,) and got.dtype == np.float64
    np.testing.assert_allclose(got, expected, atol=1e-6)
    # far-away points too
    far = np.array([[3.0, -3.0], [0.0, 2.0]])
    np.testing.assert_allclose(
        evaluate.true_log_likelihood(ds, far), _gaussian_logpdf(far, W @ W.T + 0.01 * np.eye(2)), atol=1e-6
    )


def test_true_log_likelihood_2d_latent_agrees_with_prior_sampling():
    from mapa.training import marginal_log_likelihood

    ds = datasets.load("surface", n_train=10, n_test=60, seed=0)
    exact = evaluate.true_log_likelihood(ds)
    sampled = marginal_log_likelihood(ds.decoder, ds.noise_std, ds.X_test, latent_dim=2, num_samples=200_000)
    # the prior-sample estimate is unbiased in p(x), biased low in log p(x) by Jensen
    assert abs(np.mean(sampled) - np.mean(exact)) < 0.05
    assert np.mean(sampled) <= np.mean(exact) + 0.01


def test_posterior_tv_reference_values():
    ds = datasets.load("spiral", n_train=600, n_test=10)
    tv = evaluate.posterior_tv(ds)
    assert set(tv) >= {"bandwidth", "mapa", "mapa_exclude_self", "uniform", "self_only", "mapa_auto", "rows"}
    assert tv["bandwidth"] == pytest.approx(math.sqrt(2) * 0.1)
    assert 0.8 <= tv["uniform"] <= 0.99  # MAPA.md, section 2
    assert tv["mapa"] < 0.5 < tv["self_only"]
    for key in ("mapa", "mapa_exclude_self", "uniform", "self_only", "mapa_auto"):
        assert 0.0 <= tv[key] <= 1.0
    sub = evaluate.posterior_tv(ds, max_rows=200, bandwidth=0.2)
    assert sub["rows"] == 200 and sub["bandwidth"] == 0.2
    with pytest.raises(ValueError, match="no ground truth"):
        evaluate.posterior_tv(datasets.load("digits", n_train=50, n_test=5))


def test_parse_methods():
    assert evaluate.parse_methods("mapa, vae,iwae") == ("mapa", "vae", "iwae")
    assert evaluate.parse_methods(["aggressive"]) == ("aggressive",)
    with pytest.raises(ValueError, match="unknown method 'foo'"):
        evaluate.parse_methods("mapa,foo")
    with pytest.raises(ValueError, match="duplicates"):
        evaluate.parse_methods("vae,vae")
    with pytest.raises(ValueError, match="non-empty"):
        evaluate.parse_methods("")


def test_stage_ends_are_geometric_and_end_at_total():
    assert evaluate._stage_ends(300, 4) == [38, 75, 150, 300]
    assert evaluate._stage_ends(3, 5) == [1, 2, 3]
    assert evaluate._stage_ends(10, 1) == [10]


class _StubModel:
    """Just enough of FittedModel for compare() without training."""

    def __init__(self, method, decoder, noise_std, latent_dim, epochs):
        self.method, self.decoder, self.noise_std, self.latent_dim = method, decoder, noise_std, latent_dim
        self.likelihood, self.epochs, self.codes, self.encoder, self.bandwidth = "gaussian", epochs, None, None, None
        self.history = [1.0] * epochs
        self.decoder_evaluations = 100 * epochs
        self.encoder_evaluations = 0 if method == "mapa" else 50 * epochs
        self.train_seconds, self.kernel_seconds = 0.01, 0.0

    def log_likelihood(self, X, num_samples=None):
        from mapa.training import marginal_log_likelihood

        return marginal_log_likelihood(self.decoder, self.noise_std, X, latent_dim=self.latent_dim, num_samples=500)


@pytest.fixture
def stub_fit(monkeypatch):
    calls = []

    def fit(X, *, method, latent_dim, seed=0, epochs=None, noise_std=None, **options):
        calls.append(dict(method=method, epochs=epochs, noise_std=noise_std, **options))
        ds = datasets.load("spiral", n_train=2, n_test=1)  # the true decoder, as a "learned" one
        return _StubModel(method, ds.decoder, noise_std, latent_dim, epochs or 3)

    monkeypatch.setattr(evaluate, "_fit", fit)
    return calls


def test_compare_schema_with_stub(stub_fit):
    res = evaluate.compare("spiral", ("mapa", "vae"), seed=1, n_train=200, n_test=40, epochs={"vae": 4})
    assert res["dataset"] == "spiral" and res["seed"] == 1 and res["n_train"] == 200 and res["n_test"] == 40
    assert [r["method"] for r in res["results"]] == ["mapa", "vae"]
    assert res["epochs"] == {"mapa": None, "vae": 4}
    assert [c["epochs"] for c in stub_fit] == [None, 4]
    assert all(c["noise_std"] == 0.1 and c["likelihood"] == "gaussian" for c in stub_fit)
    for r in res["results"]:
        for key in ("test_log_likelihood", "test_log_likelihood_stderr", "decoder_evaluations",
                    "encoder_evaluations", "train_seconds", "curve"):
            assert key in r
        assert len(r["curve"]) == 1
        # the stub's "learned" decoder is the true one: its sampled LL is close to the exact value
        assert r["test_log_likelihood"] == pytest.approx(res["true_test_log_likelihood"], abs=0.3)
    assert res["posterior_tv"]["uniform"] > res["posterior_tv"]["mapa"]
    table = evaluate.format_table(res)
    assert "| mapa |" in table and "| vae |" in table and "| true model |" in table and "uniform" in table


def test_compare_rejects_bad_values(stub_fit):
    with pytest.raises(ValueError, match="unknown dataset"):
        evaluate.compare("nope")
    with pytest.raises(ValueError, match="epochs must be a positive integer"):
        evaluate.compare("spiral", epochs=0)
    with pytest.raises(ValueError, match="not being compared"):
        evaluate.compare("spiral", ("mapa",), epochs={"vae": 3})
    with pytest.raises(ValueError, match="seed must be a non-negative integer"):
        evaluate.compare("spiral", seed=-2)
    assert stub_fit == []


def test_compare_real_fit_with_curve_and_plots(tmp_path):
    res = evaluate.compare(
        "fold", ("mapa", "vae"), seed=0, n_train=150, n_test=40, epochs=4, curve_points=2, output_dir=tmp_path,
        num_samples=2000,
    )
    for r in res["results"]:
        assert [c["epochs"] for c in r["curve"]] == [2, 4]
        assert r["curve"][0]["decoder_evaluations"] < r["curve"][1]["decoder_evaluations"] == r["decoder_evaluations"]
        assert math.isfinite(r["test_log_likelihood"]) and r["decoder_evaluations"] > 0
    assert res["results"][0]["encoder_evaluations"] == 0 and res["results"][1]["encoder_evaluations"] > 0
    assert set(res["plots"]) == {"density", "posterior", "log_likelihood_vs_evaluations"}
    for path in res["plots"].values():
        with open(path, "rb") as fh:
            assert fh.read(8) == PNG
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left


@pytest.mark.parametrize("name", ["surface", "digits"])
def test_density_plot_for_other_dimensions(name, tmp_path, stub_fit):
    ds = datasets.load(name, n_train=100, n_test=30)
    path = plots.plot_density(ds, {}, tmp_path / "sub" / "d.png")
    assert path.read_bytes()[:8] == PNG
