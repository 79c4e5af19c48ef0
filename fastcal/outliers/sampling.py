"""DOR's dynamic sampling: a fresh set of outliers from the pool every epoch.

DOR ("dynamic sampling mechanism") re-draws the outliers at the start of each epoch, weighted
by semantic similarity, so the regularizer does not fit a fixed set of words. ``OutlierSampler.sample``
draws ``n_outliers`` (default 100) distinct pool entries with

    p_o ∝ exp(s_o / tau)          (s_o: the term's max class similarity; or uniform)

without replacement (``torch.multinomial``). The draw of epoch ``e`` uses its own generator seeded
from ``(seed, e)``, so it is the same whenever it is made (a resumed run, another process) and
independent of every other random stream. The paper gives no temperature; ``tau = 0.1`` (our choice)
makes a term 0.1 more similar about e times as likely.
"""

from __future__ import annotations

import torch

from fastcal._checks import check_int, check_number, check_tensor
from fastcal._seeds import derived_seed

DEFAULT_N_OUTLIERS = 100
DEFAULT_TAU = 0.1


def epoch_seed(seed: int, epoch: int) -> int:
    """The generator seed of epoch ``epoch`` under run seed ``seed`` (a hash, so nearby seeds and
    epochs give unrelated streams)."""
    return derived_seed(f"fastcal-outliers:{seed}:{epoch}")


class OutlierSampler:
    """Per-epoch draws of outlier indices from a pool (module docstring).

    Args:
        similarity: ``(K,)`` each pool term's max class similarity.
        n_outliers: terms per epoch (all ``K`` when the pool is smaller).
        tau: temperature of the similarity weighting.
        uniform: draw uniformly instead.
        seed: the run's seed.
    """

    def __init__(
        self,
        similarity: torch.Tensor,
        n_outliers: int = DEFAULT_N_OUTLIERS,
        *,
        tau: float = DEFAULT_TAU,
        uniform: bool = False,
        seed: int = 0,
    ) -> None:
        check_tensor("similarity", similarity, ndim=1, floating=True)
        check_int("n_outliers", n_outliers, minimum=1)
        check_number("tau", tau, minimum=0.0, strict_minimum=True)
        check_int("seed", seed)
        if not isinstance(uniform, bool):
            raise TypeError(f"uniform: expected a bool, got {type(uniform).__name__}")
        self.n_outliers = min(n_outliers, similarity.shape[0])
        self.tau = tau
        self.uniform = uniform
        self.seed = seed
        logits = similarity.detach().double().cpu() / tau
        self.weights = torch.ones_like(logits) if uniform else torch.softmax(logits, dim=0)

    def sample(self, epoch: int) -> torch.Tensor:
        """``(n_outliers,)`` distinct int64 pool indices for ``epoch``; the same for the same
        ``(seed, epoch)``."""
        check_int("epoch", epoch, minimum=0)
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
        return torch.multinomial(self.weights, self.n_outliers, replacement=False, generator=generator)
