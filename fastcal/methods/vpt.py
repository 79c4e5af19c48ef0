"""VPT: deep visual prompt tuning of CLIP's image encoder (Jia et al., "Visual Prompt Tuning", ECCV
2022), as the CLIP prompt-learning benchmarks run it (github.com/muzairkhattak/multimodal-prompt-learning,
``trainers/vpt.py``).

Vision-only tuning: ``n`` learned tokens enter the image transformer before each of its first ``d``
layers (``fastcal.models.vision_prompts``); the text side is frozen, the hand-crafted prompt's features
``t_c = f_text("a photo of a {name_c}.")`` (the reference's ``FixedEmbeddings``)::

    logits_ic = exp(logit_scale) * cos(f_image(x_i; P_0..P_{d-1}), t_c)

Only the prompts train; the image encoder runs every step (its input changes), the text features are
computed once per class set.

Base-to-new recipe: muzairkhattak/multimodal-prompt-learning ``configs/trainers/VPT/vit_b16_c2_ep5_
batch4_4.yaml`` (``scripts/vpt/base2new_train_vpt.sh``): ViT-B/16, 16 shots, 8 prompt tokens in all 12
layers (``N_CTX_VISION: 8``, ``PROMPT_DEPTH_VISION: 12``), SGD lr 0.0025, batch 4, 5 epochs, cosine after
1 constant warm-up epoch at 1e-5.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fastcal._checks import fail
from fastcal.data.items import prompt_classname
from fastcal.methods.base import MethodOutput, MethodSpec, PromptMethod, clip_logits
from fastcal.models.text_encoder import TextEncoder
from fastcal.models.vision_prompts import DeepVisualPrompts

TEXT_TEMPLATE = "a photo of a {}."

RECIPE = {
    "epochs": 5,
    "batch_size": 4,
    "lr": 0.0025,
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "warmup_epochs": 1,
    "warmup_lr": 1e-5,
    "n_ctx_vision": 8,
    "vision_depth": 12,
    "text_template": TEXT_TEMPLATE,
}
# The embedded testbed (3-layer CLIP, 80 base-class images, 2-core CPU): a short schedule.
TESTBED_RECIPE = {"epochs": 10, "batch_size": 8, "lr": 0.02, "vision_depth": 3}
SOURCE = (
    "muzairkhattak/multimodal-prompt-learning configs/trainers/VPT/vit_b16_c2_ep5_batch4_4.yaml "
    "(scripts/vpt/base2new_train_vpt.sh); text prompt from trainers/vpt.py FixedEmbeddings"
)


@torch.no_grad()
def hand_crafted_features(
    model: nn.Module, tokenizer: Any, classnames: Sequence[str], template: str
) -> torch.Tensor:
    """Frozen text features ``(C, D)`` (unnormalized; float32, or float64 for a float64 model) of
    ``template`` over the class names."""
    prompts = [template.format(prompt_classname(name)) for name in classnames]
    features = TextEncoder(model, bucket=True).encode(tokenizer(prompts))
    return features.to(torch.promote_types(features.dtype, torch.float32))


class VPT(PromptMethod):
    """A CLIP whose image encoder carries learned deep prompts; fixed hand-crafted text (module docstring).

    Args:
        model: an open_clip CLIP with a ViT image tower (frozen here).
        tokenizer: its tokenizer.
        classnames: the classes.
        n_ctx_vision: prompt tokens per layer.
        vision_depth: layers that get their own prompts (1 = shallow VPT; at most the tower's layers).
        text_template: the fixed text prompt, with ``{}`` for the class name.
        init_std: the prompts' N(0, std^2) initialization.
    """

    input_kind = "images"
    method_name = "vpt"
    supports_outliers = True

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        classnames: Sequence[str],
        *,
        n_ctx_vision: int = 8,
        vision_depth: int = 12,
        text_template: str = TEXT_TEMPLATE,
        init_std: float = 0.02,
    ) -> None:
        super().__init__(model, tokenizer)
        if not isinstance(text_template, str) or text_template.count("{}") != 1:
            raise fail("text_template", "a string with one '{}'", repr(text_template))
        self.text_template = text_template
        self.visual_prompts = DeepVisualPrompts(
            model, n_tokens=n_ctx_vision, depth=vision_depth, init_std=init_std
        )
        self._classnames: list[str] = []
        self.set_classnames(classnames)

    @property
    def classnames(self) -> list[str]:
        return self._classnames

    def set_classnames(self, classnames: Sequence[str]) -> None:
        if isinstance(classnames, str) or not classnames:
            raise fail("classnames", "a non-empty list of class names", repr(classnames)[:200])
        features = hand_crafted_features(self.clip_model, self.tokenizer, classnames, self.text_template)
        self.register_buffer("fixed_class_features", features, persistent=False)
        self._classnames = list(classnames)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return self.visual_prompts(self.clip_model, images)

    def outlier_drift_pair(
        self, terms: Sequence[str], frozen_features: torch.Tensor, batch: Any = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """DOR on VPT, fastcal's image-side variant (module docstring): per training image, its centered
        similarity profile over the outliers' frozen features, tuned (B, O) and frozen (B, O)."""
        if batch is None:
            raise fail("batch", "the step's batch (VPT's DOR term compares its image features)", "None")
        outliers = F.normalize(frozen_features.to(batch.output.image_features.dtype), dim=-1)
        tuned = batch.output.image_features @ outliers.T
        frozen = batch.frozen_image_features.to(outliers.dtype) @ outliers.T
        return tuned - tuned.mean(dim=-1, keepdim=True), frozen - frozen.mean(dim=-1, keepdim=True)

    def prepare_outliers(self, terms: Sequence[str], frozen_features: torch.Tensor) -> None:
        """Nothing: VPT's DOR variant reads the outliers' frozen features only."""

    def class_features(self) -> torch.Tensor:
        """The hand-crafted prompt's class text features ``(C, D)`` (frozen, unnormalized)."""
        return self.fixed_class_features

    def output(self, images: torch.Tensor) -> MethodOutput:
        """``images`` (B, 3, H, W) -> logits (B, C)."""
        self.check_inputs(images)
        return clip_logits(self.encode_images(images), self.class_features(), self.clip_model.logit_scale)


SPEC = MethodSpec(
    name="vpt",
    title="VPT",
    build=VPT,
    options=("n_ctx_vision", "vision_depth", "text_template", "init_std"),
    recipe=RECIPE,
    source=SOURCE,
    testbed_recipe=TESTBED_RECIPE,
)
