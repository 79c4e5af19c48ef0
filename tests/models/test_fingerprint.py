import hashlib

import torch
from torch import nn

from fastcal.models import load_clip, model_fingerprint, transform_fingerprint


def _model(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.Linear(7, 3))


def test_fingerprint_is_the_sha256_of_names_shapes_dtypes_and_bytes():
    model = _model(0)
    expected = hashlib.sha256()
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    for name, t in tensors:
        expected.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        expected.update(t.detach().numpy().tobytes() if t.ndim else t.detach().reshape(1).numpy().tobytes())
    assert model_fingerprint(model) == expected.hexdigest()


def test_equal_weights_equal_fingerprints_and_any_change_is_seen():
    a, b = _model(0), _model(0)
    assert model_fingerprint(a) == model_fingerprint(b)
    base = model_fingerprint(a)
    with torch.no_grad():
        a[0].weight[2, 3] += 1e-6  # in place: the remembered digest must not be reused
    changed = model_fingerprint(a)
    assert changed != base
    a[0].bias = nn.Parameter(a[0].bias.detach().clone() + 1)  # replaced parameter
    assert model_fingerprint(a) not in (base, changed)
    a.train()(torch.randn(4, 5))  # BatchNorm running statistics are buffers
    assert model_fingerprint(a) != model_fingerprint(b)
    assert model_fingerprint(_model(0).double()) != model_fingerprint(b)  # dtype is part of it


def test_bf16_models_are_fingerprinted(tiny_source):
    model = load_clip(tiny_source(), precision="bf16").model
    assert len(model_fingerprint(model)) == 64


def test_transform_fingerprint_is_stable_across_constructions(tiny_source):
    source = tiny_source()
    first, second = load_clip(source), load_clip(source)
    # open_clip's transforms hold plain functions, whose repr shows a memory address.
    assert transform_fingerprint(first.eval_transform) == transform_fingerprint(second.eval_transform)
    assert transform_fingerprint(first.eval_transform) != transform_fingerprint(first.train_transform)
