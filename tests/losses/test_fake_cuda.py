"""``CalibratedPromptLoss`` with ``backend="auto"``, forward and backward, on fake CUDA tensors
(``tests/fake_cuda.py``): on CUDA ``auto`` takes the Triton backend, whose custom op
(``fastcal::calibrated_loss``) and its backward op trace through their fake implementations; no device
mismatch, no host read, gradients on the device in the inputs' dtypes. Inside ``value_checks(False)``,
as training loops call it (with checks on, the loss reads values by design)."""

import pytest
import torch

from fastcal.losses import CalibratedPromptLoss, value_checks
from fastcal.ops.calibrated import triton_installed


@pytest.mark.parametrize(
    ("dtype", "frozen", "reduction"),
    [(torch.float32, True, "mean"), (torch.bfloat16, True, "none"), (torch.float16, False, "sum")],
)
def test_forward_and_backward_trace_on_fake_cuda(fake_cuda, dtype, frozen, reduction):
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(33, 24, generator=generator).to(dtype).requires_grad_()
    text = torch.randn(101, 24, generator=generator).to(dtype).requires_grad_()
    frozen_text = torch.randn(101, 24, generator=generator).to(dtype) if frozen else None
    labels = torch.randint(0, 101, (33,), generator=generator)
    log_scale = torch.tensor(4.0, requires_grad=True)
    mode = fake_cuda.new_mode()
    image, text, frozen_text, labels, log_scale = fake_cuda.to_fake_cuda(
        mode, image, text, frozen_text, labels, log_scale
    )
    loss_fn = CalibratedPromptLoss(label_smoothing=0.1, reduction=reduction)
    with fake_cuda.trace(mode), value_checks(False):
        loss, parts = loss_fn(image, text, labels, log_scale.exp(), frozen_text, return_parts=True)
        loss.sum().backward()
    assert loss.device.type == "cuda" and loss.shape == ((33,) if reduction == "none" else ())
    assert all(p.device.type == "cuda" and p.shape == () for p in parts.values())
    for leaf in (image, text, log_scale):
        assert leaf.grad is not None and leaf.grad.device.type == "cuda" and leaf.grad.dtype == leaf.dtype
    if triton_installed():
        assert "fastcal_calibrated_loss" in type(loss.grad_fn).__name__
