"""Calibration metrics of a classifier's probabilities: the functional core.

Inputs everywhere: ``probs`` (N, C), rows of probabilities summing to 1 (callers softmax their logits
first), and ``labels`` (N,) integers in [0, C). Results are float64 on the device of ``probs``.

Binned calibration error (Naeini et al., AAAI 2015; Guo et al., ICML 2017). The top-label view takes
``conf_i = max_k p_ik`` and ``hit_i = [argmax_k p_ik == y_i]``; the classwise view (Kull et al.,
NeurIPS 2019; the "marginal" mode of Kumar et al., NeurIPS 2019) takes, for each class k,
``conf_i = p_ik`` and ``hit_i = [y_i == k]``. With bins B_1..B_M, ``acc_b`` and ``conf_b`` the means of
hit and conf over B_b and ``w_b = |B_b| / N``:

    l1  (ECE) = sum_b w_b |acc_b - conf_b|
    l2        = sqrt(sum_b w_b (acc_b - conf_b)^2)
    max (MCE) = max over non-empty b of |acc_b - conf_b|

Classwise results combine the per-class values as Kumar et al.'s ``get_calibration_error``: the mean
for l1, the root of the mean of squares for l2, the maximum for max.

- Uniform bins: bin b (0-based) of M holds confidences in (b/M, (b+1)/M]; a confidence of exactly 0
  goes to the first bin and exactly 1 to the last (no extra bin for 1.0, unlike torchmetrics, issue
  #3510). These are the (lo, hi] bins of sklearn's ``calibration_curve`` and Kumar et al.'s
  ``get_equal_prob_bins``.
- Quantile (equal-mass) bins: the N confidences sorted (ties ordered by hit, so the result does not
  depend on row order); sorted position p goes to bin ``floor(p M / N)``, so bin sizes differ by at
  most one and bin k starts at position ``ceil(k N / M)``. With M > N some bins are empty; they carry
  zero weight and are never divided by. ``ace`` is this binning with the l1 norm (the adaptive ECE of
  Nixon et al., CVPR-W 2019, as TorchUncertainty's ``AdaptiveCalibrationError`` computes it).
- ``debias=True`` (l2 only): Kumar et al.'s debiased estimator, per bin
  ``(acc_b - conf_b)^2 - acc_b (1 - acc_b) / (|B_b| - 1)`` (bins of one sample contribute 0), the
  weighted sum clamped at 0 before the square root (``unbiased_l2_ce`` in p-lambda/verified_calibration).

Other metrics: ``brier_score`` = mean_i sum_k (p_ik - [y_i == k])^2 (Brier 1950, multiclass form, in
[0, 2]); ``negative_log_likelihood`` = -mean_i log(max(p_i,y_i, eps)); ``accuracy``; ``smooth_ece``
(Blasiok & Nakkiran, "Smooth ECE", ICLR 2024, as the relplot package computes it, see there); and
``bootstrap_interval`` / ``bootstrap_report``, percentile intervals over rows resampled with
replacement.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import numpy as np
import torch

from fastcal._checks import check_choice, check_int, check_labels, check_number, check_tensor, fail

ROW_SUM_TOLERANCE = 1e-3
# Bin counts above this are refused everywhere: each bin costs memory, and a million bins already leave
# almost every bin of any real evaluation set empty.
MAX_BINS = 1_000_000
NLL_EPS = 1e-12
REPORT_KEYS = ("accuracy", "ece", "mce", "l2", "brier", "nll", "confidence", "count", "n_bins")
SUMMARY_KEYS = (*REPORT_KEYS, "ace", "classwise_ece", "aurc", "augrc")
BOOTSTRAP_KEYS = ("accuracy", "ece", "mce", "l2", "brier", "nll", "confidence", "ace", "smooth_ece")

_f64 = torch.float64


def check_probabilities(probs, labels, *, name: str = "probs", labels_name: str = "labels"):
    """Validate a (N, C) probability matrix and its (N,) labels; return them.

    Raises ``ValueError`` naming the argument for a wrong rank or type, an empty tensor, NaN/inf,
    labels outside [0, C) or of the wrong length, a different device, and rows outside [0, 1] or not
    summing to 1 within ``ROW_SUM_TOLERANCE`` (or twice the dtype's machine epsilon, for half-precision
    probabilities; rows off by more are the usual sign of logits passed for probabilities).
    """
    check_tensor(name, probs, ndim=2, floating=True, finite=False)
    check_tensor(labels_name, labels, ndim=1, integer=True, nonempty=False)
    if labels.device != probs.device:
        raise fail(labels_name, f"a tensor on {probs.device} (the device of {name})", labels.device)
    check_labels(labels_name, labels, probs.shape[0], probs.shape[1])
    lo, hi = torch.aminmax(probs)
    s_lo, s_hi = torch.aminmax(probs.sum(dim=1, dtype=_f64))
    lo, hi, s_lo, s_hi = torch.stack([lo.to(_f64), hi.to(_f64), s_lo, s_hi]).tolist()  # one host sync
    if not (math.isfinite(lo) and math.isfinite(hi)):
        n_bad = int((~torch.isfinite(probs)).sum())
        raise fail(name, "finite values (no NaN or inf)", f"{n_bad} non-finite entries")
    # each entry rounded to the dtype is off by eps / 2 of itself, so a row's sum by eps / 2 (the entries
    # sum to 1), plus the softmax's own rounding: 2 eps leaves room for both
    tolerance = max(ROW_SUM_TOLERANCE, 2 * torch.finfo(probs.dtype).eps)
    if lo < 0.0 or hi > 1.0 + tolerance or max(abs(s_lo - 1.0), abs(s_hi - 1.0)) > tolerance:
        raise fail(
            name,
            f"probabilities: entries in [0, 1] and rows summing to 1 within {tolerance:g} "
            "(pass probabilities, not logits: softmax first)",
            f"entries in [{lo:.6g}, {hi:.6g}] and row sums in [{s_lo:.6g}, {s_hi:.6g}]",
        )
    return probs, labels


def _check_n_bins(n_bins) -> int:
    return check_int("n_bins", n_bins, minimum=1, maximum=MAX_BINS)


class RowStatistics(NamedTuple):
    """Per-row quantities every top-label metric is a function of (all float64, shape (N,))."""

    confidence: torch.Tensor  # max_k p_ik
    hit: torch.Tensor  # 1.0 where argmax_k p_ik == y_i
    brier: torch.Tensor  # sum_k (p_ik - [y_i == k])^2
    nll: torch.Tensor  # -log(max(p_i,y_i, eps))


def row_statistics(probs: torch.Tensor, labels: torch.Tensor, *, eps: float = NLL_EPS) -> RowStatistics:
    """Per-row confidence, hit, Brier term and NLL term (no validation: callers check first).

    Works in the input precision where that is exact (max, gather) or accurate to float32 rounding
    (squares, summed in float64); 16-bit inputs are widened to float32 first.
    """
    if probs.dtype not in (torch.float32, _f64):
        probs = probs.float()
    labels = labels.long()
    confidence, prediction = probs.max(dim=1)
    p_true = probs.gather(1, labels[:, None]).squeeze(1).to(_f64)
    brier = probs.square().sum(dim=1, dtype=_f64) - 2.0 * p_true + 1.0
    nll = -p_true.clamp(min=eps).log()
    return RowStatistics(confidence.to(_f64), (prediction == labels).to(_f64), brier, nll)


def uniform_bin_index(confidence: torch.Tensor, n_bins: int) -> torch.Tensor:
    """Bin of each confidence among ``n_bins`` equal-width bins (b/M, (b+1)/M]; 0 -> 0, 1 -> M-1.

    ceil(conf * M) - 1, then moved by one where the rounded product crossed an edge, so the bins are
    exactly those of comparisons with the float64 edges b / M.
    """
    confidence = confidence.to(_f64)
    edges = torch.arange(n_bins + 1, dtype=_f64, device=confidence.device) / n_bins
    index = (confidence * n_bins).ceil_().long().sub_(1).clamp_(0, n_bins - 1)
    index -= ((confidence <= edges[index]) & (index > 0)).long()
    index += ((confidence > edges[index + 1]) & (index < n_bins - 1)).long()
    return index


def quantile_bin_sorted(confidence: torch.Tensor, hit: torch.Tensor, n_bins: int):
    """Sort each column of (N, G) ``confidence``/``hit`` by (confidence, hit); return them and the
    equal-mass bin of each sorted position, ``floor(p * n_bins / N)`` (shape (N,))."""
    order = torch.argsort(hit, dim=0, stable=True)
    confidence, hit = confidence.gather(0, order), hit.gather(0, order)
    order = torch.argsort(confidence, dim=0, stable=True)
    confidence, hit = confidence.gather(0, order), hit.gather(0, order)
    n = confidence.shape[0]
    positions = torch.arange(n, device=confidence.device)
    return confidence, hit, torch.div(positions * n_bins, n, rounding_mode="floor")


def bin_sums(bin_index: torch.Tensor, confidence: torch.Tensor, hit: torch.Tensor, n_bins: int):
    """Per-bin (count, sum of confidence, sum of hits) for (N, G) inputs: a (G, n_bins, 3) tensor.

    ``bin_index`` is (N, G) or (N,) (the same bins for every column).
    """
    n, groups = confidence.shape
    if bin_index.ndim == 1:
        bin_index = bin_index[:, None].expand(n, groups)
    flat = bin_index + torch.arange(groups, device=confidence.device) * n_bins
    values = torch.stack([torch.ones_like(confidence), confidence, hit], dim=-1)
    sums = torch.zeros(groups * n_bins, 3, dtype=_f64, device=confidence.device)
    sums.index_add_(0, flat.reshape(-1), values.reshape(-1, 3))
    return sums.view(groups, n_bins, 3)


def binned_error(sums: torch.Tensor, norm: str, debias: bool = False) -> torch.Tensor:
    """Calibration error per group from (..., n_bins, 3) bin sums; l2 is returned *squared*."""
    count, conf_sum, hit_sum = sums.unbind(-1)
    safe = count.clamp(min=1.0)
    gap = (hit_sum - conf_sum) / safe  # acc_b - conf_b, 0 in an empty bin
    if norm == "max":
        return gap.abs().amax(dim=-1)
    weight = count / count.sum(dim=-1, keepdim=True)
    if norm == "l1":
        return (weight * gap.abs()).sum(dim=-1)
    per_bin = gap.square()
    if debias:
        acc = hit_sum / safe
        per_bin = torch.where(count > 1, per_bin - acc * (1.0 - acc) / (count - 1.0).clamp(min=1.0), 0.0)
    return (weight * per_bin).sum(dim=-1).clamp(min=0.0)


def _combine_groups(per_group: torch.Tensor, norm: str) -> torch.Tensor:
    if norm == "max":
        return per_group.amax()
    if norm == "l1":
        return per_group.mean()
    return per_group.mean().sqrt()


def calibration_error(
    probs: torch.Tensor,
    labels: torch.Tensor,
    *,
    n_bins: int = 15,
    binning: str = "uniform",
    norm: str = "l1",
    kind: str = "top_label",
    debias: bool = False,
) -> torch.Tensor:
    """Binned calibration error (0-dim float64); see the module docstring for the definitions.

    Args:
        probs: (N, C) probabilities. labels: (N,) integers in [0, C).
        n_bins: number of bins M >= 1 (uniform or equal-mass).
        binning: ``"uniform"`` (equal width, (lo, hi]) or ``"quantile"`` (equal mass).
        norm: ``"l1"`` (ECE), ``"l2"`` or ``"max"`` (MCE).
        kind: ``"top_label"`` (confidence of the predicted class) or ``"classwise"`` (every class).
        debias: Kumar et al.'s debiased estimator; only with ``norm="l2"``.
    """
    check_probabilities(probs, labels)
    n_bins = _check_n_bins(n_bins)
    check_choice("binning", binning, ("uniform", "quantile"))
    check_choice("norm", norm, ("l1", "l2", "max"))
    check_choice("kind", kind, ("top_label", "classwise"))
    if debias and norm != "l2":
        raise fail("debias", "False unless norm='l2' (Kumar et al.'s estimator is for l2)", debias)
    if kind == "top_label":
        stats = row_statistics(probs, labels)
        confidence, hit = stats.confidence[:, None], stats.hit[:, None]
    else:
        confidence = probs.to(_f64)
        classes = torch.arange(probs.shape[1], device=probs.device)
        hit = (labels.long()[:, None] == classes).to(_f64)
    if binning == "uniform":
        sums = bin_sums(uniform_bin_index(confidence, n_bins), confidence, hit, n_bins)
    else:
        confidence, hit, positions_bin = quantile_bin_sorted(confidence, hit, n_bins)
        sums = bin_sums(positions_bin, confidence, hit, n_bins)
    return _combine_groups(binned_error(sums, norm, debias), norm)


def ece(probs: torch.Tensor, labels: torch.Tensor, *, n_bins: int = 15) -> torch.Tensor:
    """Expected calibration error: top-label, ``n_bins`` uniform bins, l1."""
    return calibration_error(probs, labels, n_bins=n_bins)


def mce(probs: torch.Tensor, labels: torch.Tensor, *, n_bins: int = 15) -> torch.Tensor:
    """Maximum calibration error: top-label, ``n_bins`` uniform bins, max over non-empty bins."""
    return calibration_error(probs, labels, n_bins=n_bins, norm="max")


def ace(probs: torch.Tensor, labels: torch.Tensor, *, n_bins: int = 15) -> torch.Tensor:
    """Adaptive calibration error: top-label, ``n_bins`` equal-mass bins, l1."""
    return calibration_error(probs, labels, n_bins=n_bins, binning="quantile")


def brier_score(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Multiclass Brier score mean_i sum_k (p_ik - [y_i == k])^2, in [0, 2]."""
    check_probabilities(probs, labels)
    return row_statistics(probs, labels).brier.mean()


def negative_log_likelihood(
    probs: torch.Tensor, labels: torch.Tensor, *, eps: float = NLL_EPS
) -> torch.Tensor:
    """-mean_i log(max(p_i,y_i, eps)): the NLL from probabilities, clamped so a zero stays finite."""
    check_probabilities(probs, labels)
    eps = check_number("eps", eps, minimum=0.0, maximum=1.0, strict_minimum=True)
    return row_statistics(probs, labels, eps=eps).nll.mean()


def accuracy(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Fraction of rows whose argmax (first on ties) equals the label."""
    check_probabilities(probs, labels)
    return row_statistics(probs, labels).hit.mean()


class ReliabilityBins(NamedTuple):
    """Per-bin statistics of top-label confidence on uniform bins (float64 tensors)."""

    edges: torch.Tensor  # (M + 1,) b / M
    count: torch.Tensor  # (M,) samples per bin
    confidence: torch.Tensor  # (M,) mean confidence, 0 where empty
    accuracy: torch.Tensor  # (M,) mean hit, 0 where empty


def reliability_bins(probs: torch.Tensor, labels: torch.Tensor, *, n_bins: int = 15) -> ReliabilityBins:
    """Count, mean confidence and accuracy per uniform bin: the data of a reliability diagram."""
    check_probabilities(probs, labels)
    n_bins = _check_n_bins(n_bins)
    stats = row_statistics(probs, labels)
    index = uniform_bin_index(stats.confidence, n_bins)
    count, conf_sum, hit_sum = bin_sums(index, stats.confidence[:, None], stats.hit[:, None], n_bins)[
        0
    ].unbind(-1)
    safe = count.clamp(min=1.0)
    edges = torch.arange(n_bins + 1, dtype=_f64, device=probs.device) / n_bins
    return ReliabilityBins(edges, count, conf_sum / safe, hit_sum / safe)


# --- smooth ECE -------------------------------------------------------------------------------------


def _deposit(confidence: torch.Tensor, values: torch.Tensor, size: int) -> np.ndarray:
    """Spread each sample's (K,) values onto a grid of ``size`` points on [0, 1] by linear
    interpolation between its two neighbouring grid points (relplot's ``smooth_round_to_grid``).
    The (K, size) grid comes back to the host: everything after the deposit is O(size)."""
    position = confidence * (size - 1)
    left = position.long().clamp(0, size - 2)
    frac = position - left
    grid = torch.zeros(values.shape[0], size, dtype=_f64, device=confidence.device)
    grid.index_add_(1, left, values * (1.0 - frac))
    grid.index_add_(1, left + 1, values * frac)
    return grid.cpu().numpy()


@functools.lru_cache(maxsize=64)
def _gaussian_spectrum(size: int, sigma: float, length: int) -> np.ndarray:
    t = np.linspace(0.0, 1.0, size)
    kernel = np.exp(-((t - 0.5) ** 2) / (2.0 * sigma * sigma)) / (math.sqrt(2.0 * math.pi) * sigma)
    return np.fft.rfft(kernel, length)


def _reflected_gaussian(grid: np.ndarray, sigma: float) -> np.ndarray:
    """Convolve (K, G) grid values with a Gaussian of std ``sigma`` (sampled on the grid over [-1/2,
    1/2]), the signal reflected at 0 and 1; as relplot's ``ReflectedGaussianKernel.convolve``."""
    size = grid.shape[1]
    extended = np.concatenate([grid[:, ::-1][:, :-1], grid, grid[:, ::-1][:, 1:]], axis=1)
    length = 1 << (extended.shape[1] + size - 2).bit_length()  # a power of 2 >= the full convolution
    full = np.fft.irfft(np.fft.rfft(extended, length) * _gaussian_spectrum(size, sigma, length), length)
    start = size - 1 + size // 2  # 'valid' part starts at size - 1; relplot keeps [size//2, size//2 + size)
    return full[:, start : start + size]


def _interpolate(t: np.ndarray, grid: np.ndarray) -> np.ndarray:
    size = grid.shape[1]
    left = (t * (size - 1)).astype(np.int64).clip(0, size - 2)
    frac = (t - left / (size - 1)) * (size - 1)
    return grid[:, left] * (1.0 - frac) + grid[:, left + 1] * frac


class _SmoothECE:
    """smECE at any bandwidth for one sample of (confidence, hit), caching the grid deposits."""

    def __init__(self, confidence: torch.Tensor, hit: torch.Tensor):
        self.confidence = confidence
        self.values = torch.stack([confidence - hit, torch.ones_like(confidence)])
        self.grids: dict[int, np.ndarray] = {}
        self.results: dict[float, float] = {}

    def __call__(self, sigma: float) -> float:
        if sigma not in self.results:
            size = max(2000, round(20 / sigma)) // 2 + 1
            if size not in self.grids:
                self.grids[size] = _deposit(self.confidence, self.values, size)
            smoothed = _reflected_gaussian(self.grids[size], sigma)
            t = np.linspace(0.0, 1.0, max(round(10 / sigma), 200))
            residual, density = _interpolate(t, smoothed)
            self.results[sigma] = float(np.abs(residual).sum() / (density + 1e-4).sum())
        return self.results[sigma]

    def fixed_point(self, eps: float = 1e-3, steps: int = 10) -> tuple[float, float]:
        """relplot's ``smECE``: bisect on [0, 1] for the smallest sigma with smECE(sigma) <= sigma."""
        if self._too_wide(1.0, eps):
            return self(1.0), 1.0
        wide, narrow = 1.0, 0.0
        for _ in range(steps):
            mid = (wide + narrow) / 2
            if self._too_wide(mid, eps):
                narrow = mid
            else:
                wide = mid
        return self(wide), wide

    def _too_wide(self, sigma: float, eps: float) -> bool:
        return sigma < eps or sigma < self(sigma)


def smooth_ece(probs: torch.Tensor, labels: torch.Tensor, *, bandwidth: float | None = None) -> torch.Tensor:
    """Smooth ECE of the top-label confidence (Blasiok & Nakkiran, ICLR 2024).

    smECE_sigma = integral |r_sigma(t)| over [0, 1], where r_sigma is the Nadaraya-Watson kernel
    regression of the residual conf - hit on conf, weighted by the kernel density of conf. The kernel is
    a Gaussian reflected at 0 and 1. Discretized as relplot 1.0.3 (``relplot.smECE``): samples are
    spread linearly onto a grid of ``max(2000, round(20/sigma))//2 + 1`` points, convolved (here by
    FFT on the host), interpolated at ``max(round(10/sigma), 200)`` points, and the density gets 1e-4 added.
    ``bandwidth=None`` picks sigma as relplot does: 10 bisection steps on [0, 1] towards the fixed
    point sigma = smECE_sigma. A float uses that sigma (relplot's ``smECE_sigma``).
    """
    check_probabilities(probs, labels)
    stats = row_statistics(probs, labels)
    smooth = _SmoothECE(stats.confidence, stats.hit)
    if bandwidth is None:
        value, _ = smooth.fixed_point()
    else:
        value = smooth(check_number("bandwidth", bandwidth, minimum=0.0, strict_minimum=True))
    return torch.tensor(value, dtype=_f64, device=probs.device)


# --- reports and bootstrap --------------------------------------------------------------------------


def report_from_sums(bin_stats: torch.Tensor, brier_sum, nll_sum, n_bins: int) -> dict[str, float]:
    """The calibration report from (n_bins, 3) uniform-bin sums and the Brier/NLL sums."""
    count, conf_sum, hit_sum = bin_stats.sum(dim=0).tolist()
    sums = bin_stats[None]
    return {
        "accuracy": hit_sum / count,
        "ece": float(binned_error(sums, "l1")[0]),
        "mce": float(binned_error(sums, "max")[0]),
        "l2": float(binned_error(sums, "l2")[0].sqrt()),
        "brier": float(brier_sum) / count,
        "nll": float(nll_sum) / count,
        "confidence": conf_sum / count,
        "count": int(count),
        "n_bins": n_bins,
    }


def calibration_report(probs: torch.Tensor, labels: torch.Tensor, *, n_bins: int = 15) -> dict[str, float]:
    """accuracy, ece, mce, l2 (top-label, uniform bins), brier, nll, mean confidence, count, n_bins.

    Values are Python floats (``count`` and ``n_bins`` ints); ``CalibrationMeter.compute()`` returns
    the same dict.
    """
    check_probabilities(probs, labels)
    n_bins = _check_n_bins(n_bins)
    stats = row_statistics(probs, labels)
    index = uniform_bin_index(stats.confidence, n_bins)
    sums = bin_sums(index, stats.confidence[:, None], stats.hit[:, None], n_bins)[0]
    return report_from_sums(sums, stats.brier.sum(), stats.nll.sum(), n_bins)


def calibration_summary(
    probs: torch.Tensor,
    labels: torch.Tensor,
    *,
    n_bins: int = 15,
    proximity: torch.Tensor | None = None,
) -> dict[str, float]:
    """What every fastcal run reports for an evaluated group: ``calibration_report``'s keys plus ``ace``
    (top-label, ``n_bins`` equal-mass bins), ``classwise_ece`` (``n_bins`` uniform bins per class),
    ``aurc`` and ``augrc`` (``fastcal.metrics.selective``, ties grouped) and, given each row's
    ``proximity`` (N,), ``piece`` (``fastcal.metrics.proximity``, TCPT's 10 x 10 bins)."""
    from fastcal.metrics.proximity import piece
    from fastcal.metrics.selective import augrc, aurc

    report = calibration_report(probs, labels, n_bins=n_bins)
    report["ace"] = float(calibration_error(probs, labels, n_bins=n_bins, binning="quantile"))
    report["classwise_ece"] = float(calibration_error(probs, labels, n_bins=n_bins, kind="classwise"))
    report["aurc"] = float(aurc(probs, labels))
    report["augrc"] = float(augrc(probs, labels))
    if proximity is not None:
        report["piece"] = float(piece(probs, labels, proximity))
    return report


def harmonic_mean(a: float, b: float) -> float:
    """2ab / (a + b) (0 when both are 0): the HM column of base-to-new tables."""
    return 0.0 if a + b == 0 else 2.0 * a * b / (a + b)


def base_new_means(base: dict[str, float], new: dict[str, float]) -> dict[str, float]:
    """The summary of a base-to-new evaluation from its two reports: ``accuracy`` and ``ece``, the
    harmonic means of the base and new values, and ``mean_ece``, their arithmetic mean.

    ``mean_ece`` is what DOR's tables (ICML 2025) print as "HM ECE": all nine rows of its main table
    equal (base + new) / 2 to the printed rounding (CoOp: 3.07 and 14.58 -> 8.82; the harmonic mean
    would be 5.07), so compare with those tables on ``mean_ece``.
    """
    return {
        "accuracy": harmonic_mean(base["accuracy"], new["accuracy"]),
        "ece": harmonic_mean(base["ece"], new["ece"]),
        "mean_ece": (base["ece"] + new["ece"]) / 2.0,
    }


def bootstrap_indices(n_rows: int, n: int, seed: int, device=None) -> Iterator[torch.Tensor]:
    """``n`` resamples of ``n_rows`` row indices with replacement, from a CPU generator seeded by
    ``seed`` (the same draws on every device)."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(n):
        yield torch.randint(n_rows, (n_rows,), generator=generator).to(device)


def percentile_interval(values: torch.Tensor, level: float) -> tuple[float, float]:
    """The central ``level`` percentile interval (linear interpolation, as numpy's default)."""
    q = torch.tensor([(1.0 - level) / 2.0, (1.0 + level) / 2.0], dtype=_f64)
    lo, hi = torch.quantile(values.to(_f64).cpu(), q).tolist()
    return lo, hi


def _check_bootstrap(n, level, seed) -> tuple[int, float, int]:
    n = check_int("n", n, minimum=1)
    level = check_number("level", level, minimum=0.0, maximum=1.0, strict_minimum=True)
    if level >= 1.0:
        raise fail("level", "a number in (0, 1)", level)
    return n, level, check_int("seed", seed)


def bootstrap_interval(
    metric: Callable[[torch.Tensor, torch.Tensor], torch.Tensor | float],
    probs: torch.Tensor,
    labels: torch.Tensor,
    *,
    n: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``metric(probs, labels)``: ``n`` resamples of the rows with
    replacement (seeded by ``seed``), the central ``level`` interval of the metric's values."""
    if not callable(metric):
        raise TypeError(f"metric: expected a callable metric(probs, labels), got {type(metric).__name__}")
    check_probabilities(probs, labels)
    n, level, seed = _check_bootstrap(n, level, seed)
    values = torch.tensor(
        [
            float(metric(probs[idx], labels[idx]))
            for idx in bootstrap_indices(len(labels), n, seed, probs.device)
        ],
        dtype=_f64,
    )
    return percentile_interval(values, level)


def _top_label_metrics(stats: RowStatistics, n_bins: int, keys: Sequence[str]) -> dict[str, float]:
    result = {}
    if {"accuracy", "ece", "mce", "l2", "brier", "nll", "confidence"} & set(keys):
        index = uniform_bin_index(stats.confidence, n_bins)
        sums = bin_sums(index, stats.confidence[:, None], stats.hit[:, None], n_bins)[0]
        result.update(report_from_sums(sums, stats.brier.sum(), stats.nll.sum(), n_bins))
    if "ace" in keys:
        confidence, hit, positions_bin = quantile_bin_sorted(
            stats.confidence[:, None], stats.hit[:, None], n_bins
        )
        result["ace"] = float(binned_error(bin_sums(positions_bin, confidence, hit, n_bins), "l1")[0])
    if "smooth_ece" in keys:
        result["smooth_ece"] = _SmoothECE(stats.confidence, stats.hit).fixed_point()[0]
    return {key: result[key] for key in keys}


def bootstrap_report(
    probs: torch.Tensor,
    labels: torch.Tensor,
    *,
    n_bins: int = 15,
    n: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    keys: Sequence[str] = BOOTSTRAP_KEYS,
    progress: bool = False,
) -> dict[str, tuple[float, float]]:
    """Bootstrap intervals of several top-label metrics at once (``keys`` from ``BOOTSTRAP_KEYS``).

    Draws the same resamples as ``bootstrap_interval`` with the same ``seed``, so each interval equals
    ``bootstrap_interval(<metric>, ...)``; it resamples per-row statistics instead of the (N, C) matrix.
    """
    check_probabilities(probs, labels)
    n_bins = _check_n_bins(n_bins)
    n, level, seed = _check_bootstrap(n, level, seed)
    keys = tuple(keys)
    for key in keys:
        check_choice("keys", key, BOOTSTRAP_KEYS)
    stats = row_statistics(probs, labels)
    draws = bootstrap_indices(len(labels), n, seed, probs.device)
    if progress:
        from tqdm.auto import tqdm

        draws = tqdm(draws, total=n, desc="bootstrap", unit="resample", leave=False)
    values = torch.tensor(
        [
            list(_top_label_metrics(RowStatistics(*(s[idx] for s in stats)), n_bins, keys).values())
            for idx in draws
        ],
        dtype=_f64,
    )
    return {key: percentile_interval(values[:, j], level) for j, key in enumerate(keys)}
