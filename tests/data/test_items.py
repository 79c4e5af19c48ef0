"""ImageListDataset and DatasetSplits."""

import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

from fastcal.data import DatasetSplits, ImageListDataset


def pil_reference(path):
    """An independent decode: PIL -> RGB -> float (C, H, W) in [0, 1]."""
    array = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)


def test_items_load_as_rgb_tensors(tmp_path, make_image):
    paths = [
        make_image(tmp_path / "a.png", seed=1, size=(7, 5)),
        make_image(tmp_path / "b.jpg", seed=2, size=(3, 6)),
        make_image(tmp_path / "c.png", seed=3, size=(4, 4), mode="L"),
    ]
    dataset = ImageListDataset([(paths[0], 2), (str(paths[1]), 0), (paths[2], 1)], ["x", "y", "z"])
    assert len(dataset) == 3 and dataset.labels == [2, 0, 1]
    assert dataset.classnames == ["x", "y", "z"]
    for i, path in enumerate(paths):
        image, label = dataset[i]
        assert image.dtype == torch.float32 and label == dataset.labels[i]
        torch.testing.assert_close(image.double(), pil_reference(path), rtol=0, atol=1e-6)
    assert dataset[2][0].shape == (3, 4, 4)


def test_in_memory_images_and_transform():
    rng = np.random.default_rng(0)
    grey = Image.fromarray(rng.integers(0, 256, (6, 9), dtype=np.uint8))
    seen = []

    def transform(image):
        seen.append(image.mode)
        return np.asarray(image).shape

    dataset = ImageListDataset([(grey, 0)], ["only"], transform=transform)
    assert dataset[0] == ((6, 9, 3), 0)
    assert seen == ["RGB"] and grey.mode == "L"


def test_invalid_items_are_refused():
    image = Image.new("RGB", (2, 2))
    with pytest.raises(ValueError, match="non-empty"):
        ImageListDataset([], ["a"])
    with pytest.raises(ValueError, match=re.escape(r"items[1]: expected a label in [0, 2), got 2")):
        ImageListDataset([(image, 0), (image, 2)], ["a", "b"])
    with pytest.raises(ValueError, match="integer label"):
        ImageListDataset([(image, 0.5)], ["a"])
    with pytest.raises(ValueError, match="image path or a PIL image"):
        ImageListDataset([(np.zeros((2, 2)), 0)], ["a"])
    with pytest.raises(ValueError, match="classnames"):
        ImageListDataset([(image, 0)], [])
    with pytest.raises(TypeError, match="transform"):
        ImageListDataset([(image, 0)], ["a"], transform=3)


def test_fingerprint_tracks_files_and_labels(tmp_path, make_image):
    a = make_image(tmp_path / "a.png", seed=0)
    b = make_image(tmp_path / "b.png", seed=1)
    items = [(a, 0), (b, 1)]
    base = ImageListDataset(items, ["x", "y"]).fingerprint()
    assert base == ImageListDataset(items, ["x", "y"]).fingerprint()
    assert len(base) == 64
    assert ImageListDataset([(a, 0), (b, 0)], ["x", "y"]).fingerprint() != base
    assert ImageListDataset([(b, 1), (a, 0)], ["x", "y"]).fingerprint() != base
    stat = os.stat(b)
    os.utime(b, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    touched = ImageListDataset(items, ["x", "y"]).fingerprint()
    assert touched != base
    make_image(b, seed=5, size=(9, 9))
    assert ImageListDataset(items, ["x", "y"]).fingerprint() not in (base, touched)
    b.unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(b))):
        ImageListDataset(items, ["x", "y"]).fingerprint()


def test_fingerprint_of_in_memory_pixels():
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    first = ImageListDataset([(Image.fromarray(pixels), 0)], ["a"]).fingerprint()
    assert first == ImageListDataset([(Image.fromarray(pixels.copy()), 0)], ["a"]).fingerprint()
    pixels[2, 3, 1] ^= 1
    assert first != ImageListDataset([(Image.fromarray(pixels), 0)], ["a"]).fingerprint()


def test_dataset_splits_accessors(make_image, tmp_path):
    path = make_image(tmp_path / "a.png")
    splits = DatasetSplits("toy", ["a", "b"], ["a photo of a {}."], [(path, 1)], [], [(path, 0)])
    assert splits.num_classes == 2
    assert splits.items("train") == [(path, 1)]
    dataset = splits.dataset("test")
    assert dataset.labels == [0] and dataset.classnames == ["a", "b"]
    with pytest.raises(ValueError, match="'val', which is empty"):
        splits.dataset("val")
    with pytest.raises(ValueError, match="split"):
        splits.items("validation")
    assert "train=1, val=0, test=1" in repr(splits)


def test_seeded_generators_reproduce_draws_and_restore_the_callers_state():
    import random

    from fastcal.data.items import seeded_generators

    def draw():
        return torch.rand(3).tolist(), random.random(), float(np.random.rand())

    torch.manual_seed(11)
    random.seed(11)
    np.random.seed(11)
    expected_after = draw()
    torch.manual_seed(11)
    random.seed(11)
    np.random.seed(11)
    with seeded_generators(2**40 + 7):  # above NumPy's 32-bit seed range
        inside = draw()
    assert draw() == expected_after  # the caller's three generators continue untouched
    with seeded_generators(2**40 + 7):
        assert draw() == inside
    with seeded_generators(8):
        assert draw() != inside
    torch.manual_seed(2**40 + 7)
    assert torch.rand(3).tolist() == inside[0]
