"""Prompt tuning: train a prompt method with any loss and regularizers, evaluate base and new classes.

  fastcal train --method coop --loss calibrated --dataset oxford_pets --root DIR --shots 16 \\
      --protocol base2new --seed 1 --output DIR

Without --dataset it trains on the embedded testbed (digits, the pretrained tiny testbed CLIP, a short
schedule). Every setting below is an option, over the method's published recipe and an optional
--config YAML file (fastcal.runs.train.TrainConfig). Writes to --output: run.json, results.json
({"base", "new", "hm", "config", ...}), reliability_<group>.png, predictions/<group>.npz, the learned
prompt (prompt.pt, for `fastcal eval`) and checkpoint.pt after every epoch; --resume continues an
interrupted run exactly.
"""

from __future__ import annotations

import argparse
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from fastcal.runs.options import add_options
    from fastcal.runs.train.config import TrainConfig

    add_options(parser, TrainConfig, title="settings (unset: the method's recipe)")


def summary(results: dict[str, Any]) -> str:
    """One line per evaluated group: accuracy and ECE in percent, then HM."""
    lines = []
    for group, report in results.items():
        if group != "hm" and isinstance(report, dict) and "ece" in report:
            lines.append(
                f"{group:>5}: accuracy {100 * report['accuracy']:.2f}  "
                f"ECE({report['n_bins']} bins) {100 * report['ece']:.2f}"
            )
    if "hm" in results:
        hm = results["hm"]
        lines.append(f"   HM: accuracy {100 * hm['accuracy']:.2f}  ECE {100 * hm['ece']:.2f}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from fastcal.cli import UsageError
    from fastcal.runs.options import settings_from_args
    from fastcal.runs.train import TrainConfig, train

    config = settings_from_args(args, TrainConfig)
    if config.output is None:
        raise UsageError("--output: expected a run folder, got none")
    results = train(config)
    print(summary(results))
    print(f"results in {config.output}/results.json")
    return 0
