"""Exact text encoding that runs CLIP's text transformer only as far as the prompts reach.

CLIP's text tower (Radford et al. 2021; open_clip ``model.py`` ``CLIP.encode_text`` and
``transformer.py`` ``TextTransformer``) computes, for token ids ``t`` of length ``L``::

    x = token_embedding(t) + positional_embedding[:L]
    x = ln_final(transformer(x, attn_mask))        # attn_mask: -inf strictly above the diagonal
    feature = x[eot] @ text_projection             # eot = argmax(t) (OpenAI BPE: EOT has the top id)

With a causal mask, position ``i`` attends to positions ``<= i`` only, so the output at ``eot`` does not
depend on anything after it: running the transformer on the first ``T = max(eot) + 1`` positions gives
the same features (up to float rounding) at ``T / L`` of the cost, about 77 / 9 less work for
"a photo of a {}.". With ``bucket=True`` the rows are grouped by length (sorted by ``eot``; group
boundaries chosen by dynamic programming on ``rows * T * (1 + T / 6W)`` plus a fixed per-group cost),
each group is run at its own length and the original order restored.

Whether truncation is exact is read off the tower, never its name: the attention mask must block every
position above the diagonal (-inf, or True for a boolean mask), the feature must be read at a token
position (pool type ``argmax``, ``eos``, ``first`` or ``last``) and no token may be appended after the
prompt (CoCa's ``cls_emb``) or masked by padding. Other towers run at full length, with the same code
path. A tower that is not open_clip's works when it shows the same attributes (``TOWER_ATTRIBUTES``:
``fastcal.models.hf`` does for Hugging Face CLIP and SigLIP); any other goes through
``model.encode_text``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from open_clip.model import CLIP
from open_clip.transformer import TextTransformer, text_global_pool
from torch import nn

from fastcal._checks import check_tensor, fail

PLAN_MEMO_SIZE = 8  # token-id tensors whose length plans are kept

# Fixed cost of one more length bucket, in token-rows of transformer work: the pass's per-op overhead
# plus the lower efficiency of smaller GEMMs. CPU: measured with the ViT-B text tower on 2 cores over
# 500-prompt batches (ImageNet CoOp prompts and "a photo of a {noun}."): 1024-2048 fastest, 256 within
# 5%, 4096 15-20% slower, 0 (a pass per distinct length) 30-55% slower. CUDA: an unmeasured estimate
# (launch-bound passes, GEMMs that need a large M).
_BUCKET_OVERHEAD_TOKENS = {"cpu": 2048, "cuda": 16384}
_TRUNCATABLE_POOLS = ("argmax", "eos", "first", "last")
# What fastcal reads from a text tower (open_clip's TextTransformer has them all).
TOWER_ATTRIBUTES = (
    "token_embedding",
    "positional_embedding",
    "transformer",
    "attn_mask",
    "ln_final",
    "text_projection",
    "pool_type",
)


def text_tower(model: nn.Module) -> nn.Module | None:
    """The text tower the exact encoder runs: an open_clip ``CLIP`` or ``TextTransformer`` itself, else
    ``model.text`` when it is open_clip's or has every attribute of ``TOWER_ATTRIBUTES``; ``None`` for a
    model whose other text tower only ``encode_text`` runs. Anything else is a TypeError."""
    if isinstance(model, (CLIP, TextTransformer)):
        return model
    text = getattr(model, "text", None)
    if isinstance(text, TextTransformer) or (
        isinstance(text, nn.Module) and all(hasattr(text, name) for name in TOWER_ATTRIBUTES)
    ):
        return text
    if isinstance(text, nn.Module) and hasattr(model, "encode_text"):
        return None
    raise TypeError(
        "model: expected an open_clip CLIP, CustomTextCLIP or TextTransformer, or a Hugging Face CLIP "
        f"loaded with load_clip('hf:...'), got {type(model).__name__}"
    )


def _mask_is_causal(mask: torch.Tensor | None) -> bool:
    if mask is None or mask.ndim != 2 or mask.shape[0] != mask.shape[1]:
        return False
    above = torch.ones(mask.shape, dtype=torch.bool, device=mask.device).triu(1)
    blocked = mask if mask.dtype == torch.bool else mask == float("-inf")
    return bool(blocked[above].all())


def bucket_splits(sorted_lengths: list[int], width: int, overhead_tokens: float) -> list[tuple[int, int]]:
    """Split ascending sequence lengths into contiguous groups ``[(begin, end), ...]`` of least cost.

    A group of ``n`` rows run at its longest length ``T`` costs ``n * T * (1 + T / (6 * width))`` (per
    layer a token costs ``24 W^2`` in the projections and MLP plus ``4 T W`` in attention), plus
    ``overhead_tokens`` for the extra pass. Exact dynamic programming over the distinct lengths.
    """
    if not sorted_lengths:
        return []
    values: list[int] = []
    ends: list[int] = []
    for i, length in enumerate(sorted_lengths):
        if values and length == values[-1]:
            ends[-1] = i + 1
        else:
            values.append(length)
            ends.append(i + 1)
    starts = [0, *ends]
    best = [0.0] + [float("inf")] * len(values)
    cut = [0] * (len(values) + 1)
    for j in range(1, len(values) + 1):
        longest = values[j - 1]
        per_row = longest * (1.0 + longest / (6.0 * width))
        for i in range(j):
            cost = best[i] + (starts[j] - starts[i]) * per_row + overhead_tokens
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups = []
    j = len(values)
    while j > 0:
        groups.append((starts[cut[j]], starts[j]))
        j = cut[j]
    return groups[::-1]


def _replace_context(x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Hidden states ``x`` (N, L, W) with positions ``1..n`` replaced by ``tokens`` (N, n, W)."""
    return torch.cat([x[:, :1], tokens, x[:, 1 + tokens.shape[1] :]], dim=1)


def project_pooled(tower: Any, pooled: torch.Tensor) -> torch.Tensor:
    """The text tower's output projection of pooled features (a matrix, an ``nn.Linear`` or none)."""
    projection = tower.text_projection
    if projection is None:
        return pooled
    if isinstance(projection, nn.Linear):
        return projection(pooled)
    return pooled @ projection


class TextEncoder(nn.Module):
    """CLIP text features computed only up to the batch's longest EOT (exact for causal towers).

    Holds references to the model's text tower, not copies, and registers none of them: its
    ``state_dict()`` is empty and it follows the model through ``.to()`` / ``.half()``. Works with
    open_clip ``CLIP`` (ViT or ModifiedResNet vision), ``CustomTextCLIP`` / ``CoCa`` with an open_clip
    ``TextTransformer``, a bare ``TextTransformer``, and (through ``encode_text``, full length)
    ``CustomTextCLIP`` with any other text tower.

    Args:
        model: the CLIP model (or text tower).
        bucket: group rows by length and run each group at its own length; worth it for large batches
            of prompts of mixed length (frozen class-text features), not for a few prompts.
        bucket_overhead_tokens: the cost of one more group in token-rows (default: 2048 on CPU,
            measured; 16384 on CUDA, an estimate).
    """

    def __init__(
        self, model: nn.Module, *, bucket: bool = False, bucket_overhead_tokens: float | None = None
    ):
        super().__init__()
        if not isinstance(bucket, bool):
            raise TypeError(f"bucket: expected a bool, got {type(bucket).__name__} {bucket!r}")
        tower = text_tower(model)
        # Plain attributes (object.__setattr__), so nn.Module does not register the model's modules.
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "_tower", tower)
        object.__setattr__(self, "_plan_memo", [])
        object.__setattr__(self, "_causal_memo", None)
        self.bucket = bucket
        self.bucket_overhead_tokens = bucket_overhead_tokens

    @property
    def model(self) -> nn.Module:
        """The model it encodes with (a CLIP, CustomTextCLIP or text tower; not a copy)."""
        return self._model

    # ---- what the tower is -------------------------------------------------------------------------
    def _pool(self) -> tuple[str, int | None]:
        tower = self._tower
        if isinstance(tower, CLIP):
            return tower.text_pool_type, getattr(tower, "text_eos_id", None)
        return tower.pool_type, getattr(tower, "eos_id", None)

    @property
    def is_causal(self) -> bool:
        """True when truncating to the longest EOT is exact: causal mask, feature read at one token."""
        tower = self._tower
        if tower is None or getattr(tower, "cls_emb", None) is not None:
            return False
        if getattr(tower, "use_pad_mask", False):
            return False
        if self._pool()[0] not in _TRUNCATABLE_POOLS:
            return False
        mask = tower.attn_mask
        memo = self._causal_memo
        if memo is not None and memo[0] is mask and (mask is None or memo[1] == mask._version):
            return memo[2]
        causal = _mask_is_causal(mask)
        object.__setattr__(self, "_causal_memo", (mask, None if mask is None else mask._version, causal))
        return causal

    def _require_tower(self, what: str) -> nn.Module:
        if self._tower is None:
            raise ValueError(
                f"{what}: expected an open_clip text transformer, got a {type(self._model.text).__name__} "
                "text tower (only encode() is supported for it, at full length)"
            )
        return self._tower

    def _device(self) -> torch.device:
        return self._tower.token_embedding.weight.device

    # ---- public API --------------------------------------------------------------------------------
    def token_embedding(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings without positions, ``(N, L, W)``: what prompt learners edit."""
        tower = self._require_tower("token_embedding")
        check_tensor("token_ids", token_ids, ndim=2, integer=True)
        return tower.token_embedding(token_ids.to(self._device()))

    def eot_positions(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Per row, the position the feature is read from (the EOT token for CLIP), ``(N,)`` int64."""
        self._require_tower("eot_positions")
        check_tensor("token_ids", token_ids, ndim=2, integer=True)
        pool, eos_id = self._pool()
        n, length = token_ids.shape
        if pool == "argmax":
            return token_ids.argmax(dim=-1)
        if pool == "eos":
            return (token_ids == eos_id).int().argmax(dim=-1)
        if pool == "first":
            return torch.zeros(n, dtype=torch.long, device=token_ids.device)
        return torch.full((n,), length - 1, dtype=torch.long, device=token_ids.device)

    def encode(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Text features ``(N, D)``, equal to ``model.encode_text(token_ids)`` (unnormalized)."""
        check_tensor("token_ids", token_ids, ndim=2, integer=True)
        if self._tower is None:
            return self._model.encode_text(token_ids)
        token_ids = token_ids.to(self._device())
        return self._encode(self._tower.token_embedding(token_ids), token_ids)

    def encode_embeddings(
        self,
        embeddings: torch.Tensor,
        token_ids: torch.Tensor,
        *,
        deep_prompts: Sequence[torch.Tensor] | None = None,
        injected: tuple[int, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Text features ``(N, D)`` from token embeddings ``(N, L, W)`` (positions not yet added).

        ``token_ids`` ``(N, L)`` only locate the EOT (and padding, for towers that mask it); gradients
        flow to ``embeddings`` (e.g. a prompt learner's context vectors) and to the tower's parameters.

        ``deep_prompts`` (MaPLe's deep text prompts, Khattak et al., CVPR 2023): tensors ``(n, W)``;
        before layer ``k`` (``1 <= k <= len(deep_prompts)``) the hidden states at positions ``1..n`` (the
        context right after SOS) are replaced by ``deep_prompts[k - 1]`` for every row.

        ``injected = (k, tokens)`` (TCP's class-aware tokens, Yao et al., CVPR 2024): ``tokens`` ``(N, n,
        W)``, one set per row; before layer ``k`` (``0 <= k < layers``; 0: right after the position
        embeddings) the hidden states at positions ``1..n`` are replaced by them, once (after any deep
        prompt of that layer).
        """
        tower = self._require_tower("encode_embeddings")
        check_tensor("embeddings", embeddings, ndim=3, floating=True, finite=False)
        check_tensor("token_ids", token_ids, ndim=2, integer=True)
        if embeddings.shape[:2] != token_ids.shape:
            expected = f"shape (N, L) = {tuple(token_ids.shape)} like token_ids"
            raise fail("embeddings", expected, tuple(embeddings.shape))
        width = tower.token_embedding.weight.shape[1]
        if embeddings.shape[2] != width:
            raise fail("embeddings", f"width {width} (the text tower's)", embeddings.shape[2])
        if deep_prompts is not None:
            deep_prompts = self._check_deep_prompts(deep_prompts, width)
        if injected is not None:
            injected = self._check_injected(injected, embeddings.shape)
        return self._encode(embeddings, token_ids.to(embeddings.device), deep_prompts, injected)

    def _check_injected(
        self, injected: tuple[int, torch.Tensor], shape: torch.Size
    ) -> tuple[int, torch.Tensor]:
        layers = len(self._tower.transformer.resblocks)
        if not isinstance(injected, tuple) or len(injected) != 2:
            raise fail("injected", "a (layer, tokens) pair", type(injected).__name__)
        layer, tokens = injected
        if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < layers:
            raise fail("injected", f"a layer in [0, {layers - 1}]", repr(layer))
        check_tensor("injected tokens", tokens, ndim=3, floating=True, finite=False)
        n, length, width = shape
        if tokens.shape[0] != n or tokens.shape[2] != width or not 1 <= tokens.shape[1] < length:
            raise fail(
                "injected tokens", f"shape ({n}, n, {width}) with 1 <= n < {length}", tuple(tokens.shape)
            )
        return layer, tokens

    def _check_deep_prompts(self, deep_prompts: Sequence[torch.Tensor], width: int) -> list[torch.Tensor]:
        layers = len(self._tower.transformer.resblocks)
        if isinstance(deep_prompts, torch.Tensor) or not 0 <= len(deep_prompts) < layers:
            got = "a tensor" if isinstance(deep_prompts, torch.Tensor) else f"{len(deep_prompts)} tensors"
            raise fail(
                "deep_prompts", f"a list of at most {layers - 1} tensors (layers 1..{layers - 1})", got
            )
        for k, prompt in enumerate(deep_prompts):
            check_tensor(f"deep_prompts[{k}]", prompt, ndim=2, floating=True, finite=False)
            if prompt.shape != deep_prompts[0].shape or prompt.shape[1] != width:
                raise fail(
                    f"deep_prompts[{k}]", f"shape (n, {width}) like deep_prompts[0]", tuple(prompt.shape)
                )
        return list(deep_prompts)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.encode(token_ids)

    # ---- internals ---------------------------------------------------------------------------------
    def _plan(self, token_ids: torch.Tensor) -> tuple[list[tuple[torch.Tensor | None, int]], Any]:
        """Groups ``[(row index or None for all rows, length)]`` and the inverse permutation (or None).

        Reading the lengths synchronizes with the device; the plans for the last ``PLAN_MEMO_SIZE``
        ``token_ids`` seen are kept (same tensor object, unmodified), so each of a method's fixed token
        ids (ProDA has one per class-token position) costs one sync.
        """
        key = (self.bucket, self.bucket_overhead_tokens, self.is_causal)
        for memo in self._plan_memo:
            if memo[0] is token_ids and memo[1] == token_ids._version and memo[2] == key:
                return memo[3], memo[4]
        full = token_ids.shape[1]
        if token_ids.shape[1] > self._tower.positional_embedding.shape[0]:
            raise fail(
                "token_ids",
                f"at most {self._tower.positional_embedding.shape[0]} positions (the tower's context length)",
                token_ids.shape[1],
            )
        inverse = None
        if not self.is_causal:
            groups: list[tuple[torch.Tensor | None, int]] = [(None, full)]
        else:
            lengths = self.eot_positions(token_ids) + 1
            if not self.bucket:
                groups = [(None, int(lengths.max()))]
            else:
                order = torch.argsort(lengths, stable=True)
                sorted_lengths = lengths[order].tolist()
                device_type = token_ids.device.type
                overhead = self.bucket_overhead_tokens
                if overhead is None:
                    overhead = _BUCKET_OVERHEAD_TOKENS.get(device_type, _BUCKET_OVERHEAD_TOKENS["cuda"])
                width = self._tower.token_embedding.weight.shape[1]
                splits = bucket_splits(sorted_lengths, width, overhead)
                if len(splits) == 1:
                    groups = [(None, sorted_lengths[-1])]
                else:
                    groups = [(order[b:e], sorted_lengths[e - 1]) for b, e in splits]
                    inverse = torch.argsort(order)
        memo = [*self._plan_memo, (token_ids, token_ids._version, key, groups, inverse)]
        object.__setattr__(self, "_plan_memo", memo[-PLAN_MEMO_SIZE:])
        return groups, inverse

    def plan_repeated(self, token_ids: torch.Tensor, base: torch.Tensor) -> None:
        """Plan ``token_ids``, whose rows are ``base``'s repeated, from ``base``'s plan when that is one
        length for every row (then it is the same; a bucketed plan is made from the lengths as usual)."""
        groups, inverse = self._plan(base)
        if len(groups) == 1 and inverse is None:
            key = (self.bucket, self.bucket_overhead_tokens, self.is_causal)
            memo = [*self._plan_memo, (token_ids, token_ids._version, key, groups, None)]
            object.__setattr__(self, "_plan_memo", memo[-PLAN_MEMO_SIZE:])

    def _encode(
        self,
        embeddings: torch.Tensor,
        token_ids: torch.Tensor,
        deep_prompts: list[torch.Tensor] | None = None,
        injected: tuple[int, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        groups, inverse = self._plan(token_ids)
        if len(groups) == 1:
            return self._run(embeddings, token_ids, groups[0][1], deep_prompts, injected)
        parts = [
            self._run(
                embeddings[rows],
                token_ids[rows],
                length,
                deep_prompts,
                None if injected is None else (injected[0], injected[1][rows]),
            )
            for rows, length in groups
        ]
        return torch.cat(parts)[inverse]

    def _transformer(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None,
        deep_prompts: list[torch.Tensor] | None,
        injected: tuple[int, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The tower's transformer, replacing positions ``1..n`` before layers ``1..len(deep_prompts)``
        and, with ``injected``, before its layer."""
        transformer = self._tower.transformer
        if not deep_prompts and injected is None:
            return transformer(x, attn_mask=attn_mask)
        batch_first = getattr(transformer, "batch_first", True)
        deep_prompts = deep_prompts or []
        for k, block in enumerate(transformer.resblocks):
            if 1 <= k <= len(deep_prompts):
                prompt = deep_prompts[k - 1].to(x.dtype)
                x = _replace_context(x, prompt.unsqueeze(0).expand(x.shape[0], -1, -1))
            if injected is not None and k == injected[0]:
                x = _replace_context(x, injected[1].to(x.dtype))
            if batch_first:
                x = block(x, attn_mask=attn_mask)
            else:
                x = block(x.transpose(0, 1), attn_mask=attn_mask).transpose(0, 1)
        return x

    def _run(
        self,
        embeddings: torch.Tensor,
        token_ids: torch.Tensor,
        length: int,
        deep_prompts: list[torch.Tensor] | None = None,
        injected: tuple[int, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """open_clip's text forward on the first ``length`` positions (all of them when not causal)."""
        tower = self._tower
        cast_dtype = tower.transformer.get_cast_dtype()
        x = embeddings[:, :length].to(cast_dtype)
        token_ids = token_ids[:, :length]
        seq_len = length
        cls_emb = getattr(tower, "cls_emb", None)
        if cls_emb is not None:
            x = torch.cat([x, cls_emb.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)], dim=1)
            seq_len += 1
        attn_mask = tower.attn_mask
        if attn_mask is not None:
            attn_mask = attn_mask[:seq_len, :seq_len]
        if cls_emb is not None or getattr(tower, "use_pad_mask", False):
            pad_mask = tower._build_additive_mask(token_ids, seq_len, x.dtype)
            attn_mask = pad_mask if attn_mask is None else attn_mask.unsqueeze(0) + pad_mask
        x = x + tower.positional_embedding[:seq_len].to(cast_dtype)
        x = self._transformer(x, attn_mask, deep_prompts, injected)
        if cls_emb is not None:
            pooled = tower.ln_final(x[:, -1])
        else:
            pool, eos_id = self._pool()
            pooled = text_global_pool(tower.ln_final(x), token_ids, pool, eos_token_id=eos_id)
        return project_pooled(tower, pooled)
