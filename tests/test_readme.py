"""The README's promises: its Python quick start runs as written, its commands exist, CI runs its test
command."""

import importlib.util
import math
import re
from pathlib import Path

import pytest
import torch

from fastcal.cli import COMMANDS
from fastcal.metrics import REPORT_KEYS, ece

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def section(title):
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start : end if end > 0 else None]


def python_blocks(text):
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


PYTHON_BLOCKS = python_blocks(section("Quick start in Python"))
OWN_CODE_BLOCKS = python_blocks(section("Use fastcal in your own code"))


def test_readme_has_the_quick_start_and_own_code_blocks():
    assert len(PYTHON_BLOCKS) == 3
    assert len(OWN_CODE_BLOCKS) == 6


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


@pytest.mark.skipif(
    any(importlib.util.find_spec(name) is None for name in ("open_clip", "torchvision", "lightning")),
    reason="the examples need open_clip, torchvision and lightning (not in the torch 2.13 check)",
)
def test_the_own_code_examples_run_in_order(testbed_cache, hf_tiny, tmp_path, monkeypatch, capsys):
    """Every block of "Use fastcal in your own code", in order, in one namespace; the Hugging Face
    model id is swapped for a tiny random-init CLIP saved in the same form (no network here)."""
    monkeypatch.chdir(tmp_path)
    hf_folder = tmp_path / "tiny-hf-clip"
    hf_tiny.save_clip_folder(hf_folder)
    namespace = {}
    for index, block in enumerate(OWN_CODE_BLOCKS):
        code = block.replace("hf:openai/clip-vit-base-patch32", f"hf:{hf_folder}")
        before = namespace["coop"].tuned_state_dict() if index else {}  # detached copies
        exec(compile(code, f"README.md own-code block {index}", "exec"), namespace)
        if index in (1, 2, 3):  # the loss in a plain loop, the HF Trainer, Lightning: each one trains
            after = namespace["coop"].tuned_state_dict()
            assert any(not torch.equal(before[k], after[k]) for k in after), f"block {index} trained nothing"

    coop, result = namespace["coop"], namespace["result"]
    assert coop.recipe["lr"] == 0.002 and coop.prompt_learner.n_ctx == 4
    assert not any(p.requires_grad for p in coop.clip_model.parameters())
    assert result.selected.shape == (1, 6) and result.ctx.shape == (1, 4, coop.prompt_learner.ctx_dim)
    assert result.logits.shape == (1, 10) and torch.isfinite(result.loss).all()
    assert namespace["logits"].shape == (1, 10)
    assert tuple(namespace["hf_coop"].class_features().shape) == (3, 24)
    assert not (tmp_path / "hf-run").exists() or not any((tmp_path / "hf-run").rglob("*.safetensors"))
