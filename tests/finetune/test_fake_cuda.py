"""One FLYP and one CaRot step (the teacher's EMA update included) through ``Finetuner.train_step`` on
fake CUDA tensors (``tests/fake_cuda.py``): no device mismatch, no host read.

The text encoder truncates each batch's captions to their longest one, exactly (fastcal.models
.text_encoder); the length is read on the host once per new batch of token ids, the one host read of a
fine-tuning step, by design. The traced steps take that read before the trace (the method's loss on the
CPU batch, without gradients), and ``test_the_caption_lengths_are_the_steps_only_host_read`` shows that
without it the trace stops there and nowhere else.
"""

import pytest
import torch
from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException

from fastcal.finetune.config import FinetuneConfig
from fastcal.finetune.trainer import Finetuner


def _traced_step(tiny_clip, fake_cuda, name, *, plan_first=True):
    model = tiny_clip.build_tiny_clip(dtype=torch.float32)
    method = tiny_clip.make_method(name, model)  # CaRot: teacher updated after every step
    batch = tiny_clip.random_batch(6, 1, dtype=torch.float32)
    if plan_first:
        with torch.no_grad():
            method.loss(method.trainable, batch, 0)
    else:  # only what the text encoder learns once per model: whether its mask is causal
        assert method.trainable.text_encoder.is_causal
    mode = fake_cuda.new_mode()
    method, batch = fake_cuda.to_fake_cuda(mode, method, batch)
    with fake_cuda.trace(mode):
        finetuner = Finetuner(method, FinetuneConfig(batch_size=6, precision="fp32"), total_steps=3)
        teacher = [p for p in method.teacher.parameters()] if name == "carot" else []
        parts = finetuner.train_step(batch)
    return finetuner, parts, teacher


@pytest.mark.parametrize("name", ["flyp", "carot"])
def test_a_fine_tuning_step_traces_on_fake_cuda(tiny_clip, fake_cuda, name):
    finetuner, parts, teacher = _traced_step(tiny_clip, fake_cuda, name)
    assert finetuner.step == 1 and finetuner.optimizer.defaults["fused"]
    assert {v.device.type for v in parts.values()} == {"cuda"}
    assert all(p.grad is not None and p.grad.device.type == "cuda" for p in finetuner.parameters)
    assert all(finetuner.optimizer.state[p] for p in finetuner.parameters)
    if name == "carot":
        assert {"contrastive", "distillation"} <= set(parts) and teacher
        assert all(p.device.type == "cuda" for p in teacher)


def test_the_caption_lengths_are_the_steps_only_host_read(tiny_clip, fake_cuda):
    with pytest.raises((DataDependentOutputException, DynamicOutputShapeException)) as caught:
        _traced_step(tiny_clip, fake_cuda, "flyp", plan_first=False)
    ours = [frame.name for frame in caught.traceback if "/fastcal/" in str(frame.path)]
    assert ours[-3:] == ["encode", "_encode", "_plan"], ours  # the lengths of this batch's captions
