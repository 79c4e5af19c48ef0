"""``fastcal train`` end to end on the embedded testbed with a 1-epoch schedule: options, YAML, the run
folder, resumption and errors."""

import json
import math

import pytest

from fastcal.cli import main
from fastcal.metrics.functional import REPORT_KEYS


def test_train_on_the_testbed(testbed_cache, tmp_path, capsys):
    output = tmp_path / "run"
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("lr: 0.05\nbatch_size: 8\nn_bins: 10\n")
    argv = ["train", "--method", "coop", "--loss", "calibrated", "--epochs=1", "--lr=0.01", "--shots", "4"]
    assert main([*argv, "--config", str(yaml_file), "--output", str(output), "--quiet"]) == 0
    printed = capsys.readouterr().out
    results = json.loads((output / "results.json").read_text())
    config = results["config"]
    assert (
        config["lr"] == 0.01 and config["batch_size"] == 8 and config["epochs"] == 1
    )  # option > YAML > recipe
    assert config["method"] == "coop" and config["loss"] == "calibrated" and config["dataset"] is None
    for group in ("base", "new"):
        assert set(REPORT_KEYS) <= set(results[group]) and results[group]["n_bins"] == 10
        assert (output / f"reliability_{group}.png").stat().st_size > 0
    assert results["base"]["count"] + results["new"]["count"] == 720  # the test split: 361 base, 359 new
    assert 0 < results["hm"]["accuracy"] <= 1
    assert (output / "prompt.pt").is_file() and (output / "checkpoint.pt").is_file()
    assert "HM: accuracy" in printed and "ECE(10 bins)" in printed

    # a finished run resumed: nothing left to train, the same results
    assert main([*argv, "--config", str(yaml_file), "--output", str(output), "--quiet", "--resume"]) == 0
    again = json.loads((output / "results.json").read_text())
    assert again["base"] == results["base"] and again["new"] == results["new"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--method", "coop"], "--output"),
        (["--method", "coop", "--output", "x", "--lr=fast"], "lr: expected a number"),
        (["--method", "unknown", "--output", "x"], "method"),
        (["--method", "coop", "--output", "x", "--dataset", "dtd"], "root"),
    ],
)
def test_train_usage_errors(cache_dir, argv, message, capsys):
    assert main(["train", *argv]) == 2
    assert message in capsys.readouterr().err


def test_a_calibration_baseline_on_a_prompted_image_encoder(testbed_cache, tmp_path):
    """ZS-Norm needs the frozen zero-shot logits; VPT prompts the image encoder, so every step runs the
    unprompted one too. Its results.json carries the selective and proximity metrics."""
    output = tmp_path / "run"
    argv = [
        "train",
        "--method",
        "vpt",
        "--loss",
        "zs_norm",
        "--epochs=1",
        "--shots",
        "2",
        "--output",
        str(output),
    ]
    assert main([*argv, "--quiet"]) == 0
    results = json.loads((output / "results.json").read_text())
    assert results["config"]["loss"] == "zs_norm"
    for group in ("base", "new"):
        assert {"aurc", "augrc", "piece"} <= set(results[group])
    assert set(results["hm"]) == {"accuracy", "ece", "mean_ece"}


@pytest.fixture(scope="module")
def words(tmp_path_factory):
    """A small word list for DOR's outliers (WordNet's bank is built once per machine, outside the tests)."""
    path = tmp_path_factory.mktemp("words") / "words.txt"
    path.write_text(
        "\n".join(["ten", "eleven", "dozen", "digit", "numeral", "letter", "pair", "fox", "cipher"])
    )
    return path


# Each new method once through the command (every loss among them, DOR with the methods its paper
# pairs it with, and with ProGrad's gradient rule); each method with each loss: tests/runs/train.
RUNS = [
    ("prograd", "calibrated", "dor"),
    ("promptsrc", "label_smoothing", None),
    ("tcp", "ce", "dor"),
    ("proda", "calibrated", None),
    ("vpt", "calibrated", "dor"),
]


@pytest.mark.parametrize(("method", "loss", "regularizer"), RUNS)
def test_every_method_trains_on_the_testbed(module_testbed_cache, words, tmp_path, method, loss, regularizer):
    """``fastcal train`` with each new method on the testbed: its testbed recipe, cut to one epoch of 2
    shots."""
    cache = module_testbed_cache
    output = tmp_path / "run"
    argv = ["train", "--method", method, "--loss", loss, "--epochs", "1", "--shots", "2", "--batch-size", "5"]
    if regularizer is not None:
        options = f"{{dor: {{vocabulary: {words}, n_outliers: 4}}}}"
        argv += ["--regularizer", regularizer, "--regularizer-options", options]
    assert main([*argv, "--output", str(output), "--cache-dir", str(cache), "--quiet"]) == 0
    results = json.loads((output / "results.json").read_text())
    assert results["config"]["method"] == method and results["config"]["loss"] == loss
    assert results["config"]["regularizers"] == ([regularizer] if regularizer else [])
    for group in ("base", "new"):
        assert 0 <= results[group]["ece"] <= 1 and results[group]["count"] > 0
    history = results["train"]["history"]
    assert len(history) == 1 and math.isfinite(history[0]["loss"])
