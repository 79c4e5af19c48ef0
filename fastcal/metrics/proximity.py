"""Proximity-informed calibration error: PIECE and the proximity it bins on.

Xiong et al. ("Proximity-Informed Calibration for Deep Neural Networks", NeurIPS 2023) show that
samples far from the training data (low proximity) are over-confident even when the overall ECE is
small. PIECE is the ECE computed on a finer partition, by confidence and proximity together:

    PIECE = sum over non-empty cells (p, b) of |acc_pb - conf_pb| n_pb / N

``piece`` computes it as TCPT's evaluator does (ashshaksharifdeen/TCPT, README.md ``PIECE``, copied
from the authors' MiaoXiong2320/ProximityBias-Calibration ``utils/metrics.py``):

- confidence bins: ``n_bins`` equal-width bins [lo, hi), a confidence of 1 in the last bin
  (``np.digitize`` on the inner edges; 10 bins in TCPT and DAC);
- proximity bins: ``proximity_bins`` equal-mass bins, as scikit-learn's ``KBinsDiscretizer(strategy=
  "quantile")`` made them when that code was written: edges at the 0, 100/M, ..., 100 percentiles with
  linear interpolation (``np.percentile``'s default; scikit-learn 1.9 defaults to
  ``quantile_method="averaged_inverted_cdf"`` instead), edges closer than 1e-8 merged, a value at an
  inner edge going to the upper bin.

Since the partition refines the confidence bins, PIECE >= the ECE on the same confidence bins.

``knn_proximity`` gives each sample's proximity from its K nearest neighbours among reference
features (L2-normalized first): ``rule="procal"`` the mean over neighbours of exp(-d^2), d the
Euclidean distance (ProCal ``compute_calibration_metrics.py``: faiss ``IndexFlatL2`` distances are
squared; K = 10), ``rule="dac"`` exp(-mean of d) (ml-stat-Sustech/CLIP_Calibration
``trainers/calibration/proximity.py``; K = 5). Without ``reference`` the neighbours are the other
samples of the same set (ProCal's rule for its validation half, which searches K + 1 and drops the
sample itself).
"""

from __future__ import annotations

import numpy as np
import torch

from fastcal._checks import check_choice, check_int, check_tensor, fail
from fastcal.metrics.functional import check_probabilities, row_statistics

PIECE_BINS = 10
PROXIMITY_RULES = {"procal": 10, "dac": 5}  # rule -> its K
_EDGE_TOLERANCE = 1e-8  # KBinsDiscretizer drops edges closer than this
_CHUNK_ELEMENTS = 1 << 24
_f64 = torch.float64


def quantile_edges(values: np.ndarray, n_bins: int) -> np.ndarray:
    """Equal-mass bin edges: linear-interpolation percentiles, near-duplicates (< 1e-8 apart) merged."""
    edges = np.percentile(values, np.linspace(0.0, 100.0, n_bins + 1))
    keep = np.ediff1d(edges, to_begin=np.inf) > _EDGE_TOLERANCE
    return edges[keep]


def piece(
    probs: torch.Tensor,
    labels: torch.Tensor,
    proximity: torch.Tensor,
    *,
    n_bins: int = PIECE_BINS,
    proximity_bins: int = PIECE_BINS,
) -> torch.Tensor:
    """PIECE (module docstring) of top-label confidence, binned with each sample's ``proximity`` (N,)."""
    check_probabilities(probs, labels)
    check_tensor("proximity", proximity, ndim=1, floating=True)
    if proximity.shape[0] != probs.shape[0]:
        raise fail("proximity", f"{probs.shape[0]} values (one per row of probs)", proximity.shape[0])
    n_bins = check_int("n_bins", n_bins, minimum=1)
    proximity_bins = check_int("proximity_bins", proximity_bins, minimum=1)
    stats = row_statistics(probs, labels)
    inner = torch.from_numpy(np.linspace(0.0, 1.0, n_bins + 1)[1:-1]).to(stats.confidence.device)
    conf_bin = torch.bucketize(stats.confidence, inner, right=True)
    values = proximity.detach().to(_f64).cpu().numpy()
    edges = quantile_edges(values, proximity_bins)
    near_bin = torch.from_numpy(np.searchsorted(edges[1:-1], values, side="right")).to(conf_bin.device)
    cell = near_bin * n_bins + conf_bin
    cells = (len(edges) - 1 if len(edges) > 1 else 1) * n_bins
    sums = torch.zeros(3, cells, dtype=_f64, device=conf_bin.device)
    for row, value in enumerate((torch.ones_like(stats.hit), stats.confidence, stats.hit)):
        sums[row].index_add_(0, cell, value)
    count, conf_sum, hit_sum = sums
    gap = (hit_sum - conf_sum).abs() / count.clamp(min=1.0)
    return (gap * count).sum() / count.sum()


def knn_proximity(
    features: torch.Tensor,
    reference: torch.Tensor | None = None,
    *,
    k: int | None = None,
    rule: str = "procal",
) -> torch.Tensor:
    """Proximity (N,) float64 of each row of ``features`` (N, D) to its ``k`` nearest rows of
    ``reference`` (M, D), or of the other rows of ``features`` when ``reference`` is None (module
    docstring). ``k`` defaults to the rule's (10 for "procal", 5 for "dac") and is capped at the number
    of candidate neighbours."""
    check_choice("rule", rule, tuple(PROXIMITY_RULES))
    check_tensor("features", features, ndim=2, floating=True)
    leave_one_out = reference is None
    if leave_one_out:
        if features.shape[0] < 2:
            raise fail(
                "features", "at least 2 rows (each sample's neighbours are the others)", features.shape[0]
            )
        reference = features
    check_tensor("reference", reference, ndim=2, floating=True)
    if reference.shape[1] != features.shape[1]:
        raise fail("reference", f"feature dimension {features.shape[1]}", reference.shape[1])
    k = check_int("k", PROXIMITY_RULES[rule] if k is None else k, minimum=1)
    k = min(k, reference.shape[0] - int(leave_one_out))
    # distances as faiss computes them, in the features' precision (at least float32)
    dtype = torch.promote_types(features.dtype, torch.float32)
    queries = torch.nn.functional.normalize(features.to(dtype), dim=1)
    keys = torch.nn.functional.normalize(reference.to(queries), dim=1)
    step = max(1, _CHUNK_ELEMENTS // keys.shape[0])
    out = []
    for start in range(0, queries.shape[0], step):
        squared = (2.0 - 2.0 * queries[start : start + step] @ keys.T).clamp_(min=0.0)
        if leave_one_out:
            rows = torch.arange(squared.shape[0], device=squared.device)
            squared[rows, rows + start] = torch.inf
        nearest = squared.topk(k, dim=1, largest=False).values.to(_f64)
        if rule == "procal":
            out.append(torch.exp(-nearest).mean(dim=1))
        else:
            out.append(torch.exp(-nearest.sqrt().mean(dim=1)))
    return torch.cat(out)
