import math

import pytest
import torch

from fastcal.finetune.carot import (
    REFERENCE_CODE_DISTILL_WEIGHT,
    cross_modal_norm,
    distillation_loss,
    is_teacher_update_step,
    orthogonality_penalty,
    teacher_momentum,
)


def _softmax(row):
    top = max(row)
    exps = [math.exp(z - top) for z in row]
    total = sum(exps)
    return [e / total for e in exps]


def _hand_distillation(s_img, s_txt, t_img, t_txt):
    """1/2 [mean_i KL(p_t,i || p_s,i) over image rows + the same over text rows], float64 loops."""
    total = 0.0
    for student, teacher in ((s_img, t_img), (s_txt, t_txt)):
        rows = student.shape[0]
        for i in range(rows):
            p = _softmax(teacher[i].tolist())
            q = _softmax(student[i].tolist())
            total += sum(pj * (math.log(pj) - math.log(qj)) for pj, qj in zip(p, q, strict=True)) / rows
    return total / 2


def _logits(rows, cols, seed, scale=20.0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(rows, cols, generator=g, dtype=torch.float64).tanh()


@pytest.mark.parametrize("shape", [(5, 5), (3, 7)])
def test_distillation_matches_float64_hand_formula(shape):
    rows, cols = shape
    s_img, s_txt, t_img, t_txt = (_logits(rows, cols, seed) for seed in range(4))
    got = distillation_loss(s_img, s_txt, t_img, t_txt)
    assert got.dtype == torch.float64
    assert abs(float(got) - _hand_distillation(s_img, s_txt, t_img, t_txt)) < 1e-12


def test_distillation_gradient_is_the_reference_soft_cross_entropy_gradient():
    # The reference adds distil_coef * mean_i [CE(p_t, q_s) image rows + CE text rows]; with our
    # normalization that is REFERENCE_CODE_DISTILL_WEIGHT * distillation_loss (same gradient).
    s_img, s_txt = (_logits(6, 6, seed).requires_grad_() for seed in (10, 11))
    t_img, t_txt = _logits(6, 6, 12), _logits(6, 6, 13)
    ours = REFERENCE_CODE_DISTILL_WEIGHT * distillation_loss(s_img, s_txt, t_img, t_txt)
    g_ours = torch.autograd.grad(ours, (s_img, s_txt))
    reference = (
        1.5
        * -(
            (t_img.softmax(1) * s_img.log_softmax(1)).sum(1)
            + (t_txt.softmax(1) * s_txt.log_softmax(1)).sum(1)
        ).mean()
    )
    g_ref = torch.autograd.grad(reference, (s_img, s_txt))
    for a, b in zip(g_ours, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_distillation_is_zero_when_teacher_equals_student_and_checks_shapes():
    s = _logits(4, 4, 1)
    assert float(distillation_loss(s, s.T, s, s.T)) == pytest.approx(0.0, abs=1e-14)
    with pytest.raises(ValueError, match="teacher_per_image"):
        distillation_loss(s, s, s[:3], s)


def test_teacher_momentum_schedule_values():
    # 0.05 -> 0.9 linearly over the first 20% of 1000 steps (200), then held
    assert teacher_momentum(0, 1000) == pytest.approx(0.05)
    assert teacher_momentum(100, 1000) == pytest.approx(0.475)
    assert teacher_momentum(150, 1000) == pytest.approx(0.05 + 0.85 * 0.75)
    assert teacher_momentum(199, 1000) == pytest.approx(0.05 + 0.85 * 199 / 200)
    assert teacher_momentum(200, 1000) == 0.9
    assert teacher_momentum(999, 1000) == 0.9
    assert teacher_momentum(7, 10, start=0.1, end=0.5, warmup_fraction=0.0) == 0.5
    # CaRot's run: 25k steps, updates every 500 steps
    updates = [s for s in range(25_000) if is_teacher_update_step(s, 500)]
    assert updates[:3] == [0, 500, 1000] and len(updates) == 50
    assert teacher_momentum(500, 25_000) == pytest.approx(0.05 + 0.85 * 500 / 5000)


def test_projection_terms_match_hand_formulas(tiny_clip):
    model = tiny_clip.build_tiny_clip()
    w_v, w_t = model.visual.proj.detach(), model.text_projection.detach()
    cross = math.sqrt(
        sum(float(w_v[i] @ w_t[j]) ** 2 for i in range(w_v.shape[0]) for j in range(w_t.shape[0]))
    )
    assert float(cross_modal_norm(model).detach()) == pytest.approx(cross, rel=1e-12)
    d = w_v.shape[1]
    orth = math.sqrt(sum((float(w_v[:, a] @ w_v[:, b]) - (a == b)) ** 2 for a in range(d) for b in range(d)))
    assert float(orthogonality_penalty(model).detach()) == pytest.approx(orth, rel=1e-12)
    orthogonality_penalty(model).backward()
    assert model.visual.proj.grad.abs().sum() > 0


def test_carot_method_loss_gradients_and_teacher_schedule(tiny_clip):
    model = tiny_clip.build_tiny_clip()
    method = tiny_clip.make_method("carot", model)
    batch = tiny_clip.random_batch(6, seed=4)
    loss, parts = method.loss(method.trainable, batch, step=0)
    expected = (
        parts["contrastive"]
        + method.distill_weight * parts["distillation"]
        + 0.05 * parts["cross_modal"]
        + 0.2 * parts["orthogonality"]
    )
    torch.testing.assert_close(loss.detach(), expected)
    assert float(parts["distillation"]) > 0

    # the distillation term alone reaches both towers of the student and none of the teacher
    model.zero_grad()
    images, _, tokens = batch
    out = method.contrastive(*method.trainable(images, tokens))
    with torch.no_grad():
        t_logits = method.teacher_logits.get_logits(*method.teacher_features(images, tokens))
    distillation_loss(out.logits_per_image, out.logits_per_text, *t_logits).backward()
    assert model.visual.conv1.weight.grad.abs().sum() > 0
    assert model.token_embedding.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in method.teacher.module.parameters())

    # after_step: EMA with the scheduled momentum on update steps only
    method.teacher_update_every = 3
    before = [p.detach().clone() for p in method.teacher.module.parameters()]
    method.after_step(1, 10)
    assert all(torch.equal(a, p) for a, p in zip(before, method.teacher.module.parameters(), strict=True))
    method.after_step(3, 10)
    m = teacher_momentum(3, 10)
    for old, new, student in zip(before, method.teacher.module.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(new, m * old + (1 - m) * student.detach())

    state = method.extra_state()
    assert state and all(k.startswith("teacher.") for k in state)
