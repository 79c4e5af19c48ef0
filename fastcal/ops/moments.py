"""||Cov(t) - Cov(t0)||_F^2 on the cheaper side, without cancellation between the two covariances.

For centered A, B (C, D) and Cov = X^T X / C, write S = A + B and Dl = A - B. Then

    A^T A - B^T B = (S^T Dl + Dl^T S) / 2 =: E,        ||Cov(A) - Cov(B)||_F^2 = ||E||_F^2 / C^2.

The D x D side forms E from one GEMM (instead of the two covariances). The Gram side (C x C products,
the identity ||A^T A - B^T B||_F^2 = ||A A^T||^2 - 2 ||A B^T||^2 + ||B B^T||^2) is used in
the equivalent form, with P = S S^T, Q = Dl Dl^T, N = Dl S^T,

    ||E||_F^2 = (<P, Q> + <N, N^T>) / 2,

whose terms are of the size of the result: the three-term identity subtracts numbers of size ||A||^4
to get one of size ||A||^2 ||A - B||^2, which in float32 loses every digit when the tuned features
start at the frozen ones (the usual case in prompt tuning).

Side choice by cost: the Gram side costs about 5 C^2 D multiply-adds with its gradient, the D x D side
2 C D^2; the Gram side is taken when 5 C < 2 D.
"""

from __future__ import annotations

import torch


def use_gram_side(n_classes: int, dim: int) -> bool:
    """True when the C x C (Gram) side is the cheaper way to the covariance gap."""
    return 5 * n_classes < 2 * dim


def covariance_gap_sq(centered: torch.Tensor, frozen_centered: torch.Tensor) -> torch.Tensor:
    """||Cov(A) - Cov(B)||_F^2 with Cov(X) = X^T X / C for centered (C, D) inputs, differentiable."""
    n_classes, dim = centered.shape
    sum_ = centered + frozen_centered
    diff = centered - frozen_centered
    if use_gram_side(n_classes, dim):
        p = sum_ @ sum_.T
        q = diff @ diff.T
        n = diff @ sum_.T
        gap = ((p * q).sum() + (n * n.T).sum()) / 2
    else:
        x = sum_.T @ diff
        e = (x + x.T) / 2
        gap = e.pow(2).sum()
    return gap / (n_classes * n_classes)
