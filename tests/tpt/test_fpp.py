"""FPP's pretraining: its loss terms against the formula written out, its noise, and the run itself."""

import pytest
import torch

from fastcal.methods.prompt_learner import PromptLearner
from fastcal.models.text_encoder import TextEncoder
from fastcal.tpt.fpp import FPPConfig, flatness_weight, fpp_losses, pretrain_context, prompt_noise


@pytest.fixture
def learner(tiny_clip, classnames):
    model, tokenizer = tiny_clip
    return PromptLearner(TextEncoder(model), tokenizer, classnames, ctx_init="a photo of a")


def test_loss_terms_equal_the_hand_formula():
    generator = torch.Generator().manual_seed(0)
    c, d, j = 7, 13, 4
    t = torch.randn(c, d, generator=generator, dtype=torch.float64) * 3
    t0 = torch.randn(c, d, generator=generator, dtype=torch.float64)
    noisy = t + 0.3 * torch.randn(j, c, d, generator=generator, dtype=torch.float64)
    w = flatness_weight(c)
    align, flat = fpp_losses(t, t0, noisy, w)
    # written out element by element
    align_sum = 0.0
    cos_sum = 0.0
    for ci in range(c):
        u = t[ci] / t[ci].norm()
        u0 = t0[ci] / t0[ci].norm()
        align_sum += float(((u - u0) ** 2).sum())
        for ji in range(j):
            cos_sum += float(u @ noisy[ji, ci] / noisy[ji, ci].norm())
    assert align.item() == pytest.approx(align_sum / (c * d) * d, rel=1e-12)
    assert flat.item() == pytest.approx(-(1 + 15 / c) * cos_sum / (j * c), rel=1e-12)
    # gradients of both terms reach t (autograd vs central finite differences, float64)
    t.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: sum(fpp_losses(x, t0, noisy, w)), (t,))


def test_flatness_weight():
    assert flatness_weight(10) == pytest.approx(2.5)
    assert flatness_weight(200) == pytest.approx(1.075)
    assert flatness_weight(1000, 1.25) == 1.25


def test_noise_has_the_reference_stds_and_is_shared_by_classes(learner):
    noise = prompt_noise(learner, 400, 0.0707105, 0.141421, torch.Generator().manual_seed(1))
    length = learner.token_ids.shape[1]
    assert noise.shape == (400, 1, length, learner.ctx_dim)
    ctx_std = noise[:, :, 1 : 1 + learner.n_ctx].std()
    other = torch.cat([noise[:, :, :1], noise[:, :, 1 + learner.n_ctx :]], dim=2)
    assert float(ctx_std) == pytest.approx(0.0707105, rel=0.02)
    assert float(other.std()) == pytest.approx(0.141421, rel=0.02)


def test_pretraining_lowers_its_loss_and_is_deterministic(learner):
    config = FPPConfig(steps=10, seed=3)
    before = learner.ctx.detach().clone()
    ctx = pretrain_context(learner, config)
    again = pretrain_context(learner, config)
    assert ctx.shape == before.shape and torch.equal(ctx, again)
    assert torch.equal(learner.ctx, before)  # the learner is left as it was

    reference = learner(before)
    noise = prompt_noise(learner, 8, config.ctx_noise, config.token_noise, torch.Generator().manual_seed(4))

    def loss(context):
        with torch.no_grad():
            noisy = (learner.prompt_embeddings(context).unsqueeze(0) + noise).flatten(0, 1)
            features = learner.text_encoder.encode_embeddings(noisy, learner.token_ids.repeat(8, 1))
            align, flat = fpp_losses(
                learner(context), reference, features.view(8, learner.num_classes, -1), 1.0
            )
        return float(align + flat)

    initial = torch.randn(before.shape, generator=torch.Generator().manual_seed(3)) * config.init_std
    assert loss(ctx) < loss(initial) - 0.1


def test_config_validation():
    with pytest.raises(ValueError, match="n_noise"):
        FPPConfig(n_noise=0)
    with pytest.raises(ValueError, match="ctx_noise"):
        FPPConfig(ctx_noise=-1.0)
