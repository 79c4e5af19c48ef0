"""TCP against a float64 restatement of one step of its public code
(htyao89/Textual-based_Class-aware_prompt_tuning ``trainers/tcp.py`` PromptLearner / CustomCLIP / loss,
``trainers/clip_text/model.py`` the injection before block 8; Dassl's Adam with eps 1e-3), written from
open_clip's modules at full length (77 positions), on the tiny random-init CLIP."""

import pytest
import torch
import torch.nn.functional as F

from fastcal.methods.base import get_method
from fastcal.methods.objectives import CrossEntropy, StepBatch
from fastcal.methods.tcp import TCP, ClassKnowledgeGuidance
from fastcal.runs.train.config import TrainConfig
from fastcal.runs.train.loop import build_optimizer

CLASSNAMES = ["dog", "great white shark", "axolotl", "teapot", "stone bridge"]
CLASS_TEMPLATE = "a photo of a {}, a type of pet."
NAME_TEMPLATE = "{}, a type of pet."
LAYER = 2


def quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


def reference_loss(clip, reference_text, ctx, tke, image_features, labels):
    """CE + 8 (1 - mean_c cos(t_c, t0_c)), the TKE's tokens replacing positions 1..4 before block 2."""
    model, tokenizer = clip.model, clip.tokenizer
    with torch.no_grad():
        t0 = F.normalize(model.encode_text(tokenizer([CLASS_TEMPLATE.format(c) for c in CLASSNAMES])), dim=-1)
    w1, b1, w2, b2 = tke
    tokens = (quick_gelu(t0 @ w1.T + b1) @ w2.T + b2).reshape(len(CLASSNAMES), -1, 64)
    ids = tokenizer(["X X X X " + NAME_TEMPLATE.format(c) for c in CLASSNAMES])
    embedding = model.token_embedding(ids)
    prompts = torch.cat([embedding[:, :1], ctx.expand(len(CLASSNAMES), -1, -1), embedding[:, 5:]], dim=1)
    text = F.normalize(reference_text(model, prompts, ids, injected=(LAYER, tokens)), dim=-1)
    logits = model.logit_scale.exp() * F.normalize(image_features, dim=-1) @ text.T
    score = 1.0 - F.cosine_similarity(text, t0, dim=1, eps=1e-7).mean()
    return F.cross_entropy(logits, labels) + 8.0 * score


def test_one_step_matches_the_reference(double_clip, reference_text, run_setup):
    generator = torch.Generator().manual_seed(7)
    image_features = torch.randn(6, 32, generator=generator, dtype=torch.float64)
    labels = torch.tensor([0, 4, 2, 2, 1, 3])
    method = TCP(
        double_clip.model,
        double_clip.tokenizer,
        CLASSNAMES,
        name_template=NAME_TEMPLATE,
        text_template=CLASS_TEMPLATE,
        inject_layer=LAYER,
    ).double()
    learner, tke = method.prompt_learner, method.knowledge_embedding.net
    assert learner.n_ctx == 4 and tke.linear1.out_features == 32 // 4 and tke.linear2.out_features == 4 * 64
    params = [learner.ctx, tke.linear1.weight, tke.linear1.bias, tke.linear2.weight, tke.linear2.bias]
    reference = [p.detach().clone().requires_grad_() for p in params]
    expected = reference_loss(
        double_clip, reference_text, reference[0], reference[1:], image_features, labels
    )
    expected_grads = torch.autograd.grad(expected, reference)

    config = TrainConfig(method="tcp", dataset="oxford_pets", root="unused", lr=0.01).resolved()
    assert config.optimizer == "adam" and config.adam_eps == 1e-3 and config.epochs == 50
    assert config.name_template == NAME_TEMPLATE and config.text_template == CLASS_TEMPLATE
    optimizer = build_optimizer(params, config)
    out = method.output(image_features)
    batch = StepBatch(out, labels, method, None, 0, image_features)
    guidance = ClassKnowledgeGuidance(run_setup(method, double_clip, CLASSNAMES, config.to_dict()))
    loss = CrossEntropy()(batch) + guidance(batch)
    loss.backward()
    # float64 throughout: the truncated encoder differs from the 77-token one by rounding only
    tolerance = {"rtol": 1e-9, "atol": 1e-12}
    torch.testing.assert_close(loss, expected, **tolerance)
    for p, grad in zip(params, expected_grads, strict=True):
        torch.testing.assert_close(p.grad, grad, **tolerance)
    optimizer.step()
    # Adam's first step with coupled weight decay: g' = g + wd p, m_hat = g', v_hat = g'^2
    for p, before, grad in zip(params, reference, expected_grads, strict=True):
        decayed = grad + 5e-4 * before.detach()
        step = 0.01 * decayed / (decayed.abs() + 1e-3)
        torch.testing.assert_close(p.detach(), before.detach() - step, **tolerance)


def test_context_and_class_tokens_both_reach_the_features(tiny_clip):
    """The TKE's tokens enter at their layer; the context still shapes the features through attention
    in the layers before it."""
    method = TCP(tiny_clip.model, tiny_clip.tokenizer, CLASSNAMES, inject_layer=1)
    features = method.class_features()
    tke_weight = method.knowledge_embedding.net.linear2.weight
    ctx_grad, tke_grad = torch.autograd.grad(features.sum(), [method.prompt_learner.ctx, tke_weight])
    assert ctx_grad.abs().sum() > 0 and tke_grad.abs().sum() > 0
    # outliers go through the same model: the class names as terms, with their class knowledge, are
    # the class features
    with torch.no_grad():
        terms = method.term_features(CLASSNAMES, frozen_features=method.class_knowledge)
        torch.testing.assert_close(terms, method.class_features(), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="inject_layer"):
        TCP(tiny_clip.model, tiny_clip.tokenizer, CLASSNAMES, inject_layer=3)
    with pytest.raises(ValueError, match="frozen_features"):
        method.term_features(["cat"])


def test_new_classes_get_their_own_class_knowledge(tiny_clip):
    method = TCP(tiny_clip.model, tiny_clip.tokenizer, CLASSNAMES, inject_layer=2)
    method.set_classnames(["violin", "red fox"])
    with torch.no_grad():
        expected = tiny_clip.model.encode_text(
            tiny_clip.tokenizer(["a photo of a violin.", "a photo of a red fox."])
        )
    torch.testing.assert_close(method.class_knowledge, F.normalize(expected, dim=-1), atol=1e-6, rtol=1e-5)
    assert method.output(torch.randn(3, 32)).logits.shape == (3, 2)


def test_spec_cites_the_recipe():
    spec = get_method("tcp")
    assert (
        spec.recipe["optimizer"] == "adam" and spec.recipe["lr"] == 0.002 and spec.recipe["adam_eps"] == 1e-3
    )
    assert spec.recipe["epochs"] == 50 and spec.recipe["batch_size"] == 32 and spec.recipe["n_ctx"] == 4
    assert spec.recipe["kgcoop_weight"] == 8.0 and spec.recipe["inject_layer"] == 8
    assert spec.dataset_recipes["imagenet"]["epochs"] == 25 and spec.dataset_recipes["sun397"]["epochs"] == 25
    assert spec.dataset_recipes["ucf101"]["name_template"] == "person doing {}."
    assert spec.dataset_recipes["fgvc_aircraft"]["text_template"] == "a photo of an aircraft {}."
    assert "vit_b16_ep100_ctxv1.yaml" in spec.source and spec.regularizers == (ClassKnowledgeGuidance,)
