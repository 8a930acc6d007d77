"""Backend choice: one small function, apart from the compiled code.

``backend="auto"`` takes the first backend that loads, in the order
cpp -> numba -> numpy. The environment variable ``MAPA_BACKEND`` (one of
``cpp``, ``numba``, ``numpy``) replaces that automatic choice; an explicit
``backend=`` argument always wins over it.

``MAPA_VECTOR_BYTES`` (16, 32 or 64), read when the compiled kernel loads,
caps the vector width of its per-pair loops below what the CPU has, so that
the narrower code can be tested on a wider machine. Widths 32 and 64 give
the same results bit for bit; 16 (no fused multiply-add) differs in the
last bits. Any other value is an error for ``backend="auto"`` and
``"cpp"`` (the cpp backend does not load).
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

__all__ = ["BACKENDS", "available_backends", "get_backend", "resolve_backend"]

BACKENDS = ("cpp", "numba", "numpy")
_MODULES = {
    "cpp": "mapa._core",
    "numba": "mapa.backends.numba_impl",
    "numpy": "mapa.backends.numpy_ref",
}
ENV_VAR = "MAPA_BACKEND"
WIDTH_VAR = "MAPA_VECTOR_BYTES"

_loaded: dict[str, ModuleType | None] = {}
_errors: dict[str, str] = {}


def _check_width() -> None:
    width = os.environ.get(WIDTH_VAR, "").strip()
    if width not in ("", "16", "32", "64"):
        raise ValueError(
            f"environment variable {WIDTH_VAR}={width!r} is not a vector width; "
            "set it to 16, 32 or 64 (bytes), or unset it to use the widest this CPU has"
        )


def _load(name: str) -> ModuleType | None:
    if name not in _loaded:
        try:
            if name == "cpp":
                _check_width()  # before the module reads it
            _loaded[name] = importlib.import_module(_MODULES[name])
        except Exception as exc:  # missing extension, missing numba, broken build
            _loaded[name] = None
            _errors[name] = f"{type(exc).__name__}: {exc}"
    return _loaded[name]


def available_backends() -> list[str]:
    """Names of the backends that load on this machine, in automatic-preference order."""
    return [name for name in BACKENDS if _load(name) is not None]


def load_error(name: str) -> str | None:
    """Why backend ``name`` failed to load, or None if it loaded."""
    _load(name)
    return _errors.get(name)


def resolve_backend(backend: object = "auto") -> str:
    """Name of the backend a call with ``backend=`` will use; raises if unusable."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, one of {['auto', *BACKENDS]}, got {backend!r}")
    source = "backend"
    if backend == "auto":
        forced = os.environ.get(ENV_VAR, "").strip().lower()
        if forced and forced != "auto":
            backend, source = forced, f"environment variable {ENV_VAR}"
        else:
            _check_width()  # a mistyped width must not quietly cost the cpp backend
            for name in BACKENDS:
                if _load(name) is not None:
                    return name
            raise RuntimeError("no kernel backend could be loaded")  # numpy always loads
    if backend not in BACKENDS:
        raise ValueError(f"{source}={backend!r} is not a backend; use one of {['auto', *BACKENDS]}")
    if _load(backend) is None:
        raise ValueError(
            f"{source}={backend!r} is not available on this machine ({_errors[backend]}); "
            f"available: {available_backends()}"
        )
    return backend


def get_backend(backend: object = "auto") -> tuple[str, ModuleType]:
    name = resolve_backend(backend)
    return name, _loaded[name]
