"""The ``triton`` backend: launchers and the autograd Function around ``fastcal_kernels.calibrated_loss``.

Forward launch set: three row-normalization kernels (image, text, frozen text), one GEMM for the
cosines (cuBLAS through ``torch.mm``), the one-pass row kernel (CE, margins, and the CE part of the
gradient written over the cosines), the moment statistics (a centering kernel, one D x D or three C x C
GEMMs, a few element-wise ops), and the one-program second stage (mean and variance of the margins,
margin part of the gradient, the loss). Backward: two GEMMs (J t and J^T f, the moment gradient folded
into the second with ``addmm``) and the normalization Jacobians. Nothing reads a value back to the host
(no ``.item()``), so a training step around it can be captured in a CUDA graph; the logit scale is read
from device memory by the kernels.

Block sizes: on a GPU, tiles of about 4k elements; in the interpreter (CPU tensors under
TRITON_INTERPRET=1), where each program costs about a millisecond whatever its size, tiles of up to 64k
elements so a test launches tens of programs.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
from fastcal_kernels.calibrated_loss import (
    ce_margin_rows_kernel,
    center_pair_kernel,
    margin_finalize_kernel,
    normalize_rows_backward_kernel,
    normalize_rows_kernel,
)
from torch.autograd.function import once_differentiable

from fastcal.ops.calibrated import triton_interpreting
from fastcal.ops.moments import use_gram_side
from fastcal.ops.native import REDUCTION_CODES
from fastcal.ops.reference import compute_dtype


def _tile_elements(device: torch.device) -> int:
    return 65536 if device.type == "cpu" else 4096


def _row_tiles(n_rows: int, n_cols: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_ROWS, BLOCK_COLS, number of programs) for a row-wise kernel over an (n_rows, n_cols) tile."""
    budget = _tile_elements(device)
    block_cols = min(triton.next_power_of_2(n_cols), budget)
    block_rows = min(triton.next_power_of_2(n_rows), max(1, budget // block_cols))
    return block_rows, block_cols, triton.cdiv(n_rows, block_rows)


def _normalize(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    x = x if x.stride(-1) == 1 else x.contiguous()
    n_rows, n_cols = x.shape
    out = torch.empty((n_rows, n_cols), device=x.device, dtype=dtype)
    rnorm = torch.empty(n_rows, device=x.device, dtype=dtype)
    block_rows, block_cols, programs = _row_tiles(n_rows, n_cols, x.device)
    normalize_rows_kernel[(programs,)](
        x,
        out,
        rnorm,
        n_rows,
        n_cols,
        x.stride(0),
        out.stride(0),
        BLOCK_ROWS=block_rows,
        BLOCK_COLS=block_cols,
    )
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
    n_rows, n_cols = x_hat.shape
    out = torch.empty((n_rows, n_cols), device=x_hat.device, dtype=out_dtype)
    block_rows, block_cols, programs = _row_tiles(n_rows, n_cols, x_hat.device)
    normalize_rows_backward_kernel[(programs,)](
        grad_hat,
        x_hat,
        rnorm,
        scale,
        out,
        scale_mult,
        n_rows,
        n_cols,
        grad_hat.stride(0),
        x_hat.stride(0),
        out.stride(0),
        SCALE_PER_ROW=scale.numel() > 1,
        BLOCK_ROWS=block_rows,
        BLOCK_COLS=block_cols,
    )
    return out


def _moment(
    t_hat: torch.Tensor, t0_hat: torch.Tensor, need_t: bool, need_t0: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """M, dM/dt_hat, dM/dt0_hat (see fastcal.ops.moments for the sum / difference form)."""
    n_classes, dim = t_hat.shape
    gram = use_gram_side(n_classes, dim)
    sum_ = torch.empty_like(t_hat)
    diff = torch.empty_like(t_hat)
    centered = torch.empty_like(t_hat) if need_t and not gram else sum_
    frozen_centered = torch.empty_like(t_hat) if need_t0 and not gram else sum_
    delta = torch.empty(dim, device=t_hat.device, dtype=t_hat.dtype)
    budget = _tile_elements(t_hat.device)
    block_cols = min(triton.next_power_of_2(dim), 32 if t_hat.device.type != "cpu" else 128)
    block_rows = min(triton.next_power_of_2(n_classes), max(1, budget // block_cols))
    center_pair_kernel[(triton.cdiv(dim, block_cols),)](
        t_hat,
        t0_hat,
        sum_,
        diff,
        centered,
        frozen_centered,
        delta,
        n_classes,
        dim,
        t_hat.stride(0),
        WRITE_A=need_t and not gram,
        WRITE_B=need_t0 and not gram,
        BLOCK_ROWS=block_rows,
        BLOCK_COLS=block_cols,
    )
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
            dm_dt = torch.addmm(mean_grad, centered, e, alpha=4.0 * inv_c2)
        if need_t0:
            dm_dt0 = torch.addmm(-mean_grad, frozen_centered, e, alpha=-4.0 * inv_c2)
    return delta.dot(delta) + gap, dm_dt, dm_dt0


class TritonCalibratedLoss(torch.autograd.Function):
    """Fused calibrated prompt loss on CUDA (or CPU under TRITON_INTERPRET=1).

    Returns ``(loss, ce, margin, moment)``; the last three are non-differentiable logging values.
    """

    @staticmethod
    def forward(
        ctx: Any,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        frozen_text_features: torch.Tensor | None,
        logit_scale: float | torch.Tensor,
        labels: torch.Tensor,
        alpha: float,
        beta: float,
        label_smoothing: float,
        moment_weight: float,
        reduction: str,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        if image_features.device.type == "cpu" and not triton_interpreting():
            raise ValueError(
                "backend: expected CUDA tensors for 'triton' (or TRITON_INTERPRET=1), got CPU tensors"
            )
        device = image_features.device
        dtype = compute_dtype(image_features, text_features, frozen_text_features)
        need_image, need_text, need_frozen, need_scale = ctx.needs_input_grad[:4]
        need_frozen = need_frozen and frozen_text_features is not None
        compute_grad = need_image or need_text or need_scale
        if isinstance(logit_scale, torch.Tensor):
            scale = logit_scale.detach().reshape(1).to(device=device, dtype=dtype)
        else:
            scale = torch.full((1,), float(logit_scale), device=device, dtype=dtype)
        labels = labels.contiguous()
        n_rows, n_classes = image_features.shape[0], text_features.shape[0]

        f_hat, f_rnorm = _normalize(image_features, dtype)
        t_hat, t_rnorm = _normalize(text_features, dtype)
        cos = f_hat @ t_hat.T  # becomes J in place when the gradient is wanted

        ce_rows = torch.empty(n_rows, device=device, dtype=dtype)
        g_target = torch.empty_like(ce_rows)
        g_runner = torch.empty_like(ce_rows)
        h = torch.empty_like(ce_rows) if compute_grad else ce_rows
        runner = torch.empty(n_rows, device=device, dtype=torch.int64)
        block = min(triton.next_power_of_2(n_classes), 16384 if device.type == "cpu" else 4096)
        ce_margin_rows_kernel[(n_rows,)](
            cos,
            labels,
            scale,
            ce_rows,
            g_target,
            g_runner,
            runner,
            h,
            n_classes,
            cos.stride(0),
            label_smoothing,
            COMPUTE_GRAD=compute_grad,
            HAS_SMOOTHING=label_smoothing > 0,
            BLOCK=block,
        )

        t0_hat = t0_rnorm = dm_dt = dm_dt0 = None
        if frozen_text_features is not None:
            t0_hat, t0_rnorm = _normalize(frozen_text_features, dtype)
            moment, dm_dt, dm_dt0 = _moment(t_hat, t0_hat, need_text, need_frozen)
            if not need_frozen:  # the backward needs them only for the frozen features' gradient
                t0_hat = t0_rnorm = None
        else:
            moment = torch.zeros((), device=device, dtype=dtype)

        code = REDUCTION_CODES[reduction]
        per_row = torch.empty(n_rows, device=device, dtype=dtype) if code == 0 else ce_rows
        margins = torch.empty(n_rows, device=device, dtype=dtype)
        loss = per_row if code == 0 else torch.empty((), device=device, dtype=dtype)
        ce_mean = torch.empty((), device=device, dtype=dtype)
        margin_reg = torch.empty((), device=device, dtype=dtype)
        margin_finalize_kernel[(1,)](
            ce_rows,
            g_target,
            g_runner,
            runner,
            labels,
            h,
            scale,
            moment,
            cos,
            per_row,
            margins,
            loss,
            ce_mean,
            margin_reg,
            n_rows,
            n_classes,
            cos.stride(0),
            alpha,
            beta,
            moment_weight,
            REDUCTION=code,
            COMPUTE_GRAD=compute_grad,
            HAS_MOMENT=frozen_text_features is not None,
            BLOCK=min(triton.next_power_of_2(n_rows), 1024),
        )

        ctx.save_for_backward(
            cos,
            f_hat,
            f_rnorm,
            t_hat,
            t_rnorm,
            t0_hat,
            t0_rnorm,
            dm_dt,
            dm_dt0,
            labels,
            runner,
            h,
            margins,
            scale,
        )
        ctx.meta = (beta, moment_weight, code, need_image, need_text, need_frozen, need_scale)
        ctx.dtypes = (
            image_features.dtype,
            text_features.dtype,
            frozen_text_features.dtype if frozen_text_features is not None else None,
        )
        ctx.scale_meta = (
            (logit_scale.dtype, logit_scale.shape) if isinstance(logit_scale, torch.Tensor) else None
        )
        ctx.mark_non_differentiable(ce_mean, margin_reg, moment)
        return loss, ce_mean, margin_reg, moment

    @staticmethod
    @once_differentiable
    def backward(
        ctx: Any, grad_loss: torch.Tensor, *_unused: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        (
            j,
            f_hat,
            f_rnorm,
            t_hat,
            t_rnorm,
            t0_hat,
            t0_rnorm,
            dm_dt,
            dm_dt0,
            labels,
            runner,
            h,
            margins,
            scale,
        ) = ctx.saved_tensors
        beta, moment_weight, code, need_image, need_text, need_frozen, need_scale = ctx.meta
        image_dtype, text_dtype, frozen_dtype = ctx.dtypes
        n_rows = f_hat.shape[0]
        grad_loss = grad_loss.to(f_hat.dtype)
        grad_image = grad_text = grad_frozen = grad_scale = None
        if code != 0:
            # Uniform row weight g = grad / B ("mean") or grad ("sum"); the mean(m) coupling vanishes.
            g = grad_loss.reshape(1)
            g_mult = 1.0 / n_rows if code == 1 else 1.0
            moment_mult = moment_weight * n_rows
            if need_image:
                grad_image = _normalize_backward(j @ t_hat, f_hat, f_rnorm, g, g_mult, image_dtype)
            if need_text:
                gt = j.T @ f_hat if dm_dt is None else torch.addmm(dm_dt, j.T, f_hat, beta=moment_mult)
                grad_text = _normalize_backward(gt, t_hat, t_rnorm, g, g_mult, text_dtype)
            if need_frozen and dm_dt0 is not None:
                grad_frozen = _normalize_backward(
                    dm_dt0, t0_hat, t0_rnorm, g, g_mult * moment_mult, frozen_dtype
                )
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
                if dm_dt is not None:
                    gt += dm_dt * g_total
                grad_text = _normalize_backward(gt, t_hat, t_rnorm, one, 1.0, text_dtype)
            if need_frozen and dm_dt0 is not None:
                grad_frozen = _normalize_backward(dm_dt0 * g_total, t0_hat, t0_rnorm, one, 1.0, frozen_dtype)
            if need_scale:
                grad_scale = (g * h).sum() + coupling * margins.sum() / scale[0]
        if grad_scale is not None:
            scale_dtype, scale_shape = ctx.scale_meta
            grad_scale = grad_scale.to(scale_dtype).reshape(scale_shape)
        return grad_image, grad_text, grad_frozen, grad_scale, None, None, None, None, None, None
