"""``fastcal zeroshot`` on real layouts (an image folder, a CoOp split-file tree) with random-init open_clip
checkpoints the tests write, and on the testbed."""

import copy
import json

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from fastcal.cli import main
from fastcal.data.testbed import digits_splits
from fastcal.models.testbed import build_testbed_model
from fastcal.runs.zeroshot import zeroshot_report

TINY_NAME = "fastcal-zeroshot-test-tiny"
TINY_CFG = {
    "embed_dim": 24,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def write_image(path, seed, size=(20, 14)):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


@pytest.fixture
def image_folder(tmp_path):
    """root/{train,val,test}/<class>/*.png: 5 classes (base: the first 3), 3 / 2 / 3 images each."""
    root = tmp_path / "folder"
    seed = 0
    for split, n in (("train", 3), ("val", 2), ("test", 3)):
        for c in ("ant", "bee", "cat", "dog", "elk"):
            for i in range(n):
                seed += 1
                write_image(root / split / c / f"{i}.png", seed)
    return root


@pytest.fixture
def dtd_tree(tmp_path):
    """CoOp's DTD layout: dtd/images/<class>/*.jpg and split_zhou_DescribableTextures.json."""
    root = tmp_path / "data"
    split = {"train": [], "val": [], "test": []}
    seed = 100
    for label, name in enumerate(["banded", "bumpy", "cracked", "dotted"]):
        for part, n in (("train", 2), ("val", 2), ("test", 4)):
            for i in range(n):
                seed += 1
                relative = f"{name}/{name}_{part}_{i}.jpg"
                write_image(root / "dtd" / "images" / relative, seed)
                split[part].append([relative, label, name])
    (root / "dtd" / "split_zhou_DescribableTextures.json").write_text(json.dumps(split))
    return root


def test_testbed_architecture_checkpoint_on_an_image_folder(image_folder, tmp_path, cache_dir, capsys):
    checkpoint = tmp_path / "random.pt"
    torch.save(build_testbed_model().state_dict(), checkpoint)
    output = tmp_path / "out"
    argv = ["zeroshot", "--model", "fastcal-testbed", "--pretrained", str(checkpoint)]
    argv += ["--dataset", "imagefolder", "--root", str(image_folder), "--output", str(output)]
    assert main([*argv, "--calibration-size", "4", "--n-bins", "10", "--quiet"]) == 0
    printed = capsys.readouterr().out

    results = json.loads((output / "results.json").read_text())
    assert results["dataset"] == "imagefolder" and results["classes"] == 5 and results["test_images"] == 15
    rows = results["rows"]
    assert [r["method"] for r in rows] == ["CLIP zero-shot, hard prompt", "CLIP zero-shot, hard prompt + TS"]
    for row in rows:
        counts = {g: r["count"] for g, r in row["metrics"].items()}
        assert counts == {"all": 15, "base": 9, "new": 6}
        assert all(r["n_bins"] == 10 for r in row["metrics"].values())
        assert all((output / name).is_file() for name in row["notes"]["figures"].values())
    assert rows[1]["notes"]["calibration_size"] == 4 and rows[1]["notes"]["calibration_split"] == "val"
    assert "all acc" in printed and "new ECE" in printed and "HM" in printed


def test_open_clip_architecture_checkpoint_on_a_coop_tree(monkeypatch, dtd_tree, tmp_path, cache_dir):
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, TINY_NAME, copy.deepcopy(TINY_CFG))
    model = open_clip.create_model(TINY_NAME)
    checkpoint = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(checkpoint))
    output = tmp_path / "out"
    argv = ["zeroshot", "--model", TINY_NAME, "--pretrained", str(checkpoint), "--dataset", "dtd"]
    argv += ["--root", str(dtd_tree), "--templates", "ensemble", "--output", str(output), "--quiet"]
    assert main(argv) == 0
    rows = json.loads((output / "results.json").read_text())["rows"]
    assert rows[0]["notes"]["templates"] == ["{} texture."]
    assert {g: r["count"] for g, r in rows[0]["metrics"].items()} == {"all": 16, "base": 8, "new": 8}
    assert rows[1]["notes"]["calibration_size"] == 4  # the base classes' val images, fewer than 50


def test_testbed_by_default_matches_the_method(testbed_cache, testbed_clip, tmp_path, capsys):
    output = tmp_path / "out"
    assert main(["zeroshot", "--output", str(output), "--quiet"]) == 0
    rows = json.loads((output / "results.json").read_text())["rows"]
    expected = zeroshot_report(testbed_clip, digits_splits(), modes=("hard",), progress=False)
    for row, reference in zip(rows, expected, strict=True):
        for group in ("base", "new"):
            assert row["metrics"][group] == pytest.approx(reference["metrics"][group])
    assert rows[0]["metrics"]["all"]["count"] == 720


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "ViT-B-32", "--dataset", "imagefolder", "--root", "."], "--pretrained: expected"),
        (["--dataset", "imagefolder"], "--root: expected the folder"),
        (["--dataset", "no_such_set", "--root", "."], "--dataset: expected one of"),
        (["--dataset", "dtd", "--root", "/no/such/folder"], "root: expected an existing folder"),
        (["--calibration-size", "0"], "--calibration-size: expected an integer >= 1"),
    ],
)
def test_usage_errors_exit_2(argv, message, capsys, cache_dir):
    assert main(["zeroshot", "--quiet", *argv]) == 2
    assert message in capsys.readouterr().err
