"""The fake-CUDA tracing helpers (``tests/fake_cuda.py``): the Python backward walk gives the autograd
engine's gradients on real tensors, and on fake CUDA tensors it raises where a GPU run would go wrong."""

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorDeviceMismatchError


class _Scaled(torch.autograd.Function):
    """y = k x w with a non-tensor argument between two tensors, as custom ops have."""

    @staticmethod
    def forward(ctx, x, k, w):
        ctx.k = k
        ctx.save_for_backward(x, w)
        return k * x * w

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        return ctx.k * grad * w, None, (ctx.k * grad * x).sum(0)


def _network(x, layer, w):
    hidden = torch.tanh(layer(x))  # a module, broadcast bias
    shared = hidden * 2 + hidden.exp()  # two paths meet at one node
    scaled = _Scaled.apply(shared, 3.0, w)
    return (scaled.float().log_softmax(-1) + w.double()).sum()  # dtype casts on the way back


def test_the_walk_gives_the_engines_gradients(fake_cuda):
    g = torch.Generator().manual_seed(0)
    layer = nn.Linear(7, 5).double()
    x = torch.randn(11, 7, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True)
    leaves = [x, w, *layer.parameters()]
    want = torch.autograd.grad(_network(x, layer, w), leaves)
    with fake_cuda.trace(None):  # real CPU tensors: Tensor.backward is the walk
        _network(x, layer, w).backward()
    for got, expected in zip([t.grad for t in leaves], want, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


class _CpuGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        return torch.ones(grad.shape, device="cpu")  # a CPU tensor made inside a CUDA backward


class _ReadsTheGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        return grad * float(grad.abs().max())  # a host read inside the backward


@pytest.mark.parametrize(
    ("function", "error"),
    [(_CpuGradient, RuntimeError), (_ReadsTheGradient, DataDependentOutputException)],
    ids=["cpu-gradient", "host-read"],
)
def test_a_backward_that_would_fail_on_a_gpu_fails_the_trace(fake_cuda, function, error):
    mode = fake_cuda.new_mode()
    x = fake_cuda.to_fake_cuda(mode, torch.randn(4, 3, requires_grad=True))
    with fake_cuda.trace(mode), pytest.raises(error, match=r"device|local_scalar_dense"):
        function.apply(x).sum().backward()


def test_the_forward_catches_a_mixed_device_and_a_read(fake_cuda):
    mode = fake_cuda.new_mode()
    x, y = fake_cuda.to_fake_cuda(mode, torch.randn(4, 3), torch.randn(3))
    with fake_cuda.trace(mode):
        with pytest.raises(FakeTensorDeviceMismatchError):
            x + torch.ones(3, device="cpu")
        with pytest.raises(DataDependentOutputException):
            float(y.sum())
    assert x.device.type == "cuda" and (x + y).device.type == "cuda"  # outside the mode: still fake
