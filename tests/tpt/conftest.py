"""The TPT tests' CLIP (the root conftest's random-init testbed) and class names."""

import pytest

CLASSNAMES = ["five", "six", "seven", "eight", "nine", "a wolf spider", "golden retriever"]


@pytest.fixture
def tiny_clip(random_testbed):
    return random_testbed


@pytest.fixture
def classnames():
    return list(CLASSNAMES)
