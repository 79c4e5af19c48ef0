"""The ten fine-grained datasets in the layout of CoOp's DATASETS.md (KaiyangZhou/CoOp).

Nine of them come with CoOp's fixed split file ``split_zhou_<Name>.json``::

    {"train": [[relative_path, label, classname], ...], "val": [...], "test": [...]}

where ``relative_path`` is relative to the dataset's image folder (for StanfordCars: to the dataset
folder itself, since its images sit in ``cars_train/`` and ``cars_test/``). Folders and split files,
as CoOp's ``datasets/*.py`` read them (``$DATA`` is the ``root`` passed to ``load_dataset``):

=============== ======================================= =========================================
fastcal name    images                                  split file
=============== ======================================= =========================================
caltech101      caltech-101/101_ObjectCategories/       caltech-101/split_zhou_Caltech101.json
oxford_pets     oxford_pets/images/                     oxford_pets/split_zhou_OxfordPets.json
stanford_cars   stanford_cars/                          stanford_cars/split_zhou_StanfordCars.json
oxford_flowers  oxford_flowers/jpg/                     oxford_flowers/split_zhou_OxfordFlowers.json
food101         food-101/images/                        food-101/split_zhou_Food101.json
sun397          sun397/SUN397/                          sun397/split_zhou_SUN397.json
dtd             dtd/images/                             dtd/split_zhou_DescribableTextures.json
eurosat         eurosat/2750/                           eurosat/split_zhou_EuroSAT.json
ucf101          ucf101/UCF-101-midframes/               ucf101/split_zhou_UCF101.json
=============== ======================================= =========================================

FGVCAircraft has no split_zhou file; CoOp reads the dataset's own lists (``fgvc_aircraft/`` is the
archive's ``data/`` folder): ``variants.txt`` (one class name per line, the label is the line
number) and ``images_variant_{train,val,test}.txt`` (lines ``<image id> <variant name>``, image at
``images/<image id>.jpg``).

Class names are the ones stored in the split files, which CoOp wrote after its renames; the renames
are applied again here so that a split file holding the original folder names gives the same names
(EuroSAT ``NEW_CNAMES``: "AnnualCrop" -> "Annual Crop Land", ...; Caltech101 ``NEW_CNAMES``:
"airplanes" -> "airplane", "Faces" -> "face", "Leopards" -> "leopard", "Motorbikes" -> "motorbike").
Underscores become spaces, as CoOp's prompt learner does before building prompts
("american_bulldog" -> "american bulldog", "Apply_Eye_Makeup" -> "Apply Eye Makeup").
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from fastcal.data.items import DatasetSplits, Item, missing_path, prompt_classname
from fastcal.data.templates import dataset_templates

HINT = "see CoOp's DATASETS.md (github.com/KaiyangZhou/CoOp)"

EUROSAT_RENAMES = {
    "AnnualCrop": "Annual Crop Land",
    "Forest": "Forest",
    "HerbaceousVegetation": "Herbaceous Vegetation Land",
    "Highway": "Highway or Road",
    "Industrial": "Industrial Buildings",
    "Pasture": "Pasture Land",
    "PermanentCrop": "Permanent Crop Land",
    "Residential": "Residential Buildings",
    "River": "River",
    "SeaLake": "Sea or Lake",
}

CALTECH101_RENAMES = {
    "airplanes": "airplane",
    "Faces": "face",
    "Leopards": "leopard",
    "Motorbikes": "motorbike",
}


@dataclass(frozen=True)
class SplitFileLayout:
    """Where one split_zhou dataset lives under ``root`` and how its class names are rewritten."""

    folder: str
    image_dir: str
    split_file: str
    renames: dict[str, str] = field(default_factory=dict)


SPLIT_FILE_LAYOUTS: dict[str, SplitFileLayout] = {
    "caltech101": SplitFileLayout(
        "caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json", CALTECH101_RENAMES
    ),
    "oxford_pets": SplitFileLayout("oxford_pets", "images", "split_zhou_OxfordPets.json"),
    "stanford_cars": SplitFileLayout("stanford_cars", "", "split_zhou_StanfordCars.json"),
    "oxford_flowers": SplitFileLayout("oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json"),
    "food101": SplitFileLayout("food-101", "images", "split_zhou_Food101.json"),
    "sun397": SplitFileLayout("sun397", "SUN397", "split_zhou_SUN397.json"),
    "dtd": SplitFileLayout("dtd", "images", "split_zhou_DescribableTextures.json"),
    "eurosat": SplitFileLayout("eurosat", "2750", "split_zhou_EuroSAT.json", EUROSAT_RENAMES),
    "ucf101": SplitFileLayout("ucf101", "UCF-101-midframes", "split_zhou_UCF101.json"),
}

FGVC_AIRCRAFT_FOLDER = "fgvc_aircraft"


def _class_table(
    name: str, source: Path, labelled_names: dict[int, str], renames: dict[str, str]
) -> list[str]:
    if not labelled_names:
        raise ValueError(f"{name}: expected images listed in {source}, got an empty split file")
    count = max(labelled_names) + 1
    if min(labelled_names) < 0:
        raise ValueError(f"{name}: expected labels >= 0 in {source}, got {min(labelled_names)}")
    absent = [label for label in range(count) if label not in labelled_names]
    if absent:
        raise ValueError(f"{name}: expected labels 0..{count - 1} in {source}, got none for {absent[:5]}")
    return [prompt_classname(renames.get(labelled_names[i], labelled_names[i])) for i in range(count)]


def _check_first_image(name: str, items: list[Item], source: Path) -> None:
    """A wrong image folder shows at the first item; checking every file would stat the whole set."""
    if items and not os.path.isfile(items[0][0]):
        raise missing_path(name, f"image (listed in {source.name})", items[0][0], HINT)


def load_split_file_dataset(name: str, root: str | os.PathLike) -> DatasetSplits:
    """One of CoOp's split_zhou datasets (``name`` a key of ``SPLIT_FILE_LAYOUTS``) under ``root``."""
    layout = SPLIT_FILE_LAYOUTS[name]
    folder = Path(root) / layout.folder
    split_path = folder / layout.split_file
    image_dir = folder / layout.image_dir if layout.image_dir else folder
    if not split_path.is_file():
        raise missing_path(name, "split file", split_path, HINT)
    if not image_dir.is_dir():
        raise missing_path(name, "image folder", image_dir, HINT)
    try:
        split = json.loads(split_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{name}: expected a JSON split file, {split_path} is not valid JSON ({err})"
        ) from None
    if not isinstance(split, dict) or not all(
        isinstance(split.get(s), list) for s in ("train", "val", "test")
    ):
        raise ValueError(f"{name}: expected {split_path} to hold lists 'train', 'val' and 'test'")

    labelled_names: dict[int, str] = {}
    splits: dict[str, list[Item]] = {}
    for part in ("train", "val", "test"):
        items: list[Item] = []
        for i, entry in enumerate(split[part]):
            if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str)):
                raise ValueError(
                    f"{name}: expected [path, label, classname] entries in {split_path}, "
                    f"got {entry!r} at {part}[{i}]"
                )
            relpath, label, classname = entry[0], int(entry[1]), str(entry[2])
            known = labelled_names.setdefault(label, classname)
            if known != classname:
                raise ValueError(
                    f"{name}: expected one class name per label in {split_path}, "
                    f"got {known!r} and {classname!r} for label {label}"
                )
            items.append((os.path.join(image_dir, relpath), label))
        _check_first_image(name, items, split_path)
        splits[part] = items
    classnames = _class_table(name, split_path, labelled_names, layout.renames)
    return DatasetSplits(name, classnames, dataset_templates(name), **splits)


def load_fgvc_aircraft(root: str | os.PathLike) -> DatasetSplits:
    """FGVCAircraft (100 variants) from the archive's own lists, as CoOp reads it."""
    name = "fgvc_aircraft"
    folder = Path(root) / FGVC_AIRCRAFT_FOLDER
    variants_path = folder / "variants.txt"
    if not variants_path.is_file():
        raise missing_path(name, "class list", variants_path, HINT)
    variants = [line.strip() for line in variants_path.read_text().splitlines() if line.strip()]
    label_of = {variant: label for label, variant in enumerate(variants)}
    image_dir = folder / "images"
    if not image_dir.is_dir():
        raise missing_path(name, "image folder", image_dir, HINT)

    splits: dict[str, list[Item]] = {}
    for part in ("train", "val", "test"):
        list_path = folder / f"images_variant_{part}.txt"
        if not list_path.is_file():
            raise missing_path(name, "split file", list_path, HINT)
        items: list[Item] = []
        for line_no, line in enumerate(list_path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            image_id, _, variant = line.strip().partition(" ")
            if variant not in label_of:
                raise ValueError(
                    f"{name}: expected a variant listed in {variants_path}, "
                    f"got {variant!r} at {list_path}:{line_no}"
                )
            items.append((os.path.join(image_dir, image_id + ".jpg"), label_of[variant]))
        _check_first_image(name, items, list_path)
        splits[part] = items
    classnames = [prompt_classname(v) for v in variants]
    return DatasetSplits(name, classnames, dataset_templates(name), **splits)
