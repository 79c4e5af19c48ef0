"""A tiny random-init open_clip CLIP with 32 x 32 transforms and a small synthetic image dataset, so the
training loop runs end to end in about a second."""

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from fastcal.data.items import DatasetSplits
from fastcal.models.clip import LoadedClip

TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 3, "width": 48, "patch_size": 8, "head_width": 24},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 3},
}
CLASSNAMES = ["red fox", "axolotl", "stone bridge", "teapot", "violin", "sea lion", "canoe"]
TEMPLATES = ["a photo of a {}.", "a blurry photo of the {}."]
NORMALIZE = T.Normalize((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def random_images(n, seed):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture
def tiny_clip():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(21)
        model = open_clip.CLIP(**TINY_CFG).eval()
    train = T.Compose([T.RandomResizedCrop(32, scale=(0.5, 1.0)), T.ToTensor(), NORMALIZE])
    evaluate = T.Compose([T.ToTensor(), NORMALIZE])
    return LoadedClip(model, open_clip.get_tokenizer("ViT-B-32"), train, evaluate)


@pytest.fixture(scope="session")
def synthetic_splits():
    """7 classes: 9 train images each (labels interleaved), 3 test images each, no val."""
    n_classes = len(CLASSNAMES)
    train_labels = [c for _ in range(9) for c in range(n_classes)]
    test_labels = [c for _ in range(3) for c in range(n_classes)]
    train = list(zip(random_images(len(train_labels), 1), train_labels, strict=True))
    test = list(zip(random_images(len(test_labels), 2), test_labels, strict=True))
    return DatasetSplits("synthetic", CLASSNAMES, TEMPLATES, train, [], test)
