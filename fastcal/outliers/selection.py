"""Choosing DOR's outlier pool: near-OOD terms by zero-shot similarity, and the paper's ablations.

DOR ranks every vocabulary term ``o`` by its zero-shot similarity to the task's classes,

    s_o = max_c cos(t_o, t_c)

(``t_o`` the bank feature, ``t_c`` the zero-shot class features under the same template) and keeps the
``k`` (5,000 by default) most similar terms that do not name a class: near-OOD outliers, close to the
decision boundaries. ``max_class_similarity`` computes ``s`` in chunks of terms so the ``(T, C)``
similarity matrix never exists at once (119,034 terms x 1,000 classes would be 476 MB in float32); the
top-``k`` of the ``T`` scores is then one ``torch.topk``.

A term names a class (``class_exclusion_mask``) when, after normalization (case folded; ``_`` and ``-``
as spaces; ``.`` and ``'`` dropped; white space collapsed), it equals one of the class's names: the name
itself, its plural or singular (WordNet's ``morphy`` detachment rules for nouns, ``-s``, ``-ses``,
``-xes``, ``-zes``, ``-ches``, ``-shes``, ``-men``, ``-ies``, their inverses, and the irregular plurals of
``noun.exc``), and, when a WordNet vocabulary is at hand, every lemma of the class's own synset, taken
as the most frequent noun sense of a form that is a WordNet lemma ("dog" also excludes "domestic dog"
and "Canis familiaris", not "hot dog", a lemma of another sense of "dog").

Strategies (the paper's ablation, Table "outlier types"): ``"near"`` (default), ``"far"`` (the ``k``
least similar terms), ``"random"`` (``k`` terms drawn uniformly, seeded) and ``"oracle"`` (the true new
class names, which a real run would not know; ``oracle_pool``).
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fastcal._checks import check_choice, check_int, check_same_size, check_tensor, fail
from fastcal.outliers.bank import OutlierBank, check_template, encode_prompts
from fastcal.outliers.vocabulary import Vocabulary

STRATEGIES = ("near", "far", "random", "oracle")
DEFAULT_POOL_SIZE = 5000
# Similarities computed per chunk of terms: chunk rows x classes <= this many floats (64 MB).
CHUNK_ELEMENTS = 1 << 24

# per-vocabulary results, computed once for each vocabulary object
_NORMALIZED: weakref.WeakKeyDictionary[Vocabulary, tuple[str, ...]] = weakref.WeakKeyDictionary()
_NORMALIZED_SENSES: weakref.WeakKeyDictionary[Vocabulary, dict[str, int]] = weakref.WeakKeyDictionary()

# WordNet's morphy detachment rules for nouns (plural suffix -> singular suffix).
_NOUN_RULES = (("s", ""), ("ses", "s"), ("xes", "x"), ("zes", "z"), ("ches", "ch"), ("shes", "sh"),
               ("men", "man"), ("ies", "y"))  # fmt: skip


@dataclass(frozen=True)
class OutlierPool:
    """The outlier candidates DOR samples from.

    Attributes:
        terms: the candidate terms.
        features: ``(K, D)`` their frozen unit text features (the regularizer's targets ``t_b``).
        similarity: ``(K,)`` each term's max cosine similarity to the classes (sampling weights).
        strategy: how they were chosen (one of ``STRATEGIES``).
    """

    terms: tuple[str, ...]
    features: torch.Tensor
    similarity: torch.Tensor
    strategy: str

    def __post_init__(self) -> None:
        check_tensor("features", self.features, ndim=2, floating=True)
        check_tensor("similarity", self.similarity, ndim=1, floating=True)
        check_same_size("features", self.features.shape[0], "terms", len(self.terms), "rows")
        check_same_size("similarity", self.similarity.shape[0], "terms", len(self.terms), "length")
        check_choice("strategy", self.strategy, STRATEGIES)

    def __len__(self) -> int:
        return len(self.terms)


def normalize_term(term: str) -> str:
    """Case folded, ``_``/``-`` as spaces, ``.`` and ``'`` dropped, white space collapsed."""
    text = term.casefold().replace("_", " ").replace("-", " ").replace(".", "").replace("'", "")
    return " ".join(text.split())


class _Inflections:
    """Singular and plural candidates of normalized nouns: morphy's rules both ways, and irregular
    plurals (``plural -> singulars``) both ways."""

    def __init__(self, irregular_plurals: dict[str, Sequence[str]] | None) -> None:
        self.irregular: dict[str, set[str]] = {}
        for plural, singulars in (irregular_plurals or {}).items():
            plural = normalize_term(plural)
            for singular in map(normalize_term, singulars):
                self.irregular.setdefault(plural, set()).add(singular)
                self.irregular.setdefault(singular, set()).add(plural)

    def forms(self, term: str) -> set[str]:
        base = normalize_term(term)
        forms = {base}
        for plural, singular in _NOUN_RULES:
            if base.endswith(plural) and len(base) > len(plural):
                forms.add(base[: len(base) - len(plural)] + singular)
            if base.endswith(singular):
                forms.add(base[: len(base) - len(singular)] + plural)
        forms |= self.irregular.get(base, set())
        return forms


def noun_forms(term: str, irregular_plurals: dict[str, Sequence[str]] | None = None) -> set[str]:
    """The normalized term with its singular and plural candidates (morphy's noun rules both ways,
    plus irregular plurals ``plural -> singulars`` in either direction)."""
    return _Inflections(irregular_plurals).forms(term)


def excluded_forms(classnames: Iterable[str], wordnet: Vocabulary | None = None) -> set[str]:
    """Every normalized form that counts as naming one of ``classnames`` (module docstring)."""
    inflections = _Inflections(wordnet.irregular_plurals if wordnet is not None else None)
    forms: set[str] = set()
    for name in classnames:
        forms |= inflections.forms(name)
    if wordnet is not None and wordnet.first_senses:
        first_senses = _normalized_first_senses(wordnet)
        synonyms: set[str] = set()
        for form in forms:
            s = first_senses.get(form)
            if s is not None:
                for i in wordnet.synsets[s]:
                    synonyms |= inflections.forms(wordnet.terms[i])
        forms |= synonyms
    return forms


def _normalized_first_senses(wordnet: Vocabulary) -> dict[str, int]:
    senses = _NORMALIZED_SENSES.get(wordnet)
    if senses is None:
        senses = {normalize_term(lemma): s for lemma, s in wordnet.first_senses.items()}
        _NORMALIZED_SENSES[wordnet] = senses
    return senses


def class_exclusion_mask(
    vocabulary: Vocabulary, classnames: Sequence[str], *, wordnet: Vocabulary | None = None
) -> torch.Tensor:
    """``(T,)`` bool, True where the term names one of ``classnames`` (module docstring).

    ``wordnet`` supplies synsets and irregular plurals; by default the vocabulary itself when it has
    WordNet structure.
    """
    if isinstance(classnames, str) or not classnames:
        raise fail("classnames", "a non-empty list of class names", repr(classnames)[:200])
    if wordnet is None and vocabulary.first_senses:
        wordnet = vocabulary
    forms = excluded_forms(classnames, wordnet)
    return torch.tensor([t in forms for t in normalized_terms(vocabulary)], dtype=torch.bool)


def normalized_terms(vocabulary: Vocabulary) -> tuple[str, ...]:
    """``normalize_term`` of every term, computed once per vocabulary object."""
    normalized = _NORMALIZED.get(vocabulary)
    if normalized is None:
        normalized = _NORMALIZED[vocabulary] = tuple(map(normalize_term, vocabulary.terms))
    return normalized


def max_class_similarity(
    term_features: torch.Tensor, class_features: torch.Tensor, *, chunk_elements: int = CHUNK_ELEMENTS
) -> torch.Tensor:
    """``s_o = max_c cos(t_o, t_c)``: ``(T,)`` float32 from ``(T, D)`` terms and ``(C, D)`` classes.

    Computed over chunks of ``max(1, chunk_elements // C)`` terms into one reused buffer, so at most
    ``chunk_elements`` similarities exist at a time. A term's norm is a positive factor of its row, so
    ``max_c cos = (max_c <t_o, t_c / |t_c|>) / |t_o|``: the terms are never normalized copies.
    """
    # Non-finite term features are caught on the (T,) result (NaN and inf propagate into it), not by a
    # pass over the (T, D) features.
    check_tensor("term_features", term_features, ndim=2, floating=True, finite=False)
    check_tensor("class_features", class_features, ndim=2, floating=True)
    check_same_size(
        "class_features", class_features.shape[1], "term_features", term_features.shape[1], "width"
    )
    check_int("chunk_elements", chunk_elements, minimum=1)
    device = term_features.device
    classes_t = F.normalize(class_features.float(), dim=-1).to(device).T.contiguous()
    rows = max(1, chunk_elements // classes_t.shape[1])
    buffer = torch.empty(min(rows, term_features.shape[0]), classes_t.shape[1], device=device)
    out = torch.empty(term_features.shape[0], dtype=torch.float32, device=device)
    norms = torch.empty_like(out)
    for begin in range(0, term_features.shape[0], rows):
        chunk = term_features[begin : begin + rows].float()
        similarities = buffer[: chunk.shape[0]]
        torch.mm(chunk, classes_t, out=similarities)
        out[begin : begin + chunk.shape[0]] = similarities.amax(dim=1)
        norms[begin : begin + chunk.shape[0]] = torch.linalg.vector_norm(chunk, dim=1)
    similarity = out / norms.clamp_min(1e-12)
    if not bool(torch.isfinite(similarity).all()):
        n_bad = int((~torch.isfinite(similarity)).sum())
        raise fail("term_features", "finite values (no NaN or inf)", f"{n_bad} rows with non-finite entries")
    return similarity


def select_outliers(
    bank: OutlierBank,
    class_features: torch.Tensor,
    classnames: Sequence[str],
    *,
    k: int = DEFAULT_POOL_SIZE,
    strategy: str = "near",
    seed: int = 0,
    wordnet: Vocabulary | None = None,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> OutlierPool:
    """The ``k`` outlier candidates of ``bank`` for the classes (``"near"``, ``"far"`` or ``"random"``).

    Args:
        bank: frozen features of the vocabulary (same model and template as ``class_features``).
        class_features: ``(C, D)`` zero-shot class features (e.g. ``fastcal.models.cache.
            class_text_features`` with the bank's template).
        classnames: the ``C`` class names (for the exclusion of terms that name a class).
        k: pool size (fewer when fewer terms remain after exclusion).
        strategy: ``"near"`` (highest similarity), ``"far"`` (lowest) or ``"random"`` (uniform, seeded);
            ``"oracle"`` needs the model: ``oracle_pool``.
        seed: the ``"random"`` draw's seed.
        wordnet: synsets for the exclusion (default: the bank's vocabulary when it is WordNet's).
    """
    if not isinstance(bank, OutlierBank):
        raise TypeError(f"bank: expected an OutlierBank, got {type(bank).__name__}")
    check_choice("strategy", strategy, ("near", "far", "random"))
    check_int("k", k, minimum=1)
    check_int("seed", seed)
    check_same_size("classnames", len(classnames), "class_features", class_features.shape[0], "length")
    similarity = max_class_similarity(bank.features, class_features, chunk_elements=chunk_elements)
    excluded = class_exclusion_mask(bank.vocabulary, classnames, wordnet=wordnet).to(similarity.device)
    n_valid = int((~excluded).sum())
    if n_valid == 0:
        raise fail("bank", "terms that do not name a class", "every term names a class")
    k = min(k, n_valid)
    if strategy == "random":
        generator = torch.Generator().manual_seed(seed)
        valid = torch.nonzero(~excluded.cpu()).squeeze(1)
        indices = valid[torch.randperm(n_valid, generator=generator)[:k]].to(similarity.device)
    else:
        score = similarity if strategy == "near" else -similarity
        indices = score.masked_fill(excluded, float("-inf")).topk(k).indices
    cpu_indices = indices.cpu()
    return OutlierPool(
        terms=tuple(bank.terms[i] for i in cpu_indices.tolist()),
        features=bank.features[cpu_indices].clone(),
        similarity=similarity[indices].cpu(),
        strategy=strategy,
    )


def oracle_pool(
    model: nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    new_classnames: Sequence[str],
    template: str,
    class_features: torch.Tensor,
) -> OutlierPool:
    """The oracle ablation: the true new class names as outliers, with their frozen features and their
    similarity to the (base) ``class_features``."""
    if isinstance(new_classnames, str) or not new_classnames:
        raise fail("new_classnames", "a non-empty list of class names", repr(new_classnames)[:200])
    template = check_template(template)
    terms = tuple(dict.fromkeys(new_classnames))
    features = encode_prompts(model, tokenizer, [template.format(t) for t in terms], progress=False)
    similarity = max_class_similarity(features, class_features)
    return OutlierPool(terms=terms, features=features, similarity=similarity.cpu(), strategy="oracle")


def build_outlier_pool(
    model: nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    classnames: Sequence[str],
    template: str,
    *,
    vocabulary: Vocabulary | None = None,
    strategy: str = "near",
    k: int = DEFAULT_POOL_SIZE,
    seed: int = 0,
    oracle_classnames: Sequence[str] | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    model_key: str | None = None,
) -> OutlierPool:
    """Everything DOR needs before training: zero-shot class features, the bank, the pool.

    ``vocabulary`` defaults to WordNet's nouns (``wordnet_nouns()``); ``oracle_classnames`` (the new
    classes) is required for, and only used by, ``strategy="oracle"``. ``cache_dir`` is fastcal's cache
    root (default ``default_cache_dir()``): class features go to ``features/``, the bank to
    ``outliers/``, the WordNet vocabulary to ``wordnet/``. ``model_key``: ``model_fingerprint(model)``
    when the caller has it (the caches' key; hashing large weights takes a while).
    """
    from fastcal._io import default_cache_dir
    from fastcal.models.cache import class_text_features

    check_choice("strategy", strategy, STRATEGIES)
    template = check_template(template)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    class_features = class_text_features(
        model, tokenizer, list(classnames), template, cache_dir=root / "features", model_key=model_key
    )
    if strategy == "oracle":
        if oracle_classnames is None:
            raise fail("oracle_classnames", "the new class names for strategy 'oracle'", "None")
        return oracle_pool(model, tokenizer, oracle_classnames, template, class_features)
    if vocabulary is None:
        from fastcal.outliers.vocabulary import wordnet_nouns

        vocabulary = wordnet_nouns(cache_dir=root / "wordnet")
    bank = OutlierBank.build(
        model,
        tokenizer,
        vocabulary,
        template,
        cache_dir=root / "outliers",
        progress=progress,
        model_key=model_key,
    )
    return select_outliers(bank, class_features, classnames, k=k, strategy=strategy, seed=seed)
