"""Evaluation of a fine-tuned classifier: ID and OOD accuracy and calibration, with and without
temperature scaling, and reliability diagrams.

A classifier maps images to logits ``W normalize(f_I(x)) + b``: for FLYP, CaRot and zero-shot CLIP
``W = exp(logit_scale) * T`` with ``T`` the class-text features of the evaluated dataset's prompt
ensemble computed by the (fine-tuned) text tower (MLAI-Yonsei/CaRot ``get_zeroshot_classifier``), for
FT the rows of the trained head that belong to the evaluated classes (``fastcal.finetune.ft.class_rows``).

Each dataset's entry is ``fastcal.metrics.calibration_summary`` of ``softmax(logits)`` with 10 equal-width
bins (CaRot's convention) plus ``temperature`` and ``temperature_scaled`` (the same report of
``softmax(logits / T)``), where ``T`` is fitted once by ``fastcal.calibrate.fit_temperature`` (NLL) on
held-out ID images and applied to every dataset. ``"ood"`` also holds ``"mean"``, the unweighted mean
over the OOD datasets (as CaRot's "OOD" columns). In a distributed run every rank scores a contiguous
share of the images and the logits are gathered.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fastcal._checks import check_int, check_tensor, fail
from fastcal.data.items import ImageListDataset, Item
from fastcal.finetune.config import ECE_BINS
from fastcal.finetune.distributed import DistributedContext, autocast, gather_rows, shard_range


@dataclass(frozen=True)
class EvalSet:
    """A labeled evaluation set: its name, classes, prompt templates and ``(image, label)`` items.

    Most sets are scored over their own classes. A set whose classes are groups of the classifier's
    (ObjectNet: 113 classes, each one or more ImageNet classes) names the classifier's classes in
    ``scored_classnames`` and, per class, the ``columns`` whose maximum logit is that class's logit
    (WiSE-FT's ``project_logits``). ``image_preprocess`` runs on the PIL image before the transform.
    """

    name: str
    classnames: list[str]
    templates: list[str]
    items: list[Item]
    scored_classnames: list[str] | None = None
    columns: tuple[tuple[int, ...], ...] | None = None
    image_preprocess: Callable[[Any], Any] | None = None

    def __post_init__(self) -> None:
        if not self.items:
            raise fail(f"{self.name}.items", "a non-empty list of (image, label) pairs", "an empty list")
        if (self.scored_classnames is None) != (self.columns is None):
            raise fail("columns", "given together with scored_classnames", repr(self.columns)[:80])
        if self.columns is not None and len(self.columns) != len(self.classnames):
            raise fail("columns", f"{len(self.classnames)} column groups (one per class)", len(self.columns))

    @property
    def classifier_classnames(self) -> list[str]:
        """The classes the classifier scores (``scored_classnames`` or ``classnames``)."""
        return self.scored_classnames if self.scored_classnames is not None else self.classnames

    def project(self, logits: torch.Tensor) -> torch.Tensor:
        """Classifier logits -> logits over ``classnames`` (max over each class's columns)."""
        if self.columns is None:
            return logits
        return torch.stack([logits[:, list(cols)].amax(dim=1) for cols in self.columns], dim=1)


class FeatureClassifier(nn.Module):
    """``logits = weight @ normalize(visual(x)) + bias`` over a fixed class set."""

    def __init__(self, visual: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        check_tensor("weight", weight, ndim=2, floating=True)
        self.visual = visual
        device = next((p.device for p in visual.parameters()), weight.device)
        self.register_buffer("weight", weight.detach().to(device, copy=True))
        self.register_buffer("bias", None if bias is None else bias.detach().to(device, copy=True))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = F.normalize(self.visual(images).float(), dim=-1)
        logits = features @ self.weight.float().T
        return logits if self.bias is None else logits + self.bias.float()


def clip_classifier(
    model: nn.Module,
    tokenizer: Any,
    classnames: Sequence[str],
    templates: Sequence[str],
    *,
    cache_dir: str | os.PathLike | None = None,
    model_key: str | None = None,
) -> FeatureClassifier:
    """Zero-shot CLIP over ``classnames`` with the prompt ensemble ``templates`` (module docstring);
    ``model_key``: ``model_fingerprint(model)`` when the caller has it (the class features' cache key)."""
    from fastcal.finetune.ft import zero_shot_head
    from fastcal.models.cache import class_text_features

    features = class_text_features(
        model, tokenizer, list(classnames), list(templates), cache_dir=cache_dir, model_key=model_key
    )
    weight = zero_shot_head(features.to(model.logit_scale.device), model.logit_scale)
    return FeatureClassifier(model.visual, weight)


def head_classifier(
    visual: nn.Module, head: nn.Linear, train_classnames: Sequence[str], classnames: Sequence[str]
) -> FeatureClassifier:
    """FT's trained head restricted to the rows of ``classnames``."""
    from fastcal.finetune.ft import class_rows

    rows = torch.tensor(class_rows(list(train_classnames), list(classnames)), device=head.weight.device)
    return FeatureClassifier(visual, head.weight[rows], head.bias[rows])


@torch.no_grad()
def predict_logits(
    classifier: nn.Module,
    eval_set: EvalSet,
    transform: Callable[[Any], torch.Tensor],
    *,
    context: DistributedContext | None = None,
    batch_size: int = 256,
    num_workers: int = 0,
    precision: str = "fp32",
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 logits ``(N, C)`` on the CPU and labels ``(N,)`` of ``eval_set``, in item order."""
    from torch.utils.data import DataLoader, Subset
    from tqdm.auto import tqdm

    check_int("batch_size", batch_size, minimum=1)
    context = context or DistributedContext(device=next(classifier.parameters()).device)
    if eval_set.image_preprocess is not None:
        preprocess = eval_set.image_preprocess

        def full_transform(image: Any) -> torch.Tensor:
            return transform(preprocess(image))
    else:
        full_transform = transform
    dataset = ImageListDataset(eval_set.items, eval_set.classnames, full_transform)
    share = Subset(dataset, list(shard_range(len(dataset), context)))
    loader = DataLoader(
        share, batch_size=batch_size, num_workers=num_workers, pin_memory=context.device.type == "cuda"
    )
    # each module's own mode, restored below (a fresh wrapper's flag says nothing of the tower it wraps)
    modes = [(module, module.training) for module in classifier.modules()]
    classifier.eval()
    parts = []
    batches = tqdm(
        loader, desc=f"evaluating {eval_set.name}", disable=not (progress and context.is_main), leave=False
    )
    for images, _ in batches:
        with autocast(precision, context.device):
            parts.append(classifier(images.to(context.device, non_blocking=True)).float())
    for module, mode in modes:  # parents come before their children: each ends in its own mode
        module.training = mode
    width = len(eval_set.classifier_classnames)
    local = torch.cat(parts) if parts else torch.empty(0, width, device=context.device)
    logits = eval_set.project(gather_rows(local, context).cpu())
    labels = torch.tensor([label for _, label in eval_set.items], dtype=torch.long)
    return logits, labels


def calibration_entry(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float, *, n_bins: int = ECE_BINS
) -> dict[str, Any]:
    """``calibration_summary`` of ``softmax(logits)``, plus ``temperature`` and ``temperature_scaled``."""
    from fastcal.metrics import calibration_summary

    logits = logits.double()
    entry: dict[str, Any] = calibration_summary(torch.softmax(logits, dim=1), labels, n_bins=n_bins)
    entry["temperature"] = float(temperature)
    entry["temperature_scaled"] = calibration_summary(
        torch.softmax(logits / temperature, dim=1), labels, n_bins=n_bins
    )
    return entry


def mean_entry(entries: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The unweighted mean of report entries (``count`` summed, ``n_bins`` kept), recursively."""
    if not entries:
        raise fail("entries", "at least one report", "none")
    out: dict[str, Any] = {}
    for key, value in entries[0].items():
        values = [e[key] for e in entries]
        if isinstance(value, dict):
            out[key] = mean_entry(values)
        elif key == "count":
            out[key] = int(sum(values))
        elif key == "n_bins":
            out[key] = value
        else:
            out[key] = float(sum(values) / len(values))
    return out


FigureHook = Callable[[str, torch.Tensor, torch.Tensor, float], None]
# (set, logits as scored, labels): what a run keeps of each evaluated set
PredictionsHook = Callable[[EvalSet, torch.Tensor, torch.Tensor], None]


def evaluate(
    classifier_for: Callable[[EvalSet], nn.Module],
    test: EvalSet,
    heldout: EvalSet,
    ood: Sequence[EvalSet],
    transform: Callable[[Any], torch.Tensor],
    *,
    context: DistributedContext | None = None,
    n_bins: int = ECE_BINS,
    figure: FigureHook | None = None,
    predictions: PredictionsHook | None = None,
    batch_size: int = 256,
    num_workers: int = 0,
    precision: str = "fp32",
    progress: bool = False,
) -> dict[str, Any]:
    """``{"id": entry, "ood": {name: entry, ..., "mean": entry}}`` (module docstring).

    Args:
        classifier_for: builds the classifier of an evaluation set (its classes and templates).
        test, heldout: the ID test set and the held-out ID set the temperature is fitted on (same classes).
        ood: the OOD sets (may be empty: then ``"ood"`` is ``{}``).
        transform: the eval transform.
        figure: called on rank 0 as ``figure(set name, logits, labels, temperature)`` for the test set
            and each OOD set (e.g. ``diagram_writer``).
        predictions: called on rank 0 as ``predictions(set, logits, labels)`` for the same sets.
    """
    from fastcal.calibrate import fit_temperature

    check_int("n_bins", n_bins, minimum=1)
    id_classifier = classifier_for(test)
    context = context or DistributedContext(device=next(id_classifier.parameters()).device)
    kwargs = {
        "context": context,
        "batch_size": batch_size,
        "num_workers": num_workers,
        "precision": precision,
        "progress": progress,
    }
    held_logits, held_labels = predict_logits(id_classifier, heldout, transform, **kwargs)
    temperature = fit_temperature(held_logits.double(), held_labels)

    def entry(eval_set: EvalSet, classifier: nn.Module) -> dict[str, Any]:
        logits, labels = predict_logits(classifier, eval_set, transform, **kwargs)
        if figure is not None and context.is_main:
            figure(eval_set.name, logits, labels, temperature)
        if predictions is not None and context.is_main:
            predictions(eval_set, logits, labels)
        return calibration_entry(logits, labels, temperature, n_bins=n_bins)

    results: dict[str, Any] = {"id": entry(test, id_classifier), "ood": {}}
    for eval_set in ood:
        results["ood"][eval_set.name] = entry(eval_set, classifier_for(eval_set))
    if ood:
        results["ood"]["mean"] = mean_entry([results["ood"][s.name] for s in ood])
    return results


def diagram_writer(folder: str | os.PathLike, title: str = "", *, n_bins: int = ECE_BINS) -> FigureHook:
    """A ``figure`` hook writing ``folder/<set>.png`` and, after temperature scaling, ``<set>_ts.png``."""
    from fastcal.metrics import reliability_diagram

    folder = Path(folder)

    def write(name: str, logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> None:
        label = f"{title} {name}".strip()
        for suffix, scale, tag in (("", 1.0, ""), ("_ts", temperature, f" (T = {temperature:.3g})")):
            probs = torch.softmax(logits.double() / scale, dim=1)
            reliability_diagram(
                probs, labels, n_bins=n_bins, path=folder / f"{name}{suffix}.png", title=label + tag
            )

    return write
