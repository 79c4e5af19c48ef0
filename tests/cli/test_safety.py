"""The commands against hostile run folders and a second writer: nothing runs from a file, nothing is
lost, and each refusal is one line with exit status 2."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastcal.cli import main

QUICK_TRAIN = ["train", "--method", "coop", "--epochs=1", "--shots", "2", "--batch_size", "4", "--quiet"]


class WritesAMarker:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def one_error_line(capsys, *needles):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.fixture
def finished_run(testbed_cache, tmp_path):
    run = tmp_path / "run"
    assert main([*QUICK_TRAIN, "--output", str(run)]) == 0
    return run


def test_a_finished_run_records_what_ran_and_is_neither_replaced_unasked_nor_resumed_from_nothing(
    finished_run, tmp_path, capsys
):
    results = json.loads((finished_run / "results.json").read_text())
    assert results["config"]["model"] == "fastcal-testbed" and results["config"]["pretrained"] is None
    manifest = json.loads((finished_run / "run.json").read_text())
    assert manifest["kind"] == "train" and manifest["config"]["method"] == "coop"
    before = (finished_run / "results.json").read_bytes()

    assert main([*QUICK_TRAIN, "--output", str(finished_run)]) == 2
    one_error_line(capsys, "--output: expected a new or empty folder", "holds a train run")
    assert (finished_run / "results.json").read_bytes() == before

    assert main([*QUICK_TRAIN, "--output", str(tmp_path / "nothing_here"), "--resume"]) == 2
    one_error_line(capsys, "--resume: expected a folder holding a run to continue")
    assert not (tmp_path / "nothing_here").exists()

    assert main([*QUICK_TRAIN, "--output", str(finished_run), "--overwrite"]) == 0
    assert json.loads((finished_run / "results.json").read_text())["base"] == results["base"]  # deterministic


def test_hostile_and_damaged_run_files_are_refused_without_running_code(finished_run, tmp_path, capsys):
    marker = tmp_path / "ran"
    torch.save({"format": 1, "payload": WritesAMarker(marker)}, finished_run / "prompt.pt")
    assert main(["eval", "--run", str(finished_run), "--quiet"]) == 2
    one_error_line(capsys, "--run: expected plain tensors", "refused")

    checkpoint = finished_run / "checkpoint.pt"
    good = checkpoint.read_bytes()
    torch.save({"epochs_done": 1, "rng": WritesAMarker(marker)}, checkpoint)
    assert main([*QUICK_TRAIN, "--output", str(finished_run), "--resume"]) == 2
    one_error_line(capsys, "checkpoint: expected plain tensors", "refused")
    assert not marker.exists()

    checkpoint.write_bytes(good[: len(good) // 2])
    assert main([*QUICK_TRAIN, "--output", str(finished_run), "--resume"]) == 2
    one_error_line(
        capsys, "checkpoint: expected a complete torch file", "corrupt or truncated", "--overwrite"
    )


def test_resuming_with_a_checkpoint_restores_every_generator(finished_run, capsys):
    """The checkpoint (loaded with weights_only) still resumes exactly: the numpy generator state
    travels as a tensor."""
    state = torch.load(finished_run / "checkpoint.pt", weights_only=True)
    kind, keys = state["rng"]["numpy"][:2]
    assert kind == "MT19937" and keys.dtype == torch.int64 and keys.shape == (624,)
    assert main([*QUICK_TRAIN, "--output", str(finished_run), "--resume"]) == 0


TPT = [sys.executable, "-m", "fastcal", "tpt", "--model", "testbed", "--pretrained", "none", "--views", "16"]


def test_two_processes_writing_one_tpt_folder(tmp_path, cache_dir):
    """One run wins; the other is refused in one line (the lock, or the finished run it finds), and no
    record is written twice."""
    output = tmp_path / "tpt"
    argv = [*TPT, "--limit", "6", "--quiet", "--output", str(output)]
    env = {**os.environ, "FASTCAL_CACHE": str(cache_dir)}
    first = subprocess.Popen(argv, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    second = subprocess.Popen(argv, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    outcomes = sorted(
        (process.wait(timeout=600), process.stderr.read().strip()) for process in (first, second)
    )
    (ok, _), (refused, message) = outcomes
    assert (ok, refused) == (0, 2), outcomes
    assert len(message.splitlines()) == 1 and ("locked by pid" in message or "holds a tpt run" in message)
    indices = [json.loads(line)["index"] for line in (output / "records.jsonl").read_text().splitlines()]
    assert sorted(indices) == list(range(6))


def test_a_corrupt_image_is_named(testbed_cache, tmp_path, capsys):
    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    broken = root / "dog" / "3.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n then nothing")
    argv = ["zeroshot", "--dataset", "imagefolder", "--root", str(root), "--output", str(tmp_path / "o")]
    assert main([*argv, "--quiet"]) == 2
    one_error_line(capsys, "image: expected a readable image file", str(Path(broken)))
