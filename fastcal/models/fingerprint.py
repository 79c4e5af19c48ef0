"""Content fingerprints that key the feature caches: a model's weights, a transform's settings.

``model_fingerprint`` is the SHA-256 over every parameter and buffer (registration order): its name,
shape, dtype and raw bytes. Equal weights give equal fingerprints whatever the device; any changed value
changes it. Hashing costs one pass over the weights (about a second for ViT-B/32 on CPU); it is not
memoized, because some in-place updates (fused optimizers, ``.data`` writes) leave ``Tensor._version``
alone and a stale fingerprint would silently reuse features of other weights. Call it once per run.
"""

from __future__ import annotations

import hashlib
import inspect
import itertools
from typing import Any

import torch
from torch import nn


def _named_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return list(
        itertools.chain(
            model.named_parameters(remove_duplicate=False), model.named_buffers(remove_duplicate=False)
        )
    )


def model_fingerprint(model: nn.Module) -> str:
    """Hex SHA-256 of the names, shapes, dtypes and values of ``model``'s parameters and buffers."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in _named_tensors(model):
            digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
            raw = tensor.detach().reshape(-1).contiguous().view(torch.uint8).cpu()
            digest.update(memoryview(raw.numpy()))
    return digest.hexdigest()


def _describe(obj: Any) -> str:
    inner = getattr(obj, "transforms", None)
    if isinstance(inner, (list, tuple)):
        return f"{type(obj).__qualname__}([{', '.join(_describe(t) for t in inner)}])"
    if inspect.isfunction(obj) or inspect.ismethod(obj):
        code = obj.__code__
        body = hashlib.sha256(code.co_code + repr(code.co_consts).encode()).hexdigest()[:12]
        return f"{obj.__module__}.{obj.__qualname__}#{body}"
    return repr(obj)


def transform_fingerprint(transform: Any) -> str:
    """A short digest of a transform's settings (``repr`` of each step; functions by name and code).

    Torchvision transforms print their parameters, so two transforms with the same digest do the same
    thing. A step whose ``repr`` shows only an object address gives a new digest in every process (the
    cache then recomputes, never reuses wrongly); pass your own ``transform_key`` for those.
    """
    return hashlib.sha256(_describe(transform).encode()).hexdigest()[:16]
