"""Ahead-of-time builds of the Triton kernels for sm_80, sm_90 and sm_100 on this CPU-only machine.

The builds run in a subprocess without TRITON_INTERPRET (the interpreter replaces Triton's compiler in
the process that sets it). By default one specialization per kernel is built for sm_80 and sm_90, so CI
builds every kernel; ``-m slow`` builds every specialization the launches can choose for all three
architectures (about 370 builds, 4-6 minutes on 2 cores). A build that fails or spills fails the test.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastcal.ops.calibrated import triton_installed

pytestmark = pytest.mark.skipif(
    not triton_installed() or importlib.util.find_spec("triton.backends.nvidia") is None,
    reason="needs triton with its NVIDIA backend (ptxas ships in the wheel)",
)
ROOT = Path(__file__).resolve().parents[2]


def _build(tmp_path, *args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "builds.json"
    command = [sys.executable, "-m", "fastcal.ops.triton_build", *args, "--json", str(out)]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert out.exists(), done.stdout + done.stderr
    return done, json.loads(out.read_text())


def _check(done, report, archs, kernels):
    assert not report["failures"], report["failures"]
    assert not report["missing"], f"kernels without a build: {report['missing']}"
    spilled = [r for r in report["results"] if r["spill_stores"] or r["spill_loads"]]
    assert not spilled, [(r["label"], r["arch"], r["spill_stores"]) for r in spilled]
    assert {r["kernel"] for r in report["results"]} == set(kernels)
    assert {r["arch"] for r in report["results"]} == set(archs)
    for r in report["results"]:
        assert 0 < r["registers"] <= 255 and r["warps_per_sm"] >= 8, r
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_kernel_has_launches_whose_arguments_match_its_parameters():
    from fastcal.ops.triton_build import kernel_names, specializations

    specs = specializations()
    assert {s.kernel for s in specs} == set(kernel_names())
    assert len({s.key() for s in specs}) == len(specs)
    # every compute dtype and flag value reaches the builds
    for name in ("COMPUTE_GRAD", "HAS_SMOOTHING", "HAS_MOMENT", "WRITE_A", "WRITE_B"):
        assert {s.constexprs[name] for s in specs if name in s.constexprs} == {True, False}, name
    assert {s.constexprs["REDUCTION"] for s in specs if "REDUCTION" in s.constexprs} == {0, 1, 2}
    assert {s.signature["x_ptr"] for s in specs if "x_ptr" in s.signature} == {
        "*fp32",
        "*fp16",
        "*bf16",
        "*fp64",
    }


def test_a_launch_that_misnames_an_argument_is_refused():
    from fastcal.ops import triton_launches
    from fastcal.ops.triton_build import specialize

    x = torch.empty(4, 8, device="meta")
    launch = triton_launches.normalize_rows_launch(x, x, torch.empty(4, device="meta"))
    args = dict(launch.args)
    args["x"] = args.pop("x_ptr")
    renamed = triton_launches.KernelLaunch(
        launch.kernel, launch.grid, args, launch.constexprs, launch.num_warps
    )
    with pytest.raises(ValueError, match=r"misses \['x_ptr'\] and names unknown \['x'\]"):
        specialize(renamed, "renamed")


def test_resident_warps_follow_cudas_occupancy_rule():
    from fastcal.ops.triton_build import warps_per_sm

    # registers per thread -> warps per SM at 4 warps per program (cuda_occupancy.h's worked cases)
    for registers, warps in ((32, 64), (48, 40), (128, 16), (140, 12), (168, 12), (223, 8), (255, 8)):
        assert warps_per_sm(registers, 4, 0, 90) == warps, registers
    assert warps_per_sm(64, 16, 0, 90) == 32  # two programs of 16 warps
    assert warps_per_sm(32, 4, 100 * 1024, 80) == 4  # shared memory allows one program on sm_80


def test_one_build_per_kernel_for_sm80_and_sm90(tmp_path):
    from fastcal.ops.triton_build import kernel_names

    done, report = _build(tmp_path, "--representative", "--arch", "80,90", "--jobs", "2")
    _check(done, report, (80, 90), kernel_names())


@pytest.mark.slow
def test_every_specialization_builds_for_sm80_sm90_and_sm100_without_spills(tmp_path):
    from fastcal.ops.triton_build import kernel_names, specializations

    done, report = _build(tmp_path, "--arch", "80,90,100", "--jobs", str(max(2, os.cpu_count() or 1)))
    _check(done, report, (80, 90, 100), kernel_names())
    assert len(report["results"]) == 3 * len(specializations())
