"""Tiny open_clip architectures for the backbone tests, registered through open_clip's own config
mechanisms: a ``local-dir:`` folder with ``open_clip_config.json``, or an entry in open_clip's model
config table (patched for one test only)."""

import copy
import json

import open_clip
import pytest

TINY_NAME = "fastcal-test-tiny"

# A CLIP with a 2-layer ViT (32 px, patch 8) and a 2-layer text transformer of width 64 over CLIP's BPE
# vocabulary with 24 positions.
TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def _tiny_cfg(text_overrides):
    cfg = copy.deepcopy(TINY_CFG)
    overrides = dict(text_overrides)
    if overrides.pop("custom_text", False):
        cfg["custom_text"] = True
    cfg["text_cfg"].update(overrides)
    return cfg


@pytest.fixture(scope="session")
def tiny_source(tmp_path_factory):
    """``make(**text_overrides) -> "local-dir:DIR"``: a folder holding only ``open_clip_config.json``
    for ``TINY_CFG`` with text-tower overrides (``custom_text=True`` selects CustomTextCLIP)."""

    def make(**text_overrides):
        folder = tmp_path_factory.mktemp("tiny-clip")
        config = {"model_cfg": _tiny_cfg(text_overrides), "preprocess_cfg": {}}
        (folder / "open_clip_config.json").write_text(json.dumps(config))
        return f"local-dir:{folder}"

    return make


@pytest.fixture
def tiny_name(monkeypatch):
    """``TINY_NAME`` registered as a built-in open_clip architecture for this test."""
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, TINY_NAME, copy.deepcopy(TINY_CFG))
    return TINY_NAME
