"""``CalibrationMeter.update`` on fake CUDA tensors (``tests/fake_cuda.py``): the per-bin sums (and the
kept samples) stay on the device, with no host read, when ``validate=False``."""

import pytest
import torch

from fastcal.metrics import CalibrationMeter


@pytest.mark.parametrize("keep_samples", [False, True])
def test_update_traces_on_fake_cuda(fake_cuda, keep_samples):
    generator = torch.Generator().manual_seed(0)
    probs = torch.randn(37, 11, generator=generator).softmax(dim=1)
    labels = torch.randint(0, 11, (37,), generator=generator)
    meter = CalibrationMeter(15, keep_samples=keep_samples, validate=False)
    mode = fake_cuda.new_mode()
    probs, labels = fake_cuda.to_fake_cuda(mode, probs, labels)
    with fake_cuda.trace(mode):
        meter.update(probs, labels)
        meter.update(probs[:5].half(), labels[:5])
    assert meter._bins.device.type == "cuda" and meter._bins.dtype == torch.float64
    assert meter._totals.device.type == "cuda"
    assert all(x.device.type == "cuda" for x in meter._confidence + meter._hit)
    assert len(meter._confidence) == (2 if keep_samples else 0)
