"""The runner: records, reports from records, resume, refusal of foreign folders, baselines, sharding
and a SIGKILL in the middle of a two-process (gloo) run."""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fastcal._io import read_jsonl
from fastcal.metrics import calibration_report
from fastcal.models.clip import LoadedClip
from fastcal.tpt import runner
from fastcal.tpt.ctpt import ctpt_config
from fastcal.tpt.runner import RunConfig, records_from_probs, report_from_records, run, subset_task
from fastcal.tpt.step import TuningConfig

ROOT = Path(__file__).resolve().parents[2]
N_VIEWS = 16


@pytest.fixture
def clip(tiny_clip):
    model, tokenizer = tiny_clip
    return LoadedClip(model, tokenizer, None, None)


@pytest.fixture(scope="module")
def task():
    return runner.testbed_task(limit=6, seed=0)


def tpt_config(**changes):
    return replace(RunConfig(tuning=TuningConfig(n_views=N_VIEWS), flip=False), **changes)


@pytest.mark.parametrize("n_bins", [15, 20])
def test_report_from_records_equals_the_report_of_the_probabilities(n_bins):
    generator = torch.Generator().manual_seed(0)
    probs = torch.softmax(3 * torch.randn(257, 11, generator=generator, dtype=torch.float64), dim=1)
    labels = torch.randint(0, 11, (257,), generator=generator)
    records = records_from_probs(list(range(257)), labels.tolist(), probs, seconds=1.0)
    ours = report_from_records(records, 11, n_bins, chunk=50)
    expected = calibration_report(probs, labels, n_bins=n_bins)
    for key in ("accuracy", "ece", "mce", "l2", "brier", "nll", "confidence", "count", "n_bins"):
        assert ours[key] == pytest.approx(expected[key], rel=1e-9, abs=1e-12), key


def test_run_writes_every_index_once_and_the_results(clip, task, tmp_path):
    config = tpt_config(method="ctpt", tuning=ctpt_config(TuningConfig(n_views=N_VIEWS)), samples_per_step=2)
    results = run(clip, task, config, tmp_path, progress=False)
    records = read_jsonl(tmp_path / "records.jsonl")
    assert sorted(r["index"] for r in records) == list(range(len(task.items)))
    fields = {"index", "label", "prediction", "confidence", "entropy", "time", "p_label", "brier"}
    assert all(set(r) == fields for r in records)
    assert all(r["label"] == task.items[r["index"]][1] for r in records)
    hits = sum(r["prediction"] == r["label"] for r in records) / len(records)
    assert results["accuracy"] == pytest.approx(hits)
    assert set(results["metrics"]) == {"15", "20"} and results["metrics"]["20"]["n_bins"] == 20
    assert results["ece_20"] == results["metrics"]["20"]["ece"]
    assert json.loads((tmp_path / "results.json").read_text()) == results
    assert (tmp_path / "reliability_15.png").stat().st_size > 0 and (tmp_path / "reliability_20.png").exists()


def test_resume_after_a_crash_reproduces_the_uninterrupted_run(clip, task, tmp_path):
    config = tpt_config()
    full = run(clip, task, config, tmp_path / "full", progress=False)
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    (crashed / "run.json").write_text((tmp_path / "full" / "run.json").read_text())
    lines = (tmp_path / "full" / "records.jsonl").read_text().splitlines(keepends=True)
    (crashed / "records.jsonl").write_text("".join(lines[:2]) + lines[2][:25])  # a torn last line
    resumed = run(clip, task, replace(config, samples_per_step=3), crashed, resume=True, progress=False)
    records = read_jsonl(crashed / "records.jsonl")
    assert sorted(r["index"] for r in records) == list(range(len(task.items)))
    before = {r["index"]: r for r in read_jsonl(tmp_path / "full" / "records.jsonl")}
    for r in records:
        assert r["prediction"] == before[r["index"]]["prediction"]
        assert r["confidence"] == pytest.approx(before[r["index"]]["confidence"], abs=1e-5)
    for n in ("15", "20"):
        for key in ("accuracy", "ece", "nll", "brier"):
            assert resumed["metrics"][n][key] == pytest.approx(full["metrics"][n][key], abs=1e-5)


def test_a_folder_of_another_run_is_refused(clip, task, tmp_path, cache_dir):
    config = tpt_config(method="zeroshot")
    run(clip, task, config, tmp_path, progress=False)
    with pytest.raises(ValueError, match="--resume"):
        run(clip, task, config, tmp_path, progress=False)
    with pytest.raises(ValueError, match="config"):
        run(clip, task, replace(config, method="ensemble"), tmp_path, resume=True, progress=False)


def test_baselines_and_a_fixed_temperature(clip, task, tmp_path, cache_dir):
    plain = run(clip, task, tpt_config(method="zeroshot"), tmp_path / "t1", progress=False)
    hot = run(clip, task, tpt_config(method="zeroshot", temperature=2.0), tmp_path / "t2", progress=False)
    ensemble = run(clip, task, tpt_config(method="ensemble"), tmp_path / "ens", progress=False)
    assert hot["temperature"] == 2.0 and plain["accuracy"] == hot["accuracy"]
    assert hot["metrics"]["15"]["confidence"] < plain["metrics"]["15"]["confidence"]
    first = {r["index"]: r for r in read_jsonl(tmp_path / "t1" / "records.jsonl")}
    second = {r["index"]: r for r in read_jsonl(tmp_path / "t2" / "records.jsonl")}
    assert all(first[i]["prediction"] == second[i]["prediction"] for i in first)
    assert ensemble["method"] == "ensemble" and ensemble["num_samples"] == len(task.items)


def test_fitted_temperature(clip, tmp_path):
    small = subset_task(runner.testbed_task(), 4, seed=1)
    small = replace(small, calibration_items=small.calibration_items[:6])
    results = run(clip, small, tpt_config(fit_temperature=True), tmp_path, progress=False)
    assert results["temperature"] != 1.0 and (tmp_path / "calibration_logits.safetensors").exists()
    with pytest.raises(ValueError, match="temperature"):
        RunConfig(temperature=1.5, fit_temperature=True)


def count_lines(path):
    return path.read_text().count("\n") if path.exists() else 0


def test_sigkill_then_resume_on_two_gloo_ranks(tiny_clip, tmp_path):
    limit = 48  # enough that the kill lands mid-run even when a sample takes a few milliseconds
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "fastcal", "tpt", "--method", "ctpt", "--model", "testbed", "--pretrained", "none",
        "--limit", str(limit), "--views", str(N_VIEWS), "--flush-every", "1", "--quiet",
        "--output", str(tmp_path / "killed"),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    records = tmp_path / "killed" / "records.jsonl"
    process = subprocess.Popen(
        command,
        env=env,
        cwd=tmp_path,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 240
    while count_lines(records) < 2 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.killpg(process.pid, signal.SIGKILL)  # the launcher and both ranks, mid-run
    process.wait()
    done_before = count_lines(records)
    assert 0 < done_before < limit, (done_before, process.stdout.read().decode()[-2000:])

    finished = subprocess.run([*command, "--resume"], env=env, cwd=tmp_path, capture_output=True, timeout=300)
    assert finished.returncode == 0, finished.stdout.decode()[-2000:] + finished.stderr.decode()[-2000:]
    indices = [r["index"] for r in read_jsonl(records)]
    assert sorted(indices) == list(range(limit))  # every index exactly once

    # the same run, uninterrupted, in one process
    model, tokenizer = tiny_clip
    task = runner.testbed_task(limit=limit, seed=0)
    config = RunConfig(
        method="ctpt", tuning=ctpt_config(TuningConfig(n_views=N_VIEWS)), augmix=True, flip=False
    )
    expected = run(LoadedClip(model, tokenizer, None, None), task, config, tmp_path / "whole", progress=False)
    got = json.loads((tmp_path / "killed" / "results.json").read_text())
    assert got["world_size"] == 2 and got["num_samples"] == limit
    for n in ("15", "20"):
        for key in ("accuracy", "ece", "mce", "nll", "brier", "confidence"):
            assert got["metrics"][n][key] == pytest.approx(expected["metrics"][n][key], abs=1e-5), (n, key)
