"""PromptLearner against independent references on a tiny random-init open_clip CLIP: a context set to
real words' embeddings must give ``model.encode_text`` of the spelled-out prompt (all three class
token positions, unified and class-specific), and a random context the hand-built 77-token forward."""

import pytest
import torch

from fastcal.methods.prompt_learner import PromptLearner
from fastcal.models.text_encoder import TextEncoder

CLASSNAMES = ["dog", "great white shark", "axolotl", "teapot", "stone bridge"]
WORDS = ["a", "photo", "of", "the"]  # one BPE token each
CLASS_WORDS = [
    ["big", "red", "old", "one"],
    ["a", "blurry", "small", "picture"],
    ["my", "dark", "tiny", "cute"],
    ["a", "green", "shiny", "new"],
    ["the", "long", "wet", "grey"],
]


def learner(clip, classnames=CLASSNAMES, **kwargs):
    return PromptLearner(TextEncoder(clip.model), clip.tokenizer, classnames, **kwargs)


def word_embeddings(clip, words):
    ids = clip.tokenizer([" ".join(words)])[0, 1 : 1 + len(words)]
    return clip.model.token_embedding(ids).detach()


def spelled(words, name, position):
    half = len(words) // 2
    if position == "end":
        return " ".join([*words, name]) + "."
    if position == "middle":
        return " ".join([*words[:half], name, *words[half:]]) + "."
    return " ".join([name, *words]) + "."


@pytest.mark.parametrize("position", ["end", "middle", "front"])
@pytest.mark.parametrize("class_specific", [False, True])
def test_word_context_reproduces_encode_text(tiny_clip, position, class_specific):
    pl = learner(tiny_clip, n_ctx=4, class_token_position=position, class_specific=class_specific)
    if class_specific:
        pl.reset_context(torch.stack([word_embeddings(tiny_clip, w) for w in CLASS_WORDS]))
        texts = [spelled(w, name, position) for w, name in zip(CLASS_WORDS, CLASSNAMES, strict=True)]
    else:
        pl.reset_context(word_embeddings(tiny_clip, WORDS))
        texts = [spelled(WORDS, name, position) for name in CLASSNAMES]
    with torch.no_grad():
        expected = tiny_clip.model.encode_text(tiny_clip.tokenizer(texts))
        features = pl()
    torch.testing.assert_close(features, expected, atol=2e-5, rtol=0)
    positions = pl.context_positions
    embeddings = pl.prompt_embeddings()
    for c in range(len(CLASSNAMES)):
        ctx = pl.ctx[c] if class_specific else pl.ctx
        torch.testing.assert_close(embeddings[c, positions[c]], ctx, atol=0, rtol=0)


def test_random_context_matches_hand_built_full_length_prompts(tiny_clip, reference_text, reference_prompts):
    pl = learner(tiny_clip, n_ctx=7)
    with torch.no_grad():
        prompts, ids = reference_prompts(tiny_clip.model, tiny_clip.tokenizer, CLASSNAMES, pl.ctx)
        expected = reference_text(tiny_clip.model, prompts, ids)
        features = pl()
    assert pl.token_ids.shape[1] == int(ids.argmax(-1).max()) + 1 < ids.shape[1]
    torch.testing.assert_close(features, expected, atol=2e-5, rtol=0)


def test_per_sample_contexts_equal_one_at_a_time(tiny_clip):
    for position in ("end", "front"):
        pl = learner(tiny_clip, n_ctx=3, class_token_position=position)
        contexts = torch.randn(4, 3, pl.ctx_dim) * 0.02
        with torch.no_grad():
            batched = pl(contexts)
            one_by_one = torch.stack([pl(c) for c in contexts])
        assert batched.shape == (4, len(CLASSNAMES), 32)
        torch.testing.assert_close(batched, one_by_one, atol=1e-5, rtol=0)
        assert pl.prompt_embeddings(contexts).shape == (4, *pl.prompt_embeddings().shape)
    specific = learner(tiny_clip, n_ctx=2, class_specific=True)
    contexts = torch.randn(3, len(CLASSNAMES), 2, specific.ctx_dim) * 0.02
    with torch.no_grad():
        torch.testing.assert_close(specific(contexts)[1], specific(contexts[1]), atol=1e-5, rtol=0)


def test_encode_terms_uses_the_learned_template(tiny_clip):
    pl = learner(tiny_clip, n_ctx=5, class_token_position="middle")
    terms = ["zebra", "old wooden canoe", "dog"]
    with torch.no_grad():
        expected = learner(tiny_clip, terms, n_ctx=5, class_token_position="middle")
        expected.reset_context(pl.ctx)
        torch.testing.assert_close(pl.encode_terms(terms), expected(), atol=1e-6, rtol=0)
        torch.testing.assert_close(pl.encode_terms(terms[::-1]), expected().flip(0), atol=1e-6, rtol=0)
    loss = pl.encode_terms(terms).square().sum()
    loss.backward()
    assert pl.ctx.grad is not None and pl.ctx.grad.abs().sum() > 0


def test_encode_terms_with_a_shared_prefix_equals_whole_prompts(tiny_clip):
    pl = learner(tiny_clip, n_ctx=5)  # unified context, names at the end: the terms share SOS + context
    terms = ["zebra", "old wooden canoe", "dog", "a very long term with many many tokens in it", "x"]
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        pl.ctx.add_(0.2 * torch.randn(pl.ctx.shape, generator=generator))
    expected = learner(tiny_clip, terms, n_ctx=5)
    expected.reset_context(pl.ctx.detach())
    packed = pl.encode_terms(terms)
    assert pl._term_memo[2] is not False  # packed, and kept for the next call with the same terms
    torch.testing.assert_close(packed, expected(), atol=1e-5, rtol=1e-5)
    weights = torch.randn(packed.shape, generator=generator)
    (grad_packed,) = torch.autograd.grad((packed * weights).sum(), pl.ctx)
    whole = expected.text_encoder.encode_embeddings(
        expected.prompt_embeddings(pl.ctx), expected.token_ids
    )  # the same prompts, whole, differentiated through pl.ctx
    (grad_whole,) = torch.autograd.grad((whole * weights).sum(), pl.ctx)
    torch.testing.assert_close(grad_packed, grad_whole, atol=1e-4, rtol=1e-4)
    # another context, passed explicitly (CoCoOp's mean conditioned context), goes through the same packing
    other = pl.ctx.detach() + 0.1
    expected.reset_context(other)
    with torch.no_grad():
        torch.testing.assert_close(pl.encode_terms(terms, other), expected(), atol=1e-5, rtol=1e-5)


def test_set_classnames_keeps_context_and_state_dict_holds_only_it(tiny_clip):
    pl = learner(tiny_clip, n_ctx=4, class_token_position="front")
    new_names = ["violin", "red fox", "sea_lion"]
    address = pl.ctx.data_ptr()
    pl.set_classnames(new_names)
    assert pl.ctx.data_ptr() == address and pl.classnames == ["violin", "red fox", "sea lion"]
    fresh = learner(tiny_clip, new_names, n_ctx=4, class_token_position="front")
    assert list(fresh.state_dict()) == ["ctx"]
    fresh.load_state_dict(pl.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(pl(), fresh(), atol=0, rtol=0)


def test_reset_context_copies_in_place(tiny_clip):
    pl = learner(tiny_clip, n_ctx=4)
    address = pl.ctx.data_ptr()
    target = torch.randn_like(pl.ctx)
    pl.reset_context(target)
    assert pl.ctx.data_ptr() == address
    torch.testing.assert_close(pl.ctx.detach(), target, atol=0, rtol=0)


def test_phrase_initialization(tiny_clip):
    expected_texts = [f"a photo of a {name}." for name in CLASSNAMES]
    with torch.no_grad():
        expected = tiny_clip.model.encode_text(tiny_clip.tokenizer(expected_texts))
    full = learner(tiny_clip, n_ctx=16, ctx_init="a photo of a")
    assert full.n_ctx == 4 and full.ctx.shape == (4, 64)
    # MaPLe's initialization: the phrase's first two tokens learned, "of a" kept as words.
    partial = learner(tiny_clip, ctx_init="a photo of a", n_learned=2)
    assert partial.n_ctx == 2 and partial.n_fixed_words == 2
    specific = learner(tiny_clip, ctx_init="a photo of a", class_specific=True)
    assert specific.ctx.shape == (len(CLASSNAMES), 4, 64)
    for pl in (full, partial, specific):
        with torch.no_grad():
            torch.testing.assert_close(pl(), expected, atol=2e-5, rtol=0)
    assert torch.equal(full.token_ids, partial.token_ids)


def test_random_initialization_statistics(tiny_clip):
    pl = learner(tiny_clip, n_ctx=16, class_specific=True, init_std=0.02)
    assert pl.ctx.shape == (len(CLASSNAMES), 16, 64)
    ctx = pl.ctx.detach()
    assert abs(float(ctx.std()) - 0.02) < 0.002 and abs(float(ctx.mean())) < 0.002


@pytest.mark.parametrize(
    ("template", "position"),
    [("{}, a type of pet.", "end"), ("person doing {}.", "end"), ("{} texture.", "front")],
)
def test_name_template_puts_dataset_words_around_the_name(tiny_clip, template, position):
    """TCP's tuned prompts: words of the dataset after the context, around the name (the front layout
    moves the name alone before the context)."""
    pl = learner(tiny_clip, n_ctx=4, class_token_position=position, name_template=template)
    pl.reset_context(word_embeddings(tiny_clip, WORDS))
    words = " ".join(WORDS)
    after = template.split("{}")[1]
    texts = [
        f"{words} {template.format(name)}" if position == "end" else f"{name} {words}{after}"
        for name in CLASSNAMES
    ]
    with torch.no_grad():
        torch.testing.assert_close(
            pl(), tiny_clip.model.encode_text(tiny_clip.tokenizer(texts)), atol=2e-5, rtol=0
        )
        # the terms of DOR go through the same template
        torch.testing.assert_close(pl.encode_terms(CLASSNAMES[:2]), pl()[:2], atol=2e-5, rtol=0)


def test_invalid_arguments(tiny_clip):
    with pytest.raises(ValueError, match="class_token_position"):
        learner(tiny_clip, class_token_position="left")
    with pytest.raises(ValueError, match="classnames"):
        learner(tiny_clip, [])
    with pytest.raises(ValueError, match="n_ctx"):
        learner(tiny_clip, n_ctx=0)
    with pytest.raises(ValueError, match="n_learned"):
        learner(tiny_clip, ctx_init="a photo", n_learned=3)
    with pytest.raises(ValueError, match="name_template"):
        learner(tiny_clip, name_template="no name")
    with pytest.raises(ValueError, match="name_template: expected a template starting with the name"):
        learner(tiny_clip, name_template="person doing {}.", class_token_position="middle")
    pl = learner(tiny_clip, n_ctx=4)
    with pytest.raises(ValueError, match="ctx"):
        pl(torch.zeros(4, 63))
    with pytest.raises(ValueError, match="ctx"):
        pl.reset_context(torch.zeros(3, 64))
    specific = learner(tiny_clip, n_ctx=2, class_specific=True)
    with pytest.raises(ValueError, match="classnames"):
        specific.set_classnames(["one", "two"])
    with pytest.raises(ValueError, match="ctx"):
        specific.encode_terms(["zebra"])
    with pytest.raises(TypeError, match="text_encoder"):
        PromptLearner(tiny_clip.model, tiny_clip.tokenizer, CLASSNAMES)
