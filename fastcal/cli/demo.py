"""Every method on the embedded testbed, one table: fastcal's main job, offline and on a CPU.

With no argument it pretrains the testbed CLIP once (cached; seconds), then runs each stage on the
digits testbed (base classes 0-4, new classes 5-9, each evaluated among its own classes) and writes to
--output: results.json (every row with its full calibration reports, 15-bin ECE), one reliability
diagram (PNG) per row and class group, the stages' run folders with their predictions, and prints the
table with the total runtime. The demo replaces its own earlier results in --output.

Stages (--only NAME[,NAME] runs a selection; --list names them):
  zeroshot   zero-shot CLIP (hard prompt, prompt ensemble), temperature scaling fitted on 50
             base-class validation images applied to base and new
  coop, coop_calibrated, coop_dor, kgcoop, kgcoop_dor, cocoop, prograd, prograd_calibrated, tcp,
  tcp_dor, proda, maple, maple_dor, promptsrc, vpt, vpt_dor
             prompt tuning on 16 shots of the base classes (CE, TCPT's calibrated loss, DOR's WordNet
             outliers; short testbed schedules), tested on base and new, with the new classes' ECE
             after TS and after DAC fitted on base-class validation predictions
  tpt        TPT, C-TPT, O-TPT, FPP + C-TPT and C-TPT from the prompt ensemble on 150 new-class
             test images
  finetune   FT, WiSE-FT, FLYP and CaRot on the base digits, ID and style-shifted OOD

The prompt-tuning and test-time stages run once per seed (--seeds, default 1,2,3) through the sweep
machinery (fastcal.runs.sweep: one local process per section and seed, three at a time, under
--output/seeds), while the demo's own process builds the caches the cells share in a forked process
and runs the other stages; they print mean±std over the seeds. A number that differs from the row it
improves on (the calibrated loss, DOR and KgCoOp from CoOp; C-TPT and O-TPT from TPT; FPP and the
ensemble init from C-TPT) by more than the two standard deviations together is marked *.

The stages are registered in fastcal.runs.demo.STAGES.
"""

from __future__ import annotations

import argparse

DEFAULT_OUTPUT = "fastcal-results"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--output", default=DEFAULT_OUTPUT, metavar="DIR", help=f"results folder (default ./{DEFAULT_OUTPUT})"
    )
    parser.add_argument("--only", metavar="NAME[,NAME]", help="run only these stages (see --list)")
    parser.add_argument("--list", action="store_true", help="list the stages and exit")
    parser.add_argument(
        "--seeds",
        default="1,2,3",
        metavar="A,B",
        help="seeds of the prompt-tuning and test-time stages (default 1,2,3; mean and std over them)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument(
        "--overwrite", action="store_true", help="write over a folder that holds another command's run"
    )


def run(args: argparse.Namespace) -> int:
    from fastcal.runs.demo import STAGES, run_demo
    from fastcal.runs.rows import format_table

    if args.list:
        for name, target in STAGES:
            print(f"{name}\t{target}")
        return 0
    from fastcal.runs.options import coerce

    seeds = [coerce("--seeds", seed, int) for seed in args.seeds.split(",") if seed.strip()]
    if not seeds:
        raise ValueError(f"--seeds: expected one or more seeds, got {args.seeds!r}")
    results, ctx = run_demo(
        args.output, only=args.only, progress=not args.quiet, overwrite=args.overwrite, seeds=seeds
    )
    print(format_table(results["rows"]))
    print(
        f"\n{len(results['rows'])} rows, {len(ctx.figures)} reliability diagrams, results in "
        f"{ctx.output / 'results.json'}; total {results['total_seconds']:.1f} s"
    )
    return 0
