"""pytest configuration for the benchmark suites (not part of the default test run).

Run the kernel suite with::

    cd /work/main && PYTHONPATH=python python -m pytest benchmarks/bench_kernel.py --benchmark-only

Options added here (all optional):

--kernel-rounds N        timed rounds per case after one warm-up call (default 3)
--numpy-max-seconds S    skip NumPy reference cases estimated slower than S (default 30)
--dense-max-gb G         skip dense cases whose (N, N) output exceeds G GiB (default 4)
"""

from __future__ import annotations

import pathlib
import sys

# kernel_cases.py lives next to this file; make it importable whatever the
# import mode or working directory.
_HERE = str(pathlib.Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)


def pytest_addoption(parser):
    group = parser.getgroup("mapa benchmarks")
    group.addoption("--kernel-rounds", type=int, default=3, help="timed rounds per kernel case (default 3)")
    group.addoption(
        "--numpy-max-seconds",
        type=float,
        default=30.0,
        help="skip NumPy reference cases estimated slower than this many seconds (default 30)",
    )
    group.addoption(
        "--dense-max-gb",
        type=float,
        default=4.0,
        help="skip dense cases whose (N, N) output exceeds this many GiB (default 4)",
    )
