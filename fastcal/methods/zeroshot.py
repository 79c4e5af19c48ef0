"""Zero-shot CLIP classification from prompt templates, and its calibration report.

CLIP (Radford et al., ICML 2021) classifies without training: class ``c`` gets the text feature
``t_c = normalize(mean_k normalize(f_text(template_k(name_c))))`` (one template is the hard prompt,
CoOp's zero-shot baseline, ``templates[0]``; all of them is CLIP's prompt ensemble), and an image ``x``
the logits ``z_c = exp(logit_scale) * cos(f_image(x), t_c)``, ``p = softmax(z)``. Class-text features
come from ``fastcal.models.cache.class_text_features`` and image features from the cached, frozen
``fastcal.models.cache.image_features``; both are computed once per model and data.

Class groups (``base_new_groups``) follow the base-to-new protocol of CoCoOp (Zhou et al., CVPR 2022):
base = the first half of the classes, new = the rest, each evaluated among its own classes
(``restrict``); ``fastcal.runs.zeroshot`` reports them, before and after temperature scaling.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fastcal._checks import check_choice, check_int, check_same_size, check_tensor, fail
from fastcal.data.items import ImageListDataset, Item
from fastcal.models.cache import class_text_features, image_features
from fastcal.models.clip import LoadedClip
from fastcal.models.fingerprint import model_fingerprint, transform_fingerprint

PROMPT_MODES = ("hard", "ensemble")


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
