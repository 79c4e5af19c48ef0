import pytest
import torch

from fastcal.finetune.ema import EmaModel, ema_update_, ema_update_loop_


def _tensors(seed, shapes, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in shapes]


SHAPES = [(7,), (3, 5), (2, 3, 11), (), (129,)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("momentum", [0.0, 0.05, 0.475, 0.9, 1.0])
def test_foreach_equals_naive_loop(dtype, momentum):
    teacher_a = _tensors(0, SHAPES, dtype)
    teacher_b = [t.clone() for t in teacher_a]
    student = _tensors(1, SHAPES, dtype)
    ema_update_(teacher_a, student, momentum)
    ema_update_loop_(teacher_b, student, momentum)
    tol = 1e-6 if dtype == torch.float32 else 1e-14
    for a, b, s, t0 in zip(teacher_a, teacher_b, student, _tensors(0, SHAPES, dtype), strict=True):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
        expected = momentum * t0.double() + (1 - momentum) * s.double()
        torch.testing.assert_close(a.double(), expected, rtol=tol, atol=tol)


def test_ema_update_checks_its_arguments():
    with pytest.raises(ValueError, match="momentum"):
        ema_update_(_tensors(0, [(2,)]), _tensors(1, [(2,)]), 1.5)
    with pytest.raises(ValueError, match="student"):
        ema_update_(_tensors(0, [(2,)]), _tensors(1, [(2,), (3,)]), 0.5)
    with pytest.raises(ValueError, match=r"student\[0\]"):
        ema_update_(_tensors(0, [(2,)]), _tensors(1, [(3,)]), 0.5)


def test_ema_model_tracks_parameters_and_copies_buffers():
    student = torch.nn.BatchNorm1d(5)
    with torch.no_grad():
        student.weight.normal_()
        student.running_mean.normal_()
    ema = EmaModel(student)
    assert not ema.module.training and not any(p.requires_grad for p in ema.module.parameters())
    start = ema.module.weight.detach().clone()
    with torch.no_grad():
        student.weight.add_(1.0)
        student.running_mean.add_(2.0)
    ema.update(student, 0.75)
    torch.testing.assert_close(ema.module.weight, 0.75 * start + 0.25 * student.weight.detach())
    torch.testing.assert_close(ema.module.running_mean, student.running_mean)
    assert ema.module.weight.data_ptr() != student.weight.data_ptr()
