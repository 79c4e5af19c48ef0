"""MaPLe: multi-modal prompt learning (Khattak et al., CVPR 2023; github.com/muzairkhattak/multimodal-
prompt-learning ``trainers/maple.py``, ``clip/model.py``).

Prompts in both towers, coupled: the text side learns a context ``v`` (``n`` tokens, the first ``n``
tokens of "a photo of a" at initialization, the rest of the phrase kept as words) and deep text
prompts ``T_1..T_{d-1}`` (N(0, 0.02^2)); the vision side gets no parameters of its own, its prompts are
projections of the text ones, ``V_0 = F_0(v)``, ``V_k = F_k(T_k)`` with linear coupling functions
``F_k`` (text width -> vision width; the reference initializes ``F_1..F_{d-1}`` as copies of one layer)::

    t_c = f_text([SOS] v [of a] [name_c] [.] [EOS]; positions 1..n replaced by T_k before layer k)
    f_i = f_image(x_i; V_0 .. V_{d-1})                       (``fastcal.models.vision_prompts``)
    logits_ic = exp(logit_scale) * cos(f_i, t_c)

The text goes through the exact truncated encoder (``TextEncoder.encode_embeddings`` with
``deep_prompts``); the image encoder runs every step (its prompts change).

Base-to-new recipe: muzairkhattak/multimodal-prompt-learning ``configs/trainers/MaPLe/vit_b16_c2_ep5_
batch4_2ctx.yaml`` (``scripts/maple/base2new_train_maple.sh``): ViT-B/16, 16 shots, ``N_CTX: 2``,
``CTX_INIT: "a photo of a"``, ``PROMPT_DEPTH: 9``, SGD lr 0.0035, batch 4, 5 epochs, cosine after 1
constant warm-up epoch at 1e-5.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from fastcal._checks import check_int, fail
from fastcal.methods.base import MethodOutput, MethodSpec, PromptMethod, clip_logits
from fastcal.methods.prompt_learner import PromptLearner
from fastcal.models.text_encoder import TextEncoder
from fastcal.models.vision_prompts import prompted_image_features, vision_tower

RECIPE = {
    "epochs": 5,
    "batch_size": 4,
    "lr": 0.0035,
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "warmup_epochs": 1,
    "warmup_lr": 1e-5,
    "n_ctx": 2,
    "ctx_init": "a photo of a",
    "prompt_depth": 9,
}
SOURCE = (
    "muzairkhattak/multimodal-prompt-learning configs/trainers/MaPLe/vit_b16_c2_ep5_batch4_2ctx.yaml "
    "(scripts/maple/base2new_train_maple.sh)"
)
# The reference initializes the phrase's first n tokens only while n <= 4 (else random "X" context).
MAX_PHRASE_CTX = 4


def phrase_context_learner(
    model: nn.Module,
    tokenizer: Any,
    classnames: Sequence[str],
    *,
    n_ctx: int,
    ctx_init: str | None,
    init_std: float,
) -> PromptLearner:
    """The text context of MaPLe and PromptSRC: the first ``n_ctx`` tokens of ``ctx_init`` (the rest of
    the phrase kept as words before the name) while ``n_ctx <= 4``, else ``n_ctx`` random tokens, as
    their reference code decides."""
    text_encoder = TextEncoder(model, bucket=True)
    if ctx_init and n_ctx <= MAX_PHRASE_CTX:
        return PromptLearner(
            text_encoder, tokenizer, classnames, ctx_init=ctx_init, n_learned=n_ctx, init_std=init_std
        )
    return PromptLearner(text_encoder, tokenizer, classnames, n_ctx=n_ctx, init_std=init_std)


def deep_text_prompts(learner: PromptLearner, depth: int, init_std: float) -> nn.ParameterList:
    """``depth - 1`` deep text prompts shaped like ``learner``'s context, N(0, init_std^2), for text
    layers ``1 .. depth - 1`` (``TextEncoder.encode_embeddings(deep_prompts=...)``)."""
    shape, device = learner.ctx.shape, learner.ctx.device
    return nn.ParameterList(
        [nn.Parameter(torch.empty(shape, device=device).normal_(0.0, init_std)) for _ in range(depth - 1)]
    )


class DeepTextPromptMethod(PromptMethod):
    """A method whose text side is a ``prompt_learner`` context plus deep text prompts
    (``deep_text_prompt_list``): MaPLe, PromptSRC. Class features and DOR's outlier words go through both.

    Args:
        model, tokenizer, classnames, n_ctx, ctx_init, prompt_depth, init_std: the method's; the context
            is ``phrase_context_learner``'s, ``prompt_depth`` at most ``prompt_layers()``.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        classnames: Sequence[str],
        n_ctx: int,
        ctx_init: str | None,
        prompt_depth: int,
        init_std: float,
    ) -> None:
        super().__init__(model, tokenizer)
        check_int("n_ctx", n_ctx, minimum=1)
        check_int("prompt_depth", prompt_depth, minimum=1)
        layers, which = self.prompt_layers()
        if prompt_depth > layers:
            raise fail("prompt_depth", f"at most {layers} ({which})", prompt_depth)
        self.prompt_learner = phrase_context_learner(
            model, tokenizer, classnames, n_ctx=n_ctx, ctx_init=ctx_init, init_std=init_std
        )

    def prompt_layers(self) -> tuple[int, str]:
        """How many layers ``prompt_depth`` may reach, and which they are (for its error): the text
        tower's."""
        return len(self.clip_model.transformer.resblocks), "the text tower's layers"

    def deep_text_prompt_list(self) -> list[torch.Tensor]:
        """The deep text prompts, one ``(n, W)`` per text layer ``1 .. depth - 1``."""
        raise NotImplementedError

    @property
    def classnames(self) -> list[str]:
        return self.prompt_learner.classnames

    def set_classnames(self, classnames: Sequence[str]) -> None:
        self.prompt_learner.set_classnames(classnames)

    def class_features(self) -> torch.Tensor:
        """Class text features (C, D) with the context and the deep text prompts (unnormalized)."""
        learner = self.prompt_learner
        return learner.text_encoder.encode_embeddings(
            learner.prompt_embeddings(), learner.token_ids, deep_prompts=self.deep_text_prompt_list()
        )

    def term_features(
        self,
        terms: Sequence[str],
        *,
        image_features: torch.Tensor | None = None,
        frozen_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``(T, D)`` features of ``terms`` through the context and the deep text prompts, as its classes."""
        return self.prompt_learner.encode_terms(
            list(terms), deep_prompts=self.deep_text_prompt_list() or None
        )


class MaPLe(DeepTextPromptMethod):
    """Coupled deep prompts in the text and image towers (module docstring).

    Args:
        model: an open_clip CLIP with a ViT image tower (frozen here).
        tokenizer: its tokenizer.
        classnames: the classes.
        n_ctx: context tokens per layer, in both towers.
        ctx_init: the phrase whose first ``n_ctx`` tokens initialize the context (``None`` or ``n_ctx >
            4``: random N(0, init_std^2), as the reference).
        prompt_depth: layers with prompts (1 = shallow: context and its projection only); at most the
            number of layers of the shallower tower.
        init_std: standard deviation of the random initializations.
    """

    input_kind = "images"
    method_name = "maple"
    supports_outliers = True

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        classnames: Sequence[str],
        *,
        n_ctx: int = 2,
        ctx_init: str | None = "a photo of a",
        prompt_depth: int = 9,
        init_std: float = 0.02,
    ) -> None:
        super().__init__(model, tokenizer, classnames, n_ctx, ctx_init, prompt_depth, init_std)
        text_width = self.prompt_learner.ctx_dim
        vision_width = vision_tower(model).class_embedding.shape[-1]
        device = self.prompt_learner.ctx.device
        self.proj = nn.Linear(text_width, vision_width).to(device)
        self.compound_prompts_text = deep_text_prompts(self.prompt_learner, prompt_depth, init_std)
        coupling = nn.Linear(text_width, vision_width).to(device)
        self.compound_prompt_projections = nn.ModuleList(
            [copy.deepcopy(coupling) for _ in range(prompt_depth - 1)]
        )

    def prompt_layers(self) -> tuple[int, str]:
        tower = vision_tower(self.clip_model)
        layers = min(len(tower.transformer.resblocks), len(self.clip_model.transformer.resblocks))
        return layers, "the layers of the shallower tower"

    def deep_text_prompt_list(self) -> list[torch.Tensor]:
        return list(self.compound_prompts_text)

    def visual_prompts(self) -> list[torch.Tensor]:
        """``[F_0(v), F_1(T_1), ...]``: the image tower's prompts, one (n, vision width) per layer."""
        deep = [
            f(t) for f, t in zip(self.compound_prompt_projections, self.compound_prompts_text, strict=True)
        ]
        return [self.proj(self.prompt_learner.ctx), *deep]

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return prompted_image_features(self.clip_model, images, self.visual_prompts())

    def output(self, images: torch.Tensor) -> MethodOutput:
        """``images`` (B, 3, H, W) -> logits (B, C)."""
        self.check_inputs(images)
        return clip_logits(self.encode_images(images), self.class_features(), self.clip_model.logit_scale)


SPEC = MethodSpec(
    name="maple",
    title="MaPLe",
    build=MaPLe,
    options=("n_ctx", "ctx_init", "prompt_depth", "init_std"),
    recipe=RECIPE,
    source=SOURCE,
    testbed_recipe={"epochs": 10, "batch_size": 8, "lr": 0.02, "prompt_depth": 3},
)
