"""Per-epoch outlier draws: reproducible per (seed, epoch), different across epochs, weighted by
exp(similarity / tau)."""

import pytest
import torch

from fastcal.outliers.sampling import OutlierSampler, epoch_seed


def _similarity(n=503, seed=0):
    return torch.rand(n, generator=torch.Generator().manual_seed(seed)) * 0.4 + 0.5


def test_same_seed_and_epoch_give_the_same_draw():
    similarity = _similarity()
    a = OutlierSampler(similarity, 100, seed=3)
    b = OutlierSampler(similarity.clone(), 100, seed=3)
    torch.manual_seed(123)  # the global generator plays no part
    first = a.sample(5)
    torch.manual_seed(456)
    assert torch.equal(first, b.sample(5))
    assert torch.equal(first, a.sample(5))
    assert first.dtype == torch.int64 and first.shape == (100,)
    assert len(set(first.tolist())) == 100
    assert int(first.min()) >= 0 and int(first.max()) < 503


def test_draws_differ_across_epochs_and_seeds():
    sampler = OutlierSampler(_similarity(), 100, seed=0)
    draws = [set(sampler.sample(e).tolist()) for e in range(4)]
    assert all(draws[i] != draws[j] for i in range(4) for j in range(i + 1, 4))
    assert set(OutlierSampler(_similarity(), 100, seed=1).sample(0).tolist()) != draws[0]
    assert epoch_seed(0, 1) != epoch_seed(1, 0)


def test_small_pool_is_drawn_whole():
    sampler = OutlierSampler(_similarity(n=7), 100)
    assert sorted(sampler.sample(0).tolist()) == list(range(7))


def test_single_draw_frequencies_follow_the_softmax():
    """With one outlier per epoch, term i comes up with probability softmax(s / tau)_i."""
    similarity = torch.tensor([0.9, 0.8, 0.7, 0.5, 0.3])
    tau = 0.2
    sampler = OutlierSampler(similarity, 1, tau=tau, seed=0)
    epochs = 4000
    counts = torch.bincount(torch.cat([sampler.sample(e) for e in range(epochs)]), minlength=5).double()
    expected = torch.softmax(similarity.double() / tau, dim=0)
    # Binomial standard error of each frequency; 5 sigma.
    tolerance = 5 * (expected * (1 - expected) / epochs).sqrt()
    assert ((counts / epochs - expected).abs() <= tolerance).all(), (counts / epochs, expected)


def test_uniform_option_ignores_similarity():
    similarity = torch.tensor([5.0, 0.0, 0.0, 0.0])
    sampler = OutlierSampler(similarity, 1, tau=0.01, uniform=True, seed=0)
    counts = torch.bincount(torch.cat([sampler.sample(e) for e in range(2000)]), minlength=4).double()
    assert ((counts / 2000 - 0.25).abs() < 5 * (0.25 * 0.75 / 2000) ** 0.5).all()
    weighted = OutlierSampler(similarity, 1, tau=0.01, seed=0)
    assert all(int(weighted.sample(e)) == 0 for e in range(50))


def test_sampler_validation():
    with pytest.raises(ValueError, match="tau: expected a number > 0"):
        OutlierSampler(_similarity(), tau=0.0)
    with pytest.raises(ValueError, match="n_outliers: expected an integer >= 1"):
        OutlierSampler(_similarity(), 0)
    with pytest.raises(ValueError, match="similarity: expected a 1-D tensor"):
        OutlierSampler(torch.rand(3, 2))
    with pytest.raises(ValueError, match="epoch: expected an integer >= 0"):
        OutlierSampler(_similarity()).sample(-1)
