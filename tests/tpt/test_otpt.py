"""O-TPT: the orthogonality penalty against the reference's Householder construction written out (float64,
values and gradients), the tuning step against a one-sample restatement of its public code, and its
recipe against the cited scripts."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastcal import registry
from fastcal.losses import orthogonality_penalty
from fastcal.methods.prompt_learner import PromptLearner
from fastcal.models.text_encoder import TextEncoder
from fastcal.runs.tpt import TptConfig
from fastcal.tpt.step import TestTimeStep, TuningConfig

N_VIEWS = 20


def householder_penalty(text):
    """O-TPT's otpt_classification.py as its code computes it, for normalized (C, D) features: the Gram
    matrix, one Householder reflection per row built from the row minus its norm on the diagonal (a
    C x C x C stack), the reflected rows minus the identity, and the mean of their norms."""
    gram = text @ text.T
    c = gram.shape[0]
    identity = torch.eye(c, dtype=text.dtype)
    norms = gram.norm(dim=0)
    u = gram - norms[:, None] * identity
    v = u / u.norm(dim=1, keepdim=True)
    reflections = identity[None] - 2 * v[:, :, None] * v[:, None, :]
    reflected = torch.bmm(reflections, gram[:, :, None]).squeeze(-1)
    return (reflected - identity).norm(dim=1).mean()


@pytest.mark.parametrize(("c", "d"), [(5, 8), (47, 16)], ids=["gram-of-classes", "gram-of-dimensions"])
def test_penalty_equals_the_householder_construction(c, d):
    generator = torch.Generator().manual_seed(c)
    raw = torch.randn(c, d, generator=generator, dtype=torch.float64) + 0.7  # correlated, like CLIP's
    ours = raw.clone().requires_grad_()
    theirs = raw.clone().requires_grad_()
    value = orthogonality_penalty(ours)
    expected = householder_penalty(F.normalize(theirs, dim=-1))
    torch.testing.assert_close(value, expected, rtol=1e-12, atol=1e-12)
    weights = torch.randn((), generator=generator, dtype=torch.float64)
    (weights * value).backward()
    (weights * expected).backward()
    torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-10, atol=1e-12)
    assert value > 0


def test_penalty_gradcheck_batched_and_reductions():
    generator = torch.Generator().manual_seed(3)
    text = torch.randn(3, 7, 5, generator=generator, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: orthogonality_penalty(t, reduction="none"), (text,))
    per_sample = torch.stack([orthogonality_penalty(t) for t in text.detach()])
    torch.testing.assert_close(orthogonality_penalty(text.detach(), reduction="none"), per_sample)
    torch.testing.assert_close(orthogonality_penalty(text.detach(), reduction="sum"), per_sample.sum())
    torch.testing.assert_close(orthogonality_penalty(text.detach()), per_sample.mean())
    orthonormal = torch.eye(4, 6, dtype=torch.float64)
    assert float(orthogonality_penalty(orthonormal)) == pytest.approx(0.0, abs=1e-15)
    with pytest.raises(ValueError, match="text_features"):
        orthogonality_penalty(torch.zeros(3, 4))


def reference_otpt(learner, logit_scale, features, config):
    """One sample of O-TPT's test_time_tuning then the final inference, written as its code runs it:
    confident views by entropy, marginal entropy plus lambda times the Householder penalty, one AdamW step
    on a fresh context."""
    ctx = nn.Parameter(learner.ctx.detach().clone())
    optimizer = torch.optim.AdamW([ctx], lr=config.lr, weight_decay=config.weight_decay)
    scale = logit_scale.exp()
    text = F.normalize(learner(ctx), dim=-1)
    logits = scale * features @ text.T
    entropy = -(logits.softmax(1) * logits.log_softmax(1)).sum(1)
    selected = torch.argsort(entropy)[: int(logits.shape[0] * config.selection)]
    log_p = logits[selected].log_softmax(dim=-1)
    mean_log_p = log_p.logsumexp(dim=0) - math.log(log_p.shape[0])
    loss = -(mean_log_p * mean_log_p.exp()).sum() + config.orthogonality_weight * householder_penalty(text)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        return loss.detach(), ctx.detach(), scale * features[:1] @ F.normalize(learner(ctx), dim=-1).T


def test_step_equals_a_one_sample_restatement(tiny_clip, classnames):
    model, tokenizer = tiny_clip
    learner = PromptLearner(TextEncoder(model), tokenizer, classnames, ctx_init="a photo of a")
    config = TuningConfig(n_views=N_VIEWS, orthogonality_weight=18.0)
    dim = learner().shape[-1]
    step = TestTimeStep(learner, learner.ctx.detach(), model.logit_scale, dim, config=config)
    generator = torch.Generator().manual_seed(5)
    views = F.normalize(
        torch.randn(1, 1, dim, generator=generator) + torch.randn(1, N_VIEWS, dim, generator=generator),
        dim=-1,
    )
    tuned_logits = step(views)
    loss, ctx, expected_logits = reference_otpt(learner, model.logit_scale, views[0], config)
    torch.testing.assert_close(step.loss[0], loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(step.ctx[0].detach(), ctx, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(tuned_logits, expected_logits, rtol=1e-5, atol=1e-5)
    without = TestTimeStep(
        learner, learner.ctx.detach(), model.logit_scale, dim, config=TuningConfig(n_views=N_VIEWS)
    )
    without(views)
    assert not torch.allclose(without.ctx, step.ctx)  # the penalty moved the context


def test_recipe_follows_the_scripts():
    spec = registry.get("tpt_method", "otpt")
    assert spec.weights == ("orthogonality_weight",) and "test_tpt_otpt_fg.sh" in spec.source
    fine = TptConfig(method="otpt", dataset="dtd", root="r").resolved()
    assert (fine.orthogonality_weight, fine.augmix, fine.dispersion_weight) == (18.0, True, None)
    imagenet = TptConfig(method="otpt", dataset="imagenet", root="r").resolved()
    assert (imagenet.orthogonality_weight, imagenet.augmix) == (18.0, False)
    shifted = TptConfig(method="otpt", dataset="imagenet_r", root="r").resolved()
    assert (shifted.orthogonality_weight, shifted.augmix) == (2.0, True)
    assert shifted.tuning() == TuningConfig(orthogonality_weight=2.0)
    with pytest.raises(ValueError, match="orthogonality_weight: expected a weight only for otpt"):
        TptConfig(method="ctpt", orthogonality_weight=3.0)
    with pytest.raises(ValueError, match="dispersion_weight: expected a weight only for ctpt"):
        TptConfig(method="otpt", dispersion_weight=3.0)
