"""Shared fixtures of the outlier tests: a tiny fake WordNet (Debian's layout and the nltk_data tree
built from it), a random-init testbed CLIP, and nltk's search path restored after every test."""

import importlib.util
from pathlib import Path

import nltk.data
import open_clip
import pytest
import torch

from fastcal.models.testbed import TESTBED_MODEL, build_testbed_model, register_testbed_config


def _load_fake_wordnet():
    spec = importlib.util.spec_from_file_location("fake_wordnet", Path(__file__).with_name("fake_wordnet.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_FAKE_WORDNET = _load_fake_wordnet()


@pytest.fixture(scope="session")
def fake_wordnet():
    """The ``fake_wordnet`` helper module (its synsets, expected terms and writer)."""
    return _FAKE_WORDNET


@pytest.fixture(autouse=True)
def _nltk_path(monkeypatch):
    """fastcal appends the folders it is given to ``nltk.data.path``; undo that after each test."""
    monkeypatch.setattr(nltk.data, "path", list(nltk.data.path))


@pytest.fixture
def fake_debian(tmp_path):
    """A folder laid out like Debian's /usr/share/wordnet, with the fake database."""
    return _FAKE_WORDNET.write_fake_wordnet(tmp_path / "usr-share-wordnet")


@pytest.fixture
def fake_nltk_data(tmp_path, fake_debian):
    """An nltk_data folder holding the fake database as ``corpora/wordnet``."""
    from fastcal.outliers.wordnet import build_nltk_data

    target = tmp_path / "nltk_data"
    build_nltk_data(target, source=fake_debian)
    return target


@pytest.fixture(scope="session")
def tiny_clip():
    """``(model, tokenizer)``: the testbed architecture, randomly initialized (seed 0), frozen."""
    register_testbed_config()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_testbed_model().eval().requires_grad_(False)
    return model, open_clip.get_tokenizer(TESTBED_MODEL)
