"""Exponential moving average of weights: ``theta_T <- m * theta_T + (1 - m) * theta_S``.

The teacher of CaRot (and any EMA model) is updated with one fused ``torch._foreach_lerp_`` over all
tensors: ``lerp(t, s, w) = t + w * (s - t)``, so ``w = 1 - m`` gives the update above, with one kernel
launch per device and dtype group instead of one Python iteration (two kernels) per tensor.
``ema_update_loop_`` is the per-tensor reference (``t.mul_(m).add_(s, alpha=1 - m)``, the form of
MLAI-Yonsei/CaRot ``src/models/carot_loss.py``); the two agree to float rounding.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from fastcal._checks import check_number, fail


def _pairs(teacher: Iterable[torch.Tensor], student: Iterable[torch.Tensor]):
    teacher, student = list(teacher), list(student)
    if len(teacher) != len(student):
        raise fail("student", f"{len(teacher)} tensors (one per teacher tensor)", len(student))
    for i, (t, s) in enumerate(zip(teacher, student, strict=True)):
        if t.shape != s.shape or t.dtype != s.dtype or t.device != s.device:
            raise fail(
                f"student[{i}]",
                f"shape {tuple(t.shape)}, {t.dtype} on {t.device} (like the teacher's)",
                f"shape {tuple(s.shape)}, {s.dtype} on {s.device}",
            )
    return teacher, student


@torch.no_grad()
def ema_update_(teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor], momentum: float) -> None:
    """In place, for every pair: ``t <- m * t + (1 - m) * s`` (one fused ``_foreach_lerp_``)."""
    momentum = check_number("momentum", momentum, minimum=0.0, maximum=1.0)
    teacher, student = _pairs(teacher, student)
    if teacher:
        torch._foreach_lerp_(teacher, student, 1.0 - momentum)


@torch.no_grad()
def ema_update_loop_(
    teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor], momentum: float
) -> None:
    """The same update, one tensor at a time (the reference form; for tests and benchmarks)."""
    momentum = check_number("momentum", momentum, minimum=0.0, maximum=1.0)
    teacher, student = _pairs(teacher, student)
    for t, s in zip(teacher, student, strict=True):
        t.mul_(momentum).add_(s, alpha=1.0 - momentum)


class EmaModel(nn.Module):
    """A frozen copy of ``model`` whose floating-point parameters track the model's by EMA.

    ``update(model, momentum)`` applies ``ema_update_`` to the parameters (the reference code averages
    ``model.parameters()``) and copies the buffers. The copy is in eval mode and needs no gradients.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.module = copy.deepcopy(model)
        self.module.eval()
        self.module.requires_grad_(False)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @torch.no_grad()
    def update(self, model: nn.Module, momentum: float) -> None:
        """``theta_T <- m * theta_T + (1 - m) * theta_S`` for the parameters; buffers copied."""
        ema_update_(list(self.module.parameters()), [p.detach() for p in model.parameters()], momentum)
        for mine, theirs in zip(self.module.buffers(), model.buffers(), strict=True):
            mine.copy_(theirs)
