"""Training benchmark: MAPA against VAE and IWAE on every ground-truth data set.

A script, not a pytest suite. For each data set x seed it runs
:func:`mapa.evaluate.compare` and stores that cell as JSON under
``benchmarks/results/cells/``; cells already there (with the same settings)
are skipped, so an interrupted run resumes where it stopped. At the end (and
after every cell) it writes

* ``benchmarks/results/bench_training.json`` - every cell and the summary;
* ``benchmarks/results/bench_training.md``   - per data set and method: mean
  test log-likelihood +- standard error over seeds, decoder and encoder
  evaluations, training seconds; the true model's test log-likelihood; per
  data set whether MAPA meets its target against each baseline (PASS/FAIL,
  see :func:`_verdict`); and MAPA's posterior TV next to the uniform and
  self-only references.

Usage::

    PYTHONPATH=python python benchmarks/bench_training.py                  # everything
    PYTHONPATH=python python benchmarks/bench_training.py --datasets spiral --seeds 0
    PYTHONPATH=python python benchmarks/bench_training.py --methods mapa,vae,iwae,aggressive
    PYTHONPATH=python python benchmarks/bench_training.py --summary-only   # re-render from cells
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from mapa import datasets
from mapa.cli import write_json
from mapa.evaluate import compare, format_table, parse_methods

HERE = Path(__file__).resolve().parent


def _settings(args) -> dict:
    return {
        "methods": list(args.methods),
        "n_train": args.n_train,
        "n_test": args.n_test,
        "epochs": args.epochs,
        "curve_points": args.curve_points,
        "num_samples": args.num_samples,
    }


def _cell_path(results_dir: Path, dataset: str, seed: int) -> Path:
    return results_dir / "cells" / f"{dataset}-seed{seed}.json"


def _mean_se(values):
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    if v.size == 0:
        return None, None
    se = float(v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else None
    return float(v.mean()), se


#: MAPA's target: at most this share of a baseline's decoder evaluations
BUDGET_SHARE = 0.2


def _verdict(cells: list[dict], methods: dict) -> dict | None:
    """Does MAPA meet the target against every baseline on this data set?

    Per baseline B: the test log-likelihood difference MAPA - B, paired by seed
    (both fitted on the same sample), its mean and standard error over seeds;
    ``ll_ok`` when the mean is >= -1 standard error. ``evals_ok`` when MAPA's
    decoder evaluations are at most :data:`BUDGET_SHARE` of B's, ``time_ok``
    when its mean training seconds are below B's. PASS needs all three
    against every baseline.
    """
    if "mapa" not in methods:
        return None
    out = {}
    for b in methods:
        if b == "mapa":
            continue
        diffs = []
        for c in cells:
            ll = {r["method"]: r["test_log_likelihood"] for r in c["results"]}
            if "mapa" in ll and b in ll:
                diffs.append(ll["mapa"] - ll[b])
        d, se = _mean_se(diffs)
        ll_ok = d is not None and d >= -(se or 0.0)
        evals_ok = methods["mapa"]["decoder_evaluations"] <= BUDGET_SHARE * methods[b]["decoder_evaluations"]
        time_ok = methods["mapa"]["train_seconds"] < methods[b]["train_seconds"]
        out[b] = {"diff": d, "diff_se": se, "ll_ok": ll_ok, "evals_ok": evals_ok, "time_ok": time_ok}
    out["pass"] = all(v["ll_ok"] and v["evals_ok"] and v["time_ok"] for v in out.values())
    return out


def summarise(cells: list[dict]) -> dict:
    """Per data set: per method means over seeds, the true model, posterior TV."""
    out: dict = {}
    for ds in dict.fromkeys(c["dataset"] for c in cells):
        mine = [c for c in cells if c["dataset"] == ds]
        methods = list(dict.fromkeys(r["method"] for c in mine for r in c["results"]))
        entry = {"seeds": [c["seed"] for c in mine], "methods": {}}
        for m in methods:
            rows = [r for c in mine for r in c["results"] if r["method"] == m]
            ll, ll_se = _mean_se([r["test_log_likelihood"] for r in rows])
            entry["methods"][m] = {
                "test_log_likelihood": ll,
                "test_log_likelihood_se": ll_se,
                "decoder_evaluations": _mean_se([r["decoder_evaluations"] for r in rows])[0],
                "encoder_evaluations": _mean_se([r["encoder_evaluations"] for r in rows])[0],
                "train_seconds": _mean_se([r["train_seconds"] for r in rows])[0],
                "n_seeds": len(rows),
            }
        entry["true_test_log_likelihood"], entry["true_test_log_likelihood_se"] = _mean_se(
            [c.get("true_test_log_likelihood") for c in mine]
        )
        entry["verdict"] = _verdict(mine, entry["methods"])
        tvs = [c["posterior_tv"] for c in mine if c.get("posterior_tv")]
        if tvs:
            entry["posterior_tv"] = {k: _mean_se([t[k] for t in tvs])[0] for k in
                                     ("mapa", "mapa_exclude_self", "uniform", "self_only", "bandwidth_over_sigma")}
        out[ds] = entry
    return out


def _f(x, spec):
    return "-" if x is None else format(x, spec)


def render_markdown(summary: dict, settings: dict) -> str:
    lines = [
        "# Training benchmark: test log-likelihood and cost",
        "",
        f"Settings: {json.dumps(settings)}. Mean over seeds +- standard error over seeds;",
        "evaluations and seconds are means over seeds. The true model's log-likelihood is exact",
        "(quadrature); learned models use FittedModel.log_likelihood.",
        "",
        "| data set | method | test log-lik. | +- s.e. | decoder evals | encoder evals | train s | seeds |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for ds, entry in summary.items():
        for m, r in entry["methods"].items():
            lines.append(
                f"| {ds} | {m} | {_f(r['test_log_likelihood'], '.3f')} | {_f(r['test_log_likelihood_se'], '.3f')} | "
                f"{_f(r['decoder_evaluations'], ',.0f')} | {_f(r['encoder_evaluations'], ',.0f')} | "
                f"{_f(r['train_seconds'], '.1f')} | {r['n_seeds']} |"
            )
        lines.append(
            f"| {ds} | true model | {_f(entry['true_test_log_likelihood'], '.3f')} | "
            f"{_f(entry['true_test_log_likelihood_se'], '.3f')} | - | - | - | {len(entry['seeds'])} |"
        )
    lines += [
        "",
        "Target: MAPA's test log-likelihood at least each baseline's within one standard error (difference",
        f"MAPA - baseline paired by seed, mean +- s.e.), with at most {BUDGET_SHARE:g} of its decoder evaluations",
        "and less training time:",
        "",
        "| data set | baseline | MAPA - baseline | +- s.e. | log-lik. | evals <= 1/5 | less time | verdict |",
        "| --- | --- | ---: | ---: | :---: | :---: | :---: | :---: |",
    ]
    yes = {True: "yes", False: "NO"}
    for ds, entry in summary.items():
        v = entry.get("verdict")
        if not v:
            continue
        for b, r in v.items():
            if b == "pass":
                continue
            lines.append(
                f"| {ds} | {b} | {_f(r['diff'], '+.3f')} | {_f(r['diff_se'], '.3f')} | {yes[r['ll_ok']]} | "
                f"{yes[r['evals_ok']]} | {yes[r['time_ok']]} | {'PASS' if v['pass'] else 'FAIL'} |"
            )
    lines += [
        "",
        "Posterior TV to the exact empiricalized posterior (mean over points and seeds; 0 = exact):",
        "",
        "| data set | h / sigma | MAPA | MAPA without self | uniform | self-only |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for ds, entry in summary.items():
        tv = entry.get("posterior_tv")
        if tv:
            lines.append(
                f"| {ds} | {tv['bandwidth_over_sigma']:.2f} | {tv['mapa']:.3f} | {tv['mapa_exclude_self']:.3f} | "
                f"{tv['uniform']:.3f} | {tv['self_only']:.3f} |"
            )
    return "\n".join(lines) + "\n"


def write_summary(results_dir: Path, cells: list[dict], settings: dict) -> None:
    summary = summarise(cells)
    write_json(results_dir / "bench_training.json", {"settings": settings, "summary": summary, "cells": cells})
    text = render_markdown(summary, settings)
    tmp = results_dir / ".bench_training.md.tmp"
    tmp.write_text(text)
    tmp.replace(results_dir / "bench_training.md")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", default=",".join(datasets.ground_truth_datasets()),
                   help="comma-separated; default every ground-truth set")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--methods", type=parse_methods, default=("mapa", "vae", "iwae"))
    p.add_argument("--n-train", type=int, default=None)
    p.add_argument("--n-test", type=int, default=None)
    p.add_argument("--epochs", type=int, default=None, help="for every method (default: each method's own)")
    p.add_argument("--curve-points", type=int, default=1)
    p.add_argument("--num-samples", type=int, default=None)
    p.add_argument("--results-dir", type=Path, default=HERE / "results")
    p.add_argument("--plots", action="store_true", help="also write each cell's plots under results/plots")
    p.add_argument("--fresh", action="store_true", help="recompute cells that already exist")
    p.add_argument("--summary-only", action="store_true", help="only re-render the summary from stored cells")
    args = p.parse_args(argv)
    names = [d.strip() for d in args.datasets.split(",") if d.strip()]
    for d in names:
        datasets.dataset_info(d)  # fails early on a bad name
    seeds = [int(s) for s in args.seeds.split(",")]
    settings = _settings(args)
    args.results_dir.mkdir(parents=True, exist_ok=True)

    cells = []
    for d in names:
        for seed in seeds:
            path = _cell_path(args.results_dir, d, seed)
            if path.exists() and not args.fresh:
                cell = json.loads(path.read_text())
                if cell.get("bench_settings") == settings or args.summary_only:
                    cells.append(cell)
                    print(f"[skip] {d} seed {seed}: {path.relative_to(args.results_dir)} exists", flush=True)
                    continue
            if args.summary_only:
                continue
            start = time.perf_counter()
            print(f"[run ] {d} seed {seed} ...", flush=True)
            cell = compare(
                d, args.methods, seed=seed, n_train=args.n_train, n_test=args.n_test, epochs=args.epochs,
                num_samples=args.num_samples, curve_points=args.curve_points, progress=False,
                output_dir=(args.results_dir / "plots") if args.plots else None,
                log=lambda msg: print(f"       {msg}", flush=True),
            )
            cell["bench_settings"] = settings
            write_json(path, cell)
            cells.append(cell)
            print(format_table(cell), flush=True)
            print(f"[done] {d} seed {seed} in {time.perf_counter() - start:.0f} s", flush=True)
            write_summary(args.results_dir, cells, settings)
    write_summary(args.results_dir, cells, settings)
    print(f"\nwrote {args.results_dir / 'bench_training.md'} and bench_training.json")
    print((args.results_dir / "bench_training.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
