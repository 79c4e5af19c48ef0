"""A generic image folder: ``root/<class name>/<images>``, classes in sorted folder order.

Two layouts are accepted:

- split folders: ``root/train/<class>/``, ``root/val/<class>/``, ``root/test/<class>/`` (any of the
  three; at least ``train`` or ``test``). The classes are the sorted union of the class folders of all
  splits, so a label means the same class in every split.
- one folder: ``root/<class>/`` with no ``train``/``test`` sub-folder; every image goes to ``test``.

Labels follow torchvision's ``ImageFolder`` (sorted class folder names); class names are the folder
names with underscores as spaces. Image files are recognized by extension (``IMAGE_EXTENSIONS``).
"""

from __future__ import annotations

import os
from pathlib import Path

from fastcal.data.items import (
    DatasetSplits,
    Item,
    list_class_folders,
    list_images,
    missing_path,
    prompt_classname,
)
from fastcal.data.templates import dataset_templates

HINT = "expected root/<class>/<images> or root/{train,val,test}/<class>/<images>"


def load_image_folder(root: str | os.PathLike) -> DatasetSplits:
    """Images in class folders under ``root`` (see the module docstring for the two layouts)."""
    name = "imagefolder"
    root = Path(root)
    if not root.is_dir():
        raise missing_path(name, "image folder", root, HINT)
    split_layout = (root / "train").is_dir() or (root / "test").is_dir()
    split_dirs = {s: root / s for s in ("train", "val", "test")} if split_layout else {"test": root}
    split_dirs = {s: d for s, d in split_dirs.items() if d.is_dir()}
    classes = sorted({c for d in split_dirs.values() for c in list_class_folders(d)})
    if not classes:
        raise FileNotFoundError(
            f"{name}: expected class folders in {', '.join(map(str, split_dirs.values()))}"
        )
    label_of = {c: i for i, c in enumerate(classes)}

    splits: dict[str, list[Item]] = {"train": [], "val": [], "test": []}
    for split, directory in split_dirs.items():
        for folder in list_class_folders(directory):
            splits[split].extend((path, label_of[folder]) for path in list_images(directory / folder))
    if not any(splits.values()):
        raise FileNotFoundError(f"{name}: expected image files in the class folders under {root}, found none")
    classnames = [prompt_classname(c) for c in classes]
    return DatasetSplits(name, classnames, dataset_templates(name), **splits)
