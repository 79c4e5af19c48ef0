"""The public method interface (``method(images)``, ``forward_features``, ``output``, ``class_features``,
``recipe``, ``build_method``) and ``training_step``: one step against the objective written out by hand
in float64 (KgCoOp: CE + w (1 - mean cos(t_c, t0_c)), then SGD), regularizer and option checks, resume."""

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastcal.methods import PromptMethod, build_method, training_step
from fastcal.methods.kgcoop import KgCoOp
from fastcal.models.cache import zeroshot_class_features

NAMES = ["seven", "eight", "golden_retriever", "nine"]


@pytest.fixture
def clip64(random_testbed):
    model, tokenizer = random_testbed
    return copy.deepcopy(model).double(), tokenizer


def batch(model, n=6, seed=0):
    generator = torch.Generator().manual_seed(seed)
    size = model.visual.image_size[0]
    images = torch.randn(n, 3, size, size, generator=generator, dtype=torch.float64)
    return images, torch.randint(0, len(NAMES), (n,), generator=generator)


def test_a_method_is_one_call_from_images_and_says_its_recipe(clip64):
    model, tokenizer = clip64
    coop = build_method("coop", model, tokenizer, NAMES).double()
    assert isinstance(coop, PromptMethod) and coop.method_name == "coop"
    assert coop.prompt_learner.n_ctx == 4  # the recipe's "a photo of a", not the class default of 16
    assert coop.recipe == coop.spec.recipe and coop.recipe["lr"] == 0.002
    assert [n for n, _ in coop.tuned_parameters()] == ["prompt_learner.ctx"]
    images, _ = batch(model)
    logits = coop(images)
    features = model.encode_image(images)
    torch.testing.assert_close(logits, coop.forward_features(features))
    out = coop.output(features)
    torch.testing.assert_close(out.logits, logits)
    expected = (
        model.logit_scale.exp() * F.normalize(features, dim=-1) @ F.normalize(coop.class_features(), dim=-1).T
    )
    torch.testing.assert_close(logits, expected)
    assert coop.class_features().shape == (4, model.text_projection.shape[1])

    vpt = build_method("vpt", model, tokenizer, NAMES, vision_depth=2)
    assert vpt.method_name == "vpt" and vpt.recipe["n_ctx_vision"] == 8
    assert vpt(images.float()).shape == (6, 4)
    with pytest.raises(TypeError, match="forward_features: VPT prompts the image encoder"):
        vpt.forward_features(features)
    with pytest.raises(ValueError, match=r"options: expected options of 'coop' \(n_ctx, ctx_init"):
        build_method("coop", model, tokenizer, NAMES, depth=3)
    assert isinstance(build_method("kgcoop", model, tokenizer, NAMES), KgCoOp)


def test_a_kgcoop_step_is_ce_plus_its_guidance_then_sgd(clip64):
    model, tokenizer = clip64
    kgcoop = KgCoOp(model, tokenizer, NAMES, n_ctx=4, ctx_init="a photo of a").double()
    with torch.no_grad():
        kgcoop.prompt_learner.ctx.add_(0.05 * torch.randn_like(kgcoop.prompt_learner.ctx))
    ctx0 = kgcoop.prompt_learner.ctx.detach().clone()
    images, labels = batch(model)
    lr = 0.1

    # by hand: the regularizer comes from the method (KgCoOp, weight 8 from its recipe)
    ctx = ctx0.clone().requires_grad_(True)
    image = F.normalize(model.encode_image(images), dim=-1)
    text = F.normalize(kgcoop.prompt_learner(ctx), dim=-1)
    anchor = zeroshot_class_features(model, tokenizer, NAMES, "a photo of a {}.").double()
    logits = model.logit_scale.exp() * image @ text.T
    expected = F.cross_entropy(logits, labels) + 8.0 * (1 - (text * anchor).sum(-1).mean())
    expected.backward()

    step = training_step(kgcoop, "ce", torch.optim.SGD([kgcoop.prompt_learner.ctx], lr=lr))
    assert [r.name for r in step.regularizers] == ["kgcoop"]
    result = step(images, labels)
    torch.testing.assert_close(result.loss, expected.detach(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(result.logits, logits.detach(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(kgcoop.prompt_learner.ctx.detach(), ctx0 - lr * ctx.grad, atol=1e-8, rtol=1e-6)

    # the same from cached features
    again = training_step(copy.deepcopy(kgcoop), "ce", torch.optim.SGD([ctx0.clone()], lr=lr))
    assert again.from_features(model.encode_image(images), labels).loss.shape == ()


def test_a_step_puts_the_method_back_in_train_mode_and_keeps_the_clip_frozen(clip64):
    model, tokenizer = clip64
    coop = build_method("coop", model, tokenizer, NAMES).double()
    step = training_step(coop, "ce", torch.optim.SGD([p for _, p in coop.tuned_parameters()], lr=0.01))
    images, labels = batch(model)
    for _ in range(2):
        step(images, labels)
        assert coop.training and not coop.clip_model.training
        coop.eval()  # a user's evaluation between steps
        assert not coop.training


def test_the_anchor_follows_the_class_set_and_options_are_checked(clip64):
    model, tokenizer = clip64
    coop = build_method("coop", model, tokenizer, NAMES).double()
    optimizer = torch.optim.SGD([p for _, p in coop.tuned_parameters()], lr=0.01)
    step = training_step(
        coop, "calibrated", optimizer, loss_options={"moment_weight": 2.0}, templates=["a {}."]
    )
    assert step.regularizers == [] and step.loss.moment_weight == 2.0 and step.loss.margin_alpha == 0.1
    first = step.frozen_text_features()
    torch.testing.assert_close(first, zeroshot_class_features(model, tokenizer, NAMES, "a {}."))
    coop.set_classnames(["zero", "one"])
    assert step.frozen_text_features().shape[0] == 2

    with pytest.raises(ValueError, match=r"loss_options: expected options of the 'calibrated' loss"):
        training_step(coop, "calibrated", optimizer, loss_options={"gamma": 2})
    with pytest.raises(ValueError, match="loss: expected one of ce, "):
        training_step(coop, "nosuch", optimizer)
    with pytest.raises(ValueError, match="regularizer_options: expected options of the regularizers used"):
        training_step(coop, "ce", optimizer, regularizer_options={"kgcoop": {"weight": 1.0}})
    with pytest.raises(TypeError, match="from_features: VPT prompts the image encoder"):
        vpt = build_method("vpt", model, tokenizer, NAMES, vision_depth=1)
        training_step(
            vpt, "ce", torch.optim.SGD([p for _, p in vpt.tuned_parameters()], lr=0.1)
        ).from_features(torch.randn(2, 8), torch.tensor([0, 1]))


def test_resuming_a_step_continues_exactly(clip64):
    model, tokenizer = clip64
    images, labels = batch(model, seed=1)

    def fresh():
        torch.manual_seed(0)
        method = build_method("kgcoop", model, tokenizer, NAMES).double()
        optimizer = torch.optim.SGD([p for _, p in method.tuned_parameters()], lr=0.05, momentum=0.9)
        return method, training_step(method, "calibrated", optimizer)

    method, step = fresh()
    for _ in range(3):
        step(images, labels)
    expected = method.tuned_state_dict()

    method, step = fresh()
    step(images, labels)
    state, tuned = copy.deepcopy(step.state_dict()), method.tuned_state_dict()
    method, step = fresh()
    method.load_tuned_state_dict(tuned)
    step.load_state_dict(state)
    step(images, labels)
    step(images, labels)
    for name, value in method.tuned_state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0)


def run_in_a_plain_loop(name, config, options):
    """``training_step`` in a user's loop over the testbed's base classes, with the command's resolved
    settings (``results.json``): the epoch losses and the tuned state."""
    from fastcal.data.items import ImageListDataset
    from fastcal.data.testbed import digits_splits
    from fastcal.models.testbed import load_testbed_clip
    from fastcal.runs.train.data import epoch_batches, run_data
    from fastcal.runs.train.loop import learning_rate_factor

    clip = load_testbed_clip()
    data = run_data(digits_splits(), shots=config["shots"], seed=config["seed"], protocol="base2new")
    torch.manual_seed(config["seed"])  # the command seeds its generators before building the method
    method = build_method(name, clip.model, clip.tokenizer, data.train_classnames, **options)
    optimizer = torch.optim.SGD(
        [p for _, p in method.tuned_parameters()],
        lr=config["lr"],
        momentum=config["momentum"],
        weight_decay=config["weight_decay"],
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda e: learning_rate_factor(
            e, epochs=config["epochs"], lr=config["lr"], warmup_epochs=0, warmup_lr=config["warmup_lr"]
        ),
    )
    step = training_step(method, "ce", optimizer, templates=data.templates[:1], settings=config)
    dataset = ImageListDataset(data.train_items, data.train_classnames, clip.eval_transform)
    images, labels = zip(*dataset, strict=True)
    inputs, labels = method.prepare_inputs(torch.stack(images)), torch.tensor(labels)
    take = step.from_features if method.input_kind == "features" else step
    losses = []
    for epoch in range(config["epochs"]):
        step.start_epoch(epoch)
        batches = epoch_batches(len(labels), config["batch_size"], seed=config["seed"], epoch=epoch)
        total = sum(take(inputs[b], labels[b]).loss * len(b) for b in batches)
        losses.append(float(total) / sum(len(b) for b in batches))
        schedule.step()
        step.end_epoch()
    return losses, method.tuned_state_dict()


@pytest.mark.parametrize(
    ("name", "settings", "options"),
    [
        ("prograd", ["--epochs", "3"], ("n_ctx",)),
        (
            "promptsrc",
            ["--epochs", "2", "--batch-size", "4", "--gpa-mean", "1"],
            ("prompt_depth", "vision_depth"),
        ),
    ],
)
def test_a_user_loop_with_training_step_equals_the_command(testbed_cache, tmp_path, name, settings, options):
    """ProGrad's gradient rule and PromptSRC's self-regulation and epoch-end aggregation act inside the
    step, so a plain loop takes the command's steps: same epoch losses, same final prompts."""
    from fastcal.cli import main

    run = tmp_path / name
    common = ["--shots", "2", "--warmup-epochs", "0", "--no-augment", "--output", str(run), "--quiet"]
    assert main(["train", "--method", name, *settings, *common]) == 0
    results = json.loads((run / "results.json").read_text())
    config = results["config"]
    losses, tuned = run_in_a_plain_loop(name, config, {key: config[key] for key in options})
    history = [entry["loss"] for entry in results["train"]["history"]]
    np.testing.assert_allclose(losses, history, rtol=1e-5)
    saved = torch.load(run / "prompt.pt", weights_only=True)["tuned"]
    assert tuned.keys() == saved.keys()
    torch.testing.assert_close(tuned, saved, atol=1e-6, rtol=1e-5)
