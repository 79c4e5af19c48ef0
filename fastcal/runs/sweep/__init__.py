"""Sweeps: a grid of runs of one command (datasets x methods x losses x seeds x ...) on submitit, local
processes or SLURM jobs, each cell a run folder that a rerun skips, resumes or retries
(``fastcal.runs.sweep.grid``, ``.cell``, ``.launch``); ``fastcal.runs.table`` aggregates them."""

from fastcal.runs.sweep.grid import Cell, Grid, load_grid
from fastcal.runs.sweep.launch import Launcher, format_status, run_sweep, sweep_status

__all__ = ["Cell", "Grid", "Launcher", "format_status", "load_grid", "run_sweep", "sweep_status"]
