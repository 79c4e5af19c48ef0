import math
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from fastcal._io import read_jsonl
from fastcal.finetune.config import FinetuneConfig
from fastcal.finetune.data import TrainingViews
from fastcal.finetune.flyp import CaptionSampler
from fastcal.finetune.trainer import Finetuner, cosine_learning_rate, total_steps, train


def test_cosine_schedule_values():
    lr = [cosine_learning_rate(t, 10, peak=1.0, warmup_steps=4, minimum=0.1) for t in range(10)]
    assert lr[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lr[4] == pytest.approx(1.1)  # cosine term at progress 0, plus the minimum (reference form)
    assert lr[7] == pytest.approx(0.5 * (1 + math.cos(math.pi * 3 / 6)) + 0.1)
    assert cosine_learning_rate(9, 10, peak=2.0, warmup_steps=0) == pytest.approx(1 + math.cos(math.pi * 0.9))
    assert cosine_learning_rate(0, 5, peak=2.0, warmup_steps=0) == pytest.approx(2.0)


def test_total_steps():
    config = FinetuneConfig(batch_size=8, epochs=3)
    assert total_steps(30, config) == 9  # 3 full batches per epoch, the partial one dropped
    assert total_steps(30, config.replace(max_steps=4)) == 4
    with pytest.raises(ValueError, match="batch_size"):
        total_steps(7, config)


def _images(n, seed):
    rng = np.random.default_rng(seed)
    return [(Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)), i % 3) for i in range(n)]


def _tokenizer(tiny):
    def tokenize(texts):
        rows = [
            tiny.random_tokens(1, torch.Generator().manual_seed(zlib.crc32(t.encode())))[0] for t in texts
        ]
        return torch.stack(rows)

    return tokenize


def _views(tiny, method_name):
    transform = T.Compose([T.RandomResizedCrop(16, scale=(0.5, 1.0)), T.ToTensor()])
    captions = None
    if method_name != "ft":
        captions = CaptionSampler(_tokenizer(tiny), ["a", "b", "c"], ["x {}", "y {} z", "{}"])
    return TrainingViews(_images(23, seed=0), transform, seed=5, captions=captions)


def _finetuner(tiny, method_name, steps=5):
    model = tiny.build_tiny_clip(dtype=torch.float32)
    method = tiny.make_method(method_name, model)
    config = FinetuneConfig(
        method=method_name,
        learning_rate=3e-3,
        batch_size=6,
        epochs=2,
        warmup_steps=2,
        teacher_update_every=2,
        grad_clip_norm=0.5 if method_name == "ft" else None,
    )
    return Finetuner(method, config, total_steps=steps)


def _snapshot(finetuner):
    state = finetuner.state_tensors()
    return {k: v.detach().clone() for k, v in state.items()}


@pytest.mark.parametrize("method_name", ["flyp", "carot", "ft"])
def test_resume_equals_uninterrupted(tiny_clip, tmp_path, method_name):
    key = {"run": method_name}
    views = _views(tiny_clip, method_name)
    straight = _finetuner(tiny_clip, method_name)
    train(straight, views, progress=False)

    first = _finetuner(tiny_clip, method_name)
    path = tmp_path / "checkpoint.safetensors"
    train(first, views, checkpoint_path=path, checkpoint_key=key, until=3, progress=False)
    assert first.step == 3
    resumed = _finetuner(tiny_clip, method_name)
    assert resumed.load_checkpoint(path, key)
    assert resumed.step == 3
    train(
        resumed,
        views,
        checkpoint_path=path,
        checkpoint_key=key,
        log_path=tmp_path / "log.jsonl",
        progress=False,
    )
    assert resumed.step == straight.step == 5

    expected, got = _snapshot(straight), _snapshot(resumed)
    assert set(expected) == set(got)
    assert any(k.startswith("optimizer.") for k in got)
    if method_name == "carot":
        assert any(k.startswith("teacher.") for k in got)
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    # the run actually moved the weights
    fresh = _finetuner(tiny_clip, method_name).state_tensors()
    moved = [k for k in fresh if k.startswith("trainable.") and not torch.equal(fresh[k], got[k])]
    assert len(moved) > 10
    log = read_jsonl(tmp_path / "log.jsonl")
    assert log[-1]["step"] == 5 and math.isfinite(log[-1]["loss"])


def test_checkpoint_of_another_run_is_refused(tiny_clip, tmp_path):
    path = tmp_path / "checkpoint.safetensors"
    finetuner = _finetuner(tiny_clip, "flyp")
    assert not finetuner.load_checkpoint(path, {"run": 1})
    finetuner.save_checkpoint(path, {"run": 1})
    with pytest.raises(ValueError, match="resume"):
        _finetuner(tiny_clip, "flyp").load_checkpoint(path, {"run": 2})


def test_gradient_checkpointing_gives_the_same_step(tiny_clip):
    batch = tiny_clip.random_batch(6, seed=3)
    states = []
    for checkpointing in (False, True):
        model = tiny_clip.build_tiny_clip()
        method = tiny_clip.make_method("carot", model)
        config = FinetuneConfig(
            method="carot", learning_rate=1e-3, batch_size=6, grad_checkpointing=checkpointing
        )
        finetuner = Finetuner(method, config, total_steps=2)
        finetuner.train_step(batch)
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    assert model.transformer.grad_checkpointing
    for name in states[0]:
        torch.testing.assert_close(states[0][name], states[1][name], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_step(tiny_clip, tmp_path, precision):
    model = tiny_clip.build_tiny_clip(dtype=torch.float32)
    method = tiny_clip.make_method("flyp", model)
    config = FinetuneConfig(method="flyp", learning_rate=1e-3, batch_size=6, precision=precision)
    finetuner = Finetuner(method, config, total_steps=5)
    before = model.visual.proj.detach().clone()
    images, labels, tokens = tiny_clip.random_batch(6, seed=4, dtype=torch.float32)
    for _ in range(5):  # fp16: the scaler skips steps whose gradients overflow at its initial scale
        parts = finetuner.train_step((images, labels, tokens))
        assert torch.isfinite(parts["loss"])
    assert not torch.equal(before, model.visual.proj)
    assert model.visual.proj.dtype == torch.float32
    assert finetuner.scaler.is_enabled() == (precision == "fp16")
    finetuner.save_checkpoint(tmp_path / "c.safetensors", {"p": precision})
    other = Finetuner(
        tiny_clip.make_method("flyp", tiny_clip.build_tiny_clip(dtype=torch.float32)), config, 3
    )
    assert other.load_checkpoint(tmp_path / "c.safetensors", {"p": precision})
    assert other.scaler.state_dict() == finetuner.scaler.state_dict()


def test_finetuner_stops_at_total_steps(tiny_clip):
    finetuner = _finetuner(tiny_clip, "flyp", steps=1)
    batch = tiny_clip.random_batch(6, seed=1, dtype=torch.float32)
    finetuner.train_step(batch)
    with pytest.raises(ValueError, match="step"):
        finetuner.train_step(batch)
    with pytest.raises(TypeError, match="config"):
        Finetuner(finetuner.method, {"lr": 1}, total_steps=1)


def test_a_step_invalidates_the_model_fingerprint(tiny_clip):
    from fastcal.models import model_fingerprint

    finetuner = _finetuner(tiny_clip, "flyp")
    model = finetuner.method.model
    before = model_fingerprint(model)
    finetuner.train_step(tiny_clip.random_batch(6, seed=2, dtype=torch.float32))
    assert model_fingerprint(model) != before


@pytest.mark.parametrize("method_name", ["ft", "flyp", "carot"])
def test_a_model_frozen_by_an_earlier_user_is_fine_tuned(tiny_clip, method_name):
    # prompt tuning and TPT freeze the CLIP they share with the demo's fine-tuning stage
    model = tiny_clip.build_tiny_clip().requires_grad_(False)
    method = tiny_clip.make_method(method_name, model)
    finetuner = Finetuner(method, FinetuneConfig(method=method_name, learning_rate=1e-3, batch_size=6), 2)
    before = model.visual.conv1.weight.detach().clone()
    finetuner.train_step(tiny_clip.random_batch(6, seed=5))
    assert not torch.equal(before, model.visual.conv1.weight)
    trained = {id(p) for p in finetuner.parameters}
    assert all(id(p) in trained for p in model.visual.parameters())
    if method_name != "ft":
        assert all(id(p) in trained for p in model.transformer.parameters())
        assert id(model.logit_scale) in trained


def test_a_resumed_run_logs_each_step_once(tiny_clip, tmp_path):
    key, log = {"run": "log"}, tmp_path / "log.jsonl"
    views = _views(tiny_clip, "flyp")
    checkpoint = tmp_path / "checkpoint.safetensors"
    first = _finetuner(tiny_clip, "flyp")
    # checkpoint at step 2, logged up to step 4, then "killed" mid-write of the next record
    train(
        first,
        views,
        checkpoint_path=checkpoint,
        checkpoint_key=key,
        checkpoint_every=2,
        until=2,
        log_path=log,
        log_every=1,
        progress=False,
    )
    train(first, views, until=4, log_path=log, log_every=1, progress=False)
    with open(log, "a") as torn:
        torn.write('{"loss": 1.0, "st')
    assert [r["step"] for r in read_jsonl(log)] == [1, 2, 3, 4]
    resumed = _finetuner(tiny_clip, "flyp")
    assert resumed.load_checkpoint(checkpoint, key) and resumed.step == 2
    train(resumed, views, log_path=log, log_every=1, progress=False)
    assert [r["step"] for r in read_jsonl(log)] == [1, 2, 3, 4, 5]
    assert log.read_text().count("\n") == 5  # the torn line is gone too
