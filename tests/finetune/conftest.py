"""Fixtures of the fine-tuning tests: tiny random-init CLIPs and batches (from ``tiny_clip.py``, which
also serves as the per-rank script of the distributed test)."""

import importlib.util
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location(
    "fastcal_tests_tiny_clip", Path(__file__).with_name("tiny_clip.py")
)
tiny = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(tiny)


@pytest.fixture
def tiny_clip():
    """The ``tiny_clip`` helper module (``build_tiny_clip``, ``random_batch``, ``make_method``, ...)."""
    return tiny
