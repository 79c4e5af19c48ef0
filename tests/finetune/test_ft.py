import pytest
import torch
import torch.nn.functional as F

from fastcal.finetune.ft import ImageClassifier, class_rows, zero_shot_head


def test_zero_shot_head_reproduces_zero_shot_clip(tiny_clip):
    model = tiny_clip.build_tiny_clip()
    images, _, tokens = tiny_clip.random_batch(5, seed=1)
    with torch.no_grad():
        class_features = model.encode_text(tokens[:4])
    classifier = ImageClassifier(model.visual, zero_shot_head(class_features, model.logit_scale).double())
    with torch.no_grad():
        expected = (
            model.logit_scale.exp()
            * F.normalize(model.encode_image(images), dim=-1)
            @ F.normalize(class_features, dim=-1).T
        )
        torch.testing.assert_close(classifier(images), expected)
    assert classifier.visual is model.visual
    assert torch.equal(classifier.head.bias, torch.zeros(4, dtype=torch.float64))


def test_ft_method_cross_entropy_reaches_image_tower_and_head_not_text(tiny_clip):
    model = tiny_clip.build_tiny_clip()
    method = tiny_clip.make_method("ft", model, label_smoothing=0.1)
    images, labels, _ = tiny_clip.random_batch(7, seed=2)
    loss, _ = method.loss(method.trainable, (images, labels, None), step=0)
    expected = F.cross_entropy(method.trainable(images), labels, label_smoothing=0.1)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert model.visual.conv1.weight.grad.abs().sum() > 0
    assert method.head.weight.grad.abs().sum() > 0
    assert model.token_embedding.weight.grad is None
    names = {n.split(".")[0] for n, _ in method.trainable.named_parameters()}
    assert names == {"visual", "head"}


def test_class_rows_maps_names_in_order_with_duplicates():
    train = ["tench", "missile", "cat", "projectile", "missile", "dog"]
    assert class_rows(train, ["cat", "dog"]) == [2, 5]
    assert class_rows(train, ["missile", "missile"]) == [1, 4]
    assert class_rows(train, ["cat", "missile"]) == [2, 4]
    assert class_rows(train, ["dog", "tench"]) == [5, 0]
    with pytest.raises(ValueError, match="eval_classnames"):
        class_rows(train, ["zebra"])


def test_image_classifier_checks_bias():
    with pytest.raises(ValueError, match="bias"):
        ImageClassifier(torch.nn.Identity(), torch.randn(3, 4), torch.zeros(2))
