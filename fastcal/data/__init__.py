"""Datasets in the layouts users already have, prompt templates, and the evaluation protocols.

- ``load_dataset(name, root) -> DatasetSplits``: CoOp's eleven datasets (DATASETS.md layout and
  split_zhou files), the ImageNet variants (CoOp's or TPT's layout) and a generic image folder;
  ``DATASETS`` maps each name to its loader and expected layout.
- ``ImageListDataset(items, classnames, transform=None)``: ``(image, label)`` items as a torch
  Dataset with ``classnames``, ``labels`` and ``fingerprint()``.
- ``fastcal.data.protocols``: few-shot sampling, base-to-new classes, transfer target lists.
- ``fastcal.data.testbed``: the embedded digits dataset and its style shift.
"""

from fastcal.data.items import IMAGE_EXTENSIONS, DatasetSplits, ImageListDataset, Item
from fastcal.data.registry import DATASETS, DatasetSpec, load_dataset
from fastcal.data.templates import HARD_PROMPTS, dataset_templates, imagenet_templates

__all__ = [
    "DATASETS",
    "HARD_PROMPTS",
    "IMAGE_EXTENSIONS",
    "DatasetSpec",
    "DatasetSplits",
    "ImageListDataset",
    "Item",
    "dataset_templates",
    "imagenet_templates",
    "load_dataset",
]
