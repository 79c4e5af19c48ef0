"""The ``torch`` backend: the calibrated prompt loss of TCPT written as its formula reads.

TCPT ("Towards Calibrating Prompt Tuning of Vision-Language Models", CVPR 2026; public code
ashshaksharifdeen/TCPT, ``trainers/regularizers.py`` and ``trainers/coop.py``). With f_i (B, D) image,
t_c (C, D) tuned text and t0_c (C, D) frozen text features, each L2-normalized, and s the (already
exponentiated) logit scale:

    z_ic   = s <f_i, t_c>
    CE     = mean_i cross_entropy(z_i, y_i)    (label smoothing eps as torch: q = (1-eps) e_y + eps/C)
    m_i    = z_{i,y_i} - max_{c != y_i} z_ic
    R      = -alpha mean_i m_i + beta Var_i m_i (population variance)
    M      = ||mean_c t_c - mean_c t0_c||^2 + ||Cov(t) - Cov(t0)||_F^2
    Cov    = (1/C) sum_c (t_c - mu)(t_c - mu)^T
    loss   = CE + R + w M

Per row the loss splits as v_i = CE_i - alpha m_i + beta (m_i - mean m)^2 + w M, whose mean is the loss
above; reduction "mean" / "sum" / "none" returns the mean / sum / vector of v.

This module runs on any device and computes in float32 or wider (half inputs are upcast, their
gradients come back in their dtype). It is what the fused backends are tested against in float64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastcal.ops.moments import covariance_gap_sq


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 if any input is float64, else float32: the precision every backend computes in."""
    dtype = torch.float32
    for x in tensors:
        if x is not None:
            dtype = torch.promote_types(dtype, x.dtype)
    return dtype


def normalize_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` scaled to unit L2 norm (callers reject zero rows before)."""
    return x / x.norm(dim=-1, keepdim=True)


def text_moment_gap(text_features: torch.Tensor, frozen_text_features: torch.Tensor) -> torch.Tensor:
    """M = ||mean t - mean t0||^2 + ||Cov(t) - Cov(t0)||_F^2 for normalized (C, D) features."""
    mu, mu0 = text_features.mean(0), frozen_text_features.mean(0)
    mean_gap = (mu - mu0).pow(2).sum()
    return mean_gap + covariance_gap_sq(text_features - mu, frozen_text_features - mu0)


def calibrated_prompt_loss_reference(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    labels: torch.Tensor,
    logit_scale: float | torch.Tensor,
    frozen_text_features: torch.Tensor | None = None,
    *,
    margin_alpha: float = 0.1,
    margin_beta: float = 0.01,
    moment_weight: float = 5.0,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss and its detached parts ``{"ce", "margin", "moment"}`` (inputs assumed valid)."""
    dtype = compute_dtype(image_features, text_features, frozen_text_features)
    f = normalize_rows(image_features.to(dtype))
    t = normalize_rows(text_features.to(dtype))
    scale = logit_scale.to(dtype) if isinstance(logit_scale, torch.Tensor) else logit_scale
    logits = scale * (f @ t.T)

    ce_rows = F.cross_entropy(logits, labels, label_smoothing=label_smoothing, reduction="none")
    target = logits.gather(1, labels[:, None]).squeeze(1)
    is_target = F.one_hot(labels, logits.shape[1]).bool()
    # max(dim) sends the gradient to the first maximal index, like the fused backends (amax would split it).
    runner_up = logits.masked_fill(is_target, float("-inf")).max(dim=1).values
    margin = target - runner_up
    deviation = margin - margin.mean()
    per_row = ce_rows - margin_alpha * margin + margin_beta * deviation.pow(2)

    if frozen_text_features is not None:
        moment = text_moment_gap(t, normalize_rows(frozen_text_features.to(dtype)))
        per_row = per_row + moment_weight * moment
    else:
        moment = logits.new_zeros(())

    if reduction == "mean":
        loss = per_row.mean()
    elif reduction == "sum":
        loss = per_row.sum()
    else:
        loss = per_row
    parts = {
        "ce": ce_rows.mean().detach(),
        "margin": (-margin_alpha * margin.mean() + margin_beta * deviation.pow(2).mean()).detach(),
        "moment": moment.detach(),
    }
    return loss, parts
