"""The test-time methods and initializations runs choose by name (``fastcal.registry`` kinds
``"tpt_method"`` and ``"tpt_init"``).

A method builds a predictor, ``predictor(images, generators) -> logits (S, C)`` of each image's centre
view: TPT, C-TPT and O-TPT tune the context on every sample first (``fastcal.tpt.tpt.TPT``), the zero-shot
baselines score the centre view with fixed class features (``ZeroShotViews``). An initialization gives
the prompts tuning starts from, and resets to: the hard prompt's words (``hard``), FPP's data-free
pretrained context (``fpp``, ``fastcal.tpt.fpp``), or one context per template of the dataset, tuned as
an ensemble (``ensemble``, ``fastcal.tpt.ensemble``). Each carries its published settings for a dataset
(``recipe(dataset) -> {setting: value}``; ``None`` is the embedded testbed), which a run takes for the
settings it leaves unset: the method's first, then the initialization's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from fastcal.models.clip import LoadedClip
from fastcal.tpt.augment import ViewAugmenter, normalization, view_size
from fastcal.tpt.ctpt import IMAGENET_FAMILY, default_lambda
from fastcal.tpt.fpp import FPP_SHIFT_WEIGHT, FPPConfig, pretrain_context
from fastcal.tpt.step import TuningConfig
from fastcal.tpt.tpt import TPT

Predictor = Callable[[Sequence[Any], Sequence[torch.Generator]], torch.Tensor]


@dataclass(frozen=True)
class TptMethodSpec:
    """A test-time method.

    Attributes:
        name: the ``--method`` name.
        title: how tables name it.
        tunes: whether it tunes a context per sample (the baselines do not).
        build: ``build(clip, classnames, dataset_templates, *, prompt_templates, tuning, ctx_init,
            init_ctx, augmix, flip, samples_per_step, use_graph, device) -> predictor``.
        recipe: ``recipe(dataset) -> settings`` (module docstring).
        weights: the tuning weights it takes, by setting name (C-TPT's ``dispersion_weight``, O-TPT's
            ``orthogonality_weight``); the others stay 0.
        source: where the recipe comes from.
    """

    name: str
    title: str
    tunes: bool
    build: Callable[..., Predictor]
    recipe: Callable[[str | None], Mapping[str, Any]]
    weights: tuple[str, ...]
    source: str


@dataclass(frozen=True)
class TptInitSpec:
    """An initial context.

    Attributes:
        name: the ``--init`` name.
        title: how tables name it (prefixed to the method's).
        templates: ``templates(dataset_templates, ctx_init) -> prompt templates`` the tuned prompts are
            made of (one: a single context; several: an ensemble).
        context: ``context(clip, classnames, *, ctx_init, fpp, progress) -> (n_ctx, W)`` tensor, or
            ``None`` for the templates' own words; deterministic, so runs may cache it.
        recipe: ``recipe(dataset) -> settings``.
        source: where the recipe comes from.
    """

    name: str
    title: str
    templates: Callable[[Sequence[str], str], list[str]]
    context: Callable[..., torch.Tensor] | None
    recipe: Callable[[str | None], Mapping[str, Any]]
    source: str


class ZeroShotViews:
    """The zero-shot baseline on the centre view: fixed class features from ``templates`` (one template:
    the hard prompt; several: CLIP's prompt ensemble)."""

    def __init__(
        self, clip: LoadedClip, classnames: Sequence[str], templates: Sequence[str], device: torch.device
    ) -> None:
        from fastcal.models.cache import class_text_features

        self.model = clip.model
        features = class_text_features(clip.model, clip.tokenizer, list(classnames), list(templates))
        self.class_features = F.normalize(features.float(), dim=-1).to(device)
        mean, std = normalization(clip.model)
        self.augmenter = ViewAugmenter(view_size(clip.model), mean, std, n_views=1, device=device)
        self.scale = clip.model.logit_scale.detach().float().exp().to(device)
        self.dtype = next(clip.model.visual.parameters()).dtype
        self.device = device

    @torch.no_grad()
    def __call__(self, images: Sequence[Any], generators: Sequence[torch.Generator]) -> torch.Tensor:
        views = self.augmenter.batch(images, generators)
        features = F.normalize(self.model.encode_image(views.to(self.device, self.dtype)).float(), dim=-1)
        return self.scale * features @ self.class_features.T


def hard_prompt(ctx_init: str) -> str:
    """The hard prompt template of a context phrase: ``"<phrase> {}."`` (TPT's zero-shot prompt)."""
    return f"{ctx_init} {{}}."


def _build_tpt(
    clip: LoadedClip,
    classnames: Sequence[str],
    dataset_templates: Sequence[str],
    *,
    prompt_templates: Sequence[str],
    tuning: TuningConfig,
    ctx_init: str,
    init_ctx: torch.Tensor | None,
    augmix: bool,
    flip: bool,
    samples_per_step: int,
    use_graph: bool | None,
    device: torch.device,
) -> Predictor:
    return TPT(
        clip.model,
        clip.tokenizer,
        classnames,
        config=tuning,
        templates=prompt_templates,
        init_ctx=init_ctx,
        augmix=augmix,
        flip=flip,
        samples_per_step=samples_per_step,
        use_graph=use_graph,
    )


def _build_hard_prompt(clip: LoadedClip, classnames, dataset_templates, *, ctx_init: str, device, **_: Any):
    return ZeroShotViews(clip, classnames, [hard_prompt(ctx_init)], device)


def _build_ensemble(clip: LoadedClip, classnames, dataset_templates, *, device, **_: Any):
    return ZeroShotViews(clip, classnames, dataset_templates, device)


TPT_SOURCE = "azshue/TPT tpt_classification.py (AugMix on the fine-grained sets, data/datautils.py)"
TPT_METHOD = TptMethodSpec(
    name="tpt",
    title="TPT",
    tunes=True,
    build=_build_tpt,
    recipe=lambda dataset: {"augmix": dataset not in IMAGENET_FAMILY},
    weights=(),
    source=TPT_SOURCE,
)
CTPT_METHOD = TptMethodSpec(
    name="ctpt",
    title="C-TPT",
    tunes=True,
    build=_build_tpt,
    recipe=lambda dataset: {"augmix": True, "dispersion_weight": default_lambda(dataset)},
    weights=("dispersion_weight",),
    source="hee-suk-yoon/C-TPT scripts (lambda 50 fine-grained, 20 with --I_augmix on the ImageNet variants)",
)
ZEROSHOT_METHOD = TptMethodSpec(
    name="zeroshot",
    title="zero-shot (hard prompt)",
    tunes=False,
    build=_build_hard_prompt,
    recipe=lambda dataset: {},
    weights=(),
    source=TPT_SOURCE,
)
ENSEMBLE_METHOD = TptMethodSpec(
    name="ensemble",
    title="zero-shot (prompt ensemble)",
    tunes=False,
    build=_build_ensemble,
    recipe=lambda dataset: {},
    weights=(),
    source="the dataset's templates (CLIP's 80 for the ImageNet family)",
)
OTPT_METHOD = TptMethodSpec(
    name="otpt",
    title="O-TPT",
    tunes=True,
    build=_build_tpt,
    # lambda 18 on the fine-grained sets and ImageNet (AugMix off there), 2 on its variants with AugMix
    recipe=lambda dataset: {
        "augmix": dataset != "imagenet",
        "orthogonality_weight": 2.0 if dataset in IMAGENET_FAMILY and dataset != "imagenet" else 18.0,
    },
    weights=("orthogonality_weight",),
    source="ashshaksharifdeen/O-TPT scripts/test_tpt_otpt_fg.sh (lambda 18) and test_tpt_otpt_ds.sh "
    "(lambda 2, --I_augmix); otpt_classification.py",
)


def _fpp_context(
    clip: LoadedClip, classnames: Sequence[str], *, ctx_init: str, fpp: FPPConfig, progress: bool
) -> torch.Tensor:
    from fastcal.methods.prompt_learner import PromptLearner
    from fastcal.models.text_encoder import TextEncoder

    clip.model.requires_grad_(False)
    learner = PromptLearner(TextEncoder(clip.model), clip.tokenizer, list(classnames), ctx_init=ctx_init)
    learner.to(next(clip.model.parameters()).device)
    return pretrain_context(learner, fpp, progress=progress)


def _hard_template(dataset_templates: Sequence[str], ctx_init: str) -> list[str]:
    return [hard_prompt(ctx_init)]


HARD_INIT = TptInitSpec(
    name="hard",
    title="",
    templates=_hard_template,
    context=None,
    recipe=lambda dataset: {},
    source=TPT_SOURCE,
)
FPP_INIT = TptInitSpec(
    name="fpp",
    title="FPP",
    templates=_hard_template,
    context=_fpp_context,
    # 1 + 15/C is for the fine-grained sets (C >= 10: w <= 2.5); the distribution-shift script and the
    # 5-class testbed (where the formula would give 4) take 1.25
    recipe=lambda dataset: {
        "augmix": True,
        "fpp_weight": FPP_SHIFT_WEIGHT if dataset is None or dataset in IMAGENET_FAMILY else None,
    },
    source="YonseiML/fpp fpp_classification.py, scripts FPP_DS.sh (w 1.25) and FPP_FG.sh (w 1 + 15/C)",
)
ENSEMBLE_INIT = TptInitSpec(
    name="ensemble",
    title="Ensemble",
    templates=lambda dataset_templates, ctx_init: list(dataset_templates),
    context=None,
    recipe=lambda dataset: {},
    source="hee-suk-yoon/C-TPT tables (TPT and C-TPT from the Ensemble initialization); fastcal.tpt.ensemble",
)
