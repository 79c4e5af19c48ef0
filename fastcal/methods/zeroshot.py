"""Zero-shot CLIP classification from prompt templates, and its calibration report.

CLIP (Radford et al., ICML 2021) classifies without training: class ``c`` gets the text feature
``t_c = normalize(mean_k normalize(f_text(template_k(name_c))))`` (one template is the hard prompt,
CoOp's zero-shot baseline, ``templates[0]``; all of them is CLIP's prompt ensemble), and an image ``x``
the logits ``z_c = exp(logit_scale) * cos(f_image(x), t_c)``, ``p = softmax(z)``. Class-text features
come from ``fastcal.models.cache.class_text_features`` and image features from the cached, frozen
``fastcal.models.cache.image_features``; both are computed once per model and data.

``zeroshot_report`` is the report shared by ``fastcal demo`` and ``fastcal zeroshot``, under the
base-to-new protocol of CoCoOp (Zhou et al., CVPR 2022): each class group (base = the first half of the
classes, new = the rest, optionally all) is evaluated among its own classes, that is on the test images
of the group with the softmax over the group's classes. Temperature scaling (Guo et al., ICML 2017)
is fitted on a small labeled calibration set drawn from the validation split of the base classes (the
only labeled classes in base-to-new; the train split when there is no validation split) and the same
temperature is applied to every group, so the "new" column shows whether it transfers.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fastcal._checks import check_choice, check_int, check_same_size, check_tensor, fail
from fastcal.data.items import DatasetSplits, ImageListDataset, Item
from fastcal.models.cache import class_text_features, image_features
from fastcal.models.clip import LoadedClip
from fastcal.models.fingerprint import model_fingerprint, transform_fingerprint

PROMPT_MODES = ("hard", "ensemble")
SECTION = "zero-shot"

# A figure writer: (file stem, probs, labels, title) -> the written file's name (or None to skip).
FigureWriter = Callable[[str, torch.Tensor, torch.Tensor, str], str | None]


def prompt_templates(templates: Sequence[str], mode: str) -> list[str]:
    """The templates of a prompt mode: ``"hard"`` -> ``[templates[0]]``, ``"ensemble"`` -> all."""
    check_choice("mode", mode, PROMPT_MODES)
    if isinstance(templates, str) or not templates:
        raise fail("templates", "a non-empty list of templates", repr(templates)[:200])
    return [templates[0]] if mode == "hard" else list(templates)


def zeroshot_logits(
    image_features: torch.Tensor, class_features: torch.Tensor, logit_scale: torch.Tensor | float
) -> torch.Tensor:
    """``exp(logit_scale) * cos(image_features, class_features)``: (N, D) x (C, D) -> (N, C) logits.

    ``logit_scale`` is CLIP's learned log-scale (``model.logit_scale``); features need not be normalized.
    """
    check_tensor("image_features", image_features, ndim=2, floating=True)
    check_tensor("class_features", class_features, ndim=2, floating=True)
    check_same_size(
        "class_features", class_features.shape[1], "image_features", image_features.shape[1], "width"
    )
    scale = torch.as_tensor(logit_scale, dtype=image_features.dtype, device=image_features.device).exp()
    return scale * F.normalize(image_features, dim=-1) @ F.normalize(class_features, dim=-1).T


class ZeroShotClassifier(nn.Module):
    """A frozen CLIP with fixed class-text features: ``forward(images) -> logits`` (N, C).

    Holds a reference to ``model`` (no copy); ``class_features`` is a (C, D) buffer.
    """

    def __init__(self, model: nn.Module, class_features: torch.Tensor) -> None:
        super().__init__()
        check_tensor("class_features", class_features, ndim=2, floating=True)
        self.model = model
        self.register_buffer("class_features", F.normalize(class_features.detach().float(), dim=-1))

    @classmethod
    def from_templates(
        cls,
        model: nn.Module,
        tokenizer: Any,
        classnames: Sequence[str],
        templates: Sequence[str],
        *,
        mode: str = "ensemble",
        cache_dir: str | os.PathLike | None = None,
    ) -> ZeroShotClassifier:
        """Class features from ``templates`` (``mode`` "hard": the first only; "ensemble": all)."""
        features = class_text_features(
            model, tokenizer, classnames, prompt_templates(templates, mode), cache_dir=cache_dir
        )
        return cls(model, features)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.model.encode_image(images)
        return zeroshot_logits(features.float(), self.class_features, self.model.logit_scale.float())


def encode_images(
    clip: LoadedClip,
    items: Sequence[Item],
    classnames: Sequence[str],
    *,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 128,
    num_workers: int = 0,
    progress: bool = True,
    model_key: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen image features (N, D) and labels (N,) of ``items`` under the eval transform, cached.
    ``model_key``: ``model_fingerprint(clip.model)`` when the caller has it (hashing takes a while)."""
    dataset = ImageListDataset(items, classnames, clip.eval_transform)
    with torch.no_grad():
        return image_features(
            clip.model.encode_image,
            dataset,
            model_key=model_key if model_key is not None else model_fingerprint(clip.model),
            transform_key=transform_fingerprint(clip.eval_transform),
            cache_dir=cache_dir,
            batch_size=batch_size,
            num_workers=num_workers,
            progress=progress,
        )


@dataclass(frozen=True)
class ClassGroup:
    """A named group of classes evaluated among themselves (``classes``: original label ids)."""

    name: str
    classes: tuple[int, ...]


def base_new_groups(num_classes: int, *, include_all: bool = False) -> list[ClassGroup]:
    """``[all?, base, new]``: base = the first ``ceil(C / 2)`` classes, new = the rest (CoCoOp)."""
    from fastcal.data.protocols import base_new_split

    split = base_new_split(check_int("num_classes", num_classes, minimum=2))
    groups = [ClassGroup("base", split.base.classes), ClassGroup("new", split.new.classes)]
    if include_all:
        groups.insert(0, ClassGroup("all", tuple(range(num_classes))))
    return groups


def restrict(
    logits: torch.Tensor, labels: torch.Tensor, classes: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows whose label is in ``classes``, columns ``classes``, labels renumbered to ``0..len-1``."""
    classes_t = torch.as_tensor(list(classes), dtype=torch.long, device=labels.device)
    lookup = torch.full((logits.shape[1],), -1, dtype=torch.long, device=labels.device)
    lookup[classes_t] = torch.arange(len(classes_t), device=labels.device)
    sub_labels = lookup[labels]
    keep = sub_labels >= 0
    return logits[keep][:, classes_t.to(logits.device)], sub_labels[keep]


def calibration_subset(labels: torch.Tensor, classes: Sequence[int], size: int, seed: int) -> torch.Tensor:
    """Indices of ``size`` rows (all if fewer) drawn without replacement, seeded, among the rows whose
    label is in ``classes``; sorted."""
    candidates = torch.nonzero(torch.isin(labels, torch.as_tensor(list(classes)))).flatten()
    if candidates.numel() == 0:
        raise fail("calibration split", f"images of the classes {list(classes)}", "none")
    generator = torch.Generator().manual_seed(seed)
    chosen = candidates[torch.randperm(candidates.numel(), generator=generator)[:size]]
    return chosen.sort().values


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
    section: str = SECTION,
) -> list[dict[str, Any]]:
    """Zero-shot accuracy and calibration per class group, before and after temperature scaling.

    For each prompt mode: one row without and one with temperature scaling, each holding a
    ``calibration_report`` (``n_bins`` uniform bins) per group. The temperature is fitted on
    ``calibration_size`` images drawn (``seed``) from the base classes of the validation split (the
    train split if there is none), among the base classes (module docstring).

    Args:
        clip: the model, tokenizer and eval transform.
        splits: the dataset (its ``templates[0]`` is the hard prompt).
        modes: prompt modes, of ``PROMPT_MODES``.
        groups: class groups (default: base and new, ``base_new_groups``).
        figure: writes a reliability diagram per row and group; its return value is recorded.

    Returns rows ``{"section", "method", "metrics": {group: report}, "notes": {...}}``.
    """
    from fastcal.calibrate import fit_temperature
    from fastcal.metrics import calibration_report

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
                metrics[group.name] = calibration_report(probs, group_labels, n_bins=n_bins)
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


def demo_stage(ctx: Any) -> list[dict[str, Any]]:
    """``fastcal demo`` stage: zero-shot (hard prompt and ensemble) on base and new, with and without
    temperature scaling (the context protocol is documented in ``fastcal.cli.demo``)."""
    return zeroshot_report(
        ctx.clip,
        ctx.splits,
        modes=PROMPT_MODES,
        calibration_size=ctx.calibration_size,
        n_bins=ctx.n_bins,
        seed=ctx.seed,
        cache_dir=ctx.feature_cache_dir,
        progress=ctx.progress,
        figure=ctx.figure,
    )
