"""One seam for the calibrated prompt loss: backend choice and dispatch.

Backends: ``torch`` (``fastcal.ops.reference``, any device and dtype), ``triton``
(``fastcal.ops.fused_triton``: CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``) and
``native`` (``fastcal.ops.native``: C++ on CPU tensors, built on first use). ``auto`` takes triton on
CUDA, native on CPU when it builds, the torch backend otherwise. A forced backend that cannot serve the
tensors raises ValueError, except ``native`` without a compiler, which falls back to ``torch`` with one
warning. The fused backends compute in float32 (float64 for float64 inputs) and return gradients in the
inputs' dtypes.

Inputs are assumed valid here; ``fastcal.losses`` validates them.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from fastcal.ops.reference import calibrated_prompt_loss_reference, compute_dtype

BACKENDS = ("auto", "torch", "triton", "native")
REDUCTIONS = ("mean", "sum", "none")


def triton_interpreting() -> bool:
    """Whether Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend that will run for tensors on ``device`` (``auto`` resolved, requests checked)."""
    from fastcal.ops.native import native_available

    if backend == "auto":
        if device.type == "cuda" and triton_installed():
            return "triton"
        if device.type == "cpu" and native_available(warn=True):
            return "native"
        return "torch"
    if backend == "triton":
        if not triton_installed():
            raise ValueError("backend: expected an installed triton package for 'triton', got none")
        if device.type == "cpu" and not triton_interpreting():
            raise ValueError(
                "backend: expected CUDA tensors for 'triton' (or CPU tensors with TRITON_INTERPRET=1 set "
                "before triton is imported), got CPU tensors"
            )
        if device.type not in ("cuda", "cpu"):
            raise ValueError(f"backend: expected CUDA tensors for 'triton', got {device.type} tensors")
        return "triton"
    if backend == "native":
        if device.type != "cpu":
            raise ValueError(f"backend: expected CPU tensors for 'native', got {device.type} tensors")
        return "native" if native_available(warn=True) else "torch"
    return "torch"


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
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """TCPT's calibrated loss on the chosen backend: ``(loss, {"ce", "margin", "moment"})``.

    The formula is in ``fastcal.ops.reference``; ``logit_scale`` is the exponentiated scale, a float
    or a one-element tensor (gradients reach it when it requires them).
    """
    chosen = resolve_backend(backend, image_features.device)
    labels = labels.long()  # int32 and uint8 labels index like int64 ones, on every backend
    hyper = {
        "margin_alpha": margin_alpha,
        "margin_beta": margin_beta,
        "moment_weight": moment_weight,
        "label_smoothing": label_smoothing,
        "reduction": reduction,
    }
    if chosen == "torch":
        return calibrated_prompt_loss_reference(
            image_features, text_features, labels, logit_scale, frozen_text_features, **hyper
        )

    if chosen == "native":
        from fastcal.ops.native import NativeCalibratedLoss

        # The C++ kernels take one float type: half inputs are upcast here (autograd casts the
        # gradients back).
        dtype = compute_dtype(image_features, text_features, frozen_text_features)
        frozen = frozen_text_features.to(dtype) if frozen_text_features is not None else None
        scale_tensor = logit_scale if isinstance(logit_scale, torch.Tensor) else None
        scale = float(logit_scale.detach()) if scale_tensor is not None else float(logit_scale)
        loss, ce, margin, moment = NativeCalibratedLoss.apply(
            image_features.to(dtype),
            text_features.to(dtype),
            frozen,
            scale_tensor,
            labels,
            scale,
            margin_alpha,
            margin_beta,
            label_smoothing,
            moment_weight,
            reduction,
        )
    else:
        from fastcal.ops.fused_triton import triton_calibrated_loss

        # The kernels read half inputs directly and upcast after the load.
        loss, ce, margin, moment = triton_calibrated_loss(
            image_features,
            text_features,
            frozen_text_features,
            logit_scale,
            labels,
            alpha=margin_alpha,
            beta=margin_beta,
            label_smoothing=label_smoothing,
            moment_weight=moment_weight,
            reduction=reduction,
        )
    return loss, {"ce": ce, "margin": margin, "moment": moment}
