"""One optimization step of a prompt method, for any training loop::

    step = fastcal.methods.training_step(method, "calibrated", optimizer)
    for images, labels in loader:
        result = step(images, labels)          # forward, loss + regularizers, backward, optimizer step

The objective is ``fastcal.methods.objectives``'s: ``L = loss(batch) + sum_r regularizer_r(batch)``.
The regularizers default to the ones the method always uses (``method.spec.regularizers``: KgCoOp's
knowledge guidance at its recipe weight, PromptSRC's self-regulation, ProDA's prompt diversity); others
are added by name (``regularizers=["dor"]``) with their options (``regularizer_options={"dor":
{"weight": 8}}``), or passed built. The method's training hooks (``method.spec.hooks``) act in the same
step: a gradient rule forms the update from the objective (ProGrad's prompt-aligned gradient), and
``end_epoch()`` runs the epoch-end ones (PromptSRC's Gaussian prompt aggregation, which needs the
schedule's length: ``settings={"epochs": N}``, else the recipe's). ``settings`` override the method's
recipe values that its terms read (ProGrad's ``prograd_lambda``, PromptSRC's loss weights, ...).

The zero-shot class features that the calibrated loss's moment term and KgCoOp anchor to are computed
from the method's own CLIP and tokenizer with ``templates`` (default: CoOp's "a photo of a {}."), again
whenever the class set changes.

``fastcal train`` runs its epochs through the same ``TrainingStep``, so a user's loop and the command
take the same steps::

    for epoch in range(epochs):
        step.start_epoch(epoch)
        for images, labels in loader:
            step(images, labels)
        scheduler.step()
        step.end_epoch()
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch

from fastcal import registry
from fastcal._checks import fail
from fastcal.losses import value_checks
from fastcal.methods.base import PromptMethod
from fastcal.methods.objectives import (
    Regularizer,
    RegularizerSetup,
    StepBatch,
    TrainingHook,
    build_hooks,
    build_loss,
    build_regularizers,
    gradient_hook,
)

DEFAULT_TEMPLATES = ("a photo of a {}.",)


class StepResult(NamedTuple):
    """What a step returns: the ``loss`` it minimized (0-dim) and the batch's ``logits`` (B, C), both
    detached; reading them does not synchronize with the device until you convert them."""

    loss: torch.Tensor
    logits: torch.Tensor


class TrainingStep:
    """A method's training step: forward, objective, backward, optimizer (and gradient scaler) step.

    Args:
        method: the prompt method (its CLIP frozen; the optimizer holds its ``tuned_parameters``).
        loss: a loss of the registry by name (``"ce"``, ``"calibrated"``, ``"label_smoothing"``, ...),
            or a callable ``loss(batch: StepBatch) -> Tensor``.
        optimizer: any torch optimizer over the method's tuned parameters.
        loss_options: options of a named loss (e.g. ``{"margin_alpha": 0.1}``); unset ones take the
            loss's defaults.
        regularizers: names (registry kind ``"regularizer"``) or built regularizers; default: the ones the
            method always uses. The method's are always included (once: a built one of the same name
            takes its place).
        regularizer_options: per regularizer name, its options (e.g. ``{"kgcoop": {"weight": 8.0}}``).
        templates: the prompt templates of the zero-shot class features (the anchor of the calibrated
            loss's moment term and of KgCoOp).
        frozen_text_features: those features ``(C, D)`` computed already (then ``templates`` is unused).
        settings: values over the method's recipe that its own terms and hooks read (``epochs``,
            ``prograd_lambda``, ``text_loss_weight``, ...; ``fastcal train`` passes its resolved config).
        seed: the seed of regularizers that draw (DOR's outlier sampling).
        cache_dir: where regularizers keep their caches (default: fastcal's cache folder).
        amp: fp16 autocast with a gradient scaler (CUDA only; ignored elsewhere).
    """

    def __init__(
        self,
        method: PromptMethod,
        loss: str | Callable[[StepBatch], torch.Tensor],
        optimizer: torch.optim.Optimizer,
        *,
        loss_options: Mapping[str, Any] | None = None,
        regularizers: Sequence[str | Regularizer] | None = None,
        regularizer_options: Mapping[str, Mapping[str, Any]] | None = None,
        templates: Sequence[str] = DEFAULT_TEMPLATES,
        frozen_text_features: torch.Tensor | None = None,
        settings: Mapping[str, Any] | None = None,
        seed: int = 0,
        cache_dir: str | os.PathLike | None = None,
        amp: bool = False,
        progress: bool = False,
    ) -> None:
        if not isinstance(method, PromptMethod):
            raise TypeError(f"method: expected a fastcal PromptMethod, got {type(method).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer: expected a torch optimizer, got {type(optimizer).__name__}")
        if isinstance(templates, str) or not templates:
            raise fail("templates", "a non-empty list of templates with '{}'", repr(templates)[:200])
        self.method = method
        self.optimizer = optimizer
        self.templates = list(templates)
        self.device = _method_device(method)
        self.amp = bool(amp and self.device.type == "cuda")
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp)
        self.epoch = 0
        self._started_epoch: int | None = None
        self._frozen: tuple[tuple[str, ...], torch.Tensor] | None = None
        self._model_key: str | None = None  # the frozen CLIP's fingerprint, hashed when a term needs it
        if frozen_text_features is not None:
            self._frozen = (tuple(method.classnames), frozen_text_features.to(self.device))
        self.loss = self._build_loss(loss, loss_options)
        recipe = dict(method.recipe) if method.method_name else {}
        self.settings = {**recipe, **{k: v for k, v in (settings or {}).items() if v is not None}}
        self.regularizers = self._build_regularizers(
            regularizers, regularizer_options or {}, seed=seed, cache_dir=cache_dir, progress=progress
        )
        self.hooks: list[TrainingHook] = (
            build_hooks(
                method.spec.hooks, self._setup_maker(seed=seed, cache_dir=cache_dir, progress=progress)
            )
            if method.method_name
            else []
        )
        self._gradient = gradient_hook(self.hooks)

    # ---- building ----------------------------------------------------------------------------------
    def _build_loss(
        self, loss: str | Callable[[StepBatch], torch.Tensor], options: Mapping[str, Any] | None
    ) -> Callable[[StepBatch], torch.Tensor]:
        if isinstance(loss, str):
            known = registry.get("loss", loss, argument="loss").options
            unknown = sorted(set(options or {}) - set(known))
            if unknown:
                raise fail("loss_options", f"options of the {loss!r} loss ({', '.join(known)})", unknown)
            return build_loss(loss, dict(options or {}))
        if options:
            raise fail("loss_options", "None with a loss object (options belong to named losses)", options)
        if not callable(loss):
            raise TypeError(f"loss: expected a loss name or a callable, got {type(loss).__name__}")
        return loss

    def _build_regularizers(
        self,
        chosen: Sequence[str | Regularizer] | None,
        options: Mapping[str, Mapping[str, Any]],
        *,
        seed: int,
        cache_dir: str | os.PathLike | None,
        progress: bool,
    ) -> list[Regularizer]:
        method = self.method
        built = [r for r in chosen or () if not isinstance(r, str)]
        taken = {r.name for r in built}
        own = [
            r for r in (method.spec.regularizers if method.method_name else ()) if _entry_name(r) not in taken
        ]
        entries = [*own, *(r for r in chosen or () if isinstance(r, str))]
        names = [_entry_name(r) for r in entries]
        unknown = sorted(set(options) - set(names))
        if unknown:
            raise fail("regularizer_options", f"options of the regularizers used ({names})", unknown)
        if not entries:
            return built
        setup = self._setup_maker(seed=seed, cache_dir=cache_dir, progress=progress, options=options)
        return [*build_regularizers(entries, setup), *built]

    def _setup_maker(
        self,
        *,
        seed: int,
        cache_dir: str | os.PathLike | None,
        progress: bool,
        options: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> Callable[[str], RegularizerSetup]:
        from fastcal.models.fingerprint import model_fingerprint

        method = self.method

        def setup(name: str) -> RegularizerSetup:
            if self._model_key is None:
                self._model_key = model_fingerprint(method.clip_model)
            return RegularizerSetup(
                name=name,
                method_name=method.method_name,
                method=method,
                model=method.clip_model,
                model_key=self._model_key,
                tokenizer=method.tokenizer,
                classnames=list(method.classnames),
                templates=self.templates,
                frozen_text_features=self.frozen_text_features(),
                options=dict((options or {}).get(name, {})),
                config=dict(self.settings),
                seed=seed,
                device=self.device,
                cache_dir=cache_dir,
                progress=progress,
            )

        return setup

    # ---- per step ----------------------------------------------------------------------------------
    def frozen_text_features(self) -> torch.Tensor:
        """The zero-shot class features ``(C, D)`` of the method's current classes (normalized)."""
        names = tuple(self.method.classnames)
        if self._frozen is None or self._frozen[0] != names:
            from fastcal.models.cache import zeroshot_class_features

            if self.method.tokenizer is None:
                raise fail("method", "a method built with its tokenizer", "tokenizer None")
            features = zeroshot_class_features(
                self.method.clip_model, self.method.tokenizer, list(names), self.templates
            )
            self._frozen = (names, features.to(self.device))
        return self._frozen[1]

    def start_epoch(self, epoch: int) -> None:
        """Tell the regularizers a new epoch starts (DOR draws that epoch's outliers); a loop that never
        calls it trains as one epoch 0."""
        self.epoch = epoch
        for regularizer in self.regularizers:
            regularizer.on_epoch_start(epoch)
        self._started_epoch = epoch

    def end_epoch(self) -> None:
        """Run the method's epoch-end hooks (PromptSRC's aggregation: after the last epoch the prompts
        become the aggregate); call it after each epoch's last step."""
        for hook in self.hooks:
            hook.on_epoch_end(self.epoch)

    def objective(self, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The objective on a batch of the method's ``inputs`` (``method.output``'s) and its logits,
        with gradients, without a backward."""
        loss, batch = self._objective(inputs, labels)
        return loss, batch.output.logits

    def _objective(self, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, StepBatch]:
        output = self.method.output(inputs)
        batch = StepBatch(output, labels, self.method, self.frozen_text_features(), self.epoch, inputs)
        loss = self.loss(batch)
        for regularizer in self.regularizers:
            loss = loss + regularizer(batch)
        return loss, batch

    def _step(self, inputs: torch.Tensor, labels: torch.Tensor) -> StepResult:
        if self._started_epoch != self.epoch:  # a loop that never calls start_epoch
            self.start_epoch(self.epoch)
        if not self.method.training:  # setting the mode walks every module of the CLIP
            self.method.train()
        # no host sync per step: a caller checks the losses when it reads them
        with value_checks(False), torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
            loss, batch = self._objective(inputs, labels.to(self.device))
        self.optimizer.zero_grad(set_to_none=True)
        parameters = [p for _, p in self.method.tuned_parameters()]
        self._gradient.backward(loss, batch, parameters, self.scaler)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return StepResult(loss.detach(), batch.output.logits.detach())

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> StepResult:
        """One step on a batch of preprocessed ``images`` (B, 3, H, W) and their ``labels`` (B,)."""
        return self._step(self.method.prepare_inputs(images.to(self.device)), labels)

    def from_features(self, image_features: torch.Tensor, labels: torch.Tensor) -> StepResult:
        """One step on frozen image features (B, D) (cached), for methods that read them."""
        if self.method.input_kind != "features":
            raise TypeError(
                f"from_features: {type(self.method).__name__} prompts the image encoder, so it needs "
                "images: call step(images, labels)"
            )
        return self._step(image_features.to(self.device), labels)

    # ---- resumption --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The optimizer's, the gradient scaler's, every regularizer's and hook's state, the method's
        state between steps (``training_state``) and the epoch."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "regularizers": {r.name: r.state_dict() for r in self.regularizers},
            "hooks": {h.name: h.state_dict() for h in self.hooks},
            "method": self.method.training_state(),
            "epoch": self.epoch,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        saved = state["regularizers"]
        names = sorted(r.name for r in self.regularizers)
        if sorted(saved) != names:
            raise fail("state", f"the states of the regularizers {names}", sorted(saved))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        for regularizer in self.regularizers:
            regularizer.load_state_dict(saved[regularizer.name])
        for hook in self.hooks:
            hook.load_state_dict(state["hooks"][hook.name])
        self.method.load_training_state(state["method"])
        self.epoch = int(state["epoch"])


def _entry_name(entry: str | Callable[..., Any]) -> str:
    """A regularizer entry's name: a registry name, or a method's own factory's ``name``."""
    return entry if isinstance(entry, str) else getattr(entry, "name", entry.__name__)


def _method_device(method: PromptMethod) -> torch.device:
    for parameter in method.parameters():
        return parameter.device
    return torch.device("cpu")


def training_step(
    method: PromptMethod,
    loss: str | Callable[[StepBatch], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    **options: Any,
) -> TrainingStep:
    """``TrainingStep(method, loss, optimizer, **options)``: call it on each batch (class docstring)."""
    return TrainingStep(method, loss, optimizer, **options)
