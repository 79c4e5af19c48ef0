"""``fastcal finetune`` end to end with tiny schedules: the testbed (its pretrained CLIP from the
session's cache) and an image-folder dataset with a tiny random-init ``local-dir:`` open_clip model. FT and
FLYP also run end to end in tests/cli/test_wise.py; here CaRot by default, all three with -m slow."""

import json

import numpy as np
import pytest
from PIL import Image

from fastcal._io import read_jsonl
from fastcal.cli import main

ENTRY_KEYS = {"accuracy", "ece", "mce", "l2", "brier", "nll", "confidence", "count", "n_bins", "temperature"}
TINY_CONFIG = {
    "model_cfg": {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 20, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
    },
    "preprocess_cfg": {},
}


def _check_entry(entry):
    assert set(entry) >= ENTRY_KEYS
    assert entry["n_bins"] == 10
    assert ENTRY_KEYS - {"temperature"} <= set(entry["temperature_scaled"])
    assert 0.0 <= entry["accuracy"] <= 1.0 and 0.0 <= entry["ece"] <= 1.0


@pytest.mark.parametrize(
    "method",
    [pytest.param("ft", marks=pytest.mark.slow), pytest.param("flyp", marks=pytest.mark.slow), "carot"],
)
def test_finetune_on_the_testbed(testbed_cache, tmp_path, capsys, method):
    out = tmp_path / method
    args = ["finetune", "--method", method, "--output", str(out)]
    args += ["--max-steps", "2", "--batch-size", "16", "--quiet", "--log-every", "1"]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"id", "ood", "config"}
    _check_entry(results["id"])
    assert set(results["ood"]) == {"digits_shifted", "mean"}
    _check_entry(results["ood"]["digits_shifted"])
    assert results["id"]["count"] == 361 and results["ood"]["mean"]["count"] == 361
    config = results["config"]
    assert config["method"] == method and config["total_steps"] == 2
    assert config["finetune"]["batch_size"] == 16 and config["data"] == {"dataset": "testbed"}
    assert config["model"] == "fastcal-testbed" and config["pretrained"] is None
    files = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "checkpoint.safetensors", "train_log.jsonl", "reliability"} <= files
    assert ("head.safetensors" in files) == (method == "ft")
    assert len(list((out / "reliability").glob("*.png"))) == 4
    log = read_jsonl(out / "train_log.jsonl")
    assert [r["step"] for r in log] == [1, 2]
    if method == "carot":
        assert "distillation" in log[0]
    printed = capsys.readouterr().out
    assert method.upper() in printed and "results.json" in printed

    # an existing run needs --resume; resuming a finished run re-evaluates it to the same numbers
    assert main(args) == 2
    assert "--resume" in capsys.readouterr().err
    assert main([*args, "--resume", "--no-diagrams"]) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["id"] == results["id"] and again["ood"] == results["ood"]
    assert len(read_jsonl(out / "train_log.jsonl")) == 2


def test_finetune_usage_errors(cache_dir, tmp_path, capsys):
    assert main(["finetune", "--method", "flyp", "--dataset", "imagenet", "--output", str(tmp_path)]) == 2
    assert "--root" in capsys.readouterr().err
    assert main(["finetune", "--method", "flyp", "--root", str(tmp_path), "--output", str(tmp_path)]) == 2
    assert "--dataset" in capsys.readouterr().err
    bad = ["finetune", "--method", "flyp", "--pretrained", "none", "--output", str(tmp_path), "--lr", "-1"]
    assert main(bad) == 2
    assert "--lr: expected a number > 0" in capsys.readouterr().err


def _image_folder(root):
    rng = np.random.default_rng(0)
    for split, count in (("train", 8), ("test", 3)):
        for name in ("cat", "dog"):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def test_finetune_on_an_image_folder_with_a_local_model(cache_dir, tmp_path):
    data, model_dir, out = tmp_path / "data", tmp_path / "tiny", tmp_path / "out"
    _image_folder(data)
    model_dir.mkdir()
    (model_dir / "open_clip_config.json").write_text(json.dumps(TINY_CONFIG))
    args = ["finetune", "--method", "carot", "--dataset", "imagefolder", "--root", str(data)]
    args += ["--model", f"local-dir:{model_dir}", "--pretrained", "none", "--output", str(out)]
    args += ["--ood", "imagefolder", "--heldout", "4", "--max-steps", "2", "--batch-size", "4"]
    args += ["--workers", "0", "--quiet", "--no-diagrams", "--label-smoothing", "0.1"]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["id"]["count"] == 6
    assert set(results["ood"]) == {"imagefolder", "mean"}
    config = results["config"]
    assert config["train_images"] == 12 and config["data"]["heldout"] == 4
    assert config["data"]["ood"] == ["imagefolder"]
    assert config["finetune"]["learning_rate"] == 1e-5  # the published recipe is the default with --dataset
    assert config["finetune"]["label_smoothing"] == 0.1
    assert not (out / "reliability").exists()
