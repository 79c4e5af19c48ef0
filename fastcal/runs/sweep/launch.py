"""Running a grid's cells on submitit: local processes on this machine, or SLURM jobs.

``run_sweep`` writes ``DIR/sweep.json`` (the grid) and one folder per cell (``fastcal.runs.sweep.cell``),
then keeps at most ``max_parallel`` cells running: each cell is one submitit job running
``run_cell``, whose stdout and stderr go to the cell's ``logs/``. A cell that is done is skipped, one
another process is running is waited for, an interrupted one is resumed and a failed one run again;
each cell gets ``1 + retries`` attempts per sweep. A failure is recorded in the cell's events and the
sweep goes on. Killing the sweep leaves local jobs running (submitit starts them as children, and they
outlive it); the next sweep over the same folder waits for them.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastcal._checks import check_choice, check_int, fail
from fastcal._io import write_json_atomic
from fastcal.runs.folder import check_output_path
from fastcal.runs.sweep.cell import (
    DONE,
    FAILED,
    INTERRUPTED,
    LOGS,
    PENDING,
    RUNNING,
    CellState,
    cell_state,
    run_cell,
    write_cell,
)
from fastcal.runs.sweep.grid import Grid, grid_from_dict

LAUNCHERS = ("local", "slurm")
SWEEP = "sweep.json"
STATES = (DONE, RUNNING, FAILED, PENDING)


@dataclass
class Launcher:
    """Where and how cells run. ``gpus_per_node`` > 1 runs each cell under torchrun with one process per
    GPU, inside one job; ``slurm_options`` are extra ``#SBATCH --key=value`` lines, ``setup`` shell
    lines run before each job."""

    kind: str = "local"
    max_parallel: int = 1
    timeout_min: int = 24 * 60
    partition: str | None = None
    gpus_per_node: int = 0
    cpus_per_task: int | None = None
    mem_gb: float | None = None
    slurm_options: dict[str, str] = field(default_factory=dict)
    setup: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_choice("--launcher", self.kind, LAUNCHERS)
        check_int("--max-parallel", self.max_parallel, minimum=1)
        check_int("--timeout", self.timeout_min, minimum=1)
        check_int("--gpus-per-node", self.gpus_per_node, minimum=0)
        if self.cpus_per_task is not None:
            check_int("--cpus-per-task", self.cpus_per_task, minimum=1)
        if self.kind == "local" and (self.partition or self.slurm_options):
            raise fail("--partition", "SLURM options only with --launcher slurm", "--launcher local")

    def parameters(self, name: str) -> dict[str, Any]:
        """The parameters of submitit's ``AutoExecutor.update_parameters`` for a cell's job."""
        params: dict[str, Any] = {"name": name, "timeout_min": self.timeout_min}
        params.update(nodes=1, tasks_per_node=1)
        if self.gpus_per_node:
            params["gpus_per_node"] = self.gpus_per_node
        if self.cpus_per_task is not None:
            params["cpus_per_task"] = self.cpus_per_task
        if self.mem_gb is not None:
            params["mem_gb"] = self.mem_gb
        prefix = f"{self.kind}_"
        if self.setup:
            params[prefix + "setup"] = list(self.setup)
        if self.partition is not None:
            params["slurm_partition"] = self.partition
        if self.slurm_options:
            params["slurm_additional_parameters"] = dict(self.slurm_options)
        return params

    def executor(self, folder: Path, name: str) -> Any:
        """A submitit executor writing the job's files (and its stdout and stderr) to ``folder``."""
        import submitit

        executor = submitit.AutoExecutor(folder=folder, cluster=self.kind)
        executor.update_parameters(**self.parameters(name))
        return executor

    def threads(self) -> int | None:
        """Torch threads per local CPU cell: the cores shared by the cells running at once."""
        if self.kind != "local" or self.gpus_per_node:
            return None
        return max(1, (os.cpu_count() or 1) // self.max_parallel)


def prepare(grid: Grid, output: str | os.PathLike) -> Path:
    """Check ``output`` and write ``sweep.json`` and every cell's ``cell.json``. A folder holding a sweep
    of another command or other fixed options is refused (more axis values are welcome)."""
    path = check_output_path(output)
    previous = read_grid(path) if (path / SWEEP).is_file() else None
    if previous is not None and (previous.command, previous.fixed) != (grid.command, grid.fixed):
        raise fail(
            "--output",
            f"a new folder or one holding a sweep of this grid's {grid.command} with the same fixed options",
            f"{path}, which holds a sweep of {previous.command} with fixed {previous.fixed}",
        )
    path.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path / SWEEP, grid.to_dict())
    for cell in grid.cells():
        write_cell(path / cell.name, grid.command, cell.values, cell.options)
    return path


def read_grid(path: Path) -> Grid:
    """The grid of the sweep folder ``path``."""
    import json

    if not (path / SWEEP).is_file():
        raise fail("DIR", "a sweep folder (holding sweep.json)", str(path))
    return grid_from_dict(json.loads((path / SWEEP).read_text()), str(path / SWEEP))


def run_sweep(
    grid: Grid,
    output: str | os.PathLike,
    launcher: Launcher | None = None,
    *,
    retries: int = 0,
    log: Callable[[str], None] = print,
    poll_seconds: float = 0.5,
) -> dict[str, CellState]:
    """Run every cell of ``grid`` that is not done into ``output`` (module docstring); return each cell's
    final state."""
    launcher = launcher or Launcher()
    check_int("--retries", retries, minimum=0)
    path = prepare(grid, output)
    names = [cell.name for cell in grid.cells()]
    attempts = dict.fromkeys(names, 1 + retries)
    waiting = list(names)
    jobs: dict[str, Any] = {}
    watched: set[str] = set()  # cells seen running in another process
    while waiting or jobs:
        for name, job in list(jobs.items()):
            if job.done():
                del jobs[name]
                state = cell_state(path / name)
                log(_describe(name, state))
                if state.state != DONE:
                    waiting.append(name)
        states = {name: cell_state(path / name) for name in waiting}
        elsewhere = [name for name, state in states.items() if state.state == RUNNING]
        for name in set(elsewhere) - watched:
            log(_describe(name, states[name]) + "; waiting for it")
            watched.add(name)
        for name, state in states.items():
            if state.state == DONE or (state.state != RUNNING and attempts[name] == 0):
                if name in watched:
                    log(_describe(name, state))
                waiting.remove(name)
            elif state.state != RUNNING and len(jobs) + len(elsewhere) < launcher.max_parallel:
                attempts[name] -= 1
                waiting.remove(name)
                jobs[name] = _submit(launcher, path / name, name)
                log(f"{name}: started ({_attempt(state)}, job {jobs[name].job_id})")
        if waiting or jobs:
            time.sleep(poll_seconds)
    return {name: cell_state(path / name) for name in names}


def _attempt(state: CellState) -> str:
    return {INTERRUPTED: "resuming", FAILED: "again, after a failure"}.get(state.state, "new")


def _submit(launcher: Launcher, folder: Path, name: str) -> Any:
    executor = launcher.executor(folder / LOGS, name)
    nproc = max(1, launcher.gpus_per_node)
    return executor.submit(run_cell, str(folder), nproc=nproc, threads=launcher.threads())


def _describe(name: str, state: CellState) -> str:
    if state.state == FAILED:
        return f"{name}: failed: {state.detail}"
    if state.state == RUNNING:
        return f"{name}: running in another process ({state.detail})"
    return f"{name}: {state.state}"


def sweep_status(output: str | os.PathLike) -> dict[str, Any]:
    """``{"counts": {state: n}, "interrupted": n, "failed": {cell: error}, "cells": {cell: state}}`` of
    the sweep folder ``output``; an interrupted cell counts as pending."""
    path = Path(output)
    grid = read_grid(path)
    cells = {cell.name: cell_state(path / cell.name) for cell in grid.cells()}
    counts = dict.fromkeys(STATES, 0)
    for state in cells.values():
        counts[PENDING if state.state == INTERRUPTED else state.state] += 1
    return {
        "counts": counts,
        "interrupted": sum(s.state == INTERRUPTED for s in cells.values()),
        "failed": {name: s.detail for name, s in cells.items() if s.state == FAILED},
        "cells": cells,
    }


def format_status(status: dict[str, Any]) -> str:
    counts = status["counts"]
    line = f"{sum(counts.values())} cells: " + ", ".join(f"{counts[s]} {s}" for s in STATES)
    if status["interrupted"]:
        line += f" ({status['interrupted']} interrupted, resumed by the next sweep)"
    lines = [line] + [f"failed {name}: {error}" for name, error in status["failed"].items()]
    return "\n".join(lines)
