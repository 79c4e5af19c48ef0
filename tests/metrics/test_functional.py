"""fastcal.metrics.functional: golden values from the literature's code, peer libraries, properties."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastcal.metrics import (
    REPORT_KEYS,
    accuracy,
    ace,
    bootstrap_interval,
    bootstrap_report,
    brier_score,
    calibration_error,
    calibration_report,
    ece,
    mce,
    negative_log_likelihood,
    reliability_bins,
    smooth_ece,
)
from fastcal.metrics.functional import BOOTSTRAP_KEYS, _SmoothECE, row_statistics, uniform_bin_index

f64 = torch.float64


def t(x, dtype=f64):
    return torch.tensor(x, dtype=dtype)


def random_probs(n, c, *, seed, scale=2.0, n_bins=None):
    """Softmax of random logits, labels drawn from a sharpened softmax; rows whose top-label confidence
    lies within 1e-9 of a bin edge of ``n_bins`` bins are dropped (conventions differ on edges)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, generator=g, dtype=f64) * scale
    probs = torch.softmax(logits, dim=1)
    labels = torch.multinomial(torch.softmax(logits * 1.5, dim=1), 1, generator=g).squeeze(1)
    if n_bins is not None:
        scaled = probs.max(dim=1).values * n_bins
        keep = (scaled - scaled.round()).abs() > 1e-9
        probs, labels = probs[keep], labels[keep]
    return probs, labels


# --- golden values ----------------------------------------------------------------------------------

# torchmetrics, MulticlassCalibrationError docstring (src/torchmetrics/classification/calibration_error.py)
TM_PREDS = [[0.25, 0.20, 0.55], [0.55, 0.05, 0.40], [0.10, 0.30, 0.60], [0.90, 0.05, 0.05]]
TM_TARGET = [0, 1, 2, 0]


@pytest.mark.parametrize("dtype", [torch.float32, f64])
def test_torchmetrics_docstring_golden(dtype):
    probs, labels = t(TM_PREDS, dtype), torch.tensor(TM_TARGET)
    # Rounded as printed in the docstring.
    assert round(float(calibration_error(probs, labels, n_bins=3, norm="l1")), 4) == 0.2000
    assert round(float(calibration_error(probs, labels, n_bins=3, norm="l2")), 4) == 0.2082
    assert round(float(calibration_error(probs, labels, n_bins=3, norm="max")), 4) == 0.2333
    # By hand: bin (1/3, 2/3] holds conf .55, .55, .60 with one hit; bin (2/3, 1] holds .90, a hit.
    gap1, gap2 = (0.55 + 0.55 + 0.60) / 3 - 1 / 3, 0.1
    tol = 1e-12 if dtype == f64 else 1e-7
    assert float(ece(probs, labels, n_bins=3)) == pytest.approx(0.75 * gap1 + 0.25 * gap2, abs=tol)
    l2 = math.sqrt(0.75 * gap1**2 + 0.25 * gap2**2)
    assert float(calibration_error(probs, labels, n_bins=3, norm="l2")) == pytest.approx(l2, abs=tol)
    assert float(mce(probs, labels, n_bins=3)) == pytest.approx(gap1, abs=tol)


def test_kumar_ece_golden():
    # p-lambda/verified_calibration, calibration/util_test.py::test_ece (get_ece: top-label, equal-width
    # (lo, hi] bins, l1). Their last row [0.2, 0.0, 0.85] sums to 1.05; [0.15, 0.0, 0.85] keeps its
    # confidence (0.85) and prediction, so the golden value is unchanged.
    probs = t(
        [
            [0.8, 0.1, 0.1],
            [0.6, 0.2, 0.2],
            [0.0, 0.9, 0.1],
            [0.0, 1.0, 0.0],
            [0.3, 0.3, 0.4],
            [0.15, 0.0, 0.85],
        ]
    )
    labels = torch.tensor([0, 0, 1, 1, 0, 2])
    expected = 4 / 6.0 * (1 - (0.8 + 0.85 + 0.9 + 1.0) / 4)
    perm = torch.randperm(6)
    assert float(ece(probs[perm], labels[perm], n_bins=3)) == pytest.approx(expected, abs=1e-12)


def test_kumar_missing_classes_golden():
    # verified_calibration util_test.py::test_missing_classes_ece: get_ece([[.9, .1], [.8, .2]], [0, 0]) = .15
    assert float(ece(t([[0.9, 0.1], [0.8, 0.2]]), torch.tensor([0, 0]))) == pytest.approx(0.15, abs=1e-12)


@pytest.mark.parametrize("n_bins", [10, 15])
def test_kumar_three_label_golden(n_bins):
    # verified_calibration util_test.py::test_get_three_label_ce, p = 1 and 2. Every distinct probability
    # falls in its own uniform bin here, so these bins equal their "discrete" bins.
    l0, l1, l2 = [0.6, 0.3, 0.1], [0.1, 0.8, 0.1], [0.1, 0.0, 0.9]
    probs = t([l0] * 6 + [l1] * 4 + [l2] * 4)
    labels = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 2])
    marginal = {
        1: 4 / 42 * 0.1 + 6 / 42 * (5 / 6 - 0.6) + 8 / 42 * 0.1 + 4 / 42 * 0.05 + 6 / 42 * (0.3 - 1 / 6),
        2: (
            4 / 42 * 0.1**2
            + 6 / 42 * (5 / 6 - 0.6) ** 2
            + 8 / 42 * 0.1**2
            + 4 / 42 * 0.05**2
            + 6 / 42 * (0.3 - 1 / 6) ** 2
        )
        ** 0.5,
    }
    top = {
        1: 6 / 14 * (5 / 6 - 0.6) + 4 / 14 * 0.05 + 4 / 14 * 0.1,
        2: (6 / 14 * (5 / 6 - 0.6) ** 2 + 4 / 14 * 0.05**2 + 4 / 14 * 0.1**2) ** 0.5,
    }
    perm = torch.randperm(14)
    probs, labels = probs[perm], labels[perm]
    for p, norm in ((1, "l1"), (2, "l2")):
        got_top = calibration_error(probs, labels, n_bins=n_bins, norm=norm)
        got_marginal = calibration_error(probs, labels, n_bins=n_bins, norm=norm, kind="classwise")
        assert float(got_top) == pytest.approx(top[p], abs=1e-12)
        assert float(got_marginal) == pytest.approx(marginal[p], abs=1e-12)
    # Their debiased estimates are below the plug-in ones.
    for kind in ("top_label", "classwise"):
        debiased = calibration_error(probs, labels, n_bins=n_bins, norm="l2", kind=kind, debias=True)
        plugin = calibration_error(probs, labels, n_bins=n_bins, norm="l2", kind=kind)
        assert float(debiased) < float(plugin)


def test_kumar_two_label_debiased_golden():
    # verified_calibration util_test.py::test_get_two_label_ce: 9 samples, pt5 = [.5, .5] (x4, labels 0 1 0 0)
    # and pt6 = [.4, .6] (x5, labels 1 1 1 1 0). Plug-in: 4/9 * .25 + 5/9 * .2 (p = 1). Debiased l2, by hand
    # from their unbiased_square_ce: bin .5: .25^2 - .75 * .25 / 3 = 0; bin .6: .2^2 - .8 * .2 / 4 = 0.
    pt5, pt6 = [0.5, 0.5], [0.4, 0.6]
    probs = t([pt5, pt5, pt5, pt6, pt5, pt6, pt6, pt6, pt6])
    labels = torch.tensor([0, 1, 0, 1, 0, 1, 1, 1, 0])
    for kind in ("top_label", "classwise"):  # for two classes their marginal and top-label CE coincide
        got = calibration_error(probs, labels, n_bins=10, kind=kind)
        assert float(got) == pytest.approx(4 / 9 * 0.25 + 5 / 9 * 0.2, abs=1e-12)
        got = calibration_error(probs, labels, n_bins=10, kind=kind, norm="l2")
        assert float(got) == pytest.approx((4 / 9 * 0.25**2 + 5 / 9 * 0.2**2) ** 0.5, abs=1e-12)
        got = calibration_error(probs, labels, n_bins=10, kind=kind, norm="l2", debias=True)
        assert float(got) ** 2 == pytest.approx(0.0, abs=1e-15)  # the root of a rounding error


def test_torch_uncertainty_adaptive_golden():
    # ENSTA-U2IS-AI/torch-uncertainty, tests/metrics/classification/test_calibration.py::
    # TestAdaptiveCalibrationError::test_main (2 equal-mass bins of 3 and 2 samples).
    probs = t([[0.7, 0.3], [0.76, 0.24], [0.75, 0.25], [0.2, 0.8], [0.8, 0.2]])
    labels = torch.tensor([0, 0, 0, 1, 1])
    first = 1 - (0.7 + 0.76 + 0.75) / 3
    assert float(ace(probs, labels, n_bins=2)) == pytest.approx(
        3 / 5 * first + 2 / 5 * (0.8 - 0.5), abs=1e-12
    )
    l2 = calibration_error(probs, labels, n_bins=2, binning="quantile", norm="l2")
    assert float(l2) ** 2 == pytest.approx(3 / 5 * first**2 + 2 / 5 * (0.8 - 0.5) ** 2, abs=1e-12)
    top = calibration_error(probs, labels, n_bins=2, binning="quantile", norm="max")
    assert float(top) == pytest.approx(0.3, abs=1e-12)
    # Same test, first case: with these confidences adaptive and uniform binning agree.
    probs = t([[0.65, 0.35], [0.65, 0.35], [0.25, 0.75], [0.25, 0.75]])
    labels = torch.tensor([0, 0, 1, 1])
    assert float(ace(probs, labels, n_bins=2)) == pytest.approx(
        float(ece(probs, labels, n_bins=2)), abs=1e-12
    )


def test_sklearn_calibration_curve_golden():
    # scikit-learn sklearn/tests/test_calibration.py::test_calibration_curve. For two classes the
    # classwise error of class 1 is sum_b w_b |prob_true_b - prob_pred_b|, and class 0 mirrors it.
    y_pred = t([0.0, 0.1, 0.2, 0.8, 0.9, 1.0])
    probs = torch.stack([1 - y_pred, y_pred], dim=1)
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    got = calibration_error(probs, labels, n_bins=2, kind="classwise")
    assert float(got) == pytest.approx(0.5 * abs(0 - 0.1) + 0.5 * abs(1 - 0.9), abs=1e-12)
    y_pred = t([0.0, 0.1, 0.2, 0.5, 0.9, 1.0])  # quantile strategy: prob_true [0, 2/3], prob_pred [.1, .8]
    probs = torch.stack([1 - y_pred, y_pred], dim=1)
    labels = torch.tensor([0, 0, 0, 0, 1, 1])
    got = calibration_error(probs, labels, n_bins=2, kind="classwise", binning="quantile")
    assert float(got) == pytest.approx(0.5 * 0.1 + 0.5 * (0.8 - 2 / 3), abs=1e-12)


def test_sklearn_log_loss_golden():
    # scikit-learn sklearn/metrics/tests/test_classification.py::test_log_loss (multiclass case).
    probs = t([[0.2, 0.7, 0.1], [0.6, 0.2, 0.2], [0.6, 0.1, 0.3]])
    assert float(negative_log_likelihood(probs, torch.tensor([1, 0, 2]))) == pytest.approx(
        0.6904911, abs=1e-7
    )


# --- peer libraries on random inputs ----------------------------------------------------------------


@pytest.mark.parametrize(("n", "c", "n_bins", "seed"), [(1001, 7, 15, 0), (333, 3, 10, 1), (2999, 13, 20, 2)])
def test_matches_torchmetrics(n, c, n_bins, seed):
    from torchmetrics.functional.classification import multiclass_calibration_error

    probs, labels = random_probs(n, c, seed=seed, n_bins=n_bins)
    for norm in ("l1", "l2", "max"):
        expected = multiclass_calibration_error(probs, labels, num_classes=c, n_bins=n_bins, norm=norm)
        # torchmetrics casts confidences to float32 whatever the input dtype.
        assert float(calibration_error(probs, labels, n_bins=n_bins, norm=norm)) == pytest.approx(
            float(expected), abs=1e-6
        )


@pytest.mark.parametrize("seed", [0, 1])
def test_debias_matches_torchmetrics(seed):
    # torchmetrics' wrappers disable debiasing; its _ce_compute implements Kumar et al.'s estimator.
    from torchmetrics.functional.classification.calibration_error import _ce_compute

    probs, labels = random_probs(1001, 3, seed=seed, n_bins=15)
    # Bins of one sample: torchmetrics keeps their squared gap, Kumar et al. (and fastcal) drop it.
    assert 1.0 not in reliability_bins(probs, labels).count.tolist()
    stats = row_statistics(probs, labels)
    expected = _ce_compute(stats.confidence, stats.hit, 15, norm="l2", debias=True)
    got = calibration_error(probs, labels, n_bins=15, norm="l2", debias=True)
    assert float(got) == pytest.approx(float(expected), abs=1e-12)


@pytest.mark.parametrize(
    ("n_bins", "binning"), [(10, "uniform"), (7, "uniform"), (8, "quantile"), (5, "quantile")]
)
def test_classwise_binary_matches_sklearn_calibration_curve(n_bins, binning):
    from sklearn.calibration import calibration_curve

    g = torch.Generator().manual_seed(n_bins)
    n = 8 * 5 * 7  # divisible by the quantile bin counts: sklearn's percentile edges then split exactly
    y_prob = torch.rand(n, generator=g, dtype=f64)
    y_true = torch.bernoulli(y_prob.sqrt(), generator=g).long()
    probs = torch.stack([1 - y_prob, y_prob], dim=1)
    prob_true, prob_pred = calibration_curve(y_true.numpy(), y_prob.numpy(), n_bins=n_bins, strategy=binning)
    if binning == "uniform":
        counts = np.histogram(y_prob.numpy(), bins=np.linspace(0, 1, n_bins + 1))[0]
    else:
        counts = np.full(n_bins, n // n_bins)
    counts = counts[counts > 0]
    expected = float((counts / n * np.abs(prob_true - prob_pred)).sum())
    got = calibration_error(probs, y_true, n_bins=n_bins, binning=binning, kind="classwise")
    assert float(got) == pytest.approx(expected, abs=1e-12)


def test_brier_and_nll_match_sklearn():
    from sklearn.metrics import brier_score_loss, log_loss

    probs, labels = random_probs(777, 6, seed=3)
    expected = brier_score_loss(labels.numpy(), probs.numpy(), labels=list(range(6)), scale_by_half=False)
    assert float(brier_score(probs, labels)) == pytest.approx(expected, abs=1e-12)
    assert float(negative_log_likelihood(probs, labels)) == pytest.approx(
        log_loss(labels.numpy(), probs.numpy(), labels=list(range(6))), abs=1e-12
    )
    assert float(accuracy(probs, labels)) == pytest.approx(float((probs.argmax(1) == labels).double().mean()))


def test_float32_inputs_match_float64_reference():
    probs64, labels = random_probs(1234, 9, seed=5, n_bins=15)
    probs32 = probs64.float()
    probs32 = probs32 / probs32.sum(1, keepdim=True)
    report32, report64 = calibration_report(probs32, labels), calibration_report(probs32.double(), labels)
    for key in report64:
        assert report32[key] == pytest.approx(report64[key], abs=1e-7)


def test_nll_is_clamped():
    probs, labels = t([[1.0, 0.0], [0.5, 0.5]]), torch.tensor([1, 0])
    assert float(negative_log_likelihood(probs, labels)) == pytest.approx(
        (-math.log(1e-12) + math.log(2)) / 2
    )
    assert float(negative_log_likelihood(probs, labels, eps=1e-6)) == pytest.approx(
        (-math.log(1e-6) + math.log(2)) / 2
    )


# --- smooth ECE ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "scale", "seed"), [(7, 1.0, 0), (501, 2.0, 1), (20011, 0.7, 2)])
def test_smooth_ece_matches_relplot(n, scale, seed):
    relplot = pytest.importorskip("relplot")
    probs, labels = random_probs(n, 10, seed=seed, scale=scale)
    conf = probs.max(1).values.numpy()
    hit = (probs.argmax(1) == labels).double().numpy()
    assert float(smooth_ece(probs, labels)) == pytest.approx(relplot.smECE(conf, hit), rel=1e-9, abs=1e-12)
    for sigma in (0.05, 0.003):
        got = smooth_ece(probs, labels, bandwidth=sigma)
        assert float(got) == pytest.approx(relplot.smECE_sigma(conf, hit, sigma), rel=1e-9, abs=1e-12)


def test_smooth_ece_by_hand():
    # Independent of relplot. All samples at confidence 0.7 and wrong: the residual is 0.7 everywhere, so
    # the kernel regression is 0.7 * dens / (dens + 1e-4) ~ 0.7 wherever the density is not negligible.
    probs = t([[0.7, 0.3]] * 1000)
    labels = torch.ones(1000, dtype=torch.long)
    assert float(smooth_ece(probs, labels, bandwidth=0.05)) == pytest.approx(0.7, abs=1e-3)
    # The bandwidth returned by the search is (within one bisection step) the fixed point
    # smECE(sigma) = sigma of Blasiok & Nakkiran.
    probs, labels = random_probs(3001, 5, seed=7)
    stats = row_statistics(probs, labels)
    smooth = _SmoothECE(stats.confidence, stats.hit)
    value, sigma = smooth.fixed_point()
    assert value <= sigma
    narrower = sigma - 2.0**-10
    assert smooth(narrower) > narrower
    assert float(smooth_ece(probs, labels)) == value


# --- binning conventions --------------------------------------------------------------------------------


def test_uniform_bins_are_left_open_without_hidden_bin():
    for n_bins in (1, 3, 5, 10, 15, 20):
        edges = torch.arange(n_bins + 1, dtype=f64) / n_bins
        index = uniform_bin_index(edges, n_bins)
        expected = torch.cat([torch.zeros(1, dtype=torch.long), torch.arange(n_bins)])  # 0 -> 0, b/M -> b-1
        assert torch.equal(index, expected)
        above = torch.nextafter(edges[:-1], torch.tensor(2.0, dtype=f64))
        assert torch.equal(uniform_bin_index(above, n_bins), torch.arange(n_bins))
    # A confidence of 1.0 lands in the last bin (torchmetrics issue #3510 puts it in an extra bin).
    probs, labels = t([[1.0, 0.0], [1.0, 0.0], [0.3, 0.7]]), torch.tensor([0, 1, 1])
    bins = reliability_bins(probs, labels, n_bins=5)
    assert bins.count.tolist() == [0, 0, 0, 1, 2]
    assert bins.accuracy[-1] == 0.5 and bins.confidence[-1] == 1.0
    assert float(ece(probs, labels, n_bins=5)) == pytest.approx((2 * 0.5 + 0.3) / 3)
    assert float(mce(probs, labels, n_bins=5)) == pytest.approx(0.5)
    # Classwise: a probability of exactly 0 goes to the first bin. Class 1 has p = 0, 0 (one hit) in bin 0
    # and 0.7 (a hit) in bin 3; class 0 mirrors it with p = 1, 1 (one hit) and 0.3 (a miss).
    got = calibration_error(probs, labels, n_bins=5, kind="classwise")
    assert float(got) == pytest.approx(2 / 3 * 0.5 + 1 / 3 * 0.3)


def test_quantile_bins_more_bins_than_samples():
    # TorchUncertainty's adaptive ECE divides by an empty bin here; equal-mass bins of one sample each
    # give the mean |conf - hit| and nothing non-finite.
    probs, labels = t([[0.6, 0.4], [0.3, 0.7], [0.55, 0.45]]), torch.tensor([0, 0, 0])
    for n_bins in (3, 4, 50):
        got = ace(probs, labels, n_bins=n_bins)
        assert torch.isfinite(got)
        assert float(got) == pytest.approx((0.4 + 0.7 + 0.45) / 3)
    # Kumar et al.'s debiased estimator cannot use a bin of one sample: such bins contribute 0
    # (verified_calibration, calibration/utils.py, unbiased_square_ce).
    assert (
        float(calibration_error(probs, labels, n_bins=50, binning="quantile", norm="l2", debias=True)) == 0.0
    )


def test_reliability_bins_consistent_with_ece():
    probs, labels = random_probs(999, 4, seed=11)
    bins = reliability_bins(probs, labels, n_bins=12)
    assert int(bins.count.sum()) == 999
    weights = bins.count / 999
    assert float((weights * (bins.accuracy - bins.confidence).abs()).sum()) == pytest.approx(
        float(ece(probs, labels, n_bins=12)), abs=1e-12
    )


def test_report_matches_functions():
    probs, labels = random_probs(1500, 8, seed=4)
    report = calibration_report(probs, labels, n_bins=20)
    assert tuple(report) == REPORT_KEYS
    assert REPORT_KEYS == ("accuracy", "ece", "mce", "l2", "brier", "nll", "confidence", "count", "n_bins")
    assert report["ece"] == pytest.approx(float(ece(probs, labels, n_bins=20)), abs=1e-12)
    assert report["mce"] == pytest.approx(float(mce(probs, labels, n_bins=20)), abs=1e-12)
    l2 = calibration_error(probs, labels, n_bins=20, norm="l2")
    assert report["l2"] == pytest.approx(float(l2), abs=1e-12)
    assert report["brier"] == pytest.approx(float(brier_score(probs, labels)), abs=1e-12)
    assert report["nll"] == pytest.approx(float(negative_log_likelihood(probs, labels)), abs=1e-12)
    assert report["accuracy"] == pytest.approx(float(accuracy(probs, labels)), abs=1e-12)
    assert report["confidence"] == pytest.approx(float(probs.max(1).values.mean()), abs=1e-12)
    assert report["count"] == 1500 and report["n_bins"] == 20


# --- bootstrap ------------------------------------------------------------------------------------------


def test_bootstrap_interval_matches_numpy_percentiles():
    probs, labels = random_probs(301, 4, seed=8)
    lo, hi = bootstrap_interval(ece, probs, labels, n=100, level=0.9, seed=3)
    g = torch.Generator().manual_seed(3)
    values = [
        float(ece(probs[idx], labels[idx]))
        for idx in (torch.randint(301, (301,), generator=g) for _ in range(100))
    ]
    assert (lo, hi) == pytest.approx(tuple(np.percentile(values, [5, 95])), abs=1e-12)
    assert lo <= float(ece(probs, labels)) <= hi
    assert bootstrap_interval(ece, probs, labels, n=100, level=0.9, seed=4) != (lo, hi)


def test_bootstrap_report_equals_bootstrap_interval():
    probs, labels = random_probs(257, 5, seed=9)
    metrics = {
        "accuracy": accuracy,
        "ece": lambda p, y: ece(p, y, n_bins=10),
        "mce": lambda p, y: mce(p, y, n_bins=10),
        "l2": lambda p, y: calibration_error(p, y, n_bins=10, norm="l2"),
        "brier": brier_score,
        "nll": negative_log_likelihood,
        "confidence": lambda p, y: p.max(1).values.mean(),
        "ace": lambda p, y: ace(p, y, n_bins=10),
        "smooth_ece": smooth_ece,
    }
    assert set(metrics) == set(BOOTSTRAP_KEYS)
    report = bootstrap_report(probs, labels, n_bins=10, n=20, seed=1)
    for key, metric in metrics.items():
        assert report[key] == pytest.approx(
            bootstrap_interval(metric, probs, labels, n=20, seed=1), abs=1e-12
        ), key


# --- properties -------------------------------------------------------------------------------------------


def _calibrated_sample(n, seed):
    """Binary predictions whose label is drawn from the predicted probability: calibrated by construction."""
    g = torch.Generator().manual_seed(seed)
    p1 = torch.rand(n, generator=g, dtype=f64)
    labels = torch.bernoulli(p1, generator=g).long()
    return torch.stack([1 - p1, p1], dim=1), labels


@settings(max_examples=2, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_calibrated_sample_ece_tends_to_zero(seed):
    values = [float(ece(*_calibrated_sample(n, seed))) for n in (1_000, 100_000)]
    # The plug-in ECE of a calibrated sample is O(sqrt(M / N)): about 0.006 at N = 1e5 with 15 bins.
    assert values[1] < 0.015
    assert values[1] < values[0]
    probs, labels = _calibrated_sample(100_000, seed)
    assert float(calibration_error(probs, labels, norm="l2", debias=True)) < 0.015
    assert float(ace(probs, labels)) < 0.015
    assert float(smooth_ece(probs, labels)) < 0.015


@settings(max_examples=10, deadline=None)
@given(
    n=st.integers(1, 40),
    c=st.integers(2, 5),
    n_bins=st.integers(1, 12),
    seed=st.integers(0, 2**31 - 1),
)
def test_invariant_to_row_order(n, c, n_bins, seed):
    g = torch.Generator().manual_seed(seed)
    # Probabilities on a 1/20 grid: many ties in confidence, with hits and misses among the ties.
    weights = torch.randint(0, 5, (n, c), generator=g, dtype=f64)
    weights[:, 0] += 1
    probs = torch.round(weights / weights.sum(1, keepdim=True) * 20) / 20
    probs[:, -1] = 1 - probs[:, :-1].sum(1)
    keep = probs.min(1).values >= 0
    probs = probs[keep] if keep.any() else torch.full((1, c), 1 / c, dtype=f64)
    labels = torch.randint(0, c, (probs.shape[0],), generator=g)
    perm = torch.randperm(probs.shape[0], generator=g)

    def all_metrics(p, y):
        values = [
            calibration_error(p, y, n_bins=n_bins, binning=b, norm=norm, kind=k)
            for b in ("uniform", "quantile")
            for norm in ("l1", "l2", "max")
            for k in ("top_label", "classwise")
        ]
        values.append(calibration_error(p, y, n_bins=n_bins, norm="l2", debias=True))
        values += [brier_score(p, y), negative_log_likelihood(p, y), accuracy(p, y), smooth_ece(p, y)]
        return torch.stack(values)

    assert torch.allclose(
        all_metrics(probs, labels), all_metrics(probs[perm], labels[perm]), atol=1e-12, rtol=0
    )


# --- validation -------------------------------------------------------------------------------------------


ENTRY_POINTS = {
    "calibration_error": calibration_error,
    "ece": ece,
    "mce": mce,
    "ace": ace,
    "brier_score": brier_score,
    "negative_log_likelihood": negative_log_likelihood,
    "accuracy": accuracy,
    "smooth_ece": smooth_ece,
    "calibration_report": calibration_report,
    "reliability_bins": reliability_bins,
    "bootstrap_interval": lambda p, y, **kw: bootstrap_interval(ece, p, y, n=3, **kw),
    "bootstrap_report": lambda p, y, **kw: bootstrap_report(p, y, n=3, **kw),
}
WITH_BINS = (
    "calibration_error",
    "ece",
    "mce",
    "ace",
    "calibration_report",
    "reliability_bins",
    "bootstrap_report",
)


def _bad_inputs():
    probs, labels = t(TM_PREDS), torch.tensor(TM_TARGET)
    nan = probs.clone()
    nan[1, 1] = float("nan")
    inf = probs.clone()
    inf[0, 0] = float("inf")
    negative = probs.clone()
    negative[0] = t([0.3, -0.05, 0.75])
    return {
        "nan": ((nan, labels), "probs: expected finite"),
        "inf": ((inf, labels), "probs: expected finite"),
        "rank": ((probs[0], labels[:1]), "probs: expected a 2-D tensor"),
        "rank3": ((probs[None], labels), "probs: expected a 2-D tensor"),
        "n_mismatch": ((probs, labels[:3]), "labels: expected 4 labels"),
        "label_high": ((probs, torch.tensor([0, 1, 3, 0])), r"labels: expected labels in \[0, 3\)"),
        "label_negative": ((probs, torch.tensor([0, -1, 2, 0])), r"labels: expected labels in \[0, 3\)"),
        "float_labels": ((probs, labels.double()), "labels: expected an integer tensor"),
        "empty": ((probs[:0], labels[:0]), "probs: expected a non-empty tensor"),
        "logits": ((torch.log(probs) + 3.0, labels), "pass probabilities, not logits: softmax first"),
        "unnormalized": ((probs * 1.01, labels), "pass probabilities, not logits: softmax first"),
        "negative": ((negative, labels), "pass probabilities, not logits"),
    }


@pytest.mark.parametrize("case", list(_bad_inputs()))
@pytest.mark.parametrize("name", list(ENTRY_POINTS))
def test_validation(name, case):
    (probs, labels), message = _bad_inputs()[case]
    with pytest.raises(ValueError, match=message):
        ENTRY_POINTS[name](probs, labels)


@pytest.mark.parametrize("name", WITH_BINS)
def test_validation_n_bins(name):
    probs, labels = t(TM_PREDS), torch.tensor(TM_TARGET)
    with pytest.raises(ValueError, match="n_bins: expected an integer >= 1, got 0"):
        ENTRY_POINTS[name](probs, labels, n_bins=0)


def test_validation_choices():
    probs, labels = t(TM_PREDS), torch.tensor(TM_TARGET)
    with pytest.raises(ValueError, match="binning: expected one of 'uniform', 'quantile'"):
        calibration_error(probs, labels, binning="adaptive")
    with pytest.raises(ValueError, match="norm: expected one of"):
        calibration_error(probs, labels, norm="l3")
    with pytest.raises(ValueError, match="kind: expected one of"):
        calibration_error(probs, labels, kind="marginal")
    with pytest.raises(ValueError, match="debias: expected False unless norm='l2'"):
        calibration_error(probs, labels, debias=True)
    with pytest.raises(ValueError, match="level: expected a number in"):
        bootstrap_interval(ece, probs, labels, level=1.0)
    with pytest.raises(ValueError, match="n: expected an integer >= 1"):
        bootstrap_interval(ece, probs, labels, n=0)
    with pytest.raises(TypeError, match="metric: expected a callable"):
        bootstrap_interval("ece", probs, labels)
    with pytest.raises(ValueError, match="bandwidth: expected a number > 0"):
        smooth_ece(probs, labels, bandwidth=0.0)
    with pytest.raises(ValueError, match="keys: expected one of"):
        bootstrap_report(probs, labels, keys=("ece", "auroc"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_probabilities_are_probabilities(dtype):
    """Rows of a softmax taken in bf16 / fp16 sum to 1 only within the dtype's rounding; they are
    accepted, and give the metrics of the same rows in float64, while logits are still refused."""
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(301, 37, generator=g) * 4
    labels = torch.randint(0, 37, (301,), generator=g)
    probs = logits.to(dtype).softmax(-1)
    got = calibration_report(probs, labels, n_bins=15)
    want = calibration_report(probs.double() / probs.double().sum(-1, keepdim=True), labels, n_bins=15)
    assert got["accuracy"] == want["accuracy"]
    assert got["ece"] == pytest.approx(want["ece"], abs=4 * torch.finfo(dtype).eps)
    with pytest.raises(ValueError, match="pass probabilities, not logits"):
        calibration_report(logits.to(dtype), labels)


def test_calibration_summary_adds_the_selective_and_proximity_metrics():
    from fastcal.metrics import SUMMARY_KEYS, augrc, aurc, calibration_summary, piece

    g = torch.Generator().manual_seed(17)
    probs = torch.softmax(torch.randn(211, 5, generator=g, dtype=torch.float64) * 2, 1)
    labels = torch.randint(0, 5, (211,), generator=g)
    proximity = torch.rand(211, generator=g, dtype=torch.float64)
    summary = calibration_summary(probs, labels, n_bins=12)
    assert tuple(summary) == SUMMARY_KEYS
    assert summary["aurc"] == float(aurc(probs, labels)) and summary["augrc"] == float(augrc(probs, labels))
    with_piece = calibration_summary(probs, labels, n_bins=12, proximity=proximity)
    assert with_piece["piece"] == float(piece(probs, labels, proximity))


def test_base_new_means_and_the_dor_tables():
    """DOR's main table (ICML 2025), base / new / "HM" ECE: every row's third column is the arithmetic
    mean of the first two to the printed rounding, none is the harmonic mean."""
    from fastcal.metrics import base_new_means, harmonic_mean

    rows = [(4.30, 5.79, 5.05), (3.07, 14.58, 8.82), (2.67, 6.49, 4.58), (3.10, 8.98, 6.04)]
    rows += [
        (2.73, 6.33, 4.53),
        (4.86, 6.56, 5.71),
        (3.31, 5.47, 4.39),
        (2.92, 7.82, 5.37),
        (2.57, 5.95, 4.26),
    ]
    for base, new, printed in rows:
        means = base_new_means({"accuracy": 0.8, "ece": base}, {"accuracy": 0.6, "ece": new})
        assert abs(means["mean_ece"] - printed) <= 0.0051
        assert abs(means["ece"] - printed) > 0.05
        assert means["ece"] == harmonic_mean(base, new) == pytest.approx(2 * base * new / (base + new))
        assert means["accuracy"] == pytest.approx(2 * 0.8 * 0.6 / 1.4)
    assert harmonic_mean(0.0, 0.0) == 0.0
