"""Histogram binning and isotonic regression, one-vs-rest over the classes and renormalized.

Both are binary calibrators (Zadrozny & Elkan, KDD 2002) extended to C classes as Guo et al. (ICML 2017,
section 4.2) describe: for every class k, a map g_k from the softmax probability p_k = softmax(z)_k to
P(y = k) is fitted on the pairs (p_ik, [y_i = k]); a sample's calibrated distribution is
q_k = g_k(p_k) / sum_j g_j(p_j). A row whose calibrated scores are all 0 keeps its softmax
probabilities (netcal divides by zero there). The maps are per class index, so both are bound to the
classes they were fitted on.

- ``HistogramBinning``: g_k is constant on ``n_bins`` equal-width bins of [0, 1], (lo, hi] as
  ``fastcal.metrics`` bins (0 in the first bin), equal to the fraction of positives among the
  calibration samples in the bin; an empty bin keeps its centre. netcal's ``HistogramBinning``
  (EFS-OpenSource/calibration-framework ``netcal/binning/HistogramBinning.py``) computes the same maps
  and also uses bin centres for empty bins, but fits with [lo, hi) bins and applies with (lo, hi]
  ones, so the two differ only for a probability exactly on an edge.
- ``IsotonicCalibrator``: g_k is the isotonic (non-decreasing) least-squares fit of the labels on p_k:
  tied probabilities are pooled into one point (mean label, weight = count), the pool-adjacent-
  violators solution is computed (scikit-learn's ``isotonic_regression``), and g_k interpolates
  linearly between the first and last probability of each constant block, constant beyond the ends:
  exactly scikit-learn's ``IsotonicRegression(out_of_bounds="clip")``, the binary core netcal's
  ``IsotonicRegression`` uses per class.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from fastcal._checks import check_int, fail
from fastcal.calibrate.base import Calibrator, log_of_renormalized
from fastcal.metrics.functional import MAX_BINS, uniform_bin_index

_f64 = torch.float64
_CHUNK_ELEMENTS = 1 << 24


def _chunk_rows(n_classes: int) -> int:
    return max(1, _CHUNK_ELEMENTS // n_classes)


class HistogramBinning(Calibrator):
    """One-vs-rest histogram binning with ``n_bins`` equal-width bins per class (module docstring)."""

    name = "histogram"

    def __init__(self, n_bins: int = 10) -> None:
        super().__init__()
        self.n_bins = check_int("n_bins", n_bins, minimum=1, maximum=MAX_BINS)
        self.bin_values: torch.Tensor | None = None  # (C, n_bins)

    def _fit(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        n, c = logits.shape
        m = self.n_bins
        sums = torch.zeros(2, c * m, dtype=_f64, device=logits.device)  # counts, positives
        offsets = torch.arange(c, device=logits.device) * m
        step = _chunk_rows(c)
        for start in range(0, n, step):
            probs = torch.softmax(logits[start : start + step].to(_f64), dim=1)
            flat = (uniform_bin_index(probs, m) + offsets).reshape(-1)
            hits = torch.nn.functional.one_hot(labels[start : start + step], c).to(_f64).reshape(-1)
            sums[0].index_add_(0, flat, torch.ones_like(hits))
            sums[1].index_add_(0, flat, hits)
        count, positives = sums.view(2, c, m)
        centres = (torch.arange(m, dtype=_f64, device=logits.device) + 0.5) / m
        self.bin_values = torch.where(count > 0, positives / count.clamp(min=1.0), centres)

    def _apply(self, logits: torch.Tensor) -> torch.Tensor:
        values = self.bin_values.to(logits.device)
        out = []
        step = _chunk_rows(logits.shape[1])
        for start in range(0, logits.shape[0], step):
            log_probs = torch.log_softmax(logits[start : start + step].to(_f64), dim=1)
            scores = values.gather(1, uniform_bin_index(log_probs.exp(), self.n_bins).T).T
            out.append(log_of_renormalized(scores, log_probs))
        return torch.cat(out).to(torch.promote_types(logits.dtype, torch.float32))

    def _state_keys(self) -> tuple[str, ...]:
        return ("bin_values",)

    def _state(self) -> dict[str, torch.Tensor]:
        return {"bin_values": self.bin_values}

    def _load(self, state: Mapping[str, torch.Tensor]) -> None:
        values = torch.as_tensor(state["bin_values"], dtype=_f64)
        if tuple(values.shape) != (self.num_classes, self.n_bins):
            expected = f"bin_values of shape {(self.num_classes, self.n_bins)}"
            raise fail("state", expected, tuple(values.shape))
        self.bin_values = values

    def __repr__(self) -> str:
        return f"HistogramBinning(n_bins={self.n_bins})"


def _row_logsumexp(logits: torch.Tensor) -> torch.Tensor:
    step = _chunk_rows(logits.shape[1])
    chunks = [logits[s : s + step].to(_f64) for s in range(0, len(logits), step)]
    return torch.cat([torch.logsumexp(chunk, dim=1) for chunk in chunks])


def isotonic_points(scores: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The interpolation points (x, g(x)) of the isotonic fit of ``targets`` on ``scores`` (1-D float64):
    ties pooled, pool-adjacent-violators, and only the first and last point of each constant block
    kept (module docstring)."""
    from sklearn.isotonic import isotonic_regression

    order = np.argsort(scores, kind="stable")
    x, y = scores[order], targets[order]
    starts = np.flatnonzero(np.r_[True, x[1:] != x[:-1]])
    counts = np.diff(np.r_[starts, len(x)]).astype(np.float64)
    means = np.add.reduceat(y, starts) / counts
    fitted = isotonic_regression(means, sample_weight=counts, y_min=0.0, y_max=1.0, increasing=True)
    unique_x = x[starts]
    keep = np.ones(len(fitted), dtype=bool)
    if len(fitted) > 2:
        keep[1:-1] = (fitted[1:-1] != fitted[:-2]) | (fitted[1:-1] != fitted[2:])
    return unique_x[keep], fitted[keep]


def interpolate(x: torch.Tensor, points_x: torch.Tensor, points_y: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation of (C, N) ``x`` through each row's (C, K) points (K >= 2, x
    non-decreasing, a row padded by repeating its last point), constant beyond the ends: ``numpy.interp``
    per row. Below the first point t clamps to 0, above the last to 1 (or the padding's zero width
    gives t = 0 at the last point)."""
    k = points_x.shape[1]
    right = torch.searchsorted(points_x, x, right=True).clamp(1, k - 1)
    left = right - 1
    x0, x1 = points_x.gather(1, left), points_x.gather(1, right)
    y0, y1 = points_y.gather(1, left), points_y.gather(1, right)
    width = x1 - x0
    t = torch.where(width > 0, (x - x0) / torch.where(width > 0, width, torch.ones_like(width)), 0.0)
    return y0 + t.clamp(0.0, 1.0) * (y1 - y0)


class IsotonicCalibrator(Calibrator):
    """One-vs-rest isotonic regression (module docstring)."""

    name = "isotonic"

    def __init__(self) -> None:
        super().__init__()
        self.points_x: torch.Tensor | None = None  # (C, K), each row padded with its last point
        self.points_y: torch.Tensor | None = None

    def _fit(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        c = logits.shape[1]
        lse = _row_logsumexp(logits)
        labels_np = labels.cpu().numpy()
        fits = []
        for k in range(c):
            scores = torch.exp(logits[:, k].to(_f64) - lse).cpu().numpy()
            fits.append(isotonic_points(scores, (labels_np == k).astype(np.float64)))
        width = max(2, *(len(x) for x, _ in fits))
        padded = [[np.pad(a, (0, width - len(a)), mode="edge") for a in fit] for fit in fits]
        self.points_x = torch.from_numpy(np.stack([x for x, _ in padded])).to(logits.device)
        self.points_y = torch.from_numpy(np.stack([y for _, y in padded])).to(logits.device)

    def _apply(self, logits: torch.Tensor) -> torch.Tensor:
        points_x, points_y = self.points_x.to(logits.device), self.points_y.to(logits.device)
        out = []
        step = _chunk_rows(logits.shape[1])
        for start in range(0, logits.shape[0], step):
            log_probs = torch.log_softmax(logits[start : start + step].to(_f64), dim=1)
            scores = interpolate(log_probs.exp().T.contiguous(), points_x, points_y).T
            out.append(log_of_renormalized(scores, log_probs))
        return torch.cat(out).to(torch.promote_types(logits.dtype, torch.float32))

    def _state_keys(self) -> tuple[str, ...]:
        return ("points_x", "points_y")

    def _state(self) -> dict[str, torch.Tensor]:
        return {"points_x": self.points_x, "points_y": self.points_y}

    def _load(self, state: Mapping[str, torch.Tensor]) -> None:
        x, y = (torch.as_tensor(state[k], dtype=_f64) for k in ("points_x", "points_y"))
        if x.ndim != 2 or x.shape != y.shape or x.shape[0] != self.num_classes:
            expected = f"points_x and points_y of one shape ({self.num_classes}, K)"
            raise fail("state", expected, f"{tuple(x.shape)} and {tuple(y.shape)}")
        self.points_x, self.points_y = x, y

    def __repr__(self) -> str:
        return "IsotonicCalibrator()"
