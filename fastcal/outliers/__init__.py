"""Text outliers for prompt tuning, and DOR (ICML 2025, arXiv 2410.02681).

- ``fastcal.outliers.wordnet``: WordNet 3.0 made readable by nltk (its corpus, or Debian's files).
- ``fastcal.outliers.vocabulary``: ``Vocabulary``, ``wordnet_nouns()``, ``read_word_list(path)``.
- ``fastcal.outliers.bank``: ``OutlierBank``, the frozen text features of every term, cached on disk.
- ``fastcal.outliers.selection``: near-OOD pools (``select_outliers``, ``build_outlier_pool``), the
  class-name exclusion and the ablations (far, random, oracle).
- ``fastcal.outliers.sampling``: ``OutlierSampler``, the per-epoch draw.
- ``fastcal.outliers.dor``: ``DORegularizer``, the ``"dor"`` regularizer of ``fastcal.runs.train``.

The names below are imported on first use, so ``fastcal.outliers.wordnet`` (the set-up command) does
not load torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "OutlierBank": "bank",
    "encode_prompts": "bank",
    "DORegularizer": "dor",
    "build_dor": "dor",
    "dor_weight": "dor",
    "tuned_term_features": "dor",
    "OutlierSampler": "sampling",
    "STRATEGIES": "selection",
    "OutlierPool": "selection",
    "build_outlier_pool": "selection",
    "class_exclusion_mask": "selection",
    "max_class_similarity": "selection",
    "oracle_pool": "selection",
    "select_outliers": "selection",
    "Vocabulary": "vocabulary",
    "load_vocabulary": "vocabulary",
    "read_word_list": "vocabulary",
    "wordnet_nouns": "vocabulary",
    "WordNetNotFoundError": "wordnet",
    "build_nltk_data": "wordnet",
    "ensure_wordnet": "wordnet",
    "open_wordnet": "wordnet",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fastcal.outliers' has no attribute {name!r}")
    return getattr(importlib.import_module(f"fastcal.outliers.{module}"), name)
