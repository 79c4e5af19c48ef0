"""TPT: test-time prompt tuning of CLIP (Shu et al., NeurIPS 2022; github.com/azshue/TPT).

For each test image, independently: make its 64 views (``ViewAugmenter``), encode them once with the
frozen image tower, tune a 4-token context initialized from "a photo of a" for one AdamW step
(lr 5e-3) on the marginal entropy of the 10% most confident views (``TestTimeStep``), predict the
centre view with the tuned context, and reset. The class prompts share their start token and context,
which are encoded once per context (``fastcal.methods.prefix``, exact). C-TPT (``fastcal.tpt.ctpt``) adds
the dispersion term; FPP (``fastcal.tpt.fpp``) replaces the initial context.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from fastcal._checks import check_int, fail
from fastcal.methods.prefix import PackedPrompts, shares_prefix
from fastcal.methods.prompt_learner import PromptLearner
from fastcal.models.text_encoder import TextEncoder
from fastcal.tpt.augment import ViewAugmenter, normalization, view_size
from fastcal.tpt.step import TestTimeStep, TuningConfig

TPT_CTX_INIT = "a photo of a"


class TPT:
    """Test-time prompt tuning of a frozen CLIP for one class set.

    Args:
        model: an open_clip CLIP (its parameters are frozen: ``requires_grad_(False)``).
        tokenizer: its tokenizer.
        classnames: the class names.
        config: the optimization (``TuningConfig``: views, selection, steps, lr, C-TPT's lambda).
        ctx_init: the phrase the context starts from (its token count is the context length).
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
        self.learner = PromptLearner(
            TextEncoder(model, bucket=True), tokenizer, classnames, ctx_init=ctx_init
        )
        self.learner.ctx.requires_grad_(False)
        self.hard_ctx = self.learner.ctx.detach().clone()
        start = self.hard_ctx if init_ctx is None else init_ctx
        with torch.no_grad():
            feature_dim = self.learner().shape[-1]
        self.packed = None
        if pack_prompts and shares_prefix(self.learner):
            self.packed = PackedPrompts(self.learner, model, samples=samples_per_step)
        self.step = TestTimeStep(
            self.learner,
            start,
            model.logit_scale,
            feature_dim,
            samples_per_step=samples_per_step,
            config=self.config,
            use_graph=use_graph,
            encoder=self.packed,
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

    def __call__(
        self, images: Sequence[Image.Image | torch.Tensor], generators: Sequence[torch.Generator]
    ) -> torch.Tensor:
        """Tuned logits of the centre view, ``(S, C)``, for up to ``samples_per_step`` images."""
        if not 1 <= len(images) <= self.samples_per_step:
            raise fail("images", f"1 to {self.samples_per_step} images", len(images))
        features = self.encode_views(self.views(images, generators))
        return self.step(features.view(len(images), self.config.n_views, -1))
