"""Zero-shot runs (``fastcal zeroshot``) and the zero-shot report shared with ``fastcal demo``.

The report follows the base-to-new protocol of CoCoOp (Zhou et al., CVPR 2022): each class group (base =
the first half of the classes, new = the rest, optionally all) is evaluated among its own classes, that
is on the test images of the group with the softmax over the group's classes. Temperature scaling (Guo
et al., ICML 2017) is fitted on a small labeled calibration set drawn from the validation split of the
base classes (the only labeled classes in base-to-new; the train split when there is no validation
split) and the same temperature is applied to every group, so the "new" column shows whether it
transfers.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fastcal._checks import check_choice, check_device, check_int, fail
from fastcal.data.items import DatasetSplits
from fastcal.data.registry import DATASETS
from fastcal.methods.zeroshot import (
    PROMPT_MODES,
    ClassGroup,
    base_new_groups,
    calibration_subset,
    encode_images,
    prompt_templates,
    restrict,
    zeroshot_logits,
)
from fastcal.metrics.functional import MAX_BINS
from fastcal.models.cache import class_text_features
from fastcal.models.clip import LoadedClip
from fastcal.models.fingerprint import model_fingerprint
from fastcal.runs.options import Settings, setting
from fastcal.runs.predictions import predictions_path, save_predictions

SECTION = "zero-shot"
TESTBED_DATASET = "testbed"
TESTBED_MODEL = "fastcal-testbed"
DEFAULT_OUTPUT = "fastcal-results/zeroshot"

# A figure writer: (file stem, probs, labels, title) -> the written file's name (or None to skip).
FigureWriter = Callable[[str, torch.Tensor, torch.Tensor, str], str | None]


@dataclass
class ZeroshotConfig(Settings):
    """The settings of a zero-shot run."""

    model: str = setting(TESTBED_MODEL, help="open_clip architecture (the embedded testbed's by default)")
    pretrained: str | None = setting(
        None, help="open_clip pretrained tag or checkpoint file (unset for the testbed: its own weights)"
    )
    dataset: str = setting(
        TESTBED_DATASET, help=f"a fastcal dataset name, or {TESTBED_DATASET!r} (the digits)"
    )
    root: str | None = setting(None, help="the folder holding the dataset (CoOp's $DATA)")
    templates: str = setting("hard", help="hard (the dataset's prompt) or ensemble (all its templates)")
    output: str = setting(DEFAULT_OUTPUT, help="the run folder")
    calibration_size: int = setting(50, help="base-class images temperature scaling is fitted on")
    n_bins: int = setting(15, help="ECE bins")
    seed: int = setting(0, help="seed of the calibration draw")
    device: str = setting("cpu", help="cpu, cuda, cuda:N or auto")
    precision: str = setting("fp32", help="model weights: fp32, fp16 or bf16")
    cache_dir: str | None = setting(None, help="feature cache (unset: $FASTCAL_CACHE/features)")
    overwrite: bool = setting(False, help="replace the results the output folder holds")
    progress: bool = setting(True, help="progress bars", negative="--quiet")

    def validate(self) -> ZeroshotConfig:
        check_int("calibration_size", self.calibration_size, minimum=1)
        check_int("n_bins", self.n_bins, minimum=1, maximum=MAX_BINS)
        check_choice("templates", self.templates, PROMPT_MODES)
        check_choice("precision", self.precision, ("fp32", "fp16", "bf16"))
        check_device("device", self.device)
        check_choice("dataset", self.dataset, [TESTBED_DATASET, *DATASETS])
        in_source = self.model.startswith(("local-dir:", "hf-hub:"))
        if self.model != TESTBED_MODEL and not in_source:
            import open_clip

            if open_clip.get_model_config(self.model.replace("/", "-")) is None:
                raise fail("model", "an open_clip architecture", repr(self.model))
            if self.pretrained is None:
                raise fail(
                    "pretrained",
                    f"an open_clip tag or a checkpoint file for {self.model!r} (zero-shot evaluation of "
                    "random weights is meaningless)",
                    "nothing",
                )
        if self.dataset != TESTBED_DATASET and self.root is None:
            raise fail("root", f"the folder holding {self.dataset!r}", "nothing")
        return self


def zeroshot_report(
    clip: LoadedClip,
    splits: DatasetSplits,
    *,
    modes: Sequence[str] = ("hard",),
    groups: Sequence[ClassGroup] | None = None,
    calibration_size: int = 50,
    n_bins: int = 15,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    figure: FigureWriter | None = None,
    predictions: Callable[[str], Path] | None = None,
    section: str = SECTION,
) -> list[dict[str, Any]]:
    """Zero-shot accuracy and calibration per class group, before and after temperature scaling.

    For each prompt mode: one row without and one with temperature scaling, each holding a
    ``calibration_summary`` (``n_bins`` bins) per group. The temperature is fitted on
    ``calibration_size`` images drawn (``seed``) from the base classes of the validation split (the
    train split if there is none), among the base classes (module docstring).

    Args:
        clip: the model, tokenizer and eval transform.
        splits: the dataset (its ``templates[0]`` is the hard prompt).
        modes: prompt modes, of ``PROMPT_MODES``.
        groups: class groups (default: base and new, ``base_new_groups``).
        figure: writes a reliability diagram per row and group; its return value is recorded.
        predictions: the path of a row and group's predictions (``fastcal.runs.predictions``) from the
            file stem of its diagram; none saved without it.

    Returns rows ``{"section", "method", "metrics": {group: report}, "notes": {...}}``.
    """
    from fastcal.calibrate import fit_temperature
    from fastcal.metrics import calibration_summary, knn_proximity

    if isinstance(modes, str) or not modes:
        raise fail("modes", f"a non-empty list of {PROMPT_MODES}", repr(modes))
    for mode in modes:
        check_choice("modes", mode, PROMPT_MODES)
    check_int("calibration_size", calibration_size, minimum=1)
    if not splits.test:
        raise fail("splits", f"a test split with images in {splits.name}", "an empty test split")
    groups = list(groups) if groups is not None else base_new_groups(splits.num_classes)
    base = next((g for g in groups if g.name == "base"), groups[0])

    calibration_split = "val" if splits.val else "train"
    calibration_items = splits.val or splits.train
    encode = {"cache_dir": cache_dir, "progress": progress, "model_key": model_fingerprint(clip.model)}
    test_features, test_labels = encode_images(clip, splits.test, splits.classnames, **encode)
    cal_rows = None
    if calibration_items:
        cal_features, cal_labels = encode_images(clip, calibration_items, splits.classnames, **encode)
        if torch.isin(cal_labels, torch.as_tensor(base.classes)).any():
            cal_rows = calibration_subset(cal_labels, base.classes, calibration_size, seed)
    logit_scale = clip.model.logit_scale.detach().float()
    proximity = {}  # per group: each image's proximity to the group's other images, for PIECE
    for group in groups:
        rows_in_group = torch.isin(test_labels, torch.as_tensor(list(group.classes)))
        if int(rows_in_group.sum()) > 1:
            proximity[group.name] = knn_proximity(test_features[rows_in_group])

    rows = []
    for mode in modes:
        templates = prompt_templates(splits.templates, mode)
        with torch.no_grad():
            class_features = class_text_features(
                clip.model, clip.tokenizer, splits.classnames, templates, cache_dir=cache_dir
            )
            logits = zeroshot_logits(test_features, class_features, logit_scale)
        label = "hard prompt" if mode == "hard" else f"{len(templates)}-prompt ensemble"
        temperatures: list[float | None] = [None]
        if cal_rows is not None:
            with torch.no_grad():
                cal_logits = zeroshot_logits(cal_features[cal_rows], class_features, logit_scale)
            temperatures.append(fit_temperature(*restrict(cal_logits, cal_labels[cal_rows], base.classes)))
        for temperature in temperatures:
            scaled = temperature is not None
            method = f"CLIP zero-shot, {label}" + (" + TS" if scaled else "")
            stem = f"zeroshot-{mode}" + ("-ts" if scaled else "")
            metrics, figures = {}, {}
            for group in groups:
                group_logits, group_labels = restrict(logits, test_labels, group.classes)
                probs = torch.softmax(group_logits / (temperature if scaled else 1.0), dim=-1)
                metrics[group.name] = calibration_summary(
                    probs, group_labels, n_bins=n_bins, proximity=proximity.get(group.name)
                )
                if predictions is not None:
                    names = [splits.classnames[c] for c in group.classes]
                    save_predictions(
                        predictions(f"{stem}_{group.name}"),
                        group_logits,
                        group_labels,
                        names,
                        logit_scale=float(logit_scale.exp()),
                        temperature=temperature if scaled else 1.0,
                        text_features=class_features[list(group.classes)],
                        zeroshot_text_features=class_features[list(group.classes)],
                        proximity=proximity.get(group.name),
                    )
                if figure is not None:
                    written = figure(f"{stem}_{group.name}", probs, group_labels, f"{method} ({group.name})")
                    if written is not None:
                        figures[group.name] = written
            notes: dict[str, Any] = {"prompts": mode, "templates": templates}
            if scaled:
                notes.update(
                    temperature=temperature,
                    calibration_split=calibration_split,
                    calibration_classes=base.name,
                    calibration_size=int(cal_rows.numel()),
                )
            elif cal_rows is None:
                notes["temperature_scaling"] = "skipped: no labeled base-class images in a val or train split"
            if figures:
                notes["figures"] = figures
            rows.append({"section": section, "method": method, "metrics": metrics, "notes": notes})
    return rows


def load_model(config: ZeroshotConfig) -> LoadedClip:
    """The ``LoadedClip`` the settings name (the testbed gets its own transforms)."""
    from fastcal.models import load_clip
    from fastcal.models.testbed import load_testbed_clip, make_testbed_transforms, register_testbed_config

    device = check_device("device", config.device)
    if config.model != TESTBED_MODEL:
        return load_clip(config.model, config.pretrained, device=device, precision=config.precision)
    if config.pretrained is None:
        cache = None if config.cache_dir is None else Path(config.cache_dir) / "testbed"
        clip = load_testbed_clip(cache_dir=cache, progress=config.progress)
        return clip._replace(model=clip.model.to(device))
    register_testbed_config()
    clip = load_clip(TESTBED_MODEL, config.pretrained, device=device, precision=config.precision)
    train_transform, eval_transform = make_testbed_transforms()
    return clip._replace(train_transform=train_transform, eval_transform=eval_transform)


def load_splits(config: ZeroshotConfig) -> DatasetSplits:
    if config.dataset == TESTBED_DATASET:
        from fastcal.data.testbed import digits_splits

        return digits_splits()
    from fastcal.data import load_dataset

    return load_dataset(config.dataset, config.root)


def run_zeroshot(config: ZeroshotConfig) -> dict[str, Any]:
    """Evaluate the model on the dataset into the run folder ``config.output``: results.json (the rows),
    reliability diagrams and predictions per row and group; returns the results."""
    from fastcal.metrics import reliability_diagram
    from fastcal.runs.folder import RunFolder, check_output_path, check_run_rules
    from fastcal.runs.rows import check_row

    start = time.perf_counter()
    output = check_output_path(config.output)
    check_run_rules(output, kind="zeroshot", resume=False, overwrite=config.overwrite, argument="--output")
    splits = load_splits(config)
    clip = load_model(config)
    with RunFolder.open(output, kind="zeroshot", overwrite=config.overwrite) as folder:
        fingerprint = model_fingerprint(clip.model)
        folder.write_manifest({"config": config.to_dict(), "model_fingerprint": fingerprint})
        figures: list[str] = []

        def figure(stem: str, probs: Any, labels: Any, title: str) -> str:
            name = f"{stem}.png"
            reliability_diagram(probs, labels, n_bins=config.n_bins, path=folder.path / name, title=title)
            figures.append(name)
            return name

        rows = zeroshot_report(
            clip,
            splits,
            modes=(config.templates,),
            groups=base_new_groups(splits.num_classes, include_all=True),
            calibration_size=config.calibration_size,
            n_bins=config.n_bins,
            seed=config.seed,
            cache_dir=config.cache_dir,
            progress=config.progress,
            figure=figure,
            predictions=lambda stem: predictions_path(folder.path, stem),
            section=f"zero-shot: {config.model} ({config.pretrained or 'testbed weights'}) on {splits.name}",
        )
        results = {
            "config": config.to_dict(),
            "dataset": splits.name,
            "classes": splits.num_classes,
            "test_images": len(splits.test),
            "rows": [check_row("zeroshot", row) for row in rows],
            "figures": figures,
            "total_seconds": time.perf_counter() - start,
        }
        folder.write_results(results)
    return results
