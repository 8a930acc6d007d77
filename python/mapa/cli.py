"""The ``mapa`` command.

::

    mapa demo                         # MAPA vs VAE vs IWAE on a 2-D ground-truth set, ~1 minute
    mapa compare --dataset fold --methods mapa,vae,iwae,aggressive --seed 1 --json out.json
    mapa datasets                     # the data sets, one line each
    mapa info                         # kernel backends, SIMD path, threads

Bad names or values print one line to stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from ._io import atomic_open

__all__ = ["main", "DEMO_DATASET", "DEMO_EPOCHS"]

DEMO_DATASET = "spiral"
DEMO_N_TRAIN = 1500
DEMO_N_TEST = 500
# Epochs per method for `mapa demo`: about a minute in all on 2 CPU cores.
# MAPA's 40 epochs are 1/5 of the VAE's decoder evaluations (1/25 of IWAE's with K = 10).
DEMO_EPOCHS = {"mapa": 40, "vae": 200, "iwae": 100, "aggressive": 30}
DEMO_CURVE_POINTS = 4


class UsageError(Exception):
    """A bad command line: reported in one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block
        raise UsageError(message)


def _int_at_least(lowest: int, what: str):
    """An argparse type: an integer >= ``lowest``, else a one-line error naming ``what``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = lowest - 1
        if value < lowest:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


_positive_int = _int_at_least(1, "a positive integer")
_seed = _int_at_least(0, "a non-negative integer")


def _dataset_name(text: str) -> str:
    from .datasets import list_datasets

    names = list_datasets()
    if text not in names:
        raise argparse.ArgumentTypeError(f"unknown dataset {text!r}; choose one of {', '.join(names)}")
    return text


def _methods(text: str) -> tuple[str, ...]:
    from .evaluate import parse_methods

    try:
        return parse_methods(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _common_run_options(p: argparse.ArgumentParser, *, dataset_default, methods_default, epochs_help):
    p.add_argument("--dataset", type=_dataset_name, default=dataset_default, required=dataset_default is None,
                   help="data set name (see `mapa datasets`)" + (f"; default {dataset_default}" if dataset_default else ""))
    p.add_argument("--methods", type=_methods, default=methods_default,
                   help="comma-separated methods from mapa,vae,iwae,aggressive; default " + ",".join(methods_default))
    p.add_argument("--seed", type=_seed, default=0, help="seed of the data sample and of every fit; default 0")
    p.add_argument("--n-train", type=_positive_int, default=None, help="training points (default: the data set's)")
    p.add_argument("--n-test", type=_positive_int, default=None, help="test points (default: the data set's)")
    p.add_argument("--epochs", type=_positive_int, default=None, help=epochs_help)
    p.add_argument("--num-samples", type=_positive_int, default=None,
                   help="samples for the test log-likelihood (default: FittedModel.log_likelihood's)")
    p.add_argument("--curve-points", type=_positive_int, default=None,
                   help="evaluate the test log-likelihood after this many training stages, for the "
                        "log-likelihood vs decoder-evaluations plot (default: demo 4, compare 1)")
    p.add_argument("--learn-noise", action="store_true",
                   help="let every method learn sigma instead of giving it the true value")
    p.add_argument("--json", metavar="FILE", default=None, help="also write the results as JSON (atomically)")
    p.add_argument("--quiet", action="store_true", help="no progress messages")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``mapa`` command."""
    parser = _Parser(prog="mapa", description="MAPA: model-agnostic posterior approximation for VAE-style models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    demo = sub.add_parser("demo", help="train MAPA, VAE and IWAE on a 2-D ground-truth set (about a minute)",
                          description="Train MAPA, VAE and IWAE on a ground-truth data set, print the "
                                      "comparison and write plots.")
    _common_run_options(demo, dataset_default=DEMO_DATASET, methods_default=("mapa", "vae", "iwae"),
                        epochs_help="epochs for every method (default: "
                                    + ", ".join(f"{k} {v}" for k, v in DEMO_EPOCHS.items()) + ")")
    demo.add_argument("--output-dir", default="mapa-output", help="where the plots go; default ./mapa-output")

    cmp_ = sub.add_parser("compare", help="fit methods on one data set and seed, print and save the comparison",
                          description="Fit the given methods on one data set and seed and evaluate them.")
    _common_run_options(cmp_, dataset_default=None, methods_default=("mapa", "vae", "iwae"),
                        epochs_help="epochs for every method (default: each method's own default)")
    cmp_.add_argument("--output-dir", default=None, help="also write plots here")

    sub.add_parser("datasets", help="list the data sets", description="List the data sets.")
    sub.add_parser("info", help="show the kernel configuration", description="Show backends, SIMD path and threads.")
    return parser


def _jsonable(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # NumPy scalars
        return _jsonable(obj.item())
    return obj


def write_json(path, data) -> Path:
    """Write ``data`` as JSON atomically (NaN and inf become null)."""
    path = Path(path)
    with atomic_open(path, "w") as fh:
        json.dump(_jsonable(data), fh, indent=2, allow_nan=False)
        fh.write("\n")
    return path


def _run(args, *, demo: bool) -> int:
    from .evaluate import DEFAULT_NUM_SAMPLES, compare, format_table

    log = None if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    epochs = args.epochs
    if epochs is None and demo:
        epochs = {m: DEMO_EPOCHS[m] for m in args.methods}
    num_samples = args.num_samples if args.num_samples is not None else DEFAULT_NUM_SAMPLES
    curve_points = args.curve_points if args.curve_points is not None else (DEMO_CURVE_POINTS if demo else 1)
    n_train = args.n_train if args.n_train is not None else (DEMO_N_TRAIN if demo else None)
    n_test = args.n_test if args.n_test is not None else (DEMO_N_TEST if demo else None)
    start = time.perf_counter()
    result = compare(
        args.dataset, args.methods, seed=args.seed, n_train=n_train, n_test=n_test, epochs=epochs,
        num_samples=num_samples, curve_points=curve_points, known_noise=not args.learn_noise, output_dir=args.output_dir,
        progress=False if args.quiet else None, log=log,
    )
    print(format_table(result))
    if args.json:
        write_json(args.json, result)
        print(f"\nresults written to {args.json}")
    if result["plots"]:
        print(f"\nplots written to {Path(args.output_dir).resolve()}:")
        for path in result["plots"].values():
            print(f"  {Path(path).resolve()}")
    if demo:
        print(f"\nfinished in {time.perf_counter() - start:.0f} s")
    return 0


def _datasets() -> int:
    from .datasets import dataset_info, list_datasets

    names = list_datasets()
    width = max(map(len, names))
    print(f"{'name':{width}}  {'K':>2}  {'D':>3}  {'sigma':>5}  description")
    for name, description in names.items():
        info = dataset_info(name)
        sigma = "-" if info.noise_std is None else f"{info.noise_std:g}"
        print(f"{name:{width}}  {info.latent_dim:>2}  {info.data_dim:>3}  {sigma:>5}  {description}")
    return 0


def main(argv=None) -> int:
    """Run the ``mapa`` command with ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        if args.command == "datasets":
            return _datasets()
        if args.command == "info":
            from . import show_config

            show_config()
            return 0
        return _run(args, demo=args.command == "demo")
    except UsageError as exc:
        print(f"mapa: error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, TypeError) as exc:
        # Bad values that only the library can judge (e.g. n_train larger than the data set).
        print(f"mapa: error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0
    except KeyboardInterrupt:
        print("mapa: interrupted", file=sys.stderr)
        return 130
