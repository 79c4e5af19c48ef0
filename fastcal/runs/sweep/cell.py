"""A sweep cell's folder and the job that runs it.

``DIR/<cell>/`` holds ``cell.json`` (the command and the cell's options, written by the sweep),
``events.jsonl`` (one line per attempt's start and end, appended by the job), ``logs/`` (the job's
stdout and stderr, as submitit writes them), ``run/`` (the command's own run folder: run.json,
results.json, predictions, checkpoints) and ``.fastcal.lock``.

The job holds the cell's lock (``fastcal.runs.folder.take_lock``: ``flock``, released by the operating
system when the job exits or dies) from before it reads the cell's state until its run ends, so a cell
never runs twice at once and a crashed job never leaves it held. Under the lock it decides what to
do from the events: nothing when the cell is done, ``resume`` when an earlier attempt was interrupted
(it started and never ended: killed, timed out), a fresh run (``overwrite``) when it failed or never
ran.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastcal import registry
from fastcal._io import append_jsonl, read_jsonl, write_json_atomic
from fastcal.runs.folder import lock_holder, release_lock, run_kind, take_lock

CELL = "cell.json"
EVENTS = "events.jsonl"
RUN = "run"
LOGS = "logs"
# States of a cell, as ``--status`` counts them.
DONE, RUNNING, FAILED, INTERRUPTED, PENDING = "done", "running", "failed", "interrupted", "pending"
# Outcomes of a job that ran nothing.
ALREADY_DONE, BUSY = "already done", "busy"


@dataclass(frozen=True)
class CellState:
    """What a cell's folder says: its state, the last error (failed) or lock holder (running), and how
    many attempts started and finished."""

    state: str
    detail: str = ""
    started: int = 0
    finished: int = 0


def write_cell(path: Path, command: str, values: dict[str, Any], options: dict[str, Any]) -> None:
    """Write ``cell.json`` (the command and the options a job runs with)."""
    write_json_atomic(path / CELL, {"command": command, "values": values, "options": options})


def read_events(path: Path) -> list[dict[str, Any]]:
    return read_jsonl(path / EVENTS) if (path / EVENTS).is_file() else []


def _state_from_events(events: list[dict[str, Any]]) -> CellState:
    started = sum(e["event"] == "start" for e in events)
    finished = sum(e["event"] == "done" for e in events)
    if not events:
        return CellState(PENDING)
    last = events[-1]
    state = {"done": DONE, "failed": FAILED, "start": INTERRUPTED}[last["event"]]
    return CellState(state, last.get("error", ""), started, finished)


def cell_state(path: Path) -> CellState:
    """The state of the cell folder ``path``: running while a job holds its lock, else what its events
    say (module docstring)."""
    holder = lock_holder(path)
    state = _state_from_events(read_events(path))
    if holder is not None:
        return CellState(RUNNING, holder, state.started, state.finished)
    return state


def _event(path: Path, event: str, **fields: Any) -> None:
    record = {"event": event, "time": time.time(), "pid": os.getpid(), "host": socket.gethostname()}
    append_jsonl(path / EVENTS, [{**record, **fields}])


def _job_id() -> str:
    """The submitit job running this process ("" outside a job)."""
    import submitit

    try:
        return str(submitit.JobEnvironment().job_id)
    except RuntimeError:
        return ""


def _one_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return f"{type(error).__name__}: {' '.join(text.split())}"


def run_cell(path: str, *, nproc: int = 1, threads: int | None = None) -> str:
    """The job of one cell (module docstring): returns what it did (``done``, ``already done``, ``busy``);
    a failed run is recorded in the events and raised again, so the job fails too. With ``nproc`` > 1
    the command runs under ``torchrun --standalone --nproc_per_node nproc`` (one process per GPU)."""
    folder = Path(path)
    try:
        fd = take_lock(folder, argument="cell", wait_seconds=2.0)
    except ValueError:
        return BUSY
    try:
        before = _state_from_events(read_events(folder))
        if before.state == DONE:
            return ALREADY_DONE
        cell = json.loads((folder / CELL).read_text())
        spec = registry.get("run_command", cell["command"], argument="command")
        run_folder = folder / RUN
        resume = before.state == INTERRUPTED and run_kind(run_folder) == spec.name
        _event(folder, "start", resume=resume, job=_job_id())
        try:
            if nproc > 1:
                _torchrun(folder, spec.name, cell["options"], resume, nproc)
            else:
                if threads is not None:
                    import torch

                    torch.set_num_threads(threads)
                spec.run(_settings(spec, cell["options"], run_folder, resume))
        except Exception as error:  # an interrupt or a timeout leaves the attempt interrupted: resumed
            _event(folder, "failed", error=_one_line(error))
            raise
        _event(folder, "done")
        return DONE
    finally:
        release_lock(fd)


def _options(settings_class: Any, options: dict[str, Any], run_folder: Path, resume: bool) -> dict[str, Any]:
    known = settings_class.field_names()
    values = {**options, "output": str(run_folder)}
    # resume an interrupted run where the command can; else start over, replacing what is there
    values["resume" if resume and "resume" in known else "overwrite"] = True
    if "progress" in known:
        values["progress"] = False
    return values


def _settings(spec: Any, options: dict[str, Any], run_folder: Path, resume: bool) -> Any:
    settings_class = spec.settings_class()
    return settings_class.from_dict(_options(settings_class, options, run_folder, resume))


def _torchrun(folder: Path, command: str, options: dict[str, Any], resume: bool, nproc: int) -> None:
    import yaml

    spec = registry.get("run_command", command)
    config = folder / "torchrun.yaml"
    config.write_text(yaml.safe_dump(_options(spec.settings_class(), options, folder / RUN, resume)))
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    completed = subprocess.run(
        [*launch, "-m", "fastcal", command, "--config", str(config)], stderr=subprocess.PIPE, text=True
    )
    sys.stderr.write(completed.stderr)
    if completed.returncode != 0:
        # a rank's one-line error ("fastcal tpt: error: ..."), else torchrun's last line
        lines = [line for line in completed.stderr.splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith(f"fastcal {command}: error:")] or lines[-1:]
        raise RuntimeError(f"torchrun exited with {completed.returncode}: {errors[-1] if errors else ''}")
