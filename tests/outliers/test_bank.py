"""The outlier bank: exact length-sorted encoding, the on-disk cache, rebuilds on corruption or change."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

import fastcal.outliers.bank as bank_module
from fastcal.outliers.bank import OutlierBank, encode_prompts
from fastcal.outliers.vocabulary import Vocabulary

TEMPLATE = "a photo of a {}."
# Mixed lengths (one to many BPE tokens), an odd count.
TERMS = [
    "dog",
    "domestic dog",
    "Canis familiaris",
    "hot dog",
    "a very long compound noun phrase of the kind wordnet has",
    "wolf",
    "ox",
    "church building",
    "t-shirt",
    "St. Bernard",
    "mouse",
    "autobus",
    "goose",
]


def _reference(model, tokenizer, prompts):
    """CLIP's own full-length text features, normalized, in float64 for comparison."""
    with torch.no_grad():
        return F.normalize(model.encode_text(tokenizer(prompts)).double(), dim=-1)


def test_encode_prompts_equals_full_length_encode_text(tiny_clip):
    model, tokenizer = tiny_clip
    prompts = [TEMPLATE.format(t) for t in TERMS]
    features = encode_prompts(model, tokenizer, prompts, batch_size=4, progress=False)
    assert features.dtype == torch.float32
    assert features.shape == (len(TERMS), model.text_projection.shape[1])
    torch.testing.assert_close(features.double(), _reference(model, tokenizer, prompts), atol=2e-6, rtol=0)
    torch.testing.assert_close(features.norm(dim=1), torch.ones(len(TERMS)))


def test_encode_prompts_validates():
    with pytest.raises(ValueError, match="prompts: expected a non-empty list"):
        encode_prompts(torch.nn.Linear(1, 1), lambda x: x, [])


def test_bank_round_trip(tiny_clip, tmp_path, monkeypatch):
    model, tokenizer = tiny_clip
    vocabulary = Vocabulary(TERMS)
    built = OutlierBank.build(model, tokenizer, vocabulary, TEMPLATE, cache_dir=tmp_path, progress=False)
    assert built.path.is_file() and built.path.parent == tmp_path
    assert built.terms == tuple(TERMS)
    torch.testing.assert_close(
        built.features.double(),
        _reference(model, tokenizer, [TEMPLATE.format(t) for t in TERMS]),
        atol=2e-6,
        rtol=0,
    )

    def refuse(*args, **kwargs):
        raise AssertionError("a warm bank must not be encoded again")

    monkeypatch.setattr(bank_module, "encode_prompts", refuse)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = OutlierBank.build(model, tokenizer, vocabulary, TEMPLATE, cache_dir=tmp_path, progress=False)
    assert torch.equal(loaded.features, built.features)
    assert loaded.path == built.path


def test_corrupt_bank_is_rebuilt(tiny_clip, tmp_path):
    model, tokenizer = tiny_clip
    vocabulary = Vocabulary(TERMS)
    built = OutlierBank.build(model, tokenizer, vocabulary, TEMPLATE, cache_dir=tmp_path, progress=False)
    expected = built.features.clone()
    raw = bytearray(built.path.read_bytes())
    raw[-7] ^= 0xFF
    built.path.write_bytes(bytes(raw))
    with pytest.warns(UserWarning, match="stale or corrupt"):
        rebuilt = OutlierBank.build(
            model, tokenizer, vocabulary, TEMPLATE, cache_dir=tmp_path, progress=False
        )
    assert torch.equal(rebuilt.features, expected)


def test_changed_model_template_or_terms_rebuild(tiny_clip, tmp_path):
    model, tokenizer = tiny_clip
    vocabulary = Vocabulary(TERMS)
    first = OutlierBank.build(model, tokenizer, vocabulary, TEMPLATE, cache_dir=tmp_path, progress=False)

    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.text_projection.mul_(1.5).add_(0.01)
    other_model = OutlierBank.build(
        changed, tokenizer, vocabulary, TEMPLATE, cache_dir=tmp_path, progress=False
    )
    assert other_model.path != first.path
    assert not torch.allclose(other_model.features, first.features)
    torch.testing.assert_close(
        other_model.features.double(),
        _reference(changed, tokenizer, [TEMPLATE.format(t) for t in TERMS]),
        atol=2e-6,
        rtol=0,
    )

    other_template = OutlierBank.build(
        model, tokenizer, vocabulary, "a drawing of a {}.", cache_dir=tmp_path, progress=False
    )
    assert other_template.path not in (first.path, other_model.path)

    fewer = OutlierBank.build(
        model, tokenizer, vocabulary.subset(range(5)), TEMPLATE, cache_dir=tmp_path, progress=False
    )
    assert fewer.path != first.path
    torch.testing.assert_close(fewer.features, first.features[:5], atol=2e-6, rtol=0)
    assert len(list(tmp_path.glob("bank-*.safetensors"))) == 4


def test_bank_validation(tiny_clip, tmp_path):
    model, tokenizer = tiny_clip
    vocabulary = Vocabulary(TERMS)
    with pytest.raises(ValueError, match="template: expected a prompt template with exactly one"):
        OutlierBank.build(model, tokenizer, vocabulary, "no slot", cache_dir=tmp_path)
    with pytest.raises(TypeError, match="vocabulary: expected a Vocabulary"):
        OutlierBank.build(model, tokenizer, TERMS, TEMPLATE, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="features: expected 13 rows"):
        OutlierBank(vocabulary, torch.randn(12, 4), TEMPLATE)


def test_given_model_key_matches_the_fingerprint_key(tiny_clip, tmp_path):
    from fastcal.models.fingerprint import model_fingerprint

    model, tokenizer = tiny_clip
    vocabulary = Vocabulary(TERMS[:4])
    first = OutlierBank.build(model, tokenizer, vocabulary, TEMPLATE, cache_dir=tmp_path, progress=False)
    keyed = OutlierBank.build(
        model,
        tokenizer,
        vocabulary,
        TEMPLATE,
        cache_dir=tmp_path,
        progress=False,
        model_key=model_fingerprint(model),
    )
    assert keyed.path == first.path
    other = OutlierBank.build(
        model, tokenizer, vocabulary, TEMPLATE, cache_dir=tmp_path, progress=False, model_key="another model"
    )
    assert other.path != first.path
    with pytest.raises(ValueError, match="model_key: expected a non-empty string"):
        OutlierBank.build(model, tokenizer, vocabulary, TEMPLATE, cache_dir=tmp_path, model_key="")
