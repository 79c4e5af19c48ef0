"""fastcal.losses modules: the same values as the functional forms, hyperparameters checked up front."""

import pytest
import torch

from fastcal import losses
from fastcal.losses import functional as LF


def test_modules_match_functional():
    g = torch.Generator().manual_seed(0)
    image, text, frozen = (torch.randn(n, 16, generator=g, dtype=torch.float64) for n in (7, 11, 11))
    labels = torch.randint(0, 11, (7,), generator=g)
    logits = torch.randn(7, 11, generator=g, dtype=torch.float64)
    views = torch.randn(3, 5, 11, generator=g, dtype=torch.float64)

    module = losses.CalibratedPromptLoss(
        margin_alpha=0.2, margin_beta=0.05, moment_weight=2.0, label_smoothing=0.1
    )
    loss, parts = module(image, text, labels, 30.0, frozen, return_parts=True)
    want, want_parts = LF.calibrated_prompt_loss(
        image, text, labels, 30.0, frozen, margin_alpha=0.2, margin_beta=0.05, moment_weight=2.0,
        label_smoothing=0.1, return_parts=True,
    )  # fmt: skip
    torch.testing.assert_close(loss, want)
    for key, value in want_parts.items():
        torch.testing.assert_close(parts[key], value)
    assert "moment_weight=2.0" in repr(module)

    pairs = [
        (losses.KgCoOpLoss()(text, frozen), LF.kgcoop_loss(text, frozen)),
        (losses.TextDispersion()(text), LF.text_dispersion(text)),
        (losses.DispersionLoss()(text), LF.dispersion_loss(text)),
        (
            losses.OutlierDriftLoss(reduction="sum")(text, frozen),
            LF.outlier_drift_loss(text, frozen, reduction="sum"),
        ),
        (
            losses.LabelSmoothedCrossEntropy(0.2)(logits, labels),
            LF.label_smoothed_cross_entropy(logits, labels, smoothing=0.2),
        ),
        (losses.MarginalEntropy(reduction="none")(views), LF.marginal_entropy(views, reduction="none")),
    ]
    for got, want in pairs:
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: losses.CalibratedPromptLoss(backend="gpu"), "backend: expected one of"),
        (
            lambda: losses.CalibratedPromptLoss(label_smoothing=-0.1),
            "label_smoothing: expected a number >= 0.0",
        ),
        (lambda: losses.CalibratedPromptLoss(reduction="batchmean"), "reduction: expected one of"),
        (lambda: losses.KgCoOpLoss(reduction="max"), "reduction: expected one of"),
        (lambda: losses.LabelSmoothedCrossEntropy(smoothing=2.0), "smoothing: expected a number <= 1.0"),
    ],
)
def test_modules_check_hyperparameters(make, message):
    with pytest.raises(ValueError, match=message):
        make()
