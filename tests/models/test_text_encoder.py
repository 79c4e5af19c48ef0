"""TextEncoder against open_clip's own ``encode_text`` (the independent reference), on random-init
ViT-B-32, RN50 and tiny custom architectures, forward and backward."""

import itertools
import random

import open_clip
import pytest
import torch
from torch import nn

from fastcal.models import TextEncoder, load_clip
from fastcal.models.text_encoder import bucket_splits

WORDS = (
    "dog",
    "cat",
    "tench",
    "goldfish",
    "great",
    "white",
    "shark",
    "photo",
    "of",
    "a",
    "the",
    "small",
    "red",
)


def _prompts(n, seed, max_words=14):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, max_words))) + "." for _ in range(n)]


@pytest.fixture(scope="module")
def models(tiny_source):
    torch.manual_seed(0)
    built = {
        "ViT-B-32": load_clip("ViT-B-32").model,
        "RN50": load_clip("RN50").model,
        "tiny": load_clip(tiny_source()).model,
        # CustomTextCLIP, Linear projection with bias, feature read at the EOS id (SigLIP-style pooling).
        "tiny-custom-eos": load_clip(
            tiny_source(custom_text=True, proj_bias=True, pool_type="eos", eos_id=49407)
        ).model,
    }
    assert isinstance(built["RN50"].visual, open_clip.modified_resnet.ModifiedResNet)
    assert isinstance(built["tiny-custom-eos"], open_clip.CustomTextCLIP)
    return built


def _tokens(model, prompts):
    return open_clip.tokenize(prompts, context_length=model.context_length)


def _lengths_seen(model):
    """Record the sequence length of every pass through the text transformer."""
    transformer = model.transformer if isinstance(model, open_clip.CLIP) else model.text.transformer
    seen = []
    handle = transformer.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    return seen, handle


MODEL_NAMES = ["ViT-B-32", "RN50", "tiny", "tiny-custom-eos"]


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_encode_equals_encode_text_and_truncates(models, name):
    model = models[name]
    token_ids = _tokens(model, _prompts(7, seed=1))
    longest = int(token_ids.argmax(-1).max()) + 1
    with torch.no_grad():
        reference = model.encode_text(token_ids)
        encoder = TextEncoder(model)
        assert encoder.is_causal
        seen, handle = _lengths_seen(model)
        features = encoder.encode(token_ids)
        handle.remove()
    assert seen == [longest] and longest < token_ids.shape[1]
    torch.testing.assert_close(features, reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_bucketing_gives_the_same_features_in_the_original_order(models, name):
    model = models[name]
    # One prompt longer than the context: the tokenizer cuts it and puts EOT at the last position.
    prompts = [*_prompts(3, seed=2, max_words=6), "word " * 100, *_prompts(2, seed=3)]
    token_ids = _tokens(model, prompts)
    with torch.no_grad():
        reference = model.encode_text(token_ids)
        seen, handle = _lengths_seen(model)
        bucketed = TextEncoder(model, bucket=True, bucket_overhead_tokens=0).encode(token_ids)
        handle.remove()
    assert len(seen) > 2 and max(seen) == token_ids.shape[1]
    torch.testing.assert_close(bucketed, reference, atol=1e-5, rtol=0)


def _text_parameters(model):
    if isinstance(model, open_clip.CLIP):
        return {n: p for n, p in model.named_parameters() if not n.startswith("visual.")}
    return dict(model.text.named_parameters(prefix="text"))


def _assert_close_to_scale(actual, expected, rel=1e-5, msg=""):
    """Max abs difference within ``rel`` of the tensor's largest entry: gradients summed over 12 layers
    reach ~100, and truncated vs full-length float32 differ from a float64 run by the same ~1e-6 of
    that scale (GEMMs of different shapes round differently)."""
    bound = rel * float(expected.abs().max())
    assert float((actual - expected).abs().max()) <= bound, msg


@pytest.mark.parametrize(
    ("name", "bucket"),
    [("ViT-B-32", False), ("RN50", True), ("tiny", False), ("tiny", True), ("tiny-custom-eos", True)],
)
def test_gradients_equal_encode_text(models, name, bucket):
    """Gradients wrt the token embeddings (what a prompt learner trains) and every text parameter."""
    model = models[name]
    token_ids = _tokens(model, _prompts(3, seed=4, max_words=9))
    encoder = TextEncoder(model, bucket=bucket, bucket_overhead_tokens=0)
    weights = torch.randn(token_ids.shape[0], 1024)  # sliced to the feature width
    embedding_module = (
        model.token_embedding if isinstance(model, open_clip.CLIP) else model.text.token_embedding
    )
    params = _text_parameters(model)

    def grads(run):
        model.zero_grad(set_to_none=True)
        embeddings = embedding_module(token_ids).detach().requires_grad_(True)
        features = run(embeddings)
        (features * weights[:, : features.shape[1]]).sum().backward()
        return embeddings.grad, {n: p.grad.clone() for n, p in params.items() if p.grad is not None}

    # Reference: open_clip's encode_text with our leaf embeddings injected through a forward hook.
    def reference(embeddings):
        handle = embedding_module.register_forward_hook(lambda module, args, output: embeddings)
        try:
            return model.encode_text(token_ids)
        finally:
            handle.remove()

    ref_embedding_grad, ref_param_grads = grads(reference)
    embedding_grad, param_grads = grads(lambda e: encoder.encode_embeddings(e, token_ids))
    model.zero_grad(set_to_none=True)
    assert ref_embedding_grad.abs().sum() > 0
    _assert_close_to_scale(embedding_grad, ref_embedding_grad)
    assert param_grads.keys() == ref_param_grads.keys() and len(param_grads) > 10
    for n in param_grads:
        _assert_close_to_scale(param_grads[n], ref_param_grads[n], msg=n)


def test_encode_embeddings_with_injected_context_matches_full_forward(models):
    """CoOp-style: learned context vectors replace the "X" placeholders."""
    model = models["tiny"]
    encoder = TextEncoder(model)
    token_ids = _tokens(model, ["X X X X " + c + "." for c in ("tench", "great white shark", "cat")])
    context = torch.randn(4, model.token_embedding.weight.shape[1], requires_grad=True)
    embeddings = encoder.token_embedding(token_ids).detach()
    prompts = torch.cat([embeddings[:, :1], context.expand(3, -1, -1), embeddings[:, 5:]], dim=1)

    def reference():
        handle = model.token_embedding.register_forward_hook(lambda module, args, output: prompts)
        try:
            return model.encode_text(token_ids)
        finally:
            handle.remove()

    (expected_grad,) = torch.autograd.grad(reference().square().sum(), context)
    features = encoder.encode_embeddings(prompts, token_ids)
    (grad,) = torch.autograd.grad(features.square().sum(), context)
    torch.testing.assert_close(features, reference(), atol=1e-5, rtol=0)
    _assert_close_to_scale(grad, expected_grad)


@pytest.mark.parametrize(("layer", "bucket"), [(0, False), (1, False), (1, True)])
def test_injected_tokens_replace_the_context_before_their_layer(models, layer, bucket):
    """TCP-style: per-row tokens replace positions 1..n before one layer (a pre-hook on that layer of
    open_clip's full-length forward is the reference), in the rows' order whatever the buckets."""
    model = models["tiny"]
    assert model.transformer.batch_first
    encoder = TextEncoder(model, bucket=bucket, bucket_overhead_tokens=0)
    names = ("tench", "great white shark and a very long name", "cat", "stone bridge over the river")
    token_ids = _tokens(model, ["X X X " + c + "." for c in names])
    generator = torch.Generator().manual_seed(2)
    tokens = torch.randn(4, 3, 64, generator=generator, requires_grad=True)
    embeddings = encoder.token_embedding(token_ids).detach()

    def replace(module, args):
        x = args[0]
        return (torch.cat([x[:, :1], tokens, x[:, 4:]], dim=1), *args[1:])

    handle = model.transformer.resblocks[layer].register_forward_pre_hook(replace)
    try:
        expected = model.encode_text(token_ids)
    finally:
        handle.remove()
    (expected_grad,) = torch.autograd.grad(expected.square().sum(), tokens)
    features = encoder.encode_embeddings(embeddings, token_ids, injected=(layer, tokens))
    (grad,) = torch.autograd.grad(features.square().sum(), tokens)
    torch.testing.assert_close(features, expected, atol=1e-5, rtol=0)
    _assert_close_to_scale(grad, expected_grad)
    with pytest.raises(ValueError, match="injected: expected a layer in"):
        encoder.encode_embeddings(embeddings, token_ids, injected=(2, tokens))
    with pytest.raises(ValueError, match="injected tokens: expected shape"):
        encoder.encode_embeddings(embeddings, token_ids, injected=(1, tokens[:2]))


def test_non_causal_mask_falls_back_to_full_length(tiny_source):
    model = load_clip(tiny_source()).model
    token_ids = _tokens(model, _prompts(4, seed=5, max_words=5))
    with torch.no_grad():
        causal = model.encode_text(token_ids)
        model.attn_mask = torch.zeros_like(model.attn_mask)  # every position sees every other
        reference = model.encode_text(token_ids)
        encoder = TextEncoder(model, bucket=True)
        seen, handle = _lengths_seen(model)
        features = encoder.encode(token_ids)
        handle.remove()
    assert not encoder.is_causal and seen == [token_ids.shape[1]]
    assert not torch.allclose(reference, causal, atol=1e-3)
    torch.testing.assert_close(features, reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "overrides",
    [
        {"custom_text": True, "no_causal_mask": True},  # bidirectional tower: attn_mask is None
        {"custom_text": True, "embed_cls": True},  # CoCa-style class token appended after the prompt
    ],
    ids=["no-causal-mask", "appended-cls-token"],
)
def test_towers_where_truncation_is_not_exact_run_full_length(tiny_source, overrides):
    model = load_clip(tiny_source(**overrides)).model
    token_ids = _tokens(model, _prompts(4, seed=6, max_words=5))
    encoder = TextEncoder(model)
    with torch.no_grad():
        seen, handle = _lengths_seen(model)
        features = encoder.encode(token_ids)
        handle.remove()
        reference = model.encode_text(token_ids)
        from_embeddings = encoder.encode_embeddings(encoder.token_embedding(token_ids), token_ids)
    assert not encoder.is_causal
    assert seen == [token_ids.shape[1] + (1 if overrides.get("embed_cls") else 0)]
    torch.testing.assert_close(features, reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(from_embeddings, reference, atol=1e-5, rtol=0)


def test_bare_text_transformer_with_padding_mask():
    tower = open_clip.transformer.TextTransformer(
        context_length=16, width=32, heads=2, layers=2, output_dim=8, no_causal_mask=True, use_pad_mask=True
    ).eval()
    token_ids = open_clip.tokenize(["a dog.", "a photo of a cat."], context_length=16)
    encoder = TextEncoder(tower)
    with torch.no_grad():
        features = encoder.encode(token_ids)
        reference = tower(token_ids)
    assert not encoder.is_causal
    torch.testing.assert_close(features, reference, atol=1e-5, rtol=0)


class _OpaqueTextTower(nn.Module):
    """Stands in for a Hugging Face text tower: a module that is not open_clip's TextTransformer."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.EmbeddingBag(49408, 8)

    def forward(self, token_ids):
        return self.embedding(token_ids)


class _OpaqueClip(nn.Module):
    context_length = 77

    def __init__(self):
        super().__init__()
        self.text = _OpaqueTextTower()

    def encode_text(self, token_ids):
        return self.text(token_ids)


def test_other_text_towers_go_through_encode_text():
    model = _OpaqueClip()
    token_ids = open_clip.tokenize(["a dog.", "a cat"])
    encoder = TextEncoder(model)
    assert not encoder.is_causal
    torch.testing.assert_close(encoder.encode(token_ids), model.encode_text(token_ids))
    with pytest.raises(ValueError, match="encode_embeddings: expected an open_clip text transformer"):
        encoder.encode_embeddings(torch.randn(2, 77, 8), token_ids)
    with pytest.raises(TypeError, match="model: expected an open_clip CLIP"):
        TextEncoder(nn.Linear(2, 2))


def test_low_precision_follows_encode_text(tiny_source):
    model = load_clip(tiny_source(), precision="bf16").model
    token_ids = _tokens(model, _prompts(6, seed=7, max_words=8))
    with torch.no_grad():
        features = TextEncoder(model, bucket=True, bucket_overhead_tokens=0).encode(token_ids)
        reference = model.encode_text(token_ids)
    assert features.dtype == reference.dtype == torch.bfloat16
    torch.testing.assert_close(features.float(), reference.float(), atol=2e-2, rtol=2e-2)


def test_holds_references_not_copies(tiny_source):
    model = load_clip(tiny_source()).model
    encoder = TextEncoder(model)
    assert encoder.state_dict() == {} and list(encoder.parameters()) == []
    token_ids = _tokens(model, ["a photo of a dog."])
    with torch.no_grad():
        model.transformer.resblocks[0].mlp.c_fc.weight.mul_(2.0)
        model.double()
        features = encoder.encode(token_ids)
        reference = model.encode_text(token_ids)
    assert features.dtype == torch.float64
    torch.testing.assert_close(features, reference, atol=1e-10, rtol=0)


def test_eot_positions_and_plan_reuse(models):
    model = models["tiny"]
    encoder = TextEncoder(model)
    token_ids = _tokens(model, ["a dog.", "a photo of a cat.", "x"])
    expected = torch.tensor([row.index(49407) for row in token_ids.tolist()])
    assert torch.equal(encoder.eot_positions(token_ids), expected)
    eos_encoder = TextEncoder(models["tiny-custom-eos"])
    assert torch.equal(eos_encoder.eot_positions(token_ids), expected)
    with torch.no_grad():
        first = encoder.encode(token_ids)
        token_ids[0, 1] = 49406  # edited in place: the cached plan must not be reused blindly
        second = encoder.encode(token_ids)
        torch.testing.assert_close(second, model.encode_text(token_ids), atol=1e-5, rtol=0)
    assert not torch.equal(first[0], second[0])


def test_invalid_inputs_are_rejected(models):
    encoder = TextEncoder(models["tiny"])
    with pytest.raises(ValueError, match="token_ids: expected a 2-D tensor"):
        encoder.encode(torch.zeros(24, dtype=torch.long))
    with pytest.raises(ValueError, match="token_ids: expected an integer tensor"):
        encoder.encode(torch.zeros(2, 24))
    with pytest.raises(ValueError, match="token_ids: expected at most 24 positions"):
        encoder.encode(torch.zeros(2, 30, dtype=torch.long))
    token_ids = torch.zeros(2, 24, dtype=torch.long)
    with pytest.raises(ValueError, match="embeddings: expected width 64"):
        encoder.encode_embeddings(torch.randn(2, 24, 65), token_ids)
    with pytest.raises(ValueError, match="embeddings: expected shape"):
        encoder.encode_embeddings(torch.randn(3, 24, 64), token_ids)
    with pytest.raises(TypeError, match="bucket: expected a bool"):
        TextEncoder(models["tiny"], bucket=1)


def _brute_force_cost(lengths, width, overhead):
    best = float("inf")
    n = len(lengths)
    for cuts in itertools.product([False, True], repeat=n - 1):
        bounds = [0] + [i + 1 for i, c in enumerate(cuts) if c] + [n]
        cost = sum(
            (e - b) * lengths[e - 1] * (1 + lengths[e - 1] / (6 * width)) + overhead
            for b, e in itertools.pairwise(bounds)
        )
        best = min(best, cost)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_bucket_splits_are_optimal(seed):
    rng = random.Random(seed)
    lengths = sorted(rng.randint(3, 77) for _ in range(rng.randint(1, 11)))
    width, overhead = 512, rng.choice([0, 50, 400, 5000])
    splits = bucket_splits(lengths, width, overhead)
    assert splits[0][0] == 0 and splits[-1][1] == len(lengths)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(splits))
    cost = sum((e - b) * lengths[e - 1] * (1 + lengths[e - 1] / (6 * width)) + overhead for b, e in splits)
    assert cost == pytest.approx(_brute_force_cost(lengths, width, overhead))
