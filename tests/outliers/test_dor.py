"""DOR: the drift term against an independent full-length forward, its gradients, per-epoch outliers,
the trainer's factory, and a short training run with the regularizer."""

import copy
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastcal.methods.cocoop import CoCoOp
from fastcal.methods.coop import CoOp
from fastcal.methods.maple import MaPLe
from fastcal.methods.objectives import StepBatch
from fastcal.methods.proda import ProDA
from fastcal.methods.tcp import TCP
from fastcal.methods.vpt import VPT
from fastcal.models.fingerprint import model_fingerprint
from fastcal.outliers.bank import OutlierBank
from fastcal.outliers.dor import DORegularizer, build_dor, dor_weight, tuned_term_features
from fastcal.outliers.selection import select_outliers
from fastcal.outliers.vocabulary import Vocabulary

TEMPLATE = "a photo of a {}."
CLASSNAMES = ["cat", "dog", "horse"]
WORDS = [
    "wolf",
    "fox",
    "hyena",
    "tiger",
    "lion",
    "pony",
    "donkey",
    "zebra",
    "puppy",
    "kitten",
    "toaster",
    "sofa",
]


def _pool(model, tokenizer, tmp_path, k=9):
    bank = OutlierBank.build(
        model, tokenizer, Vocabulary(WORDS), TEMPLATE, cache_dir=tmp_path, progress=False
    )
    with torch.no_grad():
        classes = F.normalize(model.encode_text(tokenizer([TEMPLATE.format(c) for c in CLASSNAMES])), dim=-1)
    return select_outliers(bank, classes, CLASSNAMES, k=k)


def _reference_term_features(model, tokenizer, terms, ctx):
    """Full-length (77 positions) CLIP text forward of "a photo of a <term>." with the four phrase
    embeddings replaced by ``ctx``, written from open_clip's modules (no fastcal encoder)."""
    ids = tokenizer([TEMPLATE.format(t) for t in terms])
    x = model.token_embedding(ids)
    x = torch.cat([x[:, :1], ctx.unsqueeze(0).expand(len(terms), -1, -1), x[:, 1 + ctx.shape[0] :]], dim=1)
    x = x + model.positional_embedding
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask))
    return x[torch.arange(len(terms)), ids.argmax(dim=-1)] @ model.text_projection


def test_dor_weights_follow_the_papers_recipe():
    assert dor_weight("coop") == 8.0
    assert dor_weight("cocoop") == dor_weight("kgcoop") == dor_weight("maple") == 2.0
    assert dor_weight("tcp") == dor_weight("vpt") == 2.0


def test_drift_is_zero_while_the_context_is_the_template(tiny_clip, tmp_path):
    model, tokenizer = tiny_clip
    method = CoOp(copy.deepcopy(model), tokenizer, CLASSNAMES, ctx_init="a photo of a")
    dor = DORegularizer(_pool(model, tokenizer, tmp_path), weight=8.0, n_outliers=5)
    assert float(dor.drift(method).detach()) < 1e-6


def test_drift_matches_an_independent_forward(tiny_clip, tmp_path):
    model, tokenizer = tiny_clip
    method = CoOp(copy.deepcopy(model), tokenizer, CLASSNAMES, ctx_init="a photo of a")
    with torch.no_grad():
        method.prompt_learner.ctx.add_(0.3 * torch.randn_like(method.prompt_learner.ctx))
    pool = _pool(model, tokenizer, tmp_path)
    dor = DORegularizer(pool, weight=8.0, n_outliers=6, seed=2)
    dor.on_epoch_start(3)
    model64 = copy.deepcopy(model).double()
    with torch.no_grad():
        tuned = _reference_term_features(model64, tokenizer, dor.terms, method.prompt_learner.ctx.double())
        frozen = F.normalize(model64.encode_text(tokenizer([TEMPLATE.format(t) for t in dor.terms])), dim=-1)
    expected = 1 - F.cosine_similarity(tuned, frozen, dim=-1).mean()
    drift = dor.drift(method)
    assert float(expected) > 1e-3
    torch.testing.assert_close(drift.double(), expected, atol=2e-6, rtol=1e-4)
    batch = SimpleNamespace(method=method, output=SimpleNamespace(image_features=None))
    torch.testing.assert_close(dor(batch), 8.0 * drift)


def test_gradient_reaches_only_the_prompt_parameters(tiny_clip, tmp_path):
    model, tokenizer = tiny_clip
    method = CoOp(copy.deepcopy(model), tokenizer, CLASSNAMES, ctx_init="a photo of a")
    with torch.no_grad():
        method.prompt_learner.ctx.add_(0.3 * torch.randn_like(method.prompt_learner.ctx))
    pool = _pool(model, tokenizer, tmp_path)
    targets_before = pool.features.clone()
    dor = DORegularizer(pool, weight=2.0, n_outliers=4)
    dor(SimpleNamespace(method=method, output=SimpleNamespace(image_features=None))).backward()
    tuned = {name for name, _ in method.tuned_parameters()}
    assert tuned == {"prompt_learner.ctx"}
    for name, p in method.named_parameters():
        if name in tuned:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
        else:
            assert p.grad is None, name
    assert not dor.targets.requires_grad
    assert torch.equal(pool.features, targets_before)


def test_gradient_matches_finite_differences(tiny_clip, tmp_path):
    """d drift / d ctx along a random direction, in float64, against central differences."""
    model, tokenizer = tiny_clip
    model64 = copy.deepcopy(model).double()
    method = CoOp(model64, tokenizer, CLASSNAMES, ctx_init="a photo of a")
    learner = method.prompt_learner
    learner.ctx = nn.Parameter(learner.ctx.detach().double() + 0.2 * torch.randn_like(learner.ctx).double())
    dor = DORegularizer(_pool(model, tokenizer, tmp_path), weight=1.0, n_outliers=5)
    dor.targets = dor.targets.double()
    dor.drift(method).backward()
    direction = torch.randn_like(learner.ctx)
    h = 1e-5
    with torch.no_grad():
        base = learner.ctx.detach().clone()
        learner.ctx.copy_(base + h * direction)
        up = dor.drift(method)
        learner.ctx.copy_(base - h * direction)
        down = dor.drift(method)
    torch.testing.assert_close(
        (learner.ctx.grad * direction).sum(), (up - down) / (2 * h), rtol=1e-5, atol=1e-9
    )


def test_cocoop_outliers_use_the_image_conditioned_context(tiny_clip, tmp_path):
    model, tokenizer = tiny_clip
    method = CoCoOp(copy.deepcopy(model), tokenizer, CLASSNAMES, ctx_init="a photo of a")
    image_features = torch.randn(3, model.visual.output_dim)
    dor = DORegularizer(_pool(model, tokenizer, tmp_path), weight=2.0, n_outliers=4)
    dor.on_epoch_start(0)
    dor(SimpleNamespace(method=method, output=SimpleNamespace(image_features=image_features))).backward()
    grads = {name: p.grad for name, p in method.tuned_parameters()}
    assert grads["prompt_learner.ctx"] is not None
    assert all(grads[n] is not None and grads[n].abs().sum() > 0 for n in grads if n.startswith("meta_net"))
    expected_ctx = method.conditioned_context(image_features).mean(dim=0)
    torch.testing.assert_close(
        tuned_term_features(method, dor.terms, image_features),
        method.prompt_learner.encode_terms(dor.terms, expected_ctx),
    )


def test_maple_outliers_go_through_the_deep_text_prompts(tiny_clip, tmp_path):
    model, tokenizer = tiny_clip
    method = MaPLe(copy.deepcopy(model), tokenizer, CLASSNAMES, n_ctx=2, prompt_depth=2)
    terms = ["wolf", "zebra"]
    with_deep = tuned_term_features(method, terms)
    without = method.prompt_learner.encode_terms(terms)
    assert not torch.allclose(with_deep, without)
    with_deep.sum().backward()
    assert method.compound_prompts_text[0].grad is not None
    assert method.prompt_learner.ctx.grad is not None


def test_tcp_outliers_get_class_tokens_from_their_frozen_features(tiny_clip, tmp_path):
    """TCP: an outlier's tuned feature is its word in the tuned template with TKE(t_o) injected, t_o its
    frozen feature (the pool's target); gradients reach the context and the TKE."""
    model, tokenizer = tiny_clip
    method = TCP(copy.deepcopy(model), tokenizer, CLASSNAMES, inject_layer=2)
    dor = DORegularizer(_pool(model, tokenizer, tmp_path), weight=2.0, n_outliers=4)
    dor.on_epoch_start(0)
    tuned, anchor = method.outlier_drift_pair(dor.terms, dor.targets)
    torch.testing.assert_close(anchor, dor.targets)
    layer, tokens = method.class_tokens(dor.targets)
    expected = method.prompt_learner.encode_terms(dor.terms, injected=(layer, tokens))
    torch.testing.assert_close(tuned, expected)
    dor(SimpleNamespace(method=method, output=SimpleNamespace(image_features=None))).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in method.tuned_parameters())


def test_vpt_outliers_keep_the_images_similarity_profiles(tiny_clip, tmp_path):
    """VPT's text is frozen (the text-side drift would be zero); fastcal's image-side DOR compares, per
    image, the centered cosines to the outliers' frozen features under the prompted and the frozen image
    encoder."""
    model, tokenizer = tiny_clip
    method = VPT(copy.deepcopy(model), tokenizer, CLASSNAMES, n_ctx_vision=2, vision_depth=2)
    images = torch.randn(3, 3, 32, 32)
    out = method.output(images)
    batch = StepBatch(out, torch.tensor([0, 1, 2]), method, None, 0, images)
    dor = DORegularizer(_pool(model, tokenizer, tmp_path), weight=2.0, n_outliers=5)
    dor.on_epoch_start(0)
    loss = dor(batch)
    with torch.no_grad():
        frozen = F.normalize(model.encode_image(images), dim=-1) @ dor.targets.T
        tuned = F.normalize(method.encode_images(images), dim=-1) @ dor.targets.T
        centered = [x - x.mean(dim=1, keepdim=True) for x in (tuned, frozen)]
    expected = 2.0 * (1 - F.cosine_similarity(*centered, dim=-1).mean())
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-5)
    assert float(loss.detach()) > 0
    loss.backward()
    assert method.visual_prompts.prompts.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="batch"):
        method.outlier_drift_pair(dor.terms, dor.targets)


def test_outliers_are_redrawn_per_epoch_and_restored_on_resume(tiny_clip, tmp_path):
    model, tokenizer = tiny_clip
    pool = _pool(model, tokenizer, tmp_path)
    dor = DORegularizer(pool, weight=8.0, n_outliers=4, seed=7)
    dor.on_epoch_start(0)
    first = list(dor.terms)
    dor.on_epoch_start(1)
    assert dor.terms != first
    assert set(dor.terms) <= set(pool.terms)
    torch.testing.assert_close(dor.targets, pool.features[[pool.terms.index(t) for t in dor.terms]])
    resumed = DORegularizer(pool, weight=8.0, n_outliers=4, seed=7)
    resumed.load_state_dict(dor.state_dict())
    assert resumed.terms == dor.terms and resumed.epoch == 1


def _setup(model, tokenizer, method_name, method, options, tmp_path, extras=None):
    return SimpleNamespace(
        name="dor",
        method_name=method_name,
        method=method,
        model=model,
        model_key=model_fingerprint(model),
        tokenizer=tokenizer,
        classnames=CLASSNAMES,
        templates=[TEMPLATE, "a drawing of a {}."],
        options=options,
        seed=1,
        device=torch.device("cpu"),
        cache_dir=tmp_path,
        progress=False,
        extras=extras or {},
    )


def test_factory_reads_options_and_defaults(tiny_clip, tmp_path):
    model, tokenizer = tiny_clip
    words = tmp_path / "words.txt"
    words.write_text("\n".join([*WORDS, "cats"]))
    method = CoOp(copy.deepcopy(model), tokenizer, CLASSNAMES, ctx_init="a photo of a")
    dor = build_dor(
        _setup(model, tokenizer, "coop", method, {"vocabulary": str(words), "pool_size": 7}, tmp_path)
    )
    assert dor.weight == 8.0 and len(dor.pool) == 7 and "cats" not in dor.pool.terms
    assert dor.sampler.n_outliers == 7
    options = {"vocabulary": str(words), "n_outliers": 3, "tau": 0.5, "strategy": "far"}
    dor = build_dor(_setup(model, tokenizer, "kgcoop", method, options, tmp_path))
    assert dor.weight == 2.0 and dor.sampler.n_outliers == 3 and dor.pool.strategy == "far"
    oracle = build_dor(
        _setup(
            model,
            tokenizer,
            "coop",
            method,
            {"strategy": "oracle", "weight": 1.5},
            tmp_path,
            extras={"eval_classnames": {"base": CLASSNAMES, "new": ["zebra", "lion"]}},
        )
    )
    assert oracle.pool.terms == ("zebra", "lion") and oracle.weight == 1.5


def test_factory_errors(tiny_clip, tmp_path):
    model, tokenizer = tiny_clip
    method = CoOp(copy.deepcopy(model), tokenizer, CLASSNAMES)
    with pytest.raises(ValueError, match=r"regularizer_options\['dor'\]: expected options among"):
        build_dor(_setup(model, tokenizer, "coop", method, {"lambda": 3}, tmp_path))
    proda = ProDA(copy.deepcopy(model), tokenizer, CLASSNAMES, n_ctx=4, n_prompts=4)
    with pytest.raises(ValueError, match="method: expected a method whose tuned prompt DOR can regularize"):
        build_dor(_setup(model, tokenizer, "proda", proda, {}, tmp_path))
    with pytest.raises(ValueError, match="strategy"):
        build_dor(_setup(model, tokenizer, "coop", method, {"strategy": "nearest"}, tmp_path))
    with pytest.raises(FileNotFoundError, match="vocabulary: no such file"):
        build_dor(
            _setup(model, tokenizer, "coop", method, {"vocabulary": str(tmp_path / "none.txt")}, tmp_path)
        )


def test_training_with_the_dor_regularizer(tiny_clip, tmp_path):
    """``fastcal.runs.train`` with ``regularizers: [dor]``: the loss includes lambda * drift, the checkpoint
    keeps the outlier epoch, the results have both class groups."""
    from fastcal.data.items import DatasetSplits
    from fastcal.data.testbed import digits_splits
    from fastcal.models.clip import LoadedClip
    from fastcal.models.testbed import make_testbed_transforms
    from fastcal.runs.train import TrainConfig, train

    model, tokenizer = tiny_clip
    full = digits_splits(0)
    splits = DatasetSplits(full.name, full.classnames, full.templates, full.train, [], full.test[::12])
    clip = LoadedClip(copy.deepcopy(model), tokenizer, *make_testbed_transforms())
    words = tmp_path / "words.txt"
    words.write_text(
        "\n".join(["ten", "eleven", "dozen", "digit", "numeral", "letter", "zero", "pair", "fox"])
    )

    def run(regularizers, output):
        config = TrainConfig(
            method="coop",
            regularizers=regularizers,
            regularizer_options={"dor": {"vocabulary": str(words), "n_outliers": 4}} if regularizers else {},
            epochs=1,
            shots=2,
            augment=False,
            progress=False,
            cache_dir=str(tmp_path / "cache"),
            output=str(tmp_path / output),
        )
        return train(config, clip=clip, splits=splits)

    with_dor = run(["dor"], "dor")
    plain = run([], "plain")
    assert set(with_dor) >= {"base", "new", "hm"}
    assert with_dor["config"]["regularizers"] == ["dor"]
    # Epoch 0 runs at the warm-up rate (1e-5), so the context barely moves: the loss difference is
    # lambda (8 for CoOp) times the drift of the random initial context.
    gap = with_dor["train"]["history"][0]["loss"] - plain["train"]["history"][0]["loss"]
    from fastcal.outliers.selection import build_outlier_pool
    from fastcal.runs.train import load_prompt

    method = load_prompt(tmp_path / "dor", clip)
    base = with_dor["config"]
    pool = build_outlier_pool(
        clip.model,
        tokenizer,
        method.classnames,
        splits.templates[0],
        vocabulary=Vocabulary(words.read_text().split("\n")),
        cache_dir=tmp_path / "cache",
        progress=False,
    )
    dor = DORegularizer(pool, weight=dor_weight("coop"), n_outliers=4, seed=base["seed"])
    with torch.no_grad():
        expected = dor(SimpleNamespace(method=method, output=SimpleNamespace(image_features=None)))
    assert gap == pytest.approx(float(expected), rel=0.05)
    checkpoint = torch.load(tmp_path / "dor" / "checkpoint.pt", weights_only=False)
    assert checkpoint["step"]["regularizers"]["dor"] == {"epoch": 0}


def test_train_command_takes_regularizer_dor():
    """``fastcal train --method coop --regularizer dor``: the singular flag fills ``regularizers``."""
    from fastcal.cli import _build_parser
    from fastcal.runs.options import settings_from_args
    from fastcal.runs.train import TrainConfig

    args = _build_parser("train").parse_args(
        ["train", "--method", "coop", "--regularizer", "dor", "--regularizer-options", "{dor: {weight: 4}}"]
    )
    config = settings_from_args(args, TrainConfig)
    assert config.regularizers == ["dor"]
    assert config.regularizer_options == {"dor": {"weight": 4}}


def test_demo_row_says_so_without_wordnet(monkeypatch, tmp_path):
    """Without WordNet the demo's CoOp + DOR stage returns a row that says why, and the table prints it."""
    import fastcal.outliers.wordnet as wordnet_module
    from fastcal.runs.demo.prompt_tuning import coop_dor_stage
    from fastcal.runs.rows import check_row, format_table

    def missing(*args, **kwargs):
        raise wordnet_module.WordNetNotFoundError("WordNet 3.0: expected ..., got neither")

    monkeypatch.setattr(wordnet_module, "ensure_wordnet", missing)
    (row,) = coop_dor_stage(SimpleNamespace(output=tmp_path))
    assert row["metrics"] == {}
    assert "no WordNet" in row["method"] and "fastcal wordnet" in row["method"]
    assert row["notes"]["skipped"].startswith("WordNet 3.0")
    table = format_table([check_row("coop_dor", row)])
    assert "CoOp + DOR (not run: no WordNet" in table


@pytest.mark.parametrize(
    ("method", "loss"),
    [("kgcoop", "calibrated"), ("cocoop", "ce"), ("maple", "ce"), ("tcp", "label_smoothing"), ("vpt", "ce")],
)
def test_dor_trains_with_the_other_methods(tiny_clip, tmp_path, method, loss):
    """One epoch of each other method with DOR (KgCoOp with TCPT's calibrated loss too)."""
    from fastcal.data.items import DatasetSplits
    from fastcal.data.testbed import digits_splits
    from fastcal.models.clip import LoadedClip
    from fastcal.models.testbed import make_testbed_transforms
    from fastcal.runs.train import TrainConfig, train

    model, tokenizer = tiny_clip
    full = digits_splits(0)
    splits = DatasetSplits(full.name, full.classnames, full.templates, full.train, [], full.test[::24])
    clip = LoadedClip(copy.deepcopy(model), tokenizer, *make_testbed_transforms())
    words = tmp_path / "words.txt"
    words.write_text("\n".join(["ten", "eleven", "dozen", "digit", "numeral", "letter", "pair", "fox"]))
    config = TrainConfig(
        method=method,
        loss=loss,
        regularizers=["dor"],
        regularizer_options={"dor": {"vocabulary": str(words), "n_outliers": 3}},
        epochs=1,
        shots=1,
        batch_size=5,
        augment=False,
        progress=False,
        cache_dir=str(tmp_path / "cache"),
        output=str(tmp_path / "run"),
    )
    results = train(config, clip=clip, splits=splits)
    assert {"base", "new"} <= set(results)
    history = results["train"]["history"]
    assert len(history) == 1 and math.isfinite(history[0]["loss"])
    checkpoint = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert checkpoint["step"]["regularizers"]["dor"] == {"epoch": 0}
