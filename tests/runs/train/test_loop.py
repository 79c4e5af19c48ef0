"""The training loop on a tiny random-init CLIP and synthetic images: Dassl's schedule, the batch order,
the few-shot / base-to-new data, exact resumption, the run folder, and cached features."""

import json
import math

import numpy as np
import pytest
import torch

from fastcal import registry
from fastcal.data.protocols import base_new_split
from fastcal.methods.objectives import StatelessRegularizer, TrainingHook
from fastcal.runs.train import TrainConfig, load_prompt, predict, train
from fastcal.runs.train.data import epoch_batches, run_data
from fastcal.runs.train.loop import CHECKPOINT_NAME, PROMPT_NAME, RESULTS_NAME, learning_rate_factor


def config(tmp_path, name="run", **values):
    base = {
        "shots": 4,
        "epochs": 3,
        "batch_size": 8,
        "lr": 0.05,
        "progress": False,
        "output": str(tmp_path / name),
    }
    base.update(values)
    base.setdefault("cache_dir", str(tmp_path / "cache"))
    return TrainConfig.from_dict(base)


def dassl_learning_rates(lr, epochs, warmup_epochs, warmup_lr):
    """Dassl's ConstantWarmupScheduler over CosineAnnealingLR(T_max=epochs), stepped once per epoch:
    the constant rate while ``last_epoch < warmup``, then the successor's rates from its first."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    successor = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    rates = []
    for epoch in range(epochs):
        if epoch < warmup_epochs:
            rates.append(warmup_lr)
            continue
        if epoch > warmup_epochs:
            optimizer.step()
            successor.step()
        rates.append(successor.get_last_lr()[0])
    return rates


@pytest.mark.parametrize("warmup", [0, 1, 2])
def test_learning_rate_schedule_is_dassls(warmup):
    expected = dassl_learning_rates(0.002, 10, warmup, 1e-5)
    got = [
        0.002 * learning_rate_factor(e, epochs=10, lr=0.002, warmup_epochs=warmup, warmup_lr=1e-5)
        for e in range(10)
    ]
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_epoch_batches_are_seeded_permutations():
    first = epoch_batches(37, 8, seed=1, epoch=0)
    assert [len(b) for b in first] == [8, 8, 8, 8]  # the incomplete batch is dropped
    assert len(set(torch.cat(first).tolist())) == 32
    assert all(torch.equal(a, b) for a, b in zip(first, epoch_batches(37, 8, seed=1, epoch=0), strict=True))
    assert not torch.equal(torch.cat(first), torch.cat(epoch_batches(37, 8, seed=1, epoch=1)))
    assert not torch.equal(torch.cat(first), torch.cat(epoch_batches(37, 8, seed=2, epoch=0)))
    small = epoch_batches(5, 8, seed=1, epoch=0)
    assert len(small) == 1 and sorted(small[0].tolist()) == [0, 1, 2, 3, 4]  # fewer than a batch: kept


def test_run_data_draws_k_per_base_class_and_remaps_labels(synthetic_splits):
    data = run_data(synthetic_splits, shots=4, seed=3, protocol="base2new")
    halves = base_new_split(synthetic_splits)
    assert data.train_classnames == synthetic_splits.classnames[:4]
    counts = torch.bincount(torch.tensor([label for _, label in data.train_items]), minlength=4)
    assert counts.tolist() == [4, 4, 4, 4]
    original = {id(image): label for image, label in synthetic_splits.train}
    for image, label in data.train_items:
        assert halves.base.to_original(label) == original[id(image)]
        assert halves.base.to_subset(original[id(image)]) == label
    base, new = data.groups
    assert (base.name, new.name) == ("base", "new") and new.classnames == synthetic_splits.classnames[4:]
    test_labels = {id(image): label for image, label in synthetic_splits.test}
    for image, label in new.items:
        assert halves.new.to_original(label) == test_labels[id(image)]
    assert len(base.items) + len(new.items) == len(synthetic_splits.test)
    again = run_data(synthetic_splits, shots=4, seed=3, protocol="base2new")
    assert [id(i) for i, _ in again.train_items] == [id(i) for i, _ in data.train_items]
    everything = run_data(synthetic_splits, shots=2, seed=3, protocol="all")
    assert [g.name for g in everything.groups] == ["all"] and len(everything.train_items) == 14


class CountingRegularizer(StatelessRegularizer):
    """A plug-in regularizer: a tiny term on the logits, counting its calls and epochs in its state."""

    name = "counting"

    def __init__(self, setup):
        self.calls, self.epochs = 0, []

    def __call__(self, batch):
        self.calls += 1
        return 1e-3 * batch.output.logits.square().mean()

    def on_epoch_start(self, epoch):
        self.epochs.append(epoch)

    def state_dict(self):
        return {"calls": self.calls, "epochs": list(self.epochs)}

    def load_state_dict(self, state):
        self.calls, self.epochs = state["calls"], list(state["epochs"])


@pytest.fixture
def counting():
    created = []

    def factory(setup):
        created.append(CountingRegularizer(setup))
        return created[-1]

    with registry.registered("regularizer", "counting", factory):
        yield created


@pytest.mark.parametrize(
    ("method", "values"),
    [
        ("kgcoop", {"loss": "calibrated", "regularizers": ["counting"]}),
        ("maple", {"prompt_depth": 2, "batch_size": 4}),
    ],
)
def test_resume_equals_uninterrupted(tmp_path, tiny_clip, synthetic_splits, counting, method, values):
    whole = train(config(tmp_path, "whole", method=method, **values), clip=tiny_clip, splits=synthetic_splits)
    stopped = config(tmp_path, "stopped", method=method, **values)
    assert train(stopped, clip=tiny_clip, splits=synthetic_splits, stop_after=2) == {}
    torch.manual_seed(1234)  # another process's generators: resumption restores the saved ones
    resumed = train(stopped.replace(resume=True), clip=tiny_clip, splits=synthetic_splits)
    a = torch.load(tmp_path / "whole" / PROMPT_NAME, weights_only=False)["tuned"]
    b = torch.load(tmp_path / "stopped" / PROMPT_NAME, weights_only=False)["tuned"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for group in ("base", "new", "hm"):
        assert whole[group] == resumed[group]
    assert whole["train"]["history"] == resumed["train"]["history"]
    if counting:
        assert counting[-1].epochs == [0, 1, 2] and counting[-1].calls == counting[0].calls


class HalvingRule(TrainingHook):
    """A gradient rule and epoch-end hook for the test: back-propagates half the objective, counts."""

    name = "halving"
    forms_gradient = True

    def __init__(self, setup):
        self.steps, self.epochs = 0, []

    def backward(self, objective, batch, parameters, scaler):
        self.steps += 1
        assert (
            batch.inputs is not None
            and batch.frozen_image_features.shape == batch.output.image_features.shape
        )
        super().backward(0.5 * objective, batch, parameters, scaler)

    def on_epoch_end(self, epoch):
        self.epochs.append(epoch)

    def state_dict(self):
        return {"steps": self.steps, "epochs": list(self.epochs)}

    def load_state_dict(self, state):
        self.steps, self.epochs = state["steps"], list(state["epochs"])


@pytest.fixture
def halving():
    from dataclasses import replace

    from fastcal.methods.base import get_method

    created = []

    def factory(setup):
        created.append(HalvingRule(setup))
        return created[-1]

    factory.name = "halving"
    spec = replace(get_method("coop"), name="halved", hooks=(factory,))
    with registry.registered("prompt_method", "halved", spec):
        yield created


def test_a_gradient_rule_forms_the_step_and_epoch_hooks_run(tmp_path, tiny_clip, synthetic_splits, halving):
    """Without weight decay, back-propagating half the objective is training at half the rates; the
    hook's state survives an interruption."""
    values = {"weight_decay": 0.0, "n_ctx": 4, "ctx_init": ""}
    ruled = train(
        config(tmp_path, "ruled", method="halved", **values), clip=tiny_clip, splits=synthetic_splits
    )
    half = config(tmp_path, "half", method="coop", lr=0.025, warmup_lr=5e-6, **values)
    plain = train(half, clip=tiny_clip, splits=synthetic_splits)
    a = torch.load(tmp_path / "ruled" / PROMPT_NAME, weights_only=False)["tuned"]
    b = torch.load(tmp_path / "half" / PROMPT_NAME, weights_only=False)["tuned"]
    torch.testing.assert_close(a["prompt_learner.ctx"], b["prompt_learner.ctx"], rtol=1e-5, atol=1e-7)
    assert ruled["base"]["count"] == plain["base"]["count"]
    assert halving[0].epochs == [0, 1, 2] and halving[0].steps == 3 * 2  # 4 shots of 4 base classes, batch 8
    stopped = config(tmp_path, "stopped", method="halved", **values)
    train(stopped, clip=tiny_clip, splits=synthetic_splits, stop_after=2)
    train(stopped.replace(resume=True), clip=tiny_clip, splits=synthetic_splits)
    assert halving[-1].epochs == [0, 1, 2] and halving[-1].steps == 6
    c = torch.load(tmp_path / "stopped" / PROMPT_NAME, weights_only=False)["tuned"]
    assert torch.equal(a["prompt_learner.ctx"], c["prompt_learner.ctx"])


@pytest.mark.parametrize("loss", ["ce", "calibrated", "label_smoothing"])
@pytest.mark.parametrize("method", ["prograd", "promptsrc", "tcp", "proda"])
def test_each_method_trains_with_each_loss(tiny_clip, synthetic_splits, tmp_path, method, loss):
    """One epoch (its testbed recipe otherwise) and the evaluation, without a run folder."""
    values = {"epochs": 1, "shots": 2, "batch_size": 4, "output": None, "loss": loss, "method": method}
    results = train(config(tmp_path, **values), clip=tiny_clip, splits=synthetic_splits)
    assert math.isfinite(results["train"]["history"][0]["loss"])
    assert results["base"]["count"] + results["new"]["count"] == len(synthetic_splits.test)


def test_adam_where_the_recipe_says_so(tiny_clip, synthetic_splits, tmp_path):
    from fastcal.runs.train.loop import prepare

    run = prepare(config(tmp_path, method="tcp", inject_layer=1), clip=tiny_clip, splits=synthetic_splits)
    assert isinstance(run.step.optimizer, torch.optim.Adam)
    group = run.step.optimizer.param_groups[0]
    assert group["eps"] == 1e-3 and group["weight_decay"] == 5e-4 and group["betas"] == (0.9, 0.999)
    assert [r.name for r in run.step.regularizers] == ["tcp_knowledge"] and run.step.hooks == []
    sgd = prepare(config(tmp_path, method="coop"), clip=tiny_clip, splits=synthetic_splits).step.optimizer
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["momentum"] == 0.9


def test_resume_refuses_another_config(tmp_path, tiny_clip, synthetic_splits):
    stopped = config(tmp_path, method="coop")
    train(stopped, clip=tiny_clip, splits=synthetic_splits, stop_after=1)
    with pytest.raises(ValueError, match="lr"):
        train(stopped.replace(resume=True, lr=0.1), clip=tiny_clip, splits=synthetic_splits)


def test_run_folder_and_saved_prompt(tmp_path, tiny_clip, synthetic_splits):
    cfg = config(tmp_path, method="cocoop", epochs=2, batch_size=4, n_bins=10)
    results = train(cfg, clip=tiny_clip, splits=synthetic_splits)
    folder = tmp_path / "run"
    on_disk = json.loads((folder / RESULTS_NAME).read_text())
    assert {"base", "new", "hm", "config", "train"} <= set(on_disk)
    for group in ("base", "new"):
        assert on_disk[group]["n_bins"] == 10 and 0 <= on_disk[group]["ece"] <= 1
        assert (folder / f"reliability_{group}.png").stat().st_size > 0
    base, new = on_disk["base"]["accuracy"], on_disk["new"]["accuracy"]
    assert on_disk["hm"]["accuracy"] == pytest.approx(2 * base * new / (base + new) if base + new else 0.0)
    assert on_disk["config"]["epochs"] == 2 and on_disk["config"]["n_ctx"] == 4  # CoCoOp's recipe
    assert "vit_b16_c4_ep10_batch1_ctxv1.yaml" in on_disk["config"]["recipe_source"]
    assert (folder / CHECKPOINT_NAME).is_file() and results["base"] == on_disk["base"]

    method = load_prompt(folder, tiny_clip)
    new_group = run_data(synthetic_splits, shots=4, seed=1, protocol="base2new").groups[1]
    logits, labels, *_ = predict(
        method,
        tiny_clip,
        new_group.items,
        new_group.classnames,
        device=torch.device("cpu"),
        cache_dir=cfg.cache_dir,
    )
    accuracy = float((logits.argmax(1) == labels).double().mean())
    assert math.isclose(accuracy, on_disk["new"]["accuracy"], rel_tol=1e-12)
    saved = np.load(folder / "predictions" / "new.npz")
    torch.testing.assert_close(torch.from_numpy(saved["logits"]), logits, rtol=0, atol=0)
    assert saved["classnames"].tolist() == new_group.classnames and float(saved["temperature"]) == 1.0
    assert saved["zeroshot_text_features"].shape[0] == len(new_group.classnames)


def test_frozen_image_encoder_reads_cached_features(tmp_path, tiny_clip, synthetic_splits):
    calls = []
    handle = tiny_clip.model.visual.conv1.register_forward_hook(lambda *args: calls.append(1))
    try:
        train(config(tmp_path, "first", method="coop"), clip=tiny_clip, splits=synthetic_splits)
        assert calls  # features computed once: 3 augmented epochs + the test images
        calls.clear()
        train(
            config(tmp_path, "second", method="coop", loss="label_smoothing"),
            clip=tiny_clip,
            splits=synthetic_splits,
        )
        assert calls == []
        train(
            config(tmp_path, "third", method="vpt", vision_depth=2, epochs=1),
            clip=tiny_clip,
            splits=synthetic_splits,
        )
        assert calls  # a prompted image encoder runs
    finally:
        handle.remove()


def test_augmented_epochs_cycle_and_protocol_all(tmp_path, tiny_clip, synthetic_splits, monkeypatch):
    import fastcal.models.cache as cache

    epochs_read = []
    original = cache.image_features

    def recording(*args, **kwargs):
        epochs_read.append(kwargs.get("epoch"))
        return original(*args, **kwargs)

    monkeypatch.setattr(cache, "image_features", recording)
    cfg = config(tmp_path, method="coop", epochs=5, augment_epochs=2, protocol="all", shots=2)
    results = train(cfg, clip=tiny_clip, splits=synthetic_splits)
    assert epochs_read[:5] == [0, 1, 0, 1, 0]  # the training epochs (then the test images, if read here)
    assert set(results) == {"all", "config", "train"} and results["all"]["count"] == len(
        synthetic_splits.test
    )
    epochs_read.clear()
    train(
        config(tmp_path, "plain", method="coop", epochs=2, augment=False),
        clip=tiny_clip,
        splits=synthetic_splits,
    )
    assert epochs_read[:2] == [None, None]


def test_sixteen_shots_of_the_testbed_base_classes():
    from fastcal.data.testbed import digits_splits

    data = run_data(digits_splits(0), shots=16, seed=1, protocol="base2new")
    counts = torch.bincount(torch.tensor([label for _, label in data.train_items]))
    assert counts.tolist() == [16] * 5 and data.train_classnames == ["zero", "one", "two", "three", "four"]
    assert [g.classnames for g in data.groups][1] == ["five", "six", "seven", "eight", "nine"]


def test_a_non_finite_epoch_loss_stops_the_run(tmp_path, tiny_clip, synthetic_splits):
    class NanRegularizer(CountingRegularizer):
        def __call__(self, batch):
            return super().__call__(batch) * float("nan")

    with registry.registered("regularizer", "nan", NanRegularizer):
        run = config(tmp_path, "nan", method="coop", loss="calibrated", regularizers=["nan"])
        with pytest.raises(FloatingPointError, match="epoch 1: expected a finite training loss, got nan"):
            train(run, clip=tiny_clip, splits=synthetic_splits)
