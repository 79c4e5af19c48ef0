"""ProGrad: prompt-aligned gradient (Zhu et al., "Prompt-aligned Gradient for Prompt Tuning", ICCV 2023;
github.com/BeierZhu/Prompt-align).

CoOp's model (``fastcal.methods.coop.CoOp``: a 16-token context, the class name at the end) trained with a
gradient rule. The zero-shot CLIP with a hand-crafted prompt ``t0_c`` (ProGrad's own per-dataset
templates) is the teacher, ``z0 = exp(logit_scale) f0 t0^T`` on the frozen image features ``f0``, and
its soft targets give the distillation term (temperature ``T`` = 1 in every published config)::

    L_kl = T^2 * mean_b sum_c -softmax(z0_b / T)_c log softmax(z_b / T)_c        (= KL(p0 || p) + H(p0))

For each tuned tensor, with ``g`` the gradient of the run's objective (the loss and any regularizer:
cross-entropy in the paper, TCPT's calibrated loss, label smoothing, DOR) and ``g_kl`` that of
``L_kl``, both flattened::

    g <- g - lambda * (<g, g_kl> / ||g_kl||^2) g_kl      if <g, g_kl> < 0      (the conflicting part)
    g <- g                                                otherwise

then the optimizer step (SGD: weight decay and momentum act on the projected gradient). ``L_kl`` only
steers the direction; it is never added to the update. The rule is ``PromptAlignedGradient``, a
``fastcal.methods.objectives.TrainingHook``; it reads the teacher from the step batch's frozen image
features, so for CoOp's cached features it needs no second image encoder.

Differences from the reference (``Dassl.ProGrad.pytorch/dassl/engine/trainer.py``
``prograd_backward_and_update``), none of which changes the rule: the reference trains an fp16 context
with fp16 dot products and no loss scaling (a float32 or float64 run here differs from it by that
rounding); a zero gradient there makes the sign test compare NaN (and keep ``g``), here an explicit norm
test does the same; its amp branch is broken (it never projects), here AMP gradients are projected while
still scaled (the rule is invariant to a common scale) and unscaled by the optimizer step; its teacher
is a second CLIP on the same images, here the frozen features of the batch (equal in exact arithmetic).

Context initialization (``CTX_INIT: True`` in every ProGrad config): for a template phrase of ``m``
words (the template without " {}."), the prompt is ``"X" * (16 - m)`` followed by the phrase; the first
16 tokens are learned, the ``16 - m`` "X" rows start at zero and the rest at the phrase's token
embeddings; a phrase with a comma has one token more than words, and that last token stays a fixed word
before the name, as in the reference.

Base-to-new recipe: BeierZhu/Prompt-align ``ProGrad.public/configs/trainers/ProGrad/rn50_ep100.yaml`` with
``ProGrad.public/scripts/base2new_train_prograd.sh`` (LAMBDA=1.0, N_CTX=16; the same schedule as
ml-stat-Sustech/CLIP_Calibration ``configs/trainers/ProGrad/vit_b16_c16_ep100_batch32.yaml`` runs with
ViT-B/16): SGD lr 0.002, batch 32, 100 epochs, cosine after 1 constant warm-up epoch at 1e-5, lambda 1,
T 1 (``LOSS.T``). Templates: ``ProGrad.public/trainers/prograd.py`` ``CUSTOM_TEMPLATES`` (the
pet, flower, aircraft and food phrases come first, unlike CoOp's); a dataset without one uses its
hand-crafted prompt (``templates[0]``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fastcal._checks import fail
from fastcal.data.protocols import BASE_TO_NEW_DATASETS, DOMAIN_GENERALIZATION_TARGETS
from fastcal.data.templates import HARD_PROMPTS
from fastcal.methods.base import MethodSpec
from fastcal.methods.coop import PROMPT_OPTIONS, CoOp
from fastcal.methods.objectives import RegularizerSetup, StepBatch, TrainingHook
from fastcal.methods.prompt_learner import PromptLearner
from fastcal.models.text_encoder import TextEncoder

TEMPERATURE = 1.0
PROGRAD_LAMBDA = 1.0
# ProGrad.public/trainers/prograd.py CUSTOM_TEMPLATES, by fastcal dataset name: CoOp's hand-crafted
# prompts but on five datasets.
TEMPLATES = {
    **{name: HARD_PROMPTS[name] for name in (*BASE_TO_NEW_DATASETS, *DOMAIN_GENERALIZATION_TARGETS)},
    "oxford_pets": "a type of pet, a photo of a {}.",
    "oxford_flowers": "a type of flower, a photo of a {}.",
    "fgvc_aircraft": "a type of aircraft, a photo of a {}.",
    "dtd": "a texture of {}.",
    "food101": "a type of food, a photo of {}.",
}

RECIPE = {
    "epochs": 100,
    "batch_size": 32,
    "lr": 0.002,
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "warmup_epochs": 1,
    "warmup_lr": 1e-5,
    "n_ctx": 16,
    "ctx_init": "a photo of a",
    "prograd_lambda": PROGRAD_LAMBDA,
}
DATASET_RECIPES = {
    name: {"text_template": template, "ctx_init": template.replace(" {}.", "")}
    for name, template in TEMPLATES.items()
}
# The embedded testbed (3-layer CLIP, 80 base-class images, 2-core CPU): CoOp's 4-token context (the
# phrase itself, no padding) and half its schedule at twice the rate (each step takes two gradients).
TESTBED_RECIPE = {"epochs": 25, "batch_size": 16, "lr": 0.02, "n_ctx": 4}
SOURCE = (
    "BeierZhu/Prompt-align ProGrad.public/configs/trainers/ProGrad/rn50_ep100.yaml, "
    "ProGrad.public/scripts/base2new_train_prograd.sh (LAMBDA=1.0, N_CTX=16), templates and context "
    "initialization from ProGrad.public/trainers/prograd.py; SGD momentum and weight decay: "
    "Dassl.ProGrad.pytorch/dassl/config/defaults.py"
)


class ProGrad(CoOp):
    """CoOp whose context starts from ProGrad's padded template phrase (module docstring).

    Args: as ``CoOp``; with ``ctx_init`` of ``m <= n_ctx`` words the context has ``n_ctx`` tokens, the
    first ``n_ctx - m`` zero, and ``n_learned`` is ``n_ctx``.
    """

    method_name = "prograd"

    def context_learner(
        self,
        text_encoder: TextEncoder,
        tokenizer: Any,
        classnames: Sequence[str],
        *,
        n_ctx: int,
        ctx_init: str | None,
        n_learned: int | None,
        **options: Any,
    ) -> PromptLearner:
        padding = 0
        if ctx_init:
            words = len(ctx_init.split(" "))
            if words > n_ctx:
                raise fail("ctx_init", f"a phrase of at most n_ctx={n_ctx} words", repr(ctx_init))
            if n_learned is not None:
                raise fail("n_learned", "None (ProGrad learns its padded phrase's n_ctx tokens)", n_learned)
            padding, n_learned = n_ctx - words, n_ctx
            ctx_init = " ".join(["X"] * padding + [ctx_init])
        learner = super().context_learner(
            text_encoder,
            tokenizer,
            classnames,
            n_ctx=n_ctx,
            ctx_init=ctx_init,
            n_learned=n_learned,
            **options,
        )
        with torch.no_grad():
            learner.ctx[..., :padding, :] = 0.0
        return learner


def distillation_cross_entropy(
    logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = TEMPERATURE
) -> torch.Tensor:
    """``T^2 * mean_b sum_c -softmax(z0_b / T)_c log softmax(z_b / T)_c`` (ProGrad's ``ProGradLoss``
    ``kl_loss``): the cross-entropy against the teacher's soft targets, whose gradient is KL(p0 || p)'s."""
    targets = F.softmax(teacher_logits / temperature, dim=-1)
    log_probs = F.log_softmax(logits / temperature, dim=-1)
    return -(targets * log_probs).sum(dim=-1).mean() * temperature**2


def aligned_gradient(gradient: torch.Tensor, reference: torch.Tensor, weight: float) -> torch.Tensor:
    """``g - weight * <g, r> / ||r||^2 * r`` when ``<g, r> < 0``, else ``g`` (flattened products; a zero
    ``r`` leaves ``g``). Computed without reading values back to the host."""
    dot = (gradient * reference).sum()
    norm = (reference * reference).sum()
    conflict = (dot < 0) & (norm > 0)
    coefficient = torch.where(conflict, weight * dot / torch.where(norm > 0, norm, 1.0), 0.0)
    return gradient - coefficient * reference


class PromptAlignedGradient(TrainingHook):
    """ProGrad's gradient rule (module docstring), for any objective.

    Reads from the run (``RegularizerSetup``): the teacher template (config ``text_template``, else the
    dataset's hand-crafted prompt), ``prograd_lambda`` (default 1) and the training classes.
    """

    name = "prograd"
    forms_gradient = True

    def __init__(self, setup: RegularizerSetup) -> None:
        from fastcal.models.cache import zeroshot_class_features

        template = setup.config.get("text_template") or setup.templates[0]
        weight = setup.config.get("prograd_lambda")
        self.weight = PROGRAD_LAMBDA if weight is None else float(weight)
        self.template = template
        features = zeroshot_class_features(setup.model, setup.tokenizer, setup.classnames, [template])
        self.teacher_text_features = features.to(setup.device)

    def teacher_logits(self, batch: StepBatch) -> torch.Tensor:
        """``exp(logit_scale) * f0 @ t0^T`` on the batch's frozen image features."""
        f0 = batch.frozen_image_features
        scale = batch.output.logit_scale.detach()
        return scale * f0.to(scale.dtype) @ self.teacher_text_features.to(scale.dtype).T

    def backward(
        self,
        objective: torch.Tensor,
        batch: StepBatch,
        parameters: Sequence[nn.Parameter],
        scaler: torch.amp.GradScaler,
    ) -> None:
        distillation = distillation_cross_entropy(batch.output.logits, self.teacher_logits(batch))
        teacher_grads = torch.autograd.grad(
            scaler.scale(distillation), parameters, retain_graph=True, allow_unused=True
        )
        grads = torch.autograd.grad(scaler.scale(objective), parameters, allow_unused=True)
        for p, grad, teacher_grad in zip(parameters, grads, teacher_grads, strict=True):
            if grad is not None:
                p.grad = grad if teacher_grad is None else aligned_gradient(grad, teacher_grad, self.weight)


SPEC = MethodSpec(
    name="prograd",
    title="ProGrad",
    build=ProGrad,
    options=PROMPT_OPTIONS,
    recipe=RECIPE,
    source=SOURCE,
    hooks=(PromptAlignedGradient,),
    testbed_recipe=TESTBED_RECIPE,
    dataset_recipes=DATASET_RECIPES,
)
