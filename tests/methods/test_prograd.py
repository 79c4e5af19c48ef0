"""ProGrad against a float64 restatement of one step of its public code (BeierZhu/Prompt-align:
``ProGrad.public/trainers/prograd.py`` PromptLearner, CustomCLIP and ProGradLoss;
``Dassl.ProGrad.pytorch/dassl/engine/trainer.py`` prograd_backward_and_update), written from open_clip's
modules at full length (77 positions), on the tiny random-init CLIP."""

import pytest
import torch
import torch.nn.functional as F

from fastcal.methods.base import get_method
from fastcal.methods.objectives import CrossEntropy, StepBatch
from fastcal.methods.prograd import (
    TEMPLATES,
    ProGrad,
    PromptAlignedGradient,
    aligned_gradient,
    distillation_cross_entropy,
)

CLASSNAMES = ["dog", "great white shark", "axolotl", "teapot", "stone bridge"]
TEACHER = "a type of pet, a photo of a {}."
N_CTX = 10
LR, WEIGHT_DECAY = 0.05, 5e-4


def reference_context(model, tokenizer, phrase, n_ctx):
    """The reference's CTX_INIT: zeros, then the embeddings of the phrase's first (word count) tokens."""
    words = len(phrase.split(" "))
    embedding = model.token_embedding(tokenizer([phrase]))[0]
    ctx = torch.zeros(n_ctx, embedding.shape[-1], dtype=embedding.dtype)
    ctx[n_ctx - words :] = embedding[1 : 1 + words]
    return ctx


def extra_term(ctx):
    """Another term of the objective (as a regularizer such as DOR adds one): the rule projects the
    gradient of the whole objective."""
    return 0.3 * ctx.square().sum()


def reference_step(clip, reference_text, image_features, labels, weight, with_term):
    """Losses, both gradients, the projected gradient and the context after one SGD step."""
    model, tokenizer = clip.model, clip.tokenizer
    phrase = TEACHER.replace(" {}.", "")
    ctx = reference_context(model, tokenizer, phrase, N_CTX).requires_grad_()
    prefix = " ".join(["X"] * (N_CTX - len(phrase.split(" ")))) + " " + phrase
    ids = tokenizer([f"{prefix} {name}." for name in CLASSNAMES])
    embedding = model.token_embedding(ids)
    prompts = torch.cat([embedding[:, :1], ctx.expand(len(CLASSNAMES), -1, -1), embedding[:, 1 + N_CTX :]], 1)
    text = F.normalize(reference_text(model, prompts, ids), dim=-1)
    scale = model.logit_scale.exp()
    f = F.normalize(image_features, dim=-1)
    logits = scale * f @ text.T
    teacher_text = F.normalize(model.encode_text(tokenizer([TEACHER.format(c) for c in CLASSNAMES])), dim=-1)
    teacher = scale * f @ teacher_text.T
    ce = F.cross_entropy(logits, labels) + (extra_term(ctx) if with_term else 0.0)
    kl = (-F.softmax(teacher, -1) * F.log_softmax(logits, -1)).sum(1).mean()
    (g_kl,) = torch.autograd.grad(kl, ctx, retain_graph=True)
    (g_ce,) = torch.autograd.grad(ce, ctx)
    unit = g_kl / g_kl.norm()
    cosine = float((g_ce / g_ce.norm() * unit).sum())
    projected = g_ce - weight * (g_ce * unit).sum() * unit if cosine < 0 else g_ce
    # SGD, momentum 0.9, weight decay: the first step's buffer is g + wd * p
    updated = ctx.detach() - LR * (projected + WEIGHT_DECAY * ctx.detach())
    return {"ce": ce, "kl": kl, "g_ce": g_ce, "g_kl": g_kl, "projected": projected, "ctx": updated}, cosine


@pytest.mark.parametrize(
    ("pick", "weight", "with_term", "conflict"),
    [("argmin", 1.0, False, True), ("argmin", 0.8, True, True), ("argmax", 1.0, False, False)],
)
def test_one_step_matches_the_reference(
    double_clip, reference_text, run_setup, pick, weight, with_term, conflict
):
    generator = torch.Generator().manual_seed(5)
    image_features = torch.randn(7, 32, generator=generator, dtype=torch.float64)
    method = ProGrad(double_clip.model, double_clip.tokenizer, CLASSNAMES, n_ctx=N_CTX, ctx_init=TEACHER[:-4])
    method.double()
    hook = PromptAlignedGradient(
        run_setup(method, double_clip, CLASSNAMES, {"text_template": TEACHER, "prograd_lambda": weight})
    )
    with torch.no_grad():
        teacher = hook.teacher_logits(
            StepBatch(method.output(image_features), None, method, None, 0, image_features)
        )
    # labels the teacher finds least (most) likely: their CE gradient opposes (follows) the KL's
    labels = getattr(teacher, pick)(dim=1)
    expected, cosine = reference_step(double_clip, reference_text, image_features, labels, weight, with_term)
    assert (cosine < 0) == conflict

    ctx = method.prompt_learner.ctx
    torch.testing.assert_close(
        ctx.detach(),
        reference_context(double_clip.model, double_clip.tokenizer, TEACHER[:-4], N_CTX),
        rtol=0,
        atol=0,
    )
    optimizer = torch.optim.SGD([ctx], lr=LR, momentum=0.9, weight_decay=WEIGHT_DECAY)
    out = method.output(image_features)
    batch = StepBatch(out, labels, method, None, 0, image_features)
    loss = CrossEntropy()(batch) + (extra_term(ctx) if with_term else 0.0)
    kl = distillation_cross_entropy(out.logits, hook.teacher_logits(batch))
    (g_kl,) = torch.autograd.grad(kl, ctx, retain_graph=True)
    hook.backward(loss, batch, [ctx], torch.amp.GradScaler("cpu", enabled=False))
    # float64 throughout; the truncated, packed encoder differs from the 77-token one by rounding only
    tolerance = {"rtol": 1e-9, "atol": 1e-12}
    torch.testing.assert_close(loss, expected["ce"], **tolerance)
    torch.testing.assert_close(kl, expected["kl"], **tolerance)
    torch.testing.assert_close(g_kl, expected["g_kl"], **tolerance)
    torch.testing.assert_close(ctx.grad, expected["projected"], **tolerance)
    assert conflict != torch.allclose(ctx.grad, expected["g_ce"], rtol=1e-6, atol=0)
    optimizer.step()
    torch.testing.assert_close(ctx.detach(), expected["ctx"], **tolerance)


def test_aligned_gradient_removes_the_conflicting_part():
    generator = torch.Generator().manual_seed(2)
    reference = torch.randn(3, 5, generator=generator, dtype=torch.float64)
    toward = reference + 0.1 * torch.randn(3, 5, generator=generator, dtype=torch.float64)
    against = -toward
    torch.testing.assert_close(aligned_gradient(toward, reference, 1.0), toward, rtol=0, atol=0)
    projected = aligned_gradient(against, reference, 1.0)
    assert abs(float((projected * reference).sum())) < 1e-12  # orthogonal to the reference
    partial = aligned_gradient(against, reference, 0.8)
    unit = reference / reference.norm()
    torch.testing.assert_close(partial, against - 0.8 * (against * unit).sum() * unit, rtol=1e-12, atol=1e-14)
    zero = torch.zeros_like(reference)
    torch.testing.assert_close(aligned_gradient(against, zero, 1.0), against, rtol=0, atol=0)
    torch.testing.assert_close(aligned_gradient(zero, reference, 1.0), zero, rtol=0, atol=0)


def test_spec_cites_the_recipe():
    spec = get_method("prograd")
    assert spec.recipe["n_ctx"] == 16 and spec.recipe["prograd_lambda"] == 1.0
    assert spec.recipe["epochs"] == 100 and spec.recipe["batch_size"] == 32 and spec.recipe["lr"] == 0.002
    assert "rn50_ep100.yaml" in spec.source and "prograd.py" in spec.source
    assert spec.dataset_recipes["oxford_pets"] == {
        "text_template": "a type of pet, a photo of a {}.",
        "ctx_init": "a type of pet, a photo of a",
    }
    assert TEMPLATES["dtd"] == "a texture of {}." and len(TEMPLATES) == 15
    assert spec.hooks == (PromptAlignedGradient,)


def test_a_comma_phrase_keeps_its_last_token_as_a_word(tiny_clip):
    """ "pet," is two tokens: 16 learned tokens end at "of", and "a" stays a word before the name."""
    method = ProGrad(tiny_clip.model, tiny_clip.tokenizer, ["dog"], n_ctx=16, ctx_init=TEACHER[:-4])
    learner = method.prompt_learner
    assert learner.n_ctx == 16 and learner.n_fixed_words == 1
    assert learner.ctx[:8].abs().sum() == 0 and learner.ctx[8:].abs().sum() > 0
    with pytest.raises(ValueError, match="ctx_init"):
        ProGrad(tiny_clip.model, tiny_clip.tokenizer, ["dog"], n_ctx=4, ctx_init=TEACHER[:-4])
