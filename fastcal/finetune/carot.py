"""CaRot: calibrated robust fine-tuning (Oh et al., NeurIPS 2023 DistShift workshop / NeurIPS 2024).

FLYP's contrastive loss plus self-distillation from an EMA teacher, read as data-dependent label
smoothing of the contrastive targets:

    L = L_MCL + lambda * L_MKD,
    L_MKD = 1/2 [ mean_i KL(q~_I,i || q_I,i) + mean_i KL(q~_T,i || q_T,i) ],

where ``q_I,i = softmax_j(s f_I,i . f_T,j)`` is the student's in-batch image->text distribution of row
``i``, ``q_T,i`` its text->image distribution, and ``q~`` the same from the teacher (its own logit
scale). ``L_MCL`` is ``fastcal.finetune.flyp.ContrastiveLoss``. In a distributed run every rank takes
its own rows against the columns of the whole global batch (teacher features gathered without
gradient), so the loss is that of the global batch.

The teacher is an EMA of the student, ``theta_T <- m theta_T + (1 - m) theta_S``, applied after the
optimizer step of every step ``t`` (0-based) with ``t % 500 == 0``, with ``m`` ramped linearly from 0.05
to 0.9 over the first 20 % of the steps and then held (paper A.1; MLAI-Yonsei/CaRot
``src/models/carot_loss.py``, arguments ``--ema_up_freq 500 --m_sche_src 0.05 --m_sche_tar 0.9
--m_warm_up 0.2``). The teacher starts as the pretrained model.

lambda, and the two normalizations. Eq. (1)-(2) of the paper write both terms as sums over the batch and
both directions, so scaling both by ``1 / 2B`` (open_clip's ``ClipLoss`` convention, used here) keeps
lambda = 0.75, the paper's value (A.1). The reference code instead adds
``--distil_coef 1.5`` times ``mean_i [CE(q~_I,i, q_I,i) + CE(q~_T,i, q_T,i)]`` (a sum over the two
directions, mean over rows; the soft cross-entropy has the KL's gradient) to ``ClipLoss``: that is
``2 * 1.5 = 3.0`` times ``L_MKD`` as defined here. ``REFERENCE_CODE_DISTILL_WEIGHT`` holds that value;
pass it as ``distill_weight`` to reproduce the code rather than the paper.

Optional terms of the reference code, off by default (its script uses 0.05 and 0.2):
``cross_modal_weight * ||W_v W_t^T||_F`` (``--cross_fnorm``) and
``orthogonality_weight * ||W_v^T W_v - I||_F`` (``--l_orth_wv``), with ``W_v`` the visual projection
(width x D) and ``W_t`` the text projection (width x D).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from torch import nn

from fastcal._checks import check_int, check_number, check_tensor, fail
from fastcal.finetune.config import TESTBED_SCHEDULE, FinetuneConfig, FinetuneSpec
from fastcal.finetune.ema import EmaModel
from fastcal.finetune.flyp import ClipFeatures, FlypMethod

PAPER_DISTILL_WEIGHT = 0.75
REFERENCE_CODE_DISTILL_WEIGHT = 3.0  # --distil_coef 1.5 on a sum over the two directions


def teacher_momentum(
    step: int, total_steps: int, *, start: float = 0.05, end: float = 0.9, warmup_fraction: float = 0.2
) -> float:
    """``start + (end - start) * step / (warmup_fraction * total_steps)`` during the ramp, then ``end``."""
    check_int("step", step, minimum=0)
    check_int("total_steps", total_steps, minimum=1)
    check_number("warmup_fraction", warmup_fraction, minimum=0.0, maximum=1.0)
    ramp = total_steps * warmup_fraction
    if step < ramp:
        return start + (end - start) * step / ramp
    return end


def is_teacher_update_step(step: int, every: int) -> bool:
    """Whether the teacher is updated after the optimizer step of 0-based ``step``."""
    return step % every == 0


def distillation_loss(
    student_per_image: torch.Tensor,
    student_per_text: torch.Tensor,
    teacher_per_image: torch.Tensor,
    teacher_per_text: torch.Tensor,
) -> torch.Tensor:
    """``1/2 [mean_i KL(softmax(teacher_i) || softmax(student_i))]`` summed over the two directions.

    Each argument is a (rows, columns) logit matrix; computed in float32 (float64 stays float64).
    """
    pairs = (
        ("per_image", student_per_image, teacher_per_image),
        ("per_text", student_per_text, teacher_per_text),
    )
    total = 0.0
    for name, student, teacher in pairs:
        check_tensor(f"student_{name}", student, ndim=2, floating=True, finite=False)
        check_tensor(f"teacher_{name}", teacher, ndim=2, floating=True, finite=False)
        if student.shape != teacher.shape:
            raise fail(
                f"teacher_{name}", f"shape {tuple(student.shape)} like the student's", tuple(teacher.shape)
            )
        dtype = torch.promote_types(student.dtype, torch.float32)
        log_q = F.log_softmax(student.to(dtype), dim=-1)
        log_p = F.log_softmax(teacher.detach().to(dtype), dim=-1)
        total = total + F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)
    return total / 2


def _projection(module: Any, what: str) -> torch.Tensor:
    """A projection as a (width, D) matrix: a Parameter as stored, an nn.Linear's weight transposed."""
    if isinstance(module, nn.Linear):
        return module.weight.T
    if isinstance(module, torch.Tensor):
        return module
    raise fail(what, "a projection matrix (Parameter or nn.Linear)", type(module).__name__)


def visual_projection(model: nn.Module) -> torch.Tensor:
    """``W_v`` (width x D): ``visual.proj`` of a ViT tower, ``visual.attnpool.c_proj`` of a ResNet."""
    visual = model.visual
    if getattr(visual, "proj", None) is not None:
        return _projection(visual.proj, "model.visual.proj")
    attnpool = getattr(visual, "attnpool", None)
    if attnpool is not None:
        return _projection(attnpool.c_proj, "model.visual.attnpool.c_proj")
    raise fail(
        "model",
        "a CLIP whose visual tower ends in a projection (ViT proj or ResNet attnpool)",
        type(visual).__name__,
    )


def text_projection(model: nn.Module) -> torch.Tensor:
    """``W_t`` (width x D): ``model.text_projection``."""
    projection = getattr(model, "text_projection", None)
    if projection is None:
        raise fail("model", "a CLIP with a text_projection", type(model).__name__)
    return _projection(projection, "model.text_projection")


def cross_modal_norm(model: nn.Module) -> torch.Tensor:
    """``||W_v W_t^T||_F`` (CaRot code ``--cross_fnorm``)."""
    return torch.linalg.matrix_norm(visual_projection(model) @ text_projection(model).T)


def orthogonality_penalty(model: nn.Module) -> torch.Tensor:
    """``||W_v^T W_v - I||_F`` (CaRot code ``--l_orth_wv``)."""
    w = visual_projection(model)
    gram = w.T @ w
    return torch.linalg.matrix_norm(gram - torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device))


class CarotMethod(FlypMethod):
    """CaRot for ``fastcal.finetune.trainer.Finetuner`` (module docstring for the loss and schedule).

    Args:
        model: the CLIP to fine-tune; the teacher starts as a copy of it.
        label_smoothing: of the contrastive targets (0 in CaRot).
        distill_weight: lambda (paper normalization).
        teacher_update_every, momentum_start, momentum_end, momentum_warmup_fraction: the EMA schedule.
        cross_modal_weight, orthogonality_weight: the optional projection terms.
        rank, world_size: this process in the distributed group.
    """

    name = "carot"

    def __init__(
        self,
        model: nn.Module,
        *,
        label_smoothing: float = 0.0,
        distill_weight: float = PAPER_DISTILL_WEIGHT,
        teacher_update_every: int = 500,
        momentum_start: float = 0.05,
        momentum_end: float = 0.9,
        momentum_warmup_fraction: float = 0.2,
        cross_modal_weight: float = 0.0,
        orthogonality_weight: float = 0.0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__(model, label_smoothing=label_smoothing, rank=rank, world_size=world_size)
        self.distill_weight = check_number("distill_weight", distill_weight, minimum=0.0)
        self.teacher_update_every = check_int("teacher_update_every", teacher_update_every, minimum=1)
        self.momentum_start = momentum_start
        self.momentum_end = momentum_end
        self.momentum_warmup_fraction = momentum_warmup_fraction
        self.cross_modal_weight = check_number("cross_modal_weight", cross_modal_weight, minimum=0.0)
        self.orthogonality_weight = check_number("orthogonality_weight", orthogonality_weight, minimum=0.0)
        self.teacher = EmaModel(model)
        self.teacher_features = ClipFeatures(self.teacher.module)
        # gathers the teacher's features from every rank (no gradient) in the student's layout
        self.teacher_logits = ClipLoss(
            local_loss=True, gather_with_grad=False, rank=rank, world_size=world_size
        )

    def loss(self, forward: nn.Module, batch: Any, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        images, _, texts = batch
        image_features, text_features, scale = forward(images, texts)
        out = self.contrastive(image_features, text_features, scale)
        with torch.no_grad():
            t_image, t_text, t_scale = self.teacher_features(images, texts)
            t_per_image, t_per_text = self.teacher_logits.get_logits(t_image, t_text, t_scale)
        distill = distillation_loss(out.logits_per_image, out.logits_per_text, t_per_image, t_per_text)
        total = out.loss + self.distill_weight * distill
        parts = {"contrastive": out.loss.detach(), "distillation": distill.detach()}
        if self.cross_modal_weight:
            cross = cross_modal_norm(self.model)
            total = total + self.cross_modal_weight * cross
            parts["cross_modal"] = cross.detach()
        if self.orthogonality_weight:
            orth = orthogonality_penalty(self.model)
            total = total + self.orthogonality_weight * orth
            parts["orthogonality"] = orth.detach()
        return total, parts

    def momentum(self, step: int, total_steps: int) -> float:
        """The EMA momentum at ``step`` of ``total_steps``."""
        return teacher_momentum(
            step,
            total_steps,
            start=self.momentum_start,
            end=self.momentum_end,
            warmup_fraction=self.momentum_warmup_fraction,
        )

    def after_step(self, step: int, total_steps: int) -> None:
        """EMA update of the teacher after the steps the schedule names."""
        if is_teacher_update_step(step, self.teacher_update_every):
            self.teacher.update(self.model, self.momentum(step, total_steps))

    def extra_state(self) -> dict[str, torch.Tensor]:
        return {f"teacher.{k}": v for k, v in self.teacher.module.state_dict().items()}

    def load_extra_state(self, tensors: dict[str, torch.Tensor]) -> None:
        state = {k.removeprefix("teacher."): v for k, v in tensors.items() if k.startswith("teacher.")}
        self.teacher.module.load_state_dict(state)


def build(
    config: FinetuneConfig,
    model: nn.Module,
    tokenizer: Any,
    classnames: Sequence[str],
    templates: Sequence[str],
    *,
    rank: int = 0,
    world_size: int = 1,
    cache_dir: Any = None,
) -> CarotMethod:
    """CaRot on ``model``: FLYP plus the EMA teacher's distillation, with ``config``'s weights."""
    return CarotMethod(
        model,
        label_smoothing=config.label_smoothing,
        distill_weight=config.distill_weight,
        teacher_update_every=config.teacher_update_every,
        momentum_start=config.momentum_start,
        momentum_end=config.momentum_end,
        momentum_warmup_fraction=config.momentum_warmup_fraction,
        cross_modal_weight=config.cross_modal_weight,
        orthogonality_weight=config.orthogonality_weight,
        rank=rank,
        world_size=world_size,
    )


SPEC = FinetuneSpec(
    name="carot",
    title="CaRot",
    build=build,
    published=FinetuneConfig(method="carot"),
    testbed=FinetuneConfig(method="carot", learning_rate=1e-4, **TESTBED_SCHEDULE),
    source="CaRot supp. A.1: FLYP recipe + lambda 0.75, EMA every 500 steps, momentum 0.05 -> 0.9 over "
    "the first 20% of steps (MLAI-Yonsei/CaRot src/models/carot_loss.py, src/args.py)",
)
