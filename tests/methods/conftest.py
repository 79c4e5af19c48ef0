"""A tiny random-init open_clip CLIP (3-layer ViT and text towers, CLIP's BPE with 77 positions) and
full-length reference prompts (the reference text forward is the root conftest's ``reference_text``)."""

import copy

import open_clip
import pytest
import torch

from fastcal.methods.objectives import RegularizerSetup
from fastcal.models.clip import LoadedClip

TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 3, "width": 48, "patch_size": 8, "head_width": 24},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 3},
}


@pytest.fixture(scope="module")
def tiny_clip():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        model = open_clip.CLIP(**TINY_CFG).eval()
    return LoadedClip(model, open_clip.get_tokenizer("ViT-B-32"), None, None)


@pytest.fixture
def fresh_clip():
    """A tiny CLIP that a test may freeze and train (not shared)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(12)
        model = open_clip.CLIP(**TINY_CFG).eval()
    return LoadedClip(model, open_clip.get_tokenizer("ViT-B-32"), None, None)


def _reference_prompts(model, tokenizer, classnames, ctx):
    """Full-length (77) prompt embeddings of "X .. X name." with the X positions replaced by ``ctx``
    ((n, W) shared, or (C, n, W) per class), built row by row."""
    n = ctx.shape[-2]
    ids = tokenizer([" ".join(["X"] * n) + f" {name}." for name in classnames])
    rows = []
    for c in range(len(classnames)):
        row = model.token_embedding(ids[c])
        context = ctx if ctx.ndim == 2 else ctx[c]
        rows.append(torch.cat([row[:1], context, row[1 + n :]]))
    return torch.stack(rows), ids


@pytest.fixture(scope="session")
def reference_prompts():
    return _reference_prompts


@pytest.fixture(scope="module")
def double_clip(tiny_clip):
    """The tiny CLIP in float64 (its own copy), for one-step restatements of the methods' reference code."""
    model = copy.deepcopy(tiny_clip.model).double().requires_grad_(False)
    return LoadedClip(model, tiny_clip.tokenizer, None, None)


def _run_setup(method, clip, classnames, config, templates=("a photo of a {}.",), name="test"):
    """The ``RegularizerSetup`` a training run would give a method's regularizers and hooks."""
    return RegularizerSetup(
        name=name,
        method_name=type(method).__name__.lower(),
        method=method,
        model=clip.model,
        model_key="test",
        tokenizer=clip.tokenizer,
        classnames=list(classnames),
        templates=list(templates),
        frozen_text_features=None,
        options={},
        config=dict(config),
        seed=0,
        device=torch.device("cpu"),
    )


@pytest.fixture(scope="session")
def run_setup():
    return _run_setup
