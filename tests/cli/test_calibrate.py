"""``fastcal calibrate`` on predictions files written by ``fastcal.runs.predictions``: every calibrator's
before/after report equals the functional metrics of the calibrator fitted by hand, the run folder, the
label-set rule and one-line errors."""

import json

import pytest
import torch
import torch.nn.functional as F

from fastcal import registry
from fastcal.cli import main
from fastcal.metrics import ece
from fastcal.runs.predictions import load_predictions, save_predictions
from tests.calibrate.conftest import miscalibrated


def write_group(path, logits, labels, names, seed):
    g = torch.Generator().manual_seed(seed)
    text = F.normalize(torch.randn(len(names), 8, generator=g), dim=1)
    zeroshot = F.normalize(text + 0.3 * torch.randn(len(names), 8, generator=g), dim=1)
    save_predictions(
        path,
        logits.float(),
        labels,
        names,
        logit_scale=100.0,
        text_features=text,
        zeroshot_text_features=zeroshot,
        proximity=torch.rand(len(labels), generator=g, dtype=torch.float64),
    )
    return path


@pytest.fixture
def files(tmp_path):
    logits, labels = miscalibrated(1600, 6, seed=4)
    names = [f"c{i}" for i in range(6)]
    fit = write_group(tmp_path / "fit.npz", logits[:900], labels[:900], names, 1)
    test = write_group(tmp_path / "test.npz", logits[900:], labels[900:], names, 2)
    new_logits, new_labels = miscalibrated(500, 4, seed=9)
    new = write_group(tmp_path / "new.npz", new_logits, new_labels, ["n0", "n1", "n2", "n3"], 3)
    return fit, test, new


@pytest.mark.parametrize("method", registry.names("calibrator"))
def test_every_calibrator_end_to_end(method, files, capsys):
    fit, test, _ = files
    assert main(["calibrate", "--method", method, "--fit", str(fit), "--apply", str(test)]) == 0
    report = json.loads(capsys.readouterr().out)
    loaded_fit, loaded = load_predictions(fit), load_predictions(test)
    calibrator = registry.get("calibrator", method)()
    context = {}
    if calibrator.uses_text_features:
        context = {
            "text_features": loaded_fit.text_features,
            "zeroshot_text_features": loaded_fit.zeroshot_text_features,
        }
    calibrator.fit(loaded_fit.scores.double(), loaded_fit.labels, **context)
    if calibrator.uses_text_features:
        context = {
            "text_features": loaded.text_features,
            "zeroshot_text_features": loaded.zeroshot_text_features,
        }
    after = calibrator.transform(loaded.scores.double(), **context)
    assert report["after"]["metrics"]["ece"] == pytest.approx(float(ece(after, loaded.labels)), abs=1e-9)
    before = float(ece(loaded.scores.double().softmax(1), loaded.labels))
    assert report["before"]["metrics"]["ece"] == pytest.approx(before, abs=1e-6)
    assert report["after"]["metrics"]["ece"] < before / 2
    assert {"aurc", "augrc", "piece", "smooth_ece"} <= set(report["after"]["metrics"])


def test_run_folder_and_transfer_to_new_classes(files, tmp_path, capsys):
    fit, _, new = files
    output = tmp_path / "dac"
    argv = ["calibrate", "--method", "dac", "--fit", str(fit), "--apply", str(new), "--option", "k=2"]
    assert main([*argv, "--output", str(output)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert json.loads((output / "results.json").read_text()) == printed
    assert json.loads((output / "run.json").read_text())["kind"] == "calibrate"
    assert printed["options"] == {"k": 2} and "k=2" in printed["calibrator"]
    for name in ("reliability_before.png", "reliability_after.png", "risk_coverage_after.png"):
        assert (output / name).stat().st_size > 0
    state = torch.load(output / "calibrator.pt", weights_only=True)
    assert state["num_classes"] == 6 and state["base_text_features"].shape == (6, 8)
    # the calibrated predictions, re-measured by fastcal metrics, give the "after" report
    assert main(["metrics", str(output / "predictions" / "calibrated.npz"), "--bootstrap", "0"]) == 0
    remeasured = json.loads(capsys.readouterr().out)["metrics"]
    assert remeasured["ece"] == pytest.approx(printed["after"]["metrics"]["ece"], abs=1e-6)
    assert remeasured["piece"] == pytest.approx(printed["after"]["metrics"]["piece"], abs=1e-6)
    # a second run into the same folder needs --overwrite
    assert main([*argv, "--output", str(output)]) == 2
    assert "--overwrite replaces it" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["--method", "isotonic"],
            "--apply: expected predictions over the 6 classes (c0, c1, c2, ...) of --fit",
        ),
        (["--method", "platt"], "--method: expected one of ts, vector, matrix, histogram, isotonic, dac"),
        (["--method", "ts", "--option", "k=3"], "--option: expected options of ts: temperature, got k"),
        (["--method", "ts", "--option", "k"], "--option: expected KEY=VALUE"),
    ],
)
def test_errors_are_one_line(files, capsys, extra, message):
    fit, _, new = files
    assert main(["calibrate", "--fit", str(fit), "--apply", str(new), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_dac_without_text_features(files, tmp_path, capsys):
    fit, test, _ = files
    plain = tmp_path / "plain.npz"
    loaded = load_predictions(test)
    save_predictions(plain, loaded.scores, loaded.labels, loaded.classnames, logit_scale=100.0)
    assert main(["calibrate", "--method", "dac", "--fit", str(fit), "--apply", str(plain)]) == 2
    assert (
        "--apply: expected predictions with text_features and zeroshot_text_features"
        in capsys.readouterr().err
    )
