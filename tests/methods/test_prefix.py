"""Packed prompts (the shared prefix encoded once) against the prompt learner's own encoding."""

import pytest
import torch

from fastcal.methods.prefix import PackedPrompts, shares_prefix
from fastcal.methods.prompt_learner import PromptLearner
from fastcal.models.text_encoder import TextEncoder

NAMES = ["five", "six", "a wolf spider", "golden retriever", "x" * 40, "american black bear", "nine"]


def learner_for(tiny_clip, names, **kwargs):
    model, tokenizer = tiny_clip[:2]
    return PromptLearner(TextEncoder(model), tokenizer, names, ctx_init="a photo of a", **kwargs)


@pytest.mark.parametrize("samples", [1, 3])
def test_packed_features_and_gradients_equal_the_learner(tiny_clip, samples):
    learner = learner_for(tiny_clip, NAMES)
    packed = PackedPrompts(learner, tiny_clip[0], samples=samples)
    assert packed.token_rows < learner.num_classes * learner.token_ids.shape[1]
    generator = torch.Generator().manual_seed(0)
    ctx = learner.ctx.detach()[None] + 0.2 * torch.randn(samples, *learner.ctx.shape, generator=generator)
    ctx.requires_grad_(True)
    ours, expected = packed(ctx), learner(ctx)
    assert ours.shape == expected.shape == (samples, len(NAMES), expected.shape[-1])
    assert torch.allclose(ours, expected, atol=1e-5, rtol=1e-5)
    weights = torch.randn(expected.shape, generator=generator)
    (grad_ours,) = torch.autograd.grad((ours * weights).sum(), ctx)
    (grad_expected,) = torch.autograd.grad((expected * weights).sum(), ctx)
    assert torch.allclose(grad_ours, grad_expected, atol=1e-4, rtol=1e-4)


def test_many_classes_fill_several_sequences(tiny_clip):
    names = [f"class number {i}" for i in range(40)]
    learner = learner_for(tiny_clip, names)
    packed = PackedPrompts(learner, tiny_clip[0], samples=2)
    assert packed.n_sequences > 1 and packed.length <= 64
    ctx = learner.ctx.detach()[None].repeat(2, 1, 1)
    assert torch.allclose(packed(ctx), learner(ctx), atol=1e-5, rtol=1e-5)


def test_only_layouts_with_a_shared_prefix(tiny_clip):
    assert shares_prefix(learner_for(tiny_clip, NAMES))
    assert not shares_prefix(learner_for(tiny_clip, NAMES, class_token_position="front"))
    assert not shares_prefix(learner_for(tiny_clip, NAMES, class_specific=True))
    with pytest.raises(ValueError, match="learner"):
        PackedPrompts(learner_for(tiny_clip, NAMES, class_token_position="middle"), tiny_clip[0])
    learner = learner_for(tiny_clip, NAMES)
    with pytest.raises(ValueError, match="ctx"):
        PackedPrompts(learner, tiny_clip[0], samples=2)(learner.ctx.detach()[None])
