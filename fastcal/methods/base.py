"""What every prompt-tuning method shares: which parts are tuned, how logits are formed, the registry.

A method is a ``PromptMethod``: a frozen CLIP plus the modules it tunes (prompt learners, a meta-net,
visual prompts). Its logits are CLIP's::

    f_i = normalize(image features),  t_c = normalize(class text features)
    logits_ic = exp(logit_scale) * <f_i, t_c>          (CLIP, Radford et al. 2021; CoOp's CustomCLIP)

Per-image class features ``t_ic`` (CoCoOp) give ``logits_ic = exp(logit_scale) * <f_i, t_ic>``.

Calling a method:

- ``method(images)`` -> logits ``(B, C)``: one call, as the reference ``CustomCLIP(image)``;
- ``method.forward_features(image_features)`` -> logits, from cached features of the frozen image
  encoder (methods whose ``input_kind`` is ``"features"``: CoOp, CoCoOp, KgCoOp);
- ``method.output(inputs)`` -> ``MethodOutput`` (logits, the normalized features, the scale): what the
  losses read. ``inputs`` is what ``input_kind`` says: image features for a frozen image encoder,
  images for a prompted one (VPT, MaPLe); ``method.prepare_inputs(images)`` makes them from images.

``class_features()`` gives the class text features, ``tuned_parameters()`` what trains (only those are
saved, ``tuned_state_dict``), ``recipe`` the published base-to-new recipe of the method's registry entry
(``spec``). The CLIP weights are frozen (``requires_grad=False``) when a method is built: the method
owns them from then on.

``MethodSpec`` ties a method's name to its builder, its published recipe (config values with the source
they were read from) and the regularizers it always adds (KgCoOp's knowledge guidance); it is registered
in ``fastcal.registry`` (kind ``"prompt_method"``), ``get_method(name)`` imports the method's module on
demand, and ``build_method(name, model, tokenizer, classnames)`` builds it with the recipe's options.

What else a method can offer the trainer: its features of arbitrary words through the tuned prompt
(``term_features``, ``outlier_drift_pair``: DOR), its frozen image features (``frozen_image_features``:
PromptSRC's agreement terms) and state kept between steps (``training_state``: ProDA's prompt-subset
cycle). ``MethodSpec.hooks`` name what a training step does beyond its objective (ProGrad's gradient
rule, PromptSRC's prompt aggregation); ``MethodSpec.dataset_recipes`` the per-dataset values of a
method's code.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from fastcal import registry
from fastcal._checks import check_choice, check_tensor, fail

INPUT_KINDS = ("features", "images")


class MethodOutput(NamedTuple):
    """A method's forward: scaled ``logits`` (B, C), L2-normalized ``image_features`` (B, D) and
    ``text_features`` ((C, D), or (B, C, D) per image), and the scale ``exp(logit_scale)`` (0-dim).

    ``cosine_logits`` is False when the logits are not ``logit_scale * cos(image, text)`` of these
    features (ProDA scores with the un-renormalized mean of its prompts' features), so a loss that would
    recompute them from the features (the fused calibrated loss) takes ``logits`` instead.
    ``prompt_features`` (C, P, D): the normalized class features of each of the step's P prompts, for a
    method that learns a distribution of prompts (ProDA's training forward); ``None`` otherwise.
    """

    logits: torch.Tensor
    image_features: torch.Tensor
    text_features: torch.Tensor
    logit_scale: torch.Tensor
    cosine_logits: bool = True
    prompt_features: torch.Tensor | None = None


def clip_logits(
    image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor
) -> MethodOutput:
    """Normalize both sides and form ``exp(logit_scale) * cos``; ``logit_scale`` is CLIP's log-scale.

    Computed in float32, or float64 when an input is float64 (half-precision features are upcast).

    ``text_features`` is (C, D), shared by all images, or (B, C, D), one classifier per image.
    """
    dtype = torch.promote_types(torch.promote_types(image_features.dtype, text_features.dtype), torch.float32)
    with torch.autocast(image_features.device.type, enabled=False):  # an AMP step would round to fp16
        f = F.normalize(image_features.to(dtype), dim=-1)
        t = F.normalize(text_features.to(dtype), dim=-1)
        scale = logit_scale.to(dtype).exp()
        logits = scale * (f @ t.T if t.ndim == 2 else torch.einsum("bd,bcd->bc", f, t))
    return MethodOutput(logits, f, t, scale)


class PromptMethod(nn.Module):
    """Base class: a frozen CLIP (``self.clip_model``), its tokenizer and the modules a method tunes.

    Subclasses set ``input_kind`` and ``method_name`` (their registry name) and implement
    ``output(inputs) -> MethodOutput``, ``class_features`` and ``set_classnames``; frozen-image methods
    get ``encode_images`` for free.
    """

    input_kind: str = "features"
    # True when every image has its own class features (CoCoOp): evaluation batches then hold
    # B * C prompts, and the trainer sizes them by that.
    per_image_prompts: bool = False
    method_name: str = ""

    def __init__(self, clip_model: nn.Module, tokenizer: Any = None) -> None:
        super().__init__()
        if not hasattr(clip_model, "encode_image") or not hasattr(clip_model, "logit_scale"):
            raise TypeError(f"clip_model: expected a CLIP model, got {type(clip_model).__name__}")
        clip_model.requires_grad_(False)
        self.clip_model = clip_model
        object.__setattr__(self, "tokenizer", tokenizer)  # shared with the model, not a sub-module

    def train(self, mode: bool = True) -> PromptMethod:
        """Train mode for the method's own modules; the frozen CLIP stays in eval mode."""
        super().train(mode)
        self.clip_model.eval()
        return self

    @property
    def classnames(self) -> list[str]:
        raise NotImplementedError

    def set_classnames(self, classnames: Sequence[str]) -> None:
        """Switch to another class set (base -> new, another dataset); tuned parameters are kept."""
        raise NotImplementedError

    @property
    def spec(self) -> MethodSpec:
        """The registry entry of the method (``method_name``)."""
        return get_method(self.method_name)

    @property
    def recipe(self) -> Mapping[str, Any]:
        """The published base-to-new recipe (``spec.recipe``; its source: ``spec.source``)."""
        return self.spec.recipe

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Image features (B, D), unnormalized, as this method sees them (frozen encoder by default)."""
        return self.clip_model.encode_image(images)

    def prepare_inputs(self, images: torch.Tensor) -> torch.Tensor:
        """What ``output`` takes, made from images: their frozen features (computed without gradients)
        for ``input_kind == "features"``, the images themselves otherwise."""
        check_tensor("images", images, ndim=4, floating=True, finite=False)
        if self.input_kind == "features":
            with torch.no_grad():
                return self.encode_images(images)
        return images

    def class_features(self) -> torch.Tensor:
        """The class text features ``(C, D)`` the logits use, unnormalized (as the text tower outputs
        them)."""
        raise NotImplementedError

    @torch.no_grad()
    def frozen_image_features(self, inputs: torch.Tensor) -> torch.Tensor:
        """L2-normalized features (B, D) of a batch under the frozen, unprompted image encoder: the
        inputs themselves for a frozen-image method, one more encoder pass for a prompted one."""
        features = inputs if self.input_kind == "features" else self.clip_model.encode_image(inputs)
        return F.normalize(features.to(torch.promote_types(features.dtype, torch.float32)), dim=-1)

    # ---- outlier words (DOR) -----------------------------------------------------------------------
    # True when ``outlier_drift_pair`` is implemented (the method has a tuned prompt DOR can regularize).
    supports_outliers: bool = False

    def term_features(
        self,
        terms: Sequence[str],
        *,
        image_features: torch.Tensor | None = None,
        frozen_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Text features ``(T, D)`` of arbitrary words (DOR's outliers) through the tuned text prompt, with
        gradients to the tuned parameters. ``image_features``: the step's (per-image contexts);
        ``frozen_features``: the words' frozen zero-shot features (class-aware prompts)."""
        raise fail("method", "a method with a tuned text prompt", type(self).__name__)

    def outlier_drift_pair(
        self, terms: Sequence[str], frozen_features: torch.Tensor, batch: Any = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """DOR's pair for the words ``terms``: what the tuned model makes of them and what the frozen one
        made of them, rows compared by cosine (``fastcal.outliers.dor``). Default: the words' features
        through the tuned prompt against their frozen features ``(T, D)``. ``batch``: the step's
        ``fastcal.methods.objectives.StepBatch`` (``None``: no images)."""
        image_features = None if batch is None else batch.output.image_features
        tuned = self.term_features(terms, image_features=image_features, frozen_features=frozen_features)
        return tuned, frozen_features

    @torch.no_grad()
    def prepare_outliers(self, terms: Sequence[str], frozen_features: torch.Tensor) -> None:
        """Make, before an epoch's steps, what ``outlier_drift_pair`` needs for the epoch's words (their
        prompts and the text encoder's plan, which reads their lengths on the host), so the steps only
        run them. Default: their features through the tuned prompt once."""
        self.term_features(terms, frozen_features=frozen_features)

    # ---- state between steps -----------------------------------------------------------------------
    def training_state(self) -> dict[str, Any]:
        """What the method keeps between training steps besides its parameters (ProDA's prompt-subset
        cycle), as tensors and plain values; checkpoints save it, so resuming continues exactly."""
        return {}

    def load_training_state(self, state: Mapping[str, Any]) -> None:
        """Restore ``training_state`` output."""
        return None

    def tuned_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """``(name, parameter)`` of every parameter that trains."""
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    def tuned_state_dict(self) -> dict[str, torch.Tensor]:
        """The tuned parameters only (what a saved prompt holds), detached copies on the CPU."""
        return {n: p.detach().cpu().clone() for n, p in self.tuned_parameters()}

    def load_tuned_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load ``tuned_state_dict`` output; the names must match exactly."""
        own = dict(self.tuned_parameters())
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise fail(
                "state", f"the tuned parameters {sorted(own)}", f"missing {missing}, unexpected {unexpected}"
            )
        with torch.no_grad():
            for name, p in own.items():
                value = state[name]
                if tuple(value.shape) != tuple(p.shape):
                    raise fail(f"state[{name!r}]", f"shape {tuple(p.shape)}", tuple(value.shape))
                p.copy_(value)

    def check_inputs(self, inputs: torch.Tensor) -> torch.Tensor:
        """Validate a batch: (B, D) features or (B, 3, H, W) images, per ``input_kind``."""
        check_choice("input_kind", self.input_kind, INPUT_KINDS)
        if self.input_kind == "features":
            return check_tensor("image_features", inputs, ndim=2, floating=True, finite=False)
        return check_tensor("images", inputs, ndim=4, floating=True, finite=False)

    def output(self, inputs: torch.Tensor) -> MethodOutput:
        """Logits and features of a batch of ``inputs`` (image features or images, per ``input_kind``)."""
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``images`` (B, 3, H, W), preprocessed as the CLIP expects -> logits (B, C)."""
        return self.output(self.prepare_inputs(images)).logits

    def forward_features(self, image_features: torch.Tensor) -> torch.Tensor:
        """Image features (B, D) of the frozen image encoder (e.g. cached) -> logits (B, C)."""
        if self.input_kind != "features":
            raise TypeError(
                f"forward_features: {type(self).__name__} prompts the image encoder, so it needs images: "
                "call method(images)"
            )
        return self.output(image_features).logits


@dataclass(frozen=True)
class MethodSpec:
    """A method as the trainer and CLI see it.

    Attributes:
        name: the ``--method`` name.
        title: how tables name it.
        build: ``build(model, tokenizer, classnames, **options) -> PromptMethod``.
        options: the config keys ``build`` takes (passed from the run's config).
        recipe: config defaults from the method's published base-to-new recipe.
        source: where the recipe's numbers come from (repository and config file).
        regularizers: terms the method always adds to its loss: registry names (KgCoOp's ``"kgcoop"``)
            or regularizer factories of its own (``fastcal.methods.objectives``: PromptSRC's
            self-regulation, ProDA's Gaussian bound).
        hooks: factories of the ``fastcal.methods.objectives.TrainingHook`` s its training uses beyond
            the objective: a gradient rule (ProGrad's), an epoch-end step (PromptSRC's prompt
            aggregation).
        testbed_recipe: what replaces recipe values on the embedded testbed (a tiny 3-layer CLIP on a
            2-core CPU): a short schedule and prompt depths that fit its towers.
        dataset_recipes: per fastcal dataset name, what replaces recipe values on that dataset (the
            per-dataset templates, epochs or weights of the method's code).
    """

    name: str
    title: str
    build: Callable[..., PromptMethod]
    options: tuple[str, ...]
    recipe: Mapping[str, Any]
    source: str
    regularizers: tuple[str | Callable[..., Any], ...] = field(default=())
    hooks: tuple[Callable[..., Any], ...] = field(default=())
    testbed_recipe: Mapping[str, Any] = field(default_factory=dict)
    dataset_recipes: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


def get_method(name: str) -> MethodSpec:
    """The ``MethodSpec`` registered as ``name`` (``fastcal.registry`` kind ``"prompt_method"``)."""
    spec = registry.get("prompt_method", name, argument="method")
    if not isinstance(spec, MethodSpec) or spec.name != name:
        raise TypeError(f"prompt_method {name!r}: expected its MethodSpec, got {type(spec).__name__}")
    return spec


def build_method(
    name: str, model: nn.Module, tokenizer: Any, classnames: Sequence[str], **options: Any
) -> PromptMethod:
    """The method ``name`` for ``classnames``, with its recipe's method options (e.g. CoOp's 4-token
    context from "a photo of a") unless ``options`` give others."""
    spec = get_method(name)
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        raise fail("options", f"options of {name!r} ({', '.join(spec.options)})", ", ".join(unknown))
    chosen = {key: spec.recipe[key] for key in spec.options if key in spec.recipe}
    chosen.update(options)
    method = spec.build(model, tokenizer, classnames, **chosen)
    method.method_name = name
    return method
