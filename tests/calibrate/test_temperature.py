"""fit_temperature and TemperatureScaler: known temperatures, brute-force NLL minima, hard cases."""

import math

import pytest
import torch

from fastcal.calibrate import T_MAX, T_MIN, TemperatureScaler, fit_temperature
from fastcal.metrics import ece

f64 = torch.float64


def nll(logits, labels, temperature):
    """NLL of softmax(logits / T) in float64: the objective, written independently."""
    return float(torch.nn.functional.cross_entropy(logits.to(f64) / temperature, labels))


def grid_argmin(logits, labels, lo=-4.0, hi=4.0, points=2001):
    """Brute force: the best T on a log-spaced grid of [e^lo, e^hi] and the grid spacing in log T."""
    log_t = torch.linspace(lo, hi, points, dtype=f64)
    z, y = logits.to(f64), labels
    values = []
    for chunk in log_t.split(64):
        log_p = torch.log_softmax(z[None] / chunk.exp()[:, None, None], dim=-1)
        values.append(-log_p.gather(-1, y[None, :, None].expand(len(chunk), -1, 1)).mean(dim=(1, 2)))
    values = torch.cat(values)
    best = int(values.argmin())
    return math.exp(float(log_t[best])), float(values[best]), (hi - lo) / (points - 1)


def labels_at_temperature(logits, temperature, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.multinomial(torch.softmax(logits.to(f64) / temperature, dim=1), 1, generator=g).squeeze(1)


def derivative_in_log_t(logits, labels, temperature):
    """d NLL / d log T by autograd, an independent check of the stationarity condition."""
    u = torch.tensor(math.log(temperature), dtype=f64, requires_grad=True)
    torch.nn.functional.cross_entropy(logits.to(f64) / u.exp(), labels).backward()
    return float(u.grad)


@pytest.mark.parametrize("true_t", [0.5, 2.0])
def test_recovers_known_temperature(true_t):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(5003, 10, generator=g, dtype=f64) * 3
    labels = labels_at_temperature(logits, true_t, seed=2)
    fitted = fit_temperature(logits, labels)
    assert fitted == pytest.approx(true_t, rel=0.08)
    grid_t, grid_nll, step = grid_argmin(
        logits, labels, lo=math.log(true_t) - 0.4, hi=math.log(true_t) + 0.4, points=401
    )
    assert abs(math.log(fitted) - math.log(grid_t)) <= step
    assert nll(logits, labels, fitted) <= grid_nll + 1e-12
    assert abs(derivative_in_log_t(logits, labels, fitted)) < 1e-9


def test_clip_scale_logits():
    # CLIP: logits = 100 * cosine(image, text) of unit vectors, in float32.
    g = torch.Generator().manual_seed(3)
    images = torch.nn.functional.normalize(torch.randn(2001, 64, generator=g), dim=1)
    texts = torch.nn.functional.normalize(torch.randn(37, 64, generator=g), dim=1)
    logits = 100.0 * images @ texts.T
    labels = labels_at_temperature(logits, 25.0, seed=4)
    fitted = fit_temperature(logits, labels)
    assert fitted == pytest.approx(25.0, rel=0.1)
    grid_t, grid_nll, step = grid_argmin(logits, labels, lo=2.5, hi=4.0, points=501)
    assert abs(math.log(fitted) - math.log(grid_t)) <= step
    assert nll(logits, labels, fitted) <= grid_nll + 1e-12
    assert abs(derivative_in_log_t(logits, labels, fitted)) < 1e-9
    # Nearly one-hot predictions: labels are the argmax but for 1% of random ones.
    sharp_labels = logits.argmax(1)
    sharp_labels[:20] = torch.randint(0, 37, (20,), generator=g)
    sharp = fit_temperature(logits, sharp_labels)
    grid_t, grid_nll, step = grid_argmin(logits, sharp_labels, lo=-3.0, hi=3.0, points=601)
    assert abs(math.log(sharp) - math.log(grid_t)) <= step
    assert nll(logits, sharp_labels, sharp) <= grid_nll + 1e-12
    assert abs(derivative_in_log_t(logits, sharp_labels, sharp)) < 1e-9


def test_result_does_not_depend_on_init():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(503, 4, generator=g, dtype=f64) * 4
    labels = labels_at_temperature(logits, 1.7, seed=6)
    fits = [fit_temperature(logits, labels, init=init) for init in (1e-3, 0.3, 1.0, 50.0, 1e4)]
    assert max(fits) - min(fits) < 1e-9 * fits[0]


def test_single_sample():
    # Misclassified, with the label's logit above the mean: an interior optimum, where E_p[z] = z_y.
    logits, labels = torch.tensor([[2.0, 1.5, -3.0]]), torch.tensor([1])
    fitted = fit_temperature(logits, labels)
    grid_t, grid_nll, step = grid_argmin(logits, labels)
    assert abs(math.log(fitted) - math.log(grid_t)) <= step
    assert nll(logits, labels, fitted) <= grid_nll + 1e-12
    p = torch.softmax(logits.double()[0] / fitted, dim=0)
    assert float((p * logits.double()[0]).sum()) == pytest.approx(1.5, abs=1e-10)
    # Correctly classified: the NLL decreases as T -> 0, so the lower bound is the constrained minimum.
    assert fit_temperature(logits, torch.tensor([0])) == T_MIN
    assert nll(logits, torch.tensor([0]), 0.1) < nll(logits, torch.tensor([0]), 0.2)
    # The label's logit below the mean: the NLL decreases as T -> infinity.
    assert fit_temperature(logits, torch.tensor([2])) == T_MAX
    assert nll(logits, torch.tensor([2]), T_MAX) < nll(logits, torch.tensor([2]), T_MAX / 10)


def test_mismatched_label_sets():
    # The ICML 2024 VLM calibration study fits T on one label set and applies it to another. Here the
    # calibration set has 7 classes and the target 13 others, with differently distributed logits and the
    # same true temperature.
    g = torch.Generator().manual_seed(7)
    calib_logits = torch.randn(3001, 7, generator=g, dtype=f64) * 2.5
    calib_labels = labels_at_temperature(calib_logits, 0.6, seed=8)
    target_logits = torch.randn(5003, 13, generator=g, dtype=f64) * 3.5 + torch.linspace(-1, 1, 13, dtype=f64)
    target_labels = labels_at_temperature(target_logits, 0.6, seed=9)
    fitted = fit_temperature(calib_logits, calib_labels)
    assert fitted == pytest.approx(0.6, rel=0.1)
    before = float(ece(torch.softmax(target_logits, 1), target_labels))
    after = float(ece(torch.softmax(target_logits / fitted, 1), target_labels))
    assert after < before / 3
    # About 50 calibration samples (the study's budget) whose labels cover 4 of the 7 classes: still
    # the exact minimizer of the calibration NLL.
    subset = calib_labels < 4
    few_logits, few_labels = calib_logits[subset][:50], calib_labels[subset][:50]
    few = fit_temperature(few_logits, few_labels)
    grid_t, grid_nll, step = grid_argmin(few_logits, few_labels)
    assert abs(math.log(few) - math.log(grid_t)) <= step
    assert nll(few_logits, few_labels, few) <= grid_nll + 1e-12
    assert abs(derivative_in_log_t(few_logits, few_labels, few)) < 1e-9


def test_refuses_probabilities_unless_told():
    g = torch.Generator().manual_seed(10)
    logits = torch.randn(200, 5, generator=g, dtype=f64)
    labels = labels_at_temperature(logits, 1.0, seed=11)
    probs = torch.softmax(logits, dim=1)
    with pytest.raises(ValueError, match=r"logits: expected logits .*assume_logits=True"):
        fit_temperature(probs, labels)
    with pytest.raises(ValueError, match="assume_logits"):
        TemperatureScaler().fit(probs, labels)
    fitted = fit_temperature(probs, labels, assume_logits=True)
    assert abs(derivative_in_log_t(probs, labels, fitted)) < 1e-9
    # Log-probabilities are logits up to a per-row shift: accepted, and the same T as the logits.
    log_probs = torch.log_softmax(logits, dim=1)
    assert fit_temperature(log_probs, labels) == pytest.approx(fit_temperature(logits, labels), rel=1e-10)


def test_validation():
    logits, labels = torch.randn(6, 3, dtype=f64), torch.tensor([0, 1, 2, 0, 1, 2])
    bad = logits.clone()
    bad[2, 2] = float("nan")
    with pytest.raises(ValueError, match="logits: expected finite"):
        fit_temperature(bad, labels)
    with pytest.raises(ValueError, match="logits: expected a 2-D tensor"):
        fit_temperature(logits[0], labels[:1])
    with pytest.raises(ValueError, match="labels: expected 6 labels"):
        fit_temperature(logits, labels[:4])
    with pytest.raises(ValueError, match=r"labels: expected labels in \[0, 3\)"):
        fit_temperature(logits, labels + 1)
    with pytest.raises(ValueError, match="logits: expected a non-empty tensor"):
        fit_temperature(logits[:0], labels[:0])
    with pytest.raises(ValueError, match="logits: expected at least 2 classes"):
        fit_temperature(logits[:, :1], torch.zeros(6, dtype=torch.long))
    with pytest.raises(ValueError, match="init: expected a number > 0"):
        fit_temperature(logits, labels, init=0.0)
    with pytest.raises(ValueError, match="temperature: expected a number > 0"):
        TemperatureScaler(-1.0)


def test_temperature_scaler_module():
    g = torch.Generator().manual_seed(12)
    logits = torch.randn(1001, 6, generator=g) * 3
    labels = labels_at_temperature(logits, 1.8, seed=13)
    scaler = TemperatureScaler().fit(logits, labels)
    assert scaler.temperature == pytest.approx(fit_temperature(logits, labels), rel=1e-12)
    assert "temperature=" in repr(scaler)

    out = scaler(logits)
    assert out.dtype == torch.float32 and out.shape == logits.shape
    torch.testing.assert_close(out, logits / scaler.temperature)

    state = scaler.state_dict()
    assert set(state) == {"log_temperature"} and state["log_temperature"].dtype == f64
    restored = TemperatureScaler()
    restored.load_state_dict(state)
    assert restored.temperature == scaler.temperature
    torch.testing.assert_close(restored(logits), out, rtol=0, atol=0)

    x = logits[:5].clone().requires_grad_(True)
    restored(x).sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 1 / scaler.temperature))
    with pytest.raises(ValueError, match="logits: expected a floating-point tensor"):
        scaler(labels)


def test_equal_to_netcal_in_float64_where_netcals_float32_fit_is_the_identity():
    """netcal's TemperatureScaling learns w = 1/T on log-probabilities (its API takes probabilities).
    In float64 it finds our T; in float32 its finite-difference step is rounded away and it returns
    w = 1 (netcal issue #61), while ours, fitted in float64 whatever the input dtype, finds T."""
    import warnings

    netcal_scaling = pytest.importorskip("netcal.scaling")
    g = torch.Generator().manual_seed(31)
    logits = torch.randn(2000, 5, generator=g, dtype=f64) * 3
    labels = labels_at_temperature(logits, 2.0, seed=32)
    probs = torch.softmax(logits, dim=1).numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = netcal_scaling.TemperatureScaling()
        reference.fit(probs, labels.numpy())
        float32_reference = netcal_scaling.TemperatureScaling()
        float32_reference.fit(probs.astype("float32"), labels.numpy())
    fitted = TemperatureScaler().fit(logits.float(), labels).temperature
    assert fitted == pytest.approx(1.0 / float(reference.weights[0]), rel=1e-4)
    assert fitted == pytest.approx(fit_temperature(logits, labels), rel=1e-6) and fitted > 1.5
    # document what netcal 1.4.0 does in float32 (issue #61): the identity
    if float(float32_reference.weights[0]) == 1.0:
        assert abs(fitted - 1.0) > 0.5
