"""The compiled kernel's per-pair loops at every vector width this CPU runs.

The leaves are written once over 64-byte lane groups (csrc/mapa/lanes.hpp):
native AVX-512 registers, or two AVX2 or four SSE2 registers acting as
one. MAPA_VECTOR_BYTES caps the width when the compiled module loads, so
each width runs in its own interpreter. Every width must match float64
NumPy within the kernel's tolerances; widths 32 and 64 (both with fused
multiply-add) must also agree with each other bit for bit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import mapa
import numpy as np
import pytest
from kernel_reference import (
    assert_lognorm_close,
    assert_logq_close,
    check_targets,
    check_topk,
    ref_log_normalizer,
    ref_log_posterior,
)
from mapa import _dispatch

pytestmark = pytest.mark.skipif("cpp" not in mapa.available_backends(), reason="compiled kernel not built")

PYTHON_DIR = str(Path(mapa.__file__).resolve().parent.parent)
TESTS_DIR = str(Path(__file__).resolve().parent)

# Each case: every function of the kernel, self and other queries. "direct":
# 5 features (explicit differences, float and double leaves); "expand": 81
# features, clusters far from the mean at a small bandwidth (the expansion,
# its refinement, and two chunks of features per panel).
CASES = {
    "direct64": (np.float64, "direct"),
    "direct32": (np.float32, "direct"),
    "expand64": (np.float64, "expand"),
    "expand32": (np.float32, "expand"),
}
K = 8

SCRIPT = r"""
import json, sys
import numpy as np
sys.path.insert(0, {tests!r})
import mapa
from mapa import _core
from test_kernel_widths import CASES, K, case_data, outputs
out = {{}}
for name in CASES:
    for key, value in outputs(*case_data(name)).items():
        out[f"{{name}}/{{key}}"] = value
np.savez(sys.argv[1], **out)
print(json.dumps(_core.build_info()["vector_bytes"]))
"""


def case_data(name):
    dtype, kind = CASES[name]
    rng = np.random.default_rng(7)
    if kind == "direct":
        X = rng.standard_normal((300, 5))
        Y = rng.standard_normal((70, 5))
        h = 0.4
    else:
        centres = 4.2 * rng.standard_normal((5, 81))
        X = centres[rng.integers(0, 5, 300)] + 1.3e-4 * rng.standard_normal((300, 81))
        Y = X[:40] + 2e-5 * rng.standard_normal((40, 81))
        h = 1.4e-4 if dtype == np.float64 else 3e-3
    return X.astype(dtype), Y.astype(dtype), h


def outputs(X, Y, h):
    """Every output of the cpp kernel for the case, as arrays named by function."""
    out = {}
    for tag, queries, ex in (("self", None, True), ("other", Y, False)):
        kw = dict(bandwidth=h, exclude_self=ex, backend="cpp", num_threads=2)
        out[f"{tag}/lnorm"] = mapa.log_normalizer(X, queries, **kw)
        out[f"{tag}/dense"] = mapa.log_posterior(X, queries, **kw)
        top = mapa.log_posterior_topk(X, queries, k=K, **kw)
        for field in ("indices", "log_prob", "log_norm", "kept_mass"):
            out[f"{tag}/top_{field}"] = np.asarray(getattr(top, field))
    tg = mapa.posterior_targets(X, bandwidth=h, exclude_self=True, backend="cpp", num_threads=2)
    for field in ("weights", "means", "sq_norms"):
        out[f"targets/{field}"] = np.asarray(getattr(tg, field))
    return out


def run_at(width, tmp_path):
    """The outputs of every case with MAPA_VECTOR_BYTES=width, and the width the module reports."""
    path = tmp_path / f"w{width}.npz"
    env = dict(os.environ, MAPA_VECTOR_BYTES=str(width), PYTHONPATH=os.pathsep.join([PYTHON_DIR, TESTS_DIR]))
    env.pop("MAPA_BACKEND", None)
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(tests=TESTS_DIR), str(path)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr
    with np.load(path) as f:
        return {k: f[k] for k in f.files}, json.loads(done.stdout.strip().splitlines()[-1])


def cpu_widths():
    from mapa import _core

    cpu = _core.build_info()["cpu_vector_bytes"]
    return [w for w in (16, 32, 64) if w <= cpu]


def check_case(res, name):
    X, Y, h = case_data(name)
    dtype = X.dtype.type
    for tag, Q, ex in (("self", X, True), ("other", Y, False)):
        assert_lognorm_close(res[f"{name}/{tag}/lnorm"], ref_log_normalizer(X, Q, h, ex), dtype)
        assert_logq_close(res[f"{name}/{tag}/dense"], ref_log_posterior(X, Q, h, ex), dtype)
        top = SimpleNamespace(**{f: res[f"{name}/{tag}/top_{f}"] for f in ("indices", "log_prob", "log_norm", "kept_mass")})
        check_topk(top, X, Q, h, K, dtype, ex)
    tg = SimpleNamespace(**{f: res[f"{name}/targets/{f}"] for f in ("weights", "means", "sq_norms")})
    check_targets(tg, X, h, dtype, exclude_self=True)


@pytest.fixture(scope="module")
def by_width(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("widths")
    return {w: run_at(w, tmp) for w in cpu_widths()}


@pytest.mark.parametrize("name", list(CASES))
def test_every_width_matches_the_reference(by_width, name):
    for width, (res, reported) in by_width.items():
        assert reported == width
        check_case(res, name)


def test_fma_widths_agree_bit_for_bit(by_width):
    # Every width of 32 bytes or more, and this process (at the CPU's own
    # width unless capped from outside), gives the same bits. On an AVX2
    # machine that compares 32 with 32 across processes; with AVX-512, 32
    # with 64. The baseline code (16) has no fused multiply-add: its last
    # bits differ, and the test above holds it to the reference.
    from mapa import _core

    here = {}
    for name in CASES:
        for key, value in outputs(*case_data(name)).items():
            here[f"{name}/{key}"] = value
    runs = {f"{w} bytes": res for w, (res, _) in by_width.items() if w >= 32}
    if _core.build_info()["vector_bytes"] >= 32:
        runs["this process"] = here
    if _core.build_info()["cpu_vector_bytes"] >= 32:
        assert len(runs) >= 2
    (first, base), *rest = runs.items()
    for label, res in rest:
        assert res.keys() == base.keys()
        for key in base:
            np.testing.assert_array_equal(res[key], base[key], err_msg=f"{key}: {label} against {first}")


def test_width_names_only_16_32_or_64(monkeypatch):
    monkeypatch.delenv("MAPA_BACKEND", raising=False)
    for bad in ("24", "avx2", "0", "128"):
        monkeypatch.setenv("MAPA_VECTOR_BYTES", bad)
        with pytest.raises(ValueError, match=rf"MAPA_VECTOR_BYTES='{bad}' is not a vector width; set it to 16, 32 or 64"):
            _dispatch.resolve_backend("auto")
        assert _dispatch.resolve_backend("numba" if "numba" in mapa.available_backends() else "numpy")
    for good in ("16", "32", "64", ""):
        monkeypatch.setenv("MAPA_VECTOR_BYTES", good)
        assert _dispatch.resolve_backend("auto") == mapa.available_backends()[0]


def test_bad_width_keeps_the_compiled_module_from_loading():
    env = dict(os.environ, MAPA_VECTOR_BYTES="24", PYTHONPATH=PYTHON_DIR)
    env.pop("MAPA_BACKEND", None)
    code = (
        "import mapa, numpy as np\n"
        "assert 'cpp' not in mapa.available_backends()\n"
        "try:\n"
        "    mapa.log_normalizer(np.ones((3, 2)), bandwidth=1.0, backend='cpp')\n"
        "except ValueError as e:\n"
        "    print(e)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "MAPA_VECTOR_BYTES='24' is not a vector width" in done.stdout
