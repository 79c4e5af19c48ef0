"""TPT: test-time prompt tuning of CLIP (Shu et al., NeurIPS 2022; github.com/azshue/TPT).

For each test image, independently: make its 64 views (``ViewAugmenter``), encode them once with the
frozen image tower, tune a 4-token context initialized from "a photo of a" for one AdamW step
(lr 5e-3) on the marginal entropy of the 10% most confident views (``TestTimeStep``), predict the
centre view with the tuned context, and reset. The class prompts share their start token and context,
which are encoded once per context (``fastcal.methods.prefix``, exact). C-TPT (``fastcal.tpt.ctpt``) adds
the dispersion term, O-TPT the orthogonality penalty; FPP (``fastcal.tpt.fpp``) replaces the initial
context.

From a user's code::

    tpt = TPT(model, tokenizer, classnames)                  # C-TPT: config=ctpt_config(dataset)
    logits = tpt.predict(image)                              # a PIL image: its 64 views are made here
    result = tpt.tune(views)                                 # views you made: (64, 3, s, s), normalized
    result.selected, result.loss, result.ctx, result.logits
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from fastcal._checks import check_int, fail
from fastcal.methods.prefix import PackedPrompts, shares_prefix
from fastcal.methods.prompt_learner import PromptLearner
from fastcal.models.text_encoder import TextEncoder
from fastcal.tpt.augment import ViewAugmenter, normalization, sample_generator, view_size
from fastcal.tpt.ensemble import PromptEnsemble, split_template
from fastcal.tpt.step import TestTimeStep, TuningConfig

TPT_CTX_INIT = "a photo of a"


class TuneResult(NamedTuple):
    """What tuning on the views of ``S`` test samples gives (new tensors, kept across calls):

    Attributes:
        selected: ``(S, k)`` the indices of the ``k`` most confident views the loss used.
        loss: ``(S,)`` the loss of the last tuning step (before that step's update).
        ctx: ``(S, n_ctx, W)`` the tuned contexts (a prompt ensemble: its contexts concatenated).
        logits: ``(S, C)`` the logits of view 0 (the centre view) with the tuned context.
    """

    selected: torch.Tensor
    loss: torch.Tensor
    ctx: torch.Tensor
    logits: torch.Tensor


class TPT:
    """Test-time prompt tuning of a frozen CLIP for one class set.

    Every call tunes each test sample from the same initial context (TPT is episodic), so results do not
    depend on what was tuned before. The model is not modified, except that its parameters are frozen
    (``requires_grad_(False)``) when ``TPT`` is built: only the context is tuned, and no gradient is
    accumulated into the model.

    Args:
        model: a CLIP (open_clip's, or a Hugging Face one loaded with ``load_clip("hf:...")``).
        tokenizer: its tokenizer.
        classnames: the class names.
        config: the optimization (``TuningConfig``: views, selection, steps, lr, C-TPT's lambda).
        ctx_init: the phrase the context starts from (its token count is the context length).
        templates: the prompt templates instead: one template (``"<words> {}<rest>"``) starts the context
            from its words and keeps its rest after the class name; several form a tuned prompt ensemble
            (``fastcal.tpt.ensemble``: one context per template, features averaged).
        init_ctx: a context ``(n_ctx, W)`` to start from and reset to instead (FPP's); ``None``: the
            phrase's embedding.
        augmix: AugMix on the views (``ViewAugmenter``).
        flip: random horizontal flips of the views.
        samples_per_step: test samples tuned together, each with its own context.
        use_graph: capture the step in a CUDA graph (default: on CUDA; a failed capture runs eagerly).
        image_batch: views per image-encoder call (default: all views of a step at once).
        pack_prompts: encode the prompts' shared prefix (start token and context) once per context
            (``fastcal.methods.prefix``; exact), where the learner's layout allows it.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        classnames: Sequence[str],
        *,
        config: TuningConfig | None = None,
        ctx_init: str = TPT_CTX_INIT,
        templates: Sequence[str] | None = None,
        init_ctx: torch.Tensor | None = None,
        augmix: bool = False,
        flip: bool = True,
        samples_per_step: int = 1,
        use_graph: bool | None = None,
        image_batch: int | None = None,
        pack_prompts: bool = True,
    ) -> None:
        self.config = config or TuningConfig()
        self.model = model.requires_grad_(False)
        if templates is not None and len(templates) > 1:
            if init_ctx is not None:
                raise fail(
                    "init_ctx",
                    "None with a template ensemble (each template starts from its words)",
                    "a context",
                )
            self.learner = PromptEnsemble(
                model, tokenizer, classnames, templates, samples=samples_per_step, pack_prompts=pack_prompts
            )
            encoder, self.packed = self.learner, None
        else:
            words, rest = split_template(templates[0]) if templates else (ctx_init, ".")
            self.learner = PromptLearner(
                TextEncoder(model, bucket=True),
                tokenizer,
                classnames,
                ctx_init=words,
                name_template="{}" + rest,
            )
            self.learner.ctx.requires_grad_(False)
            self.packed = None
            if pack_prompts and shares_prefix(self.learner):
                self.packed = PackedPrompts(self.learner, model, samples=samples_per_step)
            encoder = self.packed
        self.hard_ctx = self.learner.ctx.detach().clone()
        start = self.hard_ctx if init_ctx is None else init_ctx
        probe = self.learner.learners[0] if isinstance(self.learner, PromptEnsemble) else self.learner
        with torch.no_grad():
            feature_dim = probe(probe.ctx[None]).shape[-1]
        self.step = TestTimeStep(
            self.learner,
            start,
            model.logit_scale,
            feature_dim,
            samples_per_step=samples_per_step,
            config=self.config,
            use_graph=use_graph,
            encoder=encoder,
        )
        self.device = self.step.device
        mean, std = normalization(model)
        self.augmenter = ViewAugmenter(
            view_size(model),
            mean,
            std,
            n_views=self.config.n_views,
            augmix=augmix,
            flip=flip,
            device=self.device,
        )
        self.image_batch = None if image_batch is None else check_int("image_batch", image_batch, minimum=1)
        self.image_dtype = next(model.visual.parameters()).dtype

    @property
    def samples_per_step(self) -> int:
        return self.step.samples_per_step

    @property
    def graph_used(self) -> bool:
        """Whether the step replays a CUDA graph (``TestTimeStep.graph_used``)."""
        return self.step.graph_used

    @property
    def view_shape(self) -> tuple[int, int, int, int]:
        """The shape ``tune`` takes for one test sample: ``(n_views, 3, s, s)``."""
        size = self.augmenter.size
        return (self.config.n_views, 3, size, size)

    def reset(self) -> None:
        """Put the context back to its initial value and the optimizer state to zero (every tuning does
        this first; call it to read or reuse the initial state in between)."""
        self.step.reset()

    @torch.no_grad()
    def encode_views(self, views: torch.Tensor) -> torch.Tensor:
        """Normalized float32 image features ``(N, D)`` of normalized views ``(N, 3, s, s)``."""
        views = views.to(self.device, self.image_dtype)
        chunk = self.image_batch or views.shape[0]
        features = [self.model.encode_image(views[i : i + chunk]) for i in range(0, views.shape[0], chunk)]
        return F.normalize(torch.cat(features).float(), dim=-1)

    def views(
        self, images: Sequence[Image.Image | torch.Tensor], generators: Sequence[torch.Generator]
    ) -> torch.Tensor:
        """The views of each image, ``(S * n_views, 3, s, s)``, image ``i``'s drawn from ``generators[i]``."""
        return self.augmenter.batch(images, generators)

    @property
    def view_key(self) -> str:
        """What the views' features depend on besides the image and its generator: the augmenter's
        settings and the image tower's dtype (runs over the same samples with equal keys can share them:
        ``view_features``)."""
        return f"{self.augmenter!r}, {self.image_dtype}"

    def view_features(
        self, images: Sequence[Image.Image | torch.Tensor], generators: Sequence[torch.Generator]
    ) -> torch.Tensor:
        """Frozen features ``(S, n_views, D)`` of the views of each image, image ``i``'s drawn from
        ``generators[i]``: all that tuning reads of an image (``predict_features``)."""
        features = self.encode_views(self.views(images, generators))
        return features.view(len(images), self.config.n_views, -1)

    def predict_features(self, features: torch.Tensor) -> torch.Tensor:
        """Tuned logits ``(S, C)`` of the centre view from the views' features ``(S, n_views, D)``
        (``view_features``), ``samples_per_step`` samples at a time."""
        return torch.cat([self.step(chunk) for chunk in features.split(self.samples_per_step)])

    def _tune_features(self, features: torch.Tensor) -> TuneResult:
        parts = []
        for chunk in features.split(self.samples_per_step):
            s = chunk.shape[0]
            logits = self.step(chunk)
            step = self.step
            parts.append(
                (step.selected[:s].clone(), step.loss[:s].clone(), step.ctx[:s].detach().clone(), logits)
            )
        return TuneResult(*(torch.cat(column) for column in zip(*parts, strict=True)))

    def tune(self, views: torch.Tensor) -> TuneResult:
        """Tune on ready-made views: ``(n_views, 3, s, s)`` for one test sample or ``(S, n_views, 3, s, s)``
        for several, normalized as the model's preprocessing does, view 0 the one predicted (TPT: the
        centre crop). Any ``S``: they go ``samples_per_step`` at a time."""
        if isinstance(views, torch.Tensor) and views.ndim == 4:
            views = views.unsqueeze(0)
        if (
            not isinstance(views, torch.Tensor)
            or views.ndim != 5
            or tuple(views.shape[1:]) != self.view_shape
        ):
            expected = f"a tensor of shape {self.view_shape} or (S, *{self.view_shape})"
            got = tuple(views.shape) if isinstance(views, torch.Tensor) else type(views).__name__
            raise fail("views", expected, got)
        if not views.is_floating_point():
            raise fail("views", "normalized float views", views.dtype)
        s = views.shape[0]
        features = self.encode_views(views.reshape(-1, *self.view_shape[1:]))
        return self._tune_features(features.view(s, self.config.n_views, -1))

    def predict(
        self,
        image_or_views: Image.Image | torch.Tensor | Sequence[Image.Image | torch.Tensor],
        generators: Sequence[torch.Generator] | None = None,
    ) -> torch.Tensor:
        """Tuned logits ``(S, C)`` of the centre view.

        ``image_or_views``: a PIL image or a uint8 image tensor ``(3, H, W)``, or a list of them: their
        views are made here, image ``i``'s drawn from ``generators[i]`` (default:
        ``sample_generator(0, i)``, reproducible); or ready-made views as ``tune`` takes them.
        """
        if isinstance(image_or_views, torch.Tensor) and image_or_views.ndim in (4, 5):
            if generators is not None:
                raise fail("generators", "None with ready-made views", f"{len(generators)} generators")
            return self.tune(image_or_views).logits
        images = (
            [image_or_views] if isinstance(image_or_views, (Image.Image, torch.Tensor)) else image_or_views
        )
        if not images:
            raise fail("image_or_views", "an image, a list of images or views", "an empty list")
        if generators is None:
            generators = [sample_generator(0, i) for i in range(len(images))]
        if len(generators) != len(images):
            raise fail("generators", f"one per image ({len(images)} images)", len(generators))
        logits = []
        for start in range(0, len(images), self.samples_per_step):
            chunk = slice(start, start + self.samples_per_step)
            logits.append(self.predict_features(self.view_features(images[chunk], generators[chunk])))
        return torch.cat(logits)

    def __call__(
        self, images: Sequence[Image.Image | torch.Tensor], generators: Sequence[torch.Generator]
    ) -> torch.Tensor:
        """``predict(images, generators)`` (what the runner calls, up to ``samples_per_step`` images)."""
        if not 1 <= len(images) <= self.samples_per_step:
            raise fail("images", f"1 to {self.samples_per_step} images", len(images))
        return self.predict(images, generators)
