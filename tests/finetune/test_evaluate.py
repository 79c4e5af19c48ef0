import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms as T

from fastcal.calibrate import fit_temperature
from fastcal.finetune.evaluate import (
    EvalSet,
    FeatureClassifier,
    calibration_entry,
    diagram_writer,
    evaluate,
    mean_entry,
    predict_logits,
)
from fastcal.metrics import calibration_summary


def _logits(n, c, seed):
    g = torch.Generator().manual_seed(seed)
    logits = 4 * torch.randn(n, c, generator=g, dtype=torch.float64)
    labels = torch.randint(c, (n,), generator=g)
    return logits, labels


def test_calibration_entry_with_and_without_temperature():
    logits, labels = _logits(41, 6, seed=0)
    entry = calibration_entry(logits, labels, 1.7, n_bins=10)
    assert entry == {
        **calibration_summary(logits.softmax(1), labels, n_bins=10),
        "temperature": 1.7,
        "temperature_scaled": calibration_summary((logits / 1.7).softmax(1), labels, n_bins=10),
    }
    assert entry["n_bins"] == 10


def test_mean_entry_averages_metrics_and_sums_counts():
    a = calibration_entry(*_logits(30, 4, seed=1), 1.2)
    b = calibration_entry(*_logits(50, 4, seed=2), 0.8)
    mean = mean_entry([a, b])
    assert mean["accuracy"] == pytest.approx((a["accuracy"] + b["accuracy"]) / 2)
    assert mean["temperature_scaled"]["ece"] == pytest.approx(
        (a["temperature_scaled"]["ece"] + b["temperature_scaled"]["ece"]) / 2
    )
    assert mean["count"] == 80 and mean["n_bins"] == 10
    with pytest.raises(ValueError, match="entries"):
        mean_entry([])


def test_eval_set_projection_takes_the_max_over_column_groups():
    eval_set = EvalSet(
        "grouped",
        ["a", "b"],
        ["{}"],
        [("x", 0)],
        scored_classnames=["p", "q", "r", "s"],
        columns=((0, 2), (3,)),
    )
    logits = torch.tensor([[1.0, 9.0, 3.0, -1.0], [5.0, 0.0, 2.0, 7.0]])
    assert torch.equal(eval_set.project(logits), torch.tensor([[3.0, -1.0], [5.0, 7.0]]))
    assert eval_set.classifier_classnames == ["p", "q", "r", "s"]
    with pytest.raises(ValueError, match="columns"):
        EvalSet("bad", ["a"], ["{}"], [("x", 0)], scored_classnames=["p"])
    with pytest.raises(ValueError, match="items"):
        EvalSet("empty", ["a"], ["{}"], [])


def _items(n, classes, seed, size=20):
    rng = np.random.default_rng(seed)
    return [
        (Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)), i % classes)
        for i in range(n)
    ]


def _classifier(tiny, classes=3):
    model = tiny.build_tiny_clip(dtype=torch.float32)
    weight = 10 * F.normalize(torch.randn(classes, 12, generator=torch.Generator().manual_seed(5)), dim=-1)
    return model, FeatureClassifier(model.visual, weight, torch.linspace(-0.5, 0.5, classes))


TRANSFORM = T.Compose([T.CenterCrop(16), T.ToTensor()])


@pytest.mark.parametrize("visual_training", [False, True])
def test_predict_logits_leaves_every_module_in_its_mode(tiny_clip, visual_training):
    model, classifier = _classifier(tiny_clip)
    model.visual.train(visual_training)  # a fresh wrapper (training=True) around a tower in eval mode
    eval_set = EvalSet("s", ["a", "b", "c"], ["{}"], _items(5, 3, seed=6))
    predict_logits(classifier, eval_set, TRANSFORM, batch_size=4)
    assert classifier.training and all(m.training == visual_training for m in model.visual.modules())


def test_predict_logits_in_item_order_with_preprocess(tiny_clip):
    model, classifier = _classifier(tiny_clip)
    items = _items(11, 3, seed=0)
    eval_set = EvalSet("s", ["a", "b", "c"], ["{}"], items, image_preprocess=lambda im: im.rotate(90))
    logits, labels = predict_logits(classifier, eval_set, TRANSFORM, batch_size=4)
    images = torch.stack([TRANSFORM(image.rotate(90)) for image, _ in items])
    with torch.no_grad():
        expected = classifier.weight @ F.normalize(model.visual(images), dim=-1).T
    torch.testing.assert_close(logits, expected.T + classifier.bias, rtol=1e-5, atol=1e-5)
    assert labels.tolist() == [i % 3 for i in range(11)]


def test_evaluate_structure_temperature_and_diagrams(tiny_clip, tmp_path):
    _, classifier = _classifier(tiny_clip)
    names = ["a", "b", "c"]
    test = EvalSet("id", names, ["{}"], _items(13, 3, seed=1))
    heldout = EvalSet("held", names, ["{}"], _items(9, 3, seed=2))
    ood = [
        EvalSet("ood1", names, ["{}"], _items(7, 3, seed=3)),
        EvalSet("ood2", names, ["{}"], _items(5, 3, seed=4)),
    ]
    built = []

    def classifier_for(eval_set):
        built.append(eval_set.name)
        return classifier

    figure = diagram_writer(tmp_path / "rel", "FT")
    results = evaluate(classifier_for, test, heldout, ood, TRANSFORM, figure=figure)
    assert built == ["id", "ood1", "ood2"]
    held_logits, held_labels = predict_logits(classifier, heldout, TRANSFORM)
    temperature = fit_temperature(held_logits.double(), held_labels)
    assert results["id"]["temperature"] == pytest.approx(temperature)
    assert set(results["ood"]) == {"ood1", "ood2", "mean"}
    assert results["id"]["count"] == 13 and results["ood"]["mean"]["count"] == 12
    logits, labels = predict_logits(classifier, ood[0], TRANSFORM)
    assert results["ood"]["ood1"] == calibration_entry(logits, labels, temperature)
    files = sorted(p.name for p in (tmp_path / "rel").iterdir())
    assert files == ["id.png", "id_ts.png", "ood1.png", "ood1_ts.png", "ood2.png", "ood2_ts.png"]

    no_ood = evaluate(classifier_for, test, heldout, [], TRANSFORM)
    assert no_ood["ood"] == {} and no_ood["id"] == results["id"]
