"""Kernel results table: every (function, backend) against torch dense+log_softmax.

In one process, for each (N, D) with queries = X (float32, k = 64, 2 threads):
time ``torch.log_softmax(-torch.cdist(Y, X)**2 / (2*h*h), dim=1)`` (the
yardstick), the torch code giving the same output as each function, and each
available mapa backend on log_normalizer, log_posterior_topk,
posterior_targets and log_posterior. Every measurement is one warm-up call
(which also compiles the numba kernels) and then the median of ``--repeats``
calls. Then the peak memory of log_posterior_topk and posterior_targets at
N = 100000, D = 2 (cpp), each in a fresh process (bench_memory.py).

Writes ``<out>/kernel.json`` and ``<out>/kernel.md`` (default
benchmarks/results/). Full run, on a quiet machine::

    cd /work/main && PYTHONPATH=python python benchmarks/run_kernel_bench.py

Quick check::

    PYTHONPATH=python python benchmarks/run_kernel_bench.py --sizes 2000 --dims 2,16 --repeats 2 --memory-n 0
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import pathlib
import platform
import shlex
import statistics
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402

import kernel_cases as kc  # noqa: E402
import mapa  # noqa: E402

# issue targets
SPEEDUP_LOW_D = 5.0  # D <= 16: cpp at least 5x faster than torch dense+log_softmax
SPEEDUP_HIGH_D = 1.0  # D > 16: no slower
NUMBA_VS_CPP = 3.0  # numba within 3x of cpp
TARGET_FUNCTIONS = ("log_normalizer", "log_posterior_topk")


def _ints(text: str) -> list[int]:
    return [int(t) for t in text.replace(" ", "").split(",") if t]


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import numba
    import torch

    cfg = mapa.config()
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "threads_used": kc.NUM_THREADS,
        "cpp_isa": cfg["backends"].get("cpp", {}).get("isa"),
        "available_backends": cfg["available_backends"],
        "python": platform.python_version(),
        "mapa": mapa.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "numba": numba.__version__,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }


def time_call(call, repeats: int, max_seconds: float) -> dict:
    """One warm-up call, then the median of up to ``repeats`` timed calls.

    When the warm-up already took long, fewer repeats are made so that the
    case stays within about ``max_seconds`` (at least one timed call).
    """
    gc.collect()
    t0 = time.perf_counter()
    out = call()
    warm = time.perf_counter() - t0
    del out
    n = max(1, min(repeats, int(max_seconds // max(warm, 1e-9))))
    times = []
    for _ in range(n):
        gc.collect()
        t0 = time.perf_counter()
        out = call()
        times.append(time.perf_counter() - t0)
        del out
    return {"median_s": statistics.median(times), "times_s": times, "warmup_s": warm, "repeats": n}


def run_timings(sizes, dims, repeats, max_seconds, numpy_max_seconds, dense_max_bytes, backends, log) -> list[dict]:
    import torch

    torch.set_num_threads(kc.NUM_THREADS)
    rows = []
    for N in sizes:
        for D in dims:
            X, h = kc.make_data(N, D)
            Xt = kc.torch_tensor(X)
            base = {"N": N, "D": D, "h": h, "k": kc.K, "pairs": kc.pairs(N)}

            def record(function, impl, call):
                reason = kc.skip_reason(function, impl, N, D, numpy_max_seconds=numpy_max_seconds,
                                        dense_max_bytes=dense_max_bytes)
                row = dict(base, function=function, backend=impl)
                if reason:
                    row["skipped"] = reason
                    log(f"  {function:20s} {impl:24s} skipped: {reason}")
                else:
                    row.update(time_call(call, repeats, max_seconds))
                    row["gpairs_per_s"] = row["pairs"] / row["median_s"] / 1e9
                    log(f"  {function:20s} {impl:24s} {row['median_s']:9.4f} s  "
                        f"({row['gpairs_per_s']:.3f} G pairs/s, {row['repeats']} repeats)")
                rows.append(row)
                return row

            log(f"N={N} D={D} h={h:.4g}")
            yard = record("log_posterior", kc.TORCH_DENSE, kc.torch_dense_call(Xt, h))
            for function in kc.FUNCTIONS:
                if function != "log_posterior":  # torch's code for it *is* the yardstick
                    record(function, kc.TORCH, kc.torch_call(function, Xt, h))
                for b in backends:
                    record(function, b, kc.mapa_call(function, b, X, h))
            del X, Xt, yard
            gc.collect()
    _add_ratios(rows)
    return rows


def _add_ratios(rows):
    def key(r, backend, function=None):
        return (r["N"], r["D"], function or r["function"], backend)

    by = {key(r, r["backend"]): r for r in rows if "median_s" in r}
    for r in rows:
        if "median_s" not in r:
            continue
        yard = by.get((r["N"], r["D"], "log_posterior", kc.TORCH_DENSE))
        same = by.get(key(r, kc.TORCH_DENSE if r["function"] == "log_posterior" else kc.TORCH))
        cpp = by.get(key(r, "cpp"))
        r["speedup_vs_torch_dense"] = yard["median_s"] / r["median_s"] if yard else None
        r["speedup_vs_torch_same_output"] = same["median_s"] / r["median_s"] if same else None
        r["time_vs_cpp"] = r["median_s"] / cpp["median_s"] if cpp else None


def check_targets(rows, memory) -> list[dict]:
    checks = []
    by = {(r["N"], r["D"], r["function"], r["backend"]): r for r in rows if "median_s" in r}
    Ns = sorted({r["N"] for r in rows})
    Ds = sorted({r["D"] for r in rows})
    for N in Ns:
        for D in Ds:
            need = SPEEDUP_LOW_D if D <= 16 else SPEEDUP_HIGH_D
            for f in TARGET_FUNCTIONS:
                r = by.get((N, D, f, "cpp"))
                s = r and r.get("speedup_vs_torch_dense")
                what = f"cpp {f} N={N} D={D}: speed-up vs torch dense+log_softmax"
                if not s:
                    checks.append({"status": "N/A", "text": f"{what} not measured (target >= {need:g}x)"})
                else:
                    checks.append({"status": "PASS" if s >= need else "FAIL",
                                   "text": f"{what} {s:.2f}x (target >= {need:g}x)"})
            for f in kc.FUNCTIONS:
                r = by.get((N, D, f, "numba"))
                c = by.get((N, D, f, "cpp"))
                what = f"numba {f} N={N} D={D}: time / cpp time"
                if not (r and c):
                    checks.append({"status": "N/A", "text": f"{what} not measured (target <= {NUMBA_VS_CPP:g})"})
                else:
                    ratio = r["median_s"] / c["median_s"]
                    checks.append({"status": "PASS" if ratio <= NUMBA_VS_CPP else "FAIL",
                                   "text": f"{what} {ratio:.2f} (target <= {NUMBA_VS_CPP:g})"})
    for m in memory:
        what = f"peak memory {m['backend']} {m['function']} N={m['N']} D={m['D']}"
        if "error" in m:
            checks.append({"status": "FAIL", "text": f"{what}: failed ({m['error']})"})
        else:
            checks.append({"status": "PASS" if m["pass"] else "FAIL",
                           "text": f"{what}: {m['peak_increase_bytes'] / 2**20:.0f} MiB (target < 1 GiB)"})
    return checks


def _fmt(x, spec):
    return "" if x is None else format(x, spec)


def write_markdown(path, info, command, rows, memory, checks):
    L = ["# Kernel benchmark", ""]
    L += [f"Command: `{command}`", ""]
    L += [f"- Machine: {info['cpu']}, {info['usable_cores']} usable cores ({info['logical_cpus']} logical CPUs), "
          f"{info['threads_used']} threads used by torch and the kernel",
          f"- cpp ISA: {info['cpp_isa']}; backends: {', '.join(info['available_backends'])}",
          f"- Python {info['python']}, mapa {info['mapa']}, torch {info['torch']}, numpy {info['numpy']}, "
          f"numba {info['numba']}",
          f"- Date: {info['date']}; load average at start: "
          f"{', '.join(f'{x:.2f}' for x in info['load_average']) if info['load_average'] else 'n/a'}",
          "",
          "Data: float32 points on a 2-D manifold plus noise 0.1, queries = X, "
          "h = mapa.bandwidth_from_noise(0.1, D), k = 64. Each time is the median of the repeats after one "
          "warm-up call. G pairs/s = N*N / seconds / 1e9. Speed-up = torch time / this time; "
          "\"torch dense+log_softmax\" is `torch.log_softmax(-torch.cdist(Y, X)**2 / (2*h*h), dim=1)`; "
          "\"torch same output\" is that dense matrix followed by what gives the function's output "
          "(logsumexp; log_softmax + topk(64); softmax + column sums; log_softmax). "
          "\"x cpp time\" = time / cpp time of the same case.", ""]
    L += ["## Targets", ""]
    counts = {s: sum(c["status"] == s for c in checks) for s in ("PASS", "FAIL", "N/A")}
    L += [f"{counts['PASS']} PASS, {counts['FAIL']} FAIL, {counts['N/A']} N/A", "", "```"]
    L += [f"{c['status']:4s}  {c['text']}" for c in checks]
    L += ["```", ""]
    L += ["## Timings", "",
          "| N | D | function | backend | median s | G pairs/s | speed-up vs torch dense+log_softmax "
          "| speed-up vs torch same output | x cpp time | repeats |",
          "| ---: | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if "median_s" in r:
            L.append(f"| {r['N']} | {r['D']} | {r['function']} | {r['backend']} | {r['median_s']:.4f} "
                     f"| {r['gpairs_per_s']:.3f} | {_fmt(r['speedup_vs_torch_dense'], '.2f')} "
                     f"| {_fmt(r['speedup_vs_torch_same_output'], '.2f')} | {_fmt(r['time_vs_cpp'], '.2f')} "
                     f"| {r['repeats']} |")
        else:
            L.append(f"| {r['N']} | {r['D']} | {r['function']} | {r['backend']} | skipped: {r['skipped']} "
                     f"| | | | | |")
    L.append("")
    numba_rows = [r for r in rows if r["backend"] == "numba" and r.get("time_vs_cpp")]
    if numba_rows:
        L += ["### numba vs cpp", "", "| N | D | function | numba s | cpp s | numba / cpp |",
              "| ---: | ---: | --- | ---: | ---: | ---: |"]
        for r in numba_rows:
            L.append(f"| {r['N']} | {r['D']} | {r['function']} | {r['median_s']:.4f} "
                     f"| {r['median_s'] / r['time_vs_cpp']:.4f} | {r['time_vs_cpp']:.2f} |")
        L.append("")
    if memory:
        L += ["## Peak memory", "",
              "Each call in a fresh process; peak increase = VmHWM after the call minus RSS just before it "
              "(peak counter reset through /proc/self/clear_refs).", "",
              "| function | N | D | backend | threads | seconds | peak increase MiB | process peak MiB | target |",
              "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | --- |"]
        for m in memory:
            if "error" in m:
                L.append(f"| {m['function']} | {m['N']} | {m['D']} | {m['backend']} | {m['threads']} "
                         f"| failed: {m['error']} | | | FAIL |")
            else:
                L.append(f"| {m['function']} | {m['N']} | {m['D']} | {m['backend']} | {m['threads']} "
                         f"| {m['seconds']:.1f} | {m['peak_increase_bytes'] / 2**20:.0f} "
                         f"| {m['peak_rss_bytes'] / 2**20:.0f} | {'PASS' if m['pass'] else 'FAIL'} (< 1024) |")
        L.append("")
    pathlib.Path(path).write_text("\n".join(L))


def main(argv=None):
    ap = argparse.ArgumentParser(description="MAPA kernel benchmark table (see the module docstring).")
    ap.add_argument("--sizes", type=_ints, default=list(kc.SIZES), help="comma-separated N (default 2000,8000,20000)")
    ap.add_argument("--dims", type=_ints, default=list(kc.DIMS), help="comma-separated D (default 2,16,256)")
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per case after one warm-up (default 5)")
    ap.add_argument("--out", type=pathlib.Path, default=HERE / "results",
                    help="output directory for kernel.json and kernel.md (default benchmarks/results)")
    ap.add_argument("--backends", default=",".join(kc.BACKENDS),
                    help="comma-separated mapa backends to time; unavailable ones are skipped (default cpp,numba,numpy)")
    ap.add_argument("--max-seconds-per-case", type=float, default=60.0,
                    help="fewer repeats for cases whose warm-up call is slow, to stay near this budget (default 60)")
    ap.add_argument("--numpy-max-seconds", type=float, default=kc.NUMPY_MAX_SECONDS,
                    help="skip NumPy reference cases estimated slower than this (default 30)")
    ap.add_argument("--dense-max-gb", type=float, default=kc.DENSE_MAX_BYTES / 2**30,
                    help="skip dense cases whose (N, N) output exceeds this many GiB (default 4)")
    ap.add_argument("--memory-n", type=int, default=100_000,
                    help="N of the peak-memory runs (D = 2, cpp); 0 skips them (default 100000)")
    args = ap.parse_args(argv)

    command = "PYTHONPATH=python python " + " ".join(
        shlex.quote(a) for a in [os.path.relpath(__file__, os.getcwd()), *sys.argv[1:]])
    info = machine_info()

    def log(msg):
        print(msg, flush=True)

    log(f"# {command}")
    log(f"# {info['cpu']}, {info['usable_cores']} cores, cpp isa {info['cpp_isa']}, backends {info['available_backends']}")
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = [b for b in backends if b not in kc.BACKENDS]
    if unknown:
        ap.error(f"--backends: unknown {unknown}; choose from {list(kc.BACKENDS)}")
    t_start = time.perf_counter()
    rows = run_timings(args.sizes, args.dims, args.repeats, args.max_seconds_per_case, args.numpy_max_seconds,
                       int(args.dense_max_gb * 2**30), backends, log)
    memory = []
    if args.memory_n > 0:
        import bench_memory

        if "cpp" in mapa.available_backends():
            memory = bench_memory.measure_all(N=args.memory_n, D=2, backend="cpp", threads=kc.NUM_THREADS, log=log)
        else:
            log("memory: cpp backend not available, skipped")
    checks = check_targets(rows, memory)
    elapsed = time.perf_counter() - t_start

    args.out.mkdir(parents=True, exist_ok=True)
    result = {"command": command, "machine": info, "elapsed_s": elapsed,
              "settings": {"sizes": args.sizes, "dims": args.dims, "repeats": args.repeats, "k": kc.K,
                           "threads": kc.NUM_THREADS, "backends": backends},
              "timings": rows, "memory": memory, "targets": checks}
    (args.out / "kernel.json").write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(args.out / "kernel.md", info, command, rows, memory, checks)
    log("")
    for c in checks:
        log(f"{c['status']:4s}  {c['text']}")
    log(f"\nwrote {args.out / 'kernel.json'} and {args.out / 'kernel.md'} ({elapsed:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
