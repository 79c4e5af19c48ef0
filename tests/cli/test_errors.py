"""Every command, fed bad arguments and hostile files: exit status 2, one line on stderr that names the
argument, no traceback, and nothing written (no output folder, no cache) where nothing should be."""

import json
import os
import re

import numpy as np
import pytest
import torch

from fastcal.cli import main


class WritesAMarker:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def files(tmp_path):
    """The inputs the cases refer to by name, in a fresh working folder."""
    root = tmp_path / "work"
    root.mkdir()
    made = {"dir": root / "a_folder"}
    made["dir"].mkdir()
    made["file"] = root / "a_file.txt"
    made["file"].write_text("not a folder")
    logits, labels = torch.randn(40, 4, dtype=torch.float64), torch.randint(0, 4, (40,))
    made["good.npz"] = root / "good.npz"
    np.savez(made["good.npz"], logits=logits.numpy(), labels=labels.numpy())
    made["empty.npz"] = root / "empty.npz"
    np.savez(made["empty.npz"])
    made["empty.pt"] = root / "empty.pt"
    torch.save({}, made["empty.pt"])
    made["zero_bytes.pt"] = root / "zero_bytes.pt"
    made["zero_bytes.pt"].write_bytes(b"")
    made["strings.pt"] = root / "strings.pt"
    torch.save({"logits": "high", "labels": ["a", "b"]}, made["strings.pt"])
    made["garbage.pt"] = root / "garbage.pt"
    made["garbage.pt"].write_bytes(b"\x80\x04garbage" * 50)
    made["hostile.pt"] = root / "hostile.pt"
    torch.save({"logits": torch.randn(3, 2), "labels": WritesAMarker(root / "ran")}, made["hostile.pt"])
    made["one_class.npz"] = root / "one_class.npz"
    np.savez(made["one_class.npz"], logits=np.zeros((5, 1)), labels=np.zeros(5, dtype=np.int64))
    made["bad.yaml"] = root / "bad.yaml"
    made["bad.yaml"].write_text("lr: [0.1, 0.2\nepochs: {")
    # a finished prompt-tuning run (only what the commands look at)
    made["train_run"] = root / "train_run"
    made["train_run"].mkdir()
    (made["train_run"] / "run.json").write_text(json.dumps({"kind": "train"}))
    (made["train_run"] / "results.json").write_text("{}")
    made["truncated_run"] = root / "truncated_run"
    made["truncated_run"].mkdir()
    (made["truncated_run"] / "run.json").write_text(json.dumps({"kind": "train"}))
    torch.save({"format": 1, "tuned": {"ctx": torch.randn(4, 8)}}, made["truncated_run"] / "prompt.pt")
    data = (made["truncated_run"] / "prompt.pt").read_bytes()
    (made["truncated_run"] / "prompt.pt").write_bytes(data[: len(data) // 3])
    made["empty_dir"] = root / "empty_run"
    made["empty_dir"].mkdir()
    return root, made


def snapshot(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


O = "{out}"  # a fresh output path inside the working folder
CASES = [
    # metrics: hostile and damaged prediction files, unwritable outputs, unbounded bins
    ("metrics", ["{empty.npz}"], "PRED_FILE: expected keys"),
    ("metrics", ["{empty.pt}"], "PRED_FILE: expected keys"),
    ("metrics", ["{zero_bytes.pt}"], "PRED_FILE: expected a complete torch file"),
    ("metrics", ["{strings.pt}"], "PRED_FILE['logits']: expected a numeric array"),
    ("metrics", ["{garbage.pt}"], "PRED_FILE: expected"),
    ("metrics", ["{hostile.pt}"], "PRED_FILE: expected plain tensors"),
    ("metrics", ["{one_class.npz}"], "at least 2 classes"),
    ("metrics", ["{good.npz}", "--temperature-from", "{garbage.pt}"], "--temperature-from: expected"),
    ("metrics", ["{good.npz}", "--temperature-from", "{empty.npz}"], "--temperature-from: expected keys"),
    ("metrics", ["{good.npz}", "--output", "{dir}"], "--output: expected a file path, got the folder"),
    ("metrics", ["{good.npz}", "--plot", "{file}/x.png"], "--plot: expected a file path"),
    ("metrics", ["{good.npz}", "--n-bins", "1000000000"], "--n-bins: expected an integer <= 1000000"),
    ("metrics", ["{good.npz}", "--level", "2"], "--level"),
    ("metrics", ["{good.npz}", "--n-bins", "ten"], "--n-bins: invalid int value"),
    # train
    ("train", ["--output", "{file}"], "--output: expected a folder, got the file"),
    ("train", ["--output", O, "--config", "{bad.yaml}"], "config: expected a YAML mapping"),
    ("train", ["--output", O, "--device", "tpu"], "device: expected auto, cpu, cuda or cuda:N"),
    ("train", ["--output", O, "--device", "cuda"], "device: expected cpu or auto"),
    ("train", ["--output", O, "--dataset", "nosuch", "--root", "{dir}"], "dataset: expected one of"),
    ("train", ["--output", O, "--precision", "fp17"], "precision: expected one of"),
    ("train", ["--output", O, "--model", "ViT-B-16"], "model: expected none with the embedded testbed"),
    ("train", ["--output", O, "--dataset", "dtd", "--root", "{dir}", "--model", "nosuch"], "model: expected"),
    ("train", ["--output", "{empty_dir}", "--resume"], "--resume: expected a folder holding a run"),
    ("train", ["--output", "{train_run}"], "--output: expected a new or empty folder"),
    ("train", ["--output", O, "--n_bins", "0"], "--n-bins: expected an integer >= 1"),
    ("train", ["--output", O, "--epochs", "1.5"], "epochs: expected an integer"),
    ("train", ["--output", O, "--nosuch", "1"], "unrecognized arguments: --nosuch"),
    # tpt
    ("tpt", ["--output", "{file}"], "--output: expected a folder, got the file"),
    ("tpt", ["--output", O, "--device", "tpu"], "--device: expected auto, cpu, cuda or cuda:N"),
    ("tpt", ["--output", O, "--dataset", "nosuch", "--root", "{dir}"], "--dataset: expected one of"),
    ("tpt", ["--output", "{empty_dir}", "--resume"], "--resume: expected a folder holding a run"),
    ("tpt", ["--output", "{train_run}"], "--output: expected a new or empty folder"),
    ("tpt", ["--output", O, "--limit", "0"], "--limit: expected an integer >= 1"),
    ("tpt", ["--output", O, "--model", "nosuch"], "--model: expected an open_clip architecture"),
    ("tpt", ["--output", O, "--views", "5"], "selection"),
    ("tpt", ["--output", O, "--lambda", "5"], "--lambda: expected a weight only for ctpt, got 5.0 with tpt"),
    ("tpt", ["--output", O, "--root", "{dir}"], "--root: expected none without --dataset"),
    # finetune
    ("finetune", ["--method", "ft", "--output", "{file}"], "--output: expected a folder, got the file"),
    ("finetune", ["--method", "ft", "--output", O, "--device", "tpu"], "--device: expected auto"),
    ("finetune", ["--method", "ft", "--output", O, "--dataset", "nosuch", "--root", "{dir}"], "--dataset"),
    ("finetune", ["--method", "ft", "--output", "{empty_dir}", "--resume"], "--resume: expected a folder"),
    ("finetune", ["--method", "ft", "--output", "{train_run}"], "--output: expected a new or empty folder"),
    ("finetune", ["--method", "ft", "--output", O, "--model", "nosuch"], "--model: expected"),
    ("finetune", ["--method", "ft", "--output", O, "--lr", "-1"], "--lr: expected a number > 0"),
    ("finetune", ["--method", "nosuch", "--output", O], "--method: expected one of ft, flyp, carot"),
    # eval
    ("eval", ["--run", "{file}"], "--run: expected a complete torch file"),
    ("eval", ["--run", "{dir}/missing"], "--run: expected a fastcal train run folder"),
    ("eval", ["--run", "{truncated_run}"], "--run: expected a complete torch file"),
    ("eval", ["--run", "{empty_dir}"], "--run: expected a saved prompt file"),
    ("eval", ["--run", "{train_run}", "--n-bins", "0"], "--n-bins: expected an integer >= 1"),
    ("eval", ["--run", "{train_run}", "--device", "tpu"], "--device: expected auto"),
    # wise
    ("wise", ["--finetuned", "{train_run}"], "--finetuned: expected a finished fastcal finetune run folder"),
    ("wise", ["--finetuned", "{empty_dir}"], "--finetuned: expected a finished fastcal finetune run folder"),
    ("wise", ["--finetuned", "{train_run}", "--select", "2"], "--select: expected a number <= 1.0"),
    ("wise", ["--finetuned", "{train_run}", "--device", "tpu"], "--device: expected auto"),
    ("wise", ["--finetuned", "{train_run}", "--output", "{file}"], "--output: expected a folder"),
    ("wise", ["--finetuned", "{train_run}", "--alpha", "0:x"], "alpha"),
    # zeroshot
    ("zeroshot", ["--output", "{file}"], "--output: expected a folder, got the file"),
    ("zeroshot", ["--output", O, "--device", "tpu"], "--device: expected auto"),
    ("zeroshot", ["--output", O, "--dataset", "nosuch", "--root", "{dir}"], "--dataset: expected one of"),
    ("zeroshot", ["--output", O, "--n-bins", "0"], "--n-bins: expected an integer >= 1"),
    ("zeroshot", ["--output", O, "--model", "nosuch", "--pretrained", "x"], "--model: expected"),
    ("zeroshot", ["--output", "{train_run}"], "--output: expected a new or empty folder"),
    # demo
    ("demo", ["--output", "{file}"], "--output: expected a folder, got the file"),
    ("demo", ["--output", O, "--only", "nosuch"], "--only: expected stage names"),
    ("demo", ["--output", "{train_run}"], "--output: expected a new or empty folder"),
]


def exit_status(argv):
    """``main``'s return value, or the status argparse exits with."""
    try:
        return main(argv)
    except SystemExit as stop:
        return stop.code


@pytest.mark.parametrize(
    ("command", "argv", "names"), CASES, ids=[f"{case[0]}-{i}" for i, case in enumerate(CASES)]
)
def test_bad_arguments_exit_2_with_one_line_and_write_nothing(
    files, cache_dir, monkeypatch, capsys, command, argv, names
):
    root, made = files
    monkeypatch.chdir(root)
    values = {**{key: str(path) for key, path in made.items()}, "out": str(root / "out")}
    argv = [re.sub(r"\{([^}]+)\}", lambda m: values[m.group(1)], arg) for arg in argv]
    before = snapshot(root)
    status = exit_status([command, *argv])
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and names in lines[0], captured.err
    assert "Traceback" not in captured.err and captured.out == ""
    assert snapshot(root) == before  # nothing written: no output folder, no lock, no report
    assert not cache_dir.exists()  # nothing loaded into the cache either
    assert not (root / "ran").exists()  # no code from a file ran


def test_debug_shows_the_traceback(files, monkeypatch, capsys):
    _, made = files
    with pytest.raises(ValueError, match="--n-bins"):
        main(["metrics", str(made["good.npz"]), "--n-bins", "0", "--debug"])
    monkeypatch.setenv("FASTCAL_DEBUG", "1")
    with pytest.raises(ValueError, match="--n-bins"):
        main(["metrics", str(made["good.npz"]), "--n-bins", "0"])
    monkeypatch.delenv("FASTCAL_DEBUG")
    assert main(["metrics", str(made["good.npz"]), "--n-bins", "0"]) == 2
    assert os.path.exists(made["good.npz"])
