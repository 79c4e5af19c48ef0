"""Test-wide set-up. Triton must see TRITON_INTERPRET before any kernel module is imported, so it is
set here, at the top of the root conftest, before pytest imports a test module."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest
import torch

from fastcal._io import default_cache_dir


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


# The user's fastcal cache as the session starts (before any test points $FASTCAL_CACHE elsewhere).
_USER_TESTBED_CACHE = default_cache_dir() / "testbed"


@pytest.fixture(scope="session")
def testbed_clip():
    """The pretrained testbed CLIP (``fastcal.models.testbed.load_testbed_clip``), shared by the session.

    Read from the user's cache (``$FASTCAL_CACHE`` or ``~/.cache/fastcal``, as the session started), so
    the full pretraining (about 10 s of CPU time) runs once per machine, not once per test run.
    Treat it as read-only: deep-copy the model before changing it.
    """
    from fastcal.models.testbed import load_testbed_clip

    return load_testbed_clip(cache_dir=_USER_TESTBED_CACHE, progress=False)


def link_testbed_weights(cache_dir):
    """Make ``cache_dir`` hold the session's testbed weights (a link to the user's cache)."""
    from fastcal.models.testbed import cached_testbed_path

    target = cached_testbed_path(cache_dir=cache_dir / "testbed")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.symlink_to(cached_testbed_path(cache_dir=_USER_TESTBED_CACHE))
    return cache_dir


@pytest.fixture
def testbed_cache(testbed_clip, cache_dir):
    """A private cache (the ``cache_dir`` fixture) that holds the session's testbed weights (a link), so
    commands loading the testbed from ``$FASTCAL_CACHE`` find it without pretraining again."""
    return link_testbed_weights(cache_dir)


@pytest.fixture(scope="module")
def module_testbed_cache(testbed_clip, tmp_path_factory):
    """A cache shared by one module's tests, holding the testbed weights (a link): image features are
    computed once for all of them."""
    return link_testbed_weights(tmp_path_factory.mktemp("module-cache"))


@pytest.fixture(scope="session")
def random_testbed():
    """``(model, tokenizer)``: the testbed architecture, randomly initialized (seed 0), frozen."""
    import open_clip

    from fastcal.models.testbed import TESTBED_MODEL, build_testbed_model, register_testbed_config

    register_testbed_config()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_testbed_model().eval().requires_grad_(False)
    return model, open_clip.get_tokenizer(TESTBED_MODEL)


def _reference_text(model, embeddings, token_ids, deep_prompts=None, injected=None):
    """CLIP's text forward at full length, layer by layer (MaPLe's deep prompts replace positions 1..n
    before layers 1..len(deep_prompts); TCP's ``injected = (k, tokens (N, n, W))`` replaces them, per
    row, before layer k)."""
    x = embeddings + model.positional_embedding
    n = 0 if not deep_prompts else deep_prompts[0].shape[0]
    for k, block in enumerate(model.transformer.resblocks):
        if deep_prompts and 1 <= k <= len(deep_prompts):
            prompt = deep_prompts[k - 1].unsqueeze(0).expand(x.shape[0], -1, -1)
            x = torch.cat([x[:, :1], prompt, x[:, 1 + n :]], dim=1)
        if injected is not None and k == injected[0]:
            tokens = injected[1]
            x = torch.cat([x[:, :1], tokens, x[:, 1 + tokens.shape[1] :]], dim=1)
        x = block(x, attn_mask=model.attn_mask)
    x = model.ln_final(x)
    return x[torch.arange(x.shape[0]), token_ids.argmax(dim=-1)] @ model.text_projection


@pytest.fixture(scope="session")
def reference_text():
    """CLIP's text forward at full length from open_clip's modules, independent of fastcal's
    TextEncoder: ``reference_text(model, embeddings, token_ids, deep_prompts=None, injected=None)``."""
    return _reference_text


def _test_module(filename: str):
    """``tests/<filename>`` imported as a module (a helper file, not a test file)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        f"fastcal_tests_{Path(filename).stem}", Path(__file__).with_name(filename)
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def hf_tiny():
    """The ``tests/hf_tiny.py`` helpers (tiny random-init Hugging Face CLIP / SigLIP, a CLIP tokenizer);
    skips the test when ``transformers`` (the ``hf`` extra) is not installed."""
    pytest.importorskip("transformers")
    return _test_module("hf_tiny.py")


@pytest.fixture(scope="session")
def fake_cuda():
    """The fake-CUDA tracing helpers (``tests/fake_cuda.py``: ``new_mode``, ``to_fake_cuda``, ``trace``);
    skips on a CPU-only build of torch, where a fake CUDA device aborts the process."""
    if not torch.backends.cuda.is_built():
        pytest.skip("fake CUDA tensors need a CUDA build of torch (this one is CPU-only)")
    return _test_module("fake_cuda.py")
