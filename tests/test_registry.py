"""fastcal.registry: one registry of everything a run chooses by name; a method registered from this file
(one class plus one ``register`` call, no fastcal file touched) trains and evaluates through the CLI."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastcal import registry
from fastcal.cli import main
from fastcal.methods.base import MethodSpec, PromptMethod, clip_logits
from fastcal.models.cache import class_text_features

TEMPLATE = ["a photo of a {}."]


class ScaledZeroShot(PromptMethod):
    """A toy prompt method: the hand-crafted prompt's class features with a learned scale per feature
    dimension (the image encoder frozen, so it trains on cached features)."""

    input_kind = "features"

    def __init__(self, model, tokenizer, classnames, *, ctx_init=None):
        super().__init__(model, tokenizer)
        width = model.text_projection.shape[1]
        self.scale = nn.Parameter(torch.ones(width))
        self.set_classnames(classnames)

    @property
    def classnames(self):
        return list(self._classnames)

    def set_classnames(self, classnames):
        self._classnames = list(classnames)
        features = class_text_features(self.clip_model, self.tokenizer, self._classnames, TEMPLATE)
        self.register_buffer("zeroshot_features", F.normalize(features.float(), dim=-1), persistent=False)

    def class_features(self):
        return self.zeroshot_features.to(self.scale.device) * self.scale

    def output(self, image_features):
        return clip_logits(image_features, self.class_features(), self.clip_model.logit_scale)


TOY = MethodSpec(
    name="toy",
    title="Scaled zero-shot (toy)",
    build=ScaledZeroShot,
    options=("ctx_init",),
    recipe=dict(
        epochs=2, batch_size=8, lr=0.05, momentum=0.9, weight_decay=0.0, warmup_epochs=0, warmup_lr=1e-5
    ),
    source="this test",
)


def test_names_entries_and_errors():
    assert registry.names("prompt_method")[:5] == ("coop", "cocoop", "kgcoop", "maple", "vpt")
    assert {"ft", "flyp", "carot"} <= set(registry.names("finetune_method"))
    assert registry.get("loss", "calibrated").name == "calibrated"
    with pytest.raises(ValueError, match="method: expected one of coop, cocoop"):
        registry.get("prompt_method", "nosuch", argument="method")
    with pytest.raises(ValueError, match="kind: expected one of prompt_method"):
        registry.names("nosuch_kind")
    with registry.registered("loss", "ce", "tests.nowhere:X"):
        assert registry.names("loss").count("ce") == 1
    assert registry.get("loss", "ce").name == "ce"  # the built-in entry is back


def test_a_method_registered_here_trains_and_evaluates_through_the_commands(testbed_cache, tmp_path, capsys):
    run = tmp_path / "run"
    with registry.registered("prompt_method", "toy", TOY):
        assert main(["train", "--method", "toy", "--shots", "4", "--output", str(run), "--quiet"]) == 0
        results = json.loads((run / "results.json").read_text())
        assert results["config"]["method"] == "toy" and results["config"]["recipe_source"] == "this test"
        assert len(results["train"]["history"]) == 2  # the toy's recipe: 2 epochs
        assert results["base"]["count"] + results["new"]["count"] == 720
        assert (run / "predictions" / "new.npz").is_file()
        assert main(["eval", "--run", str(run), "--targets", "testbed_shifted", "--quiet"]) == 0
        shifted = json.loads((run / "eval.json").read_text())["targets"]["testbed_shifted"]
        assert 0.0 < shifted["new"]["accuracy"] <= 1.0
    capsys.readouterr()
    assert main(["train", "--method", "toy", "--output", str(tmp_path / "gone")]) == 2
    assert "--method: expected one of 'coop'" in capsys.readouterr().err
