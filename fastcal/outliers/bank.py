"""The outlier bank: frozen zero-shot text features of every vocabulary term, encoded once, on disk.

DOR needs, for each outlier term ``o``, its zero-shot feature
``t_o = normalize(f_text(template(o)))`` with the frozen CLIP and the dataset's prompt template; for
WordNet that is 119,034 prompts. ``encode_prompts`` computes them the fast exact way:

1. tokenize every prompt and read each prompt's length (EOT position + 1) off the token ids;
2. sort the prompts by length and encode them in batches of ``batch_size`` in that order, each batch
   through ``fastcal.models.TextEncoder(model, bucket=True)``, which runs the causal text transformer
   only up to the batch's longest EOT (exact: the feature at the EOT never sees later positions) and
   splits a batch of mixed lengths into groups of similar length;
3. scatter the features back to the original order.

"a photo of a {}." with a one-word term is about 8 tokens of CLIP's 77, so a vocabulary costs a
fraction of ``model.encode_text`` at full length (``bench/outlier_bank.py`` measures it).

``OutlierBank.build`` caches the features (float32, unit rows) through ``fastcal._io``: an atomic write,
a checksum, a memory-mapped read (a warm load of the whole WordNet bank maps the file instead of
reading it), recomputed when the file is corrupt or was written for another key. The key is the model
(``model_fingerprint``), the tokenizer, the template and the vocabulary (``Vocabulary.digest``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fastcal._checks import check_int, check_tensor, fail
from fastcal._io import cached_tensors, default_cache_dir, key_digest
from fastcal.models.cache import tokenizer_key
from fastcal.models.fingerprint import model_fingerprint
from fastcal.models.text_encoder import TextEncoder
from fastcal.outliers.vocabulary import Vocabulary

_FORMAT_VERSION = 1


def check_template(template: Any) -> str:
    """A ``str.format`` prompt template with exactly one ``{}``."""
    if not isinstance(template, str) or template.count("{}") != 1:
        raise fail("template", "a prompt template with exactly one '{}'", repr(template)[:200])
    return template


def encode_prompts(
    model: nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    prompts: Sequence[str],
    *,
    batch_size: int = 1024,
    progress: bool = True,
    desc: str = "outlier bank",
) -> torch.Tensor:
    """Frozen text features ``(N, D)`` float32, L2-normalized, of ``prompts`` (in their order).

    Exact truncated encoding in length-sorted batches (module docstring); equal, up to float rounding,
    to ``normalize(model.encode_text(tokenizer(prompts)))``. Runs under ``torch.no_grad()`` on the
    model's device.
    """
    from tqdm.auto import tqdm

    if isinstance(prompts, str) or len(prompts) == 0:
        raise fail("prompts", "a non-empty list of strings", repr(prompts)[:200])
    check_int("batch_size", batch_size, minimum=1)
    encoder = TextEncoder(model, bucket=True)
    token_ids = torch.cat([tokenizer(list(prompts[i : i + 8192])) for i in range(0, len(prompts), 8192)])
    check_tensor("tokenizer output", token_ids, ndim=2, integer=True)
    lengths = encoder.eot_positions(token_ids) + 1
    order = torch.argsort(lengths, stable=True)
    features: torch.Tensor | None = None
    with torch.no_grad():
        starts = range(0, len(prompts), batch_size)
        for begin in tqdm(starts, desc=desc, disable=not progress, leave=False, unit="batch"):
            rows = order[begin : begin + batch_size]
            batch = token_ids[rows]
            batch = batch[:, : int(lengths[rows].max())] if encoder.is_causal else batch
            encoded = encoder.encode(batch).float().cpu()
            if features is None:
                features = torch.empty(len(prompts), encoded.shape[1], dtype=torch.float32)
            features[rows] = encoded
    return F.normalize(features, dim=-1)


class OutlierBank:
    """Frozen unit text features of every term of a vocabulary under one prompt template.

    Attributes:
        vocabulary: the terms (``vocabulary.terms[i]`` is row ``i``).
        features: ``(T, D)`` float32 unit rows, memory-mapped from the cache file when built by
            ``OutlierBank.build``.
        template: the prompt template the terms were encoded with.
        path: the cache file (None for a bank made in memory).
    """

    def __init__(
        self,
        vocabulary: Vocabulary,
        features: torch.Tensor,
        template: str,
        *,
        path: str | os.PathLike | None = None,
    ) -> None:
        if not isinstance(vocabulary, Vocabulary):
            raise TypeError(f"vocabulary: expected a Vocabulary, got {type(vocabulary).__name__}")
        check_tensor("features", features, ndim=2, floating=True, finite=False)
        if features.shape[0] != len(vocabulary):
            raise fail("features", f"{len(vocabulary)} rows (one per term)", features.shape[0])
        self.vocabulary = vocabulary
        self.features = features
        self.template = check_template(template)
        self.path = None if path is None else Path(path)

    @property
    def terms(self) -> tuple[str, ...]:
        return self.vocabulary.terms

    def __len__(self) -> int:
        return len(self.vocabulary)

    def __repr__(self) -> str:
        return (
            f"OutlierBank({self.vocabulary.name!r}, {len(self)} terms, dim {self.features.shape[1]}, "
            f"template={self.template!r})"
        )

    @staticmethod
    def cache_key(
        model: nn.Module,
        tokenizer: Any,
        vocabulary: Vocabulary,
        template: str,
        *,
        model_key: str | None = None,
    ) -> dict[str, Any]:
        """What a bank depends on: the weights (``model_key``, default ``model_fingerprint(model)``),
        the tokenizer, the template and the terms."""
        if model_key is not None and (not isinstance(model_key, str) or not model_key):
            raise fail(
                "model_key", "a non-empty string (e.g. model_fingerprint(model)) or None", repr(model_key)
            )
        return {
            "kind": "outlier_bank",
            "format": _FORMAT_VERSION,
            "model": model_key if model_key is not None else model_fingerprint(model),
            "tokenizer": tokenizer_key(tokenizer),
            "template": check_template(template),
            "vocabulary": vocabulary.digest,
            "size": len(vocabulary),
        }

    @classmethod
    def build(
        cls,
        model: nn.Module,
        tokenizer: Callable[[list[str]], torch.Tensor],
        vocabulary: Vocabulary,
        template: str,
        *,
        cache_dir: str | os.PathLike | None = None,
        batch_size: int = 1024,
        progress: bool = True,
        model_key: str | None = None,
    ) -> OutlierBank:
        """Load the bank of ``vocabulary`` under ``template`` from the cache, or encode and save it.

        Args:
            model: the frozen CLIP (open_clip ``CLIP`` / ``CustomTextCLIP``).
            tokenizer: its tokenizer.
            vocabulary: the terms (``fastcal.outliers.vocabulary``).
            template: the dataset's prompt template, e.g. ``"a photo of a {}."``.
            cache_dir: folder of the bank files (default ``default_cache_dir()/outliers``).
            batch_size: prompts per encoder call.
            progress: show a progress bar while encoding.
            model_key: ``model_fingerprint(model)`` when the caller has it already (hashing the weights
                is the slowest part of a warm load: about 0.3 s for ViT-B/32 on a CPU).
        """
        if not isinstance(vocabulary, Vocabulary):
            raise TypeError(f"vocabulary: expected a Vocabulary, got {type(vocabulary).__name__}")
        check_int("batch_size", batch_size, minimum=1)
        key = cls.cache_key(model, tokenizer, vocabulary, template, model_key=model_key)
        root = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "outliers"
        path = root / f"bank-{key_digest(key)}.safetensors"

        def compute() -> dict[str, torch.Tensor]:
            prompts = [template.format(term) for term in vocabulary.terms]
            features = encode_prompts(model, tokenizer, prompts, batch_size=batch_size, progress=progress)
            return {"features": features}

        tensors = cached_tensors(path, key, compute)
        return cls(vocabulary, tensors["features"], template, path=path)
