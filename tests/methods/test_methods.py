"""Each method's forward against a straightforward composition of open_clip's modules at tiny sizes (full
77-token text forwards, per-image loops as the reference code runs them, hooked image forwards), and a
training step that moves only what the method tunes."""

import pytest
import torch
import torch.nn.functional as F

from fastcal import registry
from fastcal.methods.base import clip_logits, get_method
from fastcal.methods.cocoop import CoCoOp
from fastcal.methods.coop import CoOp
from fastcal.methods.maple import MaPLe
from fastcal.methods.vpt import VPT
from fastcal.models.text_encoder import TextEncoder

CLASSNAMES = ["dog", "great white shark", "axolotl", "teapot", "stone bridge"]


def scaled_cosine(model, image_features, text_features):
    f = F.normalize(image_features.double(), dim=-1)
    t = F.normalize(text_features.double(), dim=-1)
    return model.logit_scale.detach().double().exp() * f @ t.T


def prompted_reference(model, images, prompts):
    """The image tower written out block by block, prompts as the reference inserts them."""
    visual = model.visual
    x = visual.conv1(images).flatten(2).transpose(1, 2)
    x = torch.cat([visual.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + visual.positional_embedding
    n = prompts[0].shape[0]
    x = visual.ln_pre(torch.cat([x, prompts[0].expand(x.shape[0], -1, -1)], dim=1))
    for k, block in enumerate(visual.transformer.resblocks):
        if 1 <= k < len(prompts):
            x = torch.cat([x[:, :-n], prompts[k].expand(x.shape[0], -1, -1)], dim=1)
        x = block(x)
    return visual.ln_post(x[:, 0]) @ visual.proj


def test_coop_with_phrase_context_is_zero_shot(tiny_clip):
    method = CoOp(tiny_clip.model, tiny_clip.tokenizer, CLASSNAMES, ctx_init="a photo of a")
    image_features = torch.randn(6, 32)
    with torch.no_grad():
        text = tiny_clip.model.encode_text(tiny_clip.tokenizer([f"a photo of a {c}." for c in CLASSNAMES]))
        out = method.output(image_features)
    expected = scaled_cosine(tiny_clip.model, image_features, text)
    torch.testing.assert_close(out.logits.double(), expected, atol=1e-4, rtol=1e-5)
    assert out.text_features.shape == (5, 32) and out.image_features.norm(dim=-1).sub(1).abs().max() < 1e-5


def test_coop_encodes_the_shared_prefix_once_with_the_whole_prompts_features(tiny_clip):
    method = CoOp(tiny_clip.model, tiny_clip.tokenizer, CLASSNAMES, n_ctx=4)
    assert method.packed is not None
    assert method.packed.token_rows < len(CLASSNAMES) * method.prompt_learner.token_ids.shape[1]
    generator = torch.Generator().manual_seed(3)
    ctx = method.prompt_learner.ctx
    with torch.no_grad():
        ctx.add_(0.3 * torch.randn(ctx.shape, generator=generator))
    weights = torch.randn(len(CLASSNAMES), 32, generator=generator)
    packed, whole = method.class_features(), method.prompt_learner()
    torch.testing.assert_close(packed, whole, atol=1e-5, rtol=1e-5)
    (grad_packed,) = torch.autograd.grad((packed * weights).sum(), ctx)
    (grad_whole,) = torch.autograd.grad((whole * weights).sum(), ctx)
    torch.testing.assert_close(grad_packed, grad_whole, atol=1e-4, rtol=1e-4)
    # a new class set gets its own packing
    method.set_classnames(["zebra", "a very long and unusual class name", "cup"])
    with torch.no_grad():
        torch.testing.assert_close(method.class_features(), method.prompt_learner(), atol=1e-5, rtol=1e-5)
    # layouts without a shared prefix, and CoCoOp's per-image contexts, encode whole prompts
    assert CoOp(tiny_clip.model, tiny_clip.tokenizer, CLASSNAMES, class_token_position="front").packed is None
    assert CoOp(tiny_clip.model, tiny_clip.tokenizer, CLASSNAMES, class_specific=True).packed is None
    assert CoCoOp(tiny_clip.model, tiny_clip.tokenizer, CLASSNAMES, n_ctx=4).packed is None


def test_cocoop_matches_the_per_image_reference_loop(tiny_clip, reference_text, reference_prompts):
    method = CoCoOp(tiny_clip.model, tiny_clip.tokenizer, CLASSNAMES, n_ctx=4)
    assert [n for n, _ in method.meta_net.named_children()] == ["linear1", "relu", "linear2"]
    assert method.meta_net.linear1.out_features == 32 // 16 and method.meta_net.linear2.out_features == 64
    with torch.no_grad():
        method.meta_net.linear2.weight.normal_(0, 0.5)  # a visible shift
    image_features = torch.randn(3, 32)
    with torch.no_grad():
        out = method.output(image_features)
        rows = []
        for f in image_features:
            shift = method.meta_net(f / f.norm())
            prompts, ids = reference_prompts(
                tiny_clip.model, tiny_clip.tokenizer, CLASSNAMES, method.prompt_learner.ctx + shift
            )
            rows.append(
                scaled_cosine(tiny_clip.model, f[None], reference_text(tiny_clip.model, prompts, ids))[0]
            )
    torch.testing.assert_close(out.logits.double(), torch.stack(rows), atol=1e-4, rtol=1e-5)
    assert out.text_features.shape == (3, 5, 32)


def test_deep_text_prompts_match_full_length_reference(tiny_clip, reference_text, reference_prompts):
    ctx = torch.randn(2, 64) * 0.1
    deep = [torch.randn(2, 64) * 0.3 for _ in range(2)]
    with torch.no_grad():
        prompts, ids = reference_prompts(tiny_clip.model, tiny_clip.tokenizer, CLASSNAMES, ctx)
        expected = reference_text(tiny_clip.model, prompts, ids, deep)
        for bucket in (False, True):
            encoder = TextEncoder(tiny_clip.model, bucket=bucket, bucket_overhead_tokens=0)
            got = encoder.encode_embeddings(prompts, ids, deep_prompts=deep)
            torch.testing.assert_close(got, expected, atol=2e-5, rtol=0)
        plain = TextEncoder(tiny_clip.model).encode_embeddings(prompts, ids, deep_prompts=[])
        torch.testing.assert_close(plain, reference_text(tiny_clip.model, prompts, ids), atol=2e-5, rtol=0)
    with pytest.raises(ValueError, match="deep_prompts"):
        TextEncoder(tiny_clip.model).encode_embeddings(prompts, ids, deep_prompts=[ctx] * 3)
    with pytest.raises(ValueError, match="deep_prompts"):
        TextEncoder(tiny_clip.model).encode_embeddings(prompts, ids, deep_prompts=[torch.zeros(2, 63)])


@pytest.mark.parametrize("depth", [1, 3])
def test_maple_matches_reference_composition(tiny_clip, reference_text, depth):
    method = MaPLe(tiny_clip.model, tiny_clip.tokenizer, CLASSNAMES, n_ctx=2, prompt_depth=depth)
    learner = method.prompt_learner
    assert (
        learner.n_ctx == 2 and learner.n_fixed_words == 2 and len(method.compound_prompts_text) == depth - 1
    )
    with torch.no_grad():
        for p in method.compound_prompt_projections.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        learner.ctx.add_(torch.randn_like(learner.ctx) * 0.1)
    images = torch.randn(4, 3, 32, 32)
    ids = tiny_clip.tokenizer([f"a photo of a {c}." for c in CLASSNAMES])
    with torch.no_grad():
        out = method.output(images)
        embeddings = tiny_clip.model.token_embedding(ids)
        embeddings[:, 1:3] = learner.ctx
        text = reference_text(tiny_clip.model, embeddings, ids, list(method.compound_prompts_text))
        visual = [method.proj(learner.ctx)] + [
            f(t)
            for f, t in zip(method.compound_prompt_projections, method.compound_prompts_text, strict=True)
        ]
        image = prompted_reference(tiny_clip.model, images, visual)
    torch.testing.assert_close(
        out.logits.double(), scaled_cosine(tiny_clip.model, image, text), atol=1e-4, rtol=1e-5
    )


def test_maple_coupling_layers_start_as_copies(tiny_clip):
    method = MaPLe(tiny_clip.model, tiny_clip.tokenizer, CLASSNAMES, prompt_depth=3)
    first, second = method.compound_prompt_projections
    assert torch.equal(first.weight, second.weight) and first.weight.data_ptr() != second.weight.data_ptr()
    with pytest.raises(ValueError, match="prompt_depth"):
        MaPLe(tiny_clip.model, tiny_clip.tokenizer, CLASSNAMES, prompt_depth=4)


def test_vpt_matches_reference_composition(tiny_clip):
    method = VPT(tiny_clip.model, tiny_clip.tokenizer, CLASSNAMES, n_ctx_vision=3, vision_depth=3)
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        out = method.output(images)
        text = tiny_clip.model.encode_text(tiny_clip.tokenizer([f"a photo of a {c}." for c in CLASSNAMES]))
        image = prompted_reference(tiny_clip.model, images, list(method.visual_prompts.prompts))
    torch.testing.assert_close(
        out.logits.double(), scaled_cosine(tiny_clip.model, image, text), atol=1e-4, rtol=1e-5
    )
    method.set_classnames(["violin", "dog"])
    with torch.no_grad():
        assert method.output(images).logits.shape == (4, 2)


def test_clip_logits_per_image_classifiers():
    f, t = torch.randn(3, 8), torch.randn(3, 4, 8)
    out = clip_logits(f, t, torch.tensor(2.0))
    expected = torch.stack([(F.normalize(f[i], dim=-1) @ F.normalize(t[i], dim=-1).T) for i in range(3)])
    torch.testing.assert_close(out.logits, torch.tensor(2.0).exp() * expected, atol=1e-5, rtol=0)


TUNED = {
    "coop": {"prompt_learner.ctx"},
    "kgcoop": {"prompt_learner.ctx"},
    "cocoop": {
        "prompt_learner.ctx",
        "meta_net.linear1.weight",
        "meta_net.linear1.bias",
        "meta_net.linear2.weight",
        "meta_net.linear2.bias",
    },
    "maple": {
        "prompt_learner.ctx",
        "proj.weight",
        "proj.bias",
        "compound_prompts_text.0",
        "compound_prompts_text.1",
        "compound_prompt_projections.0.weight",
        "compound_prompt_projections.0.bias",
        "compound_prompt_projections.1.weight",
        "compound_prompt_projections.1.bias",
    },
    "vpt": {"visual_prompts.prompts"},
    "prograd": {"prompt_learner.ctx"},
    "promptsrc": {
        "prompt_learner.ctx",
        "deep_text_prompts.0",
        "deep_text_prompts.1",
        "visual_prompts.prompts",
    },
    "tcp": {
        "prompt_learner.ctx",
        "knowledge_embedding.net.linear1.weight",
        "knowledge_embedding.net.linear1.bias",
        "knowledge_embedding.net.linear2.weight",
        "knowledge_embedding.net.linear2.bias",
    },
    "proda": {"ctx"},
}
OPTIONS = {
    "coop": {"n_ctx": 4},
    "kgcoop": {"n_ctx": 4},
    "cocoop": {"n_ctx": 4},
    "maple": {"n_ctx": 2, "prompt_depth": 3},
    "vpt": {"n_ctx_vision": 2, "vision_depth": 3},
    "prograd": {"n_ctx": 6, "ctx_init": "a photo of a"},
    "promptsrc": {"prompt_depth": 3, "n_ctx_vision": 2, "vision_depth": 3},
    "tcp": {"n_ctx": 4, "inject_layer": 2},
    "proda": {"n_ctx": 4, "n_prompts": 8},
}


@pytest.mark.parametrize("name", sorted(registry.names("prompt_method")))
def test_a_step_moves_only_the_tuned_parameters(fresh_clip, name):
    spec = get_method(name)
    frozen = {k: v.clone() for k, v in fresh_clip.model.state_dict().items()}
    method = spec.build(fresh_clip.model, fresh_clip.tokenizer, CLASSNAMES, **OPTIONS[name])
    assert {n for n, _ in method.tuned_parameters()} == TUNED[name]
    assert set(method.tuned_state_dict()) == TUNED[name]
    before = {n: p.detach().clone() for n, p in method.tuned_parameters()}
    optimizer = torch.optim.SGD([p for _, p in method.tuned_parameters()], lr=0.5, momentum=0.9)
    inputs = torch.randn(3, 3, 32, 32) if method.input_kind == "images" else torch.randn(3, 32)
    method.train()
    assert not fresh_clip.model.training
    out = method.output(inputs)
    F.cross_entropy(out.logits, torch.tensor([0, 3, 4])).backward()
    optimizer.step()
    for n, p in method.tuned_parameters():
        assert p.grad is not None and not torch.equal(before[n], p.detach()), n
    for key, value in fresh_clip.model.state_dict().items():
        assert torch.equal(value, frozen[key]), key
    assert all(p.grad is None for p in fresh_clip.model.parameters())

    # the tuned state moves to a method built for other classes
    other = spec.build(fresh_clip.model, fresh_clip.tokenizer, ["violin", "red fox"], **OPTIONS[name])
    other.load_tuned_state_dict(method.tuned_state_dict())
    method.set_classnames(["violin", "red fox"])
    method.eval()
    other.eval()  # ProDA scores with all its prompts in evaluation, a subset in training
    with torch.no_grad():
        torch.testing.assert_close(
            other.output(inputs).logits, method.output(inputs).logits, atol=1e-5, rtol=0
        )
    with pytest.raises(ValueError, match="state"):
        other.load_tuned_state_dict({})


def test_specs_cite_their_recipes():
    for name in registry.names("prompt_method"):
        spec = get_method(name)
        for key in ("epochs", "batch_size", "lr", "warmup_epochs", "warmup_lr"):
            assert key in spec.recipe, (name, key)
        assert spec.recipe["warmup_epochs"] == 1 and spec.recipe["warmup_lr"] == 1e-5
        assert ".yaml" in spec.source
    assert (
        get_method("kgcoop").regularizers == ("kgcoop",)
        and get_method("kgcoop").recipe["kgcoop_weight"] == 8.0
    )
    assert get_method("maple").recipe["prompt_depth"] == 9 and get_method("maple").recipe["n_ctx"] == 2
    assert get_method("vpt").recipe["n_ctx_vision"] == 8 and get_method("vpt").recipe["vision_depth"] == 12
    with pytest.raises(ValueError, match="method"):
        get_method("clipadapter")


def test_maple_terms_go_through_the_deep_prompts(tiny_clip):
    method = MaPLe(tiny_clip.model, tiny_clip.tokenizer, CLASSNAMES, n_ctx=2, prompt_depth=3)
    with torch.no_grad():
        for p in method.compound_prompts_text:
            p.normal_(0, 0.3)
        deep = list(method.compound_prompts_text)
        terms = method.prompt_learner.encode_terms(CLASSNAMES, deep_prompts=deep)
        torch.testing.assert_close(terms, method.class_features(), atol=1e-6, rtol=0)
        assert not torch.allclose(method.prompt_learner.encode_terms(CLASSNAMES), terms, atol=1e-4)
