"""TCP: textual-based class-aware prompt tuning (Yao et al., "TCP: Textual-based Class-aware Prompt
tuning for Visual-Language Model", CVPR 2024; github.com/htyao89/Textual-based_Class-aware_prompt_tuning).

CoOp's context (4 random tokens) plus class-aware tokens made from each class's frozen text feature by
the Textual Knowledge Embedding ``TKE`` (Linear(D, D/4) -> QuickGELU -> Linear(D/4, n W), reshaped to
``(n, W)``); before text layer ``k`` they replace the context positions of their class's prompt::

    t0_c = normalize(f_text(template(name_c)))                      frozen class knowledge
    t_c  = f_text([SOS] v [words_c] [EOS]; positions 1..n replaced by TKE(t0_c) before layer k)
    logits_ic = exp(logit_scale) * cos(f_i, t_c)
    L = loss + w * (1 - mean_c cos(t_c, t0_c))                      KgCoOp's term against t0, w = 8

Before layer ``k`` the context's hidden states still shape the later positions through attention; from
``k`` on the class tokens take their place (the reference's weight 1.0: replacement). The text goes
through the exact truncated encoder (``TextEncoder.encode_embeddings(injected=...)``); the shared-prefix
packing of CoOp does not apply (the context positions differ per class from layer ``k`` on). The trained
parameters are the context and the TKE; ``t0`` is recomputed for every class set (new classes, other
datasets), as the reference builds it for each. DOR's outliers go through the same model, their class
tokens made from their own frozen features (``term_features``).

Prompts, by dataset (``trainers/tcp.py``): the tuned prompt ``CUSTOM_TEMPLATES`` ("X X X X {}, a type of
pet.") carries dataset words after the name (``name_template``; for UCF101 and the ImageNet family,
whose templates have no X, the context overwrites "a photo of a": "person doing {}." and "{}."), and the
class knowledge ``CUSTOM_TEMPLATES_ori`` (``text_template``) differs from CoOp's hand-crafted prompts on
FGVCAircraft, DTD and Food101.

Differences from the reference, none of which changes the computation: it trains in fp16 (weights, TKE
and context) with Adam's epsilon raised to 1e-3 against fp16 NaNs (README, "Adjust EPS"); the recipe
keeps that epsilon, so the optimizer is the published one, in float32 here; its TKE output is reshaped
with a hard-coded 512 (so it runs only where W = 512 and n = 4); the injection layer is the hard-coded
``layers=[8]`` of ``trainers/clip_text/model.py``, a setting here (``inject_layer``).

Base-to-new recipe: htyao89/Textual-based_Class-aware_prompt_tuning
``configs/trainers/TCP/vit_b16_ep100_ctxv1.yaml`` with ``scripts/base2new_train.sh`` (NCTX=4, random
context: ``CTX_INIT: False``): ViT-B/16, 16 shots, Adam lr 0.002 (weight decay 5e-4, betas 0.9 / 0.999:
Dassl's defaults; eps 1e-3), batch 32, 50 epochs (25 on ImageNet and SUN397: ``train.py``
``setup_cfg``), cosine after 1 constant warm-up epoch at 1e-5, KgCoOp weight 8 (``trainers/tcp.py``),
injection before layer 8 of 12.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from open_clip.transformer import QuickGELU
from torch import nn

from fastcal._checks import check_int, fail
from fastcal.data.templates import HARD_PROMPTS
from fastcal.methods.base import MethodSpec
from fastcal.methods.coop import CoOp
from fastcal.methods.objectives import KnowledgeGuidance, StepBatch
from fastcal.models.cache import zeroshot_class_features

CLASS_TEMPLATE = "a photo of a {}."
KGCOOP_WEIGHT = 8.0
INJECT_LAYER = 8
# trainers/tcp.py, by fastcal dataset name: CUSTOM_TEMPLATES as the text after the 4-token context,
# CUSTOM_TEMPLATES_ori as the class-knowledge prompt (CoOp's hand-crafted prompts but on three datasets).
NAME_TEMPLATES = {
    "oxford_pets": "{}, a type of pet.",
    "oxford_flowers": "{}, a type of flower.",
    "fgvc_aircraft": "{}, a type of aircraft.",
    "dtd": "{} texture.",
    "eurosat": "{}.",
    "stanford_cars": "{}, a type of car",
    "food101": "{}, a type of food.",
    "sun397": "{}.",
    "caltech101": "{}.",
    "ucf101": "person doing {}.",
    "imagenet": "{}.",
    "imagenet_sketch": "{}.",
    "imagenet_v2": "{}.",
    "imagenet_a": "{}.",
    "imagenet_r": "{}.",
}
CLASS_TEMPLATES = {
    **{name: HARD_PROMPTS[name] for name in NAME_TEMPLATES},
    "fgvc_aircraft": "a photo of an aircraft {}.",
    "dtd": "a photo of a {}, a type of texture.",
    "food101": "a photo of a {}, a type of food.",
}

RECIPE = {
    "epochs": 50,
    "batch_size": 32,
    "optimizer": "adam",
    "lr": 0.002,
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "adam_eps": 1e-3,
    "warmup_epochs": 1,
    "warmup_lr": 1e-5,
    "n_ctx": 4,
    "ctx_init": "",
    "kgcoop_weight": KGCOOP_WEIGHT,
    "inject_layer": INJECT_LAYER,
    "text_template": CLASS_TEMPLATE,
    "name_template": "{}.",
}
DATASET_RECIPES = {
    name: {
        "name_template": NAME_TEMPLATES[name],
        "text_template": CLASS_TEMPLATES[name],
        **({"epochs": 25} if name in ("imagenet", "sun397") else {}),
    }
    for name in NAME_TEMPLATES
}
# The embedded testbed (3-layer text tower, 80 base-class images, 2-core CPU): a short schedule, the
# class tokens before the last layer (the reference's 8 of 12 is two thirds of the depth).
TESTBED_RECIPE = {"epochs": 30, "batch_size": 16, "lr": 0.01, "inject_layer": 2}
SOURCE = (
    "htyao89/Textual-based_Class-aware_prompt_tuning configs/trainers/TCP/vit_b16_ep100_ctxv1.yaml, "
    "scripts/base2new_train.sh (NCTX=4), train.py (25 epochs on ImageNet and SUN397), README.md (Adam "
    "eps 1e-3); model, templates and loss from trainers/tcp.py and trainers/clip_text/model.py"
)


class TextualKnowledgeEmbedding(nn.Module):
    """TCP's TKE: ``(C, D)`` class features -> ``(C, n, W)`` class-aware tokens (the reference's
    ``meta_net``: linear1 -> QuickGELU -> linear2, default ``nn.Linear`` initialization)."""

    def __init__(self, feature_dim: int, n_tokens: int, width: int) -> None:
        super().__init__()
        self.n_tokens, self.width = n_tokens, width
        self.net = nn.Sequential(
            OrderedDict(
                [
                    ("linear1", nn.Linear(feature_dim, feature_dim // 4)),
                    ("relu", QuickGELU()),
                    ("linear2", nn.Linear(feature_dim // 4, n_tokens * width)),
                ]
            )
        )

    def forward(self, class_features: torch.Tensor) -> torch.Tensor:
        weight = self.net.linear1.weight
        tokens = self.net(class_features.to(weight.dtype))
        return tokens.reshape(class_features.shape[0], self.n_tokens, self.width)


class TCP(CoOp):
    """CoOp's context with class-aware tokens injected at one text layer (module docstring).

    Args:
        model: an open_clip CLIP (frozen here).
        tokenizer: its tokenizer.
        classnames: the classes.
        n_ctx, ctx_init, init_std, name_template: the ``PromptLearner``'s (unified, class name at the
            end).
        text_template: the hand-crafted prompt of the class knowledge ``t0``.
        inject_layer: the text layer before which the class-aware tokens replace the context.
    """

    method_name = "tcp"
    packs_prompts = False

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        classnames: Sequence[str],
        *,
        n_ctx: int = 4,
        ctx_init: str | None = None,
        init_std: float = 0.02,
        name_template: str = "{}.",
        text_template: str = CLASS_TEMPLATE,
        inject_layer: int = INJECT_LAYER,
    ) -> None:
        super().__init__(
            model,
            tokenizer,
            classnames,
            n_ctx=n_ctx,
            ctx_init=ctx_init,
            init_std=init_std,
            name_template=name_template,
        )
        layers = len(model.transformer.resblocks)
        check_int("inject_layer", inject_layer, minimum=0)
        if inject_layer >= layers:
            raise fail("inject_layer", f"a text layer in [0, {layers - 1}]", inject_layer)
        self.inject_layer = inject_layer
        self.text_template = text_template
        learner = self.prompt_learner
        self.knowledge_embedding = TextualKnowledgeEmbedding(
            model.text_projection.shape[1], learner.n_ctx, learner.ctx_dim
        ).to(learner.ctx.device)
        self._set_class_knowledge()

    def _set_class_knowledge(self) -> None:
        features = zeroshot_class_features(
            self.clip_model, self.tokenizer, self.classnames, [self.text_template]
        )
        self.register_buffer("class_knowledge", features, persistent=False)

    def set_classnames(self, classnames: Sequence[str]) -> None:
        super().set_classnames(classnames)
        self._set_class_knowledge()

    def class_tokens(self, class_features: torch.Tensor) -> tuple[int, torch.Tensor]:
        """``(inject_layer, TKE(class_features))``: what ``TextEncoder.encode_embeddings`` injects."""
        return self.inject_layer, self.knowledge_embedding(class_features)

    def class_features(self) -> torch.Tensor:
        """Class text features (C, D) with the class-aware tokens (unnormalized)."""
        learner = self.prompt_learner
        return learner.text_encoder.encode_embeddings(
            learner.prompt_embeddings(), learner.token_ids, injected=self.class_tokens(self.class_knowledge)
        )

    def term_features(
        self,
        terms: Sequence[str],
        *,
        image_features: torch.Tensor | None = None,
        frozen_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``(T, D)`` features of ``terms`` in the tuned template, each with the class tokens of its own
        frozen feature (``frozen_features`` (T, D), required)."""
        if frozen_features is None:
            raise fail("frozen_features", "the terms' frozen features (TCP's class knowledge)", "None")
        tokens = self.class_tokens(F.normalize(frozen_features, dim=-1))
        return self.prompt_learner.encode_terms(list(terms), injected=tokens)


class ClassKnowledgeGuidance(KnowledgeGuidance):
    """KgCoOp's term against TCP's own class knowledge ``t0`` (the TKE's input), weight
    ``kgcoop_weight`` (8: ``trainers/tcp.py`` ``loss = CE + 8.0 * score``)."""

    name = "tcp_knowledge"

    def anchor(self, batch: StepBatch) -> torch.Tensor:
        return batch.method.class_knowledge


SPEC = MethodSpec(
    name="tcp",
    title="TCP",
    build=TCP,
    options=("n_ctx", "ctx_init", "init_std", "name_template", "text_template", "inject_layer"),
    recipe=RECIPE,
    source=SOURCE,
    regularizers=(ClassKnowledgeGuidance,),
    testbed_recipe=TESTBED_RECIPE,
    dataset_recipes=DATASET_RECIPES,
)
