"""Evaluating a saved prompt where it was not trained: new classes, other datasets, shifted domains.

The protocols of the prompt-learning literature (``fastcal.data.protocols``):

- base-to-new (CoCoOp): the prompt learned on the base classes, evaluated on the new classes of the same
  dataset (and on the base classes), each group among its own classes;
- cross-dataset transfer (CoCoOp): learned on ImageNet, evaluated on all classes of each of
  ``CROSS_DATASET_TARGETS``;
- domain generalization (CoOp): learned on ImageNet, evaluated on ``DOMAIN_GENERALIZATION_TARGETS``
  (ImageNet-V2, -Sketch, -A, -R; all of their classes).

On the embedded testbed the shifted domain is ``fastcal.data.testbed.shifted`` (sheared and
tinted digits): targets ``testbed`` (base and new test classes) and ``testbed_shifted`` (the same
groups, style-shifted). Every group gets a ``calibration_report`` (``n_bins`` recorded) and a
reliability diagram.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from fastcal._checks import check_choice, fail
from fastcal.data.items import DatasetSplits
from fastcal.models.clip import LoadedClip
from fastcal.runs.predictions import predictions_path
from fastcal.runs.train.data import EvalGroup
from fastcal.runs.train.loop import load_prompt, prompt_metadata, report_groups

TESTBED_TARGETS = ("testbed", "testbed_shifted")
GROUP_CHOICES = ("auto", "base", "new", "base_new", "all")


def load_saved_clip(metadata: dict[str, Any], *, cache_dir: str | os.PathLike | None = None) -> LoadedClip:
    """The model a prompt was trained with; its weights must have the saved fingerprint."""
    from fastcal.models.fingerprint import model_fingerprint

    model = metadata["model"]
    if model["name"] == "fastcal-testbed":
        from fastcal.models.testbed import load_testbed_clip

        cache = None if cache_dir is None else Path(cache_dir) / "testbed"
        clip = load_testbed_clip(cache_dir=cache, progress=False)
    else:
        from fastcal.models import load_clip
        from fastcal.runs.train.config import RANDOM_INIT

        pretrained = None if model["pretrained"] == RANDOM_INIT else model["pretrained"]
        clip = load_clip(model["name"], pretrained, precision=metadata["config"].get("precision", "fp32"))
    if model_fingerprint(clip.model) != model["fingerprint"]:
        raise fail(
            "model",
            f"the weights the prompt was trained with ({model['name']}, {model['pretrained']})",
            "a model with other weights (fingerprint mismatch)",
        )
    return clip


def target_groups(splits: DatasetSplits, groups: str) -> tuple[EvalGroup, ...]:
    """The class groups of ``splits`` to evaluate: base, new, both, or all classes (``"auto"`` is
    resolved by the caller)."""
    from fastcal.data.protocols import base_new_split

    check_choice("groups", groups, [g for g in GROUP_CHOICES if g != "auto"])
    if groups == "all":
        return (EvalGroup("all", list(splits.classnames), list(splits.test)),)
    halves = base_new_split(splits)
    chosen = []
    if groups in ("base", "base_new"):
        chosen.append(EvalGroup("base", list(halves.base.splits.classnames), list(halves.base.splits.test)))
    if groups in ("new", "base_new"):
        chosen.append(EvalGroup("new", list(halves.new.splits.classnames), list(halves.new.splits.test)))
    return tuple(chosen)


def evaluate_saved_prompt(
    run: str | os.PathLike,
    targets: list[tuple[str, DatasetSplits, str]],
    *,
    clip: LoadedClip | None = None,
    output: str | os.PathLike | None = None,
    n_bins: int = 15,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    cache_dir: str | os.PathLike | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Reports ``{target: {group: report, "hm": ...}}`` of the prompt saved in ``run``.

    ``targets``: ``(name, splits, groups)`` with ``groups`` one of ``base``, ``new``, ``base_new``,
    ``all``. Diagrams go to ``output/reliability_<target>_<group>.png`` and predictions to
    ``output/predictions/<target>_<group>.npz`` when ``output`` is given.
    """
    metadata = prompt_metadata(run)
    model_key = None
    if clip is None:
        clip = load_saved_clip(metadata, cache_dir=cache_dir)
        model_key = metadata["model"]["fingerprint"]  # load_saved_clip checked the weights against it
    device = torch.device(device)
    clip.model.to(device)
    method = load_prompt(run, clip, device=device)
    results: dict[str, Any] = {
        "method": metadata["method"],
        "trained_on": metadata["classnames"],
        "targets": {},
    }
    for name, splits, groups in targets:
        if not splits.test:
            raise fail("targets", f"a test split in {name}", "an empty one")
        diagram = predictions = None
        if output is not None:

            def diagram(group: str, target: str = name) -> tuple[Path, str]:
                title = f"{metadata['method']} prompt on {target}, {group} classes"
                return Path(output) / f"reliability_{target}_{group}.png", title

            def predictions(group: str, target: str = name) -> Path:
                return predictions_path(output, f"{target}_{group}")

        results["targets"][name] = report_groups(
            method,
            clip,
            target_groups(splits, groups),
            n_bins=n_bins,
            diagram=diagram,
            predictions=predictions,
            templates=splits.templates,
            device=device,
            batch_size=batch_size,
            cache_dir=cache_dir,
            progress=progress,
            model_key=model_key,
        )
    return results


def testbed_target(name: str) -> DatasetSplits:
    """The testbed's test split, plain (``testbed``) or style-shifted (``testbed_shifted``)."""
    from dataclasses import replace

    from fastcal.data.testbed import digits_splits, shifted

    if name not in TESTBED_TARGETS:
        raise fail("target", "one of " + ", ".join(TESTBED_TARGETS), repr(name))
    splits = digits_splits(0)
    if name == "testbed_shifted":
        splits = replace(splits, name="digits-shifted", test=shifted(splits.test))
    return splits
