"""ImageNet and its distribution-shift variants, in CoOp's and TPT's folder layouts.

Class identity. ImageNet-1k class ``i`` is the ``i``-th WordNet id in sorted order (n01440764 = 0,
tench, ..., n15075141 = 999, toilet tissue): the order torchvision's ``ImageFolder`` gives the train
folders and the order of CoOp's ``classnames.txt``. fastcal takes the 1,000 ids from timm's
ImageNet-1k synset list (``timm.data.ImageNetInfo``; timm ships with open_clip) and the class names,
index-aligned, from open_clip's ``IMAGENET_CLASSNAMES`` (CLIP's names, the ones CoOp's classnames.txt
copies), so neither is re-typed here and no classnames.txt is needed. CLIP's list names two classes
twice each ("missile", "sunglasses"); it is kept as is.

Layouts under ``root`` (the first that exists is used):

================ ================================================= ==========================
fastcal name     CoOp (DATASETS.md)                                TPT (data/datautils.py)
================ ================================================= ==========================
imagenet         imagenet/images/{train,val}/<wnid>/               ImageNet/{train,val}/<wnid>/
imagenet_a       imagenet-adversarial/imagenet-a/<wnid>/           imagenet-a/<wnid>/
imagenet_r       imagenet-rendition/imagenet-r/<wnid>/             imagenet-r/<wnid>/
imagenet_v2      imagenetv2/imagenetv2-matched-frequency-format-   imagenetv2-matched-frequency-
                 val/<0..999>/                                     format-val/<0..999>/
imagenet_sketch  imagenet-sketch/images/<wnid>/                    ImageNet-Sketch/<wnid>/
================ ================================================= ==========================

Labels:

- imagenet, imagenet_sketch: the folder's ImageNet-1k index (1,000 classes). ``val`` is the test
  split (CoOp evaluates on the official validation set); fastcal's ``val`` is empty, and ``train``
  is empty when the layout has no ``train/`` folder (TPT keeps only ``val/``).
- imagenet_a, imagenet_r: 200-class subsets. The classes are the wnid folders present, in sorted
  (= ImageNet index) order, labelled 0..199, as CoOp's ``ImageNetA``/``ImageNetR`` and an
  ``ImageFolder`` over TPT's layout do; ``imagenet_subset_indices`` maps them back to 1k indices.
- imagenet_v2 (matched frequency): folder ``"k"`` holds class ``k``. Its class index is
  ``int(folder name)``, not the folder's position in a sorted listing ("0", "1", "10", "100", ...),
  as CoOp's ``ImageNetV2`` reads it.

Every variant is a test set: ``train`` and ``val`` are empty.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import cache
from pathlib import Path

from fastcal.data.items import (
    DatasetSplits,
    Item,
    existing_dir,
    list_class_folders,
    list_images,
    prompt_classname,
)
from fastcal.data.templates import dataset_templates

HINT = "see CoOp's DATASETS.md (github.com/KaiyangZhou/CoOp) or TPT's README (github.com/azshue/TPT)"
NUM_IMAGENET_CLASSES = 1000
V2_FOLDER = "imagenetv2-matched-frequency-format-val"


@cache
def _wnids() -> tuple[str, ...]:
    from timm.data import ImageNetInfo

    wnids = tuple(ImageNetInfo("imagenet-1k").label_names())
    if len(wnids) != NUM_IMAGENET_CLASSES or list(wnids) != sorted(wnids):
        raise RuntimeError("timm's ImageNet-1k synset list is not the 1,000 sorted WordNet ids")
    return wnids


@cache
def _classnames() -> tuple[str, ...]:
    from open_clip import IMAGENET_CLASSNAMES

    return tuple(IMAGENET_CLASSNAMES)


def imagenet_wnids() -> list[str]:
    """The 1,000 ImageNet-1k WordNet ids; list position = class index."""
    return list(_wnids())


def imagenet_classnames() -> list[str]:
    """CLIP's 1,000 ImageNet class names (open_clip ``IMAGENET_CLASSNAMES``); position = class index."""
    return [prompt_classname(n) for n in _classnames()]


@cache
def _wnid_index() -> dict[str, int]:
    return {wnid: i for i, wnid in enumerate(_wnids())}


def imagenet_subset_indices(wnids: Sequence[str]) -> list[int]:
    """ImageNet-1k class indices of ``wnids`` (e.g. the 200 classes of ImageNet-A or -R)."""
    index = _wnid_index()
    unknown = [w for w in wnids if w not in index]
    if unknown:
        raise ValueError(f"wnids: expected ImageNet-1k WordNet ids, got {unknown[:5]}")
    return [index[w] for w in wnids]


def _wnid_folders(name: str, directory: Path) -> list[str]:
    folders = list_class_folders(directory)
    if not folders:
        raise FileNotFoundError(
            f"{name}: expected class folders named by WordNet id in {directory}, found none"
        )
    index = _wnid_index()
    unknown = [f for f in folders if f not in index]
    if unknown:
        raise ValueError(
            f"{name}: expected folders named by ImageNet-1k WordNet ids (n01440764, ...) in {directory}, "
            f"got {unknown[:5]}"
        )
    return folders


def _items(directory: Path, folders: Sequence[str], labels: Sequence[int]) -> list[Item]:
    items: list[Item] = []
    for folder, label in zip(folders, labels, strict=True):
        items.extend((path, label) for path in list_images(directory / folder))
    return items


def _imagenet_1k_items(name: str, directory: Path) -> list[Item]:
    folders = _wnid_folders(name, directory)
    return _items(directory, folders, imagenet_subset_indices(folders))


def load_imagenet(root: str | os.PathLike) -> DatasetSplits:
    """ImageNet-1k: ``train`` from ``train/`` (empty if absent), ``test`` from ``val/``."""
    root = Path(root)
    name = "imagenet"
    val_dir = existing_dir(
        name,
        [(root / "imagenet" / "images" / "val", "CoOp"), (root / "ImageNet" / "val", "TPT")],
        "the validation images (val/<wnid>/)",
        HINT,
    )
    train_dir = val_dir.parent / "train"
    train = _imagenet_1k_items(name, train_dir) if train_dir.is_dir() else []
    test = _imagenet_1k_items(name, val_dir)
    return DatasetSplits(name, imagenet_classnames(), dataset_templates(name), train, [], test)


def _load_subset(name: str, root: Path, coop_dir: Path, tpt_dir: Path) -> DatasetSplits:
    directory = existing_dir(name, [(coop_dir, "CoOp"), (tpt_dir, "TPT")], "the class folders", HINT)
    folders = _wnid_folders(name, directory)
    names = imagenet_classnames()
    classnames = [names[i] for i in imagenet_subset_indices(folders)]
    test = _items(directory, folders, range(len(folders)))
    return DatasetSplits(name, classnames, dataset_templates(name), [], [], test)


def load_imagenet_a(root: str | os.PathLike) -> DatasetSplits:
    """ImageNet-A (200 classes, natural adversarial examples; Hendrycks et al., 2021)."""
    root = Path(root)
    return _load_subset("imagenet_a", root, root / "imagenet-adversarial" / "imagenet-a", root / "imagenet-a")


def load_imagenet_r(root: str | os.PathLike) -> DatasetSplits:
    """ImageNet-R (200 classes, renditions: art, cartoons, sketches, ...; Hendrycks et al., 2021)."""
    root = Path(root)
    return _load_subset("imagenet_r", root, root / "imagenet-rendition" / "imagenet-r", root / "imagenet-r")


def load_imagenet_v2(root: str | os.PathLike) -> DatasetSplits:
    """ImageNetV2 matched-frequency (Recht et al., 2019): folder "k" is ImageNet class k."""
    root = Path(root)
    name = "imagenet_v2"
    directory = existing_dir(
        name,
        [(root / "imagenetv2" / V2_FOLDER, "CoOp"), (root / V2_FOLDER, "TPT")],
        "the class folders",
        HINT,
    )
    folders = list_class_folders(directory)
    bad = [f for f in folders if not (f.isdigit() and int(f) < NUM_IMAGENET_CLASSES and str(int(f)) == f)]
    if not folders or bad:
        raise ValueError(
            f"{name}: expected class folders named 0..999 in {directory}, got {bad[:5] or 'no folders'}"
        )
    test = _items(directory, folders, [int(f) for f in folders])
    return DatasetSplits(name, imagenet_classnames(), dataset_templates(name), [], [], test)


def load_imagenet_sketch(root: str | os.PathLike) -> DatasetSplits:
    """ImageNet-Sketch (Wang et al., 2019): 50 sketches for each of the 1,000 classes."""
    root = Path(root)
    name = "imagenet_sketch"
    directory = existing_dir(
        name,
        [(root / "imagenet-sketch" / "images", "CoOp"), (root / "ImageNet-Sketch", "TPT")],
        "the class folders",
        HINT,
    )
    test = _imagenet_1k_items(name, directory)
    return DatasetSplits(name, imagenet_classnames(), dataset_templates(name), [], [], test)
