"""A command killed with SIGKILL in the middle of its run, then resumed with ``--resume``, ends with the
results of a run that was never interrupted (``fastcal tpt``'s kill test is in test_tpt.py)."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from fastcal.cli import main


def kill_once(argv, marker, env, deadline_s=300):
    """Start ``fastcal ARGV`` and SIGKILL it (and its process group) as soon as ``marker`` exists."""
    process = subprocess.Popen(
        [sys.executable, "-m", "fastcal", *argv],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + deadline_s
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, process.stderr.read().decode()[-2000:]
    assert marker.exists()


def same_reports(got, want):
    for key, value in want.items():
        if isinstance(value, dict):
            same_reports(got[key], value)
        elif isinstance(value, float):
            assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key
        else:
            assert got[key] == value, key


@pytest.mark.parametrize(
    ("command", "argv", "marker", "compared"),
    [
        (
            "train",
            ["--method", "coop", "--shots", "4", "--epochs", "6", "--batch_size", "4"],
            "checkpoint.pt",
            ("base", "new", "hm"),
        ),
        (
            "finetune",
            ["--method", "flyp", "--max-steps", "8", "--batch-size", "16", "--checkpoint-every", "2"],
            "checkpoint.safetensors",
            ("id", "ood"),
        ),
    ],
)
def test_killed_then_resumed_equals_uninterrupted(testbed_cache, tmp_path, command, argv, marker, compared):
    env = {**os.environ, "FASTCAL_CACHE": str(testbed_cache)}
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    kill_once([command, *argv, "--output", str(killed), "--quiet"], killed / marker, env)
    assert not (killed / "results.json").exists()  # killed before the end
    assert main([command, *argv, "--output", str(killed), "--quiet", "--resume"]) == 0
    assert main([command, *argv, "--output", str(whole), "--quiet"]) == 0
    got = json.loads((killed / "results.json").read_text())
    want = json.loads((whole / "results.json").read_text())
    same_reports({k: got[k] for k in compared}, {k: want[k] for k in compared})
    for group in os.listdir(whole / "predictions"):
        got, want = np.load(killed / "predictions" / group), np.load(whole / "predictions" / group)
        assert sorted(got.files) == sorted(want.files)
        for key in want.files:
            np.testing.assert_array_equal(got[key], want[key])
