"""Input validation and conversion for the kernel API.

Everything a user can get wrong is checked here, once, before any heavy work,
and reported as a ``ValueError`` or ``TypeError`` that names the argument, what
was given and what to do instead. Backends receive exact, C-contiguous arrays
of one floating dtype and re-check nothing but cheap invariants.
"""

from __future__ import annotations

import numbers
import os
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

__all__ = ["Prepared", "prepare", "resolve_num_threads", "available_memory_bytes"]

_MAX_BLOCK = 1 << 20


def _is_torch_tensor(obj: Any) -> bool:
    # Avoid importing torch unless the object already comes from it.
    return type(obj).__module__.split(".")[0] == "torch" and hasattr(obj, "detach")


def _to_numpy(name: str, obj: Any) -> np.ndarray:
    """Convert ``obj`` to a 2-D floating NumPy array, zero-copy where possible."""
    if obj is None:
        raise TypeError(f"{name} is None; pass an array of shape (n_points, n_features)")
    if _is_torch_tensor(obj):
        if obj.device.type != "cpu":
            raise TypeError(
                f"{name} is a torch tensor on device {obj.device}; the kernel runs on the CPU, "
                f"pass {name}.cpu()"
            )
        if obj.is_complex():
            raise TypeError(f"{name} has complex dtype {obj.dtype}; pass a real floating tensor")
        obj = obj.detach()
        if obj.dtype not in _torch_float_dtypes():
            obj = obj.to(_torch().float64 if not obj.is_floating_point() else _torch().float32)
        arr = obj.numpy()
    else:
        try:
            arr = np.asarray(obj)
        except Exception as exc:  # ragged lists and the like
            raise TypeError(f"{name} could not be converted to an array: {exc}") from None
    if arr.dtype.kind in "biu":
        arr = arr.astype(np.float64)
    elif arr.dtype.kind == "f":
        if arr.dtype not in (np.float32, np.float64):
            # float16 / longdouble: compute in the nearest supported precision
            arr = arr.astype(np.float32 if arr.dtype.itemsize < 4 else np.float64)
    else:
        raise TypeError(
            f"{name} has dtype {arr.dtype}; pass real numbers (float32 or float64; integers "
            f"and booleans are converted to float64)"
        )
    if arr.ndim != 2:
        hint = " (use X.reshape(-1, 1) for one feature)" if arr.ndim == 1 else ""
        raise ValueError(
            f"{name} must be 2-D of shape (n_points, n_features), got ndim={arr.ndim} "
            f"with shape {arr.shape}{hint}"
        )
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {arr.shape}); pass at least one point and one feature")
    if not np.isfinite(arr).all():
        bad = np.argwhere(~np.isfinite(arr))[0]
        raise ValueError(
            f"{name} contains NaN or inf (first at row {bad[0]}, column {bad[1]}); "
            f"remove or impute those entries"
        )
    return arr


_TORCH = None


def _torch():
    global _TORCH
    if _TORCH is None:
        import torch

        _TORCH = torch
    return _TORCH


def _torch_float_dtypes():
    torch = _torch()
    return (torch.float32, torch.float64)


def resolve_num_threads(num_threads: Any) -> int:
    """Number of threads to use: ``None`` means every core this process may run on.

    Follows scikit-learn's ``n_jobs`` convention for other values: a positive
    integer is taken as is, ``-1`` means all cores, ``-2`` all but one, and so on.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if num_threads is None:
        return cores
    if isinstance(num_threads, bool) or not isinstance(num_threads, numbers.Integral):
        raise TypeError(f"num_threads must be an integer or None, got {num_threads!r}")
    n = int(num_threads)
    if n == 0:
        raise ValueError("num_threads=0 is not valid; pass None (all cores), a positive count, or -1")
    if n < 0:
        n = cores + 1 + n
        if n < 1:
            raise ValueError(f"num_threads={num_threads} leaves no thread on {cores} cores; use -1 .. -{cores}")
    return n


def available_memory_bytes() -> int:
    """Memory the kernel may count on: MemAvailable from /proc, else physical memory."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


@dataclass
class Prepared:
    """Validated kernel inputs.

    ``X`` and ``Y`` share one dtype; float64 inputs are shifted by the mean of
    the references (``center``; zeros for float32, see ``prepare``). ``Y is X``
    when the caller passed no queries.
    """

    X: np.ndarray
    Y: np.ndarray
    center: np.ndarray  # float64 (D,)
    dtype: np.dtype
    bandwidth: float
    scale: float  # 1 / (2 h^2)
    exclude_self: bool
    block_size: int
    num_threads: int
    as_torch: bool

    @property
    def n_refs(self) -> int:
        return self.X.shape[0]

    @property
    def n_queries(self) -> int:
        return self.Y.shape[0]

    def wrap(self, arr: np.ndarray):
        """Return ``arr`` as a torch tensor if the inputs were tensors (zero-copy)."""
        if self.as_torch:
            return _torch().from_numpy(np.ascontiguousarray(arr))
        return arr


def _check_bandwidth(bandwidth: Any, X: np.ndarray) -> float:
    from .bandwidth import RULES, select_bandwidth

    if isinstance(bandwidth, str):
        if bandwidth not in RULES:
            raise ValueError(
                f"bandwidth={bandwidth!r} is not a known rule; use a positive float or one of {sorted(RULES)}"
            )
        return select_bandwidth(X, rule=bandwidth)
    if bandwidth is None:
        raise TypeError(
            "bandwidth is required: pass a positive float (e.g. mapa.bandwidth_from_noise(sigma, D)) "
            f"or a rule name from {sorted(RULES)}"
        )
    if _is_torch_tensor(bandwidth):
        bandwidth = bandwidth.item()
    if isinstance(bandwidth, bool) or not isinstance(bandwidth, numbers.Real):
        raise TypeError(f"bandwidth must be a positive float or a rule name, got {bandwidth!r}")
    h = float(bandwidth)
    if not np.isfinite(h) or h <= 0.0:
        raise ValueError(f"bandwidth must be a finite float > 0, got {bandwidth!r}")
    scale = 0.5 / (h * h) if h * h > 0.0 else np.inf
    if not np.isfinite(scale) or scale == 0.0:
        raise ValueError(f"bandwidth={h!r} is too extreme: 1/(2 h^2) is not a finite positive number")
    return h


def _check_block_size(block_size: Any) -> int:
    if block_size is None:
        return 0  # backend default
    if isinstance(block_size, bool) or not isinstance(block_size, numbers.Integral):
        raise TypeError(f"block_size must be a positive integer or None, got {block_size!r}")
    if not 1 <= int(block_size) <= _MAX_BLOCK:
        raise ValueError(f"block_size must be between 1 and {_MAX_BLOCK}, got {block_size}")
    return int(block_size)


def check_k(k: Any, n_refs: int, exclude_self: bool) -> int:
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"k must be a positive integer, got {k!r}")
    limit = n_refs - 1 if exclude_self else n_refs
    if not 1 <= int(k) <= limit:
        extra = " (exclude_self=True leaves N - 1 candidates)" if exclude_self else ""
        raise ValueError(f"k must satisfy 1 <= k <= {limit}{extra}, got k={k}")
    return int(k)


def prepare(
    X: Any,
    queries: Any,
    *,
    bandwidth: Any,
    exclude_self: Any,
    block_size: Any,
    num_threads: Any,
    precheck: Callable[[int, int, np.dtype], None] | None = None,
) -> Prepared:
    """Validate and convert the arguments shared by every kernel function.

    ``precheck(n_refs, n_queries, dtype)``, if given, runs once the shapes are
    known and before any work that scales with them (a data-driven bandwidth
    rule), so that e.g. an output-size check fails fast.
    """
    as_torch = _is_torch_tensor(X) or _is_torch_tensor(queries)
    Xa = _to_numpy("X", X)
    if not isinstance(exclude_self, (bool, np.bool_)):
        raise TypeError(f"exclude_self must be True or False, got {exclude_self!r}")
    exclude_self = bool(exclude_self)
    if queries is None:
        Ya = None
        dtype = Xa.dtype
    else:
        if exclude_self:
            raise ValueError(
                "exclude_self=True only applies when queries is None (the references are their own "
                "queries); drop queries or set exclude_self=False"
            )
        Ya = _to_numpy("queries", queries)
        if Ya.shape[1] != Xa.shape[1]:
            raise ValueError(
                f"queries has {Ya.shape[1]} features but X has {Xa.shape[1]}; both must have the same "
                f"number of columns"
            )
        dtype = np.result_type(Xa.dtype, Ya.dtype)
    if exclude_self and Xa.shape[0] < 2:
        raise ValueError("exclude_self=True needs at least 2 points in X (with one point nothing is left)")
    bs = _check_block_size(block_size)
    nt = resolve_num_threads(num_threads)
    if precheck is not None:
        precheck(Xa.shape[0], Xa.shape[0] if Ya is None else Ya.shape[0], np.dtype(dtype))
    h = _check_bandwidth(bandwidth, Xa)

    # float64 data are shifted by the reference mean (exact to rounding of
    # |x - mean|), which keeps any backend's ||x||^2 + ||y||^2 - 2 x.y form
    # accurate for offset data. float32 data are passed as given: rounding a
    # shifted copy back to float32 would move every point by up to half an
    # ulp, and the backends form their squared distances either in float64
    # or (cpp, up to 32 features) from explicit float32 differences, whose
    # error does not grow with the offset.
    center = Xa.mean(axis=0, dtype=np.float64) if dtype == np.float64 else np.zeros(Xa.shape[1])
    Xc = np.ascontiguousarray(Xa - center if center.any() else Xa, dtype=dtype)
    Yc = Xc if Ya is None else np.ascontiguousarray(Ya - center if center.any() else Ya, dtype=dtype)
    return Prepared(
        X=Xc,
        Y=Yc,
        center=center,
        dtype=np.dtype(dtype),
        bandwidth=h,
        scale=0.5 / (h * h),
        exclude_self=exclude_self,
        block_size=bs,
        num_threads=nt,
        as_torch=as_torch,
    )
