"""fastcal.losses: drop-in calibration losses for prompt tuning (functional forms in ``.functional``).

- ``CalibratedPromptLoss`` / ``calibrated_prompt_loss``: TCPT, CE + mean-variance margin
  penalty + text moment matching, fused on the torch / triton / native backends of ``fastcal.ops``.
- ``KgCoOpLoss`` / ``kgcoop_loss`` (KgCoOp), ``TextDispersion`` / ``text_dispersion`` and
  ``DispersionLoss`` / ``dispersion_loss`` (C-TPT's ATFD and its negative), ``OutlierDriftLoss`` /
  ``outlier_drift_loss`` (DOR), ``orthogonality_penalty`` (O-TPT), ``LabelSmoothedCrossEntropy`` /
  ``label_smoothed_cross_entropy``,
  ``MarginalEntropy`` / ``marginal_entropy`` (TPT): plain torch.
- ``value_checks(False)``: a context in which no loss reads tensor values to validate them (no host
  synchronization on a GPU), for a training loop that checks its loss itself.
"""

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
    DispersionLoss,
    KgCoOpLoss,
    LabelSmoothedCrossEntropy,
    MarginalEntropy,
    OutlierDriftLoss,
    TextDispersion,
)

__all__ = [
    "CalibratedPromptLoss",
    "DispersionLoss",
    "KgCoOpLoss",
    "LabelSmoothedCrossEntropy",
    "MarginalEntropy",
    "OutlierDriftLoss",
    "TextDispersion",
    "calibrated_prompt_loss",
    "dispersion_loss",
    "kgcoop_loss",
    "label_smoothed_cross_entropy",
    "marginal_entropy",
    "orthogonality_penalty",
    "outlier_drift_loss",
    "text_dispersion",
    "value_checks",
]
