"""A run's data: the model, the few-shot training set, the evaluation class groups, and batches.

Protocols (``fastcal.data.protocols``): CoOp's few-shot draw (``few_shot_splits``: ``shots`` images per
class, seeded) over all classes, then CoCoOp's base-to-new split (``base_new_split``: train on the first
``ceil(C/2)`` classes; evaluate base and new classes each among themselves) or, with protocol ``"all"``,
every class.

Augmentation (CoOp's ``random_resized_crop`` + ``random_flip`` at the model's input size, Dassl's
defaults: scale (0.08, 1), bicubic; then the model's normalization). The embedded testbed keeps its own
training transform (digits are not flipped). Augmented views are reproducible: view ``i`` of epoch
``e`` is drawn with the generators seeded by ``fastcal.models.cache.view_seed(e, i)``, whether the
image encoder is frozen (the features are cached per epoch by ``fastcal.models.cache.image_features``)
or prompted (the images are re-encoded every step: ``fastcal.models.cache.SeededViews``), so every
method sees the same views.

Batches: epoch ``e`` visits the training set in the order of ``torch.randperm`` under a generator
seeded by ``(seed, e)``, dropping the last incomplete batch when the set holds at least one full batch
(Dassl's ``drop_last``). The order depends only on the seed and the epoch, so a resumed run replays it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fastcal._checks import check_int
from fastcal._seeds import derived_seed
from fastcal.data.items import DatasetSplits, Item
from fastcal.models.clip import LoadedClip

RRCROP_SCALE = (0.08, 1.0)


@dataclass(frozen=True)
class EvalGroup:
    """A class group evaluated among itself: its class names and test items (labels 0..C-1)."""

    name: str
    classnames: list[str]
    items: list[Item]


@dataclass(frozen=True)
class RunData:
    """The dataset as a run uses it: templates, the training set, the evaluation groups."""

    name: str
    templates: list[str]
    train_classnames: list[str]
    train_items: list[Item]
    groups: tuple[EvalGroup, ...]


def feature_cache_dir(cache_dir: str | os.PathLike | None) -> Path | None:
    """The folder ``fastcal.models.cache`` writes to for a run's ``cache_dir`` (None: its default)."""
    return None if cache_dir is None else Path(cache_dir) / "features"


def load_clip_for(config: Any) -> LoadedClip:
    """The run's model: the embedded testbed CLIP without a dataset, else ``load_clip``."""
    if config.dataset is None:
        from fastcal.models.testbed import load_testbed_clip

        cache = None if config.cache_dir is None else Path(config.cache_dir) / "testbed"
        return load_testbed_clip(cache_dir=cache, progress=config.progress)
    from fastcal.models import load_clip
    from fastcal.runs.train.config import RANDOM_INIT

    pretrained = None if config.pretrained == RANDOM_INIT else config.pretrained
    return load_clip(config.model, pretrained, precision=config.precision)


def load_splits_for(config: Any) -> DatasetSplits:
    """The run's dataset: the testbed digits without a dataset name, else ``load_dataset``."""
    if config.dataset is None:
        from fastcal.data.testbed import digits_splits

        return digits_splits(0)
    from fastcal.data import load_dataset

    return load_dataset(config.dataset, config.root)


def run_data(splits: DatasetSplits, *, shots: int, seed: int, protocol: str) -> RunData:
    """Few-shot training set and evaluation groups of ``splits`` under ``protocol`` (module docstring)."""
    from fastcal.data.protocols import base_new_split, few_shot_splits

    few = few_shot_splits(splits, shots, seed)
    if protocol == "all":
        groups = (EvalGroup("all", list(splits.classnames), list(splits.test)),)
        return RunData(splits.name, list(splits.templates), list(splits.classnames), few.train, groups)
    halves = base_new_split(few)
    base, new = halves.base.splits, halves.new.splits
    groups = (
        EvalGroup("base", list(base.classnames), list(base.test)),
        EvalGroup("new", list(new.classnames), list(new.test)),
    )
    return RunData(splits.name, list(splits.templates), list(base.classnames), base.train, groups)


def coop_train_transform(model: torch.nn.Module) -> Any:
    """CoOp's training augmentation at ``model``'s input size and normalization (module docstring)."""
    from torchvision import transforms as T

    cfg = model.visual.preprocess_cfg
    size = cfg["size"]
    size = size if isinstance(size, int) else tuple(size)
    return T.Compose(
        [
            T.RandomResizedCrop(size, scale=RRCROP_SCALE, interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(cfg["mean"], cfg["std"]),
        ]
    )


def train_transform_for(config: Any, clip: LoadedClip) -> Any:
    """The testbed's own training transform, CoOp's augmentation otherwise; the eval transform when
    ``augment`` is off."""
    if not config.augment:
        return clip.eval_transform
    if config.dataset is None:
        return clip.train_transform
    return coop_train_transform(clip.model)


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of epoch ``epoch``'s batch order."""
    return derived_seed(f"fastcal-batches:{seed}:{epoch}")


def epoch_batches(n_items: int, batch_size: int, *, seed: int, epoch: int) -> list[torch.Tensor]:
    """Index batches of epoch ``epoch`` (module docstring): a seeded permutation cut into batches."""
    check_int("n_items", n_items, minimum=1)
    check_int("batch_size", batch_size, minimum=1)
    generator = torch.Generator().manual_seed(epoch_seed(seed, epoch))
    order = torch.randperm(n_items, generator=generator)
    batches = list(order.split(batch_size))
    if n_items >= batch_size and len(batches[-1]) < batch_size:
        batches.pop()
    return batches
