"""Prompt tuning: train CoOp, CoCoOp, KgCoOp, MaPLe or VPT with any loss, evaluate base and new classes.

  fastcal train --method coop --loss calibrated --dataset oxford_pets --root DIR --shots 16 \\
      --protocol base2new --seed 1 --output DIR

Without --dataset it trains on the embedded testbed (digits, the pretrained tiny testbed CLIP, a short
schedule). Every field of the run's config is an option (--key=value or --key value; see
fastcal.train.TrainConfig), on top of the method's published recipe and an optional --config YAML file.
Writes to --output: results.json ({"base", "new", "hm", "config", ...}), reliability_<group>.png, the
learned prompt (prompt.pt, for `fastcal eval`) and checkpoint.pt after every epoch; --resume continues
an interrupted run exactly.
"""

from __future__ import annotations

import argparse
from typing import Any

from fastcal.cli import UsageError

HELP = {
    "method": "coop, cocoop, kgcoop, maple or vpt",
    "loss": "ce, calibrated (TCPT's loss) or label_smoothing",
    "dataset": "a fastcal dataset name (default: the embedded testbed)",
    "root": "the folder holding the dataset",
    "shots": "training images per class (16)",
    "protocol": "base2new (train on base classes, test base and new) or all",
    "seed": "few-shot draw, initialization and batch order (1)",
    "output": "run folder (required)",
    "regularizers": "extra regularizers, comma-separated (e.g. dor)",
    "regularizer_options": "YAML mapping, e.g. '{dor: {weight: 8}}'",
    "resume": "continue the run in --output from its last checkpoint",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from fastcal.train.config import TrainConfig

    parser.add_argument("--config", metavar="YAML", help="a YAML file of config values (below the options)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace the run --output holds (its files are removed)"
    )
    group = parser.add_argument_group("config (default: the method's recipe; see fastcal.train.TrainConfig)")
    for name in TrainConfig.field_names():
        if name == "progress":
            continue
        flags = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
        if name == "regularizers":
            flags.append("--regularizer")  # the singular reads naturally for one: --regularizer dor
        extra: dict[str, Any] = {"nargs": "?", "const": "true"} if name == "resume" else {}
        group.add_argument(
            *flags, dest=name, default=argparse.SUPPRESS, metavar="VALUE", help=HELP.get(name), **extra
        )


def config_from_args(args: argparse.Namespace) -> Any:
    """The run's ``TrainConfig``: the YAML file, then the options given."""
    from fastcal.train.config import TrainConfig

    overrides = {name: getattr(args, name) for name in TrainConfig.field_names() if hasattr(args, name)}
    if args.quiet:
        overrides["progress"] = False
    return TrainConfig.from_sources(yaml_path=args.config, overrides=overrides)


def summary(results: dict[str, Any]) -> str:
    """One line per evaluated group: accuracy and ECE in percent, then HM."""
    lines = []
    for group, report in results.items():
        if isinstance(report, dict) and "ece" in report:
            lines.append(
                f"{group:>5}: accuracy {100 * report['accuracy']:.2f}  "
                f"ECE({report['n_bins']} bins) {100 * report['ece']:.2f}"
            )
    if "hm" in results:
        lines.append(f"   HM: accuracy {100 * results['hm']['accuracy']:.2f}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from fastcal.train import train

    config = config_from_args(args)
    if config.output is None:
        raise UsageError("--output: expected a run folder, got none")
    results = train(config, overwrite=args.overwrite)
    print(summary(results))
    print(f"results in {config.output}/results.json")
    return 0
