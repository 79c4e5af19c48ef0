"""Synthetic calibration data with a known miscalibration: labels drawn from softmax(true logits), the
model reporting 3 x the true logits plus a class-dependent bias (over-confident and skewed)."""

import pytest
import torch


def miscalibrated(n, c, seed, *, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    true = torch.randn(n, c, generator=g, dtype=torch.float64) * 1.5
    labels = torch.multinomial(true.softmax(1), 1, generator=g).squeeze(1)
    bias = torch.linspace(-1.0, 1.0, c, dtype=torch.float64)
    return true * scale + bias, labels


@pytest.fixture(scope="module")
def fit_and_test():
    """(fit logits, fit labels, held-out logits, held-out labels): 3,001 + 2,003 rows of 7 classes."""
    logits, labels = miscalibrated(5004, 7, seed=11)
    return logits[:3001], labels[:3001], logits[3001:], labels[3001:]
