"""Selective classification: the risk-coverage curve, AURC and AUGRC.

A selective classifier keeps the samples whose top-label confidence is at least a threshold and
abstains on the rest. Sorting the N samples by confidence, most confident first, with e_i = 1 where the
prediction is wrong, keeping the first k gives coverage c_k = k / N and

    selective risk    r_k = (1/k) sum_{i<=k} e_i        (Geifman & El-Yaniv, NeurIPS 2017)
    generalized risk  g_k = (1/N) sum_{i<=k} e_i = c_k r_k   (Traub et al., "Overcoming Common Flaws in
                                                              the Evaluation of Selective Classification
                                                              Systems", NeurIPS 2024)

AURC is the area under r(c) over [0, 1], AUGRC the area under g(c): the risk of an undetected failure
averaged over all thresholds. Three ways to compute the areas are in use, and they differ by O(1/N) and,
when confidences tie, by how the tie is broken (``method``):

- ``"fd_shifts"`` (default): a threshold can only keep or drop tied samples together, so the curve has
  one point per distinct confidence (coverage = the fraction of samples at or above it), plus a point
  at coverage 0 with the risk of the most confident group (AURC) or 0 (AUGRC); the area is the
  trapezoid rule over these points. This is the reference code of Traub et al.
  (IML-DKFZ/fd-shifts ``fd_shifts/analysis/rc_stats_utils.py``: ``selective_risk_stats``,
  ``generalized_risk_stats``; areas in ``rc_stats.py``), without its display factor of 1000. It does not
  depend on the order of tied samples.
- ``"torch_uncertainty"``: one point per sample, c_k = k/N for k = 1..N, the trapezoid rule over
  [1/N, 1] divided by its length (1 - 1/N) (ENSTA-U2IS-AI/torch-uncertainty
  ``src/torch_uncertainty/metrics/classification/risk_coverage.py``: ``AURC.compute``,
  ``AUGRC.compute``); N = 1 has no interval and gives NaN, as there.
- ``"fpp"``: the mean of r_k (or g_k) over k = 1..N, a right Riemann sum (YonseiML/fpp
  ``utils/metrics.py``).

The per-sample methods order tied samples by their row order (a stable sort); the references use an
unstable sort there, so on ties their value is one of several.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from fastcal._checks import check_choice
from fastcal.metrics.functional import check_probabilities, row_statistics

METHODS = ("fd_shifts", "torch_uncertainty", "fpp")
_f64 = torch.float64


class RiskCoverageCurve(NamedTuple):
    """The risk-coverage curve with ties grouped (``method="fd_shifts"``), in increasing coverage, float64.

    ``coverage[0] = 0`` is the end point (abstain on everything); ``threshold`` is the confidence a
    sample needs to be kept at each point (inf at coverage 0).
    """

    coverage: torch.Tensor
    selective_risk: torch.Tensor
    generalized_risk: torch.Tensor
    threshold: torch.Tensor


def _sorted_errors(probs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-label confidence and error of every row, most confident first (stable on ties)."""
    check_probabilities(probs, labels)
    stats = row_statistics(probs, labels)
    order = torch.argsort(stats.confidence, descending=True, stable=True)
    return stats.confidence[order], 1.0 - stats.hit[order]


def risk_coverage_curve(probs: torch.Tensor, labels: torch.Tensor) -> RiskCoverageCurve:
    """Selective and generalized risk at every distinct confidence threshold (module docstring)."""
    confidence, errors = _sorted_errors(probs, labels)
    n = confidence.shape[0]
    cumulative = errors.cumsum(0)
    ends = torch.ones(n, dtype=torch.bool, device=confidence.device)
    ends[:-1] = confidence[1:] != confidence[:-1]  # the last sample of each group of tied confidences
    kept = torch.nonzero(ends).squeeze(1) + 1  # samples kept at each threshold
    errors_kept = cumulative[kept - 1]
    zero = torch.zeros(1, dtype=_f64, device=confidence.device)
    selective = errors_kept / kept
    return RiskCoverageCurve(
        coverage=torch.cat([zero, kept / n]),
        selective_risk=torch.cat([selective[:1], selective]),
        generalized_risk=torch.cat([zero, errors_kept / n]),
        threshold=torch.cat([torch.full_like(zero, math.inf), confidence[kept - 1]]),
    )


def _trapezoid(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2).sum()


def _area(probs: torch.Tensor, labels: torch.Tensor, method: str, generalized: bool) -> torch.Tensor:
    check_choice("method", method, METHODS)
    if method == "fd_shifts":
        curve = risk_coverage_curve(probs, labels)
        return _trapezoid(curve.coverage, curve.generalized_risk if generalized else curve.selective_risk)
    _, errors = _sorted_errors(probs, labels)
    n = errors.shape[0]
    kept = torch.arange(1, n + 1, dtype=_f64, device=errors.device)
    risk = errors.cumsum(0) / (n if generalized else kept)
    if method == "fpp":
        return risk.mean()
    if n < 2:
        return torch.tensor(math.nan, dtype=_f64, device=errors.device)
    return _trapezoid(kept / n, risk) / (1.0 - 1.0 / n)


def aurc(probs: torch.Tensor, labels: torch.Tensor, *, method: str = "fd_shifts") -> torch.Tensor:
    """Area under the selective risk-coverage curve (0-dim float64; lower is better); ``method`` as in
    the module docstring."""
    return _area(probs, labels, method, generalized=False)


def augrc(probs: torch.Tensor, labels: torch.Tensor, *, method: str = "fd_shifts") -> torch.Tensor:
    """Area under the generalized risk-coverage curve (Traub et al. 2024; 0-dim float64, lower is
    better); ``method`` as in the module docstring."""
    return _area(probs, labels, method, generalized=True)
