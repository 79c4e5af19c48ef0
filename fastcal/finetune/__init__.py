"""Calibrated robust fine-tuning of CLIP: FT, FLYP, label smoothing, WiSE-FT and CaRot.

- ``fastcal.finetune.flyp``: FLYP's contrastive loss over (image, caption) pairs on open_clip's
  ``ClipLoss`` (optionally label-smoothed), per-step caption draws.
- ``fastcal.finetune.carot``: CaRot's EMA-teacher self-distillation, momentum schedule and optional
  projection terms.
- ``fastcal.finetune.ft``: plain fine-tuning (image tower + zero-shot-initialized linear head).
- ``fastcal.finetune.wise``: WiSE-FT weight interpolation and alpha sweeps.
- ``fastcal.finetune.ema``: fused EMA updates (``torch._foreach_lerp_``).
- ``fastcal.finetune.distributed``: torchrun / DDP with features gathered across ranks, AMP, gradient
  checkpointing.
- ``fastcal.finetune.trainer``: the loop (AdamW, warm-up + cosine, exact resume from safetensors).
- ``fastcal.finetune.evaluate``: ID / OOD evaluation with and without temperature scaling.
- ``fastcal.finetune.config``: the hyperparameters (``FinetuneConfig``) and the methods' specs, with
  their published recipes and sources (each method's ``SPEC``, in ``fastcal.registry``).

Whole runs (data, run folder, checkpoints, results) are ``fastcal.runs.finetune``.
"""

from fastcal.finetune.carot import (
    CarotMethod,
    cross_modal_norm,
    distillation_loss,
    orthogonality_penalty,
    teacher_momentum,
)
from fastcal.finetune.config import FinetuneConfig, published_config, testbed_config
from fastcal.finetune.ema import EmaModel, ema_update_, ema_update_loop_
from fastcal.finetune.flyp import CaptionSampler, ClipFeatures, ContrastiveLoss, FlypMethod
from fastcal.finetune.ft import FtMethod, ImageClassifier, zero_shot_head
from fastcal.finetune.trainer import Finetuner, cosine_learning_rate, train
from fastcal.finetune.wise import interpolate_state_dicts, parse_alphas

__all__ = [
    "CaptionSampler",
    "CarotMethod",
    "ClipFeatures",
    "ContrastiveLoss",
    "EmaModel",
    "FinetuneConfig",
    "Finetuner",
    "FlypMethod",
    "FtMethod",
    "ImageClassifier",
    "cosine_learning_rate",
    "cross_modal_norm",
    "distillation_loss",
    "ema_update_",
    "ema_update_loop_",
    "interpolate_state_dicts",
    "orthogonality_penalty",
    "parse_alphas",
    "published_config",
    "teacher_momentum",
    "testbed_config",
    "train",
    "zero_shot_head",
]
