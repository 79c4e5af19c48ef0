"""The loss choices and regularizers against the formulas written out in float64 and against the fused
``fastcal.losses`` functions."""

import functools
import types

import pytest
import torch
import torch.nn.functional as F

from fastcal import registry
from fastcal.losses import calibrated_prompt_loss
from fastcal.methods.base import PromptMethod, clip_logits
from fastcal.methods.objectives import (
    KnowledgeGuidance,
    RegularizerSetup,
    StepBatch,
    build_loss,
    build_regularizers,
    loss_options,
    zeroshot_logits,
)

LOSS_CONFIG = {"margin_alpha": 0.1, "margin_beta": 0.01, "moment_weight": 5.0, "label_smoothing": 0.0}


def batch(text_shape, seed=0):
    generator = torch.Generator().manual_seed(seed)
    rows = text_shape[0] if len(text_shape) == 3 else 9
    image = torch.randn(rows, 13, generator=generator, dtype=torch.float64)
    text = torch.randn(*text_shape, generator=generator, dtype=torch.float64).requires_grad_()
    frozen = F.normalize(torch.randn(text_shape[-2:], generator=generator, dtype=torch.float64), dim=-1)
    labels = torch.randint(0, text_shape[-2], (rows,), generator=generator)
    output = clip_logits(image, text, torch.tensor(2.5, dtype=torch.float64))
    return StepBatch(output, labels, None, frozen, 0), text


def test_cross_entropy_and_label_smoothing():
    step, _ = batch((7, 13))
    plain = build_loss("ce", LOSS_CONFIG)(step)
    torch.testing.assert_close(plain, F.cross_entropy(step.output.logits, step.labels))
    smoothed = build_loss("label_smoothing", {**LOSS_CONFIG, "label_smoothing": 0.2})(step)
    logp = step.output.logits.double().log_softmax(-1)
    target = torch.full_like(logp, 0.2 / 7).scatter_(1, step.labels[:, None], 0.8 + 0.2 / 7)
    torch.testing.assert_close(smoothed.double(), -(target * logp).sum(-1).mean())


def test_calibrated_loss_is_the_fused_function():
    step, _ = batch((7, 13))
    got = build_loss("calibrated", LOSS_CONFIG)(step)
    out = step.output
    expected = calibrated_prompt_loss(
        out.image_features, out.text_features, step.labels, out.logit_scale, step.frozen_text_features
    )
    torch.testing.assert_close(got, expected)


def test_per_image_calibrated_loss_reduces_to_the_shared_one():
    """CoCoOp's per-image classifiers, all equal to one shared classifier, give the fused loss and its
    gradient (summed over the copies)."""
    shared_step, shared_text = batch((7, 13), seed=4)
    per_image = shared_text.detach().expand(9, -1, -1).clone().requires_grad_()
    out = clip_logits(shared_step.output.image_features, per_image, torch.tensor(2.5, dtype=torch.float64))
    step = StepBatch(out, shared_step.labels, None, shared_step.frozen_text_features, 0)
    loss = build_loss("calibrated", {**LOSS_CONFIG, "label_smoothing": 0.1})
    got, expected = loss(step), loss(shared_step)
    torch.testing.assert_close(got.double(), expected.double(), atol=1e-10, rtol=1e-10)
    got.backward()
    expected.backward()
    torch.testing.assert_close(per_image.grad.sum(0), shared_text.grad, atol=1e-10, rtol=1e-8)


def setup_for(options, config):
    fields = {"method": None, "model": None, "model_key": "k", "tokenizer": None}
    fields.update(classnames=[], templates=[])
    return RegularizerSetup(
        name="kgcoop",
        method_name="kgcoop",
        frozen_text_features=None,
        options=options,
        config=config,
        seed=0,
        device=torch.device("cpu"),
        **fields,
    )


def test_knowledge_guidance_is_kgcoops_score():
    step, text = batch((7, 13))
    guidance = KnowledgeGuidance(setup_for({}, {"kgcoop_weight": None}))
    assert guidance.weight == 8.0
    cos = F.cosine_similarity(text.detach(), step.frozen_text_features, dim=-1)
    torch.testing.assert_close(guidance(step).double(), 8.0 * (1 - cos.mean()))
    per_image, text3 = batch((3, 7, 13), seed=1)
    cos3 = F.cosine_similarity(text3.detach(), per_image.frozen_text_features.expand(3, -1, -1), dim=-1)
    weighted = KnowledgeGuidance(setup_for({"weight": 2.0}, {"kgcoop_weight": 8.0}))
    torch.testing.assert_close(weighted(per_image).double(), 2.0 * (1 - cos3.mean()))
    with pytest.raises(ValueError, match="weight"):
        KnowledgeGuidance(setup_for({"lambda": 1.0}, {}))


def test_regularizers_and_losses_come_from_the_registry():
    registry.register("regularizer", "scaled", lambda setup: ("built", setup.name))
    try:
        built = build_regularizers(
            ["kgcoop", "scaled", "kgcoop"], lambda name: setup_for({}, {"kgcoop_weight": 1.0})
        )
    finally:
        registry.unregister("regularizer", "scaled")
    assert isinstance(built[0], KnowledgeGuidance) and built[1] == ("built", "kgcoop") and len(built) == 2
    with pytest.raises(ValueError, match="regularizers: expected one of kgcoop, dor"):
        build_regularizers(["nope"], lambda name: None)
    with pytest.raises(ValueError, match="loss: expected one of ce, calibrated, label_smoothing"):
        build_loss("nope", LOSS_CONFIG)
    with pytest.raises(ValueError, match="spec: expected an object or a 'module:attribute'"):
        registry.register("loss", "bad", "no_colon")
    # unset options take the loss's defaults: 0.1 smoothing for the label_smoothing loss, 0 for CE
    assert loss_options("label_smoothing", {"label_smoothing": None}) == {"label_smoothing": 0.1}
    assert loss_options("ce", {}) == {"label_smoothing": 0.0}


def test_a_zero_weight_regularizer_is_left_out_and_a_zero_moment_weight_skips_the_moments(monkeypatch):
    assert build_regularizers(["kgcoop"], lambda name: setup_for({"weight": 0.0}, {})) == []
    step, _ = batch((11, 13), seed=3)
    calls = []
    import fastcal.losses.functional as LF

    real = LF.calibrated_prompt_loss

    def spy(*args, **kwargs):
        calls.append(args[4] if len(args) > 4 else kwargs.get("frozen_text_features"))
        return real(*args, **kwargs)

    monkeypatch.setattr(LF, "calibrated_prompt_loss", spy)
    without = build_loss("calibrated", {**LOSS_CONFIG, "moment_weight": 0.0})(step)
    assert calls == [None]  # no frozen features: the fused op computes no moment statistics
    out = step.output
    want = calibrated_prompt_loss(
        out.image_features,
        out.text_features,
        step.labels,
        out.logit_scale,
        margin_alpha=0.1,
        margin_beta=0.01,
    )
    torch.testing.assert_close(without, want, rtol=1e-12, atol=1e-12)


def test_clip_logits_stay_float32_under_autocast():
    generator = torch.Generator().manual_seed(4)
    image, text = torch.randn(5, 9, generator=generator), torch.randn(7, 9, generator=generator)
    plain = clip_logits(image, text, torch.tensor(4.6))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = clip_logits(image, text, torch.tensor(4.6))
    assert mixed.logits.dtype == torch.float32
    torch.testing.assert_close(mixed.logits, plain.logits, rtol=1e-6, atol=1e-5)


BASELINE_OPTIONS = {
    "mbls_margin": 2.0,
    "mbls_alpha": 0.1,
    "confidence_penalty_weight": 0.1,
    "focal_gamma": 3.0,
    "focal_adaptive": True,
    "mdca_weight": 1.0,
    "zeroshot_penalty_weight": 10.0,
}


class FrozenClip(torch.nn.Module):
    """What ``zeroshot_logits`` reads of a method's CLIP: the log-scale and the unprompted encoder."""

    def __init__(self):
        super().__init__()
        self.logit_scale = torch.nn.Parameter(torch.tensor(4.6052, dtype=torch.float64))
        self.visual = torch.nn.Linear(6, 13, dtype=torch.float64)

    def encode_image(self, images):
        return self.visual(images)


def frozen_encoder_method(input_kind, clip):
    """The two things ``zeroshot_logits`` reads of a method: its input kind and its frozen encoder."""
    method = types.SimpleNamespace(input_kind=input_kind, clip_model=clip)
    method.frozen_image_features = functools.partial(PromptMethod.frozen_image_features, method)
    return method


def test_the_baseline_losses_from_the_registry():
    """Each baseline loss is its fastcal.losses function on the method's logits (with the frozen
    zero-shot logits exp(s) <f0, t0> where it needs them), and trains the text features."""
    from fastcal.losses import baselines as B

    step, text = batch((7, 13), seed=2)
    features = torch.randn(9, 13, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = clip_logits(features, text, torch.tensor(2.5, dtype=torch.float64))
    clip = FrozenClip()
    method = frozen_encoder_method("features", clip)
    step = StepBatch(out, step.labels, method, step.frozen_text_features, 0, inputs=features)
    zeroshot = clip.logit_scale.detach().exp() * F.normalize(features, dim=-1) @ step.frozen_text_features.T
    torch.testing.assert_close(zeroshot_logits(step), zeroshot)
    logits, labels = out.logits, step.labels
    expected = {
        "mbls": B.mbls_loss(logits, labels, margin=2.0, alpha=0.1),
        "confidence_penalty": B.confidence_penalty_loss(logits, labels, weight=0.1),
        "focal": B.focal_loss(logits, labels, gamma=3.0, adaptive=True),
        "mdca": F.cross_entropy(logits, labels) + B.mdca_loss(logits, labels),
        "zs_norm": B.zs_norm_loss(logits, zeroshot, labels),
        "penalty": F.cross_entropy(logits, labels) + 10.0 * B.zeroshot_penalty(logits, zeroshot),
    }
    for name, value in expected.items():
        assert name in registry.names("loss")
        got = build_loss(name, BASELINE_OPTIONS)(step)
        torch.testing.assert_close(got, value)
        (grad,) = torch.autograd.grad(got, text, retain_graph=True)
        assert grad.abs().sum() > 0, name
    defaults = loss_options("mbls", {"mbls_margin": None, "mbls_alpha": None})
    assert defaults == {"mbls_margin": 10.0, "mbls_alpha": 0.1}  # MbLS's, as TrainConfig's fields


def test_zeroshot_logits_of_a_prompted_image_encoder_run_the_frozen_encoder():
    clip = FrozenClip()
    images = torch.randn(4, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    frozen = F.normalize(torch.randn(3, 13, dtype=torch.float64), dim=-1)
    prompted = clip_logits(torch.randn(4, 13, dtype=torch.float64), frozen, clip.logit_scale)
    method = frozen_encoder_method("images", clip)
    step = StepBatch(prompted, torch.tensor([0, 1, 2, 0]), method, frozen, 0, inputs=images)
    expected = clip.logit_scale.exp() * F.normalize(clip.encode_image(images), dim=-1) @ frozen.T
    torch.testing.assert_close(zeroshot_logits(step), expected.detach())
    assert not zeroshot_logits(step).requires_grad
    with pytest.raises(ValueError, match=r"StepBatch\.inputs: expected the step's inputs"):
        zeroshot_logits(StepBatch(prompted, step.labels, method, frozen, 0))
