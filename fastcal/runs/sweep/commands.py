"""The commands a sweep's cells run (registry kind ``run_command``): each names its settings dataclass
and its runner (the functions ``fastcal train`` / ``tpt`` / ``finetune`` / ``zeroshot`` call), and reads
the numbers a table shows out of the run's ``results.json``.

Metrics are fractions (the table prints percent). ``pairs`` names the (accuracy, ECE) metric pairs that
``fastcal table`` plots against each other.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastcal.runs.rows import harmonic_mean


@dataclass(frozen=True)
class RunCommand:
    """A command a cell runs: ``settings`` and ``runner`` as ``"module:attribute"`` (imported when a
    cell runs), ``metrics(results) -> (metrics by name, ECE bins)``, and the (accuracy, ECE) ``pairs``."""

    name: str
    settings: str
    runner: str
    metrics: Callable[[dict[str, Any]], tuple[dict[str, float], int]]
    pairs: tuple[tuple[str, str], ...]

    def settings_class(self) -> Any:
        return _load(self.settings)

    def run(self, settings: Any) -> dict[str, Any]:
        return _load(self.runner)(settings)


def _load(path: str) -> Any:
    module_name, _, attribute = path.partition(":")
    return getattr(importlib.import_module(module_name), attribute)


def group_metrics(groups: dict[str, Any]) -> tuple[dict[str, float], int]:
    """Accuracy and ECE of each class group; with base and new groups also HM (of the accuracies) and
    HM ECE (the harmonic mean of the two ECEs)."""
    metrics: dict[str, float] = {}
    bins = 0
    for group, report in groups.items():
        if isinstance(report, dict) and "ece" in report and "accuracy" in report:
            metrics[f"{group} acc"] = float(report["accuracy"])
            metrics[f"{group} ECE"] = float(report["ece"])
            bins = int(report.get("n_bins", bins))
    if "base acc" in metrics and "new acc" in metrics:
        metrics["HM"] = harmonic_mean(metrics["base acc"], metrics["new acc"])
        metrics["HM ECE"] = harmonic_mean(metrics["base ECE"], metrics["new ECE"])
    return metrics, bins


def _train_metrics(results: dict[str, Any]) -> tuple[dict[str, float], int]:
    return group_metrics(results)


def _tpt_metrics(results: dict[str, Any]) -> tuple[dict[str, float], int]:
    return {"acc": float(results["accuracy"]), "ECE": float(results["ece_15"])}, 15


def _finetune_metrics(results: dict[str, Any]) -> tuple[dict[str, float], int]:
    identity = results["id"]
    metrics = {"ID acc": float(identity["accuracy"]), "ID ECE": float(identity["ece"])}
    ood = list(results["ood"].values())
    if ood:
        metrics["OOD acc"] = sum(float(e["accuracy"]) for e in ood) / len(ood)
        metrics["OOD ECE"] = sum(float(e["ece"]) for e in ood) / len(ood)
    return metrics, int(identity.get("n_bins", results["config"].get("n_bins", 10)))


def _zeroshot_metrics(results: dict[str, Any]) -> tuple[dict[str, float], int]:
    return group_metrics(results["rows"][0]["metrics"])


TRAIN = RunCommand(
    "train",
    "fastcal.runs.train:TrainConfig",
    "fastcal.runs.train:train",
    _train_metrics,
    (("base acc", "base ECE"), ("new acc", "new ECE")),
)
TPT = RunCommand(
    "tpt", "fastcal.runs.tpt:TptConfig", "fastcal.runs.tpt:run_tpt", _tpt_metrics, (("acc", "ECE"),)
)
FINETUNE = RunCommand(
    "finetune",
    "fastcal.runs.finetune:FinetuneRunConfig",
    "fastcal.runs.finetune:run_finetune",
    _finetune_metrics,
    (("ID acc", "ID ECE"), ("OOD acc", "OOD ECE")),
)
ZEROSHOT = RunCommand(
    "zeroshot",
    "fastcal.runs.zeroshot:ZeroshotConfig",
    "fastcal.runs.zeroshot:run_zeroshot",
    _zeroshot_metrics,
    (("base acc", "base ECE"), ("new acc", "new ECE")),
)
