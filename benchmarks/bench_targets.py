"""Issue 4's performance targets, each measured as a ratio against a peer timed in the same process.

Sections (float32 data from ``kernel_cases.make_data``, queries = X, k = 64,
torch and the cpp kernel on 2 threads unless stated):

1. Low D (``--low-dims`` x ``--sizes``): log_normalizer at >= 4 G pairs/s;
   top-k (k = 64) <= 1.5x and posterior_targets <= 2.5x the normaliser's
   time; each of the three >= 10x faster than torch dense+log_softmax; top-k
   faster than FAISS's exact k-NN (``IndexFlatL2``, search only, 2 OpenMP
   threads). Without faiss (``pip install -e .[bench]``) that row is N/A.
2. High D (``--high-dims`` x ``--high-sizes``): each function <= 1.25x the
   time of ``torch.mm(Yt, Xt.T)``, the bare (N, N) float32 GEMM.
3. Dense ``log_posterior`` (N = ``--dense-size``, D = 2, 16): <= 1.5x the time
   of writing the (N, N) float32 output once into a fresh allocation
   (``np.empty(...).fill(1.0)``, page faults included, as mapa pays them for
   its own output), and >= 5x faster than torch dense+log_softmax.
4. Threads (D = 2, N = ``--thread-size``): time at 1 thread / time at 2 >= 1.8.

Every time is the median of ``--repeats`` calls after one warm-up call. The
calls a target compares run interleaved (one of each per round, the order
reversed every other round), so a change in the machine's load from other
processes falls on both sides of a ratio alike; torch dense+log_softmax and
FAISS run alone (torch's gigabytes of freed temporaries slowed the next
call's page faults up to tenfold when interleaved).
Writes ``<out>/targets.md`` and ``<out>/targets.json``. Full run, on a quiet
machine::

    PYTHONPATH=python python benchmarks/bench_targets.py

Smoke test (writes elsewhere)::

    PYTHONPATH=python python benchmarks/bench_targets.py --quick --out /tmp/targets
"""

from __future__ import annotations

import argparse
import gc
import json
import operator
import os
import pathlib
import shlex
import statistics
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import kernel_cases as kc
import numpy as np
from run_kernel_bench import _ints, machine_info

CPP_FUNCTIONS = ("log_normalizer", "log_posterior_topk", "posterior_targets")
DENSE_DIMS = (2, 16)
THREAD_DIM = 2

DEFAULTS = {"sizes": [20000], "low_dims": [2, 16], "high_dims": [256], "high_sizes": [8000, 20000],
            "dense_size": 10000, "thread_size": 20000, "repeats": 5}
QUICK = {"sizes": [2000], "high_sizes": [2000], "dense_size": 2000, "thread_size": 2000, "repeats": 2}

OPS = {">=": operator.ge, "<=": operator.le}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def timed(calls: dict, repeats: int) -> dict[str, list[float]]:
    """Seconds of each call's ``repeats`` timed runs, interleaved: a warm-up round, then
    rounds that run every call once, in reversed order every other round. Outputs are
    dropped at once."""
    names = list(calls)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(repeats + 1):
        for name in names if i % 2 == 0 else names[::-1]:
            gc.collect()
            t0 = time.perf_counter()
            out = calls[name]()
            t = time.perf_counter() - t0
            del out
            if i:
                times[name].append(t)
    return times


class Report:
    """Timings and target checks of one section."""

    def __init__(self, name: str, title: str):
        self.name, self.title = name, title
        self.timings: list[dict] = []
        self.checks: list[dict] = []

    def time(self, case: str, calls: dict, N: int, repeats: int, **extra) -> dict[str, float]:
        """Median seconds of each named call, timed interleaved (see ``timed``)."""
        medians = {}
        for call_name, times in timed(calls, repeats).items():
            s = medians[call_name] = statistics.median(times)
            row = {"case": case, "call": call_name, "median_s": s, "gpairs_per_s": N * N / s / 1e9}
            row.update({k: f(s) for k, f in extra.items()})
            row["times_s"] = times
            self.timings.append(row)
            more = "".join(f", {k} {v:.3g}" for k, v in row.items()
                           if k not in ("case", "call", "median_s", "times_s"))
            log(f"  {case:14s} {call_name:34s} {s:9.4f} s{more}")
        return medians

    def check(self, case: str, measure: str, value: float | None, op: str, target: float, unit: str = "",
              reason: str = "") -> None:
        if value is None:
            status = "N/A"
        else:
            status = "PASS" if OPS[op](value, target) else "FAIL"
        self.checks.append({"case": case, "measure": measure, "value": value, "unit": unit,
                            "target": f"{op} {target:g}{unit}", "status": status, "reason": reason})
        shown = f"{value:.3g}{unit}" if value is not None else f"N/A ({reason})"
        log(f"  {status:4s} {case}: {measure} {shown} (target {op} {target:g}{unit})")


def cpp(function: str, X, h, num_threads: int = kc.NUM_THREADS):
    return kc.mapa_call(function, "cpp", X, h, num_threads=num_threads)


def load_faiss():
    """(faiss module, None) or (None, why it is not there)."""
    try:
        import faiss
    except ImportError as exc:
        return None, f"faiss not importable: {exc}; install faiss-cpu (the bench extra: pip install -e .[bench])"
    faiss.omp_set_num_threads(kc.NUM_THREADS)
    return faiss, None


def low_d(rep: Report, N: int, D: int, repeats: int, faiss, faiss_missing: str | None) -> None:
    case = f"N={N} D={D}"
    log(f"[low D] {case}")
    X, h = kc.make_data(N, D)
    m = rep.time(case, {f"cpp {f}": cpp(f, X, h) for f in CPP_FUNCTIONS}, N, repeats)
    t = {f: m[f"cpp {f}"] for f in CPP_FUNCTIONS}
    # the peers alone: torch's gigabytes of temporaries would slow the next call's page faults
    t_torch = rep.time(case, {kc.TORCH_DENSE: kc.torch_dense_call(kc.torch_tensor(X), h)}, N, repeats)[kc.TORCH_DENSE]
    rep.check(case, "log_normalizer throughput", N * N / t["log_normalizer"] / 1e9, ">=", 4, " G pairs/s")
    rep.check(case, "log_posterior_topk / log_normalizer time", t["log_posterior_topk"] / t["log_normalizer"],
              "<=", 1.5)
    rep.check(case, "posterior_targets / log_normalizer time", t["posterior_targets"] / t["log_normalizer"],
              "<=", 2.5)
    for f in CPP_FUNCTIONS:
        rep.check(case, f"torch dense+log_softmax / cpp {f} time", t_torch / t[f], ">=", 10)
    ratio = None
    if faiss is not None:
        index = faiss.IndexFlatL2(D)
        index.add(X)
        search = f"faiss IndexFlatL2 search k={kc.K}"
        ratio = rep.time(case, {search: lambda: index.search(X, kc.K)}, N, repeats)[search] / t["log_posterior_topk"]
    rep.check(case, f"faiss search / cpp log_posterior_topk time (k={kc.K})", ratio, ">=", 1,
              reason=faiss_missing or "")


def high_d(rep: Report, N: int, D: int, repeats: int) -> None:
    import torch

    case = f"N={N} D={D}"
    log(f"[high D] {case}")
    X, h = kc.make_data(N, D)
    Xt = kc.torch_tensor(X)
    gflops = {"gflop_per_s": lambda s: 2 * N * N * D / s / 1e9}
    calls = {"torch.mm(Yt, Xt.T)": lambda: torch.mm(Xt, Xt.T)}
    calls.update({f"cpp {f}": cpp(f, X, h) for f in CPP_FUNCTIONS})
    m = rep.time(case, calls, N, repeats, **gflops)
    for f in CPP_FUNCTIONS:
        rep.check(case, f"cpp {f} / torch.mm time", m[f"cpp {f}"] / m["torch.mm(Yt, Xt.T)"], "<=", 1.25)


def dense(rep: Report, N: int, D: int, repeats: int) -> None:
    case = f"N={N} D={D}"
    log(f"[dense] {case}")
    X, h = kc.make_data(N, D)
    bandwidth = {"gbytes_per_s": lambda s: N * N * 4 / s / 1e9}
    touched = np.empty((N, N), np.float32)
    touched.fill(0.0)  # first touch, outside the timing
    m = rep.time(case, {
        "cpp log_posterior": cpp("log_posterior", X, h),
        "np.empty + fill (fresh)": lambda: np.empty((N, N), np.float32).fill(1.0),
        "fill (touched)": lambda: touched.fill(1.0),
    }, N, repeats, **bandwidth)
    t = m["cpp log_posterior"]
    t_torch = rep.time(case, {kc.TORCH_DENSE: kc.torch_dense_call(kc.torch_tensor(X), h)}, N, repeats)[kc.TORCH_DENSE]
    rep.check(case, "cpp log_posterior / fresh write time", t / m["np.empty + fill (fresh)"], "<=", 1.5)
    rep.check(case, "torch dense+log_softmax / cpp log_posterior time", t_torch / t, ">=", 5)


def threads(rep: Report, N: int, repeats: int) -> None:
    case = f"N={N} D={THREAD_DIM}"
    log(f"[threads] {case}")
    X, h = kc.make_data(N, THREAD_DIM)
    for f in CPP_FUNCTIONS:
        one, two = f"cpp {f} 1 thread", f"cpp {f} 2 threads"
        m = rep.time(case, {one: cpp(f, X, h, num_threads=1), two: cpp(f, X, h, num_threads=2)}, N, repeats)
        rep.check(case, f"cpp {f} time 1 thread / 2 threads", m[one] / m[two], ">=", 1.8)


# ---------------------------------------------------------------- output


def _num(x) -> str:
    return "" if x is None else f"{x:.3g}"


def tally(checks) -> str:
    n = {s: sum(c["status"] == s for c in checks) for s in ("PASS", "FAIL", "N/A")}
    return f"{n['PASS']} PASS / {n['FAIL']} FAIL" + (f" / {n['N/A']} N/A" if n["N/A"] else "")


def write_markdown(path, info, command, reports):
    load = ", ".join(f"{x:.2f}" for x in info["load_average"]) if info["load_average"] else "n/a"
    L = ["# Issue 4 performance targets", "",
         f"Command: `{command}`", "",
         (f"- Machine: {info['cpu']}, {info['usable_cores']} usable cores ({info['logical_cpus']} logical CPUs), "
          f"{info['threads_used']} threads for torch, faiss and the kernel unless stated"),
         f"- cpp ISA: {info['cpp_isa']}; backends: {', '.join(info['available_backends'])}",
         (f"- Python {info['python']}, mapa {info['mapa']}, torch {info['torch']}, numpy {info['numpy']}, "
          f"numba {info['numba']}, faiss {info['faiss']}"),
         f"- Date: {info['date']}; load average at start: {load}", "",
         ("Data: float32 points on a 2-D manifold plus noise 0.1 (`kernel_cases.make_data`), queries = X, "
          "k = 64. Each time is the median of the repeats after one warm-up call; the cpp calls of one case "
          "and the write or GEMM they are compared with (or one function's thread counts) run interleaved, "
          "one of each per round; torch dense and FAISS run alone. "
          "G pairs/s = N*N / seconds / 1e9; GFLOP/s = 2*N*N*D / seconds / 1e9; GB/s = N*N*4 bytes / seconds / 1e9. "
          "\"torch dense+log_softmax\" is `torch.log_softmax(-torch.cdist(Y, X)**2 / (2*h*h), dim=1)`. "
          "\"fresh\" writes into a new `np.empty` array each call (page faults included, on one thread, for "
          "outputs over glibc's 32 MiB mmap threshold; smaller ones may reuse freed memory, as mapa's output can); "
          "\"touched\" rewrites an array already written (write bandwidth)."), "",
         f"**{tally([c for r in reports for c in r.checks])}**", ""]
    for r in reports:
        L += [f"## {r.title}", "", f"{tally(r.checks)}", "",
              "| case | measure | figure | target | result |", "| --- | --- | ---: | --- | :---: |"]
        for c in r.checks:
            figure = f"{c['value']:.3g}{c['unit']}" if c["value"] is not None else c["reason"]
            L.append(f"| {c['case']} | {c['measure']} | {figure} | {c['target']} | {c['status']} |")
        extra = [k for k in ("gflop_per_s", "gbytes_per_s") if any(k in t for t in r.timings)]
        heads = {"gflop_per_s": "GFLOP/s", "gbytes_per_s": "GB/s"}
        L += ["", "| case | call | median s | G pairs/s |" + "".join(f" {heads[k]} |" for k in extra),
              "| --- | --- | ---: | ---: |" + " ---: |" * len(extra)]
        for t in r.timings:
            L.append(f"| {t['case']} | {t['call']} | {t['median_s']:.4f} | {t['gpairs_per_s']:.3g} |"
                     + "".join(f" {_num(t.get(k))} |" for k in extra))
        L.append("")
    pathlib.Path(path).write_text("\n".join(L))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Issue 4 performance targets (see the module docstring).")
    ap.add_argument("--sizes", type=_ints, help="low-D N, comma-separated (default 20000)")
    ap.add_argument("--low-dims", type=_ints, help="low D, comma-separated (default 2,16)")
    ap.add_argument("--high-dims", type=_ints, help="high D, comma-separated (default 256)")
    ap.add_argument("--high-sizes", type=_ints, help="high-D N, comma-separated (default 8000,20000)")
    ap.add_argument("--dense-size", type=int, help="N of the dense log_posterior section (default 10000)")
    ap.add_argument("--thread-size", type=int, help="N of the thread-scaling section, D = 2 (default 20000)")
    ap.add_argument("--repeats", type=int, help="timed calls after one warm-up (default 5)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: every N 2000 and 2 repeats, unless given explicitly")
    ap.add_argument("--out", type=pathlib.Path, default=HERE / "results",
                    help="directory for targets.md and targets.json (default benchmarks/results)")
    args = ap.parse_args(argv)
    for key, default in DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, QUICK.get(key, default) if args.quick else default)
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")

    command = "PYTHONPATH=python python " + " ".join(
        shlex.quote(a) for a in [os.path.relpath(__file__, os.getcwd()), *sys.argv[1:]])
    kc.set_torch_threads(kc.NUM_THREADS)
    faiss, faiss_missing = load_faiss()
    info = machine_info()
    info["faiss"] = faiss.__version__ if faiss else "not installed"
    log(f"# {command}")
    log(f"# {info['cpu']}, {info['usable_cores']} cores, cpp isa {info['cpp_isa']}, faiss {info['faiss']}")

    t_start = time.perf_counter()
    reports = [Report("low_d", "1. Low D: throughput, cost relative to the normaliser, torch and FAISS"),
               Report("high_d", "2. High D: against the bare float32 GEMM torch.mm(Yt, Xt.T)"),
               Report("dense", "3. Dense log_posterior: against writing its output once, and torch"),
               Report("threads", "4. Threads: cpp time at 1 thread / time at 2")]
    low, high, dense_rep, thread_rep = reports
    for D in args.low_dims:
        for N in args.sizes:
            low_d(low, N, D, args.repeats, faiss, faiss_missing)
    for D in args.high_dims:
        for N in args.high_sizes:
            high_d(high, N, D, args.repeats)
    for D in DENSE_DIMS:
        dense(dense_rep, args.dense_size, D, args.repeats)
    threads(thread_rep, args.thread_size, args.repeats)
    elapsed = time.perf_counter() - t_start

    checks = [c for r in reports for c in r.checks]
    settings = {k: getattr(args, k) for k in DEFAULTS} | {"quick": args.quick, "k": kc.K, "threads": kc.NUM_THREADS}
    result = {"command": command, "machine": info, "elapsed_s": elapsed, "settings": settings,
              "tally": tally(checks),
              "sections": [{"name": r.name, "title": r.title, "timings": r.timings, "checks": r.checks}
                           for r in reports]}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "targets.json").write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(args.out / "targets.md", info, command, reports)
    print(f"{tally(checks)}; wrote {args.out / 'targets.md'} and {args.out / 'targets.json'} ({elapsed:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
