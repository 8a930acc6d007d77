"""Backend choice: available_backends, MAPA_BACKEND, explicit backend= wins."""

from __future__ import annotations

import numpy as np
import pytest

import mapa
from mapa import _dispatch
from kernel_reference import ALL_BACKEND_NAMES, BACKENDS

X = np.random.default_rng(0).standard_normal((5, 2))


@pytest.fixture
def env(monkeypatch):
    """A clean MAPA_BACKEND for each test (the outer environment may force one)."""
    monkeypatch.delenv("MAPA_BACKEND", raising=False)
    return monkeypatch


@pytest.fixture
def spy(monkeypatch):
    """Record which backend module's log_normalizer a call reaches."""
    used = []
    for name in BACKENDS:
        module = _dispatch.get_backend(name)[1]
        real = module.log_normalizer

        def wrapper(*args, _name=name, _real=real, **kwargs):
            used.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, "log_normalizer", wrapper)
    return used


def test_available_backends_always_has_numpy():
    names = mapa.available_backends()
    assert "numpy" in names
    assert set(names) <= set(ALL_BACKEND_NAMES)
    # in automatic-preference order, no repeats
    assert names == [b for b in ALL_BACKEND_NAMES if b in names]
    assert mapa.available_backends() == names  # stable across calls


def test_auto_takes_first_available(env, spy):
    assert _dispatch.resolve_backend("auto") == BACKENDS[0]
    mapa.log_normalizer(X, bandwidth=1.0)
    assert spy == [BACKENDS[0]]


@pytest.mark.parametrize("name", BACKENDS)
def test_env_var_forces_auto_choice(env, spy, name):
    env.setenv("MAPA_BACKEND", name)
    assert _dispatch.resolve_backend("auto") == name
    mapa.log_normalizer(X, bandwidth=1.0)
    mapa.log_normalizer(X, bandwidth=1.0, backend="auto")
    assert spy == [name, name]


@pytest.mark.parametrize("value", [" NumPy ", "NUMPY\n"])
def test_env_var_is_case_and_space_insensitive(env, spy, value):
    env.setenv("MAPA_BACKEND", value)
    mapa.log_normalizer(X, bandwidth=1.0)
    assert spy == ["numpy"]


@pytest.mark.parametrize("value", ["", "auto", "AUTO"])
def test_env_var_auto_or_empty_means_automatic(env, value):
    env.setenv("MAPA_BACKEND", value)
    assert _dispatch.resolve_backend("auto") == BACKENDS[0]


@pytest.mark.parametrize("name", BACKENDS)
def test_explicit_backend_wins_over_env_var(env, spy, name):
    other = [b for b in BACKENDS if b != name]
    # even a broken value in the environment is ignored when backend= is explicit
    for forced in other + ["bogus"]:
        env.setenv("MAPA_BACKEND", forced)
        assert _dispatch.resolve_backend(name) == name
        mapa.log_normalizer(X, bandwidth=1.0, backend=name)
    assert spy == [name] * (len(other) + 1)


def test_env_var_unknown_backend(env):
    env.setenv("MAPA_BACKEND", "fortran")
    with pytest.raises(ValueError, match=r"environment variable MAPA_BACKEND='fortran' is not a backend"):
        mapa.log_normalizer(X, bandwidth=1.0)


@pytest.mark.parametrize("name", [b for b in ALL_BACKEND_NAMES if b not in BACKENDS] or ["(none)"])
def test_env_var_unavailable_backend(env, name):
    if name not in ALL_BACKEND_NAMES:
        pytest.skip("every backend loads on this machine")
    env.setenv("MAPA_BACKEND", name)
    with pytest.raises(ValueError, match=rf"MAPA_BACKEND='{name}' is not available on this machine"):
        mapa.log_normalizer(X, bandwidth=1.0)


@pytest.mark.parametrize("name", [b for b in ALL_BACKEND_NAMES if b not in BACKENDS] or ["(none)"])
def test_unavailable_backend_explains_why(env, name):
    if name not in ALL_BACKEND_NAMES:
        pytest.skip("every backend loads on this machine")
    with pytest.raises(ValueError, match=rf"backend='{name}' is not available.*available: \[.*'numpy'\]"):
        _dispatch.resolve_backend(name)
    assert _dispatch.load_error(name)


@pytest.mark.parametrize("name", BACKENDS)
def test_loaded_backends_follow_the_contract(name):
    module = _dispatch.get_backend(name)[1]
    for func in ("log_normalizer", "log_posterior", "topk", "targets"):
        assert callable(getattr(module, func))
    assert _dispatch.load_error(name) is None


def test_resolve_backend_rejects_non_strings(env):
    with pytest.raises(TypeError, match=r"backend must be a string"):
        _dispatch.resolve_backend(None)


def test_config_and_show_config(env, capsys):
    info = mapa.config()
    assert info["available_backends"] == BACKENDS
    assert info["auto_backend"] == BACKENDS[0]
    assert set(info["backends"]) == set(ALL_BACKEND_NAMES)
    for name in ALL_BACKEND_NAMES:
        assert info["backends"][name]["available"] == (name in BACKENDS)
    assert info["cores"] >= 1
    mapa.show_config()
    out = capsys.readouterr().out
    assert f"automatic backend: {BACKENDS[0]}" in out
    for name in ALL_BACKEND_NAMES:
        assert name in out


@pytest.mark.parametrize("name", ["cpp", "numba"])
def test_backend_that_fails_to_load(env, monkeypatch, name):
    """Simulate a missing extension/numba, whatever this machine has."""
    monkeypatch.setitem(_dispatch._loaded, name, None)
    monkeypatch.setitem(_dispatch._errors, name, "ImportError: simulated")
    assert name not in mapa.available_backends()
    assert "numpy" in mapa.available_backends()
    with pytest.raises(ValueError, match=rf"backend='{name}' is not available on this machine \(ImportError: simulated\)"):
        mapa.log_normalizer(X, bandwidth=1.0, backend=name)
    env.setenv("MAPA_BACKEND", name)
    with pytest.raises(ValueError, match=rf"MAPA_BACKEND='{name}' is not available"):
        mapa.log_normalizer(X, bandwidth=1.0)
    env.delenv("MAPA_BACKEND")
    assert _dispatch.resolve_backend("auto") == mapa.available_backends()[0] != name
    np.testing.assert_allclose(mapa.log_normalizer(X, bandwidth=1.0), mapa.log_normalizer(X, bandwidth=1.0, backend="numpy"))
