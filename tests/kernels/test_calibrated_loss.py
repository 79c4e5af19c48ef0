"""The Triton kernels one by one, in the interpreter, against plain torch in float64."""

import pytest
import torch
import torch.nn.functional as F

from fastcal.ops.calibrated import triton_installed, triton_interpreting

pytestmark = pytest.mark.skipif(
    not (triton_installed() and triton_interpreting()), reason="needs triton and TRITON_INTERPRET=1"
)


@pytest.fixture(scope="module")
def kernels():
    from fastcal_kernels import calibrated_loss

    return calibrated_loss


def test_normalize_rows_and_its_backward(kernels):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(37, 67, generator=g, dtype=torch.float64)
    out, rnorm = torch.empty_like(x), torch.empty(37, dtype=torch.float64)
    # Two programs of 32 rows and two column blocks of 64: masks on both axes are exercised.
    kernels.normalize_rows_kernel[(2,)](x, out, rnorm, 37, 67, 67, 67, BLOCK_ROWS=32, BLOCK_COLS=64)
    torch.testing.assert_close(out, F.normalize(x, dim=-1), rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(rnorm, 1 / x.norm(dim=-1), rtol=1e-14, atol=0)

    upstream = torch.randn(37, 67, generator=g, dtype=torch.float64)
    leaf = x.clone().requires_grad_()
    (want,) = torch.autograd.grad((F.normalize(leaf, dim=-1) * upstream).sum() * 3.0, [leaf])
    got = torch.empty_like(x)
    scale = torch.tensor([1.5], dtype=torch.float64)
    kernels.normalize_rows_backward_kernel[(2,)](
        upstream,
        out,
        rnorm,
        scale,
        got,
        2.0,
        37,
        67,
        67,
        67,
        67,
        BLOCK_ROWS=32,
        BLOCK_COLS=64,
    )
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("eps", [0.0, 0.25])
def test_row_kernel_statistics_and_gradient(kernels, eps):
    g = torch.Generator().manual_seed(1)
    n_rows, n_cols, s = 5, 101, 7.0
    cos = torch.rand(n_rows, n_cols, generator=g, dtype=torch.float64) * 2 - 1
    labels = torch.tensor([0, 100, 37, 64, 5])
    cos[2, 90] = cos[2, 12] = 1.5  # a tie for the runner-up: the first index (12) wins
    cos[3, 64] = 2.0  # the target is the row maximum
    stats = [torch.empty(n_rows, dtype=torch.float64) for _ in range(4)]
    ce, g_target, g_runner, h = stats
    runner = torch.empty(n_rows, dtype=torch.int64)
    work = cos.clone()
    scale = torch.tensor([s], dtype=torch.float64)
    flags = {"COMPUTE_GRAD": True, "HAS_SMOOTHING": eps > 0, "BLOCK": 32}
    kernels.ce_margin_rows_kernel[(n_rows,)](
        work, labels, scale, ce, g_target, g_runner, runner, h, n_cols, n_cols, eps, **flags
    )

    z = (s * cos).requires_grad_()
    want_ce = F.cross_entropy(z, labels, label_smoothing=eps, reduction="none")
    torch.testing.assert_close(ce, want_ce.detach(), rtol=1e-12, atol=1e-12)
    others = cos.masked_fill(F.one_hot(labels, n_cols).bool(), -float("inf"))
    torch.testing.assert_close(g_runner, others.max(dim=1).values, rtol=0, atol=0)
    assert runner.tolist() == others.argmax(dim=1).tolist() and runner[2] == 12
    torch.testing.assert_close(g_target, cos.gather(1, labels[:, None]).squeeze(1), rtol=0, atol=0)
    # The row is overwritten with s (p - q) = dCE/dG, and h = sum_c (p - q) G.
    (dz,) = torch.autograd.grad(want_ce.sum(), [z])
    torch.testing.assert_close(work, s * dz, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h, (dz * cos).sum(dim=1), rtol=1e-12, atol=1e-12)


def test_center_pair_kernel(kernels):
    g = torch.Generator().manual_seed(2)
    t, t0 = (torch.randn(45, 70, generator=g, dtype=torch.float64) for _ in range(2))
    outs = [torch.empty_like(t) for _ in range(4)]
    delta = torch.empty(70, dtype=torch.float64)
    kernels.center_pair_kernel[(3,)](
        t, t0, *outs, delta, 45, 70, 70, WRITE_A=True, WRITE_B=True, BLOCK_ROWS=16, BLOCK_COLS=32
    )
    a, b = t - t.mean(0), t0 - t0.mean(0)
    for got, want in zip(outs, (a + b, a - b, a, b), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(delta, t.mean(0) - t0.mean(0), rtol=1e-12, atol=1e-14)
