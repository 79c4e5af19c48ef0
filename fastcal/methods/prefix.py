"""Class prompts that share their first tokens, encoded with that prefix computed once per context.

With one context for all classes and the class name at the end (TPT's and CoOp's default layout), every
class prompt starts with the same ``P = 1 + n_ctx`` token embeddings: the start token and the context. In
a causal text transformer (CLIP's), the hidden states of these positions depend on them only, so they are
the same for every class; computing them once per context instead of once per class is exact. With TPT's
4-token context and names of one to three tokens, the prefix is more than half of every prompt.

The prompts are packed (``PackedPrompts``): a packed sequence holds the prefix once, followed by the rest
of several classes' prompts (name, ".", end token), each at its own positions ``P, P+1, ...`` (position
embeddings as in the unpacked prompt); an additive attention mask lets each token see the prefix and the
earlier tokens of its own class only (``nn.MultiheadAttention``'s per-sequence ``(N * heads, L, L)``
mask). open_clip's own transformer runs the packed batch, and class ``c``'s feature is read at its end
token, through ``ln_final`` and the text projection, as in ``model.encode_text``. Classes are packed
longest first into sequences of at most ``max(64, P + longest rest)`` positions, so attention over a
packed sequence stays a small fraction of the per-token cost. Everything that does not depend on the
context (the packed suffix embeddings, positions, masks, read-out positions) is built once per class set,
so encoding costs no host synchronization (CUDA-graph safe).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fastcal._checks import check_int, fail
from fastcal.methods.prompt_learner import PromptLearner
from fastcal.models.text_encoder import project_pooled, text_tower

PACKED_LENGTH = 64


def _text_tower(model: nn.Module) -> nn.Module:
    tower = text_tower(model)
    if tower is None:
        raise fail(
            "model",
            "a CLIP whose text tower fastcal can run (fastcal.models.text_encoder)",
            type(model).__name__,
        )
    return tower


def shares_prefix(learner: PromptLearner) -> bool:
    """Whether ``learner``'s prompts can be packed: a unified context before the class name ("end"),
    read at a token after the context, of a causal tower."""
    if not (
        isinstance(learner, PromptLearner)
        and not learner.class_specific
        and learner.class_token_position == "end"
        and learner.text_encoder.is_causal
    ):
        return False
    return int(learner.text_encoder.eot_positions(learner.token_ids).min()) > learner.n_ctx


class PackedPrompts(nn.Module):
    """Class text features of a prompt learner with the shared prefix computed once (module docstring).

    ``forward(ctx)`` with ``ctx`` ``(S, n_ctx, W)`` returns ``(S, C, D)``, equal (up to float rounding) to
    ``learner(ctx)``. Built for the learner's current class set, or with ``terms`` for those names in the
    learner's template (``learner.encode_terms(terms, ctx)``: DOR's outliers); ``samples`` is the ``S`` it
    is built for (masks are laid out per batch).
    """

    def __init__(
        self,
        learner: PromptLearner,
        model: nn.Module,
        *,
        samples: int = 1,
        terms: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        if not shares_prefix(learner):
            raise fail(
                "learner", "a unified context before the class name on a causal text tower", repr(learner)
            )
        tower = _text_tower(model)
        object.__setattr__(self, "tower", tower)
        object.__setattr__(self, "learner", learner)
        self.samples = check_int("samples", samples, minimum=1)
        if terms is None:
            token_ids, start, suffix = learner.token_ids, learner.token_prefix[0], learner.token_suffix
        else:
            layout = learner.term_layout(terms)
            token_ids, start, suffix = layout.token_ids, layout.prefix[0], layout.suffix
        prefix_length = 1 + learner.n_ctx
        ends = learner.text_encoder.eot_positions(token_ids).tolist()
        rest = [end + 1 - prefix_length for end in ends]
        capacity = max(PACKED_LENGTH, prefix_length + max(rest)) - prefix_length
        sequences: list[list[int]] = []
        used: list[int] = []
        for c in sorted(range(len(rest)), key=lambda c: -rest[c]):  # first fit, longest first
            for s, filled in enumerate(used):
                if filled + rest[c] <= capacity:
                    sequences[s].append(c)
                    used[s] += rest[c]
                    break
            else:
                sequences.append([c])
                used.append(rest[c])
        length = prefix_length + max(used)
        n_seq = len(sequences)
        device = suffix.device

        # per packed slot: which class's suffix token (or none), its position, and the read-out slots
        source_class = torch.full((n_seq, length - prefix_length), -1, dtype=torch.long)
        source_offset = torch.zeros(n_seq, length - prefix_length, dtype=torch.long)
        positions = torch.arange(length).repeat(n_seq, 1)
        owner = torch.full((n_seq, length), -2, dtype=torch.long)  # -1: prefix, -2: padding, c: class c
        owner[:, :prefix_length] = -1
        readout = torch.zeros(len(rest), dtype=torch.long)
        for s, classes in enumerate(sequences):
            slot = 0
            for c in classes:
                span = slice(slot, slot + rest[c])
                source_class[s, span] = c
                source_offset[s, span] = torch.arange(rest[c])
                positions[s, prefix_length + slot : prefix_length + slot + rest[c]] = (
                    prefix_length + torch.arange(rest[c])
                )
                owner[s, prefix_length + slot : prefix_length + slot + rest[c]] = c
                readout[c] = s * length + prefix_length + slot + rest[c] - 1
                slot += rest[c]

        # everything but the context is fixed: the suffix slots and the prefix positions hold their
        # positional embeddings already
        suffix = suffix.detach()
        gathered = suffix[source_class.clamp(min=0).to(device), source_offset.to(device)]
        filled = (source_class >= 0).to(device)[..., None]
        position_embedding = tower.positional_embedding.detach()
        suffix_positions = position_embedding[positions[:, prefix_length:].to(device)]
        self.register_buffer(
            "suffix",
            torch.where(filled, gathered, torch.zeros_like(gathered)) + suffix_positions,
            persistent=False,
        )
        self.register_buffer("start", start.detach().clone(), persistent=False)  # (1, W)
        self.register_buffer("prefix_positions", position_embedding[:prefix_length].clone(), persistent=False)
        self.register_buffer("readout", readout.to(device), persistent=False)

        index = torch.arange(length)
        causal = index[None, :] <= index[:, None]
        same = owner[:, :, None] == owner[:, None, :]
        sees_prefix = (owner[:, None, :] == -1) & (owner[:, :, None] >= -1)
        padding_self = (owner[:, :, None] == -2) & (index[:, None] == index[None, :])
        allowed = (causal & (same | sees_prefix) & (owner[:, :, None] >= -1)) | padding_self
        mask = torch.zeros(n_seq, length, length).masked_fill(~allowed, float("-inf"))
        heads = tower.transformer.resblocks[0].attn.num_heads
        batched = mask.repeat(samples, 1, 1).repeat_interleave(heads, dim=0)  # (S * n_seq * heads, L, L)
        cast = tower.transformer.get_cast_dtype()
        self.register_buffer("mask", batched.to(device=device, dtype=cast), persistent=False)
        self.n_sequences = n_seq
        self.length = length
        self.prefix_length = prefix_length

    @property
    def token_rows(self) -> int:
        """Token positions run per context (the unpacked prompts run ``C * T``)."""
        return self.n_sequences * self.length

    def forward(self, ctx: torch.Tensor) -> torch.Tensor:
        tower = self.tower
        s = ctx.shape[0]
        if ctx.ndim != 3 or s != self.samples:
            raise fail("ctx", f"a (S={self.samples}, n_ctx, W) context", tuple(ctx.shape))
        cast = tower.transformer.get_cast_dtype()
        width = self.suffix.shape[-1]
        prefix = torch.cat([self.start.expand(s, 1, width), ctx.to(self.start.dtype)], dim=1)  # (S, P, W)
        prefix = prefix + self.prefix_positions
        x = torch.cat(
            [
                prefix[:, None].expand(s, self.n_sequences, -1, -1),
                self.suffix[None].expand(s, -1, -1, -1),
            ],
            dim=2,
        ).reshape(s * self.n_sequences, self.length, width)
        x = tower.transformer(x.to(cast), attn_mask=self.mask.to(cast))
        read = x.reshape(s, self.n_sequences * self.length, width)[:, self.readout]  # (S, C, W)
        return project_pooled(tower, tower.ln_final(read))  # LayerNorm is per token: only the read rows
