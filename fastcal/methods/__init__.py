"""Adaptation methods composed from the shared layers: zero-shot classification, prompt learners and
the prompt-tuning methods built on them (CoOp, CoCoOp, KgCoOp, MaPLe, VPT, ProGrad, PromptSRC, TCP,
ProDA), and the training step that drives any of them from a user's loop."""

from fastcal.methods.base import MethodOutput, MethodSpec, PromptMethod, build_method, get_method
from fastcal.methods.objectives import StepBatch
from fastcal.methods.training import StepResult, TrainingStep, training_step

__all__ = [
    "MethodOutput",
    "MethodSpec",
    "PromptMethod",
    "StepBatch",
    "StepResult",
    "TrainingStep",
    "build_method",
    "get_method",
    "training_step",
]
