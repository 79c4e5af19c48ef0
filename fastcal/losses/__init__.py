"""fastcal.losses: drop-in calibration losses for prompt tuning (functional forms in ``.functional``).

- ``CalibratedPromptLoss`` / ``calibrated_prompt_loss``: TCPT, CE + mean-variance margin
  penalty + text moment matching, fused on the torch / triton / native backends of ``fastcal.ops``.
- ``KgCoOpLoss`` / ``kgcoop_loss`` (KgCoOp), ``TextDispersion`` / ``text_dispersion`` and
  ``DispersionLoss`` / ``dispersion_loss`` (C-TPT's ATFD and its negative), ``OutlierDriftLoss`` /
  ``outlier_drift_loss`` (DOR), ``orthogonality_penalty`` (O-TPT), ``LabelSmoothedCrossEntropy`` /
  ``label_smoothed_cross_entropy``,
  ``MarginalEntropy`` / ``marginal_entropy`` (TPT): plain torch.
- The train-time calibration baselines (``.baselines``): ``MbLSLoss`` / ``mbls_loss`` (MbLS),
  ``ConfidencePenaltyLoss`` / ``confidence_penalty_loss``, ``FocalLoss`` / ``focal_loss`` (and FLSD-53),
  ``MDCALoss`` / ``mdca_loss``, ``ZSNormLoss`` / ``zs_norm_loss`` and ``ZeroshotPenalty`` /
  ``zeroshot_penalty`` (ZS-Norm and the zero-shot penalty of Murugesan et al.): plain torch.
- ``value_checks(False)``: a context in which no loss reads tensor values to validate them (no host
  synchronization on a GPU), for a training loop that checks its loss itself.
"""

from fastcal.losses.baselines import (
    confidence_penalty_loss,
    focal_loss,
    mbls_loss,
    mdca_loss,
    zeroshot_penalty,
    zs_norm_loss,
)
from fastcal.losses.functional import (
    calibrated_prompt_loss,
    dispersion_loss,
    kgcoop_loss,
    label_smoothed_cross_entropy,
    marginal_entropy,
    orthogonality_penalty,
    outlier_drift_loss,
    text_dispersion,
    value_checks,
)
from fastcal.losses.modules import (
    CalibratedPromptLoss,
    ConfidencePenaltyLoss,
    DispersionLoss,
    FocalLoss,
    KgCoOpLoss,
    LabelSmoothedCrossEntropy,
    MarginalEntropy,
    MbLSLoss,
    MDCALoss,
    OutlierDriftLoss,
    TextDispersion,
    ZeroshotPenalty,
    ZSNormLoss,
)

__all__ = [
    "CalibratedPromptLoss",
    "ConfidencePenaltyLoss",
    "DispersionLoss",
    "FocalLoss",
    "KgCoOpLoss",
    "LabelSmoothedCrossEntropy",
    "MDCALoss",
    "MarginalEntropy",
    "MbLSLoss",
    "OutlierDriftLoss",
    "TextDispersion",
    "ZSNormLoss",
    "ZeroshotPenalty",
    "calibrated_prompt_loss",
    "confidence_penalty_loss",
    "dispersion_loss",
    "focal_loss",
    "kgcoop_loss",
    "label_smoothed_cross_entropy",
    "marginal_entropy",
    "mbls_loss",
    "mdca_loss",
    "orthogonality_penalty",
    "outlier_drift_loss",
    "text_dispersion",
    "value_checks",
    "zeroshot_penalty",
    "zs_norm_loss",
]
