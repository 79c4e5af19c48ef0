"""``load_dataset(name, root)``: every dataset fastcal reads from disk, by name.

``root`` is the folder that holds the datasets (CoOp's ``$DATA``), except for ``imagefolder``, where it
is the image folder itself. Each entry of ``DATASETS`` says which folder under ``root`` it reads.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from fastcal._checks import check_choice
from fastcal.data.coop import SPLIT_FILE_LAYOUTS, load_fgvc_aircraft, load_split_file_dataset
from fastcal.data.folder import load_image_folder
from fastcal.data.imagenet import (
    load_imagenet,
    load_imagenet_a,
    load_imagenet_r,
    load_imagenet_sketch,
    load_imagenet_v2,
)
from fastcal.data.items import DatasetSplits


@dataclass(frozen=True)
class DatasetSpec:
    """A registered dataset: its loader, its paper name and the layout it expects under ``root``."""

    name: str
    title: str
    layout: str
    load: Callable[[Path], DatasetSplits]


def _split_file_spec(name: str, title: str) -> DatasetSpec:
    layout = SPLIT_FILE_LAYOUTS[name]
    images = f"{layout.folder}/{layout.image_dir}/" if layout.image_dir else f"{layout.folder}/"
    return DatasetSpec(
        name, title, f"{images} + {layout.folder}/{layout.split_file}", partial(load_split_file_dataset, name)
    )


DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            "imagenet",
            "ImageNet",
            "imagenet/images/{train,val}/<wnid>/ (CoOp) or ImageNet/{train,val}/<wnid>/ (TPT)",
            load_imagenet,
        ),
        _split_file_spec("caltech101", "Caltech101"),
        _split_file_spec("oxford_pets", "OxfordPets"),
        _split_file_spec("stanford_cars", "StanfordCars"),
        _split_file_spec("oxford_flowers", "Flowers102"),
        _split_file_spec("food101", "Food101"),
        DatasetSpec(
            "fgvc_aircraft",
            "FGVCAircraft",
            "fgvc_aircraft/images/ + variants.txt + images_variant_{train,val,test}.txt",
            load_fgvc_aircraft,
        ),
        _split_file_spec("sun397", "SUN397"),
        _split_file_spec("dtd", "DTD"),
        _split_file_spec("eurosat", "EuroSAT"),
        _split_file_spec("ucf101", "UCF101"),
        DatasetSpec(
            "imagenet_a",
            "ImageNet-A",
            "imagenet-adversarial/imagenet-a/<wnid>/ (CoOp) or imagenet-a/<wnid>/ (TPT)",
            load_imagenet_a,
        ),
        DatasetSpec(
            "imagenet_r",
            "ImageNet-R",
            "imagenet-rendition/imagenet-r/<wnid>/ (CoOp) or imagenet-r/<wnid>/ (TPT)",
            load_imagenet_r,
        ),
        DatasetSpec(
            "imagenet_v2",
            "ImageNetV2",
            "imagenetv2/imagenetv2-matched-frequency-format-val/<0..999>/ (CoOp) or "
            "imagenetv2-matched-frequency-format-val/<0..999>/ (TPT)",
            load_imagenet_v2,
        ),
        DatasetSpec(
            "imagenet_sketch",
            "ImageNet-Sketch",
            "imagenet-sketch/images/<wnid>/ (CoOp) or ImageNet-Sketch/<wnid>/ (TPT)",
            load_imagenet_sketch,
        ),
        DatasetSpec(
            "imagefolder",
            "ImageFolder",
            "<root>/<class>/<images> or <root>/{train,val,test}/<class>/<images>",
            load_image_folder,
        ),
    )
}


def load_dataset(name: str, root: str | os.PathLike) -> DatasetSplits:
    """Load dataset ``name`` (a key of ``DATASETS``) from ``root``.

    Raises ``ValueError`` listing the valid names for an unknown ``name`` and ``FileNotFoundError``
    naming the expected path when a folder or split file is missing.
    """
    check_choice("name", name, DATASETS)
    if not isinstance(root, (str, os.PathLike)):
        raise TypeError(f"root: expected a folder path, got {type(root).__name__}")
    root = Path(root).expanduser().absolute()
    if not root.is_dir():
        raise FileNotFoundError(f"root: expected an existing folder, got {root}")
    return DATASETS[name].load(root)
