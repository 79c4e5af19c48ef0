"""The train-time calibration baselines TCPT and DOR compare against, on a classifier's logits.

Each is written from its authors' public code (cited per function), in float32 or float64 as the
logits come, and differentiates through everything autograd can see. Where the references differ on
whether the cross-entropy is included, the function says which it returns. ``logits`` (B, C),
``labels`` (B,) integers in [0, C); ``zeroshot_logits`` (B, C), the frozen zero-shot CLIP's logits of
the same images over the same classes (no gradient flows into them). ``reduction``: ``"mean"`` (the
loss), ``"sum"`` (B times it) or ``"none"`` (per-sample terms whose mean is the loss), where the loss is
a mean over samples; MDCA is a batch statistic and has none.

Torch only, like ``fastcal.losses.functional``'s small losses: each is a few element-wise ops and row
reductions over the (B, C) logits the model has already produced, which autograd runs in a handful of
kernels, so a fused kernel would have nothing to save.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastcal._checks import check_choice, check_number, fail
from fastcal.losses.functional import _check_labels, _check_same_device, _check_tensor, _reduce
from fastcal.ops import REDUCTIONS

MBLS_MARGIN, MBLS_ALPHA = 10.0, 0.1
CONFIDENCE_PENALTY_WEIGHT = 0.1
ENTROPY_EPS = 1e-10  # MbLS calibrate/utils/constants.py EPS: probabilities clamped to [eps, 1 - eps]
FOCAL_GAMMA = 3.0
# FLSD-53 (Mukhoti et al., NeurIPS 2020): gamma 5 below p_t = 0.2, 3 below 0.5, the given gamma above
ADAPTIVE_GAMMAS = ((0.2, 5.0), (0.5, 3.0))
MDCA_WEIGHT = 1.0
ZEROSHOT_PENALTY_WEIGHT = 10.0


def _check_logits(logits: torch.Tensor, labels: torch.Tensor | None, reduction: str | None) -> None:
    _check_tensor("logits", logits, ndim=2, floating=True)
    if labels is not None:
        _check_labels(labels, logits.shape[0], logits.shape[1], "logits")
        _check_same_device(logits=logits, labels=labels)
    if reduction is not None:
        check_choice("reduction", reduction, REDUCTIONS)


def _check_zeroshot(zeroshot_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    _check_tensor("zeroshot_logits", zeroshot_logits, ndim=2, floating=True)
    if zeroshot_logits.shape != logits.shape:
        expected = f"shape {tuple(logits.shape)} like logits"
        raise fail("zeroshot_logits", expected, tuple(zeroshot_logits.shape))
    _check_same_device(logits=logits, zeroshot_logits=zeroshot_logits)
    return zeroshot_logits.detach().to(logits.dtype)


def mbls_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    margin: float = MBLS_MARGIN,
    alpha: float = MBLS_ALPHA,
    reduction: str = "mean",
) -> torch.Tensor:
    """MbLS, margin-based label smoothing (Liu et al., "The Devil is in the Margin", CVPR 2022), with CE:

        loss = CE(z, y) + alpha * mean_{i,k} relu(max_j z_ij - z_ik - margin)

    The penalty is a mean over all B x C entries, as in the authors' by-liu/MbLS
    ``calibrate/losses/logit_margin_l1.py`` (``LogitMarginL1``) and TCPT's copy
    (``trainers/regularizers.py`` ``LogitMarginL1``, lines 470-514); defaults margin 10, alpha 0.1 are
    theirs. CLIP's logits are 100 cos, so logit gaps of 10-30 make the margin active.
    """
    _check_logits(logits, labels, reduction)
    check_number("margin", margin, minimum=0.0)
    check_number("alpha", alpha, minimum=0.0)
    gaps = logits.amax(dim=1, keepdim=True) - logits
    penalty = F.relu(gaps - margin).mean(dim=1)
    return _reduce(F.cross_entropy(logits, labels.long(), reduction="none") + alpha * penalty, reduction)


def confidence_penalty_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    weight: float = CONFIDENCE_PENALTY_WEIGHT,
    reduction: str = "mean",
) -> torch.Tensor:
    """The confidence penalty (Pereyra et al., ICLR-W 2017), CE included: CE minus ``weight`` x the mean
    over B x C entries of -p log p, p clamped to [1e-10, 1 - 1e-10] (so the entropy term is H(p)/C per
    sample), as by-liu/MbLS ``calibrate/losses/penalty_entropy.py`` computes it (weight 0.1 in its
    ``configs/loss/penalty_ent.yaml``). Subtracting the entropy rewards less confident predictions.
    """
    _check_logits(logits, labels, reduction)
    check_number("weight", weight, minimum=0.0)
    probs = logits.softmax(dim=1).clamp(ENTROPY_EPS, 1.0 - ENTROPY_EPS)
    entropy = -(probs * probs.log()).mean(dim=1)
    per_sample = F.cross_entropy(logits, labels.long(), reduction="none") - weight * entropy
    return _reduce(per_sample, reduction)


def focal_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    gamma: float = FOCAL_GAMMA,
    adaptive: bool = False,
    reduction: str = "mean",
) -> torch.Tensor:
    """Focal loss (Lin et al., ICCV 2017), used for calibration by Mukhoti et al. (NeurIPS 2020):

        loss_i = -(1 - p_t)^gamma log p_t,    p_t = softmax(z_i)_{y_i}

    ``adaptive=True`` is their FLSD-53: gamma_i = 5 where p_t < 0.2, 3 where 0.2 <= p_t < 0.5, ``gamma``
    otherwise, the choice made without a gradient (by-liu/MbLS ``calibrate/losses/focal_loss.py`` and
    ``focal_loss_adaptive_gamma.py``; gamma 3 in ``configs/loss/focal.yaml``; their classes sum by
    default, the configs take the mean).
    """
    _check_logits(logits, labels, reduction)
    check_number("gamma", gamma, minimum=0.0)
    log_pt = logits.log_softmax(dim=1).gather(1, labels.long()[:, None]).squeeze(1)
    pt = log_pt.exp()
    exponent = torch.full_like(pt, float(gamma))
    if adaptive:
        p = pt.detach()
        for threshold, value in reversed(ADAPTIVE_GAMMAS):
            exponent = torch.where(p < threshold, value, exponent)
    return _reduce(-((1.0 - pt) ** exponent) * log_pt, reduction)


def mdca_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """MDCA, the multi-class difference in confidence and accuracy (Hebbalaguppe et al., CVPR 2022), CE
    not included: over the batch,

        MDCA = (1/C) sum_c | mean_i softmax(z_i)_c - mean_i [y_i = c] |

    as mdca-loss/MDCA-Calibration ``solvers/loss.py`` (``MDCA.forward``) computes it; their training loss
    is CE + beta MDCA, beta 1 in every MDCA run of ``scripts/cifar10.sh``. TCPT's inline copy
    (``trainers/kgcoop.py`` lines 441-450) averages the logits instead of the probabilities.
    """
    _check_logits(logits, labels, None)
    probs = logits.softmax(dim=1)
    frequency = F.one_hot(labels.long(), logits.shape[1]).to(probs.dtype).mean(dim=0)
    return (probs.mean(dim=0) - frequency).abs().mean()


def zs_norm_loss(
    logits: torch.Tensor, zeroshot_logits: torch.Tensor, labels: torch.Tensor, *, reduction: str = "mean"
) -> torch.Tensor:
    """ZS-Norm (Murugesan et al., "Robust Calibration of Large Vision-Language Adapters", ECCV 2024),
    replacing CE: each row of logits is min-max rescaled onto its zero-shot logits' range,

        z'_i = (z_i - min z_i) / (max z_i - min z_i) * (max zs_i - min zs_i) + min zs_i

    and the loss is CE(z', y) (Bala93/CLIPCalib ``trainers/adapters_zs_norm.py`` lines 763-767; TCPT
    ``trainers/regularizers.py`` ``eccv_zs``, lines 452-468). The division has no epsilon there; a row
    whose logits are all equal (0 / 0) is mapped to its zero-shot minimum here.
    """
    _check_logits(logits, labels, reduction)
    zs = _check_zeroshot(zeroshot_logits, logits)
    low, high = logits.amin(dim=1, keepdim=True), logits.amax(dim=1, keepdim=True)
    zs_low, zs_high = zs.amin(dim=1, keepdim=True), zs.amax(dim=1, keepdim=True)
    scale = (high - low).clamp(min=torch.finfo(logits.dtype).tiny)
    rescaled = (logits - low) / scale * (zs_high - zs_low) + zs_low
    return F.cross_entropy(rescaled, labels.long(), reduction=reduction)


def zeroshot_penalty(logits: torch.Tensor, zeroshot_logits: torch.Tensor) -> torch.Tensor:
    """The zero-shot range penalty of Murugesan et al. (ECCV 2024, their "Penalty" baseline), CE and the
    weight not included: the logits' excursions outside each row's zero-shot range,

        P = mean_{i,k} relu(z_ik - max_k zs_ik) + mean_{i,k} relu(min_k zs_ik - z_ik)

    (Bala93/CLIPCalib ``trainers/adapters_zs_pen.py`` lines 760-767, loss ``CE + 10 P``; TCPT
    ``trainers/regularizers.py`` ``eccv_penalty``, lines 437-449, which returns ``10 P``).
    """
    _check_logits(logits, None, None)
    zs = _check_zeroshot(zeroshot_logits, logits)
    above = F.relu(logits - zs.amax(dim=1, keepdim=True)).mean()
    below = F.relu(zs.amin(dim=1, keepdim=True) - logits).mean()
    return above + below
