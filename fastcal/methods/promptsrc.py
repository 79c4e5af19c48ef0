"""PromptSRC: self-regulating prompts (Khattak et al., "Self-regulating Prompts: Foundational Model
Adaptation without Forgetting", ICCV 2023; github.com/muzairkhattak/PromptSRC ``trainers/promptsrc.py``).

Independent deep prompts in both towers (no coupling, unlike MaPLe): a text context ``v`` (the first
``n`` tokens of "a photo of a") with deep text prompts ``T_1..T_{d_t - 1}``, and deep visual prompts
``P_0..P_{d_v - 1}`` (``fastcal.models.vision_prompts``), all N(0, 0.02^2) but ``v``::

    t_c = normalize(f_text([SOS] v [name_c] [.] [EOS]; positions 1..n replaced by T_k before layer k))
    f_i = normalize(f_image(x_i; P_0 .. P_{d_v - 1})),   z = exp(logit_scale) f t^T

Self-regulation against the frozen model, the ``SelfRegulation`` term added to the run's loss::

    t0_c = normalize(mean_j f_text(template_j(name_c)))        60 templates, the mean of RAW features
    f0_i = normalize(f_image(x_i)),  z0 = exp(logit_scale) f0 t0^T       (frozen, the same augmented view)
    L_src = KL(softmax(z0) || softmax(z)) summed / (B C)  +  w_t mean|t - t0|  +  w_i mean|f - f0|

(the KL's sum is divided by all B x C logits, not by B: the code's ``reduction='sum'`` over
``logits.numel()``; the L1 means run over every element). With cross-entropy the objective is the
paper's ``L_CE + L_SCL``; TCPT's calibrated loss or label smoothing take CE's place.

Gaussian prompt aggregation (``GaussianPromptAggregation``, an epoch-end ``TrainingHook``): after epoch
``e`` (1-based) of ``N`` the tuned prompts ``theta_e`` are added to a running sum with weight
``w_e = g(e) / sum_e' g(e')``, ``g`` the normal density with mean ``gpa_mean`` and std ``gpa_std``
(epochs); after the last epoch the prompts become ``sum_e w_e theta_e``, the model evaluated and saved.

Differences from the reference, none of which changes the computation: its ``t0`` comes from a second
fp32 CLIP and ``f0`` from a second fp16 image tower kept inside the prompt learner (here the frozen model
itself, the same weights); it aggregates the whole state dict, the frozen CLIP included, in fp16 (here
the tuned prompts only, in their own precision: the frozen weights came back to themselves only up to
fp16 rounding there); its fp16 context and fp32 deep prompts train without loss scaling (a float32 or
float64 run here differs by that rounding); the weights are computed in log space, so a mean far outside
the schedule cannot underflow to 0 / 0.

Templates: ``trainers/imagenet_templates.py`` ``IMAGENET_TEMPLATES``, which are the first 60 of CLIP's 80
ImageNet templates (``open_clip.OPENAI_IMAGENET_TEMPLATES``) with "a photo of a {}." first; the same for
every dataset.

Base-to-new recipe: muzairkhattak/PromptSRC ``configs/trainers/PromptSRC/vit_b16_c2_ep20_batch4_4+4ctx.yaml``
(``scripts/promptsrc/base2new_train.sh``): ViT-B/16, 16 shots, 4 + 4 context tokens, depth 9 in both
towers, SGD lr 0.0025, batch 4, 20 epochs, cosine after 1 constant warm-up epoch at 1e-5, text weight 25,
image weight 10, GPA mean 15 and std 1.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fastcal._checks import fail
from fastcal.methods.base import MethodOutput, MethodSpec, clip_logits
from fastcal.methods.maple import DeepTextPromptMethod, deep_text_prompts
from fastcal.methods.objectives import RegularizerSetup, StatelessRegularizer, StepBatch, TrainingHook
from fastcal.models.vision_prompts import DeepVisualPrompts

TEXT_LOSS_WEIGHT = 25.0
IMAGE_LOSS_WEIGHT = 10.0
RECIPE = {
    "epochs": 20,
    "batch_size": 4,
    "lr": 0.0025,
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "warmup_epochs": 1,
    "warmup_lr": 1e-5,
    "n_ctx": 4,
    "ctx_init": "a photo of a",
    "prompt_depth": 9,
    "n_ctx_vision": 4,
    "vision_depth": 9,
    "text_loss_weight": TEXT_LOSS_WEIGHT,
    "image_loss_weight": IMAGE_LOSS_WEIGHT,
    "gpa_mean": 15.0,
    "gpa_std": 1.0,
}
# The embedded testbed (3-layer towers, 80 base-class images, 2-core CPU): a short schedule, prompts in
# every layer, the aggregation peaked at 3/4 of it as the recipe's (15 of 20).
TESTBED_RECIPE = {
    "epochs": 4,
    "batch_size": 8,
    "lr": 0.02,
    "prompt_depth": 3,
    "vision_depth": 3,
    "gpa_mean": 3.0,
    "gpa_std": 1.0,
}
SOURCE = (
    "muzairkhattak/PromptSRC configs/trainers/PromptSRC/vit_b16_c2_ep20_batch4_4+4ctx.yaml "
    "(scripts/promptsrc/base2new_train.sh); losses, templates and GPA from trainers/promptsrc.py and "
    "trainers/imagenet_templates.py"
)


def promptsrc_templates() -> list[str]:
    """PromptSRC's 60 templates (module docstring), in its order."""
    from fastcal.data.templates import imagenet_templates

    clip_templates = imagenet_templates()[:60]
    first = clip_templates.index("a photo of a {}.")
    return [clip_templates[first], *clip_templates[:first], *clip_templates[first + 1 :]]


@torch.no_grad()
def raw_mean_features(
    model: nn.Module, tokenizer: Any, classnames: Sequence[str], templates: Sequence[str]
) -> torch.Tensor:
    """``normalize(mean_j f_text(template_j(name_c)))``: the L2-normalized mean of the templates' raw
    (unnormalized) features, ``(C, D)`` (PromptSRC's ``fixed_embeddings``)."""
    from fastcal.methods.vpt import hand_crafted_features

    total = sum(hand_crafted_features(model, tokenizer, classnames, template) for template in templates)
    return F.normalize(total / len(templates), dim=-1)


class PromptSRC(DeepTextPromptMethod):
    """Independent deep text and visual prompts (module docstring).

    Args:
        model: an open_clip CLIP with a ViT image tower (frozen here).
        tokenizer: its tokenizer.
        classnames: the classes.
        n_ctx: text context tokens (in every prompted text layer).
        ctx_init: the phrase whose first ``n_ctx`` tokens start the context (random N(0, init_std^2)
            when ``None`` or ``n_ctx > 4``, as the reference).
        prompt_depth: text layers with prompts (1: the context only).
        n_ctx_vision: visual prompt tokens per layer.
        vision_depth: image layers with prompts.
        init_std: standard deviation of the random initializations.
    """

    input_kind = "images"
    method_name = "promptsrc"
    supports_outliers = True

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        classnames: Sequence[str],
        *,
        n_ctx: int = 4,
        ctx_init: str | None = "a photo of a",
        prompt_depth: int = 9,
        n_ctx_vision: int = 4,
        vision_depth: int = 9,
        init_std: float = 0.02,
    ) -> None:
        super().__init__(model, tokenizer, classnames, n_ctx, ctx_init, prompt_depth, init_std)
        self.deep_text_prompts = deep_text_prompts(self.prompt_learner, prompt_depth, init_std)
        self.visual_prompts = DeepVisualPrompts(
            model, n_tokens=n_ctx_vision, depth=vision_depth, init_std=init_std
        )

    def deep_text_prompt_list(self) -> list[torch.Tensor]:
        return list(self.deep_text_prompts)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return self.visual_prompts(self.clip_model, images)

    def output(self, images: torch.Tensor) -> MethodOutput:
        """``images`` (B, 3, H, W) -> logits (B, C)."""
        self.check_inputs(images)
        return clip_logits(self.encode_images(images), self.class_features(), self.clip_model.logit_scale)


def self_regulation_terms(
    output: MethodOutput, frozen_image_features: torch.Tensor, frozen_text_features: torch.Tensor
) -> dict[str, torch.Tensor]:
    """PromptSRC's three agreement terms, unweighted: ``"kl"`` = KL(softmax(z0) || softmax(z)) summed
    over the batch and divided by ``B * C``; ``"text"`` and ``"image"`` = the mean absolute differences
    of the normalized text and image features from the frozen ones (module docstring)."""
    logits = output.logits
    dtype = logits.dtype
    f0 = frozen_image_features.to(dtype)
    t0 = frozen_text_features.to(dtype)
    frozen_logits = output.logit_scale.detach().to(dtype) * f0 @ t0.T
    log_p = F.log_softmax(logits, dim=-1)
    log_p0 = F.log_softmax(frozen_logits, dim=-1)
    kl = (log_p0.exp() * (log_p0 - log_p)).sum() / logits.numel()
    return {
        "kl": kl,
        "text": (output.text_features.to(dtype) - t0).abs().mean(),
        "image": (output.image_features.to(dtype) - f0).abs().mean(),
    }


class SelfRegulation(StatelessRegularizer):
    """``L_src`` (module docstring) against the frozen model: the templates' raw-mean class features of
    the training classes (computed once) and the step's frozen image features.

    Weights: the config's ``text_loss_weight`` (25) and ``image_loss_weight`` (10); the KL's is 1.
    """

    name = "promptsrc"

    def __init__(self, setup: RegularizerSetup) -> None:
        config = setup.config
        text, image = config.get("text_loss_weight"), config.get("image_loss_weight")
        self.text_weight = TEXT_LOSS_WEIGHT if text is None else float(text)
        self.image_weight = IMAGE_LOSS_WEIGHT if image is None else float(image)
        features = raw_mean_features(setup.model, setup.tokenizer, setup.classnames, promptsrc_templates())
        self.frozen_text_features = features.to(setup.device)

    def __call__(self, batch: StepBatch) -> torch.Tensor:
        terms = self_regulation_terms(batch.output, batch.frozen_image_features, self.frozen_text_features)
        return terms["kl"] + self.text_weight * terms["text"] + self.image_weight * terms["image"]


def aggregation_weights(epochs: int, mean: float, std: float) -> list[float]:
    """``w_e = N(e; mean, std) / sum_e' N(e'; mean, std)`` for epochs ``e = 1..epochs`` (log-space)."""
    logits = [-0.5 * ((epoch - mean) / std) ** 2 for epoch in range(1, epochs + 1)]
    top = max(logits)
    weights = [math.exp(value - top) for value in logits]
    return [w / sum(weights) for w in weights]


class GaussianPromptAggregation(TrainingHook):
    """PromptSRC's GPA (module docstring) over the method's tuned parameters; the running sum is in the
    checkpoint, so a resumed run aggregates the same prompts."""

    name = "gpa"

    def __init__(self, setup: RegularizerSetup) -> None:
        config = setup.config
        mean = RECIPE["gpa_mean"] if config.get("gpa_mean") is None else float(config["gpa_mean"])
        std = RECIPE["gpa_std"] if config.get("gpa_std") is None else float(config["gpa_std"])
        self.weights = aggregation_weights(int(config["epochs"]), mean, std)
        self.method = setup.method
        self.total: dict[str, torch.Tensor] | None = None

    def on_epoch_end(self, epoch: int) -> None:
        if epoch >= len(self.weights):
            raise fail(
                "epoch", f"one of the {len(self.weights)} epochs aggregated (setting 'epochs')", epoch + 1
            )
        weight = self.weights[epoch]
        with torch.no_grad():
            tuned = dict(self.method.tuned_parameters())
            if self.total is None:
                self.total = {name: weight * p.detach() for name, p in tuned.items()}
            else:
                for name, p in tuned.items():
                    self.total[name] += weight * p.detach()
            if epoch == len(self.weights) - 1:
                for name, p in tuned.items():
                    p.copy_(self.total[name])

    def state_dict(self) -> dict[str, Any]:
        return {"total": None if self.total is None else {k: v.cpu() for k, v in self.total.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        total = state.get("total")
        device = next(iter(dict(self.method.tuned_parameters()).values())).device
        self.total = None if total is None else {k: v.to(device) for k, v in total.items()}


SPEC = MethodSpec(
    name="promptsrc",
    title="PromptSRC",
    build=PromptSRC,
    options=("n_ctx", "ctx_init", "prompt_depth", "n_ctx_vision", "vision_depth", "init_std"),
    recipe=RECIPE,
    source=SOURCE,
    regularizers=(SelfRegulation,),
    hooks=(GaussianPromptAggregation,),
    testbed_recipe=TESTBED_RECIPE,
)
