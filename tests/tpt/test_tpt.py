"""``TPT`` from a user's code: ``tune`` over ready-made views (selected views, loss, tuned context,
logits, against a plain one-sample TPT written as the reference runs it), ``predict`` from images or
views, ``reset``, and a model left as it was."""

import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from fastcal.tpt import TPT, TuningConfig, ctpt_config, sample_generator

N_VIEWS = 16  # k = int(16 * 0.1) = 1 selected view


def reference(tpt, features, config):
    """One sample of azshue/TPT's ``test_time_tuning`` (C-TPT's term when lambda > 0) on normalized view
    features ``(V, D)``: (selected views, loss of the step, tuned context, view-0 logits)."""
    learner = tpt.learner
    ctx = nn.Parameter(tpt.hard_ctx.clone())
    optimizer = torch.optim.AdamW([ctx], lr=config.lr, weight_decay=config.weight_decay)
    scale = tpt.model.logit_scale.detach().exp()
    text = F.normalize(learner(ctx), dim=-1)
    logits = scale * features @ text.T
    entropy = -(logits.softmax(1) * logits.log_softmax(1)).sum(1)
    selected = torch.argsort(entropy)[: int(len(features) * config.selection)]
    log_p = logits[selected].log_softmax(-1)
    mean_log_p = log_p.logsumexp(dim=0) - math.log(len(selected))
    loss = -(mean_log_p * mean_log_p.exp()).sum()
    if config.dispersion_weight:
        loss = loss - config.dispersion_weight * torch.linalg.norm(text - text.mean(0), dim=-1).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        final = scale * features[:1] @ F.normalize(learner(ctx), dim=-1).T
    return selected, loss.detach(), ctx.detach(), final[0]


def images(n, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (3, 40 + i, 36), dtype=torch.uint8, generator=generator) for i in range(n)]


@pytest.mark.parametrize(
    "config", [TuningConfig(n_views=N_VIEWS), ctpt_config(TuningConfig(n_views=N_VIEWS))]
)
def test_tune_over_ready_made_views_gives_what_the_reference_computes(tiny_clip, classnames, config):
    model, tokenizer = tiny_clip
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tpt = TPT(model, tokenizer, classnames, config=config, flip=False)
    views = torch.stack([tpt.views([image], [sample_generator(3, i)]) for i, image in enumerate(images(2))])
    result = tpt.tune(views)  # (2, V, 3, s, s): two samples
    assert result.selected.shape == (2, 1) and result.ctx.shape == (2, *tpt.hard_ctx.shape)
    for s in range(2):
        selected, loss, ctx, logits = reference(tpt, tpt.encode_views(views[s]), config)
        assert result.selected[s].tolist() == selected.tolist()
        torch.testing.assert_close(result.loss[s], loss, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(result.ctx[s], ctx, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(result.logits[s], logits, atol=1e-4, rtol=1e-5)
    assert not torch.equal(result.ctx[0], tpt.hard_ctx)

    # the result is kept: a later call does not overwrite it; one sample's views as (V, 3, s, s)
    kept = result.logits.clone()
    single = tpt.tune(views[1])
    torch.testing.assert_close(result.logits, kept, rtol=0, atol=0)
    torch.testing.assert_close(single.logits[0], result.logits[1], atol=1e-5, rtol=1e-5)

    # the model is as it was: same weights, no gradient accumulated
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) and p.grad is None and not p.requires_grad


def test_predict_from_images_equals_tune_over_their_views_and_chunks_any_count(tiny_clip, classnames):
    model, tokenizer = tiny_clip
    config = TuningConfig(n_views=N_VIEWS)
    tpt = TPT(model, tokenizer, classnames, config=config, samples_per_step=2)
    batch = images(3, seed=1)
    logits = tpt.predict(batch)  # 3 images, 2 at a time; generators sample_generator(0, i)
    assert logits.shape == (3, len(classnames))
    views = torch.stack([tpt.views([image], [sample_generator(0, i)]) for i, image in enumerate(batch)])
    torch.testing.assert_close(tpt.tune(views).logits, logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tpt.predict(views), logits, atol=1e-5, rtol=1e-5)
    pil = Image.fromarray(batch[0].permute(1, 2, 0).numpy())
    torch.testing.assert_close(tpt.predict(pil), logits[:1], atol=1e-5, rtol=1e-5)
    generators = [sample_generator(7, 0)]
    torch.testing.assert_close(tpt.predict(batch[:1], generators), tpt(batch[:1], [sample_generator(7, 0)]))


def test_reset_restores_the_initial_context_and_bad_views_are_named(tiny_clip, classnames):
    model, tokenizer = tiny_clip
    tpt = TPT(model, tokenizer, classnames, config=TuningConfig(n_views=N_VIEWS))
    tpt.tune(tpt.views(images(1), [sample_generator(0, 0)]))
    assert not torch.equal(tpt.step.ctx[0], tpt.hard_ctx)
    tpt.reset()
    torch.testing.assert_close(tpt.step.ctx[0], tpt.hard_ctx, rtol=0, atol=0)

    size = tpt.view_shape[-1]
    with pytest.raises(
        ValueError, match=rf"views: expected a tensor of shape \({N_VIEWS}, 3, {size}, {size}\)"
    ):
        tpt.tune(torch.randn(N_VIEWS - 1, 3, size, size))
    with pytest.raises(ValueError, match="views: expected normalized float views"):
        tpt.tune(torch.zeros(N_VIEWS, 3, size, size, dtype=torch.uint8))
    with pytest.raises(ValueError, match="generators: expected one per image"):
        tpt.predict(images(2), [sample_generator(0, 0)])
