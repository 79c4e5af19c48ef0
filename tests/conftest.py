"""Test-wide set-up. Triton must see TRITON_INTERPRET before any kernel module is imported, so it is
set here, at the top of the root conftest, before pytest imports a test module."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic_seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """A private fastcal cache directory for one test."""
    path = tmp_path / "cache"
    monkeypatch.setenv("FASTCAL_CACHE", str(path))
    return path
