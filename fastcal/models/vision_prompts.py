"""Deep visual prompts: an open_clip ``VisionTransformer`` forward with learned tokens in the sequence.

Deep visual prompt tuning (VPT-deep, Jia et al., ECCV 2022) as the CLIP prompt-learning code runs it
(github.com/muzairkhattak/multimodal-prompt-learning, ``clip/model.py``: ``VisionTransformer`` with
``VPT_shallow`` and ``ResidualAttentionBlock_IVLP`` / ``_MaPLe``). With ``n`` prompt tokens per layer
and prompts ``P_0 .. P_{d-1}`` (each ``(n, width)``, or ``(B, n, width)`` per image)::

    x = [CLS; patch embeddings] + positions          (open_clip's patch embedding, patch dropout)
    x = ln_pre([x; P_0])                              prompts appended after the patches
    for layer k = 0 .. L-1:
        if 1 <= k < d: x = [x[:, :-n]; P_k]          the previous layer's prompt outputs are replaced
        x = block_k(x)
    feature = pool(x[:, :-n]) @ proj                  CLS token (open_clip's ``_pool``, ``ln_post``)

Layers from ``d`` on carry the outputs of the last prompts along, as the reference does. The prompt
tokens are dropped before pooling, which changes nothing for CLS pooling and keeps mean pooling over
the patches. Everything else is open_clip's own modules, so the result with ``d`` prompts equals the
reference's; the frozen weights get no gradient unless they require it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from open_clip.transformer import VisionTransformer, _expand_token
from torch import nn

from fastcal._checks import check_tensor, fail


def vision_tower(model: nn.Module) -> VisionTransformer:
    """The open_clip ``VisionTransformer`` of ``model`` (a CLIP or the tower itself)."""
    tower = model if isinstance(model, VisionTransformer) else getattr(model, "visual", None)
    if not isinstance(tower, VisionTransformer):
        got = type(tower if tower is not None else model).__name__
        raise TypeError(f"model: expected an open_clip CLIP with a VisionTransformer image tower, got {got}")
    return tower


def _expand(prompt: torch.Tensor, batch: int, dtype: torch.dtype) -> torch.Tensor:
    prompt = prompt.to(dtype)
    return prompt.unsqueeze(0).expand(batch, -1, -1) if prompt.ndim == 2 else prompt


def prompted_image_features(
    model: nn.Module, images: torch.Tensor, prompts: Sequence[torch.Tensor]
) -> torch.Tensor:
    """Image features ``(B, D)`` (unnormalized, like ``encode_image``) with deep visual prompts.

    Args:
        model: an open_clip CLIP with a ViT image tower, or the ``VisionTransformer``.
        images: ``(B, 3, H, W)`` preprocessed images.
        prompts: ``d`` tensors, each ``(n, width)`` or ``(B, n, width)``; ``prompts[0]`` enters before
            the first layer, ``prompts[k]`` replaces the prompt tokens before layer ``k`` (``d`` at most
            the number of layers).
    """
    tower = vision_tower(model)
    check_tensor("images", images, ndim=4, floating=True, finite=False)
    blocks = tower.transformer.resblocks
    if not isinstance(prompts, Sequence) or not 1 <= len(prompts) <= len(blocks):
        raise fail("prompts", f"1 to {len(blocks)} prompt tensors (one per layer)", f"{len(prompts)}")
    width = tower.class_embedding.shape[-1]
    batch = images.shape[0]
    n = prompts[0].shape[-2]
    for k, prompt in enumerate(prompts):
        check_tensor(f"prompts[{k}]", prompt, ndim=(2, 3), floating=True, finite=False)
        if prompt.shape[-2:] != (n, width) or (prompt.ndim == 3 and prompt.shape[0] != batch):
            raise fail(
                f"prompts[{k}]", f"shape ({n}, {width}) or ({batch}, {n}, {width})", tuple(prompt.shape)
            )

    x = tower.conv1(images.to(tower.conv1.weight.dtype))
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    x = torch.cat([_expand_token(tower.class_embedding, batch).to(x.dtype), x], dim=1)
    x = x + tower.positional_embedding.to(x.dtype)
    x = tower.patch_dropout(x)
    x = torch.cat([x, _expand(prompts[0], batch, x.dtype)], dim=1)
    x = tower.ln_pre(x)

    batch_first = getattr(tower.transformer, "batch_first", True)
    for k, block in enumerate(blocks):
        if 1 <= k < len(prompts):
            x = torch.cat([x[:, :-n], _expand(prompts[k], batch, x.dtype)], dim=1)
        if batch_first:
            x = block(x, attn_mask=None)
        else:
            x = block(x.transpose(0, 1), attn_mask=None).transpose(0, 1)

    pooled, _ = tower._pool(x[:, :-n])
    if tower.proj is not None:
        pooled = pooled @ tower.proj
    return pooled


class DeepVisualPrompts(nn.Module):
    """Learned deep visual prompts: ``depth`` x ``n_tokens`` tokens of the tower's width, N(0, std^2)
    (the reference's initialization, std 0.02). ``forward(model, images)`` runs the prompted tower."""

    def __init__(self, model: nn.Module, *, n_tokens: int, depth: int, init_std: float = 0.02) -> None:
        super().__init__()
        tower = vision_tower(model)
        layers = len(tower.transformer.resblocks)
        if not isinstance(n_tokens, int) or isinstance(n_tokens, bool) or n_tokens < 1:
            raise fail("n_tokens", "an integer >= 1", repr(n_tokens))
        if not isinstance(depth, int) or isinstance(depth, bool) or not 1 <= depth <= layers:
            raise fail("depth", f"an integer in [1, {layers}] (the image tower's layers)", repr(depth))
        width = tower.class_embedding.shape[-1]
        device = tower.class_embedding.device
        self.prompts = nn.Parameter(torch.empty(depth, n_tokens, width, device=device).normal_(0.0, init_std))

    def forward(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        return prompted_image_features(model, images, list(self.prompts.unbind(0)))
