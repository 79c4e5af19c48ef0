"""Calibration losses for prompt tuning of CLIP-like models, as functions.

Every function validates its inputs (``fastcal._checks``: a ValueError naming the argument, what was
expected and what was received) and differentiates with respect to every floating-point input that
requires a gradient. Checks that read tensor values (finiteness, label range, zero rows, a positive
scale) are skipped while a CUDA graph is being captured, where they would synchronize with the host,
and inside ``with value_checks(False):`` (a training loop's hot path).

- ``calibrated_prompt_loss``: TCPT, fused on three backends (``fastcal.ops``).
- ``kgcoop_loss``, ``text_dispersion`` / ``dispersion_loss``, ``outlier_drift_loss``,
  ``label_smoothed_cross_entropy``, ``marginal_entropy``: torch only; each is a handful of element-wise
  ops or reductions over small (C, D) or (V, C) inputs that autograd already handles in a few kernels,
  so there is nothing for a fused kernel to save.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from fastcal._checks import check_choice, check_labels, check_number, check_same_size, check_tensor, fail
from fastcal.ops import BACKENDS, REDUCTIONS
from fastcal.ops import calibrated_prompt_loss as _calibrated_prompt_loss_op

__all__ = [
    "calibrated_prompt_loss",
    "dispersion_loss",
    "kgcoop_loss",
    "label_smoothed_cross_entropy",
    "marginal_entropy",
    "outlier_drift_loss",
    "text_dispersion",
]


_VALUE_CHECKS = threading.local()
# CLIP caps its learned scale at 100; 10^4 leaves room for sharper scales while the squared margins of
# the variance term, up to (2 s)^2 = 4e8, and their sums stay far inside float32's range.
MAX_LOGIT_SCALE = 1e4


@contextmanager
def value_checks(enabled: bool) -> Iterator[None]:
    """Turn the checks that read tensor values (finiteness, label range, zero rows, a positive scale) on
    or off in this thread for the body; shape, dtype and device checks always run. Off, no loss call
    synchronizes with a GPU: for training loops that check their loss themselves, e.g. once an epoch."""
    previous = getattr(_VALUE_CHECKS, "enabled", True)
    _VALUE_CHECKS.enabled = bool(enabled)
    try:
        yield
    finally:
        _VALUE_CHECKS.enabled = previous


def _values_readable(x: torch.Tensor) -> bool:
    """False where value checks are off (``value_checks``) or while a CUDA graph is being captured
    (reading values would sync with the host)."""
    if not getattr(_VALUE_CHECKS, "enabled", True):
        return False
    return not (x.is_cuda and torch.cuda.is_current_stream_capturing())


def _check_tensor(name: str, x: torch.Tensor, **kinds: object) -> bool:
    """check_tensor, with the finiteness check only where values may be read; returns whether they may."""
    check_tensor(name, x, finite=False, **kinds)
    readable = _values_readable(x)
    if readable:
        check_tensor(name, x)
    return readable


def _check_labels(labels: torch.Tensor, n_rows: int, n_classes: int, rows_name: str) -> None:
    if _check_tensor("labels", labels, ndim=1, integer=True):
        check_labels("labels", labels, n_rows, n_classes)
    else:
        check_same_size("labels", labels.shape[0], rows_name, n_rows, "length")


def _check_features(name: str, x: torch.Tensor, *, min_rows: int = 1) -> torch.Tensor:
    """A finite 2-D floating (N, D) tensor with at least ``min_rows`` rows, none of them zero.

    One pass over the values: the row norms are NaN or inf exactly when a row holds NaN or inf (or
    overflows when squared) and zero exactly for an all-zero row.
    """
    check_tensor(name, x, ndim=2, floating=True, finite=False)
    if x.shape[1] == 0:
        raise fail(name, "a feature dimension D >= 1", f"shape {tuple(x.shape)}")
    if x.shape[0] < min_rows:
        raise fail(name, f"at least {min_rows} rows", f"shape {tuple(x.shape)}")
    if _values_readable(x):
        norms = torch.linalg.vector_norm(x.detach(), dim=1)
        non_finite, zero = torch.stack([(~torch.isfinite(norms)).any(), (norms == 0).any()]).tolist()
        if non_finite:
            check_tensor(name, x)  # names the non-finite entries
            raise fail(name, f"rows whose L2 norm is finite in {x.dtype}", "rows that overflow")
        if zero:
            n_zero = int((norms == 0).sum())
            raise fail(name, "rows with a nonzero norm (they are L2-normalized)", f"{n_zero} all-zero rows")
    return x


def _check_same_device(**tensors: torch.Tensor | None) -> None:
    items = [(name, x) for name, x in tensors.items() if isinstance(x, torch.Tensor)]
    first_name, first = items[0]
    for name, x in items[1:]:
        if x.device != first.device:
            raise fail(name, f"a tensor on {first.device} like {first_name}", f"a tensor on {x.device}")


def _check_logit_scale(logit_scale: float | torch.Tensor) -> None:
    """The exponentiated scale s in (0, MAX_LOGIT_SCALE], the same check for every backend."""
    expected = f"an exponentiated scale in (0, {MAX_LOGIT_SCALE:g}] (CLIP caps it at 100)"
    if isinstance(logit_scale, torch.Tensor):
        if logit_scale.numel() != 1 or logit_scale.ndim > 1:
            raise fail("logit_scale", "a float or a 0-dim tensor", f"shape {tuple(logit_scale.shape)}")
        if _check_tensor("logit_scale", logit_scale, floating=True):
            value = float(logit_scale.detach())
            if not 0.0 < value <= MAX_LOGIT_SCALE:
                raise fail("logit_scale", expected, value)
    else:
        value = check_number("logit_scale", logit_scale)
        if not 0.0 < value <= MAX_LOGIT_SCALE:
            raise fail("logit_scale", expected, value)


def _reduce(values: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return values.mean()
    if reduction == "sum":
        return values.sum()
    return values


def calibrated_prompt_loss(
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
    backend: str = "auto",
    return_parts: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """TCPT's calibrated prompt-tuning loss: CE + mean-variance margin + text moment matching.

    TCPT ("Towards Calibrating Prompt Tuning of Vision-Language Models", CVPR 2026; code
    ashshaksharifdeen/TCPT, ``trainers/regularizers.py``: ``margin_mean_var``, ``text_moment_matching``).
    Features are L2-normalized inside; with z_ic = s <f_i, t_c> (s = ``logit_scale``, exponentiated):

        CE      = mean_i cross_entropy(z_i, y_i)        (optional label smoothing eps)
        m_i     = z_{i,y_i} - max_{c != y_i} z_ic
        R       = -alpha mean(m) + beta Var(m)           (population variance)
        M       = ||mean t - mean t0||^2 + ||Cov(t) - Cov(t0)||_F^2,  Cov = (1/C) sum_c (t_c - mu)(t_c - mu)^T
        loss    = CE + R + moment_weight * M             (M = 0 without ``frozen_text_features``)

    Args:
        image_features: (B, D) image features (any float dtype).
        text_features: (C, D) class text features from the tuned prompts, C >= 2.
        labels: (B,) integer labels in [0, C).
        logit_scale: the exponentiated scale s > 0, a float or a 0-dim tensor (may require grad).
        frozen_text_features: (C, D) zero-shot (frozen) class text features, or None for no moment term.
        margin_alpha, margin_beta, moment_weight: the weights alpha, beta, w (defaults of the TCPT code).
        label_smoothing: eps in [0, 1], as in ``torch.nn.functional.cross_entropy``.
        reduction: "mean" (the loss above), "sum" (B times it) or "none": the per-sample terms
            v_i = CE_i - alpha m_i + beta (m_i - mean m)^2 + w M, whose mean is the loss.
        backend: "auto" (triton on CUDA, native on CPU when its C++ builds, else torch), "torch",
            "triton" or "native" (see ``fastcal.ops``).
        return_parts: also return ``{"ce", "margin", "moment"}`` (detached 0-dim tensors: CE, R and M
            unweighted), for logging.

    Returns:
        The loss in float32 (float64 for float64 inputs), and the parts when ``return_parts``. B = 1 is
        defined (Var(m) = 0); C = 1 is rejected (no runner-up class, no margin).
    """
    _check_features("image_features", image_features)
    _check_features("text_features", text_features, min_rows=2)
    check_same_size("text_features", text_features.shape[1], "image_features", image_features.shape[1], "dim")
    if frozen_text_features is not None:
        _check_features("frozen_text_features", frozen_text_features)
        if frozen_text_features.shape != text_features.shape:
            raise fail(
                "frozen_text_features",
                f"shape {tuple(text_features.shape)} like text_features",
                f"shape {tuple(frozen_text_features.shape)}",
            )
    _check_same_device(
        image_features=image_features,
        text_features=text_features,
        labels=labels,
        frozen_text_features=frozen_text_features,
    )
    _check_labels(labels, image_features.shape[0], text_features.shape[0], "image_features")
    _check_logit_scale(logit_scale)
    if isinstance(logit_scale, torch.Tensor) and logit_scale.device != image_features.device:
        # A CPU scalar is fine with CUDA features in the torch backend; keep one device for the fused ones.
        logit_scale = logit_scale.to(image_features.device)
    check_number("margin_alpha", margin_alpha, minimum=0.0)
    check_number("margin_beta", margin_beta, minimum=0.0)
    check_number("moment_weight", moment_weight, minimum=0.0)
    check_number("label_smoothing", label_smoothing, minimum=0.0, maximum=1.0)
    check_choice("reduction", reduction, REDUCTIONS)
    check_choice("backend", backend, BACKENDS)

    loss, parts = _calibrated_prompt_loss_op(
        image_features,
        text_features,
        labels,
        logit_scale,
        frozen_text_features,
        margin_alpha=float(margin_alpha),
        margin_beta=float(margin_beta),
        moment_weight=float(moment_weight),
        label_smoothing=float(label_smoothing),
        reduction=reduction,
        backend=backend,
    )
    return (loss, parts) if return_parts else loss


def kgcoop_loss(
    text_features: torch.Tensor, frozen_text_features: torch.Tensor, *, reduction: str = "mean"
) -> torch.Tensor:
    """KgCoOp's knowledge-guided term: mean_c ||t_c - t0_c||_2^2 over L2-normalized class features.

    Yao et al., "Visual-Language Prompt Tuning with Knowledge-guided Context Optimization", CVPR 2023
    (htyao89/KgCoOp). This is the paper's L_kg; for unit vectors ||t - t0||^2 = 2 (1 - cos(t, t0)), so it
    is twice the score ``1 - mean cos`` of their ``trainers/kgcoop.py`` (their recipe weights that score
    by 8.0, i.e. this loss by 4.0 for the same gradient). reduction: "mean", "sum" or "none" (per class).
    """
    _check_features("text_features", text_features)
    _check_features("frozen_text_features", frozen_text_features)
    if frozen_text_features.shape != text_features.shape:
        raise fail(
            "frozen_text_features",
            f"shape {tuple(text_features.shape)} like text_features",
            f"shape {tuple(frozen_text_features.shape)}",
        )
    _check_same_device(text_features=text_features, frozen_text_features=frozen_text_features)
    check_choice("reduction", reduction, REDUCTIONS)
    t = F.normalize(text_features, dim=-1)
    t0 = F.normalize(frozen_text_features.to(t.dtype), dim=-1)
    return _reduce((t - t0).pow(2).sum(dim=-1), reduction)


def text_dispersion(text_features: torch.Tensor, *, reduction: str = "mean") -> torch.Tensor:
    """ATFD of C-TPT: mean_c ||t_c - centroid||_2 over L2-normalized class text features.

    Yoon et al., "C-TPT: Calibrated Test-Time Prompt Tuning for Vision-Language Models via Text Feature
    Dispersion", ICLR 2024 (hee-suk-yoon/C-TPT); centroid = mean_c t_c of the normalized features.

    text_features: (C, D) -> 0-dim; or (S, C, D), one class set per sample (batched TPT) -> one ATFD
    per sample, reduced over S with ``reduction`` ("mean", "sum" or "none").
    """
    check_tensor("text_features", text_features, ndim=(2, 3), floating=True, finite=False)
    check_choice("reduction", reduction, REDUCTIONS)
    _check_features("text_features", text_features.reshape(-1, text_features.shape[-1]))
    t = F.normalize(text_features, dim=-1)
    dispersion = (t - t.mean(dim=-2, keepdim=True)).norm(dim=-1).mean(dim=-1)
    return dispersion if text_features.ndim == 2 else _reduce(dispersion, reduction)


def dispersion_loss(text_features: torch.Tensor, *, reduction: str = "mean") -> torch.Tensor:
    """-ATFD: minimizing it spreads the class text features (C-TPT adds lambda times this to the entropy).
    Shapes and ``reduction`` as ``text_dispersion``."""
    return -text_dispersion(text_features, reduction=reduction)


def orthogonality_penalty(text_features: torch.Tensor, *, reduction: str = "mean") -> torch.Tensor:
    """O-TPT's orthogonality penalty on L2-normalized class text features ``t_c``::

        P(T) = mean_c ( ||G_c||_2 - 1 ),   G = T T^T,   ||G_c||^2 = 1 + sum_{j != c} cos(t_c, t_j)^2

    (Sharifdeen et al., CVPR 2025; ashshaksharifdeen/O-TPT ``otpt_classification.py``, which builds one
    Householder reflection per class, a C x C x C tensor, whose result reduces exactly to this row-norm
    form). ``||G_c||^2 = t_c^T (T^T T) t_c``, so the Gram matrix of the smaller side is formed: C x C
    when C <= D, else D x D; never C x C x C.

    text_features: (C, D) -> 0-dim; or (S, C, D), one class set per sample (batched TPT) -> one penalty
    per sample, reduced over S with ``reduction``.
    """
    check_tensor("text_features", text_features, ndim=(2, 3), floating=True, finite=False)
    check_choice("reduction", reduction, REDUCTIONS)
    _check_features("text_features", text_features.reshape(-1, text_features.shape[-1]))
    t = F.normalize(text_features, dim=-1)
    if t.shape[-2] <= t.shape[-1]:
        gram = t @ t.transpose(-1, -2)
        row_norm_sq = (gram * gram).sum(dim=-1)
    else:
        row_norm_sq = ((t @ (t.transpose(-1, -2) @ t)) * t).sum(dim=-1)
    penalty = (row_norm_sq.sqrt() - 1.0).mean(dim=-1)
    return penalty if text_features.ndim == 2 else _reduce(penalty, reduction)


def outlier_drift_loss(
    tuned_outlier_features: torch.Tensor, frozen_outlier_features: torch.Tensor, *, reduction: str = "mean"
) -> torch.Tensor:
    """DOR's drift term: 1 - mean_b cos(tuned_b, frozen_b) for outlier text features.

    The tuned prompt's features of outlier class names should stay where the frozen model put them.
    reduction: "mean" (1 - mean cos), "sum" (sum of 1 - cos) or "none" (1 - cos per row).
    """
    _check_features("tuned_outlier_features", tuned_outlier_features)
    _check_features("frozen_outlier_features", frozen_outlier_features)
    if frozen_outlier_features.shape != tuned_outlier_features.shape:
        raise fail(
            "frozen_outlier_features",
            f"shape {tuple(tuned_outlier_features.shape)} like tuned_outlier_features",
            f"shape {tuple(frozen_outlier_features.shape)}",
        )
    _check_same_device(
        tuned_outlier_features=tuned_outlier_features, frozen_outlier_features=frozen_outlier_features
    )
    check_choice("reduction", reduction, REDUCTIONS)
    frozen = frozen_outlier_features.to(tuned_outlier_features.dtype)
    return _reduce(1.0 - F.cosine_similarity(tuned_outlier_features, frozen, dim=-1), reduction)


def label_smoothed_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, *, smoothing: float = 0.1, reduction: str = "mean"
) -> torch.Tensor:
    """Cross-entropy against q = (1 - eps) e_y + eps / C (Szegedy et al., 2016), as torch defines it.

    logits (B, C), labels (B,) in [0, C); reduction "mean", "sum" or "none".
    """
    _check_tensor("logits", logits, ndim=2, floating=True)
    _check_labels(labels, logits.shape[0], logits.shape[1], "logits")
    _check_same_device(logits=logits, labels=labels)
    check_number("smoothing", smoothing, minimum=0.0, maximum=1.0)
    check_choice("reduction", reduction, REDUCTIONS)
    return F.cross_entropy(logits, labels.long(), label_smoothing=float(smoothing), reduction=reduction)


def marginal_entropy(logits: torch.Tensor, *, reduction: str = "mean") -> torch.Tensor:
    """TPT's marginal entropy: H(p_bar) with p_bar = mean over views of softmax(logits).

    Shu et al., "Test-Time Prompt Tuning for Zero-Shot Generalization in Vision-Language Models",
    NeurIPS 2022 (azshue/TPT). Computed in log space: log p_bar = logsumexp_v log_softmax(z_v) - log V,
    H = -sum_c p_bar_c log p_bar_c.

    logits: (V, C) views of one sample -> 0-dim; or (N, V, C) for N samples -> reduced over N with
    ``reduction`` ("mean", "sum" or "none").
    """
    _check_tensor("logits", logits, ndim=(2, 3), floating=True)
    check_choice("reduction", reduction, REDUCTIONS)
    n_views = logits.shape[-2]
    log_probs = logits.log_softmax(dim=-1)
    log_mean = torch.logsumexp(log_probs, dim=-2) - math.log(n_views)
    entropy = -(log_mean.exp() * log_mean).sum(dim=-1)
    return entropy if logits.ndim == 2 else _reduce(entropy, reduction)
