"""A grid of runs (datasets x methods x losses x seeds x any option) on submitit, resumable.

  fastcal sweep grid.yaml --output sweeps/tcpt --max-parallel 2        # local processes
  fastcal sweep tcpt_base2new --output sweeps/tcpt --launcher slurm --partition gpu --gpus-per-node 1 \\
      --timeout 240                                                     # one SLURM job per cell
  fastcal sweep --status sweeps/tcpt                                   # done / running / failed / pending
  fastcal table sweeps/tcpt                                            # mean +- std over seeds

GRID is a YAML file, or the name of a preset shipped with fastcal (--presets lists them):

  command: train                              # train, tpt, finetune or zeroshot
  fixed: {shots: 16, protocol: base2new}      # any option of the command; no dataset: the testbed
  axes: {method: [coop, kgcoop], loss: [ce, calibrated], seed: [1, 2, 3]}

The whole grid is checked before any cell starts. Each cell is a folder under --output named by its axis
values (method=coop,loss=ce,seed=1) holding the command's run folder (run/), the job's stdout and stderr
(logs/) and its attempts (events.jsonl). Running the sweep again skips finished cells, resumes
interrupted ones, runs failed ones again (--retries more times each if they fail again) and waits for
cells another process is running (a lock per cell, released by the system when its job dies). A failed
cell is reported and the sweep goes on; the exit status is 1 when a cell is left unfinished. With
--gpus-per-node N > 1 each cell runs under torchrun with N processes inside its job.
"""

from __future__ import annotations

import argparse


def _key_value(text: str) -> tuple[str, str]:
    key, equals, value = text.partition("=")
    if not equals or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("grid", nargs="?", metavar="GRID", help="a grid YAML file or a preset name")
    parser.add_argument("--output", metavar="DIR", help="the sweep folder (one folder per cell)")
    parser.add_argument("--status", metavar="DIR", help="print the state of the sweep in DIR and exit")
    parser.add_argument("--presets", action="store_true", help="list the preset grids and exit")
    parser.add_argument("--retries", type=int, default=0, help="more attempts for a failing cell")
    group = parser.add_argument_group("where cells run (submitit)")
    group.add_argument("--launcher", default="local", help="local (processes on this machine) or slurm")
    group.add_argument("--max-parallel", type=int, default=1, metavar="N", help="cells running at once")
    group.add_argument("--timeout", type=int, default=24 * 60, metavar="MIN", help="time limit of a cell")
    group.add_argument("--partition", help="SLURM partition")
    group.add_argument(
        "--gpus-per-node", type=int, default=0, metavar="N", help="GPUs per cell (N > 1: torchrun)"
    )
    group.add_argument("--cpus-per-task", type=int, metavar="N", help="CPUs per cell")
    group.add_argument("--mem-gb", type=float, metavar="GB", help="memory per cell")
    group.add_argument(
        "--slurm-option",
        type=_key_value,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an extra #SBATCH --KEY=VALUE line (repeatable)",
    )
    group.add_argument(
        "--setup", action="append", default=[], metavar="LINE", help="a shell line run before each cell"
    )


def run(args: argparse.Namespace) -> int:
    from fastcal.cli import UsageError
    from fastcal.runs.sweep import Launcher, format_status, load_grid, run_sweep, sweep_status
    from fastcal.runs.sweep.presets import preset_names, resolve_grid

    if args.presets:
        print("\n".join(preset_names()))
        return 0
    if args.status is not None:
        print(format_status(sweep_status(args.status)))
        return 0
    if args.grid is None:
        raise UsageError("GRID: expected a grid YAML file or a preset name, got none")
    if args.output is None:
        raise UsageError("--output: expected a sweep folder, got none")
    grid = load_grid(resolve_grid(args.grid))
    launcher = Launcher(
        kind=args.launcher,
        max_parallel=args.max_parallel,
        timeout_min=args.timeout,
        partition=args.partition,
        gpus_per_node=args.gpus_per_node,
        cpus_per_task=args.cpus_per_task,
        mem_gb=args.mem_gb,
        slurm_options=dict(args.slurm_option),
        setup=list(args.setup),
    )
    run_sweep(grid, args.output, launcher, retries=args.retries, log=lambda line: print(line, flush=True))
    status = sweep_status(args.output)
    print(format_status(status))
    return 0 if status["counts"]["done"] == sum(status["counts"].values()) else 1
