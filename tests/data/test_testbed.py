"""The digits testbed: images, split, classes and the style shift."""

from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.datasets import load_digits

from fastcal.data import ImageListDataset
from fastcal.data.protocols import base_new_split
from fastcal.data.testbed import (
    BASE_CLASSES,
    NEW_CLASSES,
    SHIFT_SHEAR,
    SHIFT_TINT,
    TESTBED_IMAGE_SIZE,
    digits_splits,
    shift_image,
    shifted,
)


@pytest.fixture(scope="module")
def splits():
    return digits_splits(seed=0)


def test_split_is_stratified_and_complete(splits):
    target = load_digits().target
    per_class = Counter(target.tolist())
    sizes = [len(splits.train), len(splits.val), len(splits.test)]
    assert sum(sizes) == 1797 and sizes == [898, 179, 720]
    for part, fraction in (("train", 0.5), ("val", 0.1)):
        counts = Counter(label for _, label in splits.items(part))
        assert counts == {c: round(fraction * n) for c, n in per_class.items()}
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    assert splits.classnames == names
    assert splits.templates[0] == "a photo of the digit {}."
    assert all(t.count("{}") == 1 for t in splits.templates) and len(splits.templates) >= 3


def test_images_are_upsampled_digits(splits):
    bunch = load_digits()
    # Each image must be one of the sklearn digits, bilinearly upsampled (torch, half-pixel centres).
    grey = torch.from_numpy(np.rint(bunch.images * 255 / 16)).float()[:, None]
    reference = F.interpolate(grey, size=(TESTBED_IMAGE_SIZE,) * 2, mode="bilinear", align_corners=False)
    reference = reference[:, 0]
    matched = []
    for image, label in splits.test[:25]:
        assert image.size == (TESTBED_IMAGE_SIZE, TESTBED_IMAGE_SIZE) and image.mode == "RGB"
        pixels = torch.from_numpy(np.array(image)).float()
        assert torch.equal(pixels[..., 0], pixels[..., 1]) and torch.equal(pixels[..., 0], pixels[..., 2])
        error = (reference - pixels[..., 0]).abs().amax(dim=(1, 2))
        index = int(error.argmin())
        assert float(error[index]) <= 1.0 and bunch.target[index] == label
        matched.append(index)
    assert len(set(matched)) == len(matched)


def test_same_seed_same_data_other_seed_other_split(splits):
    again = digits_splits(seed=0)
    for part in ("train", "val", "test"):
        a = ImageListDataset(splits.items(part), splits.classnames).fingerprint()
        assert a == ImageListDataset(again.items(part), again.classnames).fingerprint()
    other = digits_splits(seed=1)
    assert (
        ImageListDataset(other.test, other.classnames).fingerprint()
        != ImageListDataset(splits.test, splits.classnames).fingerprint()
    )


def test_base_and_new_classes_are_the_protocol_halves(splits):
    base, new = base_new_split(splits)
    assert base.classes == BASE_CLASSES and new.classes == NEW_CLASSES
    assert base.splits.classnames == ["zero", "one", "two", "three", "four"]


def test_shift_tints_and_shears():
    size = TESTBED_IMAGE_SIZE
    # A uniform grey image: away from the sheared-in border it becomes round(v * tint).
    flat = shift_image(Image.new("RGB", (size, size), (140, 140, 140)))
    centre = np.asarray(flat)[size // 2, size // 2]
    assert centre.tolist() == [round(140 * t) for t in SHIFT_TINT]
    # A bright vertical line at column x0 is read from x + shear * (y - H/2): it moves by -shear * dy.
    line = np.zeros((size, size, 3), dtype=np.uint8)
    line[:, 16] = 255
    out = np.asarray(shift_image(Image.fromarray(line)))[..., 0].astype(float)
    brightest = out.argmax(axis=1)
    for y in (4, 16, 28):
        assert abs(brightest[y] - (16 - SHIFT_SHEAR * (y + 0.5 - size / 2))) <= 1.0
    assert out.max() > 200 and out.min() == 0


def test_shifted_items_keep_labels_and_are_deterministic(splits, tmp_path):
    items = splits.test[:6]
    first, second = shifted(items), shifted(items)
    assert [label for _, label in first] == [label for _, label in items]
    for (a, _), (b, _), (orig, _) in zip(first, second, items, strict=True):
        assert a.size == orig.size and np.array_equal(np.asarray(a), np.asarray(b))
        assert not np.array_equal(np.asarray(a), np.asarray(orig))
    path = tmp_path / "digit.png"
    items[0][0].save(path)
    from_file = shifted([(path, 3)])
    assert np.array_equal(np.asarray(from_file[0][0]), np.asarray(first[0][0])) and from_file[0][1] == 3
