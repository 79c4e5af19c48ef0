"""Run folders: the lock (against a second process), the resume / overwrite rules, stale temporaries."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from fastcal._io import atomic_path
from fastcal.runs.folder import LOCK, MANIFEST, RunFolder, run_kind

HOLDER = """
import sys, time
from fastcal.runs.folder import RunFolder
folder = RunFolder.open(sys.argv[1], kind="train")
print("held", flush=True)
time.sleep(60)
"""


def hold_in_another_process(path):
    process = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    return process


def test_a_second_writer_is_refused_naming_the_holder_and_the_lock_dies_with_it(tmp_path):
    output = tmp_path / "run"
    holder = hold_in_another_process(output)
    try:
        with pytest.raises(ValueError, match=rf"--output: .*locked by pid {holder.pid} on "):
            RunFolder.open(output, kind="train")
    finally:
        holder.kill()
        holder.wait()
    # killed without releasing anything: the operating system dropped the lock
    with RunFolder.open(output, kind="train") as folder:
        assert (folder.path / LOCK).read_text().startswith(f"pid {os.getpid()} ")


def test_a_run_is_neither_resumed_from_nothing_nor_replaced_unasked(tmp_path):
    output = tmp_path / "run"
    with pytest.raises(ValueError, match="--resume: expected a folder holding a run to continue"):
        RunFolder.open(output, kind="train", resume=True)
    assert not output.exists()  # nothing written for a refused call

    with RunFolder.open(output, kind="train") as folder:
        folder.write_manifest({"config": {"lr": 0.1}})
        (output / "results.json").write_text("{}")
    assert run_kind(output) == "train"
    with pytest.raises(ValueError, match=r"--output: expected a new or empty folder .* holds a train run"):
        RunFolder.open(output, kind="train")
    with pytest.raises(ValueError, match="--resume: expected a folder holding a tpt run"):
        RunFolder.open(output, kind="tpt", resume=True)
    with RunFolder.open(output, kind="train", resume=True) as folder:
        manifest = folder.manifest()
        assert manifest["kind"] == "train" and manifest["config"] == {"lr": 0.1}
        assert {"fastcal", "torch", "open_clip_torch", "numpy", "python"} <= set(manifest["versions"])
    with pytest.raises(ValueError, match="either --resume or --overwrite"):
        RunFolder.open(output, kind="train", resume=True, overwrite=True)

    with RunFolder.open(output, kind="tpt", overwrite=True):
        assert sorted(p.name for p in output.iterdir()) == [LOCK]  # the train run's files are gone


def test_other_files_are_not_a_run_and_an_earlier_run_loses_only_its_own_files(tmp_path):
    output = tmp_path / "notes"
    output.mkdir()
    (output / "mine.txt").write_text("keep")
    with RunFolder.open(output, kind="zeroshot"):
        pass
    (output / "results.json").write_text("{}")  # a run of a fastcal without manifests
    (output / "reliability_base.png").write_bytes(b"png")
    assert run_kind(output) == "earlier"
    with pytest.raises(ValueError, match="written by an earlier fastcal"):
        RunFolder.open(output, kind="train")
    with RunFolder.open(output, kind="train", overwrite=True):
        assert sorted(p.name for p in output.iterdir()) == [LOCK, "mine.txt"]


def test_paths_that_cannot_be_run_folders_are_refused_before_anything_is_written(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ValueError, match="--output: expected a folder, got the file"):
        RunFolder.open(a_file, kind="train")
    with pytest.raises(ValueError, match="below the file"):
        RunFolder.open(a_file / "run", kind="train")


def test_the_demo_replaces_its_own_results_but_no_other_run(tmp_path):
    output = tmp_path / "results"
    with RunFolder.open(output, kind="demo", replace_own=True) as folder:
        folder.write_manifest({})
        (output / "old.png").write_bytes(b"png")
    with RunFolder.open(output, kind="demo", replace_own=True):
        assert not (output / "old.png").exists()
    (output / MANIFEST).write_text(json.dumps({"kind": "train"}))
    with pytest.raises(ValueError, match="holds a train run"):
        RunFolder.open(output, kind="demo", replace_own=True)


def test_temporaries_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    output = tmp_path / "run"
    output.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    dead_pid = int(dead.stdout)
    host = socket.gethostname().replace(".", "_")
    stale = output / f".state.bin.{host}-{dead_pid}.abc123.tmp"
    live = output / f".state.bin.{host}-{os.getpid()}.def456.tmp"
    old_unknown = output / ".summary.json.xyz.tmp"  # no writer recorded, two days old
    for path in (stale, live, old_unknown):
        path.write_bytes(b"partial")
    two_days_ago = time.time() - 2 * 86400
    os.utime(old_unknown, (two_days_ago, two_days_ago))
    with atomic_path(output / "state.bin") as tmp:  # a write cleans its own target's leftovers
        tmp.write_bytes(b"whole")
    assert not stale.exists() and live.exists() and old_unknown.exists()
    assert (output / "state.bin").read_bytes() == b"whole"
    with RunFolder.open(output, kind="train"):  # the lock holder removes every dead writer's leftovers
        assert not old_unknown.exists() and live.exists()
