"""Hyperparameters of robust fine-tuning, with the published defaults as data.

Published recipe (CaRot, Oh et al., "Towards Calibrated Robust Fine-Tuning of Vision-Language Models",
NeurIPS 2023 DistShift workshop / NeurIPS 2024, supplementary A.1, and its code MLAI-Yonsei/CaRot
``src/args.py``, ``example_scripts/*.sh``; FLYP, Goyal et al., CVPR 2023): CLIP ViT-B/16, AdamW with
learning rate 1e-5 (FLYP, CaRot) or 3e-5 (plain fine-tuning, FT), weight decay 0.1 on every parameter,
batch 512, 10 epochs (about 25k steps on ImageNet), cosine schedule after 500 linear warm-up steps,
minimum learning rate 0. FT clips the gradient norm at 1.0 (``src/models/ft_loss.py``). CaRot: distillation
weight 0.75 (paper normalization, see ``fastcal.finetune.carot``), teacher EMA every 500 steps, momentum
ramped 0.05 -> 0.9 over the first 20 % of the steps. WiSE-FT (Wortsman et al., CVPR 2022) mixes with
alpha = 0.5 in CaRot's table.

The testbed presets (``testbed_config``) are short schedules for the embedded digits CLIP: 30 steps of
batch 64 (about four epochs of the 449 base-class training images) at a larger learning rate (1e-4, FT
3e-4; the tiny model was pretrained at 1e-3), 3 warm-up steps, teacher updates every 4 steps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastcal import registry
from fastcal._checks import check_choice, check_int, check_number, fail

PRECISIONS = ("fp32", "bf16", "fp16")
# The testbed's short schedule (module docstring), common to every method.
TESTBED_SCHEDULE = {
    "batch_size": 64,
    "epochs": 10,
    "max_steps": 30,
    "warmup_steps": 3,
    "teacher_update_every": 4,
}

PUBLISHED_MODEL = ("ViT-B-16", "openai")
WISE_ALPHA = 0.5  # CaRot's table: "the ensemble coefficient of WiSE-FT is simply set as 0.5"
ECE_BINS = 10  # CaRot reports ECE with 10 bins, following LeVine et al. 2023


@dataclass(frozen=True)
class FinetuneConfig:
    """Everything that determines a fine-tuning trajectory (defaults: the published FLYP recipe).

    Attributes:
        method: "ft" (image encoder + linear head, cross-entropy), "flyp" (contrastive over image-caption
            pairs, both towers) or "carot" (FLYP + EMA-teacher self-distillation).
        learning_rate: AdamW peak learning rate.
        weight_decay: AdamW weight decay, on every parameter (as the reference code).
        batch_size: global batch (summed over ranks); the contrastive loss sees all of it.
        epochs: passes over the training images (the last partial batch of an epoch is dropped).
        max_steps: stop after this many steps (a short schedule); the cosine schedule spans them.
        warmup_steps: linear warm-up ``lr * (step + 1) / warmup_steps``, then cosine to
            ``min_learning_rate`` (MLAI-Yonsei/CaRot ``src/models/utils.py`` ``cosine_lr``).
        min_learning_rate: added to the cosine term.
        adam_betas, adam_eps: AdamW's (torch's defaults, which the reference code keeps).
        label_smoothing: smoothing of the contrastive targets (FLYP, CaRot) or of the class targets (FT).
        grad_clip_norm: clip the global gradient norm (FT's reference clips at 1.0), or None.
        distill_weight: CaRot's lambda in the paper's normalization (0.75; the reference code's
            ``--distil_coef 1.5`` is lambda 3.0 here, see ``fastcal.finetune.carot``).
        teacher_update_every: EMA update of the teacher after every this many steps (CaRot: 500).
        momentum_start, momentum_end, momentum_warmup_fraction: the teacher momentum ramps linearly from
            start to end over this fraction of the steps, then stays at end (0.05, 0.9, 0.2).
        cross_modal_weight: weight of ``||W_v W_t^T||_F`` (CaRot code option, 0.05 in its script; off).
        orthogonality_weight: weight of ``||W_v^T W_v - I||_F`` (CaRot code option, 0.2; off).
        seed: seeds the data order, the augmentations and the caption draws.
        precision: "fp32", or autocast in "bf16" / "fp16" (fp16 with a gradient scaler).
        grad_checkpointing: recompute transformer blocks in the backward pass (open_clip's option).
    """

    method: str = "flyp"
    learning_rate: float = 1e-5
    weight_decay: float = 0.1
    batch_size: int = 512
    epochs: int = 10
    max_steps: int | None = None
    warmup_steps: int = 500
    min_learning_rate: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    label_smoothing: float = 0.0
    grad_clip_norm: float | None = None
    distill_weight: float = 0.75
    teacher_update_every: int = 500
    momentum_start: float = 0.05
    momentum_end: float = 0.9
    momentum_warmup_fraction: float = 0.2
    cross_modal_weight: float = 0.0
    orthogonality_weight: float = 0.0
    seed: int = 0
    precision: str = "fp32"
    grad_checkpointing: bool = False

    def __post_init__(self) -> None:
        check_choice("method", self.method, registry.names("finetune_method"))
        check_choice("precision", self.precision, PRECISIONS)
        check_number("learning_rate", self.learning_rate, minimum=0.0, strict_minimum=True)
        check_number("weight_decay", self.weight_decay, minimum=0.0)
        check_int("batch_size", self.batch_size, minimum=1)
        check_int("epochs", self.epochs, minimum=1)
        if self.max_steps is not None:
            check_int("max_steps", self.max_steps, minimum=1)
        check_int("warmup_steps", self.warmup_steps, minimum=0)
        check_number("min_learning_rate", self.min_learning_rate, minimum=0.0)
        if len(self.adam_betas) != 2 or not all(0.0 <= float(b) < 1.0 for b in self.adam_betas):
            raise fail("adam_betas", "two numbers in [0, 1)", repr(self.adam_betas))
        check_number("adam_eps", self.adam_eps, minimum=0.0, strict_minimum=True)
        check_number("label_smoothing", self.label_smoothing, minimum=0.0, maximum=1.0)
        if self.grad_clip_norm is not None:
            check_number("grad_clip_norm", self.grad_clip_norm, minimum=0.0, strict_minimum=True)
        check_number("distill_weight", self.distill_weight, minimum=0.0)
        check_int("teacher_update_every", self.teacher_update_every, minimum=1)
        check_number("momentum_start", self.momentum_start, minimum=0.0, maximum=1.0)
        check_number("momentum_end", self.momentum_end, minimum=0.0, maximum=1.0)
        check_number("momentum_warmup_fraction", self.momentum_warmup_fraction, minimum=0.0, maximum=1.0)
        check_number("cross_modal_weight", self.cross_modal_weight, minimum=0.0)
        check_number("orthogonality_weight", self.orthogonality_weight, minimum=0.0)
        check_int("seed", self.seed, minimum=0)
        if not isinstance(self.grad_checkpointing, bool):
            raise fail("grad_checkpointing", "a bool", repr(self.grad_checkpointing))

    def replace(self, **changes: Any) -> FinetuneConfig:
        """A copy with ``changes`` applied (validated); ``None`` values are ignored."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON-ready values."""
        out = dataclasses.asdict(self)
        out["adam_betas"] = list(self.adam_betas)
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> FinetuneConfig:
        """Inverse of ``to_dict`` (unknown keys are an error)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise fail("config", f"keys among {sorted(names)}", unknown)
        values = dict(values)
        if "adam_betas" in values:
            values["adam_betas"] = tuple(values["adam_betas"])
        return cls(**values)


@dataclass(frozen=True)
class FinetuneSpec:
    """A fine-tuning method as runs choose it by name (``fastcal.registry`` kind ``"finetune_method"``).

    Attributes:
        name: the ``--method`` name.
        title: how tables name it.
        build: ``build(config, model, tokenizer, classnames, templates, *, rank, world_size, cache_dir)
            -> method`` (what ``Finetuner`` trains: ``trainable``, ``loss``, ``after_step``, ...).
        published: the published recipe.
        testbed: the embedded testbed's short schedule.
        source: where the recipe comes from.
    """

    name: str
    title: str
    build: Callable[..., Any]
    published: FinetuneConfig
    testbed: FinetuneConfig
    source: str


def published_config(method: str) -> FinetuneConfig:
    """The published recipe of ``method`` (``FinetuneSpec.published``)."""
    return registry.get("finetune_method", method, argument="method").published


def testbed_config(method: str) -> FinetuneConfig:
    """A short schedule for the embedded digits testbed (seconds on a CPU)."""
    return registry.get("finetune_method", method, argument="method").testbed
