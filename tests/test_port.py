"""Porting from the commands to one's own code: a CoOp training run and a C-TPT run driven only through
the public API (no ``_`` name, no private module) give what ``fastcal train`` and ``fastcal tpt`` give."""

import json

import numpy as np
import torch

from fastcal.cli import main
from fastcal.data.items import ImageListDataset, load_image
from fastcal.data.testbed import digits_splits
from fastcal.methods import build_method, training_step
from fastcal.models.testbed import load_testbed_clip
from fastcal.runs import tpt as tpt_runs
from fastcal.runs.predictions import predictions_path
from fastcal.runs.train.data import epoch_batches, run_data
from fastcal.runs.train.loop import learning_rate_factor
from fastcal.tpt import TPT, TuningConfig, ctpt_config, sample_generator


def features_of(method, items, classnames, transform):
    images, labels = zip(*ImageListDataset(items, classnames, transform), strict=True)
    return method.prepare_inputs(torch.stack(images)), torch.tensor(labels)


def test_coop_with_the_calibrated_loss_through_the_public_api_equals_the_command(testbed_cache, tmp_path):
    run = tmp_path / "coop"
    settings = ["--shots", "4", "--epochs", "2", "--warmup-epochs", "0", "--no-augment"]
    assert (
        main(
            ["train", "--method", "coop", "--loss", "calibrated", *settings, "--output", str(run), "--quiet"]
        )
        == 0
    )
    results = json.loads((run / "results.json").read_text())
    config = results["config"]

    clip = load_testbed_clip()
    data = run_data(digits_splits(), shots=4, seed=config["seed"], protocol="base2new")
    coop = build_method("coop", clip.model, clip.tokenizer, data.train_classnames)
    optimizer = torch.optim.SGD(
        [p for _, p in coop.tuned_parameters()],
        lr=config["lr"],
        momentum=config["momentum"],
        weight_decay=config["weight_decay"],
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda e: learning_rate_factor(e, epochs=2, lr=config["lr"], warmup_epochs=0, warmup_lr=1e-5),
    )
    step = training_step(coop, "calibrated", optimizer, templates=data.templates[:1])
    features, labels = features_of(coop, data.train_items, data.train_classnames, clip.eval_transform)
    losses = []
    for epoch in range(2):
        step.start_epoch(epoch)
        batches = epoch_batches(len(labels), config["batch_size"], seed=config["seed"], epoch=epoch)
        epoch_loss = [step.from_features(features[b], labels[b]).loss * len(b) for b in batches]
        losses.append(float(sum(epoch_loss)) / sum(len(b) for b in batches))
        schedule.step()

    history = [entry["loss"] for entry in results["train"]["history"]]
    np.testing.assert_allclose(losses, history, rtol=1e-5)
    saved = torch.load(run / "prompt.pt", weights_only=True)
    torch.testing.assert_close(coop.tuned_state_dict(), saved["tuned"], atol=1e-6, rtol=1e-5)

    new = data.groups[1]
    coop.eval()
    coop.set_classnames(new.classnames)
    with torch.no_grad():
        new_features, new_labels = features_of(coop, new.items, new.classnames, clip.eval_transform)
        logits = coop.forward_features(new_features)
    predicted = np.load(predictions_path(run, "new"))
    np.testing.assert_array_equal(predicted["labels"], new_labels.numpy())
    np.testing.assert_allclose(predicted["logits"], logits.numpy(), atol=1e-4, rtol=1e-5)


def test_ctpt_through_the_public_api_equals_the_command(testbed_cache, tmp_path):
    run = tmp_path / "ctpt"
    assert (
        main(["tpt", "--method", "ctpt", "--views", "16", "--limit", "4", "--output", str(run), "--quiet"])
        == 0
    )
    config = json.loads((run / "results.json").read_text())["config"]
    # the recipe the command resolved for the testbed: C-TPT's lambda 50 and AugMix (not ImageNet), no flips
    assert (config["tuning"]["dispersion_weight"], config["augmix"], config["flip"]) == (50.0, True, False)

    clip = load_testbed_clip()
    task = tpt_runs.testbed_task(limit=4, seed=0)
    tuning = ctpt_config(TuningConfig(n_views=16), dispersion_weight=50.0)
    tpt = TPT(clip.model, clip.tokenizer, task.classnames, config=tuning, augmix=True, flip=False)
    images = [load_image(image) for image, _ in task.items]
    logits = tpt.predict(images, [sample_generator(0, i) for i in range(len(images))])

    predicted = np.load(predictions_path(run, task.name))
    np.testing.assert_array_equal(predicted["labels"], [label for _, label in task.items])
    np.testing.assert_allclose(predicted["logits"], logits.numpy(), atol=1e-5, rtol=1e-5)
