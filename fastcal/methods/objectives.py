"""The training objective of a prompt method: one loss plus any number of regularizers.

    L = loss(batch) + sum_r regularizer_r(batch)

Every term reads the same ``StepBatch`` (the method's output, the labels, the frozen zero-shot class
features of the training classes, the method itself, the epoch), so a loss or a regularizer plugs in
without a new method file. Both are entries of ``fastcal.registry``:

- a loss is a ``LossSpec`` (kind ``"loss"``): its name, the settings it reads (``options``) and
  ``build(options) -> loss(batch)``;
- a regularizer is a factory (kind ``"regularizer"``) that takes a ``RegularizerSetup`` and returns an
  object with ``__call__(batch) -> Tensor`` (the weighted term), ``on_epoch_start(epoch)`` (e.g.
  resampling outliers, reproducibly per epoch), and ``state_dict()`` / ``load_state_dict(state)`` for
  exact resumption. A method's own regularizers (``MethodSpec.regularizers``) are such factories too,
  without a registry entry.

What a step does beyond its objective, a method says with ``TrainingHook`` s (``MethodSpec.hooks``): a
gradient rule that forms the update from the objective (ProGrad) and epoch-end steps (PromptSRC's
prompt aggregation).

Losses (all from ``fastcal.losses``):

- ``"ce"``: cross-entropy on the method's logits.
- ``"label_smoothing"``: cross-entropy against ``(1 - eps) onehot + eps / C``.
- ``"calibrated"``: TCPT's ``CalibratedPromptLoss`` (CVPR 2026; ashshaksharifdeen/TCPT): CE + a margin
  regularizer ``-alpha mean(m) + beta Var(m)`` on the logit margins + ``w`` x the gap between the first
  two moments of the tuned and frozen class features, fused. With one classifier per image (CoCoOp),
  which the fused function does not take, or logits that are not the scaled cosines of the features
  (ProDA), the same terms are composed on the method's logits and the moment gap is averaged over the
  images' classifiers (``_composed_calibrated``).

The train-time calibration baselines TCPT and DOR compare against (``fastcal.losses.baselines``, each
with its reference's defaults):

- ``"mbls"``: MbLS, CE + ``mbls_alpha`` mean relu(max z - z - ``mbls_margin``) (margin 10, alpha 0.1).
- ``"confidence_penalty"``: CE - ``confidence_penalty_weight`` x entropy / C (weight 0.1).
- ``"focal"``: focal loss with ``focal_gamma`` (3), FLSD-53's per-sample gamma with ``focal_adaptive``.
- ``"mdca"``: CE + ``mdca_weight`` x MDCA (weight 1).
- ``"zs_norm"``: CE of the logits min-max rescaled onto the zero-shot logits' range (no weight).
- ``"penalty"``: CE + ``zeroshot_penalty_weight`` x the logits' excursions outside the zero-shot range
  (weight 10).

The last two need the frozen zero-shot CLIP's logits of the batch's images (``zeroshot_logits``): from
the batch's frozen features, or for a method that prompts the image encoder, one more pass of the
unprompted encoder over the images (as TCPT's trainers run ``ZeroshotCLIP.model_inference``).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from fastcal import registry
from fastcal._checks import fail
from fastcal.methods.base import MethodOutput, PromptMethod

DEFAULT_LABEL_SMOOTHING = 0.1


@dataclass
class StepBatch:
    """What every loss term sees at a step.

    ``frozen_text_features`` (C, D): L2-normalized zero-shot features of the training classes (the
    config's ``frozen_templates``), the anchor of the calibrated loss's moment term and of KgCoOp.
    ``inputs``: the batch the method ran on (features or images); ``frozen_image_features`` (B, D), the
    batch under the frozen unprompted image encoder (L2-normalized, no gradient), is computed from them
    the first time a term asks (PromptSRC's agreement terms, ProGrad's teacher), so a step whose terms
    do not need it never pays the extra image pass.
    """

    output: MethodOutput
    labels: torch.Tensor
    method: PromptMethod
    frozen_text_features: torch.Tensor
    epoch: int
    inputs: torch.Tensor | None = None

    @functools.cached_property
    def frozen_image_features(self) -> torch.Tensor:
        if self.inputs is None:
            raise fail("StepBatch.inputs", "the step's inputs (for its frozen image features)", "None")
        return self.method.frozen_image_features(self.inputs)


def zeroshot_logits(batch: StepBatch) -> torch.Tensor:
    """The frozen zero-shot CLIP's logits of the batch's images over the training classes,
    ``exp(logit_scale) <f0_i, t0_c>`` with f0 the batch's ``frozen_image_features`` (the unprompted
    encoder's) and t0 ``frozen_text_features``; no gradient."""
    image = batch.frozen_image_features
    dtype = torch.promote_types(batch.output.logits.dtype, torch.float32)
    with torch.no_grad(), torch.autocast(batch.labels.device.type, enabled=False):
        text = F.normalize(batch.frozen_text_features.to(dtype), dim=-1)
        return batch.method.clip_model.logit_scale.to(dtype).exp() * image.to(dtype) @ text.T


@dataclass
class RegularizerSetup:
    """What a regularizer factory may read: the model, the training classes, its options and the run.

    ``model_key`` is ``model_fingerprint(model)`` (for cache keys, without hashing the weights again);
    ``options`` are the run's ``regularizer_options[name]``; ``config`` the run's whole (resolved)
    config as a dict.
    """

    name: str
    method_name: str
    method: PromptMethod
    model: nn.Module
    model_key: str
    tokenizer: Any
    classnames: list[str]
    templates: list[str]
    frozen_text_features: torch.Tensor
    options: dict[str, Any]
    config: dict[str, Any]
    seed: int
    device: torch.device
    cache_dir: str | os.PathLike | None = None
    progress: bool = True
    extras: dict[str, Any] = field(default_factory=dict)


class Regularizer(Protocol):
    name: str

    def __call__(self, batch: StepBatch) -> torch.Tensor: ...

    def on_epoch_start(self, epoch: int) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


class StatelessRegularizer:
    """Base for regularizers without per-epoch state."""

    name = "regularizer"

    def on_epoch_start(self, epoch: int) -> None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        return None


def _flat_pairs(text_features: torch.Tensor, frozen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(C, D) tuned features and their anchors; per-image features (B, C, D) become B*C rows."""
    if text_features.ndim == 3:
        rows = text_features.shape[0]
        return text_features.reshape(-1, text_features.shape[-1]), frozen.repeat(rows, 1)
    return text_features, frozen


class KnowledgeGuidance(StatelessRegularizer):
    """KgCoOp's knowledge guidance ``w * (1 - mean_c cos(t_c, t0_c))`` (htyao89/KgCoOp
    ``trainers/kgcoop.py``: ``score = 1 - mean(cos)``, ``loss = CE + w * score``).

    For unit vectors ``1 - cos = ||t - t0||^2 / 2``, so the term is ``w / 2 * kgcoop_loss`` with
    ``fastcal.losses.kgcoop_loss = mean_c ||t_c - t0_c||^2``; ``w`` keeps the reference's meaning, and its
    recipe value 8.0 gives the reference's gradients. Per-image class features (CoCoOp) are averaged over
    images. ``w``: option ``weight``, else the config's ``kgcoop_weight``, else 8.0.
    """

    name = "kgcoop"

    def __init__(self, setup: RegularizerSetup) -> None:
        from fastcal.methods.kgcoop import KGCOOP_WEIGHT

        unknown = set(setup.options) - {"weight"}
        if unknown:
            raise fail("regularizer_options['kgcoop']", "only 'weight'", sorted(unknown))
        weight = setup.options.get("weight", setup.config.get("kgcoop_weight"))
        self.weight = float(KGCOOP_WEIGHT if weight is None else weight)

    def anchor(self, batch: StepBatch) -> torch.Tensor:
        """The frozen class features the tuned ones are pulled to: the run's zero-shot features."""
        return batch.frozen_text_features

    def __call__(self, batch: StepBatch) -> torch.Tensor:
        from fastcal.losses import kgcoop_loss

        tuned, frozen = _flat_pairs(batch.output.text_features, self.anchor(batch))
        return 0.5 * self.weight * kgcoop_loss(tuned, frozen)


def build_regularizers(
    entries: Sequence[str | Callable[[RegularizerSetup], Regularizer]],
    make_setup: Callable[[str], RegularizerSetup],
) -> list[Regularizer]:
    """Instantiate the regularizers (in order, duplicates dropped): registry names, or factories of a
    method's own (set up under their ``name`` attribute or function name); one whose ``weight`` is 0
    adds nothing and is left out rather than computed at every step."""
    built = []
    for entry in dict.fromkeys(entries):
        if isinstance(entry, str):
            name, factory = entry, registry.get("regularizer", entry, argument="regularizers")
        else:
            name, factory = getattr(entry, "name", entry.__name__), entry
        regularizer = factory(make_setup(name))
        if getattr(regularizer, "weight", None) != 0:
            built.append(regularizer)
    return built


# ---- training hooks --------------------------------------------------------------------------------
class TrainingHook:
    """What a method changes in a training step beyond its objective; the default changes nothing.

    - ``backward(objective, batch, parameters, scaler)`` writes the parameters' gradients: the default
      back-propagates the (scaled) objective; a gradient rule replaces it (ProGrad projects the
      objective's gradient against its zero-shot teacher's), so the rule composes with every loss and
      regularizer. ``forms_gradient`` says a hook does; a run takes at most one such hook. Under AMP the
      gradients it writes are still multiplied by ``scaler``'s scale (the optimizer step unscales them).
    - ``on_epoch_end(epoch)`` runs after each epoch's last step and learning-rate update, before the
      checkpoint (PromptSRC's Gaussian prompt aggregation);
    - ``state_dict()`` / ``load_state_dict(state)`` go into checkpoints, for exact resumption.

    Hooks are built like regularizers, from a ``RegularizerSetup`` (``MethodSpec.hooks``).
    """

    name = "hook"
    forms_gradient = False

    def backward(
        self,
        objective: torch.Tensor,
        batch: StepBatch,
        parameters: Sequence[nn.Parameter],
        scaler: torch.amp.GradScaler,
    ) -> None:
        scaler.scale(objective).backward()

    def on_epoch_end(self, epoch: int) -> None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        return None


def build_hooks(
    factories: Sequence[Callable[[RegularizerSetup], TrainingHook]],
    make_setup: Callable[[str], RegularizerSetup],
) -> list[TrainingHook]:
    """Instantiate a method's hooks; more than one gradient rule is an error."""
    hooks = [factory(make_setup(getattr(factory, "name", factory.__name__))) for factory in factories]
    rules = [hook.name for hook in hooks if hook.forms_gradient]
    if len(rules) > 1:
        raise fail("hooks", "at most one gradient rule", ", ".join(rules))
    return hooks


def gradient_hook(hooks: Sequence[TrainingHook]) -> TrainingHook:
    """The hook that forms the gradient: the run's gradient rule, else plain back-propagation."""
    return next((hook for hook in hooks if hook.forms_gradient), TrainingHook())


# ---- losses ----------------------------------------------------------------------------------------
class CrossEntropy:
    """Cross-entropy on the method's logits, optionally label-smoothed (``eps`` > 0)."""

    def __init__(self, label_smoothing: float = 0.0) -> None:
        self.label_smoothing = label_smoothing

    def __call__(self, batch: StepBatch) -> torch.Tensor:
        logits = batch.output.logits
        if self.label_smoothing > 0:
            from fastcal.losses import label_smoothed_cross_entropy

            return label_smoothed_cross_entropy(logits, batch.labels, smoothing=self.label_smoothing)
        return F.cross_entropy(logits, batch.labels)


class CalibratedLoss:
    """TCPT's calibrated loss (module docstring) on the method's normalized features."""

    def __init__(
        self, *, margin_alpha: float, margin_beta: float, moment_weight: float, label_smoothing: float
    ) -> None:
        from fastcal.losses import CalibratedPromptLoss

        self.margin_alpha = margin_alpha
        self.margin_beta = margin_beta
        self.moment_weight = moment_weight
        self.label_smoothing = label_smoothing
        self.loss = CalibratedPromptLoss(
            margin_alpha=margin_alpha,
            margin_beta=margin_beta,
            moment_weight=moment_weight,
            label_smoothing=label_smoothing,
        )

    def __call__(self, batch: StepBatch) -> torch.Tensor:
        out = batch.output
        if out.text_features.ndim == 2 and out.cosine_logits:
            return self.loss(
                out.image_features,
                out.text_features,
                batch.labels,
                out.logit_scale,
                batch.frozen_text_features if self.moment_weight else None,  # w = 0: no moment statistics
            )
        return _composed_calibrated(self, out, batch.labels, batch.frozen_text_features)


def _composed_calibrated(
    loss: CalibratedLoss, out: MethodOutput, labels: torch.Tensor, frozen: torch.Tensor
) -> torch.Tensor:
    """The calibrated loss on the method's own logits: when image ``i`` has its own classifier ``t_i``
    (B, C, D) (CoCoOp), or the logits are not the scaled cosines of the features (ProDA).

    The fused function forms ``logits_ic = s <f_i, t_c>`` itself with one classifier shared by the batch,
    so the terms are composed here from the same definitions: CE and the margin statistics over the rows
    of the method's logits, and the moment term of the normalized class features (averaged over the
    per-image classifiers, ``mean_i M(t_i, t0)``; ``fastcal.ops.text_moment_gap``).
    """
    from fastcal.ops import text_moment_gap

    dtype = torch.promote_types(out.logits.dtype, torch.float32)
    logits = out.logits.to(dtype)
    ce = F.cross_entropy(logits, labels, label_smoothing=loss.label_smoothing)
    target = logits.gather(1, labels[:, None]).squeeze(1)
    runner_up = logits.masked_fill(F.one_hot(labels, logits.shape[1]).bool(), float("-inf")).max(dim=1).values
    margin = target - runner_up
    total = ce - loss.margin_alpha * margin.mean() + loss.margin_beta * margin.var(unbiased=False)
    if loss.moment_weight:
        anchor = F.normalize(frozen.to(dtype), dim=-1)
        tuned = F.normalize(out.text_features.to(dtype), dim=-1)
        classifiers = tuned if tuned.ndim == 3 else tuned[None]
        moments = torch.stack([text_moment_gap(t, anchor) for t in classifiers])
        total = total + loss.moment_weight * moments.mean()
    return total


class BaselineLoss:
    """A loss of ``fastcal.losses.baselines`` that is the whole objective, on the method's logits:
    ``function(logits, labels, **options)``, or ``function(logits, zeroshot_logits, labels, **options)``
    when ``zeroshot``."""

    def __init__(self, function: Callable[..., torch.Tensor], *, zeroshot: bool = False, **options: Any):
        self.function, self.zeroshot, self.options = function, zeroshot, options

    def __call__(self, batch: StepBatch) -> torch.Tensor:
        logits = batch.output.logits
        if self.zeroshot:
            return self.function(logits, zeroshot_logits(batch), batch.labels, **self.options)
        return self.function(logits, batch.labels, **self.options)


class CrossEntropyPlus:
    """CE + ``weight`` x ``term(logits, labels)`` or, for a zero-shot term, ``term(logits, zeroshot)``."""

    def __init__(self, term: Callable[..., torch.Tensor], weight: float, *, zeroshot: bool = False) -> None:
        self.term, self.weight, self.zeroshot = term, weight, zeroshot

    def __call__(self, batch: StepBatch) -> torch.Tensor:
        logits = batch.output.logits
        second = zeroshot_logits(batch) if self.zeroshot else batch.labels
        return F.cross_entropy(logits, batch.labels) + self.weight * self.term(logits, second)


@dataclass(frozen=True)
class LossSpec:
    """A loss as runs choose it by name (``fastcal.registry`` kind ``"loss"``).

    Attributes:
        name: the ``--loss`` name.
        options: the settings ``build`` reads (fields of the run's config).
        build: ``build(options) -> loss``, ``loss(batch: StepBatch) -> Tensor``.
        defaults: values for the options a run leaves unset (``None``).
        title: how tables name the loss.
    """

    name: str
    options: tuple[str, ...]
    build: Callable[[Mapping[str, Any]], Callable[[StepBatch], torch.Tensor]]
    defaults: Mapping[str, Any] = field(default_factory=dict)
    title: str = ""


CROSS_ENTROPY = LossSpec(
    "ce",
    ("label_smoothing",),
    lambda options: CrossEntropy(options["label_smoothing"]),
    {"label_smoothing": 0.0},
    "cross-entropy",
)
LABEL_SMOOTHING = LossSpec(
    "label_smoothing",
    ("label_smoothing",),
    lambda options: CrossEntropy(options["label_smoothing"]),
    {"label_smoothing": DEFAULT_LABEL_SMOOTHING},
    "label smoothing",
)
CALIBRATED = LossSpec(
    "calibrated",
    ("margin_alpha", "margin_beta", "moment_weight", "label_smoothing"),
    lambda options: CalibratedLoss(
        margin_alpha=options["margin_alpha"],
        margin_beta=options["margin_beta"],
        moment_weight=options["moment_weight"],
        label_smoothing=options["label_smoothing"],
    ),
    {"margin_alpha": 0.1, "margin_beta": 0.01, "moment_weight": 5.0, "label_smoothing": 0.0},
    "calibrated loss",
)


def _loss_function(name: str) -> Callable[..., torch.Tensor]:
    from fastcal.losses import baselines

    return getattr(baselines, name)


MBLS = LossSpec(
    "mbls",
    ("mbls_margin", "mbls_alpha"),
    lambda o: BaselineLoss(_loss_function("mbls_loss"), margin=o["mbls_margin"], alpha=o["mbls_alpha"]),
    {"mbls_margin": 10.0, "mbls_alpha": 0.1},
    "MbLS",
)
CONFIDENCE_PENALTY = LossSpec(
    "confidence_penalty",
    ("confidence_penalty_weight",),
    lambda o: BaselineLoss(_loss_function("confidence_penalty_loss"), weight=o["confidence_penalty_weight"]),
    {"confidence_penalty_weight": 0.1},
    "confidence penalty",
)
FOCAL = LossSpec(
    "focal",
    ("focal_gamma", "focal_adaptive"),
    lambda o: BaselineLoss(
        _loss_function("focal_loss"), gamma=o["focal_gamma"], adaptive=o["focal_adaptive"]
    ),
    {"focal_gamma": 3.0, "focal_adaptive": False},
    "focal loss",
)
MDCA = LossSpec(
    "mdca",
    ("mdca_weight",),
    lambda o: CrossEntropyPlus(_loss_function("mdca_loss"), o["mdca_weight"]),
    {"mdca_weight": 1.0},
    "CE + MDCA",
)
ZS_NORM = LossSpec(
    "zs_norm", (), lambda o: BaselineLoss(_loss_function("zs_norm_loss"), zeroshot=True), {}, "ZS-Norm"
)
ZEROSHOT_PENALTY = LossSpec(
    "penalty",
    ("zeroshot_penalty_weight",),
    lambda o: CrossEntropyPlus(
        _loss_function("zeroshot_penalty"), o["zeroshot_penalty_weight"], zeroshot=True
    ),
    {"zeroshot_penalty_weight": 10.0},
    "CE + zero-shot penalty",
)


def loss_options(name: str, settings: Mapping[str, Any]) -> dict[str, Any]:
    """The options of loss ``name`` taken from ``settings``, its defaults where they are ``None``."""
    spec = registry.get("loss", name, argument="loss")
    values = {key: settings.get(key) for key in spec.options}
    return {key: spec.defaults.get(key) if value is None else value for key, value in values.items()}


def build_loss(name: str, settings: Mapping[str, Any]) -> Callable[[StepBatch], torch.Tensor]:
    """The loss ``name`` (a registry entry) with its options taken from ``settings``; ``settings`` may
    hold other keys (a run's whole config)."""
    return registry.get("loss", name, argument="loss").build(loss_options(name, settings))
