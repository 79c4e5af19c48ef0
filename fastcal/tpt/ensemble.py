"""Test-time tuning from a prompt ensemble: one context per template, tuned together.

C-TPT's tables start TPT from the hard prompt or from a prompt ensemble (their ``Ensemble`` rows, Yoon et
al., ICLR 2024). For templates ``"<words_e> {}<rest_e>"`` (the dataset's), template ``e`` gets a prompt
learner whose context starts as the embedding of ``words_e`` and whose fixed text after the class name is
``rest_e``; class ``c``'s feature is CLIP's prompt ensemble over them::

    t_c = normalize(mean_e normalize(f_text([SOS] ctx_e name_c rest_e [EOS])))

so before tuning it is the zero-shot ensemble classifier, and TPT tunes every context at once (their
concatenation is the step's context, ``(n_1 + ... + n_E, W)``; AdamW is elementwise, so one optimizer
over it equals one per context fed the shared loss). A template with nothing before the class name
(``"{} texture."``) keeps its fixed hand-crafted feature in the mean.

Where this may differ from C-TPT: its public code (and TPT's) tunes a single prompt; the multi-prompt
version behind the tables was not released. Its leftovers (TPT ``clip/custom_clip.py``
``get_text_features`` averages a list of normalized per-prompt features) point to this construction; we
renormalize the mean, as CLIP's prompt ensembling and fastcal's zero-shot ensemble do, where those
leftovers use the mean as it is (a norm a little below 1: slightly softer logits).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fastcal._checks import fail
from fastcal.data.items import prompt_classname
from fastcal.data.templates import check_template
from fastcal.methods.prefix import PackedPrompts, shares_prefix
from fastcal.methods.prompt_learner import PromptLearner
from fastcal.models.text_encoder import TextEncoder


def split_template(template: str) -> tuple[str, str]:
    """``(words before the class name, text after it)``: ``"a {} in a video game."`` -> ``("a", " in a
    video game.")``."""
    check_template("template", template)
    before, after = template.split("{}")
    return before.strip(), after


class PromptEnsemble(nn.Module):
    """Class text features of a template ensemble as a function of the concatenated contexts (module
    docstring). ``forward(ctx)``, ``ctx`` ``(S, n_ctx, W)``, returns the mean of the templates' normalized
    features ``(S, C, D)``; ``ctx`` is the concatenated initial contexts (the templates' own words).

    Args:
        model: the frozen open_clip CLIP.
        tokenizer: its tokenizer.
        classnames: the class names.
        templates: format strings with one ``{}``; at least one has words before it.
        samples: the ``S`` the packed prompts are laid out for.
        pack_prompts: encode each template's shared prefix once per context (``fastcal.methods.prefix``).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        classnames: Sequence[str],
        templates: Sequence[str],
        *,
        samples: int = 1,
        pack_prompts: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(templates, str) or not templates:
            raise fail("templates", "a non-empty list of templates", repr(templates)[:200])
        parts = [split_template(t) for t in templates]
        encoder = TextEncoder(model, bucket=True)
        self.learners = nn.ModuleList(
            PromptLearner(encoder, tokenizer, classnames, ctx_init=words, name_template="{}" + rest)
            for words, rest in parts
            if words
        )
        if not self.learners:
            raise fail("templates", "at least one template with words before '{}' to tune", list(templates))
        for learner in self.learners:
            learner.ctx.requires_grad_(False)
        self.encoders = [
            PackedPrompts(learner, model, samples=samples)
            if pack_prompts and shares_prefix(learner)
            else learner
            for learner in self.learners
        ]
        fixed = [t for (words, _), t in zip(parts, templates, strict=True) if not words]
        self.n_fixed = len(fixed)
        if fixed:
            names = [prompt_classname(name) for name in classnames]
            with torch.no_grad():
                features = [encoder.encode(tokenizer([t.format(name) for name in names])) for t in fixed]
            self.register_buffer("fixed_sum", sum(F.normalize(f, dim=-1) for f in features), persistent=False)
        self.sizes = [learner.n_ctx for learner in self.learners]
        self.n_ctx = sum(self.sizes)
        self.ctx_dim = self.learners[0].ctx_dim
        self.class_specific = False

    @property
    def ctx(self) -> torch.Tensor:
        """The initial contexts, concatenated: ``(n_ctx, W)``."""
        return torch.cat([learner.ctx for learner in self.learners])

    @property
    def num_classes(self) -> int:
        return self.learners[0].num_classes

    def forward(self, ctx: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(ctx.dtype, torch.float32)
        parts = ctx.split(self.sizes, dim=-2)
        total = sum(
            F.normalize(encode(part).to(dtype), dim=-1)
            for encode, part in zip(self.encoders, parts, strict=True)
        )
        if self.n_fixed:
            total = total + self.fixed_sum.to(dtype)
        return total / (len(self.learners) + self.n_fixed)
