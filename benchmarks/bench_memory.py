"""Peak memory of the streaming kernel calls, each in a fresh process.

Measures ``log_posterior_topk`` (k = 64) and ``posterior_targets`` at
N = 100000, D = 2 with the cpp backend (target: under 1 GB; the dense matrix
would be 40 GB). Each call runs in its own child process: the child builds
the data, resets its peak-RSS counter (``/proc/self/clear_refs``; where that
is not possible the peak since start-up is used, which can only overstate),
records its RSS, makes the call and reports ``VmHWM`` (peak resident set)
minus that baseline. ``ru_maxrss`` is reported too.

Run alone (prints JSON)::

    cd /work/main && PYTHONPATH=python python benchmarks/bench_memory.py

``run_kernel_bench.py`` runs the same measurement and puts it in the results.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
FUNCTIONS = ("log_posterior_topk", "posterior_targets")
TARGET_BYTES = 1 << 30


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _child(function: str, N: int, D: int, backend: str, threads: int) -> dict:
    sys.path.insert(0, str(HERE))
    import gc

    import kernel_cases as kc

    X, h = kc.make_data(N, D)
    call = kc.mapa_call(function, backend, X, h, num_threads=threads)
    gc.collect()
    reset = False
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # reset VmHWM to the current RSS
        reset = True
    except OSError:
        pass
    base_kb = _status_kb("VmRSS")
    t0 = time.perf_counter()
    out = call()
    seconds = time.perf_counter() - t0
    hwm_kb = _status_kb("VmHWM")
    maxrss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    del out
    return {
        "function": function,
        "N": N,
        "D": D,
        "backend": backend,
        "threads": threads,
        "k": kc.K if function == "log_posterior_topk" else None,
        "seconds": seconds,
        "baseline_rss_bytes": base_kb * 1024,
        "peak_rss_bytes": hwm_kb * 1024,
        "ru_maxrss_bytes": maxrss_kb * 1024,
        "peak_increase_bytes": (hwm_kb - base_kb) * 1024,
        "hwm_reset": reset,
    }


def measure(function: str, N: int = 100_000, D: int = 2, backend: str = "cpp", threads: int = 2,
            timeout: float = 3600) -> dict:
    """Run one call in a fresh interpreter and return its memory record."""
    cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--child",
           function, str(N), str(D), backend, str(threads)]
    env = dict(os.environ)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        if proc.returncode < 0:
            import signal

            why = f"killed by {signal.Signals(-proc.returncode).name}"
            if proc.returncode == -signal.SIGBUS:
                why += " (was the extension rebuilt in place during the run?)"
        else:
            lines = proc.stderr.strip().splitlines()
            why = lines[-1] if lines else f"exit status {proc.returncode}"
        return {"function": function, "N": N, "D": D, "backend": backend, "threads": threads, "error": why}
    rec = json.loads(proc.stdout.strip().splitlines()[-1])
    rec["target_bytes"] = TARGET_BYTES
    rec["pass"] = rec["peak_increase_bytes"] < TARGET_BYTES
    return rec


def measure_all(N: int = 100_000, D: int = 2, backend: str = "cpp", threads: int = 2, log=print) -> list[dict]:
    records = []
    for function in FUNCTIONS:
        log(f"memory: {function} N={N} D={D} backend={backend} (fresh process) ...")
        rec = measure(function, N, D, backend, threads)
        if "error" in rec:
            log(f"  failed: {rec['error']}")
        else:
            log(f"  peak increase {rec['peak_increase_bytes'] / 2**20:.0f} MiB, "
                f"process peak {rec['peak_rss_bytes'] / 2**20:.0f} MiB, {rec['seconds']:.1f} s")
        records.append(rec)
    return records


def main(argv=None):
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "--child":
        function, N, D, backend, threads = argv[1], int(argv[2]), int(argv[3]), argv[4], int(argv[5])
        print(json.dumps(_child(function, N, D, backend, threads)))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100_000, help="number of points (default 100000)")
    ap.add_argument("--dim", type=int, default=2, help="number of features (default 2)")
    ap.add_argument("--backend", default="cpp")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    records = measure_all(args.n, args.dim, args.backend, args.threads, log=lambda m: print(m, file=sys.stderr))
    print(json.dumps(records, indent=2))
    return 0 if all(r.get("pass") for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
