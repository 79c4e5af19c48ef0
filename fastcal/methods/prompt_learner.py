"""Learnable prompt contexts for CLIP's text encoder (CoOp's prompt learner, batched).

CoOp (Zhou et al., "Learning to Prompt for Vision-Language Models", IJCV 2022; reference code
github.com/KaiyangZhou/CoOp ``trainers/coop.py``) replaces the words of a hand-crafted prompt with ``n``
learned token embeddings ``v_1..v_n`` (width ``W``, the text tower's width) and classifies with the text
features of, per class ``c``::

    [SOS] v_1 ... v_n [name_c tokens] [.] [EOS] [pad ...]      (class token position "end")
    [SOS] v_1 ... v_{n/2} [name_c] v_{n/2+1} ... v_n [.] [EOS]  ("middle", split at n // 2)
    [SOS] [name_c] v_1 ... v_n [.] [EOS]                       ("front")

The context is one ``(n, W)`` matrix shared by all classes ("unified") or one per class
(``class_specific=True``, CoOp's CSC, ``(C, n, W)``). It is initialized from a phrase (``ctx_init="a photo
of a"``: the phrase's token embeddings; ``n`` becomes its token count) or from N(0, ``init_std``^2).
The frozen parts are the token embeddings of the prompt text ``"<context words> <name>."`` (or another
``name_template``: a template's remainder, TCP's dataset words; CoOp's
``token_prefix`` = SOS and ``token_suffix`` = everything after the context); they are buffers recomputed
from the class names, never saved (``state_dict()`` holds only ``ctx``), so a learned context loads
into a learner for other classes (base-to-new evaluation, cross-dataset transfer).

Differences from the reference, all exact rewrites:

- The middle and front layouts are built for all classes at once: the end layout
  ``cat(prefix, ctx, suffix)`` followed by a per-class gather of positions, instead of a Python loop
  over classes.
- When the text tower is causal, the token sequences are cut to the longest prompt
  (``max_c EOT_c + 1`` positions, e.g. 20 instead of 77) when they are built, so prompt embeddings never
  materialize the padding; ``TextEncoder.encode_embeddings`` gives the same features.
- A context may be given per sample: ``ctx`` of shape ``(S, n, W)`` gives ``S * C`` prompts encoded in
  one batch (CoCoOp's image-conditioned contexts, batched test-time prompt tuning), where the reference
  loops over images.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from fastcal._checks import check_choice, check_int, check_number, check_tensor, fail
from fastcal.data.items import prompt_classname
from fastcal.data.templates import check_template
from fastcal.models.text_encoder import TextEncoder

CLASS_TOKEN_POSITIONS = ("end", "middle", "front")


def _check_names(name: str, names: Any) -> list[str]:
    if isinstance(names, str) or not isinstance(names, Sequence) or len(names) == 0:
        raise fail(name, "a non-empty list of strings", repr(names)[:200])
    if not all(isinstance(n, str) and n.strip() for n in names):
        raise fail(name, "non-empty strings", repr(list(names))[:200])
    return [prompt_classname(n) for n in names]


def _check_start_token(tokenizer: Any) -> None:
    """Prompt learners put the context right after a start token every prompt begins with (CLIP's
    ``<start_of_text>``); a tokenizer without one (SigLIP's) is refused."""
    first = tokenizer(["a", "b"])[:, 0]
    if int(first[0]) != int(first[1]):
        raise fail(
            "tokenizer",
            "one that starts every prompt with a start token, as CLIP's does (the learned context goes "
            "right after it)",
            "one without (e.g. SigLIP's): use zero-shot classification or fine-tuning with this model",
        )


class _Layout:
    """Token ids and frozen embeddings of prompts ``"<context words> <name>."`` for a list of names.

    ``prefix`` (N, 1, W) is SOS, ``suffix`` (N, T - 1 - n_ctx, W) what follows the learned context (fixed
    context words, name, ".", EOS, padding), ``positions`` (N, T) the source position in the end layout
    of every output position (``None`` for the end layout itself), ``token_ids`` (N, T) in output order.
    """

    def __init__(
        self,
        learner: PromptLearner,
        names: list[str],
    ) -> None:
        encoder = learner.text_encoder
        tokenizer = learner.tokenizer
        ids = tokenizer([f"{learner.prompt_prefix} {learner.name_template.format(name)}" for name in names])
        check_tensor("tokenizer output", ids, ndim=2, integer=True)
        device = encoder.token_embedding(ids[:1, :1]).device
        ids = ids.to(device)
        eot = encoder.eot_positions(ids)
        if encoder.is_causal:
            ids = ids[:, : int(eot.max()) + 1]
        n_ctx, n_fixed = learner.n_ctx, learner.n_fixed_words
        first_name = 1 + n_ctx + n_fixed
        if int(eot.min()) <= first_name:
            raise fail("classnames", "names that fit in the text tower's context", repr(names)[:200])
        with torch.no_grad():
            embeddings = encoder.token_embedding(ids)
        self.prefix = embeddings[:, :1].detach()
        self.suffix = embeddings[:, 1 + n_ctx :].detach()
        self.positions: torch.Tensor | None = None
        if learner.class_token_position != "end":
            name_ids = tokenizer(names).to(device)
            name_lens = (encoder.eot_positions(name_ids) - 1).clamp(min=1)
            name_lens = torch.minimum(name_lens, eot - first_name)
            self.positions = _positions(learner, name_lens.tolist(), ids.shape[1]).to(device)
            ids = ids.gather(1, self.positions)
        self.token_ids = ids


def _positions(learner: PromptLearner, name_lens: list[int], length: int) -> torch.Tensor:
    """Per row, the end-layout position of each output position (middle / front layouts)."""
    n_ctx, n_fixed = learner.n_ctx, learner.n_fixed_words
    first_name = 1 + n_ctx + n_fixed
    half = n_ctx // 2
    rows = []
    for name_len in name_lens:
        name = list(range(first_name, first_name + name_len))
        rest = list(range(first_name + name_len, length))
        fixed = list(range(1 + n_ctx, first_name))
        if learner.class_token_position == "middle":
            order = [0, *range(1, 1 + half), *name, *range(1 + half, 1 + n_ctx), *fixed, *rest]
        else:
            order = [0, *name, *range(1, 1 + n_ctx), *fixed, *rest]
        rows.append(order)
    return torch.tensor(rows, dtype=torch.long)


class PromptLearner(nn.Module):
    """CoOp's learnable context over the exact truncated text encoder (module docstring).

    Args:
        text_encoder: a ``fastcal.models.TextEncoder`` of the (frozen) CLIP.
        tokenizer: the model's tokenizer (a callable ``list[str] -> (N, L)`` token ids).
        classnames: one name per class (underscores become spaces).
        n_ctx: number of learned context tokens (16: CoOp; 4: CoCoOp, TPT). Ignored with ``ctx_init``.
        ctx_init: a phrase to initialize the context from (e.g. ``"a photo of a"``); ``n_ctx`` becomes its
            token count. ``None``: random N(0, ``init_std``^2) initialization with ``n_ctx`` tokens.
        class_specific: one context per class (CoOp's CSC) instead of one shared by all classes.
        class_token_position: where the class name goes: ``"end"``, ``"middle"`` or ``"front"``.
        init_std: standard deviation of the random initialization (CoOp: 0.02).
        n_learned: with ``ctx_init``, learn only the phrase's first ``n_learned`` tokens and keep the rest
            as fixed words after them (MaPLe: 2 learned tokens of "a photo of a"; default: all).
        name_template: the text after the context, ``{}`` the class name (default ``"{}."``; a template's
            remainder, ``"{} in a video game."`` after ``"a"``; TCP's tuned prompts carry dataset words:
            ``"{}, a type of pet."``, ``"person doing {}."``). The
            middle and front layouts need it to start with the name, and move the name alone.

    Attributes:
        ctx: the learned context, ``(n_ctx, W)`` or ``(C, n_ctx, W)`` (class-specific); float32.
        token_ids: ``(C, T)`` token ids of the prompts (``T`` = the longest prompt when the tower is
            causal, else its full context length); the text encoder reads the EOT position from them.
        token_prefix, token_suffix: frozen token embeddings of the end layout (SOS; what follows the
            context), ``(C, 1, W)`` and ``(C, T - 1 - n_ctx, W)``.
    """

    def __init__(
        self,
        text_encoder: TextEncoder,
        tokenizer: Any,
        classnames: Sequence[str],
        *,
        n_ctx: int = 16,
        ctx_init: str | None = None,
        class_specific: bool = False,
        class_token_position: str = "end",
        init_std: float = 0.02,
        n_learned: int | None = None,
        name_template: str = "{}.",
    ) -> None:
        super().__init__()
        if not isinstance(text_encoder, TextEncoder):
            raise TypeError(
                f"text_encoder: expected a fastcal TextEncoder, got {type(text_encoder).__name__}"
            )
        if not callable(tokenizer):
            raise TypeError(f"tokenizer: expected a callable, got {type(tokenizer).__name__}")
        _check_start_token(tokenizer)
        classnames = _check_names("classnames", classnames)
        check_int("n_ctx", n_ctx, minimum=1)
        check_choice("class_token_position", class_token_position, CLASS_TOKEN_POSITIONS)
        check_number("init_std", init_std, minimum=0.0, strict_minimum=True)
        if not isinstance(class_specific, bool):
            raise TypeError(f"class_specific: expected a bool, got {type(class_specific).__name__}")
        check_template("name_template", name_template)
        if class_token_position != "end" and not name_template.startswith("{}"):
            raise fail(
                "name_template",
                f"a template starting with the name for class_token_position {class_token_position!r}",
                repr(name_template),
            )
        self.name_template = name_template
        # Plain attributes: the encoder and tokenizer are shared with the model, not sub-modules.
        object.__setattr__(self, "text_encoder", text_encoder)
        object.__setattr__(self, "tokenizer", tokenizer)
        # Separate plan memos (TextEncoder keeps one) for class prompts, per-sample prompts and terms,
        # so alternating between them does not re-read the prompt lengths from the device.
        object.__setattr__(self, "_batched_encoder", copy.copy(text_encoder))
        object.__setattr__(self, "_term_encoder", copy.copy(text_encoder))
        self.class_specific = class_specific
        self.class_token_position = class_token_position
        width = text_encoder.token_embedding(torch.zeros(1, 1, dtype=torch.long)).shape[-1]

        if ctx_init is not None:
            if not isinstance(ctx_init, str) or not ctx_init.strip():
                raise fail("ctx_init", "a non-empty phrase or None", repr(ctx_init))
            phrase = prompt_classname(ctx_init)
            phrase_ids = tokenizer([phrase])
            phrase_len = int(text_encoder.eot_positions(phrase_ids)[0]) - 1
            if n_learned is None:
                n_learned = phrase_len
            check_int("n_learned", n_learned, minimum=1)
            if n_learned > phrase_len:
                raise fail("n_learned", f"at most {phrase_len} (the tokens of {phrase!r})", n_learned)
            with torch.no_grad():
                init = text_encoder.token_embedding(phrase_ids)[0, 1 : 1 + n_learned].float().cpu()
            n_ctx = n_learned
            self.n_fixed_words = phrase_len - n_learned
            self.prompt_prefix = phrase
            ctx = init.expand(len(classnames), -1, -1).clone() if class_specific else init.clone()
        else:
            if n_learned is not None:
                raise fail("n_learned", "None without ctx_init", n_learned)
            self.n_fixed_words = 0
            self.prompt_prefix = " ".join(["X"] * n_ctx)
            shape = (len(classnames), n_ctx, width) if class_specific else (n_ctx, width)
            ctx = torch.empty(shape).normal_(0.0, init_std)
        self.n_ctx = n_ctx
        self.ctx_dim = width
        device = text_encoder.token_embedding(torch.zeros(1, 1, dtype=torch.long)).device
        self.ctx = nn.Parameter(ctx.to(device))
        self.classnames: list[str] = []
        self._set_layout(classnames)
        self._repeated_ids: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._term_memo: tuple[Any, _Layout, nn.Module | bool | None] | None = None

    # ---- class set ---------------------------------------------------------------------------------
    def _set_layout(self, classnames: list[str]) -> None:
        layout = _Layout(self, classnames)
        self.register_buffer("token_ids", layout.token_ids, persistent=False)
        self.register_buffer("token_prefix", layout.prefix, persistent=False)
        self.register_buffer("token_suffix", layout.suffix, persistent=False)
        self.register_buffer("positions", layout.positions, persistent=False)
        self.classnames = classnames

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def set_classnames(self, classnames: Sequence[str]) -> None:
        """Re-tokenize for another class set (e.g. the new classes); the learned context is kept.

        A class-specific context needs the same number of classes.
        """
        classnames = _check_names("classnames", classnames)
        if self.class_specific and len(classnames) != self.ctx.shape[0]:
            raise fail(
                "classnames", f"{self.ctx.shape[0]} names (one per class-specific context)", len(classnames)
            )
        self._set_layout(classnames)
        self._repeated_ids = {}

    def reset_context(self, ctx: torch.Tensor) -> None:
        """Overwrite the context in place (``copy_``; the parameter keeps its address)."""
        check_tensor("ctx", ctx, floating=True)
        if ctx.shape != self.ctx.shape:
            raise fail("ctx", f"shape {tuple(self.ctx.shape)}", tuple(ctx.shape))
        with torch.no_grad():
            self.ctx.copy_(ctx)

    @property
    def context_positions(self) -> torch.Tensor:
        """``(C, n_ctx)``: the position of each context token in each class's prompt."""
        end = torch.arange(1, 1 + self.n_ctx, device=self.token_ids.device).expand(self.num_classes, -1)
        if self.positions is None:
            return end
        # output position j holds end-layout position positions[c, j]; invert it for the context range.
        inverse = torch.argsort(self.positions, dim=1)
        return inverse[:, 1 : 1 + self.n_ctx]

    # ---- prompts -----------------------------------------------------------------------------------
    def _context_batch(self, ctx: torch.Tensor | None, n_rows: int) -> tuple[torch.Tensor, tuple[int, ...]]:
        """The context as ``(*lead, n_rows, n_ctx, W)`` and ``lead`` (``()`` or ``(S,)``)."""
        ctx = self.ctx if ctx is None else ctx
        if not isinstance(ctx, torch.Tensor):
            raise TypeError(f"ctx: expected a torch.Tensor or None, got {type(ctx).__name__}")
        unbatched = 3 if self.class_specific else 2
        if ctx.ndim not in (unbatched, unbatched + 1) or tuple(ctx.shape[-2:]) != (self.n_ctx, self.ctx_dim):
            what = "(C, n_ctx, W)" if self.class_specific else "(n_ctx, W)"
            expected = f"{what} or (S, *{what}) with n_ctx={self.n_ctx}, W={self.ctx_dim}"
            raise fail("ctx", expected, tuple(ctx.shape))
        if self.class_specific and ctx.shape[-3] != n_rows:
            raise fail("ctx", f"{n_rows} class-specific contexts", ctx.shape[-3])
        lead = tuple(ctx.shape[:1]) if ctx.ndim == unbatched + 1 else ()
        if not self.class_specific:
            ctx = ctx.unsqueeze(-3).expand(*lead, n_rows, -1, -1)
        return ctx, lead

    @staticmethod
    def _assemble(
        ctx: torch.Tensor,
        lead: tuple[int, ...],
        layout_prefix: torch.Tensor,
        layout_suffix: torch.Tensor,
        positions: torch.Tensor | None,
    ) -> torch.Tensor:
        prefix = layout_prefix.expand(*lead, *layout_prefix.shape)
        suffix = layout_suffix.expand(*lead, *layout_suffix.shape)
        prompts = torch.cat([prefix, ctx.to(prefix.dtype), suffix], dim=-2)
        if positions is None:
            return prompts
        index = positions.unsqueeze(-1).expand(*lead, *positions.shape, prompts.shape[-1])
        return prompts.gather(-2, index)

    def prompt_embeddings(self, ctx: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings (no positions) of every class's prompt: ``(C, T, W)``, or ``(S, C, T, W)``
        for a per-sample context ``ctx`` of shape ``(S, n_ctx, W)`` (class-specific: ``(S, C, n_ctx, W)``)."""
        ctx, lead = self._context_batch(ctx, self.num_classes)
        return self._assemble(ctx, lead, self.token_prefix, self.token_suffix, self.positions)

    def batched_token_ids(self, n_samples: int) -> torch.Tensor:
        """``token_ids`` repeated for ``n_samples`` contexts, ``(S * C, T)`` (kept, and planned from
        ``token_ids``' plan, so the text encoder reads the lengths once for every ``S``)."""
        memo = self._repeated_ids.get(n_samples)
        if memo is None or memo[0] is not self.token_ids:
            memo = (self.token_ids, self.token_ids.repeat(n_samples, 1))
            self._repeated_ids[n_samples] = memo
            self._batched_encoder.plan_repeated(memo[1], self.token_ids)
        return memo[1]

    def forward(self, ctx: torch.Tensor | None = None) -> torch.Tensor:
        """Class text features (unnormalized): ``(C, D)``, or ``(S, C, D)`` for a per-sample ``ctx``."""
        prompts = self.prompt_embeddings(ctx)
        if prompts.ndim == 3:
            return self.text_encoder.encode_embeddings(prompts, self.token_ids)
        n_samples = prompts.shape[0]
        flat = prompts.reshape(-1, *prompts.shape[2:])
        features = self._batched_encoder.encode_embeddings(flat, self.batched_token_ids(n_samples))
        return features.view(n_samples, self.num_classes, -1)

    def encode_terms(
        self,
        terms: Sequence[str],
        ctx: torch.Tensor | None = None,
        *,
        deep_prompts: Sequence[torch.Tensor] | None = None,
        injected: tuple[int, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Text features ``(T, D)`` of ``terms`` (e.g. outlier words) in the learned template
        ``"<context> <term>."``, with gradients to the context. A class-specific learner needs an explicit
        unified ``ctx`` ``(n_ctx, W)``. ``deep_prompts`` (MaPLe) and ``injected`` (TCP, one token set
        per term), as ``TextEncoder.encode_embeddings`` takes them."""
        terms = _check_names("terms", terms)
        layout = self.term_layout(terms)
        if ctx is None:
            if self.class_specific:
                raise fail("ctx", "a unified (n_ctx, W) context for a class-specific learner", "None")
            ctx = self.ctx
        check_tensor("ctx", ctx, ndim=2, floating=True, finite=False)
        if tuple(ctx.shape) != (self.n_ctx, self.ctx_dim):
            raise fail("ctx", f"shape ({self.n_ctx}, {self.ctx_dim})", tuple(ctx.shape))
        if deep_prompts is None and injected is None:
            packed = self._packed_terms(terms)
            if packed is not None:  # the start token and context once for all the terms (exact)
                return packed(ctx[None])[0]
        ctx_rows = ctx.unsqueeze(0).expand(len(terms), -1, -1)
        prompts = self._assemble(ctx_rows, (), layout.prefix, layout.suffix, layout.positions)
        return self._term_encoder.encode_embeddings(
            prompts, layout.token_ids, deep_prompts=deep_prompts, injected=injected
        )

    def term_layout(self, terms: Sequence[str]) -> _Layout:
        """Token ids and frozen embeddings of ``terms`` in this learner's template (kept for the last
        term list: a regularizer asks for the same outliers at every step of an epoch)."""
        key = (tuple(terms), self.ctx.device)
        if self._term_memo is None or self._term_memo[0] != key:
            self._term_memo = (key, _Layout(self, list(terms)), None)
        return self._term_memo[1]

    def _packed_terms(self, terms: Sequence[str]) -> nn.Module | None:
        """``PackedPrompts`` of ``terms`` (kept with their layout), or None when the layout does not
        share a prefix (``fastcal.methods.prefix.shares_prefix``)."""
        from fastcal.methods.prefix import PackedPrompts, shares_prefix

        key, layout, packed = self._term_memo
        if packed is None:  # decided once per term list: False when the layout does not share a prefix
            packed = (
                PackedPrompts(self, self.text_encoder.model, terms=terms) if shares_prefix(self) else False
            )
            self._term_memo = (key, layout, packed)
        return packed or None

    def extra_repr(self) -> str:
        kind = "class-specific" if self.class_specific else "unified"
        return (
            f"classes={self.num_classes}, n_ctx={self.n_ctx}, width={self.ctx_dim}, {kind}, "
            f"class_token_position={self.class_token_position!r}, prefix={self.prompt_prefix!r}, "
            f"name_template={self.name_template!r}"
        )
