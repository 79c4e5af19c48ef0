"""fastcal metrics: the JSON report equals the functional metrics on the files the tests write."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import fastcal.cli.metrics as metrics_cli
from fastcal.calibrate import fit_temperature
from fastcal.cli import main
from fastcal.metrics import (
    augrc,
    aurc,
    bootstrap_interval,
    calibration_error,
    calibration_report,
    ece,
    smooth_ece,
)

f64 = torch.float64


def make_logits(n, c, seed, temperature=0.6):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, generator=g, dtype=f64) * 2.5
    labels = torch.multinomial(torch.softmax(logits / temperature, dim=1), 1, generator=g).squeeze(1)
    return logits, labels


def expected_metrics(probs, labels, n_bins):
    expected = calibration_report(probs, labels, n_bins=n_bins)
    expected["l2_debiased"] = float(calibration_error(probs, labels, n_bins=n_bins, norm="l2", debias=True))
    expected["ace"] = float(calibration_error(probs, labels, n_bins=n_bins, binning="quantile"))
    expected["classwise_ece"] = float(calibration_error(probs, labels, n_bins=n_bins, kind="classwise"))
    expected["smooth_ece"] = float(smooth_ece(probs, labels))
    expected["aurc"] = float(aurc(probs, labels))
    expected["augrc"] = float(augrc(probs, labels))
    return expected


def assert_metrics(got, expected):
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key


def run_cli(capsys, *argv):
    status = main(["metrics", *map(str, argv)])
    captured = capsys.readouterr()
    return status, captured


def test_npz_logits_report_and_intervals(tmp_path, capsys):
    logits, labels = make_logits(601, 5, seed=0)
    path = tmp_path / "preds.npz"
    np.savez(path, logits=logits.numpy(), labels=labels.numpy().astype(np.int32))
    status, captured = run_cli(
        capsys, path, "--n-bins", 10, "--bootstrap", 30, "--output", tmp_path / "r.json"
    )
    assert status == 0
    report = json.loads(captured.out)
    assert report["n_bins"] == 10 and report["metrics"]["n_bins"] == 10
    assert report["input"] == "logits" and report["count"] == 601 and report["num_classes"] == 5
    probs = torch.softmax(logits, dim=1)
    assert_metrics(report["metrics"], expected_metrics(probs, labels, 10))
    intervals = report["intervals"]
    assert (intervals["level"], intervals["n"], intervals["seed"]) == (0.95, 30, 0)
    expected_ece = bootstrap_interval(lambda p, y: ece(p, y, n_bins=10), probs, labels, n=30)
    assert intervals["ece"] == pytest.approx(list(expected_ece), abs=1e-9)
    for key in ("accuracy", "ece", "mce", "l2", "brier", "nll", "confidence", "ace", "smooth_ece"):
        lo, hi = intervals[key]
        assert lo <= hi
    assert "temperature_scaling" not in report and "plot" not in report
    assert json.loads((tmp_path / "r.json").read_text()) == report


def test_pt_probs_with_temperature_from_other_label_set(tmp_path, capsys):
    logits, labels = make_logits(503, 6, seed=1)
    probs = torch.softmax(logits, dim=1).float()
    pred = tmp_path / "preds.pt"
    torch.save({"probs": probs, "labels": labels}, pred)
    calib_logits, calib_labels = make_logits(301, 9, seed=2)  # another class set: 9 classes
    calib = tmp_path / "calib.npz"
    np.savez(calib, logits=calib_logits.numpy(), labels=calib_labels.numpy())
    plot = tmp_path / "out" / "diagram.png"

    status, captured = run_cli(capsys, pred, "--temperature-from", calib, "--plot", plot, "--bootstrap", 0)
    assert status == 0
    report = json.loads(captured.out)
    assert report["input"] == "probs" and report["n_bins"] == 15 and "intervals" not in report
    assert_metrics(report["metrics"], expected_metrics(probs, labels, 15))

    ts = report["temperature_scaling"]
    temperature = fit_temperature(calib_logits, calib_labels)
    assert ts["temperature"] == pytest.approx(temperature, rel=1e-12)
    assert ts["calibration_count"] == 301 and ts["calibration_file"] == str(calib)
    scaled = torch.softmax(torch.log(probs.double()) / temperature, dim=1)
    assert_metrics(ts["metrics"], expected_metrics(scaled, labels, 15))
    assert ts["metrics"]["ece"] < report["metrics"]["ece"]
    assert plot.read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "out" / "diagram_ts.png").read_bytes()[:4] == b"\x89PNG"
    assert report["plot"] == str(plot) and ts["plot"] == str(tmp_path / "out" / "diagram_ts.png")


def test_progress_bars_on_large_files(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(metrics_cli, "LARGE_FILE_ROWS", 100)
    monkeypatch.setattr(metrics_cli, "CHUNK_ROWS", 64)
    logits, labels = make_logits(257, 3, seed=3)
    path = tmp_path / "preds.npz"
    np.savez(path, logits=logits.numpy(), labels=labels.numpy())
    status, captured = run_cli(capsys, path, "--bootstrap", 5)
    assert status == 0
    assert "metrics" in captured.err and "bootstrap" in captured.err
    # Chunked through the meter, the report is the one-shot functional one.
    assert_metrics(
        json.loads(captured.out)["metrics"], expected_metrics(torch.softmax(logits, 1), labels, 15)
    )
    status, captured = run_cli(capsys, path, "--bootstrap", 5, "--no-progress")
    assert status == 0 and captured.err == ""


@pytest.mark.parametrize(
    ("content", "argv", "message"),
    [
        (None, [], "PRED_FILE: no such file"),
        (
            {"scores": np.zeros((3, 2)), "labels": np.zeros(3, dtype=np.int64)},
            [],
            "expected keys 'labels' and",
        ),
        ({"probs": np.full((3, 2), 2.0), "labels": np.zeros(3, dtype=np.int64)}, [], "softmax first"),
        (
            {"logits": np.zeros((3, 2)), "labels": np.array([0, 1, 2])},
            [],
            r"PRED_FILE\['labels'\]: expected labels in \[0, 2\)",
        ),
        ({"logits": np.zeros((3, 2)), "labels": np.zeros(3, dtype=np.int64)}, ["--n-bins", "0"], "--n-bins"),
        ({"logits": np.zeros((3, 2)), "labels": np.zeros(3, dtype=np.int64)}, ["--level", "1.5"], "--level"),
    ],
)
def test_errors_exit_2_with_one_line(tmp_path, capsys, content, argv, message):
    path = tmp_path / "preds.npz"
    if content is not None:
        np.savez(path, **content)
    status, captured = run_cli(capsys, path, *argv)
    assert status == 2
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastcal metrics: error:")
    assert re.search(message, lines[0])


def test_wrong_extension_and_calibration_file_errors(tmp_path, capsys):
    (tmp_path / "preds.csv").write_text("0.5,0.5\n")
    status, captured = run_cli(capsys, tmp_path / "preds.csv")
    assert status == 2 and "expected a .npz or .pt file" in captured.err
    logits, labels = make_logits(20, 3, seed=4)
    np.savez(tmp_path / "preds.npz", logits=logits.numpy(), labels=labels.numpy())
    status, captured = run_cli(capsys, tmp_path / "preds.npz", "--temperature-from", tmp_path / "missing.npz")
    assert status == 2 and "--temperature-from: no such file" in captured.err
    np.savez(tmp_path / "calib.npz", probs=torch.softmax(logits, 1).numpy(), labels=labels.numpy() + 5)
    status, captured = run_cli(capsys, tmp_path / "preds.npz", "--temperature-from", tmp_path / "calib.npz")
    assert status == 2 and "--temperature-from['labels']: expected labels in [0, 3)" in captured.err


def test_console_entry_point(tmp_path):
    logits, labels = make_logits(101, 4, seed=5)
    path = tmp_path / "preds.npz"
    np.savez(path, logits=logits.numpy(), labels=labels.numpy())
    out = subprocess.run(
        [sys.executable, "-m", "fastcal", "metrics", str(path), "--n-bins", "20", "--bootstrap", "10"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    report = json.loads(out)
    assert report["n_bins"] == 20
    assert report["metrics"]["ece"] == pytest.approx(float(ece(torch.softmax(logits, 1), labels, n_bins=20)))
