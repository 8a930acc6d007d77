"""The `mapa` command: listing, bad input, compare's JSON, demo's plots."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mapa import datasets
from mapa.cli import main

PNG = b"\x89PNG\r\n\x1a\n"


def test_datasets_lists_every_name(capsys):
    assert main(["datasets"]) == 0
    out = capsys.readouterr().out
    for name, description in datasets.list_datasets().items():
        assert name in out and description in out
    assert "curve50" in out and " 50 " in out


def test_info_shows_backends(capsys):
    assert main(["info"]) == 0
    assert "automatic backend" in capsys.readouterr().out


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "compare" in capsys.readouterr().out


def test_help_exits_zero(capsys):
    assert main(["compare", "--help"]) == 0
    assert "--dataset" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["compare", "--dataset", "nope"], "unknown dataset 'nope'"),
        (["compare", "--dataset", "spiral", "--methods", "mapa,foo"], "unknown method 'foo'"),
        (["compare", "--dataset", "spiral", "--methods", ""], "non-empty"),
        (["compare", "--dataset", "spiral", "--seed", "-1"], "--seed: expected a non-negative integer"),
        (["compare", "--dataset", "spiral", "--seed", "x"], "--seed: expected a non-negative integer"),
        (["compare", "--dataset", "spiral", "--epochs", "0"], "--epochs: expected a positive integer"),
        (["compare", "--dataset", "spiral", "--epochs", "2.5"], "--epochs: expected a positive integer"),
        (["compare", "--dataset", "spiral", "--n-train", "-5"], "--n-train: expected a positive integer"),
        (["compare"], "required: --dataset"),
        (["compare", "--dataset", "spiral", "--bogus"], "unrecognized arguments: --bogus"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["demo", "--dataset", "nope"], "unknown dataset 'nope'"),
        (["compare", "--dataset", "digits", "--n-train", "1700"], "1797 images"),
        (["compare", "--dataset", "spiral", "--n-train", "1"], "n_train must be an integer >= 2"),
    ],
)
def test_bad_input_one_line_exit_2(argv, message, capsys):
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("mapa: error: ") and message in lines[0]
    assert "Traceback" not in captured.err and captured.out == ""


def test_compare_writes_json(tmp_path, capsys):
    out = tmp_path / "res" / "r.json"
    argv = ["compare", "--dataset", "linear", "--methods", "mapa,vae", "--seed", "2", "--n-train", "120",
            "--n-test", "30", "--epochs", "2", "--num-samples", "1000", "--json", str(out), "--quiet"]
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    assert "| mapa |" in stdout and "| true model |" in stdout and str(out) in stdout
    data = json.loads(out.read_text())
    assert data["dataset"] == "linear" and data["seed"] == 2 and data["n_train"] == 120
    assert [r["method"] for r in data["results"]] == ["mapa", "vae"]
    for r in data["results"]:
        assert isinstance(r["test_log_likelihood"], float)
        assert isinstance(r["decoder_evaluations"], int) and r["decoder_evaluations"] > 0
        assert isinstance(r["encoder_evaluations"], int) and isinstance(r["train_seconds"], float)
    assert isinstance(data["true_test_log_likelihood"], float)
    assert {"mapa", "uniform", "self_only"} <= set(data["posterior_tv"])
    assert [p.name for p in out.parent.iterdir()] == ["r.json"]  # written atomically, nothing left over


def test_demo_small_writes_plots(tmp_path, capsys):
    outdir = tmp_path / "plots"
    argv = ["demo", "--n-train", "120", "--n-test", "30", "--epochs", "2", "--curve-points", "2",
            "--num-samples", "1000", "--output-dir", str(outdir), "--quiet"]
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    assert "| iwae |" in stdout and str(outdir.resolve()) in stdout
    pngs = sorted(outdir.glob("*.png"))
    assert len(pngs) == 3
    assert all(p.read_bytes()[:8] == PNG for p in pngs)


def test_python_dash_m(tmp_path):
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[1] / "python")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "mapa", "compare", "--dataset", "nope"], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "unknown dataset" in proc.stderr


@pytest.mark.slow
def test_demo_defaults(tmp_path, capsys, monkeypatch, request):
    if "slow" not in (request.config.getoption("-m") or ""):
        pytest.skip("about a minute: run with -m slow")
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "| mapa |" in out and "| vae |" in out and "| iwae |" in out
    assert len(list((tmp_path / "mapa-output").glob("*.png"))) == 3
