"""Saved predictions: every command's ``predictions/<group>.npz`` read back by ``fastcal metrics`` gives
the report in the run's results.json, and a file's fields are what the runs layer documents."""

import json

import numpy as np
import pytest
import torch

from fastcal.cli import main
from fastcal.runs.predictions import predictions_path, save_predictions

KEYS = ("accuracy", "ece", "mce", "brier", "nll", "count")


def metrics_of(capsys, path, n_bins):
    capsys.readouterr()
    assert main(["metrics", str(path), "--bootstrap", "0", "--n-bins", str(n_bins)]) == 0
    return json.loads(capsys.readouterr().out)["metrics"]


def assert_same(got, want):
    for key in KEYS:
        assert got[key] == pytest.approx(want[key], rel=1e-9, abs=1e-12), key
    assert got["ace"] == pytest.approx(want["ace"], rel=1e-9, abs=1e-12)
    assert got["classwise_ece"] == pytest.approx(want["classwise_ece"], rel=1e-9, abs=1e-12)


def test_every_command_saves_what_it_reported(testbed_cache, tmp_path, capsys):
    out = tmp_path
    assert main(["zeroshot", "--output", str(out / "zs"), "--quiet"]) == 0
    rows = json.loads((out / "zs" / "results.json").read_text())["rows"]
    for row, stem in zip(rows, ("zeroshot-hard", "zeroshot-hard-ts"), strict=True):
        for group in ("all", "base", "new"):
            assert_same(
                metrics_of(capsys, out / "zs" / "predictions" / f"{stem}_{group}.npz", 15),
                row["metrics"][group],
            )

    train = [
        "train",
        "--method",
        "kgcoop",
        "--epochs=1",
        "--shots",
        "2",
        "--batch_size",
        "4",
        "--n_bins",
        "10",
    ]
    assert main([*train, "--output", str(out / "train"), "--quiet"]) == 0
    results = json.loads((out / "train" / "results.json").read_text())
    for group in ("base", "new"):
        assert_same(metrics_of(capsys, predictions_path(out / "train", group), 10), results[group])

    finetune = ["finetune", "--method", "flyp", "--max-steps", "2", "--batch-size", "16", "--no-diagrams"]
    assert main([*finetune, "--output", str(out / "ft"), "--quiet"]) == 0
    results = json.loads((out / "ft" / "results.json").read_text())
    assert_same(metrics_of(capsys, predictions_path(out / "ft", "digits"), 10), results["id"])
    shifted = metrics_of(capsys, predictions_path(out / "ft", "digits_shifted"), 10)
    assert_same(shifted, results["ood"]["digits_shifted"])

    tpt = ["tpt", "--method", "ctpt", "--views", "16", "--limit", "6", "--temperature", "1.5"]
    assert main([*tpt, "--output", str(out / "tpt"), "--quiet"]) == 0
    results = json.loads((out / "tpt" / "results.json").read_text())
    assert_same(
        metrics_of(capsys, predictions_path(out / "tpt", "testbed-new"), 20), results["metrics"]["20"]
    )


def test_a_predictions_file_holds_the_documented_fields(tmp_path):
    logits, labels = torch.randn(9, 4) * 3, torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 3])
    features = torch.randn(4, 8)
    path = save_predictions(
        tmp_path / "p" / "g.npz",
        logits,
        labels,
        ["a", "b", "c", "d"],
        logit_scale=50.0,
        temperature=1.25,
        text_features=features,
        zeroshot_text_features=features * 2,
    )
    with np.load(path, allow_pickle=False) as saved:
        assert sorted(saved.files) == sorted(
            [
                "logits",
                "labels",
                "classnames",
                "logit_scale",
                "temperature",
                "text_features",
                "zeroshot_text_features",
            ]
        )
        assert saved["logits"].dtype == np.float32 and np.array_equal(saved["logits"], logits.numpy())
        assert saved["classnames"].tolist() == ["a", "b", "c", "d"] and float(saved["temperature"]) == 1.25
        assert np.array_equal(saved["zeroshot_text_features"], (features * 2).numpy())
    with pytest.raises(ValueError, match="classnames: expected 4 names"):
        save_predictions(tmp_path / "x.npz", logits, labels, ["a"], logit_scale=1.0)
