"""mapa.fit: validation, counting, reproducibility, checkpoints, divergence, results."""


import numpy as np
import pytest
import torch
from torch import nn

import mapa
from mapa.training import METHODS, FittedModel, TrainingDivergedError

METHOD_NAMES = ["mapa", "vae", "iwae", "aggressive"]


@pytest.fixture(scope="module")
def X():
    rng = np.random.default_rng(0)
    z = rng.standard_normal(60)
    return np.c_[z, np.sin(2 * z)] + 0.1 * rng.standard_normal((60, 2))


def small(method, X, **kw):
    kw.setdefault("epochs", 2)
    kw.setdefault("batch_size", 16)
    return mapa.fit(X, method=method, latent_dim=1, seed=kw.pop("seed", 0), **kw)


def params(module):
    return torch.cat([p.detach().flatten() for p in module.state_dict().values()])


# ----------------------------------------------------------------------------- results


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_fit_returns_a_fitted_model(method, X):
    f = small(method, X)
    assert isinstance(f, FittedModel) and f.method == method and f.latent_dim == 1
    assert isinstance(f.decoder, nn.Module)
    assert len(f.history) == 2 and all(np.isfinite(f.history))
    assert isinstance(f.noise_std, float) and f.noise_std > 0
    assert f.train_seconds > 0
    if method == "mapa":
        assert f.codes.shape == (60, 1) and f.encoder is None
        assert f.bandwidth > 0 and 0 < f.kernel_seconds <= f.train_seconds
    else:
        assert f.codes is None and isinstance(f.encoder, nn.Module) and f.kernel_seconds == 0
    ll = f.log_likelihood(X[:5], num_samples=1000)
    assert ll.shape == (5,) and np.isfinite(ll).all()
    assert f.sample(7).shape == (7, 2)


def test_fixed_noise_and_default_bandwidth(X):
    f = small("mapa", X, noise_std=0.1)
    assert f.noise_std == pytest.approx(0.1)
    assert f.bandwidth == pytest.approx(mapa.bandwidth_from_noise(0.1, 2))
    learned = small("mapa", X)
    assert learned.bandwidth == pytest.approx(mapa.select_bandwidth(X, "auto"))
    assert small("mapa", X, bandwidth=0.3).bandwidth == 0.3


def test_accepts_torch_tensor(X):
    a = small("vae", X)
    b = small("vae", torch.from_numpy(X).float())
    assert a.history == pytest.approx(b.history, rel=1e-4)


def test_bernoulli_likelihood():
    B = (np.random.default_rng(1).random((40, 6)) < 0.3).astype(float)
    for method in ("mapa", "iwae"):
        f = mapa.fit(B, method=method, latent_dim=2, epochs=2, likelihood="bernoulli")
        assert f.noise_std is None and f.likelihood == "bernoulli"
        ll = f.log_likelihood(B, num_samples=500)
        assert (ll < 0).all()


def test_topk_objective_runs_and_matches_targets_at_start(X):
    a = small("mapa", X, epochs=1, mapa_objective="topk", k=60, batch_size=60, noise_std=0.2)
    b = small("mapa", X, epochs=1, batch_size=60, noise_std=0.2)
    # one full-batch step from the same start: the two objectives agree (prior term scaled alike)
    assert a.history[0] == pytest.approx(b.history[0], rel=1e-5)


# ----------------------------------------------------------------------------- counting


@pytest.mark.parametrize(
    "method, options, decoder_per_epoch, encoder_per_epoch",
    [
        ("mapa", {}, 60, 0),
        ("vae", {"num_samples": 3}, 180, 60),
        ("iwae", {"num_samples": 5}, 300, 60),
    ],
)
def test_evaluation_counts(method, options, decoder_per_epoch, encoder_per_epoch, X):
    f = small(method, X, epochs=3, **options)
    assert f.decoder_evaluations == 3 * decoder_per_epoch
    assert f.encoder_evaluations == 3 * encoder_per_epoch


def test_topk_counts_distinct_codes_per_batch(X):
    # with k = N every batch decodes all N codes once: 4 batches of 16 -> 4 * 60 per epoch
    f = small("mapa", X, epochs=2, mapa_objective="topk", k=60)
    assert f.decoder_evaluations == 2 * 4 * 60


def test_aggressive_counts(X):
    f = small("aggressive", X, epochs=3, max_inner_steps=20, mi_batch_size=30)
    details = f.history_details
    inner = details[-1]["inner_steps"]
    active_epochs = sum(d["aggressive"] for d in details)
    assert inner > 0 and active_epochs >= 1
    assert f.decoder_evaluations == 3 * 60 + inner * 16
    assert f.encoder_evaluations == 3 * 60 + inner * 16 + active_epochs * 30
    # once switched off, it stays off
    flags = [d["aggressive"] for d in details]
    assert flags == sorted(flags, reverse=True)


# ----------------------------------------------------------------------------- reproducibility


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_same_seed_same_result(method, X):
    a, b = small(method, X, seed=5), small(method, X, seed=5)
    assert a.history == b.history
    assert torch.equal(params(a.decoder), params(b.decoder))
    c = small(method, X, seed=6)
    assert not torch.equal(params(a.decoder), params(c.decoder))


def test_global_rng_untouched_and_user_decoder_not_modified(X):
    dec = nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 2))
    before = params(dec).clone()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    small("vae", X, decoder=dec)
    assert torch.equal(torch.rand(3), expected)
    assert torch.equal(params(dec), before)


# ----------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_checkpoint_resume_equals_uninterrupted(method, X, tmp_path):
    path = tmp_path / "run.pt"
    full = small(method, X, epochs=4)
    small(method, X, epochs=2, checkpoint=path)
    resumed = small(method, X, epochs=4, checkpoint=path)
    assert resumed.history == full.history
    assert torch.equal(params(resumed.decoder), params(full.decoder))
    assert resumed.decoder_evaluations == full.decoder_evaluations
    assert resumed.encoder_evaluations == full.encoder_evaluations
    assert resumed.noise_std == full.noise_std
    if method == "mapa":
        np.testing.assert_array_equal(resumed.codes, full.codes)
        assert resumed.bandwidth == full.bandwidth
    assert [p.name for p in tmp_path.iterdir()] == ["run.pt"]  # no temporary files left


def test_resume_after_interruption(X, tmp_path):
    path = tmp_path / "run.pt"

    def interrupt(epoch, loss):
        if epoch == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        small("mapa", X, epochs=5, checkpoint=path, callback=interrupt)
    resumed = small("mapa", X, epochs=5, checkpoint=path)
    full = small("mapa", X, epochs=5)
    assert resumed.history == full.history
    assert torch.equal(params(resumed.decoder), params(full.decoder))
    # a finished run just loads
    again = small("mapa", X, epochs=5, checkpoint=path)
    assert again.history == full.history


def test_checkpoint_from_another_run_is_refused(X, tmp_path):
    path = tmp_path / "run.pt"
    small("vae", X, epochs=1, checkpoint=path)
    with pytest.raises(ValueError, match="different run.*seed"):
        small("vae", X, epochs=2, checkpoint=path, seed=1)
    with pytest.raises(ValueError, match="different run.*method"):
        small("iwae", X, epochs=2, checkpoint=path)
    with pytest.raises(ValueError, match="beyond epochs=0"):
        small("vae", X, epochs=0, checkpoint=path)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="could not be read"):
        small("vae", X, checkpoint=tmp_path / "junk.pt")


# ----------------------------------------------------------------------------- divergence


class NaNAfter(nn.Module):
    """A linear decoder that returns NaN from its ``after``-th call on (the shape probe is call 1)."""

    def __init__(self, after):
        super().__init__()
        self.lin = nn.Linear(1, 2)
        self.after = after
        self.calls = 0

    def forward(self, z):
        self.calls += 1
        out = self.lin(z)
        return out * float("nan") if self.calls >= self.after else out


@pytest.mark.parametrize("method", ["mapa", "vae"])
def test_nan_loss_raises_with_epoch_and_step(method, X):
    # calls: 1 = probe; 2, 3, 4, 5 = epoch 1 (4 batches of 16); 6 = epoch 2, step 0; 7 = step 1
    with pytest.raises(TrainingDivergedError, match=r"epoch 2, step 1") as info:
        small(method, X, epochs=3, decoder=NaNAfter(7))
    assert isinstance(info.value, FloatingPointError)
    assert (info.value.epoch, info.value.step) == (2, 1)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"X": np.zeros(5)}, ValueError, "2-D"),
        ({"X": np.zeros((1, 2))}, ValueError, "at least 2 rows"),
        ({"X": np.array([[0.0, np.nan], [1.0, 2.0]])}, ValueError, "NaN or inf.*row 0, column 1"),
        ({"X": "data"}, TypeError, "X must be an array"),
        ({"X": np.array([["a", "b"], ["c", "d"]])}, TypeError, "dtype"),
        ({"latent_dim": 0}, ValueError, "latent_dim"),
        ({"latent_dim": 1.5}, ValueError, "latent_dim"),
        ({"method": "gan"}, ValueError, r"method must be one of \['mapa', 'vae', 'iwae', 'aggressive'\]"),
        ({"epochs": -1}, ValueError, "epochs"),
        ({"seed": -3}, ValueError, "seed"),
        ({"noise_std": 0.0}, ValueError, "noise_std"),
        ({"decoder": "mlp"}, TypeError, "decoder must be a torch.nn.Module"),
        ({"decoder": nn.Linear(1, 3)}, ValueError, r"expected \(3, 2\)"),
        ({"decoder": nn.Linear(2, 2)}, ValueError, "probe batch"),
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"learning_rate": -1.0}, ValueError, "learning_rate"),
        ({"bandwidth": "silverman"}, ValueError, "bandwidth"),
        ({"bandwidth": -0.1}, ValueError, "bandwidth"),
        ({"mapa_objective": "dense"}, ValueError, "mapa_objective"),
        ({"exclude_self": "yes"}, TypeError, "exclude_self"),
        ({"likelihood": "poisson"}, ValueError, "likelihood"),
        ({"likelihood": "bernoulli"}, ValueError, r"needs data in \[0, 1\]"),
        ({"num_samples": 4}, TypeError, "belong to other methods"),
        ({"learnig_rate": 0.1}, TypeError, "unknown option"),
        ({"progress": "yes"}, TypeError, "progress"),
        ({"checkpoint": 3}, TypeError, "checkpoint"),
        ({"noise_std_init": -1.0}, ValueError, "noise_std_init"),
        ({"code_init": "kmeans"}, ValueError, "code_init must be one of"),
        ({"lr_decay": 0.0}, ValueError, "lr_decay"),
    ],
)
def test_bad_input_is_reported_before_training(kwargs, error, match, X):
    args = {"X": X, "method": "mapa", "latent_dim": 1, **kwargs}
    with pytest.raises(error, match=match):
        mapa.fit(args.pop("X"), **args)


def test_option_of_another_method_named(X):
    with pytest.raises(TypeError, match="exclude_self"):
        mapa.fit(X, method="vae", latent_dim=1, exclude_self=True)


def test_defaults_documented():
    assert set(METHODS) == set(METHOD_NAMES)
    for spec in METHODS.values():
        assert spec.epochs >= 1 and spec.batch_size >= 1 and spec.learning_rate > 0
    # MAPA's default budget: at most 1/5 of the VAE's decoder evaluations
    assert METHODS["mapa"].epochs * 5 <= METHODS["vae"].epochs


def test_progress_bar_writes_to_stderr(X, capsys):
    small("mapa", X, progress=True)
    assert "mapa.fit[mapa]" in capsys.readouterr().err
