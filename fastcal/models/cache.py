"""On-disk caches of frozen features: image features per (model, dataset, transform, epoch), and
class-text features per (model, class names, templates).

When the image encoder is frozen (CoOp, CoCoOp, KgCoOp, ...), every epoch re-encodes the same images,
and encoding dominates the step: the features are computed once and memory-mapped afterwards. Files go
through ``fastcal._io`` (atomic write, checksum, memory-mapped load); the key names everything the
features depend on, so a changed model, dataset, transform or epoch gives a different file, and a
corrupt or stale file is recomputed.

Augmented epochs are reproducible: view ``i`` of epoch ``e`` is produced with torch's, Python's and
NumPy's random generators seeded from ``sha256("fastcal-view:{e}:{i}")`` (inside a forked RNG state,
so the caller's generators are untouched), whatever the batch size, worker count or order of reading.

Class-text features follow CLIP's prompt ensembling (Radford et al. 2021, ``notebooks/Prompt_Engineering
_for_ImageNet.ipynb``): ``t_c = normalize(mean_k normalize(f(template_k(c))))``; one template gives the
normalized hard-prompt feature.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fastcal._checks import check_int, fail
from fastcal._io import cached_tensors, default_cache_dir, key_digest
from fastcal._seeds import derived_seed
from fastcal.data.items import prompt_classname, seeded_generators
from fastcal.models.fingerprint import model_fingerprint
from fastcal.models.text_encoder import TextEncoder

_FORMAT_VERSION = 1


def view_seed(epoch: int | None, index: int) -> int:
    """The seed of view ``index`` in augmentation ``epoch`` (``None``: the eval pass)."""
    return derived_seed(f"fastcal-view:{epoch}:{index}")


class SeededViews(Dataset):
    """``dataset[i]`` drawn with torch's, Python's and NumPy's generators seeded by
    ``view_seed(epoch, i)`` in a forked state (the caller's generators are untouched)."""

    def __init__(self, dataset: Dataset, epoch: int | None) -> None:
        self.dataset = dataset
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        with seeded_generators(view_seed(self.epoch, index)):
            return self.dataset[index]


def _root(cache_dir: str | os.PathLike | None) -> Path:
    return Path(cache_dir) if cache_dir is not None else default_cache_dir() / "features"


def _module_placement(fn: Callable) -> tuple[torch.device, torch.dtype | None]:
    owner = getattr(fn, "__self__", fn)
    if isinstance(owner, nn.Module):
        for p in owner.parameters():
            return p.device, (p.dtype if p.is_floating_point() else None)
    return torch.device("cpu"), None


def image_features(
    encode_image: Callable[[torch.Tensor], torch.Tensor],
    dataset: Dataset,
    *,
    model_key: str,
    transform_key: str,
    epoch: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Image features ``(N, D)`` float32 (unnormalized) and labels ``(N,)`` int64, cached on disk.

    Args:
        encode_image: maps an image batch to features, e.g. ``model.encode_image``. A bound method of
            an ``nn.Module`` gets its batches on that module's device and dtype; anything else gets them
            as the dataset yields them. Run under ``torch.no_grad()``.
        dataset: a map-style dataset of ``(image_tensor, label)`` with ``fingerprint() -> str``
            identifying its images (fastcal's dataset protocol).
        model_key: identifies the encoder, e.g. ``model_fingerprint(model)``.
        transform_key: identifies the dataset's transform, e.g. ``transform_fingerprint(transform)``.
        epoch: ``None`` for the deterministic eval transform; an int for that epoch's augmented views
            (seeded per epoch and index, so the same epoch always gives the same views).
        cache_dir: folder of the cache files (default ``$FASTCAL_CACHE/features``).

    The tensors are memory-mapped from the cache file (copy-on-write): loading costs no copy.
    """
    fingerprint = getattr(dataset, "fingerprint", None)
    if not callable(fingerprint):
        expected = "a dataset with a fingerprint() method (fastcal's dataset protocol)"
        raise fail("dataset", expected, type(dataset).__name__)
    for name, value in (("model_key", model_key), ("transform_key", transform_key)):
        if not isinstance(value, str) or not value:
            raise fail(name, "a non-empty string", repr(value))
    if epoch is not None:
        check_int("epoch", epoch, minimum=0)
    check_int("batch_size", batch_size, minimum=1)
    check_int("num_workers", num_workers, minimum=0)
    if len(dataset) == 0:
        raise fail("dataset", "a non-empty dataset", "0 items")

    key = {
        "kind": "image_features",
        "format": _FORMAT_VERSION,
        "model": model_key,
        "dataset": fingerprint(),
        "size": len(dataset),
        "transform": transform_key,
        "epoch": epoch,
    }
    path = _root(cache_dir) / "image_features" / f"{key_digest(key)}.safetensors"

    def compute() -> dict[str, torch.Tensor]:
        from tqdm.auto import tqdm

        device, dtype = _module_placement(encode_image)
        # Its own generator: DataLoader otherwise draws its worker base seed from the global one.
        loader = DataLoader(
            SeededViews(dataset, epoch),
            batch_size=batch_size,
            num_workers=num_workers,
            generator=torch.Generator(),
        )
        features, labels = [], []
        with torch.no_grad():
            batches = tqdm(loader, desc="image features", disable=not progress, leave=False)
            for images, batch_labels in batches:
                images = images.to(device=device, dtype=dtype if dtype is not None else images.dtype)
                features.append(encode_image(images).float().cpu())
                labels.append(torch.as_tensor(batch_labels, dtype=torch.int64))
        return {"features": torch.cat(features), "labels": torch.cat(labels)}

    tensors = cached_tensors(path, key, compute)
    return tensors["features"], tensors["labels"]


def tokenizer_key(tokenizer: Any) -> str:
    """What identifies a tokenizer in a cache key: its class, context length and vocabulary name."""
    kind = type(tokenizer)
    inner = getattr(tokenizer, "tokenizer", None)
    name = getattr(inner, "name_or_path", "")
    return f"{kind.__module__}.{kind.__qualname__}:{getattr(tokenizer, 'context_length', '')}:{name}"


def zeroshot_class_features(
    model: nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    classnames: Sequence[str],
    templates: str | Sequence[str],
    *,
    batch_size: int = 500,
) -> torch.Tensor:
    """CLIP's zero-shot class features ``(C, D)`` float32 (float64 for a float64 model), L2-normalized, on
    the model's device::

        t_c = normalize(mean_k normalize(encode_text(tokenizer(templates[k].format(name_c)))))

    ``name_c`` is the class name as prompts carry it (``prompt_classname``: underscores become spaces);
    computed with the truncated ``TextEncoder`` (bucketed) in batches of ``batch_size`` prompts, without
    gradients. ``class_text_features`` is the same, cached on disk.
    """
    classnames, templates = _check_class_prompts(classnames, templates)
    check_int("batch_size", batch_size, minimum=1)
    encoder = TextEncoder(model, bucket=True)
    names = [prompt_classname(c) for c in classnames]
    total = None
    with torch.no_grad():
        for template in templates:
            prompts = [template.format(c) for c in names]
            chunks = [
                encoder.encode(tokenizer(prompts[i : i + batch_size]))
                for i in range(0, len(prompts), batch_size)
            ]
            chunks = [chunk.to(torch.promote_types(chunk.dtype, torch.float32)) for chunk in chunks]
            normalized = F.normalize(torch.cat(chunks), dim=-1)
            total = normalized if total is None else total + normalized
    return F.normalize(total / len(templates), dim=-1)


def _check_class_prompts(
    classnames: Sequence[str], templates: str | Sequence[str]
) -> tuple[list[str], list[str]]:
    if isinstance(templates, str):
        templates = [templates]
    if isinstance(classnames, str) or not classnames or not all(isinstance(c, str) for c in classnames):
        raise fail("classnames", "a non-empty list of strings", repr(classnames)[:200])
    if not templates or not all(isinstance(t, str) and "{}" in t for t in templates):
        expected = "a template string or a non-empty list of them, each with a '{}'"
        raise fail("templates", expected, repr(templates)[:200])
    return list(classnames), list(templates)


def class_text_features(
    model: nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    classnames: Sequence[str],
    templates: str | Sequence[str],
    *,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 500,
    model_key: str | None = None,
) -> torch.Tensor:
    """``zeroshot_class_features`` cached on disk, on the CPU.

    Keyed by ``model_fingerprint(model)`` (or ``model_key``, when the caller has hashed the weights
    already), the tokenizer, the class names as prompts carry them and the templates.
    """
    classnames, templates = _check_class_prompts(classnames, templates)
    check_int("batch_size", batch_size, minimum=1)
    if model_key is not None and (not isinstance(model_key, str) or not model_key):
        raise fail("model_key", "a non-empty string (model_fingerprint(model)) or None", repr(model_key))
    key = {
        "kind": "class_text_features",
        "format": _FORMAT_VERSION,
        "model": model_key if model_key is not None else model_fingerprint(model),
        "tokenizer": tokenizer_key(tokenizer),
        "classnames": [prompt_classname(c) for c in classnames],
        "templates": templates,
    }
    path = _root(cache_dir) / "class_text_features" / f"{key_digest(key)}.safetensors"

    def compute() -> dict[str, torch.Tensor]:
        features = zeroshot_class_features(model, tokenizer, classnames, templates, batch_size=batch_size)
        return {"features": features.cpu()}

    return cached_tensors(path, key, compute)["features"]
