"""The embedded testbed CLIP: an open_clip model, pretrained deterministically, cached and retrained when
the cache is stale or corrupt."""

import dataclasses

import numpy as np
import open_clip
import pytest
import torch
from open_clip.model import CLIP
from open_clip.tokenizer import SimpleTokenizer

from fastcal.data.testbed import DIGIT_CLASSNAMES, digits_splits
from fastcal.models import TextEncoder, load_clip
from fastcal.models import testbed as testbed_module
from fastcal.models.testbed import (
    TESTBED_MODEL,
    PretrainRecipe,
    build_testbed_model,
    cached_testbed_path,
    load_testbed_clip,
    make_testbed_transforms,
    pretrain_testbed,
)

# Two optimizer steps on 4 images per class: seconds, enough to exercise every part of the loop.
SHORT = PretrainRecipe(images_per_class=4, epochs=1, groups_per_step=2, warmup_steps=1)


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


def test_pretraining_is_deterministic_and_leaves_the_global_generator_alone():
    state = torch.get_rng_state()
    first = pretrain_testbed(SHORT, progress=False)
    assert torch.equal(torch.get_rng_state(), state)
    second = pretrain_testbed(SHORT, progress=False)
    assert_same_weights(first, second)
    other = pretrain_testbed(dataclasses.replace(SHORT, seed=1), progress=False)
    assert not torch.equal(first.visual.conv1.weight, other.visual.conv1.weight)
    # training moved the weights away from the seed's initialization
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SHORT.seed)
        init = build_testbed_model()
    assert not torch.equal(init.text_projection, first.text_projection)
    assert not first.training


def test_pretraining_runs_on_one_thread_and_restores_the_callers(monkeypatch):
    """float32 sums split over threads round differently: the weights must not depend on the caller's
    thread count (a 2-thread process pretraining the full recipe made other weights than a 1-thread one)."""
    import fastcal.models.testbed as testbed

    seen = []
    build = testbed.build_testbed_model

    def build_and_record():
        seen.append(torch.get_num_threads())
        return build()

    monkeypatch.setattr(testbed, "build_testbed_model", build_and_record)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        two = pretrain_testbed(SHORT, progress=False)
        assert torch.get_num_threads() == 2
        torch.set_num_threads(1)
        one = pretrain_testbed(SHORT, progress=False)
    finally:
        torch.set_num_threads(threads)
    assert seen == [1, 1]
    assert_same_weights(one, two)


def test_cache_round_trip_and_corruption_retrains(tmp_path, monkeypatch):
    calls = []
    real_pretrain = testbed_module.pretrain_testbed

    def counting_pretrain(recipe, *, progress):
        calls.append(recipe)
        return real_pretrain(recipe, progress=progress)

    monkeypatch.setattr(testbed_module, "pretrain_testbed", counting_pretrain)
    first = load_testbed_clip(cache_dir=tmp_path, recipe=SHORT, progress=False)
    path = cached_testbed_path(cache_dir=tmp_path, recipe=SHORT)
    assert path.is_file() and len(calls) == 1

    rng_state = torch.get_rng_state()
    again = load_testbed_clip(cache_dir=tmp_path, recipe=SHORT, progress=False)
    assert len(calls) == 1
    assert torch.equal(torch.get_rng_state(), rng_state)
    assert_same_weights(first.model, again.model)

    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="stale or corrupt"):
        repaired = load_testbed_clip(cache_dir=tmp_path, recipe=SHORT, progress=False)
    assert len(calls) == 2
    assert_same_weights(first.model, repaired.model)

    changed = dataclasses.replace(SHORT, learning_rate=2e-3)
    assert cached_testbed_path(cache_dir=tmp_path, recipe=changed) != path
    load_testbed_clip(cache_dir=tmp_path, recipe=changed, progress=False)
    assert len(calls) == 3


def test_recipe_rejects_bad_values():
    with pytest.raises(ValueError, match="images_per_class"):
        PretrainRecipe(images_per_class=0)
    with pytest.raises(ValueError, match="crop_scale"):
        PretrainRecipe(crop_scale=(0.9, 0.5))
    with pytest.raises(ValueError, match="caption_templates"):
        PretrainRecipe(caption_templates=("no placeholder",))
    with pytest.raises(ValueError, match="images_per_class: expected at most"):
        pretrain_testbed(PretrainRecipe(images_per_class=500), progress=False)


def test_testbed_is_an_open_clip_clip_with_exact_text_encoding(testbed_clip):
    model, tokenizer = testbed_clip.model, testbed_clip.tokenizer
    assert isinstance(model, CLIP) and not model.training
    assert isinstance(tokenizer, SimpleTokenizer) and tokenizer.context_length == 77
    assert model.context_length == 77 and model.vocab_size == 49408
    assert model.visual.image_size == (32, 32)
    assert TESTBED_MODEL in open_clip.list_models()

    templates = PretrainRecipe().caption_templates
    prompts = [f"{t} and more words" if i % 3 == 0 else t for i, t in enumerate(templates)]
    tokens = tokenizer([p.format(name) for p in prompts for name in DIGIT_CLASSNAMES[:3]])
    with torch.no_grad():
        reference = model.encode_text(tokens)
        ours = TextEncoder(model).encode(tokens)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


def test_weights_file_loads_through_open_clip(testbed_clip, testbed_cache):
    path = cached_testbed_path()
    assert path.is_file() and path.is_relative_to(testbed_cache)
    loaded = load_clip(TESTBED_MODEL, str(path))
    assert_same_weights(loaded.model, testbed_clip.model)
    images = torch.stack([testbed_clip.eval_transform(im) for im, _ in digits_splits().test[:5]])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.encode_image(images), testbed_clip.model.encode_image(images))


def test_transforms_keep_the_digit_upright_and_normalize():
    train, evaluate = make_testbed_transforms()
    image = digits_splits().test[0][0]
    x = evaluate(image)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    raw = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    torch.testing.assert_close(x, (raw - 0.30) / 0.32)
    assert "Flip" not in repr(train)
    assert train(image).shape == (3, 32, 32)
