"""The evaluation protocols of the prompt-learning literature, as data and small pure functions.

Few-shot (CoOp, Zhou et al., IJCV 2022; Dassl ``DatasetBase.generate_fewshot_dataset``): for each
class, in the order the classes first appear in the list, draw ``k`` items with ``random.sample`` from
one ``random.Random(seed)`` stream. A class with fewer than ``k`` items keeps all of them (CoOp's
default, ``repeat=False``); ``repeat=True`` instead draws ``k`` with replacement (``random.choices``),
Dassl's option. CoOp draws the ``k``-shot train set and then, from the same stream, a
``min(k, 4)``-shot validation set: ``few_shot_splits``.

Base-to-new (CoCoOp, Zhou et al., CVPR 2022; ``OxfordPets.subsample_classes``): of ``C`` classes the
first ``ceil(C / 2)`` are base, the rest new; each half's labels are renumbered ``0..C_half-1`` in the
original order. ``ClassSubset.to_original`` maps them back. CoOp samples the few-shot train set over
all classes first and subsamples after; do the same (``few_shot`` then ``ClassSubset.select``) to get
its draws.

Cross-dataset transfer (CoCoOp): prompts learned on ImageNet (16 shots) are evaluated on the ten other
datasets. Domain generalization (CoOp): ImageNet -> ImageNetV2, -Sketch, -A, -R.
"""

from __future__ import annotations

import math
import operator
import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import torch

from fastcal._checks import check_int, fail
from fastcal.data.items import DatasetSplits, Item

CROSS_DATASET_SOURCE = "imagenet"
CROSS_DATASET_TARGETS = (
    "caltech101",
    "oxford_pets",
    "stanford_cars",
    "oxford_flowers",
    "food101",
    "fgvc_aircraft",
    "sun397",
    "dtd",
    "eurosat",
    "ucf101",
)
DOMAIN_GENERALIZATION_SOURCE = "imagenet"
DOMAIN_GENERALIZATION_TARGETS = ("imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r")
BASE_TO_NEW_DATASETS = (CROSS_DATASET_SOURCE, *CROSS_DATASET_TARGETS)
FEW_SHOT_SHOTS = (1, 2, 4, 8, 16)
SEEDS = (1, 2, 3)
FEW_SHOT_VAL_SHOTS_MAX = 4


def _check_item_list(name: str, items: Any) -> Sequence[Item]:
    if isinstance(items, (str, bytes)) or not isinstance(items, Sequence):
        raise TypeError(f"{name}: expected a list of (image, label) pairs, got {type(items).__name__}")
    if len(items) == 0:
        raise fail(name, "a non-empty list of (image, label) pairs", "an empty list")
    return items


def _few_shot(items: Sequence[Item], k: int, rng: random.Random, repeat: bool) -> list[Item]:
    by_label: dict[int, list[Item]] = {}
    for item in items:
        by_label.setdefault(operator.index(item[1]), []).append(item)
    sampled: list[Item] = []
    for group in by_label.values():
        if len(group) >= k:
            sampled.extend(rng.sample(group, k))
        elif repeat:
            sampled.extend(rng.choices(group, k=k))
        else:
            sampled.extend(group)
    return sampled


def few_shot(items: Sequence[Item], k: int, seed: int, *, repeat: bool = False) -> list[Item]:
    """``k`` items per class drawn without replacement, reproducibly per ``seed`` (CoOp's sampling).

    Classes with fewer than ``k`` items keep all of them, or with ``repeat=True`` get ``k`` draws with
    replacement. The result lists the classes in order of first appearance in ``items``.
    """
    items = _check_item_list("items", items)
    check_int("k", k, minimum=1)
    check_int("seed", seed)
    return _few_shot(items, k, random.Random(seed), repeat)


def few_shot_splits(splits: DatasetSplits, k: int, seed: int, *, repeat: bool = False) -> DatasetSplits:
    """CoOp's few-shot dataset: ``k``-shot ``train``, then ``min(k, 4)``-shot ``val`` (if any) from the
    same ``random.Random(seed)`` stream; ``test`` unchanged."""
    if not isinstance(splits, DatasetSplits):
        raise TypeError(f"splits: expected a DatasetSplits, got {type(splits).__name__}")
    _check_item_list("splits.train", splits.train)
    check_int("k", k, minimum=1)
    check_int("seed", seed)
    rng = random.Random(seed)
    train = _few_shot(splits.train, k, rng, repeat)
    val = _few_shot(splits.val, min(k, FEW_SHOT_VAL_SHOTS_MAX), rng, repeat) if splits.val else []
    return replace(splits, train=train, val=val)


@dataclass(frozen=True)
class ClassSubset:
    """A subset of a dataset's classes, renumbered ``0..len(classes)-1`` in the original order.

    ``classes[j]`` is the original label of subset label ``j``. ``splits`` holds the dataset restricted
    to these classes (labels renumbered) when the subset was made from a ``DatasetSplits``.
    """

    classes: tuple[int, ...]
    num_classes: int
    classnames: list[str] | None = None
    splits: DatasetSplits | None = None

    def __len__(self) -> int:
        return len(self.classes)

    def to_original(self, labels: Any) -> Any:
        """Subset labels (int, list of ints or integer tensor) -> original labels, same type."""
        return self._map(labels, self.classes, len(self.classes), "subset labels")

    def to_subset(self, labels: Any) -> Any:
        """Original labels of classes in this subset -> subset labels; other classes are an error."""
        lookup = [-1] * self.num_classes
        for j, c in enumerate(self.classes):
            lookup[c] = j
        return self._map(labels, lookup, self.num_classes, "original labels of this subset's classes")

    def select(self, items: Sequence[Item]) -> list[Item]:
        """The items whose class is in this subset, with subset labels."""
        position = {c: j for j, c in enumerate(self.classes)}
        return [(image, position[label]) for image, label in items if label in position]

    @staticmethod
    def _map(labels: Any, table: Sequence[int], size: int, what: str) -> Any:
        if isinstance(labels, torch.Tensor):
            if labels.is_floating_point() or labels.dtype == torch.bool:
                raise fail("labels", "an integer tensor", f"dtype {labels.dtype}")
            lookup = torch.tensor(table, dtype=torch.long, device=labels.device)
            if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= size):
                raise fail(
                    "labels",
                    f"{what} in [0, {size})",
                    f"values in [{int(labels.min())}, {int(labels.max())}]",
                )
            mapped = lookup[labels.long()]
            if mapped.numel() and int(mapped.min()) < 0:
                raise fail("labels", what, "labels of classes outside this subset")
            return mapped
        if isinstance(labels, Sequence) and not isinstance(labels, (str, bytes)):
            return [ClassSubset._map(label, table, size, what) for label in labels]
        label = operator.index(labels)
        if not 0 <= label < size or table[label] < 0:
            raise fail("labels", what, label)
        return table[label]


class BaseNewSplit(NamedTuple):
    """The base and new halves of a class set (CoCoOp's base-to-new protocol)."""

    base: ClassSubset
    new: ClassSubset


def _subset(
    classes: range, num_classes: int, classnames: list[str] | None, splits: DatasetSplits | None, tag: str
) -> ClassSubset:
    names = [classnames[c] for c in classes] if classnames is not None else None
    subset = ClassSubset(tuple(classes), num_classes, names)
    if splits is None:
        return subset
    sub_splits = DatasetSplits(
        f"{splits.name}/{tag}",
        names,
        list(splits.templates),
        subset.select(splits.train),
        subset.select(splits.val),
        subset.select(splits.test),
    )
    return replace(subset, splits=sub_splits)


def base_new_split(source: DatasetSplits | Sequence[str] | int) -> BaseNewSplit:
    """Split a class set into base (first ``ceil(C/2)`` classes) and new (the rest), labels renumbered.

    ``source`` is a ``DatasetSplits`` (each half then carries its own ``splits``), a list of class
    names, or a class count.
    """
    splits = source if isinstance(source, DatasetSplits) else None
    if splits is not None:
        classnames: list[str] | None = list(splits.classnames)
    elif isinstance(source, int) and not isinstance(source, bool):
        classnames = None
    elif isinstance(source, Sequence) and not isinstance(source, (str, bytes)):
        classnames = [str(c) for c in source]
    else:
        expected = "a DatasetSplits, a list of class names or a class count"
        raise TypeError(f"source: expected {expected}, got {type(source).__name__}")
    num_classes = len(classnames) if classnames is not None else source
    check_int("number of classes", num_classes, minimum=2)
    m = math.ceil(num_classes / 2)
    return BaseNewSplit(
        _subset(range(m), num_classes, classnames, splits, "base"),
        _subset(range(m, num_classes), num_classes, classnames, splits, "new"),
    )
