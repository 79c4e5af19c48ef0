"""Image lists: the dataset type every fastcal loader produces, and the train/val/test container.

An *item* is a pair ``(image, label)``: ``image`` is a file path (``str`` or ``os.PathLike``) or an
in-memory ``PIL.Image.Image``, ``label`` an ``int`` in ``[0, len(classnames))``. Loaders return plain
lists of items (cheap to filter, sample and remap, see ``fastcal.data.protocols``);
``ImageListDataset`` turns such a list into a ``torch.utils.data.Dataset``.

Images are decoded with PIL and converted to RGB (``Image.open(path).convert("RGB")``), as CoOp's
Dassl ``read_image`` and torchvision's ``ImageFolder`` do.
"""

from __future__ import annotations

import hashlib
import operator
import os
import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from fastcal._checks import check_choice, fail

ImageSource = str | os.PathLike | Image.Image
Item = tuple[ImageSource, int]

# torchvision's IMG_EXTENSIONS, compared case-insensitively (ImageNet ships .JPEG).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

SPLIT_NAMES = ("train", "val", "test")


@contextmanager
def seeded_generators(seed: int) -> Iterator[None]:
    """Run the body with torch's (CPU), Python's and NumPy's global generators seeded by ``seed`` (NumPy:
    ``seed % 2**32``), in a forked state: the caller's generators are as they were afterwards. Random
    image transforms drawn inside are reproducible whatever ran before them."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            # the CPU generator only: torch.manual_seed would also reseed CUDA's, outside the fork
            torch.random.default_generator.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed % (1 << 32))
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


def missing_path(dataset: str, what: str, path: str | os.PathLike, hint: str) -> FileNotFoundError:
    """The error every loader raises for an absent file or folder, naming the expected path."""
    return FileNotFoundError(f"{dataset}: expected {what} {path}, not found; {hint}")


def list_class_folders(directory: str | os.PathLike) -> list[str]:
    """Names of the non-hidden sub-folders of ``directory``, sorted (ImageFolder's class order)."""
    with os.scandir(directory) as entries:
        return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))


def list_images(directory: str | os.PathLike) -> list[str]:
    """Full paths of the non-hidden image files directly in ``directory`` (by extension), sorted."""
    with os.scandir(directory) as entries:
        names = sorted(
            e.name
            for e in entries
            if not e.name.startswith(".") and e.name.lower().endswith(IMAGE_EXTENSIONS) and e.is_file()
        )
    return [os.path.join(directory, name) for name in names]


def prompt_classname(name: str) -> str:
    """The class name as it goes into a prompt: underscores become spaces (CoOp's ``PromptLearner``),
    runs of white space one space, none at the ends (``"golden_retriever "`` -> ``"golden retriever"``)."""
    return " ".join(name.replace("_", " ").split())


class UnreadableImageError(ValueError):
    """An image file of a dataset that does not open or decode; the message names the file."""


def load_image(image: ImageSource) -> Image.Image:
    """An RGB PIL image from a path or an in-memory image (never modifies the input). A file that does
    not open or decode is an ``UnreadableImageError`` naming it."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    try:
        with Image.open(image) as opened:
            return opened.convert("RGB")
    except (OSError, SyntaxError, ValueError) as e:  # PIL's errors for missing, truncated, garbled files
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        raise UnreadableImageError(
            f"image: expected a readable image file, got {image} ({reason}); remove or replace it"
        ) from None


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """A PIL image as a float32 (C, H, W) tensor in [0, 1] (torchvision's ``to_tensor`` for RGB)."""
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


def _check_items(name: str, items: Any, num_classes: int) -> tuple[list[ImageSource], list[int]]:
    if isinstance(items, (str, bytes)) or not isinstance(items, Sequence):
        raise TypeError(f"{name}: expected a list of (image, label) pairs, got {type(items).__name__}")
    if len(items) == 0:
        raise fail(name, "a non-empty list of (image, label) pairs", "an empty list")
    images: list[ImageSource] = []
    labels: list[int] = []
    for i, item in enumerate(items):
        if not isinstance(item, Sequence) or isinstance(item, (str, bytes)) or len(item) != 2:
            raise fail(f"{name}[{i}]", "an (image, label) pair", repr(item)[:80])
        image, label = item
        if not isinstance(image, (str, os.PathLike, Image.Image)):
            raise fail(f"{name}[{i}]", "an image path or a PIL image", type(image).__name__)
        try:
            label = operator.index(label)
        except TypeError:
            raise fail(f"{name}[{i}]", "an integer label", repr(label)) from None
        if not 0 <= label < num_classes:
            raise fail(f"{name}[{i}]", f"a label in [0, {num_classes})", label)
        images.append(image)
        labels.append(label)
    return images, labels


class ImageListDataset(Dataset):
    """A list of ``(image, label)`` items as a ``torch.utils.data.Dataset`` of ``(image, label)``.

    ``dataset[i]`` loads the image as RGB PIL and returns ``(transform(image), label)``; without a
    transform the image is returned as a float32 (3, H, W) tensor in [0, 1]. (Reproducible augmented
    views, seeded per epoch and index, come from ``fastcal.models.cache.image_features``.)
    """

    def __init__(
        self,
        items: Sequence[Item],
        classnames: Sequence[str],
        transform: Callable[[Image.Image], Any] | None = None,
    ) -> None:
        if isinstance(classnames, str) or not isinstance(classnames, Sequence) or len(classnames) == 0:
            raise fail("classnames", "a non-empty list of class names", repr(classnames)[:80])
        if transform is not None and not callable(transform):
            raise TypeError(f"transform: expected a callable or None, got {type(transform).__name__}")
        self.classnames: list[str] = [str(c) for c in classnames]
        self._images, self.labels = _check_items("items", items, len(self.classnames))
        self.transform = transform

    def __len__(self) -> int:
        return len(self._images)

    @property
    def items(self) -> list[Item]:
        """The ``(image, label)`` pairs this dataset was built from."""
        return list(zip(self._images, self.labels, strict=True))

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = load_image(self._images[index])
        label = self.labels[index]
        if self.transform is None:
            return image_to_tensor(image), label
        return self.transform(image), label

    def fingerprint(self) -> str:
        """SHA-256 hex digest identifying the images and labels, in order.

        A file contributes its path, size and modification time (so an edited or replaced file
        changes the digest); an in-memory image its mode, size and pixels. Labels always count.
        """
        digest = hashlib.sha256(b"fastcal.ImageListDataset/1\n")
        for image, label in zip(self._images, self.labels, strict=True):
            if isinstance(image, Image.Image):
                pixels = image.tobytes()
                digest.update(f"pil\0{image.mode}\0{image.size}\0{len(pixels)}\0".encode())
                digest.update(pixels)
            else:
                path = os.fspath(image)
                try:
                    st = os.stat(path)
                except FileNotFoundError:
                    raise FileNotFoundError(f"items: expected image file {path}, not found") from None
                digest.update(f"file\0{path}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
            digest.update(f"{label}\n".encode())
        return digest.hexdigest()

    def __repr__(self) -> str:
        return f"ImageListDataset({len(self)} images, {len(self.classnames)} classes)"


@dataclass(frozen=True)
class DatasetSplits:
    """A dataset as loaded from disk: class names, prompt templates and the three item lists.

    ``templates[0]`` is the dataset's hand-crafted prompt (CoOp's ``CUSTOM_TEMPLATES``); further
    templates, where there are any, form the prompt ensemble. ``train``, ``val`` and ``test`` are
    lists of ``(image, label)`` items; ``val`` (and, for evaluation-only datasets, ``train``) may be
    empty.
    """

    name: str
    classnames: list[str]
    templates: list[str]
    train: list[Item]
    val: list[Item]
    test: list[Item]

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def items(self, split: str) -> list[Item]:
        """The item list of ``split`` ("train", "val" or "test")."""
        return getattr(self, check_choice("split", split, SPLIT_NAMES))

    def dataset(self, split: str, transform: Callable[[Image.Image], Any] | None = None) -> ImageListDataset:
        """``split`` as an ``ImageListDataset`` with this dataset's class names."""
        items = self.items(split)
        if not items:
            raise fail("split", f"a split with images in {self.name}", f"{split!r}, which is empty")
        return ImageListDataset(items, self.classnames, transform)

    def __repr__(self) -> str:
        sizes = ", ".join(f"{s}={len(getattr(self, s))}" for s in SPLIT_NAMES)
        return f"DatasetSplits({self.name!r}, {self.num_classes} classes, {sizes})"


def existing_dir(dataset: str, candidates: Sequence[tuple[Path, str]], what: str, hint: str) -> Path:
    """The first of ``candidates`` (path, layout name) that is a folder, or an error listing them all."""
    for path, _ in candidates:
        if path.is_dir():
            return path
    if len(candidates) == 1:
        raise missing_path(dataset, what, candidates[0][0], hint)
    tried = ", ".join(f"{path} ({layout})" for path, layout in candidates)
    raise FileNotFoundError(f"{dataset}: expected {what} at one of {tried}; none found; {hint}")
