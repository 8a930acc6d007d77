"""Scaling of the cpp kernel with N: time should grow as N^2, memory as N.

Runs ``log_posterior_topk`` (k = 32) and ``posterior_targets`` on D = 2
float32 data for each N, each call in a fresh process (so peak memory is that
call's), and writes ``<out>/scale.json``, ``<out>/scale.md`` and the plot
``<out>/scale.png`` (time and peak memory against N, log-log, with N^2 and N
reference lines through the first point).

    cd /work/main && PYTHONPATH=python python benchmarks/bench_scale.py                 # 1e4 .. 1e6
    PYTHONPATH=python python benchmarks/bench_scale.py --sizes 10000,30000,100000       # quick

At N = 1e6 each call is ~1e12 pairs: minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve().parent

CHILD = r"""
import json, sys, time, resource
import numpy as np
import mapa
n, fn = int(sys.argv[1]), sys.argv[2]
rng = np.random.default_rng(0)
t = rng.uniform(-3, 3, size=n)
X = np.stack([t, np.sin(2 * t)], axis=1) + 0.1 * rng.standard_normal((n, 2))
X = X.astype(np.float32)
h = mapa.bandwidth_from_noise(0.1, 2)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
if fn == "topk":
    out = mapa.log_posterior_topk(X, bandwidth=h, k=32, backend="cpp")
    check = float(np.median(out.kept_mass))
else:
    out = mapa.posterior_targets(X, bandwidth=h, backend="cpp")
    check = float(out.weights.sum() / n)
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"n": n, "function": fn, "seconds": seconds, "peak_rss_mib": peak / 1024,
                  "extra_rss_mib": (peak - base) / 1024, "check": check}))
"""


def run(n: int, fn: str) -> dict:
    env = dict(os.environ)
    proc = subprocess.run([sys.executable, "-c", CHILD, str(n), fn], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"N={n} {fn} failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def atomic_write(path: pathlib.Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def plot(rows: list[dict], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")
    for fn, marker in (("topk", "o"), ("targets", "s")):
        pts = sorted((r["n"], r["seconds"], r["peak_rss_mib"]) for r in rows if r["function"] == fn)
        if not pts:
            continue
        ns = [p[0] for p in pts]
        label = "log_posterior_topk (k=32)" if fn == "topk" else "posterior_targets"
        ax_t.loglog(ns, [p[1] for p in pts], marker=marker, label=label)
        ax_m.loglog(ns, [p[2] for p in pts], marker=marker, label=label)
        n0, t0, m0 = pts[0]
        ax_t.loglog(ns, [t0 * (n / n0) ** 2 for n in ns], ls=":", color="grey")
        ax_m.loglog(ns, [m0 * (n / n0) for n in ns], ls=":", color="grey")
    ax_t.set(xlabel="N (D = 2)", ylabel="seconds", title="time (dotted: N^2 from the first point)")
    ax_m.set(xlabel="N (D = 2)", ylabel="peak RSS of the process (MiB)", title="memory (dotted: N)")
    ax_t.legend()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".png")
    os.close(fd)
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="10000,30000,100000,300000,1000000")
    p.add_argument("--functions", default="topk,targets")
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args(argv)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in [int(s) for s in args.sizes.split(",")]:
        for fn in args.functions.split(","):
            row = run(n, fn)
            rows.append(row)
            print(f"N={n:>8} {fn:8s} {row['seconds']:9.2f} s  peak {row['peak_rss_mib']:8.1f} MiB  "
                  f"({n * n / row['seconds'] / 1e9:.2f} G pairs/s)", flush=True)
            atomic_write(out / "scale.json", json.dumps(rows, indent=2) + "\n")
    lines = ["| N | function | seconds | G pairs/s | peak RSS (MiB) |", "| ---: | --- | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['n']} | {r['function']} | {r['seconds']:.2f} | {r['n'] ** 2 / r['seconds'] / 1e9:.2f} "
                     f"| {r['peak_rss_mib']:.0f} |")
    atomic_write(out / "scale.md", "\n".join(lines) + "\n")
    plot(rows, out / "scale.png")
    print(f"wrote {out / 'scale.md'} and {out / 'scale.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
