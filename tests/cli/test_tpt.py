"""``fastcal tpt`` end to end on the testbed's new classes (random-init testbed CLIP, few samples)."""

import json

import pytest

from fastcal.cli import main
from fastcal.cli.tpt import add_arguments
from fastcal.runs.options import settings_from_args
from fastcal.runs.tpt import TptConfig

BASE = ["tpt", "--model", "testbed", "--pretrained", "none", "--views", "16", "--quiet"]


def test_tpt_command_end_to_end_and_resume(tmp_path, cache_dir, capsys):
    output = tmp_path / "run"
    argv = [*BASE, "--method", "ctpt", "--init", "fpp", "--fpp-steps", "3", "--limit", "4",
            "--samples-per-step", "2", "--output", str(output)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "ctpt on testbed-new (4 samples)" in printed and "ECE" in printed
    results = json.loads((output / "results.json").read_text())
    assert results["method"] == "ctpt" and results["init"] == "fpp" and results["num_samples"] == 4
    assert results["config"]["tuning"]["dispersion_weight"] == 50.0 and results["config"]["augmix"] is True
    assert results["config"]["flip"] is False and results["config"]["fpp"]["steps"] == 3
    assert (output / "fpp_context.safetensors").exists()
    lines = (output / "records.jsonl").read_text().splitlines()
    assert len(lines) == 4

    assert main(argv) == 2  # records there and no --resume
    assert "--resume" in capsys.readouterr().err
    assert main([*argv, "--resume"]) == 0  # nothing left to do: the merge again
    assert (output / "records.jsonl").read_text().splitlines() == lines


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--root", "somewhere"], "--root: expected none without --dataset"),
        (["--lambda", "5"], "--lambda"),
        (["--temperature", "warm"], "--temperature"),
        (["--dataset", "imagenet_a"], "--root: expected the datasets folder"),
        (["--views", "5"], "selection"),
        (["--limit", "0"], "--limit"),
    ],
)
def test_usage_errors_exit_2(tmp_path, extra, message, capsys):
    assert main([*BASE, "--output", str(tmp_path / "x"), *extra]) == 2
    assert message in capsys.readouterr().err


def resolved(*argv):
    """The settings the command line gives, over the recipe (``TptConfig.resolved``)."""
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return settings_from_args(parser.parse_args([*argv, "--output", "x"]), TptConfig).resolved()


def test_defaults_follow_the_reference_scripts():
    tpt_a = resolved("--dataset", "imagenet_a", "--root", "r")
    assert (tpt_a.augmix, tpt_a.flip, tpt_a.views, tpt_a.lr) == (False, True, 64, 5e-3)
    ctpt_a = resolved("--method", "ctpt", "--dataset", "imagenet_a", "--root", "r")
    assert (ctpt_a.augmix, ctpt_a.tuning().dispersion_weight) == (True, 20.0)
    ctpt_pets = resolved("--method", "ctpt", "--dataset", "oxford_pets", "--root", "r")
    assert (ctpt_pets.augmix, ctpt_pets.tuning().dispersion_weight) == (True, 50.0)
    fpp_r = resolved("--init", "fpp", "--dataset", "imagenet_r", "--root", "r")
    assert fpp_r.augmix and fpp_r.fpp().steps == 1000 and fpp_r.fpp().flatness_weight == 1.25  # FPP_DS.sh
    fpp_pets = resolved("--init", "fpp", "--dataset", "oxford_pets", "--root", "r")
    assert fpp_pets.fpp().flatness_weight is None  # 1 + 15 / C
    forced = resolved(
        "--dataset", "imagenet_a", "--root", "r", "--augmix", "--lambda", "7", "--method", "ctpt"
    )
    assert forced.augmix and forced.tuning().dispersion_weight == 7.0
    assert resolved("--temperature", "fit").temperature == "fit"
    assert resolved("--temperature", "1.16").fixed_temperature == 1.16
    on_testbed = resolved()
    assert (on_testbed.augmix, on_testbed.flip, on_testbed.num_workers) == (True, False, 0)
