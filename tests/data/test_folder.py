"""The generic image folder: one folder of class folders, or train/val/test folders of them."""

import re

import pytest

from fastcal.data import load_dataset


def test_single_folder_goes_to_test(tmp_path, make_image):
    for name, count in [("golden_retriever", 2), ("cat", 3), ("Zebra", 1)]:
        for j in range(count):
            make_image(tmp_path / name / f"{j}.png", seed=j)
    (tmp_path / "cat" / ".hidden.png").write_bytes(b"")
    (tmp_path / "cat" / "labels.csv").write_text("x")
    (tmp_path / ".cache").mkdir()
    data = load_dataset("imagefolder", tmp_path)
    # sorted folder names (ImageFolder's order: uppercase before lowercase), underscores as spaces
    assert data.classnames == ["Zebra", "cat", "golden retriever"]
    assert [label for _, label in data.test] == [0, 1, 1, 1, 2, 2]
    assert data.train == [] and data.val == []
    assert data.templates == ["a photo of a {}."]


def test_split_folders_share_one_class_list(tmp_path, make_image):
    make_image(tmp_path / "train" / "b" / "0.jpg")
    make_image(tmp_path / "train" / "c" / "0.jpg")
    make_image(tmp_path / "test" / "a" / "0.jpg")
    make_image(tmp_path / "test" / "c" / "0.jpg")
    make_image(tmp_path / "val" / "c" / "0.jpg")
    data = load_dataset("imagefolder", tmp_path)
    assert data.classnames == ["a", "b", "c"]
    assert [label for _, label in data.train] == [1, 2]
    assert [label for _, label in data.val] == [2]
    assert [label for _, label in data.test] == [0, 2]


def test_empty_folder_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="class folders"):
        load_dataset("imagefolder", tmp_path)
    (tmp_path / "a").mkdir()
    with pytest.raises(FileNotFoundError, match="image files"):
        load_dataset("imagefolder", tmp_path)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nope"))):
        load_dataset("imagefolder", tmp_path / "nope")
