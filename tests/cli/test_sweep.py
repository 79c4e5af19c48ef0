"""``fastcal sweep`` and ``fastcal table`` as a user runs them: a sweep killed part way (SIGKILL to the
driver and to a running cell) and run again finishes every cell exactly once, and its table equals the
table of a sweep that was never interrupted."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from fastcal.cli import main
from fastcal.runs.sweep import load_grid
from fastcal.runs.sweep.cell import read_events
from fastcal.runs.table import build_table, format_markdown

GRID = """
command: train
fixed: {shots: 2, epochs: 3}
axes:
  method: [coop, kgcoop]
  loss: [ce, calibrated]
  seed: [1, 2]
"""


def sweep_command(grid, output):
    return [
        sys.executable,
        "-m",
        "fastcal",
        "sweep",
        str(grid),
        "--output",
        str(output),
        "--max-parallel",
        "2",
    ]


def cell_state_snapshot(output, names):
    from fastcal.runs.sweep.cell import cell_state

    return {name: cell_state(output / name) for name in names}


@pytest.mark.slow
def test_a_killed_sweep_and_cell_rerun_to_the_table_of_an_uninterrupted_sweep(
    testbed_cache, tmp_path, capsys
):
    grid = tmp_path / "grid.yaml"
    grid.write_text(GRID)
    names = [cell.name for cell in load_grid(grid).cells()]
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    with open(tmp_path / "driver.log", "w") as log:
        driver = subprocess.Popen(sweep_command(grid, killed), cwd=tmp_path, stdout=log, stderr=log)
        deadline = time.monotonic() + 400
        while True:
            assert time.monotonic() < deadline and driver.poll() is None, (
                tmp_path / "driver.log"
            ).read_text()
            states = cell_state_snapshot(killed, names) if (killed / "sweep.json").exists() else {}
            done = [n for n, s in states.items() if s.state == "done"]
            running = [
                n
                for n, s in states.items()
                if s.state == "running" and (killed / n / "run" / "checkpoint.pt").exists()
            ]
            if done and running:
                break
            time.sleep(0.2)
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
    victim = running[0]
    os.kill(int(states[victim].detail.split()[1]), signal.SIGKILL)  # "pid N on HOST": the cell's job

    rerun = subprocess.run(sweep_command(grid, killed), cwd=tmp_path, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{victim}: started (resuming" in rerun.stdout
    for name in names:
        events = read_events(killed / name)
        assert [e["event"] for e in events].count("done") == 1, (name, events)
        assert events[-1]["event"] == "done"
    starts = [e for e in read_events(killed / victim) if e["event"] == "start"]
    assert len(starts) == 2 and starts[1]["resume"] is True
    for name in done:
        assert len(read_events(killed / name)) == 2  # finished before the kill: not run again

    assert subprocess.run(sweep_command(grid, clean), cwd=tmp_path, capture_output=True).returncode == 0
    table = format_markdown(build_table(killed))
    assert table == format_markdown(build_table(clean))
    assert "| missing" not in table and "(1/2)" not in table and table.count("\n| ") == 4

    assert main(["sweep", "--status", str(killed)]) == 0
    assert capsys.readouterr().out == "8 cells: 8 done, 0 running, 0 failed, 0 pending\n"
    assert main(["table", str(killed), "--format", "csv", "--output", str(tmp_path / "t.csv")]) == 0
    assert (killed / "ece_accuracy.png").stat().st_size > 0
    rows = (tmp_path / "t.csv").read_text().splitlines()
    assert rows[0] == "method,loss,group,metric,mean,std,n,expected" and len(rows) == 1 + 4 * 6 + 1
    results = json.loads((killed / names[0] / "run" / "results.json").read_text())
    assert results["config"]["epochs"] == 3
