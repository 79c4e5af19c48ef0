"""CoOp's split_zhou datasets and FGVCAircraft, read from tiny fake trees in CoOp's DATASETS.md layout."""

import json
import os

import pytest
from PIL import Image

from fastcal.data import load_dataset
from fastcal.data.coop import SPLIT_FILE_LAYOUTS

# Per dataset: the folder, image folder and split file CoOp's datasets/*.py read (written out here,
# independently of SPLIT_FILE_LAYOUTS), raw class names as they may appear in the split file, the
# names fastcal must report, and the CoOp hand-crafted prompt.
CASES = {
    "caltech101": (
        "caltech-101",
        "101_ObjectCategories",
        "split_zhou_Caltech101.json",
        ["accordion", "airplanes", "Faces", "Leopards"],
        ["accordion", "airplane", "face", "leopard"],
        "a photo of a {}.",
    ),
    "oxford_pets": (
        "oxford_pets",
        "images",
        "split_zhou_OxfordPets.json",
        ["abyssinian", "american_bulldog", "yorkshire_terrier"],
        ["abyssinian", "american bulldog", "yorkshire terrier"],
        "a photo of a {}, a type of pet.",
    ),
    "stanford_cars": (
        "stanford_cars",
        "",
        "split_zhou_StanfordCars.json",
        ["2012 AM General Hummer SUV", "2012 Acura RL Sedan"],
        ["2012 AM General Hummer SUV", "2012 Acura RL Sedan"],
        "a photo of a {}.",
    ),
    "oxford_flowers": (
        "oxford_flowers",
        "jpg",
        "split_zhou_OxfordFlowers.json",
        ["pink primrose", "hard-leaved pocket orchid", "canterbury bells"],
        ["pink primrose", "hard-leaved pocket orchid", "canterbury bells"],
        "a photo of a {}, a type of flower.",
    ),
    "food101": (
        "food-101",
        "images",
        "split_zhou_Food101.json",
        ["apple_pie", "baby_back_ribs", "waffles"],
        ["apple pie", "baby back ribs", "waffles"],
        "a photo of {}, a type of food.",
    ),
    "sun397": (
        "sun397",
        "SUN397",
        "split_zhou_SUN397.json",
        ["abbey", "indoor bistro", "outdoor apartment building"],
        ["abbey", "indoor bistro", "outdoor apartment building"],
        "a photo of a {}.",
    ),
    "dtd": (
        "dtd",
        "images",
        "split_zhou_DescribableTextures.json",
        ["banded", "blotchy", "zigzagged"],
        ["banded", "blotchy", "zigzagged"],
        "{} texture.",
    ),
    "eurosat": (
        "eurosat",
        "2750",
        "split_zhou_EuroSAT.json",
        ["AnnualCrop", "Forest", "Herbaceous Vegetation Land", "SeaLake"],
        ["Annual Crop Land", "Forest", "Herbaceous Vegetation Land", "Sea or Lake"],
        "a centered satellite photo of {}.",
    ),
    "ucf101": (
        "ucf101",
        "UCF-101-midframes",
        "split_zhou_UCF101.json",
        ["Apply_Eye_Makeup", "Archery", "Yo_Yo"],
        ["Apply Eye Makeup", "Archery", "Yo Yo"],
        "a photo of a person doing {}.",
    ),
}
COUNTS = {"train": 3, "val": 1, "test": 2}


def build_split_tree(root, name, make_image):
    folder, image_dir, split_file, raw_names, _, _ = CASES[name]
    image_root = root / folder / image_dir if image_dir else root / folder
    split = {}
    seed = 0
    for part, per_class in COUNTS.items():
        entries = []
        for label, raw in enumerate(raw_names):
            for j in range(per_class):
                prefix = "cars_train" if name == "stanford_cars" else raw.split(" ")[-1]
                rel = f"{prefix}/{part}_{label}_{j}.jpg"
                make_image(image_root / rel, seed=seed)
                seed += 1
                entries.append([rel, label, raw])
        split[part] = entries
    (root / folder / split_file).write_text(json.dumps(split))
    return image_root, split


@pytest.mark.parametrize("name", sorted(CASES))
def test_split_file_dataset_loads(tmp_path, make_image, name):
    image_root, split = build_split_tree(tmp_path, name, make_image)
    data = load_dataset(name, tmp_path)
    _, _, _, raw_names, names, hard_prompt = CASES[name]
    assert data.name == name
    assert data.classnames == names
    assert data.templates[0] == hard_prompt
    for part, per_class in COUNTS.items():
        items = data.items(part)
        assert len(items) == per_class * len(raw_names)
        assert [label for _, label in items] == [entry[1] for entry in split[part]]
        assert [os.path.relpath(path, image_root) for path, _ in items] == [e[0] for e in split[part]]
        assert all(os.path.isfile(path) for path, _ in items)
    image, label = data.dataset("test")[0]
    assert image.shape == (3, 3, 5) and label == 0


def test_layout_table_matches_coop():
    for name, (folder, image_dir, split_file, *_) in CASES.items():
        layout = SPLIT_FILE_LAYOUTS[name]
        assert (layout.folder, layout.image_dir, layout.split_file) == (folder, image_dir, split_file)


def test_missing_split_file_names_the_path(tmp_path):
    (tmp_path / "oxford_pets" / "images").mkdir(parents=True)
    expected = tmp_path / "oxford_pets" / "split_zhou_OxfordPets.json"
    with pytest.raises(FileNotFoundError) as err:
        load_dataset("oxford_pets", tmp_path)
    assert str(expected) in str(err.value)
    assert "DATASETS.md" in str(err.value)


def test_missing_image_folder_names_the_path(tmp_path, make_image):
    build_split_tree(tmp_path, "dtd", make_image)
    (tmp_path / "dtd" / "images").rename(tmp_path / "dtd" / "imgs")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "dtd" / "images")):
        load_dataset("dtd", tmp_path)


def test_missing_listed_image_names_the_path(tmp_path, make_image):
    image_root, split = build_split_tree(tmp_path, "eurosat", make_image)
    first = image_root / split["val"][0][0]
    first.unlink()
    with pytest.raises(FileNotFoundError, match=str(first)):
        load_dataset("eurosat", tmp_path)


def test_inconsistent_class_names_are_refused(tmp_path, make_image):
    _, split = build_split_tree(tmp_path, "food101", make_image)
    split["test"][0][2] = "pancakes"
    (tmp_path / "food-101" / "split_zhou_Food101.json").write_text(json.dumps(split))
    with pytest.raises(ValueError, match="one class name per label"):
        load_dataset("food101", tmp_path)


def test_label_gap_is_refused(tmp_path, make_image):
    _, split = build_split_tree(tmp_path, "ucf101", make_image)
    for part in split.values():
        part[:] = [e for e in part if e[1] != 1]
    (tmp_path / "ucf101" / "split_zhou_UCF101.json").write_text(json.dumps(split))
    with pytest.raises(ValueError, match=r"labels 0\.\.2"):
        load_dataset("ucf101", tmp_path)


def test_malformed_split_file_is_refused(tmp_path, make_image):
    build_split_tree(tmp_path, "sun397", make_image)
    path = tmp_path / "sun397" / "split_zhou_SUN397.json"
    path.write_text(json.dumps({"train": [], "test": []}))
    with pytest.raises(ValueError, match="'train', 'val' and 'test'"):
        load_dataset("sun397", tmp_path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_dataset("sun397", tmp_path)


VARIANTS = ["707-320", "A300B4", "Cessna 172", "F-16A/B"]


def build_fgvc_tree(root, make_image):
    folder = root / "fgvc_aircraft"
    folder.mkdir(parents=True)
    (folder / "variants.txt").write_text("\n".join(VARIANTS) + "\n")
    lists = {}
    image_id = 1000000
    for part, per_class in COUNTS.items():
        lines = []
        for label in (3, 0, 2, 1):
            for _ in range(per_class):
                make_image(folder / "images" / f"{image_id}.jpg", seed=image_id)
                lines.append((str(image_id), label))
                image_id += 1
        (folder / f"images_variant_{part}.txt").write_text(
            "".join(f"{i} {VARIANTS[label]}\n" for i, label in lines)
        )
        lists[part] = lines
    return folder, lists


def test_fgvc_aircraft_reads_its_own_lists(tmp_path, make_image):
    folder, lists = build_fgvc_tree(tmp_path, make_image)
    data = load_dataset("fgvc_aircraft", tmp_path)
    assert data.classnames == VARIANTS
    assert data.templates[0] == "a photo of a {}, a type of aircraft."
    for part, lines in lists.items():
        assert data.items(part) == [(os.path.join(folder, "images", f"{i}.jpg"), label) for i, label in lines]
    assert Image.open(data.test[0][0]).size == (5, 3)


def test_fgvc_missing_list_names_the_path(tmp_path, make_image):
    folder, _ = build_fgvc_tree(tmp_path, make_image)
    (folder / "images_variant_test.txt").unlink()
    with pytest.raises(FileNotFoundError, match=str(folder / "images_variant_test.txt")):
        load_dataset("fgvc_aircraft", tmp_path)
    (folder / "variants.txt").unlink()
    with pytest.raises(FileNotFoundError, match=str(folder / "variants.txt")):
        load_dataset("fgvc_aircraft", tmp_path)


def test_fgvc_unknown_variant_names_file_and_line(tmp_path, make_image):
    folder, _ = build_fgvc_tree(tmp_path, make_image)
    path = folder / "images_variant_val.txt"
    path.write_text(path.read_text() + "1234567 Boeing 999\n")
    with pytest.raises(ValueError, match=r"'Boeing 999' at .*images_variant_val\.txt:5"):
        load_dataset("fgvc_aircraft", tmp_path)
