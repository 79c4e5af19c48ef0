"""The torch reference of the calibrated loss against independent float64 formulas, and gradcheck."""

import pytest
import torch
import torch.nn.functional as F

from fastcal.ops import (
    calibrated_prompt_loss_reference,
    covariance_gap_sq,
    text_moment_gap,
    use_gram_side,
)


def tcpt_loss(image, text, labels, scale, frozen, alpha, beta, weight, eps):
    """TCPT's step as its public code writes it (TCPT trainers/regularizers.py, trainers/coop.py):
    normalized features, logits, F.cross_entropy, margin_mean_var on cloned logits with the target set
    to -inf, text_moment_matching with the two D x D covariances."""
    f = image / image.norm(dim=-1, keepdim=True)
    t = text / text.norm(dim=-1, keepdim=True)
    t0 = frozen / frozen.norm(dim=-1, keepdim=True)
    logits = scale * f @ t.t()
    ce = F.cross_entropy(logits, labels, label_smoothing=eps)
    rows = torch.arange(logits.shape[0])
    true_scores = logits[rows, labels]
    masked = logits.clone()
    masked[rows, labels] = -float("inf")
    margins = true_scores - masked.max(dim=1).values
    margin_reg = -alpha * margins.mean() + beta * margins.var(unbiased=False)
    mu_t, mu_f = t.mean(dim=0, keepdim=True), t0.mean(dim=0, keepdim=True)
    mean_cost = F.mse_loss(mu_t, mu_f, reduction="sum")
    ct, cf = t - mu_t, t0 - mu_f
    cov_t, cov_f = ct.t() @ ct / t.shape[0], cf.t() @ cf / t.shape[0]
    moment = mean_cost + (cov_t - cov_f).pow(2).sum()
    return ce + margin_reg + weight * moment, ce, margin_reg, moment


def problem(b, c, d, *, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(b, d, generator=g, dtype=dtype),
        torch.randn(c, d, generator=g, dtype=dtype),
        torch.randint(0, c, (b,), generator=g),
        torch.randn(c, d, generator=g, dtype=dtype),
    )


@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize(("b", "c", "d"), [(37, 101, 67), (9, 7, 64), (1, 5, 3)])
def test_reference_matches_the_tcpt_formula(b, c, d, eps):
    image, text, labels, frozen = problem(b, c, d)
    loss, parts = calibrated_prompt_loss_reference(
        image,
        text,
        labels,
        17.0,
        frozen,
        margin_alpha=0.1,
        margin_beta=0.01,
        moment_weight=5.0,
        label_smoothing=eps,
    )
    want, ce, margin, moment = tcpt_loss(image, text, labels, 17.0, frozen, 0.1, 0.01, 5.0, eps)
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(parts["ce"], ce, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(parts["margin"], margin, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(parts["moment"], moment, rtol=1e-12, atol=1e-12)
    assert not any(p.requires_grad for p in parts.values())


def test_reference_gradients_match_the_tcpt_formula():
    image, text, labels, frozen = problem(13, 29, 41, seed=3)
    leaves = [x.clone().requires_grad_() for x in (image, text, frozen)]
    scale = torch.tensor(23.0, dtype=torch.float64, requires_grad=True)
    loss, _ = calibrated_prompt_loss_reference(*leaves[:2], labels, scale, leaves[2], label_smoothing=0.1)
    got = torch.autograd.grad(loss, [*leaves, scale])
    want_loss = tcpt_loss(*leaves[:2], labels, scale, leaves[2], 0.1, 0.01, 5.0, 0.1)[0]
    want = torch.autograd.grad(want_loss, [*leaves, scale])
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("c", "d"), [(5, 40), (30, 12), (17, 17)])
def test_covariance_gap_both_sides_and_the_issue_identity(c, d):
    g = torch.Generator().manual_seed(c * d)
    a = torch.randn(c, d, generator=g, dtype=torch.float64)
    b = torch.randn(c, d, generator=g, dtype=torch.float64)
    a, b = a - a.mean(0), b - b.mean(0)
    naive = (a.T @ a / c - b.T @ b / c).pow(2).sum()
    # The Gram identity: (||A A^T||^2 - 2 ||A B^T||^2 + ||B B^T||^2) / C^2.
    gram = ((a @ a.T).pow(2).sum() - 2 * (a @ b.T).pow(2).sum() + (b @ b.T).pow(2).sum()) / c**2
    torch.testing.assert_close(covariance_gap_sq(a, b), naive, rtol=1e-12, atol=0)
    torch.testing.assert_close(gram, naive, rtol=1e-10, atol=0)


def test_gram_side_is_taken_when_cheaper():
    assert use_gram_side(10, 512) and use_gram_side(100, 512)
    assert not use_gram_side(300, 512) and not use_gram_side(1000, 512)


@pytest.mark.parametrize("c", [10, 1000])
def test_moment_is_accurate_in_float32_when_tuned_starts_at_frozen(c):
    """Prompt tuning starts with tuned == frozen; the gap must not drown in cancellation (float32)."""
    g = torch.Generator().manual_seed(1)
    frozen = F.normalize(torch.randn(c, 512, generator=g, dtype=torch.float64) + 2.0, dim=-1)
    tuned = F.normalize(frozen + 1e-3 * torch.randn(c, 512, generator=g, dtype=torch.float64), dim=-1)
    exact = text_moment_gap(tuned, frozen)
    got = text_moment_gap(tuned.float(), frozen.float()).double()
    assert exact > 0
    torch.testing.assert_close(got, exact, rtol=1e-3, atol=0)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(("c", "d", "eps"), [(7, 5, 0.0), (3, 11, 0.2)])
def test_reference_gradcheck(reduction, c, d, eps):
    image, text, labels, frozen = problem(6, c, d, seed=c)
    scale = torch.tensor(4.0, dtype=torch.float64)
    inputs = tuple(x.clone().requires_grad_() for x in (image, text, frozen, scale))

    def loss_of(image, text, frozen, scale):
        return calibrated_prompt_loss_reference(
            image, text, labels, scale, frozen, label_smoothing=eps, reduction=reduction, moment_weight=2.0
        )[0]

    # fast_mode checks random projections of the Jacobian (a few evaluations instead of one per entry).
    assert torch.autograd.gradcheck(loss_of, inputs, fast_mode=True)


def test_reference_gradcheck_full_jacobian():
    image, text, labels, frozen = problem(3, 4, 3, seed=5)
    inputs = tuple(
        x.clone().requires_grad_() for x in (image, text, frozen, torch.tensor(3.0, dtype=torch.float64))
    )

    def loss_of(image, text, frozen, scale):
        return calibrated_prompt_loss_reference(image, text, labels, scale, frozen, label_smoothing=0.1)[0]

    assert torch.autograd.gradcheck(loss_of, inputs)


def test_reductions_agree_and_single_row_is_defined():
    image, text, labels, frozen = problem(11, 13, 9)
    per_row, parts = calibrated_prompt_loss_reference(image, text, labels, 10.0, frozen, reduction="none")
    mean, _ = calibrated_prompt_loss_reference(image, text, labels, 10.0, frozen)
    total, _ = calibrated_prompt_loss_reference(image, text, labels, 10.0, frozen, reduction="sum")
    assert per_row.shape == (11,)
    torch.testing.assert_close(per_row.mean(), mean)
    torch.testing.assert_close(per_row.sum(), total)
    torch.testing.assert_close(mean, parts["ce"] + parts["margin"] + 5.0 * parts["moment"])
    # B = 1: Var(m) = 0, so the loss is CE - alpha m + w M.
    one, parts1 = calibrated_prompt_loss_reference(image[:1], text, labels[:1], 10.0, frozen)
    logits = 10.0 * F.normalize(image[:1], dim=-1) @ F.normalize(text, dim=-1).T
    others = logits.clone()
    others[0, labels[0]] = -float("inf")
    margin = logits[0, labels[0]] - others.max()
    torch.testing.assert_close(parts1["margin"], -0.1 * margin)
    torch.testing.assert_close(
        one, F.cross_entropy(logits, labels[:1]) - 0.1 * margin + 5.0 * parts1["moment"]
    )
