"""The train-time baselines against their reference code restated in float64 (MbLS's LogitMarginL1,
MbLS's PenaltyEntropy, the per-sample gamma loop of FocalLossAdaptive, MDCA's loop over classes,
CLIPCalib's ZS-Norm and penalty), small cases by hand, and gradcheck for every backward."""

import pytest
import torch
import torch.nn.functional as F

from fastcal.losses import (
    ConfidencePenaltyLoss,
    FocalLoss,
    MbLSLoss,
    MDCALoss,
    ZeroshotPenalty,
    ZSNormLoss,
    confidence_penalty_loss,
    focal_loss,
    mbls_loss,
    mdca_loss,
    zeroshot_penalty,
    zs_norm_loss,
)

f64 = torch.float64


def inputs(b=13, c=7, seed=0, scale=15.0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(b, c, generator=g, dtype=f64) * scale).requires_grad_()
    zeroshot = torch.randn(b, c, generator=g, dtype=f64) * 10 + 20
    labels = torch.randint(0, c, (b,), generator=g)
    return logits, zeroshot, labels


def test_mbls_by_hand_and_against_logit_margin_l1():
    """z = [3, 1, 0], margin 1: gaps [0, 2, 3] -> relu(gap - 1) = [0, 1, 2], mean 1, term 0.1."""
    z = torch.tensor([[3.0, 1.0, 0.0]], dtype=f64)
    y = torch.tensor([0])
    assert float(mbls_loss(z, y, margin=1.0) - F.cross_entropy(z, y)) == pytest.approx(0.1, abs=1e-15)
    logits, _, labels = inputs()
    gaps = logits.max(dim=1, keepdim=True).values - logits
    reference = F.cross_entropy(logits, labels) + 0.1 * F.relu(gaps - 10.0).mean()
    torch.testing.assert_close(mbls_loss(logits, labels), reference)
    torch.testing.assert_close(MbLSLoss(reduction="none")(logits, labels).mean(), reference)


def test_confidence_penalty_against_penalty_entropy():
    logits, _, labels = inputs(scale=2.0)
    prob = F.log_softmax(logits, dim=1).exp().clamp(1e-10, 1 - 1e-10)
    reference = F.cross_entropy(logits, labels) - 0.3 * (-prob * prob.log()).mean()
    torch.testing.assert_close(confidence_penalty_loss(logits, labels, weight=0.3), reference)
    torch.testing.assert_close(ConfidencePenaltyLoss(0.3, reduction="sum")(logits, labels), reference * 13)


def test_focal_and_flsd53_against_the_per_sample_loop():
    logits, _, labels = inputs(b=40, scale=1.5, seed=3)
    logpt = F.log_softmax(logits, dim=1).gather(1, labels[:, None]).squeeze(1)
    pt = logpt.exp()
    torch.testing.assert_close(focal_loss(logits, labels, gamma=2.0), (-((1 - pt) ** 2.0) * logpt).mean())
    gammas = []
    for value in pt.tolist():  # FocalLossAdaptive.get_gamma_list with gamma = 3
        gammas.append(3.0 if value >= 0.5 else (5.0 if value < 0.2 else 3.0))
    assert {5.0, 3.0} <= set(gammas)
    reference = (-((1 - pt) ** torch.tensor(gammas, dtype=f64)) * logpt).mean()
    torch.testing.assert_close(focal_loss(logits, labels, adaptive=True), reference)
    torch.testing.assert_close(FocalLoss(gamma=0.0)(logits, labels), F.cross_entropy(logits, labels))


def test_mdca_by_hand_and_against_its_loop():
    """p = [[.7, .2, .1], [.3, .6, .1]], y = [0, 0]: |.5 - 1| + |.4 - 0| + |.1 - 0| = 1, / 3."""
    p = torch.tensor([[0.7, 0.2, 0.1], [0.3, 0.6, 0.1]], dtype=f64)
    assert float(mdca_loss(p.log(), torch.tensor([0, 0]))) == pytest.approx(1 / 3, abs=1e-15)
    logits, _, labels = inputs(scale=2.0)
    probs = logits.softmax(1)
    reference = (
        sum((probs[:, c].mean() - (labels == c).double().mean()).abs() for c in range(logits.shape[1]))
        / logits.shape[1]
    )
    torch.testing.assert_close(MDCALoss()(logits, labels), reference)


def test_zs_norm_and_penalty_against_clipcalib():
    logits, zs, labels = inputs()
    lo, hi = logits.min(1, keepdim=True).values, logits.max(1, keepdim=True).values
    zlo, zhi = zs.min(1, keepdim=True).values, zs.max(1, keepdim=True).values
    normalized = (logits - lo) / (hi - lo) * (zhi - zlo) + zlo
    torch.testing.assert_close(zs_norm_loss(logits, zs, labels), F.cross_entropy(normalized, labels))
    torch.testing.assert_close(ZSNormLoss()(logits, zs, labels), F.cross_entropy(normalized, labels))
    c = logits.shape[1]
    penalty = F.relu(logits - zhi.repeat(1, c)).mean() + F.relu(zlo.repeat(1, c) - logits).mean()
    torch.testing.assert_close(zeroshot_penalty(logits, zs), penalty)
    torch.testing.assert_close(ZeroshotPenalty()(logits, zs), penalty)
    assert float(penalty.detach()) > 0
    flat = torch.zeros(2, 3, dtype=f64)  # all-equal logits: mapped to the zero-shot minimum, no NaN
    assert torch.isfinite(zs_norm_loss(flat, zs[:2, :3], labels[:2] % 3))


def test_gradients():
    logits, zs, labels = inputs(b=5, c=4, scale=3.0, seed=7)
    cases = [
        lambda z: mbls_loss(z, labels, margin=2.0),
        lambda z: confidence_penalty_loss(z, labels),
        lambda z: focal_loss(z, labels, adaptive=True),
        lambda z: mdca_loss(z, labels),
        lambda z: zs_norm_loss(z, zs, labels),
        lambda z: zeroshot_penalty(z, zs),
    ]
    for case in cases:
        assert torch.autograd.gradcheck(case, (logits,))


def test_validation():
    logits, zs, labels = inputs()
    with pytest.raises(ValueError, match=r"labels: expected labels in \[0, 7\)"):
        mbls_loss(logits, labels + 7)
    with pytest.raises(ValueError, match="zeroshot_logits: expected shape"):
        zs_norm_loss(logits, zs[:, :3], labels)
    with pytest.raises(ValueError, match=r"margin: expected a number >= 0\.0"):
        mbls_loss(logits, labels, margin=-1.0)
    with pytest.raises(ValueError, match="reduction: expected one of"):
        focal_loss(logits, labels, reduction="max")
    with pytest.raises(ValueError, match="logits: expected finite values"):
        mdca_loss(torch.full((2, 3), float("nan"), dtype=f64), labels[:2] % 3)
