"""Histogram binning and isotonic regression: a histogram worked by hand, the pool-adjacent-violators
fit against the min-max formula of isotonic regression, scikit-learn's IsotonicRegression per class,
and netcal's HistogramBinning and IsotonicRegression on the same probabilities."""

import warnings

import numpy as np
import pytest
import torch

from fastcal.calibrate import HistogramBinning, IsotonicCalibrator
from fastcal.calibrate.binning import isotonic_points
from tests.calibrate.conftest import miscalibrated

f64 = torch.float64


def test_histogram_by_hand():
    """Two classes, 2 bins of p_0: (0, .5] holds p_0 = .2 (y=1) and .4 (y=0) -> 1/2 of them are class 0;
    (.5, 1] holds .7 (y=0), .8 (y=0), .9 (y=1) -> 2/3. Class 1 (p_1 = 1 - p_0): (0, .5] holds .1,
    .2, .3 -> 1/3 are class 1; (.5, 1] holds .6 (y=0), .8 (y=1) -> 1/2."""
    p0 = torch.tensor([0.2, 0.4, 0.7, 0.8, 0.9], dtype=f64)
    labels = torch.tensor([1, 0, 0, 0, 1])
    logits = torch.stack([p0.log(), (1 - p0).log()], dim=1)
    binning = HistogramBinning(n_bins=2).fit(logits, labels)
    torch.testing.assert_close(binning.bin_values, torch.tensor([[0.5, 2 / 3], [1 / 3, 0.5]], dtype=f64))
    # p_0 = .3 -> class 0 score 1/2, class 1 score (p_1 = .7) 1/2 -> (.5, .5); p_0 = .6 -> 2/3 and 1/3
    query = torch.tensor([[0.3, 0.7], [0.6, 0.4]], dtype=f64).log()
    expected = torch.tensor([[0.5, 0.5], [(2 / 3) / (2 / 3 + 1 / 3), (1 / 3) / (2 / 3 + 1 / 3)]], dtype=f64)
    torch.testing.assert_close(binning.transform(query), expected)


def test_empty_bins_keep_their_centre_and_an_all_zero_row_keeps_its_softmax():
    logits = torch.tensor([[2.0, 0.0], [1.5, 0.0], [3.0, 0.0]], dtype=f64)
    binning = HistogramBinning(n_bins=4).fit(logits, torch.tensor([1, 1, 1]))
    assert binning.bin_values[0, 0] == 0.125 and binning.bin_values[0, 1] == 0.375  # empty
    assert binning.bin_values[0, 3] == 0.0  # every p_0 there belongs to class 1
    isotonic = IsotonicCalibrator().fit(logits, torch.tensor([1, 0, 1]))
    # class 1's scores are all below 1/2, where its isotonic map is 0; class 0's too if its map is 0
    out = isotonic.transform(torch.tensor([[-5.0, 0.0]], dtype=f64))
    assert torch.isfinite(out).all() and float(out.sum()) == pytest.approx(1.0)


def minmax_isotonic(y):
    """Isotonic regression by its min-max formula (Barlow et al. 1972): g_i = max_{j<=i} min_{k>=i}
    mean(y_j..y_k), O(n^3), independent of pool-adjacent-violators."""
    n = len(y)
    return np.array(
        [max(min(np.mean(y[j : k + 1]) for k in range(i, n)) for j in range(i + 1)) for i in range(n)]
    )


def test_pav_equals_the_min_max_formula():
    rng = np.random.default_rng(2)
    for n in (1, 2, 7, 31):
        scores = rng.permutation(n).astype(float) / n
        targets = (rng.random(n) < scores).astype(float)
        x, g = isotonic_points(scores, targets)
        order = np.argsort(scores)
        np.testing.assert_allclose(
            np.interp(scores[order], x, g), minmax_isotonic(targets[order]), atol=1e-12
        )
    ties = np.array([0.1, 0.1, 0.5, 0.5, 0.5, 0.9])
    x, g = isotonic_points(ties, np.array([1.0, 0.0, 0.0, 0.0, 1.0, 1.0]))
    # pooled ties: 0.1 -> mean 1/2 (weight 2), 0.5 -> 1/3 (weight 3) violate the order and pool to
    # (2 * 1/2 + 3 * 1/3) / 5 = 0.4; 0.9 -> 1
    np.testing.assert_allclose(np.interp(ties, x, g), [0.4, 0.4, 0.4, 0.4, 0.4, 1.0])


def test_isotonic_is_sklearns_per_class_then_renormalized():
    from sklearn.isotonic import IsotonicRegression

    logits, labels = miscalibrated(1500, 4, seed=21)
    fit, test = slice(0, 1000), slice(1000, None)
    probs = logits.softmax(1).numpy()
    scores = np.stack(
        [
            IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip")
            .fit(probs[fit, k], (labels[fit].numpy() == k).astype(float))
            .predict(probs[test, k])
            for k in range(4)
        ],
        axis=1,
    )
    expected = scores / scores.sum(axis=1, keepdims=True)
    ours = IsotonicCalibrator().fit(logits[fit], labels[fit]).transform(logits[test]).numpy()
    np.testing.assert_allclose(ours, expected, atol=1e-12)


@pytest.mark.parametrize("name", ["HistogramBinning", "IsotonicRegression"])
def test_equal_to_netcal_on_the_same_probabilities(name):
    """netcal's one-vs-rest maps, fitted on float64 probabilities (its API takes no logits). Its
    histogram bins are [lo, hi) at fit and (lo, hi] at transform; random probabilities never sit on an
    edge, where ours would differ."""
    netcal_binning = pytest.importorskip("netcal.binning")
    logits, labels = miscalibrated(2600, 6, seed=5)
    fit, test = slice(0, 2000), slice(2000, None)
    probs = logits.softmax(1).numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = getattr(netcal_binning, name)(**({"bins": 12} if name == "HistogramBinning" else {}))
        reference.fit(probs[fit], labels[fit].numpy())
        theirs = reference.transform(probs[test])
    ours = HistogramBinning(n_bins=12) if name == "HistogramBinning" else IsotonicCalibrator()
    np.testing.assert_allclose(
        ours.fit(logits[fit], labels[fit]).transform(logits[test]).numpy(), theirs, atol=1e-12
    )


def test_interpolation_matches_numpy_interp_row_by_row():
    from fastcal.calibrate.binning import interpolate

    rng = np.random.default_rng(7)
    rows = []
    for length in (1, 2, 5):
        x = np.sort(rng.random(length))
        rows.append((x, rng.random(length)))
    width = max(2, *(len(x) for x, _ in rows))
    pad = [[np.pad(a, (0, width - len(a)), mode="edge") for a in row] for row in rows]
    px = torch.tensor(np.stack([x for x, _ in pad]))
    py = torch.tensor(np.stack([y for _, y in pad]))
    queries = np.concatenate([[-1.0, 0.0, 1.0, 2.0], rng.random(20)])
    got = interpolate(torch.tensor(np.tile(queries, (3, 1))), px, py).numpy()
    for i, (x, y) in enumerate(rows):
        np.testing.assert_allclose(got[i], np.interp(queries, x, y), atol=1e-15)
