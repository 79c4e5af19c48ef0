"""CoOp: context optimization (Zhou et al., "Learning to Prompt for Vision-Language Models", IJCV 2022).

A learned context ``v_1..v_n`` replaces the hand-crafted prompt words; class ``c``'s text feature is
``t_c = f_text([SOS] v_1..v_n [name_c] [.] [EOS])`` (``PromptLearner``), the image encoder is frozen and
``logits_ic = exp(logit_scale) * cos(f_image(x_i), t_c)``. Only the context trains.

With one context for all classes and the class name at the end (the default layout), the start token
and the context are the same first positions of every class prompt, and the causal text tower computes
them once per step (``fastcal.methods.prefix.PackedPrompts``: exact, rebuilt for each class set). Other
layouts go through the exact truncated text encoder with length buckets (``TextEncoder(model,
bucket=True)``): with many classes of mixed name lengths each group of prompts runs at its own length;
the bucketing cost model keeps one group where splitting does not pay (small class sets, GPUs).

Base-to-new recipe (the CoCoOp paper's CoOp baseline; github.com/KaiyangZhou/CoOp
``scripts/cocoop/base2new_train.sh`` with ``configs/trainers/CoOp/vit_b16_ctxv1.yaml``): ViT-B/16, 16
shots, context initialized from "a photo of a" (4 tokens), SGD lr 0.002 (momentum 0.9, weight decay
5e-4: Dassl's defaults), batch 32, 200 epochs (50 on ImageNet, ``vit_b16_ep50_ctxv1.yaml``), cosine
schedule after 1 warm-up epoch at a constant 1e-5.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from fastcal.methods.base import MethodOutput, MethodSpec, PromptMethod, clip_logits
from fastcal.methods.prefix import PackedPrompts, shares_prefix
from fastcal.methods.prompt_learner import PromptLearner
from fastcal.models.text_encoder import TextEncoder

PROMPT_OPTIONS = ("n_ctx", "ctx_init", "class_specific", "class_token_position", "init_std")

RECIPE = {
    "epochs": 200,
    "batch_size": 32,
    "lr": 0.002,
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "warmup_epochs": 1,
    "warmup_lr": 1e-5,
    "n_ctx": 4,
    "ctx_init": "a photo of a",
}
# The embedded testbed (3-layer CLIP, 80 base-class images, 2-core CPU): a short schedule.
TESTBED_RECIPE = {"epochs": 50, "batch_size": 16, "lr": 0.01}
SOURCE = (
    "KaiyangZhou/CoOp configs/trainers/CoOp/vit_b16_ctxv1.yaml, as scripts/cocoop/base2new_train.sh "
    "runs CoOp (ImageNet: vit_b16_ep50_ctxv1.yaml, 50 epochs); SGD momentum and weight decay: "
    "KaiyangZhou/Dassl.pytorch dassl/config/defaults.py"
)


class CoOp(PromptMethod):
    """A frozen CLIP with a learned text context (module docstring).

    Args:
        model: an open_clip CLIP (frozen here).
        tokenizer: its tokenizer.
        classnames: the classes to train on.
        n_ctx, ctx_init, class_specific, class_token_position, init_std, n_learned, name_template: the
            ``PromptLearner``'s.
    """

    input_kind = "features"
    method_name = "coop"
    # one context for every class: the shared prefix is computed once (CoCoOp's contexts differ per image)
    packs_prompts = True
    supports_outliers = True

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        classnames: Sequence[str],
        *,
        n_ctx: int = 16,
        ctx_init: str | None = None,
        class_specific: bool = False,
        class_token_position: str = "end",
        init_std: float = 0.02,
        n_learned: int | None = None,
        name_template: str = "{}.",
    ) -> None:
        super().__init__(model, tokenizer)
        self.prompt_learner = self.context_learner(
            TextEncoder(model, bucket=True),
            tokenizer,
            classnames,
            n_ctx=n_ctx,
            ctx_init=ctx_init or None,
            class_specific=class_specific,
            class_token_position=class_token_position,
            init_std=init_std,
            n_learned=n_learned,
            name_template=name_template,
        )
        self.packed: PackedPrompts | None = None
        self._pack()

    def context_learner(
        self, text_encoder: TextEncoder, tokenizer: Any, classnames: Sequence[str], **options: Any
    ) -> PromptLearner:
        """The ``PromptLearner`` of the prompt options, as given (ProGrad pads its phrase here)."""
        return PromptLearner(text_encoder, tokenizer, classnames, **options)

    def _pack(self) -> None:
        learner = self.prompt_learner
        packable = self.packs_prompts and shares_prefix(learner)
        self.packed = PackedPrompts(learner, self.clip_model, samples=1) if packable else None

    @property
    def classnames(self) -> list[str]:
        return self.prompt_learner.classnames

    def set_classnames(self, classnames: Sequence[str]) -> None:
        self.prompt_learner.set_classnames(classnames)
        self._pack()

    def class_features(self) -> torch.Tensor:
        """The classes' text features ``(C, D)`` with the learned context (unnormalized)."""
        if self.packed is None:
            return self.prompt_learner()
        return self.packed(self.prompt_learner.ctx[None])[0]

    def output(self, image_features: torch.Tensor) -> MethodOutput:
        """``image_features`` (B, D) from the frozen image encoder -> logits over the classes."""
        self.check_inputs(image_features)
        return clip_logits(image_features, self.class_features(), self.clip_model.logit_scale)

    def term_features(
        self,
        terms: Sequence[str],
        *,
        image_features: torch.Tensor | None = None,
        frozen_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``(T, D)`` features of ``terms`` in the learned template (``PromptLearner.encode_terms``); a
        class-specific context contributes the mean of the class contexts (a word has no class)."""
        ctx = self.prompt_learner.ctx
        return self.prompt_learner.encode_terms(list(terms), ctx.mean(dim=0) if ctx.ndim == 3 else ctx)


SPEC = MethodSpec(
    name="coop",
    title="CoOp",
    build=CoOp,
    options=PROMPT_OPTIONS,
    recipe=RECIPE,
    source=SOURCE,
    testbed_recipe=TESTBED_RECIPE,
)
