"""Fixtures for the data tests: tiny images written with PIL into tmp_path."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def write_image(path, seed=0, size=(5, 3), mode="RGB"):
    """Write a small random image (format from the extension); return its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "L": 1}[mode]
    pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels).save(path)
    return path


@pytest.fixture
def make_image():
    return write_image
