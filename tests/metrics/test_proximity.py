"""PIECE and knn_proximity: a hand-computed PIECE, TCPT's PIECE function restated with pandas and
scikit-learn's KBinsDiscretizer (quantile edges pinned to linear interpolation), and the neighbour
proximities of ProCal and DAC against brute force."""

import numpy as np
import pytest
import torch

from fastcal.metrics import ece, knn_proximity, piece
from fastcal.metrics.functional import calibration_error

f64 = torch.float64


def test_piece_by_hand():
    """Proximity [.1, .2, .8, .9] in 2 equal-mass bins {0, 0, 1, 1}; every confidence .9; correct
    [1, 1, 0, 1]. ECE = |.75 - .9| = .15; PIECE = .5 |1 - .9| + .5 |.5 - .9| = .05 + .20 = .25."""
    conf = torch.full((4,), 0.9, dtype=f64)
    probs, labels = torch.stack([conf, 1 - conf], 1), torch.tensor([0, 0, 1, 0])
    proximity = torch.tensor([0.1, 0.2, 0.8, 0.9], dtype=f64)
    assert float(piece(probs, labels, proximity, proximity_bins=2)) == pytest.approx(0.25, abs=1e-15)
    assert float(ece(probs, labels)) == pytest.approx(0.15, abs=1e-15)


def tcpt_piece(conf, knndist, pred, gt, dist_bin_num=10, conf_bin_num=10):
    """TCPT's README.md ``PIECE`` (from ProCal's ``utils/metrics.py``), restated: pandas groupby over
    (KBinsDiscretizer quantile bin of the proximity, np.digitize bin of the confidence)."""
    import pandas as pd
    from sklearn.preprocessing import KBinsDiscretizer

    df = pd.DataFrame({"true": gt, "pred": pred, "conf": conf, "knndist": knndist})
    df["correct"] = (df.pred == df.true).astype(int)
    discretizer = KBinsDiscretizer(
        n_bins=dist_bin_num, encode="ordinal", strategy="quantile", quantile_method="linear", subsample=None
    )
    df["knn_bin"] = discretizer.fit_transform(df[["knndist"]]).astype(int)
    bounds = np.linspace(0, 1, conf_bin_num + 1)[1:-1]
    df["conf_bin"] = df["conf"].apply(lambda x: np.digitize(x, bounds))
    grouped = df.groupby(["knn_bin", "conf_bin"])
    return float(
        (abs(grouped["correct"].mean() - grouped["conf"].mean()) * (grouped["conf"].count() / len(df))).sum()
    )


@pytest.mark.parametrize("n, proximity_bins", [(997, 10), (403, 7)])
def test_equal_to_tcpts_piece(n, proximity_bins):
    g = torch.Generator().manual_seed(n)
    logits = torch.randn(n, 6, generator=g, dtype=f64) * 2
    labels = torch.multinomial(torch.softmax(logits * 0.6, 1), 1, generator=g).squeeze(1)
    probs = logits.softmax(1)
    proximity = torch.rand(n, generator=g, dtype=f64)
    proximity[:40] = proximity[40]  # ties at an edge
    conf, pred = probs.max(1)
    expected = tcpt_piece(conf.numpy(), proximity.numpy(), pred.numpy(), labels.numpy(), proximity_bins)
    assert float(piece(probs, labels, proximity, proximity_bins=proximity_bins)) == pytest.approx(
        expected, abs=1e-12
    )
    same_bins_ece = float(calibration_error(probs, labels, n_bins=10))
    assert float(piece(probs, labels, proximity)) >= same_bins_ece - 1e-12  # a finer partition


def test_constant_proximity_gives_the_ece_on_the_same_bins():
    g = torch.Generator().manual_seed(3)
    probs = torch.softmax(torch.randn(300, 4, generator=g, dtype=f64) * 2, 1)
    labels = torch.randint(0, 4, (300,), generator=g)
    value = float(piece(probs, labels, torch.ones(300, dtype=f64)))
    # [lo, hi) bins here, (lo, hi] in calibration_error: equal unless a confidence sits on an edge
    assert value == pytest.approx(float(calibration_error(probs, labels, n_bins=10)), abs=1e-12)


def test_knn_proximity_against_brute_force():
    g = torch.Generator().manual_seed(5)
    features = torch.randn(61, 9, generator=g, dtype=f64)
    reference = torch.randn(40, 9, generator=g, dtype=f64)
    unit = torch.nn.functional.normalize
    d = torch.cdist(unit(features, dim=1), unit(reference, dim=1))
    nearest = d.sort(dim=1).values
    torch.testing.assert_close(
        knn_proximity(features, reference), torch.exp(-(nearest[:, :10] ** 2)).mean(1), rtol=1e-10, atol=1e-12
    )
    torch.testing.assert_close(
        knn_proximity(features, reference, rule="dac"),
        torch.exp(-nearest[:, :5].mean(1)),
        rtol=1e-10,
        atol=1e-12,
    )
    within = torch.cdist(unit(features, dim=1), unit(features, dim=1)).fill_diagonal_(float("inf"))
    leave_one_out = torch.exp(-(within.sort(dim=1).values[:, :3] ** 2)).mean(1)
    torch.testing.assert_close(knn_proximity(features, k=3), leave_one_out, rtol=1e-10, atol=1e-12)
    assert knn_proximity(features[:3], k=10).shape == (3,)  # k capped at the 2 other rows
    with pytest.raises(ValueError, match="rule: expected one of 'procal', 'dac'"):
        knn_proximity(features, rule="faiss")
    with pytest.raises(ValueError, match="reference: expected feature dimension 9, got 4"):
        knn_proximity(features, reference[:, :4])


def test_piece_validation():
    probs = torch.full((4, 2), 0.5, dtype=f64)
    labels = torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="proximity: expected 4 values"):
        piece(probs, labels, torch.ones(3, dtype=f64))
    with pytest.raises(ValueError, match="proximity: expected finite values"):
        piece(probs, labels, torch.tensor([1.0, float("nan"), 0.0, 1.0], dtype=f64))
