"""What this installation can do: backends, SIMD path, threads."""

from __future__ import annotations

import platform

from ._dispatch import BACKENDS, available_backends, load_error, resolve_backend
from ._validation import resolve_num_threads

__all__ = ["config", "show_config"]


def config() -> dict:
    """Machine-readable configuration of the kernel backends."""
    info: dict = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "available_backends": available_backends(),
        "auto_backend": resolve_backend("auto"),
        "cores": resolve_num_threads(None),
        "backends": {},
    }
    for name in BACKENDS:
        err = load_error(name)
        entry: dict = {"available": err is None}
        if err is not None:
            entry["error"] = err
        elif name == "cpp":
            from . import _core

            entry.update(_core.build_info())
        elif name == "numba":
            import numba

            entry["version"] = numba.__version__
            entry["threading_layer_max_threads"] = numba.config.NUMBA_NUM_THREADS
        info["backends"][name] = entry
    return info


def show_config() -> None:
    """Print which backends work, which SIMD path the compiled kernel takes, and threads."""
    info = config()
    print(f"mapa on Python {info['python']} ({info['machine']}), {info['cores']} usable cores")
    print(f"automatic backend: {info['auto_backend']}")
    for name, entry in info["backends"].items():
        if not entry["available"]:
            print(f"  {name:6s} unavailable: {entry['error']}")
            continue
        details = ", ".join(f"{k}={v}" for k, v in entry.items() if k != "available")
        print(f"  {name:6s} available" + (f" ({details})" if details else ""))
