"""TrainConfig: defaults < the method's recipe (< its testbed schedule without a dataset) < YAML <
overrides, typed parsing of command-line strings, and clear errors."""

import pytest

from fastcal.methods.base import get_method
from fastcal.runs.options import coerce, parse_scalar
from fastcal.runs.train.config import TrainConfig


def test_precedence_recipe_yaml_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("method: kgcoop\nlr: 0.01\nbatch_size: 64\nregularizer_options: {}\n")
    config = TrainConfig.from_sources(
        yaml_path=path, overrides={"batch_size": "16", "dataset": "dtd", "root": "/d"}
    )
    resolved = config.resolved()
    recipe = get_method("kgcoop").recipe
    assert resolved.lr == 0.01 and resolved.batch_size == 16  # YAML, then the override
    assert (
        resolved.epochs == recipe["epochs"] == 100 and resolved.n_ctx == 4 and resolved.kgcoop_weight == 8.0
    )
    assert resolved.ctx_init == "a photo of a" and resolved.momentum == 0.9 and resolved.weight_decay == 5e-4
    assert resolved.label_smoothing == 0.0


def test_testbed_schedule_applies_without_a_dataset():
    spec = get_method("vpt")
    on_testbed = TrainConfig(method="vpt").resolved()
    assert on_testbed.epochs == spec.testbed_recipe["epochs"] and on_testbed.vision_depth == 3
    assert on_testbed.n_ctx_vision == spec.recipe["n_ctx_vision"] == 8
    real = TrainConfig(method="vpt", dataset="dtd", root="/data").resolved()
    assert real.epochs == 5 and real.vision_depth == 12 and real.batch_size == 4 and real.lr == 0.0025
    explicit = TrainConfig(method="vpt", epochs=2).resolved()
    assert explicit.epochs == 2
    assert TrainConfig(loss="label_smoothing").resolved().label_smoothing == 0.1


def test_dataset_recipes_apply_on_their_dataset_only():
    """The per-dataset values of a method's code (TCP's templates and ImageNet / SUN397 epochs, ProGrad's
    teacher templates) sit between its recipe and the user's settings."""
    ucf = TrainConfig(method="tcp", dataset="ucf101", root="/d").resolved()
    assert ucf.name_template == "person doing {}." and ucf.text_template == "a photo of a person doing {}."
    assert ucf.epochs == 50 and ucf.optimizer == "adam" and ucf.adam_eps == 1e-3
    assert TrainConfig(method="tcp", dataset="sun397", root="/d").resolved().epochs == 25
    assert TrainConfig(method="tcp", dataset="sun397", root="/d", epochs=3).resolved().epochs == 3
    testbed = TrainConfig(method="tcp").resolved()
    assert testbed.name_template == "{}." and testbed.inject_layer == 2
    pets = TrainConfig(method="prograd", dataset="oxford_pets", root="/d").resolved()
    assert pets.ctx_init == "a type of pet, a photo of a" and pets.n_ctx == 16
    assert TrainConfig(method="prograd").resolved().text_template is None  # the testbed's own prompt
    assert TrainConfig(method="coop").resolved().optimizer == "sgd"


def test_command_line_strings_are_typed():
    config = TrainConfig.from_dict(
        {
            "lr": "1e-3",
            "epochs": "7",
            "ctx_init": None,
            "class_specific": "true",
            "regularizers": "dor,kgcoop",
            "regularizer_options": "{dor: {weight: 2, mode: far}}",
            "augment-epochs": "4",
        }
    )
    assert (
        config.lr == 0.001
        and config.epochs == 7
        and config.ctx_init is None
        and config.class_specific is True
    )
    assert config.regularizers == ["dor", "kgcoop"] and config.augment_epochs == 4
    assert config.regularizer_options == {"dor": {"weight": 2, "mode": "far"}}
    assert TrainConfig.from_dict({"ctx_init": "a photo of a"}).ctx_init == "a photo of a"
    assert parse_scalar("0.5") == 0.5 and parse_scalar("~") is None and parse_scalar("[1, 2]") == [1, 2]
    assert coerce("x", "3", float) == 3.0 and coerce("x", 4.0, int) == 4


@pytest.mark.parametrize(
    ("values", "match"),
    [
        ({"lrr": 0.1}, "setting: expected one of"),
        ({"lr": "fast"}, "lr: expected a number"),
        ({"epochs": 2.5}, "epochs: expected an integer"),
        ({"class_specific": "maybe"}, "class_specific: expected true or false"),
        ({"method": "clip-adapter"}, "method"),
        ({"loss": "hinge"}, "loss"),
        ({"protocol": "fewshot"}, "protocol"),
        ({"shots": 0}, "shots"),
        ({"lr": -1.0}, "lr"),
        ({"margin_alpha": -0.1}, "margin_alpha: expected a number >= 0"),
        ({"dataset": "dtd"}, "root"),
        ({"regularizer_options": {"dor": {}}}, "regularizer_options"),
        ({"optimizer": "adamw"}, "optimizer: expected one of 'sgd', 'adam'"),
        ({"prograd_lambda": 1.5}, "prograd_lambda"),
        ({"gpa_std": 0.0}, "gpa_std"),
        ({"name_template": "no name"}, "name_template"),
        ({"inject_layer": -1}, "inject_layer"),
    ],
)
def test_invalid_values(values, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig.from_dict(values)


def test_missing_yaml_and_non_mapping(tmp_path):
    with pytest.raises(FileNotFoundError, match="config"):
        TrainConfig.from_sources(yaml_path=tmp_path / "absent.yaml")
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="mapping"):
        TrainConfig.from_sources(yaml_path=path)
