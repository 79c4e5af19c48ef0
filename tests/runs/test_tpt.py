"""The test-time runner: records with their logits, reports and predictions, resume, refusal of foreign
folders, baselines, sharding and a SIGKILL in the middle of a two-process (gloo) run."""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from fastcal._io import read_jsonl
from fastcal.metrics import calibration_summary
from fastcal.models.clip import LoadedClip
from fastcal.runs import tpt as runner
from fastcal.runs.records import decode_rows
from fastcal.runs.tpt import TptConfig, ViewFeatureMemo, records_from_logits, run_tpt, subset_task

ROOT = Path(__file__).resolve().parents[2]
N_VIEWS = 16


@pytest.fixture
def clip(random_testbed):
    model, tokenizer = random_testbed
    return LoadedClip(model, tokenizer, None, None)


@pytest.fixture(scope="module")
def task():
    return runner.testbed_task(limit=6, seed=0)


def tpt_config(output, **changes):
    return TptConfig(views=N_VIEWS, flip=False, output=str(output), progress=False, **changes)


def run(clip, task, config):
    return run_tpt(config, clip=clip, task=task)


def test_records_keep_the_logits_and_their_top_label_statistics():
    generator = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(37, 11, generator=generator)
    labels = torch.randint(0, 11, (37,), generator=generator)
    records = records_from_logits(list(range(37)), labels.tolist(), logits, 2.0, seconds=1.0)
    torch.testing.assert_close(decode_rows([r["logits"] for r in records], 11), logits, rtol=0, atol=0)
    probs = torch.softmax(logits / 2.0, dim=1).double()
    assert [r["prediction"] for r in records] == probs.argmax(1).tolist()
    torch.testing.assert_close(
        torch.tensor([r["confidence"] for r in records], dtype=torch.float64), probs.max(1).values
    )
    brier = ((probs - torch.nn.functional.one_hot(labels, 11)) ** 2).sum(1)
    torch.testing.assert_close(torch.tensor([r["brier"] for r in records], dtype=torch.float64), brier)


def test_run_writes_every_index_once_and_the_results(clip, task, tmp_path):
    config = tpt_config(tmp_path, method="ctpt", samples_per_step=2)
    results = run(clip, task, config)
    records = read_jsonl(tmp_path / "records.jsonl")
    assert sorted(r["index"] for r in records) == list(range(len(task.items)))
    fields = {"index", "label", "prediction", "confidence", "entropy", "time", "p_label", "brier", "logits"}
    assert all(set(r) == fields for r in records)
    assert all(r["label"] == task.items[r["index"]][1] for r in records)
    hits = sum(r["prediction"] == r["label"] for r in records) / len(records)
    assert results["accuracy"] == pytest.approx(hits)
    assert set(results["metrics"]) == {"15", "20"} and results["metrics"]["20"]["n_bins"] == 20
    assert results["ece_20"] == results["metrics"]["20"]["ece"]
    assert results["config"]["tuning"]["dispersion_weight"] == 50.0  # C-TPT's recipe on the testbed
    assert json.loads((tmp_path / "results.json").read_text()) == results
    assert (tmp_path / "reliability_15.png").stat().st_size > 0 and (tmp_path / "reliability_20.png").exists()
    # the predictions are the records' logits, and give the report again
    saved = np.load(tmp_path / "predictions" / f"{task.name}.npz")
    ordered = sorted(records, key=lambda r: r["index"])
    logits = decode_rows([r["logits"] for r in ordered], len(task.classnames))
    torch.testing.assert_close(torch.from_numpy(saved["logits"]), logits, rtol=0, atol=0)
    again = calibration_summary(
        torch.from_numpy(saved["logits"]).softmax(1), torch.from_numpy(saved["labels"])
    )
    assert again == results["metrics"]["15"]


def test_resume_after_a_crash_reproduces_the_uninterrupted_run(clip, task, tmp_path):
    full = run(clip, task, tpt_config(tmp_path / "full"))
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    (crashed / "run.json").write_text((tmp_path / "full" / "run.json").read_text())
    lines = (tmp_path / "full" / "records.jsonl").read_text().splitlines(keepends=True)
    (crashed / "records.jsonl").write_text("".join(lines[:2]) + lines[2][:25])  # a torn last line
    resumed = run(clip, task, tpt_config(crashed, samples_per_step=3, resume=True))
    records = read_jsonl(crashed / "records.jsonl")
    assert sorted(r["index"] for r in records) == list(range(len(task.items)))
    before = {r["index"]: r for r in read_jsonl(tmp_path / "full" / "records.jsonl")}
    for r in records:
        assert r["prediction"] == before[r["index"]]["prediction"]
        assert r["confidence"] == pytest.approx(before[r["index"]]["confidence"], abs=1e-5)
    for n in ("15", "20"):
        for key in ("accuracy", "ece", "nll", "brier"):
            assert resumed["metrics"][n][key] == pytest.approx(full["metrics"][n][key], abs=1e-5)


def test_runs_sharing_a_view_memo_equal_runs_that_make_their_own_views(clip, task, tmp_path):
    memo = ViewFeatureMemo()
    for method in ("tpt", "ctpt", "otpt"):
        alone = run(clip, task, tpt_config(tmp_path / f"{method}-alone", method=method, samples_per_step=2))
        config = tpt_config(tmp_path / f"{method}-shared", method=method, samples_per_step=2)
        shared = run_tpt(config, clip=clip, task=task, view_memo=memo)
        assert len(memo) == len(task.items)  # the first run filled it, the others read it
        saved = [
            np.load(tmp_path / f"{method}-{k}" / "predictions" / f"{task.name}.npz")
            for k in ("alone", "shared")
        ]
        np.testing.assert_array_equal(saved[0]["logits"], saved[1]["logits"])
        assert shared["metrics"] == alone["metrics"]
    # other views (another seed) are not taken from the memo
    other = run_tpt(tpt_config(tmp_path / "seed1", seed=1), clip=clip, task=task, view_memo=memo)
    assert len(memo) == 2 * len(task.items)
    assert other["metrics"] != run(clip, task, tpt_config(tmp_path / "seed0"))["metrics"]


def test_a_folder_of_another_run_is_refused(clip, task, tmp_path, cache_dir):
    run(clip, task, tpt_config(tmp_path, method="zeroshot"))
    with pytest.raises(ValueError, match="--output: expected a new or empty folder"):
        run(clip, task, tpt_config(tmp_path, method="zeroshot"))
    with pytest.raises(ValueError, match=r"--resume: expected the settings of the run .* differs in config"):
        run(clip, task, tpt_config(tmp_path, method="ensemble", resume=True))


def test_baselines_and_a_fixed_temperature(clip, task, tmp_path, cache_dir):
    plain = run(clip, task, tpt_config(tmp_path / "t1", method="zeroshot"))
    hot = run(clip, task, tpt_config(tmp_path / "t2", method="zeroshot", temperature="2.0"))
    ensemble = run(clip, task, tpt_config(tmp_path / "ens", method="ensemble"))
    assert hot["temperature"] == 2.0 and plain["accuracy"] == hot["accuracy"]
    assert hot["metrics"]["15"]["confidence"] < plain["metrics"]["15"]["confidence"]
    first = {r["index"]: r for r in read_jsonl(tmp_path / "t1" / "records.jsonl")}
    second = {r["index"]: r for r in read_jsonl(tmp_path / "t2" / "records.jsonl")}
    assert all(first[i]["prediction"] == second[i]["prediction"] for i in first)
    assert ensemble["method"] == "ensemble" and ensemble["num_samples"] == len(task.items)
    assert float(np.load(tmp_path / "t2" / "predictions" / f"{task.name}.npz")["temperature"]) == 2.0


def test_fitted_temperature(clip, tmp_path):
    small = subset_task(runner.testbed_task(), 4, seed=1)
    small = replace(small, calibration_items=small.calibration_items[:6])
    results = run(clip, small, tpt_config(tmp_path, temperature="fit"))
    assert results["temperature"] != 1.0 and (tmp_path / "calibration_logits.safetensors").exists()
    with pytest.raises(ValueError, match="temperature: expected a number or 'fit'"):
        TptConfig(temperature="warm")


def count_lines(path):
    return path.read_text().count("\n") if path.exists() else 0


def test_sigkill_then_resume_on_two_gloo_ranks(random_testbed, tmp_path):
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
    model, tokenizer = random_testbed
    task = runner.testbed_task(limit=limit, seed=0)
    config = tpt_config(tmp_path / "whole", method="ctpt")
    expected = run(LoadedClip(model, tokenizer, None, None), task, config)
    got = json.loads((tmp_path / "killed" / "results.json").read_text())
    assert got["world_size"] == 2 and got["num_samples"] == limit
    for n in ("15", "20"):
        for key in ("accuracy", "ece", "mce", "nll", "brier", "confidence"):
            assert got["metrics"][n][key] == pytest.approx(expected["metrics"][n][key], abs=1e-5), (n, key)
