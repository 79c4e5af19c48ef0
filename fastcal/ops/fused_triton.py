"""The ``triton`` backend: the calibrated loss as torch.library custom ops around ``fastcal_kernels``.

Forward launch set: three row-normalization kernels (image, text, frozen text), one GEMM for the
cosines (cuBLAS through ``torch.mm``), the one-pass row kernel (CE, margins, and the CE part of the
gradient written over the cosines), the moment statistics (a centering kernel, one D x D or three C x C
GEMMs, a few element-wise ops), and the one-program second stage (mean and variance of the margins,
margin part of the gradient, the loss). Backward: two GEMMs (J t and J^T f, the moment gradient folded
into the second with ``addmm``) and the normalization Jacobians. Nothing reads a value back to the host
(no ``.item()``), so a training step around it can be captured in a CUDA graph; the logit scale is read
from device memory by the kernels. Grids, block sizes and warps come from
``fastcal.ops.triton_launches``.

Both directions are ``torch.library`` custom ops, ``fastcal::calibrated_loss`` and
``fastcal::calibrated_loss_backward``, each with a fake implementation that gives its outputs' shapes,
dtypes and devices from the inputs' alone: FakeTensorMode traces, ``torch.export`` and
``torch.compile`` see one opaque call and never launch a kernel. ``register_autograd`` joins the two.
An op keeps no context, so the forward also returns what its backward reads (the normalized features,
J, the moment gradients, ...), and the caller says which gradients are wanted (the op's body cannot see
autograd state); tensors that are not needed come back empty (0 elements).
"""

from __future__ import annotations

from typing import Any

import torch

from fastcal.ops import triton_launches as launches
from fastcal.ops.calibrated import triton_interpreting
from fastcal.ops.moments import use_gram_side
from fastcal.ops.native import REDUCTION_CODES
from fastcal.ops.reference import compute_dtype

# What the forward op returns after (loss, ce, margin, moment), in order.
SAVED = (
    "j",
    "f_hat",
    "f_rnorm",
    "t_hat",
    "t_rnorm",
    "t0_hat",
    "t0_rnorm",
    "dm_dt",
    "dm_dt0",
    "runner",
    "h",
    "margins",
)
_FORWARD_OUTPUTS = tuple[(torch.Tensor,) * (4 + len(SAVED))]


def _normalize(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    x = x if x.stride(-1) == 1 else x.contiguous()
    out = torch.empty(x.shape, device=x.device, dtype=dtype)
    rnorm = torch.empty(x.shape[0], device=x.device, dtype=dtype)
    launches.normalize_rows_launch(x, out, rnorm)()
    return out, rnorm


def _normalize_backward(
    grad_hat: torch.Tensor,
    x_hat: torch.Tensor,
    rnorm: torch.Tensor,
    scale: torch.Tensor,
    scale_mult: float,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    grad_hat = grad_hat if grad_hat.stride(-1) == 1 else grad_hat.contiguous()
    out = torch.empty(x_hat.shape, device=x_hat.device, dtype=out_dtype)
    launches.normalize_rows_backward_launch(grad_hat, x_hat, rnorm, scale, out, float(scale_mult))()
    return out


def _moment(
    t_hat: torch.Tensor, t0_hat: torch.Tensor, need_t: bool, need_t0: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """M, dM/dt_hat, dM/dt0_hat (see fastcal.ops.moments for the sum / difference form)."""
    n_classes, dim = t_hat.shape
    gram = use_gram_side(n_classes, dim)
    buffers = {"sum": torch.empty_like(t_hat), "diff": torch.empty_like(t_hat)}
    buffers["a"] = torch.empty_like(t_hat) if need_t and not gram else buffers["sum"]
    buffers["b"] = torch.empty_like(t_hat) if need_t0 and not gram else buffers["sum"]
    buffers["delta"] = torch.empty(dim, device=t_hat.device, dtype=t_hat.dtype)
    launches.center_pair_launch(
        t_hat, t0_hat, buffers, write_a=need_t and not gram, write_b=need_t0 and not gram
    )()
    sum_, diff, delta = buffers["sum"], buffers["diff"], buffers["delta"]
    inv_c2 = 1.0 / (n_classes * n_classes)
    mean_grad = (delta * (2.0 / n_classes)).expand(n_classes, dim)
    dm_dt = dm_dt0 = None
    if gram:
        p = sum_ @ sum_.T
        q = diff @ diff.T
        n = diff @ sum_.T
        gap = ((p * q).sum() + (n * n.T).sum()) * (0.5 * inv_c2)
        if need_t:
            dm_dt = torch.addmm(
                torch.addmm(mean_grad, n.T + q, sum_, alpha=inv_c2), p + n, diff, alpha=inv_c2
            )
        if need_t0:
            dm_dt0 = torch.addmm(
                torch.addmm(-mean_grad, n.T - q, sum_, alpha=-inv_c2), p - n, diff, alpha=-inv_c2
            )
    else:
        x = sum_.T @ diff
        e = (x + x.T) * 0.5
        gap = e.pow(2).sum() * inv_c2
        if need_t:
            dm_dt = torch.addmm(mean_grad, buffers["a"], e, alpha=4.0 * inv_c2)
        if need_t0:
            dm_dt0 = torch.addmm(-mean_grad, buffers["b"], e, alpha=-4.0 * inv_c2)
    return delta.dot(delta) + gap, dm_dt, dm_dt0


def _or_empty(x: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return x if x is not None else like.new_empty(0)


@torch.library.custom_op("fastcal::calibrated_loss", mutates_args=())
def calibrated_loss_op(
    image: torch.Tensor,
    text: torch.Tensor,
    frozen: torch.Tensor | None,
    scale: torch.Tensor,
    labels: torch.Tensor,
    alpha: float,
    beta: float,
    label_smoothing: float,
    moment_weight: float,
    reduction: int,
    need_image: bool,
    need_text: bool,
    need_frozen: bool,
    need_scale: bool,
) -> _FORWARD_OUTPUTS:
    """``(loss, ce, margin, moment, *SAVED)``: the fused forward (module docstring); ``scale`` is the
    exponentiated logit scale (one element), ``reduction`` a ``REDUCTION_CODES`` value, ``need_*``
    which gradients the backward will be asked for."""
    device = image.device
    dtype = compute_dtype(image, text, frozen)
    compute_grad = need_image or need_text or need_scale
    scale = scale.detach().reshape(1).to(device=device, dtype=dtype)
    labels = labels.contiguous()
    n_rows = image.shape[0]

    f_hat, f_rnorm = _normalize(image, dtype)
    t_hat, t_rnorm = _normalize(text, dtype)
    cos = f_hat @ t_hat.T  # becomes J in place when the gradient is wanted

    rows = {name: torch.empty(n_rows, device=device, dtype=dtype) for name in ("ce", "g_target", "g_runner")}
    rows["h"] = torch.empty(n_rows, device=device, dtype=dtype) if compute_grad else rows["ce"]
    rows["runner"] = torch.empty(n_rows, device=device, dtype=torch.int64)
    rows["labels"] = labels
    launches.ce_margin_rows_launch(
        cos,
        labels,
        scale,
        rows["ce"],
        rows["g_target"],
        rows["g_runner"],
        rows["runner"],
        rows["h"],
        float(label_smoothing),
        compute_grad,
    )()

    t0_hat = t0_rnorm = dm_dt = dm_dt0 = None
    if frozen is not None:
        t0_hat, t0_rnorm = _normalize(frozen, dtype)
        moment, dm_dt, dm_dt0 = _moment(t_hat, t0_hat, need_text, need_frozen)
        if not need_frozen:  # the backward needs them only for the frozen features' gradient
            t0_hat = t0_rnorm = None
    else:
        moment = torch.zeros((), device=device, dtype=dtype)

    outputs = {
        "per_row": torch.empty(n_rows, device=device, dtype=dtype) if reduction == 0 else rows["ce"],
        "margins": torch.empty(n_rows, device=device, dtype=dtype),
        "ce_mean": torch.empty((), device=device, dtype=dtype),
        "margin_reg": torch.empty((), device=device, dtype=dtype),
    }
    outputs["loss"] = outputs["per_row"] if reduction == 0 else torch.empty((), device=device, dtype=dtype)
    launches.margin_finalize_launch(
        rows,
        scale,
        moment,
        cos,
        outputs,
        alpha=float(alpha),
        beta=float(beta),
        moment_weight=float(moment_weight),
        reduction=reduction,
        compute_grad=compute_grad,
        has_moment=frozen is not None,
    )()
    return (
        outputs["loss"],
        outputs["ce_mean"],
        outputs["margin_reg"],
        moment,
        cos,
        f_hat,
        f_rnorm,
        t_hat,
        t_rnorm,
        _or_empty(t0_hat, f_rnorm),
        _or_empty(t0_rnorm, f_rnorm),
        _or_empty(dm_dt, f_rnorm),
        _or_empty(dm_dt0, f_rnorm),
        rows["runner"],
        rows["h"] if compute_grad else f_rnorm.new_empty(0),
        outputs["margins"],
    )


@calibrated_loss_op.register_fake
def _calibrated_loss_fake(
    image, text, frozen, scale, labels, alpha, beta, label_smoothing, moment_weight, reduction, *needs
):
    need_image, need_text, need_frozen, need_scale = needs
    dtype = compute_dtype(image, text, frozen)
    (n_rows, dim), n_classes = image.shape, text.shape[0]

    def new(*shape: Any, present: bool = True, element: torch.dtype = dtype) -> torch.Tensor:
        return image.new_empty(shape if present else (0,), dtype=element)

    has_frozen = frozen is not None
    return (
        new(n_rows) if reduction == 0 else new(),
        new(),
        new(),
        new(),
        new(n_rows, n_classes),
        new(n_rows, dim),
        new(n_rows),
        new(n_classes, dim),
        new(n_classes),
        new(n_classes, dim, present=has_frozen and need_frozen),
        new(n_classes, present=has_frozen and need_frozen),
        new(n_classes, dim, present=has_frozen and need_text),
        new(n_classes, dim, present=has_frozen and need_frozen),
        new(n_rows, element=torch.int64),
        new(n_rows, present=need_image or need_text or need_scale),
        new(n_rows),
    )


@torch.library.custom_op("fastcal::calibrated_loss_backward", mutates_args=())
def calibrated_loss_backward_op(
    grad_loss: torch.Tensor,
    j: torch.Tensor,
    f_hat: torch.Tensor,
    f_rnorm: torch.Tensor,
    t_hat: torch.Tensor,
    t_rnorm: torch.Tensor,
    t0_hat: torch.Tensor,
    t0_rnorm: torch.Tensor,
    dm_dt: torch.Tensor,
    dm_dt0: torch.Tensor,
    runner: torch.Tensor,
    h: torch.Tensor,
    margins: torch.Tensor,
    labels: torch.Tensor,
    scale: torch.Tensor,
    beta: float,
    moment_weight: float,
    reduction: int,
    image_dtype: torch.dtype,
    text_dtype: torch.dtype,
    frozen_dtype: torch.dtype,
    need_image: bool,
    need_text: bool,
    need_frozen: bool,
    need_scale: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``<grad_loss, loss>`` for image, text, frozen text and the scale (compute dtype,
    0-dim); empty where not wanted. The other arguments are the forward's (``SAVED``, labels, scale)."""
    n_rows = f_hat.shape[0]
    dtype = f_hat.dtype
    scale = scale.detach().reshape(1).to(device=f_hat.device, dtype=dtype)
    grad_loss = grad_loss.to(dtype)
    need_frozen = need_frozen and dm_dt0.numel() > 0
    has_moment = dm_dt.numel() > 0
    empty = f_hat.new_empty  # a fresh empty tensor per gradient not wanted: outputs may not alias
    grad_image = grad_text = grad_frozen = grad_scale = None
    if reduction != 0:
        # Uniform row weight g = grad / B ("mean") or grad ("sum"); the mean(m) coupling vanishes.
        g = grad_loss.reshape(1)
        g_mult = 1.0 / n_rows if reduction == 1 else 1.0
        moment_mult = moment_weight * n_rows
        if need_image:
            grad_image = _normalize_backward(j @ t_hat, f_hat, f_rnorm, g, g_mult, image_dtype)
        if need_text:
            gt = torch.addmm(dm_dt, j.T, f_hat, beta=moment_mult) if has_moment else j.T @ f_hat
            grad_text = _normalize_backward(gt, t_hat, t_rnorm, g, g_mult, text_dtype)
        if need_frozen:
            grad_frozen = _normalize_backward(dm_dt0, t0_hat, t0_rnorm, g, g_mult * moment_mult, frozen_dtype)
        if need_scale:
            grad_scale = h.sum() * g[0] * g_mult
    else:
        g = grad_loss.contiguous()
        coupling = (g * (margins - margins.mean())).sum() * (-2.0 * beta / n_rows)  # kappa / s
        kappa = coupling * scale[0]
        one = torch.ones(1, device=g.device, dtype=g.dtype)
        g_total = g.sum() * moment_weight
        if need_image:
            gf = (j @ t_hat) * g[:, None] + (t_hat[labels] - t_hat[runner]) * kappa
            grad_image = _normalize_backward(gf, f_hat, f_rnorm, one, 1.0, image_dtype)
        if need_text:
            gt = j.T @ (f_hat * g[:, None])
            fk = f_hat * kappa
            gt.index_add_(0, labels, fk).index_add_(0, runner, -fk)
            if has_moment:
                gt += dm_dt * g_total
            grad_text = _normalize_backward(gt, t_hat, t_rnorm, one, 1.0, text_dtype)
        if need_frozen:
            grad_frozen = _normalize_backward(dm_dt0 * g_total, t0_hat, t0_rnorm, one, 1.0, frozen_dtype)
        if need_scale:
            grad_scale = (g * h).sum() + coupling * margins.sum() / scale[0]
    return (
        grad_image if grad_image is not None else empty(0),
        grad_text if grad_text is not None else empty(0),
        grad_frozen if grad_frozen is not None else empty(0),
        grad_scale if grad_scale is not None else empty(0),
    )


@calibrated_loss_backward_op.register_fake
def _calibrated_loss_backward_fake(
    grad_loss, j, f_hat, f_rnorm, t_hat, t_rnorm, t0_hat, t0_rnorm, dm_dt, *rest
):
    dm_dt0 = rest[0]
    image_dtype, text_dtype, frozen_dtype, need_image, need_text, need_frozen, need_scale = rest[-7:]
    return (
        f_hat.new_empty(f_hat.shape if need_image else (0,), dtype=image_dtype if need_image else None),
        t_hat.new_empty(t_hat.shape if need_text else (0,), dtype=text_dtype if need_text else None),
        t_hat.new_empty(t_hat.shape, dtype=frozen_dtype)
        if need_frozen and dm_dt0.numel() > 0
        else f_hat.new_empty(0),
        f_hat.new_empty(() if need_scale else (0,)),
    )


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> None:
    image, text, frozen, scale, labels, _, beta, _, moment_weight, reduction, *needs = inputs
    ctx.save_for_backward(*output[4:], labels, scale)
    ctx.hyper = (beta, moment_weight, reduction)
    ctx.needs = tuple(needs)
    ctx.dtypes = (image.dtype, text.dtype, frozen.dtype if frozen is not None else text.dtype)
    ctx.scale_meta = (scale.dtype, scale.shape)
    ctx.mark_non_differentiable(*output[1:])


def _backward(ctx: Any, grad_loss: torch.Tensor, *_unused: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    wanted = [need and ctx.needs_input_grad[i] for i, need in enumerate(ctx.needs)]
    grads = calibrated_loss_backward_op(grad_loss, *ctx.saved_tensors, *ctx.hyper, *ctx.dtypes, *wanted)
    grad_image, grad_text, grad_frozen, grad_scale = (
        g if w else None for g, w in zip(grads, wanted, strict=True)
    )
    if grad_scale is not None:
        scale_dtype, scale_shape = ctx.scale_meta
        grad_scale = grad_scale.to(scale_dtype).reshape(scale_shape)
    return grad_image, grad_text, grad_frozen, grad_scale, *([None] * 10)


calibrated_loss_op.register_autograd(_backward, setup_context=_setup_context)


def triton_calibrated_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    frozen_text_features: torch.Tensor | None,
    logit_scale: float | torch.Tensor,
    labels: torch.Tensor,
    *,
    alpha: float,
    beta: float,
    label_smoothing: float,
    moment_weight: float,
    reduction: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, ce, margin, moment)`` through ``fastcal::calibrated_loss`` (CUDA, or CPU tensors under
    TRITON_INTERPRET=1); the last three are non-differentiable logging values."""
    device = image_features.device
    if device.type == "cpu" and not triton_interpreting():
        raise ValueError(
            "backend: expected CUDA tensors for 'triton' (or TRITON_INTERPRET=1), got CPU tensors"
        )
    if isinstance(logit_scale, torch.Tensor):
        scale = logit_scale
    else:
        dtype = compute_dtype(image_features, text_features, frozen_text_features)
        scale = torch.full((1,), float(logit_scale), device=device, dtype=dtype)
    grad = torch.is_grad_enabled()
    outputs = calibrated_loss_op(
        image_features,
        text_features,
        frozen_text_features,
        scale,
        labels,
        float(alpha),
        float(beta),
        float(label_smoothing),
        float(moment_weight),
        REDUCTION_CODES[reduction],
        grad and image_features.requires_grad,
        grad and text_features.requires_grad,
        grad and frozen_text_features is not None and frozen_text_features.requires_grad,
        grad and scale.requires_grad,
    )
    return outputs[0], outputs[1], outputs[2], outputs[3]
