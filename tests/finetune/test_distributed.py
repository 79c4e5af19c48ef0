"""Two gloo processes with global batch 2b == one process with batch 2b, after one optimizer step."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastcal.finetune.distributed import DistributedContext, gather_rows, shard_range

WORKER = Path(__file__).with_name("tiny_clip.py")
GLOBAL_BATCH = 6
METHODS = ("flyp", "carot", "ft")


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_rank_states(tmp_path_factory):
    """Run the two ranks once for all methods: ``{method: state after one step}``."""
    out = tmp_path_factory.mktemp("ddp")
    _run_two_ranks(",".join(METHODS), out)
    return {method: torch.load(out / f"{method}.pt") for method in METHODS}


def _run_two_ranks(methods, out):
    env = dict(os.environ)
    env.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
        WORLD_SIZE="2",
        GLOO_SOCKET_IFNAME="lo",
        OMP_NUM_THREADS="1",
    )
    procs = []
    for rank in range(2):
        rank_env = dict(env, RANK=str(rank), LOCAL_RANK=str(rank))
        cmd = [sys.executable, str(WORKER), methods, str(GLOBAL_BATCH), str(out)]
        procs.append(subprocess.Popen(cmd, env=rank_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    outputs = []
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=240)[0].decode())
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
    for proc, text in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, text[-3000:]


@pytest.mark.parametrize("method", METHODS)
def test_two_ranks_equal_one_process(tiny_clip, two_rank_states, method):
    distributed = two_rank_states[method]
    single = tiny_clip.one_step_state(method, GLOBAL_BATCH)
    initial = tiny_clip.make_method(method, tiny_clip.build_tiny_clip()).trainable.state_dict()
    assert set(distributed) == set(single)
    moved = 0
    for name, value in single.items():
        if name.startswith("grad."):
            # the gradient of the global-batch loss, not a rank's share (nor W times it)
            torch.testing.assert_close(distributed[name], value, rtol=1e-7, atol=1e-12, msg=name)
        else:
            torch.testing.assert_close(distributed[name], value, rtol=0, atol=1e-5, msg=name)
        key = name.removeprefix("trainable.")
        moved += key in initial and not torch.equal(initial[key], value)
    assert moved > 10  # the step changed the weights of both towers
    if method == "carot":
        assert any(name.startswith("teacher.") for name in single)


def test_single_process_helpers():
    context = DistributedContext()
    x = torch.randn(3, 2)
    assert gather_rows(x, context) is x
    assert not context.is_distributed and context.is_main
    shares = [shard_range(10, DistributedContext(rank=r, world_size=4)) for r in range(4)]
    assert [list(s) for s in shares] == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]
    assert list(shard_range(1, DistributedContext(rank=1, world_size=2))) == []
