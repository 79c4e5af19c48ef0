"""fastcal.runs.sweep.launch and .cell: cells run as submitit jobs (local processes here), each in its
folder with its logs; a failed cell is recorded and retried while the sweep goes on; a rerun skips what
is done; a cell's lock keeps a second job out and dies with its holder; ``--launcher slurm`` gives
submitit the job parameters and submission script a cluster would get."""

import json
from unittest import mock

import pytest

from fastcal.runs.folder import lock_holder, release_lock, take_lock
from fastcal.runs.sweep import Launcher, load_grid, run_sweep, sweep_status
from fastcal.runs.sweep.cell import ALREADY_DONE, BUSY, read_events, run_cell, write_cell
from fastcal.runs.table import build_table, format_markdown

GRID = """
command: train
fixed: {{shots: 2, epochs: 1}}
axes:
  dataset: [null, imagefolder]
  root: [null, {empty}]
  loss: [ce, calibrated]
exclude:
  - {{dataset: null, root: {empty}}}
  - {{dataset: imagefolder, root: null}}
  - {{dataset: imagefolder, loss: calibrated}}
"""
GOOD = ("dataset=None,root=None,loss=ce", "dataset=None,root=None,loss=calibrated")


def test_a_small_sweep_runs_records_a_failure_goes_on_and_a_rerun_skips_what_is_done(
    testbed_cache, tmp_path, monkeypatch
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "grid.yaml").write_text(GRID.format(empty=empty))
    grid = load_grid(tmp_path / "grid.yaml")
    bad = f"dataset=imagefolder,root={str(empty).replace('/', '-')},loss=ce"
    assert [c.name for c in grid.cells()] == [*GOOD, bad]
    out = tmp_path / "sweep"
    lines = []
    states = run_sweep(grid, out, Launcher(max_parallel=2), retries=1, log=lines.append, poll_seconds=0.2)

    for name in GOOD:
        assert states[name].state == "done" and states[name].started == states[name].finished == 1
        results = json.loads((out / name / "run" / "results.json").read_text())
        assert results["config"]["loss"] == name.rsplit("=", 1)[1] and results["config"]["epochs"] == 1
        (log,) = (out / name / "logs").glob("*_0_log.out")
        assert "Job completed successfully" in log.read_text()  # the job's stdout stays in its cell
    failed = states[bad]
    assert failed.state == "failed" and failed.started == 2 and failed.finished == 0  # 1 + --retries 1
    assert "pretrained weights for ViT-B-16 'openai' not found" in failed.detail and "\n" not in failed.detail
    assert sum(line.startswith(bad + ": failed") for line in lines) == 2
    assert any((out / bad / "logs").glob("*_0_log.err"))

    status = sweep_status(out)
    assert status["counts"] == {"done": 2, "running": 0, "failed": 1, "pending": 0}
    assert status["failed"] == {bad: failed.detail}

    table = format_markdown(build_table(out))
    assert "| ce | " in table and "| calibrated | " in table and "missing" in table  # the failed cell

    # the same sweep without the failed cell: nothing is started again
    good_only = tmp_path / "good.yaml"
    good_only.write_text(GRID.format(empty=empty) + "  - {dataset: imagefolder}\n")
    again = []
    states = run_sweep(load_grid(good_only), out, Launcher(max_parallel=2), log=again.append)
    assert again == [] and all(states[n].started == 1 for n in GOOD)


def test_a_cell_runs_once_at_a_time_and_never_after_it_is_done(tmp_path):
    cell = tmp_path / "cell"
    write_cell(cell, "train", {"seed": 1}, {"seed": 1})
    fd = take_lock(cell)
    try:
        assert lock_holder(cell).startswith("pid ")
        assert run_cell(str(cell)) == BUSY  # another job holds the cell: nothing runs, nothing recorded
    finally:
        release_lock(fd)
    assert lock_holder(cell) is None and read_events(cell) == []
    (cell / "events.jsonl").write_text('{"event": "start"}\n{"event": "done"}\n')
    assert run_cell(str(cell)) == ALREADY_DONE
    assert len(read_events(cell)) == 2


def test_local_parameters_and_bad_launcher_options(tmp_path):
    local = Launcher(max_parallel=2, timeout_min=30)
    assert local.parameters("c") == {"name": "c", "timeout_min": 30, "nodes": 1, "tasks_per_node": 1}
    executor = local.executor(tmp_path / "logs", "c")  # submitit accepts them
    assert executor.cluster == "local" and executor._executor.parameters["timeout_min"] == 30
    with pytest.raises(ValueError, match="--launcher: expected one of 'local', 'slurm', got 'pbs'"):
        Launcher(kind="pbs")
    with pytest.raises(ValueError, match="--partition: expected SLURM options only with --launcher slurm"):
        Launcher(partition="gpu")
    with pytest.raises(ValueError, match="--max-parallel: expected"):
        Launcher(max_parallel=0)


def test_slurm_job_parameters_and_submission_script(tmp_path):
    """submitit's own SlurmExecutor (only its check for ``srun`` on this machine answered): the
    parameters it converts ours to, and the sbatch script it would submit for a cell."""
    from submitit.slurm import slurm

    launcher = Launcher(
        kind="slurm",
        max_parallel=8,
        timeout_min=240,
        partition="gpu",
        gpus_per_node=4,
        cpus_per_task=8,
        mem_gb=64,
        slurm_options={"account": "proj1"},
        setup=["module load cuda"],
    )
    with mock.patch.object(slurm.SlurmExecutor, "affinity", classmethod(lambda cls: 2)):
        executor = launcher.executor(tmp_path / "cell" / "logs", "method=coop,seed=1")
    native = executor._executor
    assert native.parameters == {
        "job_name": "method=coop,seed=1",
        "time": 240,
        "nodes": 1,
        "ntasks_per_node": 1,
        "gpus_per_node": 4,
        "cpus_per_task": 8,
        "mem": "64GB",
        "setup": ["module load cuda"],
        "partition": "gpu",
        "additional_parameters": {"account": "proj1"},
    }
    script = native._make_submission_file_text(native._submitit_command_str, "uid")
    logs = tmp_path / "cell" / "logs"
    for line in (
        "#SBATCH --account=proj1",
        "#SBATCH --cpus-per-task=8",
        f"#SBATCH --error={logs}/%j_0_log.err",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --job-name=method=coop,seed=1",
        "#SBATCH --mem=64GB",
        "#SBATCH --nodes=1",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --output={logs}/%j_0_log.out",
        "#SBATCH --partition=gpu",
        "#SBATCH --time=240",
        "module load cuda",
    ):
        assert line in script.splitlines()
    assert f"-u -m submitit.core._submit {logs}" in script.splitlines()[-1]
    # one task per cell: with 4 GPUs the cell's job starts torchrun with 4 processes itself
    assert "#SBATCH --ntasks-per-node=4" not in script


@pytest.mark.slow
def test_a_cell_with_several_processes_runs_under_torchrun_and_matches_one_process(testbed_cache, tmp_path):
    """``--gpus-per-node 2``: the cell's job starts ``torchrun --nproc_per_node 2`` (gloo on a CPU); TPT's
    shards merge into the results of the same run in one process."""
    from fastcal.runs.tpt import TptConfig, run_tpt

    options = {"method": "tpt", "limit": 6, "views": 16, "samples_per_step": 2}
    cell = tmp_path / "cell"
    write_cell(cell, "tpt", {}, options)
    assert run_cell(str(cell), nproc=2) == "done"
    sharded = json.loads((cell / "run" / "results.json").read_text())
    assert sharded["world_size"] == 2 and (cell / "torchrun.yaml").is_file()
    single = run_tpt(TptConfig(**options, output=str(tmp_path / "single"), progress=False))
    assert sharded["accuracy"] == single["accuracy"] and sharded["ece_15"] == pytest.approx(single["ece_15"])
