"""FLYP: fine-tune like you pretrain (Goyal et al., CVPR 2023).

Both towers of CLIP are fine-tuned with CLIP's own objective, the symmetric InfoNCE loss over the
in-batch (image, caption) pairs, where an image's caption is its class name in one of the dataset's
prompt templates, drawn at random for every image at every step (``CaptionSampler``):

    L = 1/2 [ CE(s * f_I F_T^T, y) + CE(s * f_T F_I^T, y) ],   y_i = i,

with L2-normalized features, ``s = exp(logit_scale)`` and CE the mean cross-entropy over rows. The
logits, the targets and the distributed gathering come from open_clip's ``ClipLoss``
(github.com/mlfoundations/open_clip ``src/open_clip/loss.py``) with ``local_loss=True`` and
``gather_with_grad=True``: every rank scores its own rows against the features of the whole global
batch, and the gradient through the gather is exact, so the global batch is one contrastive batch
whatever the number of processes. With ``label_smoothing = eps`` the targets become
``(1 - eps) onehot(y) + eps / B`` (CaRot, Sec. 2.3, "FLYP w/ LS"; the reference code's ``LabelSmoothing``
is torch's ``cross_entropy(..., label_smoothing=eps)``).

Text features are computed by ``fastcal.models.TextEncoder``, which runs the causal text transformer
only up to the batch's longest caption: the same features as ``model.encode_text`` at a fraction of the
cost for short captions (it reads the longest caption's length, one host sync per step).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from torch import nn

from fastcal._checks import check_int, check_number, fail
from fastcal.data.items import prompt_classname
from fastcal.finetune.config import TESTBED_SCHEDULE, FinetuneConfig, FinetuneSpec
from fastcal.models.text_encoder import TextEncoder


class CaptionSampler:
    """Token ids of "template(class name)" captions; ``sampler(label, draw)`` picks template
    ``draw % len(templates)`` for that image (the draw comes from the seeded data pipeline)."""

    def __init__(
        self,
        tokenizer: Callable[[list[str]], torch.Tensor],
        classnames: Sequence[str],
        templates: Sequence[str],
    ) -> None:
        if isinstance(templates, str) or not templates:
            raise fail("templates", "a non-empty list of templates", repr(templates)[:200])
        for i, template in enumerate(templates):
            if not isinstance(template, str) or template.count("{}") != 1:
                raise fail(f"templates[{i}]", "a format string with one '{}'", repr(template))
        if isinstance(classnames, str) or not classnames:
            raise fail("classnames", "a non-empty list of class names", repr(classnames)[:200])
        self.tokenizer = tokenizer
        self.classnames = [prompt_classname(str(c)) for c in classnames]
        self.templates = list(templates)
        self._memo: dict[tuple[int, int], torch.Tensor] = {}

    def caption(self, label: int, draw: int) -> str:
        """The caption text of an image of class ``label`` for random draw ``draw``."""
        return self.templates[draw % len(self.templates)].format(self.classnames[label])

    def __call__(self, label: int, draw: int) -> torch.Tensor:
        key = (label, draw % len(self.templates))
        tokens = self._memo.get(key)
        if tokens is None:
            tokens = self.tokenizer([self.caption(label, draw)])[0]
            self._memo[key] = tokens
        return tokens


class ClipFeatures(nn.Module):
    """CLIP's forward with exact truncated text encoding.

    ``forward(images, token_ids) -> (normalize(f_I), normalize(f_T), exp(logit_scale))``, the tuple
    ``open_clip.CLIP.forward`` returns; the wrapped model is its only registered child, so
    ``DistributedDataParallel(ClipFeatures(model))`` synchronizes exactly the model's parameters.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.text_encoder = TextEncoder(model)

    def forward(self, images: torch.Tensor, token_ids: torch.Tensor):
        image_features = F.normalize(self.model.encode_image(images), dim=-1)
        text_features = F.normalize(self.text_encoder.encode(token_ids), dim=-1)
        return image_features, text_features, self.model.logit_scale.exp()


class ContrastiveOutput(NamedTuple):
    """The contrastive loss and the logits it was computed from (local rows x global columns)."""

    loss: torch.Tensor
    logits_per_image: torch.Tensor
    logits_per_text: torch.Tensor


class ContrastiveLoss(nn.Module):
    """FLYP's loss (module docstring) on open_clip's ``ClipLoss``, optionally label-smoothed.

    Args:
        label_smoothing: eps in ``(1 - eps) onehot + eps / B``; 0 gives ``ClipLoss`` exactly.
        rank, world_size: this process in the distributed group (features are gathered from all).
    """

    def __init__(self, *, label_smoothing: float = 0.0, rank: int = 0, world_size: int = 1) -> None:
        super().__init__()
        self.label_smoothing = check_number("label_smoothing", label_smoothing, minimum=0.0, maximum=1.0)
        check_int("world_size", world_size, minimum=1)
        check_int("rank", rank, minimum=0)
        if rank >= world_size:
            raise fail("rank", f"a rank in [0, {world_size})", rank)
        self.clip_loss = ClipLoss(
            local_loss=True, gather_with_grad=True, cache_labels=True, rank=rank, world_size=world_size
        )

    def logits(
        self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(local images x all texts, local texts x all images), scaled."""
        return self.clip_loss.get_logits(image_features, text_features, logit_scale)

    def forward(
        self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor
    ) -> ContrastiveOutput:
        per_image, per_text = self.logits(image_features, text_features, logit_scale)
        targets = self.clip_loss.get_ground_truth(per_image.device, per_image.shape[0])
        eps = self.label_smoothing
        loss = (
            F.cross_entropy(per_image, targets, label_smoothing=eps)
            + F.cross_entropy(per_text, targets, label_smoothing=eps)
        ) / 2
        return ContrastiveOutput(loss, per_image, per_text)


class FlypMethod:
    """FLYP as a fine-tuning method for ``fastcal.finetune.trainer.Finetuner``.

    The trainable module is the whole CLIP (both towers and the logit scale; all of its parameters are
    made trainable, whatever an earlier user of the model froze); a batch is
    ``(images, labels, caption token ids)``. Evaluation uses the zero-shot head of the fine-tuned model
    (``fastcal.finetune.evaluate.clip_head``).
    """

    name = "flyp"
    uses_captions = True

    def __init__(self, model: nn.Module, *, label_smoothing: float = 0.0, rank: int = 0, world_size: int = 1):
        self.model = model.requires_grad_(True)
        self.trainable = ClipFeatures(model)
        self.contrastive = ContrastiveLoss(label_smoothing=label_smoothing, rank=rank, world_size=world_size)

    def loss(self, forward: nn.Module, batch: Any, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The contrastive loss of ``batch`` through ``forward`` (the trainable module, maybe DDP)."""
        images, _, texts = batch
        image_features, text_features, scale = forward(images, texts)
        out = self.contrastive(image_features, text_features, scale)
        return out.loss, {"contrastive": out.loss.detach()}

    def after_step(self, step: int, total_steps: int) -> None:
        """Nothing to do after an optimizer step."""

    def extra_state(self) -> dict[str, torch.Tensor]:
        """Tensors besides the trainable module to checkpoint (none)."""
        return {}

    def load_extra_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Inverse of ``extra_state``."""


def build(
    config: FinetuneConfig,
    model: nn.Module,
    tokenizer: Any,
    classnames: Sequence[str],
    templates: Sequence[str],
    *,
    rank: int = 0,
    world_size: int = 1,
    cache_dir: Any = None,
) -> FlypMethod:
    """FLYP on ``model`` (both towers train; captions come from the training data)."""
    return FlypMethod(model, label_smoothing=config.label_smoothing, rank=rank, world_size=world_size)


SPEC = FinetuneSpec(
    name="flyp",
    title="FLYP",
    build=build,
    published=FinetuneConfig(method="flyp"),
    testbed=FinetuneConfig(method="flyp", learning_rate=1e-4, **TESTBED_SCHEDULE),
    source="FLYP (Goyal et al., CVPR 2023) as run in CaRot supp. A.1: AdamW lr 1e-5, wd 0.1, batch 512, "
    "10 epochs, 500 warm-up steps (MLAI-Yonsei/CaRot src/args.py, example_scripts/flyp.sh)",
)
