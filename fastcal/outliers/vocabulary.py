"""Outlier vocabularies: WordNet 3.0's nouns, or any word list.

DOR ("Understanding and Mitigating Miscalibration in Prompt Tuning for Vision-Language
Models", ICML 2025, arXiv 2410.02681) draws its text outliers from WordNet's nouns. ``wordnet_nouns`` reads
every noun synset through nltk (``wn.all_synsets("n")``) and keeps each lemma name once, underscores
turned into spaces, in the order of first appearance in ``data.noun``: 119,034 terms over 82,115
synsets for WordNet 3.0. It also keeps which terms share a synset (``Vocabulary.synsets``), each
lemma's most frequent sense (``Vocabulary.first_senses``, the first synset ``index.noun`` lists for
it) and the irregular plurals of ``noun.exc`` (``Vocabulary.irregular_plurals``), which the class-name
exclusion of ``fastcal.outliers.selection`` uses.

Reading WordNet through nltk takes about ten seconds; the result is cached as a JSON file under
``default_cache_dir()/wordnet/``, keyed by a digest of the ``data.noun``, ``index.noun`` and
``noun.exc`` files it came from, and read back in a fraction of a second.

DOR's stated limitation is WordNet itself (no medical or non-English terms): ``read_word_list`` takes any
vocabulary, one term per line.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

from fastcal._checks import fail
from fastcal._io import default_cache_dir, exclusive_lock, write_bytes_atomic

WORDNET = "wordnet"
_FORMAT_VERSION = 2
# WordNet vocabularies this process has read, by their cache file as it was (``_file_key``)
_LOADED: dict[tuple[str, int, int], Vocabulary] = {}


class Vocabulary:
    """An ordered list of distinct terms, with optional WordNet structure.

    Args:
        terms: the terms (non-empty strings without line breaks); repeated terms are kept once, at
            their first position.
        name: what the vocabulary is ("wordnet-3.0 nouns", a file name, ...).
        synsets: for a WordNet vocabulary, each noun synset as the indices of its terms.
        first_senses: WordNet lemma (lower case, spaces) -> the index in ``synsets`` of its most frequent
            noun sense.
        irregular_plurals: irregular plural -> its singular forms (WordNet's ``noun.exc``).
    """

    def __init__(
        self,
        terms: Iterable[str],
        *,
        name: str = "terms",
        synsets: Sequence[Sequence[int]] = (),
        first_senses: Mapping[str, int] | None = None,
        irregular_plurals: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        terms = list(terms)
        for i, term in enumerate(terms):
            if type(term) is not str or not term.strip() or "\n" in term or "\r" in term:
                raise fail(f"terms[{i}]", "a non-empty string without line breaks", repr(term)[:100])
        if not terms:
            raise fail("terms", "at least one term", "none")
        self.terms: tuple[str, ...] = tuple(dict.fromkeys(terms))
        self.name = name
        self.synsets: tuple[tuple[int, ...], ...] = tuple(map(tuple, synsets))
        _check_indices("synsets", self.synsets, len(self.terms))
        self.first_senses: dict[str, int] = dict(first_senses or {})
        senses = list(self.first_senses.values())
        if not all(type(s) is int for s in senses) or (
            senses and not 0 <= min(senses) <= max(senses) < len(self.synsets)
        ):
            lemma, s = next(
                (k, s)
                for k, s in self.first_senses.items()
                if type(s) is not int or not 0 <= s < len(self.synsets)
            )
            raise fail(f"first_senses[{lemma!r}]", f"a synset index in [0, {len(self.synsets)})", repr(s))
        self.irregular_plurals: dict[str, tuple[str, ...]] = {
            plural: tuple(singulars) for plural, singulars in (irregular_plurals or {}).items()
        }

    def __len__(self) -> int:
        return len(self.terms)

    def __repr__(self) -> str:
        return f"Vocabulary({self.name!r}, {len(self)} terms, {len(self.synsets)} synsets)"

    @cached_property
    def digest(self) -> str:
        """SHA-256 of the terms in order (one per line): what a bank of their features is keyed by."""
        return hashlib.sha256("\n".join(self.terms).encode("utf-8")).hexdigest()

    @cached_property
    def index(self) -> dict[str, int]:
        """Term -> its position."""
        return {term: i for i, term in enumerate(self.terms)}

    def subset(self, indices: Iterable[int], *, name: str | None = None) -> Vocabulary:
        """The terms at ``indices`` (in that order) as a vocabulary without WordNet structure."""
        terms = [self.terms[i] for i in indices]
        return Vocabulary(terms, name=name or f"{self.name} subset", irregular_plurals=self.irregular_plurals)


def _check_indices(name: str, groups: Sequence[tuple[int, ...]], n: int) -> None:
    """Every group non-empty, of ints in ``[0, n)``; the error names the first bad group."""
    flat = [i for group in groups for i in group]
    if (
        all(group for group in groups)
        and all(type(i) is int for i in flat)
        and (not flat or (min(flat) >= 0 and max(flat) < n))
    ):
        return
    for g, group in enumerate(groups):
        if not group or any(type(i) is not int or not 0 <= i < n for i in group):
            raise fail(f"{name}[{g}]", f"a non-empty list of indices in [0, {n})", repr(group)[:100])


def read_word_list(path: str | os.PathLike) -> Vocabulary:
    """A vocabulary from a UTF-8 text file: one term per line; blank lines and lines starting with
    ``#`` are skipped, surrounding white space is stripped, repeats are kept once."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"vocabulary: no such file {str(path)!r}")
    terms = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    terms = [t for t in terms if t and not t.startswith("#")]
    if not terms:
        raise fail("vocabulary", f"at least one term in {str(path)!r}", "an empty word list")
    return Vocabulary(terms, name=path.name)


def _source_digest(root: Any) -> str:
    digest = hashlib.sha256()
    for name in ("data.noun", "index.noun", "noun.exc"):
        digest.update(f"{name}\n".encode())
        with root.join(name).open() as stream:
            for block in iter(lambda s=stream: s.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _extract_wordnet_nouns(nltk_data: str | os.PathLike | None, source: str | os.PathLike) -> dict[str, Any]:
    from fastcal.outliers.wordnet import open_wordnet

    reader = open_wordnet(nltk_data, source=source)
    index: dict[str, int] = {}
    synsets = []
    synset_at: dict[int, int] = {}
    for synset in reader.all_synsets("n"):
        members = []
        for lemma in synset.lemma_names():
            term = lemma.replace("_", " ")
            members.append(index.setdefault(term, len(index)))
        synset_at[synset.offset()] = len(synsets)
        synsets.append(sorted(set(members)))
    # index.noun: "lemma pos n_synsets n_pointers [pointers] n_senses n_tagged offset..." (senses in
    # order of frequency); comment lines start with a space.
    first_senses: dict[str, int] = {}
    with reader.open("index.noun") as stream:
        for line in stream:
            if line.startswith(" "):
                continue
            fields = line.split()
            n_synsets, n_pointers = int(fields[2]), int(fields[3])
            first = int(fields[6 + n_pointers])
            if n_synsets > 0 and first in synset_at:
                first_senses[fields[0].replace("_", " ")] = synset_at[first]
    plurals: dict[str, list[str]] = {}
    with reader.open("noun.exc") as stream:
        for line in stream:
            words = [w.replace("_", " ") for w in line.split()]
            if len(words) >= 2:
                plurals.setdefault(words[0], []).extend(words[1:])
    return {
        "terms": list(index),
        "synsets": synsets,
        "first_senses": first_senses,
        "irregular_plurals": plurals,
    }


def wordnet_nouns(
    *,
    nltk_data: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    source: str | os.PathLike | None = None,
) -> Vocabulary:
    """Every WordNet noun lemma (underscores -> spaces), with synsets and irregular plurals.

    WordNet is found (or its nltk_data tree built) by ``fastcal.outliers.wordnet.ensure_wordnet``
    (``nltk_data``, ``source``: see there); the extracted vocabulary is cached in ``cache_dir``
    (default ``default_cache_dir()/wordnet``) keyed by the WordNet files' digest, and kept in memory for
    the process's later calls while that file is unchanged (the same object).
    """
    from fastcal.outliers.wordnet import DEBIAN_WORDNET_DIR, ensure_wordnet

    source = DEBIAN_WORDNET_DIR if source is None else source
    root = ensure_wordnet(nltk_data, source=source)
    digest = _source_digest(root)
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "wordnet"
    path = folder / f"nouns-{digest[:16]}.json"
    key = _file_key(path)
    if key is not None and key in _LOADED:
        return _LOADED[key]
    vocabulary = _read_cached(path, digest)
    if vocabulary is not None:
        _LOADED[key] = vocabulary
        return vocabulary
    with exclusive_lock(path.with_name(path.name + ".lock")):  # one extraction among processes
        vocabulary = _read_cached(path, digest)
        if vocabulary is None:
            data = {"format": _FORMAT_VERSION, "source_digest": digest}
            data.update(_extract_wordnet_nouns(nltk_data, source))
            write_bytes_atomic(path, json.dumps(data, separators=(",", ":")).encode("utf-8"))
            vocabulary = _from_data(data)
    key = _file_key(path)
    if key is not None:
        _LOADED[key] = vocabulary
    return vocabulary


def _file_key(path: Path) -> tuple[str, int, int] | None:
    """The cache file as it is now (path, size, modification time); None when it is missing."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return (str(path.resolve()), stat.st_size, stat.st_mtime_ns)


def _from_data(data: dict[str, Any]) -> Vocabulary:
    return Vocabulary(
        data["terms"],
        name="wordnet nouns",
        synsets=data["synsets"],
        first_senses=data["first_senses"],
        irregular_plurals=data["irregular_plurals"],
    )


def _read_cached(path: Path, digest: str) -> Vocabulary | None:
    """The cached vocabulary, or None when missing, for other WordNet files, or unreadable."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data["format"] != _FORMAT_VERSION or data["source_digest"] != digest:
            return None
        return _from_data(data)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def load_vocabulary(
    spec: str | os.PathLike = WORDNET,
    *,
    nltk_data: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Vocabulary:
    """``"wordnet"`` -> ``wordnet_nouns()``; anything else is a word-list file (``read_word_list``)."""
    if isinstance(spec, str) and spec == WORDNET:
        return wordnet_nouns(nltk_data=nltk_data, cache_dir=cache_dir)
    return read_word_list(spec)
