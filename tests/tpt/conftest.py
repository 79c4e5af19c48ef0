"""A random-init testbed CLIP (32 x 32 images, 64-wide text tower) shared by the TPT tests."""

import open_clip
import pytest
import torch

from fastcal.models.testbed import TESTBED_MODEL, build_testbed_model, register_testbed_config

CLASSNAMES = ["five", "six", "seven", "eight", "nine", "a wolf spider", "golden retriever"]


@pytest.fixture(scope="session")
def tiny_clip():
    """``(model, tokenizer)``: the testbed architecture, randomly initialized (seed 0), frozen."""
    register_testbed_config()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_testbed_model().eval().requires_grad_(False)
    return model, open_clip.get_tokenizer(TESTBED_MODEL)


@pytest.fixture
def classnames():
    return list(CLASSNAMES)
