"""Near-OOD selection: chunked similarity, top-K against a brute-force sort, exclusion rules, ablations."""

import pytest
import torch
import torch.nn.functional as F

from fastcal.outliers.bank import OutlierBank, encode_prompts
from fastcal.outliers.selection import (
    OutlierPool,
    build_outlier_pool,
    class_exclusion_mask,
    excluded_forms,
    max_class_similarity,
    normalize_term,
    noun_forms,
    oracle_pool,
    select_outliers,
)
from fastcal.outliers.vocabulary import Vocabulary, wordnet_nouns


def _random_bank(n_terms=211, dim=13, seed=0):
    generator = torch.Generator().manual_seed(seed)
    vocabulary = Vocabulary([f"term{i}" for i in range(n_terms)])
    features = F.normalize(torch.randn(n_terms, dim, generator=generator), dim=-1)
    return OutlierBank(vocabulary, features, "a photo of a {}.")


def _brute_force_similarity(terms, classes):
    t = F.normalize(terms.double(), dim=-1)
    c = F.normalize(classes.double(), dim=-1)
    return (t @ c.T).max(dim=1).values


@pytest.mark.parametrize("chunk_elements", [1, 7, 10**6])
def test_max_class_similarity_matches_dense_float64(chunk_elements):
    generator = torch.Generator().manual_seed(1)
    terms = torch.randn(97, 11, generator=generator) * 3
    classes = torch.randn(23, 11, generator=generator)
    got = max_class_similarity(terms, classes, chunk_elements=chunk_elements)
    torch.testing.assert_close(got.double(), _brute_force_similarity(terms, classes), atol=1e-6, rtol=0)


def test_max_class_similarity_validates():
    with pytest.raises(ValueError, match="class_features: expected width 4"):
        max_class_similarity(torch.randn(5, 4), torch.randn(3, 5))
    terms = torch.randn(5, 3)
    terms[1, 2] = float("nan")
    terms[3, 0] = float("inf")
    with pytest.raises(ValueError, match=r"term_features: expected finite values .*, got 2 rows"):
        max_class_similarity(terms, torch.randn(3, 3))
    with pytest.raises(ValueError, match="class_features: expected finite"):
        max_class_similarity(torch.randn(5, 3), torch.full((2, 3), float("nan")))


@pytest.mark.parametrize("strategy", ["near", "far"])
def test_top_k_equals_brute_force_sort(strategy):
    bank = _random_bank()
    generator = torch.Generator().manual_seed(2)
    classes = torch.randn(7, 13, generator=generator)
    classnames = ["term3", "term10", "cat", "dog", "fish", "bird", "term200s"]
    pool = select_outliers(bank, classes, classnames, k=37, strategy=strategy)

    similarity = _brute_force_similarity(bank.features, classes)
    order = sorted(range(len(bank)), key=lambda i: float(similarity[i]), reverse=strategy == "near")
    # term3, term10 and term200 (singular of "term200s") name classes.
    expected = [i for i in order if i not in (3, 10, 200)][:37]
    assert list(pool.terms) == [f"term{i}" for i in expected]
    torch.testing.assert_close(pool.features, bank.features[expected])
    torch.testing.assert_close(pool.similarity.double(), similarity[expected], atol=1e-6, rtol=0)
    assert pool.strategy == strategy
    assert len(pool) == 37


def test_pool_size_is_capped_by_the_terms_left():
    bank = _random_bank(n_terms=9)
    pool = select_outliers(bank, torch.randn(2, 13), ["term0", "term1"], k=5000)
    assert len(pool) == 7
    assert not {"term0", "term1"} & set(pool.terms)
    with pytest.raises(ValueError, match="every term names a class"):
        select_outliers(_random_bank(n_terms=1), torch.randn(1, 13), ["term0"])


def test_random_strategy_is_seeded_and_excludes_class_names():
    bank = _random_bank()
    classes = torch.randn(3, 13)
    a = select_outliers(bank, classes, ["term1", "term2", "term3"], k=50, strategy="random", seed=4)
    b = select_outliers(bank, classes, ["term1", "term2", "term3"], k=50, strategy="random", seed=4)
    c = select_outliers(bank, classes, ["term1", "term2", "term3"], k=50, strategy="random", seed=5)
    assert a.terms == b.terms
    assert a.terms != c.terms
    assert len(set(a.terms)) == 50
    assert not {"term1", "term2", "term3"} & set(a.terms)
    similarity = _brute_force_similarity(bank.features, classes)
    index = [int(t[4:]) for t in a.terms]
    torch.testing.assert_close(a.similarity.double(), similarity[index], atol=1e-6, rtol=0)


def test_selection_validates():
    bank = _random_bank()
    with pytest.raises(ValueError, match="strategy: expected one of 'near', 'far', 'random'"):
        select_outliers(bank, torch.randn(2, 13), ["a", "b"], strategy="oracle")
    with pytest.raises(ValueError, match="classnames: expected length 3"):
        select_outliers(bank, torch.randn(3, 13), ["a", "b"])
    with pytest.raises(ValueError, match="k: expected an integer >= 1"):
        select_outliers(bank, torch.randn(2, 13), ["a", "b"], k=0)


# ---- exclusion -------------------------------------------------------------------------------------
def test_normalization():
    assert normalize_term("  St._Bernard's ") == "st bernards"
    assert normalize_term("T-Shirt") == "t shirt"
    assert normalize_term("Golden   Retriever") == "golden retriever"


@pytest.mark.parametrize(
    ("term", "classes"),
    [
        ("dog", ["dog"]),
        ("dog", ["dogs"]),
        ("dogs", ["dog"]),
        ("Dog", ["DOG"]),
        ("golden retrievers", ["golden_retriever"]),
        ("bus", ["buses"]),
        ("buses", ["bus"]),
        ("churches", ["church"]),
        ("berries", ["berry"]),
        ("firemen", ["fireman"]),
        ("t shirt", ["T-shirt"]),
    ],
)
def test_terms_naming_a_class_are_excluded(term, classes):
    vocabulary = Vocabulary([term, "wolf", "cat food"])
    assert class_exclusion_mask(vocabulary, classes).tolist() == [True, False, False]


@pytest.mark.parametrize(
    ("term", "classes"), [("dog", ["hot dog"]), ("cat", ["cat food"]), ("bus", ["bust"])]
)
def test_related_but_different_terms_are_kept(term, classes):
    assert class_exclusion_mask(Vocabulary([term]), classes).tolist() == [False]


def test_wordnet_synonyms_and_irregular_plurals_are_excluded(fake_nltk_data, tmp_path):
    wordnet = wordnet_nouns(nltk_data=fake_nltk_data, cache_dir=tmp_path)

    def excluded_terms(classnames):
        mask = class_exclusion_mask(wordnet, classnames).tolist()
        return {t for t, m in zip(wordnet.terms, mask, strict=True) if m}

    excluded = excluded_terms(["dogs"])
    # dog.n.01, the first sense of "dog": its lemmas go; frank.n.01 (also "dog") stays.
    assert excluded == {"dog", "domestic dog", "Canis familiaris"}
    assert excluded_terms(["Geese", "mice"]) == {"goose", "mouse"}
    # A word-list vocabulary takes WordNet's structure from a separate vocabulary.
    words = Vocabulary(["canis familiaris", "wolf"])
    assert class_exclusion_mask(words, ["dog"], wordnet=wordnet).tolist() == [True, False]
    assert class_exclusion_mask(words, ["dog"]).tolist() == [False, False]
    assert {"church building", "church buildings"} <= excluded_forms(["churches"], wordnet)


def test_noun_forms_both_ways():
    assert {"box", "boxes"} <= noun_forms("box")
    assert "box" in noun_forms("boxes")
    assert {"goose", "geese"} <= noun_forms("goose", {"geese": ["goose"]})
    assert "goose" in noun_forms("Geese", {"geese": ["goose"]})


# ---- oracle and the end-to-end builder -------------------------------------------------------------
def test_oracle_pool_uses_the_new_class_names(tiny_clip):
    model, tokenizer = tiny_clip
    template = "a photo of a {}."
    base = encode_prompts(model, tokenizer, [template.format(c) for c in ["cat", "dog"]], progress=False)
    pool = oracle_pool(model, tokenizer, ["wolf", "fox", "wolf"], template, base)
    assert pool.terms == ("wolf", "fox")
    assert pool.strategy == "oracle"
    expected = encode_prompts(model, tokenizer, [template.format(t) for t in pool.terms], progress=False)
    torch.testing.assert_close(pool.features, expected)
    torch.testing.assert_close(pool.similarity, (expected @ base.T).max(dim=1).values, atol=1e-6, rtol=0)


def test_build_outlier_pool_end_to_end(tiny_clip, tmp_path):
    model, tokenizer = tiny_clip
    vocabulary = Vocabulary(["wolf", "fox", "cats", "hyena", "toaster", "dog", "coyote", "jackal", "kettle"])
    classnames = ["cat", "dog"]
    pool = build_outlier_pool(
        model,
        tokenizer,
        classnames,
        "a photo of a {}.",
        vocabulary=vocabulary,
        k=4,
        cache_dir=tmp_path,
        progress=False,
    )
    assert len(pool) == 4
    assert not {"cats", "dog"} & set(pool.terms)
    assert list(tmp_path.joinpath("outliers").glob("bank-*.safetensors"))
    assert list(tmp_path.joinpath("features").rglob("*.safetensors"))
    assert pool.similarity.tolist() == sorted(pool.similarity.tolist(), reverse=True)
    oracle = build_outlier_pool(
        model,
        tokenizer,
        classnames,
        "a photo of a {}.",
        strategy="oracle",
        oracle_classnames=["wolf", "fox"],
        cache_dir=tmp_path,
    )
    assert oracle.terms == ("wolf", "fox")
    with pytest.raises(ValueError, match="oracle_classnames: expected the new class names"):
        build_outlier_pool(
            model, tokenizer, classnames, "a photo of a {}.", strategy="oracle", cache_dir=tmp_path
        )


def test_pool_validation():
    with pytest.raises(ValueError, match="features: expected rows 2 to match terms"):
        OutlierPool(("a", "b"), torch.randn(3, 4), torch.randn(2), "near")
    with pytest.raises(ValueError, match="strategy: expected one of"):
        OutlierPool(("a",), torch.randn(1, 4), torch.randn(1), "nearest")
