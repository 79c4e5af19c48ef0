"""CoCoOp: conditional context optimization (Zhou et al., "Conditional Prompt Learning for
Vision-Language Models", CVPR 2022; github.com/KaiyangZhou/CoOp ``trainers/cocoop.py``).

A meta-net ``h`` (Linear(D, D // 16) -> ReLU -> Linear(-> W)) maps each image's normalized feature
``f_i`` to a shift ``pi_i = h(f_i)`` added to every context token, so each image gets its own prompts
and its own classifier::

    t_ic = f_text([SOS] v_1 + pi_i ... v_n + pi_i [name_c] [.] [EOS]),
    logits_ic = exp(logit_scale) * cos(f_i, t_ic)

The reference encodes the ``C`` prompts of one image at a time in a Python loop (and trains with batch
1); here the ``B * C`` prompts of a batch go through the text encoder in one call
(``PromptLearner.forward`` with a per-sample context), with the exact truncated encoder. The image
encoder is frozen, so training reads cached image features.

Base-to-new recipe: KaiyangZhou/CoOp ``configs/trainers/CoCoOp/vit_b16_c4_ep10_batch1_ctxv1.yaml``
(``scripts/cocoop/base2new_train.sh``): ViT-B/16, 16 shots, context "a photo of a" (4 tokens), SGD lr
0.002, batch 1, 10 epochs, cosine after 1 constant warm-up epoch at 1e-5.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fastcal.methods.base import MethodOutput, MethodSpec, clip_logits
from fastcal.methods.coop import PROMPT_OPTIONS, CoOp

RECIPE = {
    "epochs": 10,
    "batch_size": 1,
    "lr": 0.002,
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "warmup_epochs": 1,
    "warmup_lr": 1e-5,
    "n_ctx": 4,
    "ctx_init": "a photo of a",
}
# The embedded testbed (3-layer CLIP, 80 base-class images, 2-core CPU): a short schedule.
TESTBED_RECIPE = {"epochs": 10, "batch_size": 8, "lr": 0.02}
SOURCE = (
    "KaiyangZhou/CoOp configs/trainers/CoCoOp/vit_b16_c4_ep10_batch1_ctxv1.yaml "
    "(scripts/cocoop/base2new_train.sh)"
)


class CoCoOp(CoOp):
    """CoOp plus an image-conditioned shift of the context (module docstring).

    Args: as ``CoOp``; the meta-net's hidden width is ``D // 16`` (D = the image feature width).
    """

    method_name = "cocoop"
    per_image_prompts = True
    packs_prompts = False

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
    ) -> None:
        super().__init__(
            model,
            tokenizer,
            classnames,
            n_ctx=n_ctx,
            ctx_init=ctx_init,
            class_specific=class_specific,
            class_token_position=class_token_position,
            init_std=init_std,
        )
        vis_dim = model.visual.output_dim
        ctx_dim = self.prompt_learner.ctx_dim
        device = self.prompt_learner.ctx.device
        self.meta_net = nn.Sequential(
            OrderedDict(
                [
                    ("linear1", nn.Linear(vis_dim, vis_dim // 16)),
                    ("relu", nn.ReLU(inplace=True)),
                    ("linear2", nn.Linear(vis_dim // 16, ctx_dim)),
                ]
            )
        ).to(device)

    def conditioned_context(self, image_features: torch.Tensor) -> torch.Tensor:
        """The per-image contexts ``ctx + meta_net(normalize(f_i))``: (B, n_ctx, W) (class-specific:
        (B, C, n_ctx, W))."""
        shift = self.meta_net(F.normalize(image_features.float(), dim=-1))
        ctx = self.prompt_learner.ctx
        shift = shift[:, None, None, :] if ctx.ndim == 3 else shift[:, None, :]
        return ctx.unsqueeze(0) + shift

    def term_features(
        self,
        terms: Sequence[str],
        *,
        image_features: torch.Tensor | None = None,
        frozen_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``(T, D)`` features of ``terms`` with the batch's image-conditioned context ``ctx + mean_i
        meta_net(f_i)`` (CoCoOp trains with batch 1, where this is the image's own context; gradients
        reach the meta-net too); without images, the bare context."""
        if image_features is None:
            return super().term_features(terms)
        ctx = self.conditioned_context(image_features).mean(dim=0)
        return self.prompt_learner.encode_terms(list(terms), ctx.mean(dim=0) if ctx.ndim == 3 else ctx)

    def class_features(self, image_features: torch.Tensor) -> torch.Tensor:
        """Each image's class text features ``(B, C, D)`` (unnormalized): the context is conditioned on
        the image's features ``(B, D)``."""
        return self.prompt_learner(self.conditioned_context(image_features))

    def output(self, image_features: torch.Tensor) -> MethodOutput:
        """``image_features`` (B, D) -> logits (B, C) with one classifier per image."""
        self.check_inputs(image_features)
        return clip_logits(image_features, self.class_features(image_features), self.clip_model.logit_scale)


SPEC = MethodSpec(
    name="cocoop",
    title="CoCoOp",
    build=CoCoOp,
    options=PROMPT_OPTIONS,
    recipe=RECIPE,
    source=SOURCE,
    testbed_recipe=TESTBED_RECIPE,
)
