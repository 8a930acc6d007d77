"""What the float64 redo of isolated rows costs float32 input (cpp kernel).

float32 data with D <= 32 takes single-precision distances; rows whose
log Z falls below -1e-5 / ((D + 2) 2^-24) are redone alone with float64
distances (README, Numerics). This reports, for the ground-truth data sets
with ``exclude_self`` at the ``"nn"`` and ``"auto"`` bandwidths, the share
of rows redone and the median time of each function for float32 input
against the same points as float64 (which never redoes), one thread.

    cd /work/main && PYTHONPATH=python python benchmarks/bench_drift.py
    PYTHONPATH=python python benchmarks/bench_drift.py --n 10000 --repeats 3   # quick
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import mapa
from mapa import datasets


def drift_floor(d: int) -> float:
    return -1e-5 * 2.0**24 / (d + 2)


def median_seconds(call, repeats: int) -> float:
    call()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=30000, help="training points per data set")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--datasets", default="linear,spiral,fold,surface")
    args = parser.parse_args()
    print(f"N = {args.n}, exclude_self, k = 32, one thread, median of {args.repeats}; "
          "time float32 / time float64 (same points)")
    print("| data | D | bandwidth | rows redone | normaliser | top-k | targets |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: |")
    for name in args.datasets.split(","):
        X = np.asarray(datasets.load(name, n_train=args.n, seed=0).X_train, dtype=np.float32)
        D = X.shape[1]
        for rule in ("nn", "auto"):
            h = mapa.bandwidth.select_bandwidth(X, rule)
            kw = dict(bandwidth=h, exclude_self=True, backend="cpp", num_threads=1)
            share = float((mapa.log_normalizer(X, **kw) < drift_floor(D)).mean())
            cells = []
            for fn in (
                lambda A: mapa.log_normalizer(A, **kw),
                lambda A: mapa.log_posterior_topk(A, k=32, **kw),
                lambda A: mapa.posterior_targets(A, **kw),
            ):
                t32 = median_seconds(lambda: fn(X), args.repeats)
                t64 = median_seconds(lambda: fn(X.astype(np.float64)), args.repeats)
                cells.append(f"{1e3 * t32:.0f} / {1e3 * t64:.0f} ms")
            print(f"| {name} | {D} | {rule} (h = {h:.3g}) | {100 * share:.2f}% | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
