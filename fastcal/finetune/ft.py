"""Plain fine-tuning (FT): CLIP's image encoder and a linear head trained with cross-entropy.

As in WiSE-FT (Wortsman et al., CVPR 2022) and CaRot's FT baseline (MLAI-Yonsei/CaRot
``src/models/modeling.py`` ``ClassificationHead``, ``src/models/zeroshot.py``): the head takes the
L2-normalized image feature and is initialized with the zero-shot classifier,
``W = exp(logit_scale) * T`` (``T``: the class-text features of the prompt ensemble, rows normalized)
and ``b = 0``, so step 0 is zero-shot CLIP. The loss is ``CE(W normalize(f_I(x)) + b, y)`` (optionally
label-smoothed), learning rate 3e-5 and the gradient norm clipped at 1.0 (``src/models/ft_loss.py``).
The text tower is not trained.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fastcal._checks import check_number, check_tensor, fail
from fastcal.finetune.config import TESTBED_SCHEDULE, FinetuneConfig, FinetuneSpec


class ImageClassifier(nn.Module):
    """``logits = W normalize(visual(x)) + b``: an image tower and a linear head (module docstring)."""

    def __init__(self, visual: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        check_tensor("weight", weight, ndim=2, floating=True)
        self.visual = visual
        self.head = nn.Linear(weight.shape[1], weight.shape[0], device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            self.head.weight.copy_(weight)
            if bias is None:
                self.head.bias.zero_()
            else:
                check_tensor("bias", bias, ndim=1, floating=True)
                if bias.shape[0] != weight.shape[0]:
                    raise fail("bias", f"{weight.shape[0]} entries (one per class)", bias.shape[0])
                self.head.bias.copy_(bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(F.normalize(self.visual(images), dim=-1))


def zero_shot_head(class_features: torch.Tensor, logit_scale: torch.Tensor | float) -> torch.Tensor:
    """``exp(logit_scale) * normalize(class_features)``: the head weight that reproduces zero-shot CLIP."""
    check_tensor("class_features", class_features, ndim=2, floating=True)
    features = class_features.detach()
    scale = torch.as_tensor(logit_scale).detach().to(features.device, features.dtype).exp()
    return scale * F.normalize(features, dim=-1)


def class_rows(train_classnames: Sequence[str], eval_classnames: Sequence[str]) -> list[int]:
    """For each evaluation class, the head row of the training class with the same name.

    Names are matched in order (ImageNet-A/-R list their 200 classes in ImageNet order, so a name that
    occurs twice in the 1,000 resolves to its first occurrence after the previous match).
    """
    rows: list[int] = []
    start = 0
    for name in eval_classnames:
        for j in range(start, len(train_classnames)):
            if train_classnames[j] == name:
                rows.append(j)
                start = j + 1
                break
        else:
            try:
                rows.append(list(train_classnames).index(name))
            except ValueError:
                raise fail("eval_classnames", "class names among the training classes", repr(name)) from None
    return rows


class FtMethod:
    """FT for ``fastcal.finetune.trainer.Finetuner``: the trainable module is an ``ImageClassifier``
    whose image tower is ``model.visual`` (shared, not copied, made trainable); a batch is
    ``(images, labels, _)``."""

    name = "ft"
    uses_captions = False

    def __init__(
        self,
        model: nn.Module,
        class_features: torch.Tensor,
        *,
        label_smoothing: float = 0.0,
    ) -> None:
        self.model = model
        self.label_smoothing = check_number("label_smoothing", label_smoothing, minimum=0.0, maximum=1.0)
        weight = zero_shot_head(class_features, model.logit_scale).to(model.logit_scale.device)
        self.trainable = ImageClassifier(model.visual.requires_grad_(True), weight)

    @property
    def head(self) -> nn.Linear:
        return self.trainable.head

    def loss(self, forward: nn.Module, batch: Any, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        images, labels, _ = batch
        loss = F.cross_entropy(forward(images), labels, label_smoothing=self.label_smoothing)
        return loss, {"cross_entropy": loss.detach()}

    def after_step(self, step: int, total_steps: int) -> None:
        """Nothing to do after an optimizer step."""

    def extra_state(self) -> dict[str, torch.Tensor]:
        return {}

    def load_extra_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """FT keeps no state besides the trainable module."""


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
) -> FtMethod:
    """FT on ``model``: the head starts as the zero-shot classifier of the prompt ensemble."""
    from fastcal.models.cache import class_text_features

    features = class_text_features(model, tokenizer, list(classnames), list(templates), cache_dir=cache_dir)
    return FtMethod(model, features, label_smoothing=config.label_smoothing)


SPEC = FinetuneSpec(
    name="ft",
    title="FT",
    build=build,
    published=FinetuneConfig(method="ft", learning_rate=3e-5, grad_clip_norm=1.0),
    testbed=FinetuneConfig(method="ft", learning_rate=3e-4, grad_clip_norm=1.0, **TESTBED_SCHEDULE),
    source="CaRot supp. A.1 (AdamW lr 3e-5, wd 0.1, batch 512, 10 epochs); grad-norm clip 1.0 and the "
    "zero-shot head init from MLAI-Yonsei/CaRot src/models/ft_loss.py, src/models/zeroshot.py",
)
