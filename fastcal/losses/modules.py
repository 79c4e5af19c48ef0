"""nn.Module forms of ``fastcal.losses.functional``: the hyperparameters at construction, tensors per call."""

from __future__ import annotations

import torch
from torch import nn

from fastcal._checks import check_choice, check_number
from fastcal.losses import baselines as B
from fastcal.losses import functional as LF
from fastcal.ops import BACKENDS, REDUCTIONS


class CalibratedPromptLoss(nn.Module):
    """TCPT's calibrated loss, CE + R_margin + moment_weight * M (see ``calibrated_prompt_loss``).

    ``loss = CalibratedPromptLoss()(image_features, text_features, labels, logit_scale, frozen)``, or with
    ``return_parts=True`` ``(loss, {"ce", "margin", "moment"})``.
    """

    def __init__(
        self,
        margin_alpha: float = 0.1,
        margin_beta: float = 0.01,
        moment_weight: float = 5.0,
        label_smoothing: float = 0.0,
        backend: str = "auto",
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        self.margin_alpha = check_number("margin_alpha", margin_alpha, minimum=0.0)
        self.margin_beta = check_number("margin_beta", margin_beta, minimum=0.0)
        self.moment_weight = check_number("moment_weight", moment_weight, minimum=0.0)
        self.label_smoothing = check_number("label_smoothing", label_smoothing, minimum=0.0, maximum=1.0)
        self.backend = check_choice("backend", backend, BACKENDS)
        self.reduction = check_choice("reduction", reduction, REDUCTIONS)

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        labels: torch.Tensor,
        logit_scale: float | torch.Tensor,
        frozen_text_features: torch.Tensor | None = None,
        *,
        return_parts: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return LF.calibrated_prompt_loss(
            image_features,
            text_features,
            labels,
            logit_scale,
            frozen_text_features,
            margin_alpha=self.margin_alpha,
            margin_beta=self.margin_beta,
            moment_weight=self.moment_weight,
            label_smoothing=self.label_smoothing,
            reduction=self.reduction,
            backend=self.backend,
            return_parts=return_parts,
        )

    def extra_repr(self) -> str:
        return (
            f"margin_alpha={self.margin_alpha}, margin_beta={self.margin_beta}, "
            f"moment_weight={self.moment_weight}, label_smoothing={self.label_smoothing}, "
            f"backend={self.backend!r}, reduction={self.reduction!r}"
        )


class KgCoOpLoss(nn.Module):
    """KgCoOp's mean_c ||t_c - t0_c||^2 (see ``kgcoop_loss``)."""

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = check_choice("reduction", reduction, REDUCTIONS)

    def forward(self, text_features: torch.Tensor, frozen_text_features: torch.Tensor) -> torch.Tensor:
        return LF.kgcoop_loss(text_features, frozen_text_features, reduction=self.reduction)


class TextDispersion(nn.Module):
    """C-TPT's ATFD, mean_c ||t_c - centroid|| (see ``text_dispersion``)."""

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = check_choice("reduction", reduction, REDUCTIONS)

    def forward(self, text_features: torch.Tensor) -> torch.Tensor:
        return LF.text_dispersion(text_features, reduction=self.reduction)


class DispersionLoss(TextDispersion):
    """-ATFD (see ``dispersion_loss``)."""

    def forward(self, text_features: torch.Tensor) -> torch.Tensor:
        return LF.dispersion_loss(text_features, reduction=self.reduction)


class OutlierDriftLoss(nn.Module):
    """DOR's 1 - mean cos(tuned, frozen) over outlier text features (see ``outlier_drift_loss``)."""

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = check_choice("reduction", reduction, REDUCTIONS)

    def forward(
        self, tuned_outlier_features: torch.Tensor, frozen_outlier_features: torch.Tensor
    ) -> torch.Tensor:
        return LF.outlier_drift_loss(
            tuned_outlier_features, frozen_outlier_features, reduction=self.reduction
        )


class LabelSmoothedCrossEntropy(nn.Module):
    """Cross-entropy with label smoothing (see ``label_smoothed_cross_entropy``)."""

    def __init__(self, smoothing: float = 0.1, reduction: str = "mean") -> None:
        super().__init__()
        self.smoothing = check_number("smoothing", smoothing, minimum=0.0, maximum=1.0)
        self.reduction = check_choice("reduction", reduction, REDUCTIONS)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return LF.label_smoothed_cross_entropy(
            logits, labels, smoothing=self.smoothing, reduction=self.reduction
        )


class MarginalEntropy(nn.Module):
    """TPT's entropy of the mean softmax over views (see ``marginal_entropy``)."""

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = check_choice("reduction", reduction, REDUCTIONS)

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return LF.marginal_entropy(logits, reduction=self.reduction)


class MbLSLoss(nn.Module):
    """MbLS, CE + alpha mean relu(max z - z - margin) (see ``mbls_loss``)."""

    def __init__(self, margin: float = B.MBLS_MARGIN, alpha: float = B.MBLS_ALPHA, reduction: str = "mean"):
        super().__init__()
        self.margin = check_number("margin", margin, minimum=0.0)
        self.alpha = check_number("alpha", alpha, minimum=0.0)
        self.reduction = check_choice("reduction", reduction, REDUCTIONS)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return B.mbls_loss(logits, labels, margin=self.margin, alpha=self.alpha, reduction=self.reduction)


class ConfidencePenaltyLoss(nn.Module):
    """CE - weight x entropy / C (see ``confidence_penalty_loss``)."""

    def __init__(self, weight: float = B.CONFIDENCE_PENALTY_WEIGHT, reduction: str = "mean"):
        super().__init__()
        self.weight = check_number("weight", weight, minimum=0.0)
        self.reduction = check_choice("reduction", reduction, REDUCTIONS)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return B.confidence_penalty_loss(logits, labels, weight=self.weight, reduction=self.reduction)


class FocalLoss(nn.Module):
    """Focal loss, or FLSD-53 with ``adaptive=True`` (see ``focal_loss``)."""

    def __init__(self, gamma: float = B.FOCAL_GAMMA, adaptive: bool = False, reduction: str = "mean"):
        super().__init__()
        self.gamma = check_number("gamma", gamma, minimum=0.0)
        self.adaptive = bool(adaptive)
        self.reduction = check_choice("reduction", reduction, REDUCTIONS)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return B.focal_loss(
            logits, labels, gamma=self.gamma, adaptive=self.adaptive, reduction=self.reduction
        )


class MDCALoss(nn.Module):
    """MDCA over the batch, CE not included (see ``mdca_loss``)."""

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return B.mdca_loss(logits, labels)


class ZSNormLoss(nn.Module):
    """CE of the logits min-max rescaled to the zero-shot range (see ``zs_norm_loss``)."""

    def __init__(self, reduction: str = "mean"):
        super().__init__()
        self.reduction = check_choice("reduction", reduction, REDUCTIONS)

    def forward(
        self, logits: torch.Tensor, zeroshot_logits: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        return B.zs_norm_loss(logits, zeroshot_logits, labels, reduction=self.reduction)


class ZeroshotPenalty(nn.Module):
    """The logits' excursions outside the zero-shot range, unweighted (see ``zeroshot_penalty``)."""

    def forward(self, logits: torch.Tensor, zeroshot_logits: torch.Tensor) -> torch.Tensor:
        return B.zeroshot_penalty(logits, zeroshot_logits)
