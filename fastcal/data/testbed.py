"""The embedded testbed's data: scikit-learn's handwritten digits as a small real image dataset.

Images: the 1,797 real 8x8 digits of ``sklearn.datasets.load_digits`` (UCI optical recognition of
handwritten digits; grey levels 0..16, ink bright on a dark ground), shipped with scikit-learn, so
nothing is downloaded. Each becomes an RGB PIL image of ``TESTBED_IMAGE_SIZE`` x ``TESTBED_IMAGE_SIZE``
(32 x 32): grey level ``v`` -> ``round(v * 255 / 16)``, bilinear upsampling of the 8 x 8 grid, the grey
copied to the three channels.

Classes "zero".."nine" (label = digit). Base classes 0-4, new classes 5-9: the first and second half,
as ``fastcal.data.protocols.base_new_split`` makes them.

Split: stratified and seeded. Per digit, the image indices are permuted by one
``numpy.random.default_rng(seed)`` stream (digits in order 0..9); the first ``round(0.5 n)`` go to
train, the next ``round(0.1 n)`` to val, the rest to test; each split is then sorted by the original
index. With seed 0 that is 898 / 179 / 720 images (Python rounds halves to even).

Style shift for out-of-distribution evaluation (``shifted``), applied to each image in this order:

1. shear: an affine map with output pixel ``(x, y)`` read from input ``(x + 0.3 * (y - H / 2), y)``
   (bilinear, black fill), slanting the strokes;
2. tint: channels scaled by ``(1.0, 0.85, 0.6)`` and rounded (amber ink instead of white).

The shift is chosen to hurt without erasing the signal: the pretrained testbed CLIP drops from about
85% zero-shot accuracy to about 65% on it. (An inverted contrast, dark ink on a light ground, put every
model at chance, which says nothing about robustness.)
"""

from __future__ import annotations

from functools import cache

import numpy as np
from PIL import Image

from fastcal._checks import check_int
from fastcal.data.items import DatasetSplits, Item, load_image

TESTBED_IMAGE_SIZE = 32
DIGIT_CLASSNAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGIT_TEMPLATES = (
    "a photo of the digit {}.",
    "a handwritten {}.",
    "a drawing of the number {}.",
    "the digit {}, written by hand.",
    "a small picture of a {}.",
)
BASE_CLASSES = (0, 1, 2, 3, 4)
NEW_CLASSES = (5, 6, 7, 8, 9)
SPLIT_FRACTIONS = (0.5, 0.1, 0.4)
SHIFT_SHEAR = 0.3
SHIFT_TINT = (1.0, 0.85, 0.6)


@cache
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    grey = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    grey.setflags(write=False)
    target = bunch.target.astype(np.int64)
    target.setflags(write=False)
    return grey, target


def digit_image(grey: np.ndarray) -> Image.Image:
    """One 8 x 8 uint8 grey digit as a 32 x 32 RGB PIL image (bilinear upsampling)."""
    small = Image.fromarray(np.ascontiguousarray(grey, dtype=np.uint8))
    size = (TESTBED_IMAGE_SIZE, TESTBED_IMAGE_SIZE)
    return small.resize(size, Image.Resampling.BILINEAR).convert("RGB")


def _split_indices(target: np.ndarray, seed: int) -> tuple[list[int], list[int], list[int]]:
    rng = np.random.default_rng(seed)
    train, val, test = [], [], []
    for digit in range(len(DIGIT_CLASSNAMES)):
        indices = rng.permutation(np.flatnonzero(target == digit))
        n_train = round(SPLIT_FRACTIONS[0] * len(indices))
        n_val = round(SPLIT_FRACTIONS[1] * len(indices))
        train.extend(indices[:n_train].tolist())
        val.extend(indices[n_train : n_train + n_val].tolist())
        test.extend(indices[n_train + n_val :].tolist())
    return sorted(train), sorted(val), sorted(test)


def digits_splits(seed: int = 0) -> DatasetSplits:
    """The testbed dataset: in-memory 32 x 32 RGB digit images in a stratified seeded split."""
    check_int("seed", seed, minimum=0)
    grey, target = _digits()
    splits = [
        [(digit_image(grey[i]), int(target[i])) for i in indices] for indices in _split_indices(target, seed)
    ]
    return DatasetSplits("digits", list(DIGIT_CLASSNAMES), list(DIGIT_TEMPLATES), *splits)


def shift_image(image: Image.Image) -> Image.Image:
    """The testbed's style shift of one image: shear, then tint (module docstring)."""
    image = image.convert("RGB")
    height = image.height
    sheared = image.transform(
        image.size,
        Image.Transform.AFFINE,
        (1.0, SHIFT_SHEAR, -SHIFT_SHEAR * height / 2, 0.0, 1.0, 0.0),
        resample=Image.Resampling.BILINEAR,
        fillcolor=(0, 0, 0),
    )
    pixels = np.asarray(sheared, dtype=np.float64) * np.asarray(SHIFT_TINT)
    pixels = np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def shifted(items: list[Item]) -> list[Item]:
    """``items`` with every image style-shifted (``shift_image``); labels unchanged."""
    return [(shift_image(load_image(image)), label) for image, label in items]
