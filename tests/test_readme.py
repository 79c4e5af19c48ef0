"""The README's promises: its Python quick start runs as written, its commands exist, CI runs its test
command."""

import math
import re
from pathlib import Path

import pytest
import torch

from fastcal.cli import COMMANDS
from fastcal.metrics import REPORT_KEYS, ece

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)


def test_readme_has_the_three_quick_start_blocks():
    assert len(PYTHON_BLOCKS) == 3


def _run_block(index):
    namespace = {}
    exec(compile(PYTHON_BLOCKS[index], f"README.md python block {index}", "exec"), namespace)
    return namespace


def test_metrics_quick_start_runs_and_the_meter_equals_the_one_shot_value(capsys):
    ns = _run_block(0)
    report = ns["report"]
    assert set(REPORT_KEYS) <= set(report)
    assert report["count"] == 1000
    assert report["ece"] == pytest.approx(float(ece(ns["probs"], ns["labels"])), abs=1e-6)
    assert len(capsys.readouterr().out.strip().splitlines()) == 4


def test_temperature_quick_start_runs(capsys):
    ns = _run_block(1)
    temperature = ns["scaler"].temperature
    assert temperature == pytest.approx(ns["fit_temperature"](ns["val_logits"], ns["val_labels"]), rel=1e-9)
    assert temperature > 1.0  # random labels: the fit must soften confident logits
    torch.testing.assert_close(ns["scaled"].sum(-1), torch.ones(20))
    ns["figure"].clf()


def test_losses_quick_start_runs_and_reaches_the_text_features(capsys):
    ns = _run_block(2)
    assert math.isfinite(float(ns["loss"].detach()))
    assert set(ns["parts"]) == {"ce", "margin", "moment"}
    assert ns["text_features"].grad.abs().sum() > 0


def test_every_command_in_the_readme_exists():
    named = set(re.findall(r"`fastcal ([a-z]+)", README))
    assert named and named <= set(COMMANDS)
    assert set(COMMANDS) <= named  # and every command is documented


def test_ci_runs_the_readme_test_command():
    test_command = "./setup.sh && .venv/bin/pytest"
    assert test_command in README and "./setup.sh && .venv/bin/fastcal demo" in README
    assert f"{test_command} </dev/null" in (ROOT / ".ci" / "run").read_text()
