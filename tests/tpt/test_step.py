"""The graph-ready step against a plain one-sample TPT / C-TPT written as the reference code runs it."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastcal.losses import text_dispersion
from fastcal.methods.prefix import PackedPrompts
from fastcal.methods.prompt_learner import PromptLearner
from fastcal.models.text_encoder import TextEncoder
from fastcal.tpt.ctpt import ctpt_config
from fastcal.tpt.step import TestTimeStep, TuningConfig

N_VIEWS = 20  # k = int(20 * 0.1) = 2 selected views


@pytest.fixture
def learner(tiny_clip, classnames):
    model, tokenizer = tiny_clip
    return PromptLearner(TextEncoder(model), tokenizer, classnames, ctx_init="a photo of a")


def view_features(n_samples, dim, seed):
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(n_samples, 1, dim, generator=generator)
    views = base + 0.8 * torch.randn(n_samples, N_VIEWS, dim, generator=generator)
    return F.normalize(views, dim=-1)


def reference_tpt(learner, init_ctx, logit_scale, features, config):
    """azshue/TPT's test_time_tuning + final inference for one sample (C-TPT's extra term when
    lambda > 0), with a fresh parameter and a fresh torch AdamW (default weight decay)."""
    ctx = nn.Parameter(init_ctx.clone())
    optimizer = torch.optim.AdamW([ctx], lr=config.lr, weight_decay=config.weight_decay)
    scale = logit_scale.exp()
    selected = None
    for _ in range(config.steps):
        text = F.normalize(learner(ctx), dim=-1)
        logits = scale * features @ text.T
        if selected is None:
            entropy = -(logits.softmax(1) * logits.log_softmax(1)).sum(1)
            selected = torch.argsort(entropy, descending=False)[: int(logits.shape[0] * config.selection)]
        output = logits[selected]
        log_p = output - output.logsumexp(dim=-1, keepdim=True)
        mean_log_p = log_p.logsumexp(dim=0) - math.log(log_p.shape[0])
        mean_log_p = torch.clamp(mean_log_p, min=torch.finfo(mean_log_p.dtype).min)
        loss = -(mean_log_p * mean_log_p.exp()).sum()
        if config.dispersion_weight:
            distance = torch.linalg.norm(text - text.mean(0), dim=-1)
            loss = loss - config.dispersion_weight * distance.mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        text = F.normalize(learner(ctx), dim=-1)
        return scale * features[:1] @ text.T


def make_step(learner, tiny_clip, config, samples_per_step=1, init_ctx=None, packed=False):
    model, _ = tiny_clip
    dim = learner().shape[-1]
    start = learner.ctx.detach() if init_ctx is None else init_ctx
    encoder = PackedPrompts(learner, model, samples=samples_per_step) if packed else None
    return TestTimeStep(
        learner,
        start,
        model.logit_scale,
        dim,
        samples_per_step=samples_per_step,
        config=config,
        encoder=encoder,
    )


@pytest.mark.parametrize(
    ("config", "packed"),
    [
        (TuningConfig(n_views=N_VIEWS), False),
        (ctpt_config(TuningConfig(n_views=N_VIEWS), dispersion_weight=50.0), True),
        (TuningConfig(n_views=N_VIEWS, steps=2, lr=1e-2), True),
    ],
    ids=["tpt", "ctpt-packed", "two-steps-packed"],
)
def test_step_equals_the_reference_one_sample_at_a_time(learner, tiny_clip, config, packed):
    model, _ = tiny_clip
    step = make_step(learner, tiny_clip, config, packed=packed)
    features = view_features(2, step.image_features.shape[-1], seed=1)
    for i in range(2):
        ours = step(features[i : i + 1])
        expected = reference_tpt(learner, learner.ctx.detach(), model.logit_scale, features[i], config)
        assert torch.allclose(ours, expected, atol=1e-5, rtol=1e-5)
    # tuning changed the prediction (the comparison above is not between two untuned outputs)
    with torch.no_grad():
        untuned = model.logit_scale.exp() * features[1, :1] @ F.normalize(learner(), dim=-1).T
    assert not torch.allclose(ours, untuned, atol=1e-4)


def test_buffers_keep_their_addresses_and_replay_shaped_calls_agree(learner, tiny_clip):
    step = make_step(learner, tiny_clip, TuningConfig(n_views=N_VIEWS), samples_per_step=2)
    state = [v for s in step.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    assert len(state) == 3  # exp_avg, exp_avg_sq, step: created once, at construction
    buffers = [step.ctx, step.ctx.grad, step.image_features, step.selected, step.logits, step.loss, *state]
    addresses = [b.data_ptr() for b in buffers]
    features = view_features(6, step.image_features.shape[-1], seed=2)
    outputs = [step(features[i : i + 2]) for i in range(0, 6, 2)]
    assert [b.data_ptr() for b in buffers] == addresses
    assert step.ctx.grad is buffers[1]
    # a replay-shaped call: write the static input in place, run the body, read the static output
    with torch.no_grad():
        step.image_features.copy_(features[2:4])
    step.run()
    assert torch.equal(step.logits, outputs[1])
    assert [b.data_ptr() for b in buffers] == addresses
    # and the state was reset before each sample: the same sample again gives the same result
    assert torch.equal(step(features[:2]), outputs[0])


@pytest.mark.parametrize("samples_per_step", [3, 4])
def test_samples_per_step_equals_one_at_a_time(learner, tiny_clip, samples_per_step):
    config = ctpt_config(TuningConfig(n_views=N_VIEWS), dispersion_weight=20.0)
    single = make_step(learner, tiny_clip, config)
    batched = make_step(learner, tiny_clip, config, samples_per_step=samples_per_step, packed=True)
    features = view_features(3, single.image_features.shape[-1], seed=3)
    one_at_a_time = torch.cat([single(features[i : i + 1]) for i in range(3)])
    together = batched(features)  # with 4 per step, one slot is padding
    assert together.shape == one_at_a_time.shape == (3, len(learner.classnames))
    assert torch.allclose(together, one_at_a_time, atol=1e-5, rtol=1e-5)
    assert torch.equal(together.argmax(1), one_at_a_time.argmax(1))


def test_ctpt_gradient_includes_the_dispersion_term(learner, tiny_clip):
    lam = 50.0
    tpt = make_step(learner, tiny_clip, TuningConfig(n_views=N_VIEWS, lr=0.0))
    ctpt = make_step(
        learner, tiny_clip, ctpt_config(TuningConfig(n_views=N_VIEWS, lr=0.0), dispersion_weight=lam)
    )
    features = view_features(1, tpt.image_features.shape[-1], seed=4)
    gradients = []
    for step in (tpt, ctpt):
        with torch.no_grad():
            step.image_features.copy_(features)
        step.reset()
        step._loss(select=True).sum().backward()
        gradients.append(step.ctx.grad.clone())
    ctx = learner.ctx.detach().clone().requires_grad_(True)
    (dispersion_gradient,) = torch.autograd.grad(text_dispersion(learner(ctx)), ctx)
    assert float(dispersion_gradient.norm()) > 1e-4
    assert torch.allclose(gradients[1][0] - gradients[0][0], -lam * dispersion_gradient, atol=1e-5, rtol=1e-4)


def test_fpp_style_start_context_is_what_reset_restores(learner, tiny_clip):
    start = learner.ctx.detach() + 0.05 * torch.randn(
        learner.ctx.shape, generator=torch.Generator().manual_seed(5)
    )
    step = make_step(learner, tiny_clip, TuningConfig(n_views=N_VIEWS), init_ctx=start)
    step(view_features(1, step.image_features.shape[-1], seed=6))
    assert not torch.allclose(step.ctx[0], start)
    step.reset()
    assert torch.equal(step.ctx[0], start) and not step.ctx.grad.any()


def test_validation(learner, tiny_clip):
    model, _ = tiny_clip
    step = make_step(learner, tiny_clip, TuningConfig(n_views=N_VIEWS), samples_per_step=2)
    dim = step.image_features.shape[-1]
    with pytest.raises(ValueError, match="image_features"):
        step(torch.zeros(3, N_VIEWS, dim))
    with pytest.raises(ValueError, match="image_features"):
        step(torch.zeros(1, N_VIEWS + 1, dim))
    with pytest.raises(ValueError, match="init_ctx"):
        TestTimeStep(learner, torch.zeros(3, 5), model.logit_scale, dim)
    with pytest.raises(ValueError, match="selection"):
        TuningConfig(n_views=5, selection=0.1)
    with pytest.raises(ValueError, match="use_graph"):
        TestTimeStep(learner, learner.ctx.detach(), model.logit_scale, dim, use_graph=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("packed", [False, True], ids=["prompts", "packed"])
def test_graph_replay_equals_eager(tiny_clip, classnames, packed):
    import copy

    model = copy.deepcopy(tiny_clip[0]).cuda()
    learner = PromptLearner(TextEncoder(model), tiny_clip[1], classnames, ctx_init="a photo of a")
    config = ctpt_config(TuningConfig(n_views=N_VIEWS), dispersion_weight=50.0)
    dim = learner().shape[-1]
    steps = [
        TestTimeStep(
            learner,
            learner.ctx.detach(),
            model.logit_scale,
            dim,
            samples_per_step=2,
            config=config,
            use_graph=use_graph,
            encoder=PackedPrompts(learner, model, samples=2) if packed else None,
        )
        for use_graph in (True, False)
    ]
    graph, eager = steps
    assert graph.graph_used and not eager.graph_used
    features = view_features(7, dim, seed=7).cuda()
    for i in range(0, 7, 2):  # the last call holds one sample: the captured shape, padded
        assert torch.allclose(graph(features[i : i + 2]), eager(features[i : i + 2]), atol=1e-4, rtol=1e-4)
