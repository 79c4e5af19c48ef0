"""The dataset registry and load_dataset's argument checks."""

import pytest

from fastcal.data import DATASETS, HARD_PROMPTS, load_dataset
from fastcal.data.protocols import CROSS_DATASET_TARGETS, DOMAIN_GENERALIZATION_TARGETS

NAMES = {
    "imagenet",
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
    "imagenet_a",
    "imagenet_r",
    "imagenet_v2",
    "imagenet_sketch",
    "imagefolder",
}


def test_registry_lists_the_contracted_names():
    assert set(DATASETS) == NAMES
    assert set(HARD_PROMPTS) == NAMES
    for name, spec in DATASETS.items():
        assert spec.name == name and spec.layout and callable(spec.load)
    assert set(CROSS_DATASET_TARGETS) | set(DOMAIN_GENERALIZATION_TARGETS) <= NAMES


def test_unknown_name_lists_the_valid_names(tmp_path):
    with pytest.raises(ValueError) as err:
        load_dataset("imagenet-1k", tmp_path)
    message = str(err.value)
    assert "'imagenet-1k'" in message
    assert all(repr(name) in message for name in NAMES)


def test_missing_root_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="root: expected an existing folder"):
        load_dataset("dtd", tmp_path / "missing")
    with pytest.raises(TypeError, match="root"):
        load_dataset("dtd", None)
