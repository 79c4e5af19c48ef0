"""Vocabularies: WordNet nouns through nltk (and their cache), word lists, validation."""

import json
from pathlib import Path

import pytest

import fastcal.outliers.wordnet as wordnet_module
from fastcal.outliers.vocabulary import Vocabulary, load_vocabulary, read_word_list, wordnet_nouns

DEBIAN_WORDNET = Path("/usr/share/wordnet")


def test_wordnet_nouns_reads_every_lemma_once(fake_nltk_data, fake_wordnet, tmp_path):
    vocabulary = wordnet_nouns(nltk_data=fake_nltk_data, cache_dir=tmp_path / "cache")
    assert list(vocabulary.terms) == fake_wordnet.EXPECTED_TERMS
    assert len(vocabulary.synsets) == len(fake_wordnet.NOUN_SYNSETS)
    dog = vocabulary.synsets[2]
    assert [vocabulary.terms[i] for i in dog] == ["dog", "domestic dog", "Canis familiaris"]
    # "dog" appears in two synsets but once in the terms; its first sense is dog.n.01.
    frank = [vocabulary.terms[i] for i in vocabulary.synsets[5]]
    assert sorted(frank) == sorted(["frank", "frankfurter", "hotdog", "hot dog", "dog", "wiener"])
    assert vocabulary.first_senses["dog"] == 2
    assert vocabulary.first_senses["canis familiaris"] == 2
    assert vocabulary.irregular_plurals == {"geese": ("goose",), "mice": ("mouse",)}


def test_wordnet_vocabulary_is_cached_and_read_without_nltk(fake_nltk_data, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = wordnet_nouns(nltk_data=fake_nltk_data, cache_dir=cache)
    files = list(cache.glob("nouns-*.json"))
    assert len(files) == 1

    def refuse(*args, **kwargs):
        raise AssertionError("the cached vocabulary should not open WordNet again")

    monkeypatch.setattr(wordnet_module, "open_wordnet", refuse)
    second = wordnet_nouns(nltk_data=fake_nltk_data, cache_dir=cache)
    assert second.terms == first.terms
    assert second.synsets == first.synsets
    assert second.first_senses == first.first_senses
    assert second.digest == first.digest


def test_corrupt_vocabulary_cache_is_rebuilt(fake_nltk_data, fake_wordnet, tmp_path):
    cache = tmp_path / "cache"
    wordnet_nouns(nltk_data=fake_nltk_data, cache_dir=cache)
    (path,) = cache.glob("nouns-*.json")
    path.write_bytes(path.read_bytes()[:100])
    assert list(wordnet_nouns(nltk_data=fake_nltk_data, cache_dir=cache).terms) == fake_wordnet.EXPECTED_TERMS
    json.loads(path.read_text())


def test_changed_wordnet_files_give_a_new_cache_entry(fake_nltk_data, tmp_path):
    cache = tmp_path / "cache"
    wordnet_nouns(nltk_data=fake_nltk_data, cache_dir=cache)
    exceptions = fake_nltk_data / "corpora" / "wordnet" / "noun.exc"
    exceptions.write_text(exceptions.read_text() + "oxen ox\n")
    vocabulary = wordnet_nouns(nltk_data=fake_nltk_data, cache_dir=cache)
    assert vocabulary.irregular_plurals["oxen"] == ("ox",)
    assert len(list(cache.glob("nouns-*.json"))) == 2


@pytest.mark.slow
@pytest.mark.skipif(
    not (DEBIAN_WORDNET / "index.sense").is_file(), reason="Debian's WordNet is not installed"
)
def test_real_wordnet_has_82115_synsets_and_119034_lemmas(tmp_path):
    """WordNet 3.0's counts (nltk: ``len(list(wn.all_synsets("n")))`` = 82,115)."""
    vocabulary = wordnet_nouns(nltk_data=tmp_path / "nltk_data", cache_dir=tmp_path / "cache")
    assert len(vocabulary.synsets) == 82115
    assert len(vocabulary) == 119034
    assert vocabulary.terms[:3] == ("entity", "physical entity", "abstraction")


def test_word_list_skips_blanks_comments_and_repeats(tmp_path):
    path = tmp_path / "medical.txt"
    path.write_text("# a domain vocabulary\n  myocardium \n\nstent\nmyocardium\nC#\n", encoding="utf-8")
    vocabulary = read_word_list(path)
    assert vocabulary.terms == ("myocardium", "stent", "C#")
    assert vocabulary.name == "medical.txt"
    assert vocabulary.synsets == ()
    assert load_vocabulary(path).terms == vocabulary.terms


def test_word_list_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_word_list(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="vocabulary: expected at least one term"):
        read_word_list(empty)


def test_vocabulary_validation():
    with pytest.raises(ValueError, match=r"terms\[1\]: expected a non-empty string"):
        Vocabulary(["a", "  "])
    with pytest.raises(ValueError, match=r"terms\[0\]"):
        Vocabulary(["two\nlines"])
    with pytest.raises(ValueError, match="terms: expected at least one term"):
        Vocabulary([])
    with pytest.raises(ValueError, match=r"synsets\[1\]: expected a non-empty list of indices in \[0, 2\)"):
        Vocabulary(["a", "b"], synsets=[[0, 1], [2]])
    with pytest.raises(ValueError, match=r"synsets\[0\]"):
        Vocabulary(["a", "b"], synsets=[[]])
    with pytest.raises(ValueError, match=r"first_senses\['a'\]: expected a synset index in \[0, 1\)"):
        Vocabulary(["a", "b"], synsets=[[0, 1]], first_senses={"a": 1})


def test_digest_depends_on_terms_and_order():
    a = Vocabulary(["cat", "dog"])
    assert a.digest == Vocabulary(["cat", "dog", "cat"]).digest
    assert a.digest != Vocabulary(["dog", "cat"]).digest
    assert a.digest != Vocabulary(["cat", "dogs"]).digest
    assert a.subset([1]).terms == ("dog",)
    assert a.index == {"cat": 0, "dog": 1}
