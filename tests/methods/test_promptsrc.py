"""PromptSRC against a float64 restatement of one step of its public code (muzairkhattak/PromptSRC
``trainers/promptsrc.py`` forward / forward_backward, ``clip/model.py`` the independent deep prompts),
written from open_clip's modules (77-token text, the image tower block by block) on the tiny random-init
CLIP; and its Gaussian prompt aggregation against the formula."""

import math

import pytest
import torch
import torch.nn.functional as F

from fastcal.data.templates import imagenet_templates
from fastcal.methods.base import get_method
from fastcal.methods.objectives import CrossEntropy, RegularizerSetup, StepBatch
from fastcal.methods.promptsrc import (
    GaussianPromptAggregation,
    PromptSRC,
    SelfRegulation,
    aggregation_weights,
    promptsrc_templates,
)

CLASSNAMES = ["dog", "great white shark", "axolotl", "teapot", "stone bridge"]
LR, WEIGHT_DECAY = 0.05, 5e-4
# trainers/imagenet_templates.py keeps 60 of CLIP's 80 templates; these are the 20 it leaves out.
OMITTED = [
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
]


def reference_image(model, images, prompts):
    """The prompted image tower block by block: prompts after the position embeddings, before ln_pre;
    replaced before blocks 1..d-1."""
    visual = model.visual
    x = visual.conv1(images).flatten(2).transpose(1, 2)
    x = torch.cat([visual.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + visual.positional_embedding
    n = prompts[0].shape[0]
    x = visual.ln_pre(torch.cat([x, prompts[0].expand(x.shape[0], -1, -1)], dim=1))
    for k, block in enumerate(visual.transformer.resblocks):
        if 1 <= k < len(prompts):
            x = torch.cat([x[:, :-n], prompts[k].expand(x.shape[0], -1, -1)], dim=1)
        x = block(x)
    return visual.ln_post(x[:, 0]) @ visual.proj


def reference_loss(clip, reference_text, ctx, deep_text, visual, images, labels):
    model, tokenizer = clip.model, clip.tokenizer
    ids = tokenizer([f"a photo of a {c}." for c in CLASSNAMES])
    embedding = model.token_embedding(ids)
    prompts = torch.cat([embedding[:, :1], ctx.expand(len(CLASSNAMES), -1, -1), embedding[:, 5:]], dim=1)
    text = F.normalize(reference_text(model, prompts, ids, deep_text), dim=-1)
    image = F.normalize(reference_image(model, images, visual), dim=-1)
    scale = model.logit_scale.exp()
    logits = scale * image @ text.T
    with torch.no_grad():
        raw = [model.encode_text(tokenizer([t.format(c) for c in CLASSNAMES])) for t in promptsrc_templates()]
        fixed = F.normalize(torch.stack(raw, dim=1).mean(dim=1), dim=-1)  # the mean of raw features
        frozen_image = F.normalize(model.encode_image(images), dim=-1)
        frozen_logits = scale * frozen_image @ fixed.T
    kl = F.kl_div(F.log_softmax(logits, 1), F.log_softmax(frozen_logits, 1), reduction="sum", log_target=True)
    return (
        F.cross_entropy(logits, labels)
        + kl / logits.numel()
        + 25 * F.l1_loss(text, fixed)
        + 10 * F.l1_loss(image, frozen_image)
    )


def test_one_step_matches_the_reference(double_clip, reference_text, run_setup):
    generator = torch.Generator().manual_seed(9)
    images = torch.randn(3, 3, 32, 32, generator=generator, dtype=torch.float64)
    labels = torch.tensor([4, 0, 2])
    method = PromptSRC(
        double_clip.model, double_clip.tokenizer, CLASSNAMES, prompt_depth=3, n_ctx_vision=2, vision_depth=3
    ).double()
    with torch.no_grad():  # the reference's context: the token embeddings of "a photo of a"
        phrase = double_clip.model.token_embedding(double_clip.tokenizer(["a photo of a"]))[0, 1:5]
        torch.testing.assert_close(method.prompt_learner.ctx, phrase, rtol=0, atol=0)
    params = [method.prompt_learner.ctx, *method.deep_text_prompts, method.visual_prompts.prompts]
    reference = [p.detach().clone().requires_grad_() for p in params]
    expected = reference_loss(
        double_clip, reference_text, reference[0], reference[1:3], list(reference[3]), images, labels
    )
    expected_grads = torch.autograd.grad(expected, reference)

    optimizer = torch.optim.SGD(params, lr=LR, momentum=0.9, weight_decay=WEIGHT_DECAY)
    regulation = SelfRegulation(run_setup(method, double_clip, CLASSNAMES, {}))
    assert (regulation.text_weight, regulation.image_weight) == (25.0, 10.0)
    out = method.output(images)
    batch = StepBatch(out, labels, method, None, 0, images)
    loss = CrossEntropy()(batch) + regulation(batch)
    loss.backward()
    # float64 throughout; the truncated text encoder and the raw-mean order differ by rounding only
    tolerance = {"rtol": 1e-9, "atol": 1e-12}
    torch.testing.assert_close(loss, expected, **tolerance)
    for p, grad in zip(params, expected_grads, strict=True):
        torch.testing.assert_close(p.grad, grad, **tolerance)
    optimizer.step()
    for p, before, grad in zip(params, reference, expected_grads, strict=True):
        torch.testing.assert_close(
            p.detach(), before.detach() - LR * (grad + WEIGHT_DECAY * before), **tolerance
        )


def test_templates_are_clips_first_sixty_with_the_hard_prompt_first():
    templates = promptsrc_templates()
    assert len(templates) == 60 and templates[0] == "a photo of a {}."
    assert set(templates) == set(imagenet_templates()) - set(OMITTED)


def test_aggregation_weights_are_the_normalized_gaussian():
    weights = aggregation_weights(20, 15.0, 1.0)
    density = [math.exp(-0.5 * (e - 15) ** 2) / math.sqrt(2 * math.pi) for e in range(1, 21)]
    assert weights == pytest.approx([d / sum(density) for d in density], rel=1e-12)
    assert weights[14] == pytest.approx(0.3989, abs=1e-4) and sum(weights) == pytest.approx(1.0)
    far = aggregation_weights(3, 500.0, 1.0)  # no underflow to 0 / 0
    assert far[-1] == pytest.approx(1.0) and sum(far) == pytest.approx(1.0)


class TwoParameters(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.zeros(2, 3))
        self.b = torch.nn.Parameter(torch.zeros(4))

    def tuned_parameters(self):
        return list(self.named_parameters())


def gpa(method, epochs, mean, std):
    config = {"epochs": epochs, "gpa_mean": mean, "gpa_std": std}
    fields = dict(model=None, model_key="k", tokenizer=None, classnames=[], templates=[])
    setup = RegularizerSetup(
        name="gpa",
        method_name="promptsrc",
        method=method,
        frozen_text_features=None,
        options={},
        config=config,
        seed=0,
        device=torch.device("cpu"),
        **fields,
    )
    return GaussianPromptAggregation(setup)


def test_aggregation_replaces_the_prompts_with_the_weighted_sum_after_the_last_epoch():
    method = TwoParameters()
    hook = gpa(method, 4, 2.5, 1.5)
    states = [torch.randn(2, 3) for _ in range(4)], [torch.randn(4) for _ in range(4)]
    resumed = None
    for epoch in range(4):
        with torch.no_grad():
            method.a.copy_(states[0][epoch])
            method.b.copy_(states[1][epoch])
        if epoch == 2:  # a run resumed from the checkpoint of epoch 2 continues the same sum
            resumed = gpa(method, 4, 2.5, 1.5)
            resumed.load_state_dict(hook.state_dict())
            hook = resumed
        hook.on_epoch_end(epoch)
        if epoch < 3:
            torch.testing.assert_close(method.a.detach(), states[0][epoch])  # training continues raw
    weights = aggregation_weights(4, 2.5, 1.5)
    torch.testing.assert_close(method.a.detach(), sum(w * s for w, s in zip(weights, states[0], strict=True)))
    torch.testing.assert_close(method.b.detach(), sum(w * s for w, s in zip(weights, states[1], strict=True)))


def test_spec_cites_the_recipe():
    spec = get_method("promptsrc")
    recipe = spec.recipe
    assert (recipe["epochs"], recipe["batch_size"], recipe["lr"]) == (20, 4, 0.0025)
    assert (recipe["n_ctx"], recipe["n_ctx_vision"], recipe["prompt_depth"], recipe["vision_depth"]) == (
        4,
        4,
        9,
        9,
    )
    assert (recipe["text_loss_weight"], recipe["image_loss_weight"]) == (25.0, 10.0)
    assert (recipe["gpa_mean"], recipe["gpa_std"]) == (15.0, 1.0)
    assert "vit_b16_c2_ep20_batch4_4+4ctx.yaml" in spec.source
    assert spec.regularizers == (SelfRegulation,) and spec.hooks == (GaussianPromptAggregation,)
