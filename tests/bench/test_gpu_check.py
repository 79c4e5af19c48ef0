"""The GPU acceptance command without a GPU: one line and exit 2; and its sections run as written on
the CPU (Triton in the interpreter, the TPT step eager, tiny sizes), so a run on a GPU machine does not
stop on a typo."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastcal.ops.calibrated import triton_installed, triton_interpreting

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def gpu_check():
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("bench_gpu_check", BENCH / "gpu_check.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(BENCH))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_without_cuda_it_says_so_in_one_line_and_exits_2():
    done = subprocess.run([sys.executable, str(BENCH / "gpu_check.py")], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stdout == "" and len(done.stderr.strip().splitlines()) == 1
    assert "expected a CUDA device" in done.stderr


@pytest.mark.skipif(not (triton_installed() and triton_interpreting()), reason="needs the Triton interpreter")
def test_the_sections_run_on_the_cpu(gpu_check, random_testbed):
    device = torch.device("cpu")
    rows = gpu_check.check_against_reference([(5, 11, 24)], (torch.float32, torch.bfloat16), device)
    assert [r["ok"] for r in rows] == [True, True]
    assert set(rows[0]["relative_errors"]) == {"loss", "image", "text", "frozen", "log_scale"}
    model, tokenizer = random_testbed
    sizes = {"n_classes": 5, "n_views": 10}
    replay = gpu_check.check_graph_replay(model, tokenizer, device, samples=(2,), **sizes)
    assert replay == [{"samples_per_step": 2, "graph_used": False, "max_abs_difference": 0.0, "ok": True}]
    timings = gpu_check.tpt_timings(model, tokenizer, 1, device, samples=(2,), **sizes)
    assert set(timings[0]["seconds_per_sample"]) == {"graph", "eager"}
    ce = gpu_check.cross_entropy_timings((5, 11, 24), 1, device)
    assert {"torch", "fastcal"} <= set(ce["seconds"])
    assert gpu_check.jit_registers() == []  # interpreted kernels compile nothing
