"""AURC and AUGRC: hand-computed examples for each method (distinct and tied confidences), the curve,
TorchUncertainty's AURC / AUGRC metrics, and the oracle bound of fd-shifts."""

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from fastcal.metrics import augrc, aurc, risk_coverage_curve

f64 = torch.float64


def two_class(confidence, errors):
    """Rows of two-class probabilities with top-label confidence ``confidence`` (> 0.5) whose prediction
    (class 0) is wrong where ``errors`` is 1."""
    conf = torch.tensor(confidence, dtype=f64)
    return torch.stack([conf, 1 - conf], dim=1), torch.tensor(errors)


def test_distinct_confidences_by_hand():
    """conf [.9, .8, .7, .6], errors [0, 1, 0, 1]: r = [0, 1/2, 1/3, 1/2], g = r c = [0, 1/4, 1/4, 1/2] at
    c = [.25, .5, .75, 1].
    fd_shifts: trapezoid over (0, 0) (.25, 0) (.5, 1/2) (.75, 1/3) (1, 1/2) = 0.270833; generalized
      (0, 0) (.25, 0) (.5, 1/4) (.75, 1/4) (1, 1/2) = 0.1875.
    torch_uncertainty: the trapezoid over [.25, 1] divided by .75: 0.203125 / .75 = 0.361111 and
      0.140625 / .75 = 0.25.
    fpp: the mean of r, 1.3333 / 4 = 0.333333, and of g, 1 / 4 = 0.25."""
    probs, labels = two_class([0.9, 0.8, 0.7, 0.6], [0, 1, 0, 1])
    expected = {
        "fd_shifts": (0.2708333333333333, 0.1875),
        "torch_uncertainty": (0.3611111111111111, 0.25),
        "fpp": (0.3333333333333333, 0.25),
    }
    for method, (want_aurc, want_augrc) in expected.items():
        assert float(aurc(probs, labels, method=method)) == pytest.approx(want_aurc, abs=1e-15), method
        assert float(augrc(probs, labels, method=method)) == pytest.approx(want_augrc, abs=1e-15), method
    curve = risk_coverage_curve(probs, labels)
    torch.testing.assert_close(curve.coverage, torch.tensor([0, 0.25, 0.5, 0.75, 1], dtype=f64))
    torch.testing.assert_close(curve.selective_risk, torch.tensor([0, 0, 1 / 2, 1 / 3, 1 / 2], dtype=f64))
    torch.testing.assert_close(curve.generalized_risk, torch.tensor([0, 0, 1 / 4, 1 / 4, 1 / 2], dtype=f64))
    assert math.isinf(curve.threshold[0]) and curve.threshold[1:].tolist() == pytest.approx(
        [0.9, 0.8, 0.7, 0.6]
    )


def test_ties_are_grouped_whatever_their_order():
    """conf [.9, .8, .8, .6] with the tied pair's errors [1, 0] or [0, 1]: one threshold keeps or drops
    both, so the points are (0, 0) (.25, 0) (.75, 1/3) (1, 1/2): AURC = .25 * 0 + .5 * (0 + 1/3) / 2 +
    .25 * (1/3 + 1/2) / 2 = 0.1875; AUGRC over (.25, 0) (.75, 1/4) (1, 1/2): 0.0625 + 0.09375 = 0.15625.
    The per-sample methods depend on the order (row order here)."""
    first, labels = two_class([0.9, 0.8, 0.8, 0.6], [0, 1, 0, 1])
    second, swapped = two_class([0.9, 0.8, 0.8, 0.6], [0, 0, 1, 1])
    for probs, y in ((first, labels), (second, swapped)):
        assert float(aurc(probs, y)) == pytest.approx(0.1875, abs=1e-15)
        assert float(augrc(probs, y)) == pytest.approx(0.15625, abs=1e-15)
    assert float(aurc(first, labels, method="torch_uncertainty")) == pytest.approx(0.3611111111111111)
    assert float(aurc(second, swapped, method="torch_uncertainty")) == pytest.approx(0.1944444444444444)
    assert len(risk_coverage_curve(first, labels).coverage) == 4


def test_oracle_ordering_reaches_fd_shifts_bounds():
    """With every error less confident than every correct sample, AUGRC is eps^2/2 up to O(1/N) and AURC
    tends to eps + (1 - eps) ln(1 - eps) (fd-shifts ``rc_stats.py``: the optimal values)."""
    n, n_errors = 4000, 1000
    confidence = torch.linspace(0.99, 0.51, n, dtype=f64)
    errors = (torch.arange(n) >= n - n_errors).long()
    probs, labels = torch.stack([confidence, 1 - confidence], 1), errors
    eps = n_errors / n
    assert float(augrc(probs, labels)) == pytest.approx(eps**2 / 2, abs=2e-4)
    assert float(aurc(probs, labels)) == pytest.approx(eps + (1 - eps) * math.log(1 - eps), abs=2e-3)


def load_torch_uncertainty_risk_coverage():
    """TorchUncertainty's risk_coverage module, loaded by itself: importing the package imports
    lightning, which torch-uncertainty does not require."""
    spec = importlib.util.find_spec("torch_uncertainty")
    if spec is None:
        pytest.skip("torch-uncertainty is not installed (a test extra)")
    path = Path(spec.submodule_search_locations[0]) / "metrics" / "classification" / "risk_coverage.py"
    module_spec = importlib.util.spec_from_file_location("torch_uncertainty_risk_coverage", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def test_equal_to_torch_uncertainty():
    module = load_torch_uncertainty_risk_coverage()
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(1001, 7, generator=g, dtype=f64) * 2
    labels = torch.multinomial(torch.softmax(logits * 0.7, 1), 1, generator=g).squeeze(1)
    probs = logits.softmax(1)  # distinct confidences: no tie for the unstable sort to break
    for ours, metric in ((aurc, module.AURC()), (augrc, module.AUGRC())):
        metric.update(probs, labels)
        theirs = float(metric.compute())
        assert float(ours(probs, labels, method="torch_uncertainty")) == pytest.approx(theirs, rel=1e-6)
    docstring = module.AURC()
    docstring.update(torch.tensor([[0.7, 0.3], [0.6, 0.4], [0.8, 0.2]]), torch.tensor([0, 1, 0]))
    assert float(docstring.compute()) == pytest.approx(0.0833, abs=1e-4)


def test_validation_and_single_sample():
    probs, labels = two_class([0.7], [1])
    assert math.isnan(float(aurc(probs, labels, method="torch_uncertainty")))
    assert float(aurc(probs, labels)) == 1.0 and float(augrc(probs, labels)) == 0.5
    with pytest.raises(ValueError, match="method: expected one of 'fd_shifts', 'torch_uncertainty', 'fpp'"):
        aurc(probs, labels, method="trapz")
    with pytest.raises(ValueError, match="probs: expected probabilities"):
        aurc(probs * 3, labels)
