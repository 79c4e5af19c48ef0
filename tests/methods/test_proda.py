"""ProDA against a float64 restatement of one step of the public copy it follows
(ml-stat-Sustech/CLIP_Calibration ``trainers/classification/proda.py``: the three prompt layouts, the
(D, C, C) covariance, the Gaussian upper bound, the class-free prompts' diversity; ``set_classifier``),
written from open_clip's modules at full length (77 positions) on the tiny random-init CLIP."""

import pytest
import torch
import torch.nn.functional as F

from fastcal.methods.base import get_method
from fastcal.methods.objectives import CrossEntropy, StepBatch, build_loss
from fastcal.methods.proda import GaussianBound, ProDA, gaussian_variance, prompt_positions

CLASSNAMES = ["dog", "great white shark", "axolotl", "teapot", "stone bridge"]
N_CTX, N_PROMPTS = 4, 8
SUBSET = [6, 1, 3, 4]  # end, front, middle, end
LR, WEIGHT_DECAY = 0.05, 5e-4


def reference_prompt(model, tokenizer, ctx, name, position):
    """One 77-token prompt of a layout: end "[SOS] ctx name .", middle "[SOS] ctx[:n/2] name ctx[n/2:] .",
    front "[SOS] name ctx ."."""
    ids = tokenizer([" ".join(["X"] * N_CTX) + f" {name}."])
    embedding = model.token_embedding(ids)[0]
    name_len = int(tokenizer([name])[0].argmax()) - 1
    sos, names, rest = (
        embedding[:1],
        embedding[1 + N_CTX : 1 + N_CTX + name_len],
        embedding[1 + N_CTX + name_len :],
    )
    half = N_CTX // 2
    parts = {
        "end": [sos, ctx, names, rest],
        "middle": [sos, ctx[:half], names, ctx[half:], rest],
        "front": [sos, names, ctx, rest],
    }[position]
    return torch.cat(parts), ids[0]


def reference_features(model, tokenizer, reference_text, ctx, prompts):
    """(C, P, D) normalized features of ``prompts`` (indices) for every class."""
    positions = prompt_positions(N_PROMPTS)
    rows = []
    for name in CLASSNAMES:
        built = [reference_prompt(model, tokenizer, ctx[k], name, positions[k]) for k in prompts]
        embeddings, ids = torch.stack([b[0] for b in built]), torch.stack([b[1] for b in built])
        rows.append(F.normalize(reference_text(model, embeddings, ids), dim=-1))
    return torch.stack(rows)


def reference_loss(clip, reference_text, ctx, image_features, labels):
    model, tokenizer = clip.model, clip.tokenizer
    text = reference_features(model, tokenizer, reference_text, ctx, SUBSET)  # (C, P, D)
    mean = text.mean(dim=1)
    scale = model.logit_scale.exp()
    f = F.normalize(image_features, dim=-1)
    logits = scale * f @ mean.T
    deviation = text - mean[:, None]
    covariance = deviation.permute(2, 0, 1) @ deviation.permute(2, 1, 0) / (len(SUBSET) + 1)  # (D, C, C)
    refined = torch.einsum("bd,dik->bik", f**2, covariance)
    b = torch.arange(len(labels))
    c = torch.arange(len(CLASSNAMES))
    sigma = refined[b, labels, labels][:, None] + refined[:, c, c] - 2 * refined[b, labels, :]
    upper = F.cross_entropy(logits + 0.5 * scale**2 * sigma, labels)
    ids = tokenizer([" ".join(["X"] * N_CTX) + "."])
    embedding = model.token_embedding(ids).expand(N_PROMPTS, -1, -1)
    free = torch.cat([embedding[:, :1], ctx, embedding[:, 1 + N_CTX :]], dim=1)
    u = F.normalize(reference_text(model, free, ids.expand(N_PROMPTS, -1)), dim=-1)
    similarity = u @ u.T
    diversity = similarity[~torch.eye(N_PROMPTS, dtype=torch.bool)].abs().mean()
    return upper + 0.1 * diversity, sigma


def test_one_step_matches_the_reference(double_clip, reference_text, run_setup):
    generator = torch.Generator().manual_seed(4)
    image_features = torch.randn(6, 32, generator=generator, dtype=torch.float64)
    labels = torch.tensor([3, 0, 1, 4, 4, 2])
    method = ProDA(double_clip.model, double_clip.tokenizer, CLASSNAMES, n_ctx=N_CTX, n_prompts=N_PROMPTS)
    method.double()
    assert prompt_positions(N_PROMPTS) == ["front"] * 2 + ["middle"] * 2 + ["end"] * 4
    assert [n for n, _ in method.tuned_parameters()] == ["ctx"]
    reference = method.ctx.detach().clone().requires_grad_()
    expected, sigma = reference_loss(double_clip, reference_text, reference, image_features, labels)
    (expected_grad,) = torch.autograd.grad(expected, reference)
    assert sigma[torch.arange(6), labels].abs().max() < 1e-15  # zero at the label

    method.next_prompts = lambda: torch.tensor(SUBSET)
    optimizer = torch.optim.SGD([method.ctx], lr=LR, momentum=0.9, weight_decay=WEIGHT_DECAY)
    method.train()
    out = method.output(image_features)
    assert not out.cosine_logits and out.prompt_features.shape == (5, 4, 32)
    batch = StepBatch(out, labels, method, None, 0, image_features)
    bound = GaussianBound(run_setup(method, double_clip, CLASSNAMES, {"diversity_weight": None}))
    loss = CrossEntropy()(batch) + bound(batch)
    loss.backward()
    # float64 throughout: the truncated encoder and the (B, C) rewrite of the covariance differ from the
    # reference's 77 tokens and (D, C, C) tensor by rounding only
    tolerance = {"rtol": 1e-9, "atol": 1e-12}
    torch.testing.assert_close(
        gaussian_variance(out.image_features, out.prompt_features, labels), sigma, **tolerance
    )
    torch.testing.assert_close(loss, expected, **tolerance)
    torch.testing.assert_close(method.ctx.grad, expected_grad, **tolerance)
    optimizer.step()
    torch.testing.assert_close(
        method.ctx.detach(),
        reference.detach() - LR * (expected_grad + WEIGHT_DECAY * reference.detach()),
        **tolerance,
    )


def test_inference_uses_the_mean_of_all_prompts_not_renormalized(double_clip, reference_text):
    method = ProDA(double_clip.model, double_clip.tokenizer, CLASSNAMES, n_ctx=N_CTX, n_prompts=N_PROMPTS)
    method.double().eval()
    image_features = torch.randn(3, 32, dtype=torch.float64)
    with torch.no_grad():
        out = method.output(image_features)
        every = reference_features(
            double_clip.model, double_clip.tokenizer, reference_text, method.ctx, range(N_PROMPTS)
        ).mean(dim=1)
    expected = double_clip.model.logit_scale.exp() * F.normalize(image_features, dim=-1) @ every.T
    torch.testing.assert_close(out.logits, expected, rtol=1e-9, atol=1e-12)
    assert every.norm(dim=-1).max() < 1 and out.prompt_features is None
    with torch.no_grad():  # kept while nothing changes; recomputed when the contexts move
        assert method.classifier() is method.classifier()
        method.ctx.add_(0.1)
        assert not torch.equal(method.output(image_features).logits, out.logits)


def test_prompt_subsets_cycle_through_a_permutation_and_resume(tiny_clip):
    method = ProDA(tiny_clip.model, tiny_clip.tokenizer, CLASSNAMES, n_ctx=N_CTX, n_prompts=N_PROMPTS)
    torch.manual_seed(3)
    first = [method.next_prompts() for _ in range(2)]
    assert sorted(first[0] + first[1]) == list(range(N_PROMPTS))
    # a checkpoint holds the method's cycle and torch's generator (the next permutation's draw)
    state, generator = method.training_state(), torch.get_rng_state()
    third, fourth = method.next_prompts(), method.next_prompts()
    method.load_training_state(state)
    torch.set_rng_state(generator)
    torch.testing.assert_close(method.next_prompts(), third)
    state = method.training_state()  # mid-cycle: the permutation itself is in the state
    method.load_training_state(state)
    torch.testing.assert_close(method.next_prompts(), fourth)
    with pytest.raises(ValueError, match="prompt_batch"):
        ProDA(tiny_clip.model, tiny_clip.tokenizer, CLASSNAMES, n_prompts=8, prompt_batch=3)


def test_calibrated_loss_takes_the_methods_logits(tiny_clip):
    """ProDA's logits are not the scaled cosines of its (normalized mean) features: the calibrated loss
    composes its terms on the logits."""
    method = ProDA(tiny_clip.model, tiny_clip.tokenizer, CLASSNAMES, n_ctx=N_CTX, n_prompts=N_PROMPTS)
    out = method.output(torch.randn(4, 32))
    labels = torch.tensor([0, 1, 2, 3])
    frozen = F.normalize(torch.randn(5, 32), dim=-1)
    options = {"margin_alpha": 0.0, "margin_beta": 0.0, "moment_weight": 0.0, "label_smoothing": 0.0}
    loss = build_loss("calibrated", options)(StepBatch(out, labels, method, frozen, 0))
    torch.testing.assert_close(loss, F.cross_entropy(out.logits, labels))


def test_spec_cites_the_recipe():
    spec = get_method("proda")
    recipe = spec.recipe
    assert (recipe["epochs"], recipe["batch_size"], recipe["lr"]) == (100, 4, 0.001)
    assert (recipe["n_ctx"], recipe["n_prompts"], recipe["prompt_batch"], recipe["diversity_weight"]) == (
        16,
        32,
        4,
        0.1,
    )
    assert "vit_b16_c16_ep100_batch4.yaml" in spec.source and spec.regularizers == (GaussianBound,)
