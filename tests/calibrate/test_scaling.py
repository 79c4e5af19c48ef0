"""Vector and matrix scaling: the optimum of the stated objective (its gradient, written with autograd,
vanishes; scipy's L-BFGS-B on the same objective agrees), ODIR's penalty, and netcal's
LogisticCalibration where the definitions coincide (vector scaling of log-probabilities)."""

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastcal.calibrate import MatrixScaler, VectorScaler
from tests.calibrate.conftest import miscalibrated

f64 = torch.float64


def objective(weight, bias, logits, labels, *, off_diagonal=0.0, bias_weight=0.0):
    """The module's objective, written out: mean NLL + lambda/(C(C-1)) sum_offdiag W^2 + mu/C sum b^2."""
    c = logits.shape[1]
    out = logits @ weight.T + bias if weight.ndim == 2 else logits * weight + bias
    value = F.cross_entropy(out, labels) + bias_weight / c * bias.square().sum()
    if weight.ndim == 2:
        value = value + off_diagonal / (c * (c - 1)) * (weight - torch.diag(weight.diagonal())).square().sum()
    return value


def gradient_norm(scaler, logits, labels, **weights):
    w = scaler.weight.clone().requires_grad_()
    b = scaler.bias.clone().requires_grad_()
    objective(w, b, logits, labels, **weights).backward()
    return float(torch.cat([w.grad.reshape(-1), b.grad]).abs().max())


@pytest.mark.parametrize("cls", [VectorScaler, MatrixScaler])
def test_fit_is_the_objectives_minimum(cls):
    from scipy.optimize import minimize

    logits, labels = miscalibrated(801, 5, seed=3)
    scaler = cls().fit(logits, labels)
    assert gradient_norm(scaler, logits, labels) < 1e-7

    shape = (5, 5) if cls is MatrixScaler else (5,)
    size = int(np.prod(shape))

    def f(theta):
        params = torch.tensor(theta, dtype=f64, requires_grad=True)
        value = objective(params[:size].reshape(shape), params[size:], logits, labels)
        value.backward()
        return float(value.detach()), params.grad.numpy()

    start = np.concatenate([np.eye(5).reshape(-1) if cls is MatrixScaler else np.ones(5), np.zeros(5)])
    reference = minimize(f, start, jac=True, method="L-BFGS-B", options={"gtol": 1e-10, "ftol": 1e-15})
    ours = objective(scaler.weight, scaler.bias, logits, labels)
    assert float(ours) <= reference.fun + 1e-10
    probs = scaler.transform(logits)
    theirs = (
        logits @ torch.tensor(reference.x[:size]).reshape(shape).T
        if cls is MatrixScaler
        else logits * torch.tensor(reference.x[:5])
    ) + torch.tensor(reference.x[size:])
    torch.testing.assert_close(probs, theirs.softmax(1), atol=1e-5, rtol=0)


def test_odir_penalty():
    """ODIR: with a huge off-diagonal weight matrix scaling becomes vector scaling; the bias weight
    pulls the intercepts towards 0; each fit zeroes the gradient of its own regularized objective."""
    logits, labels = miscalibrated(1201, 4, seed=8)
    odir = MatrixScaler(off_diagonal_weight=1e6, bias_weight=0.5).fit(logits, labels)
    vector = VectorScaler(bias_weight=0.5).fit(logits, labels)
    assert float((odir.weight - torch.diag(odir.weight.diagonal())).abs().max()) < 1e-6
    torch.testing.assert_close(odir.weight.diagonal(), vector.weight, atol=1e-3, rtol=0)
    torch.testing.assert_close(odir.bias, vector.bias, atol=1e-3, rtol=0)
    assert gradient_norm(vector, logits, labels, bias_weight=0.5) < 1e-7
    mild = MatrixScaler(off_diagonal_weight=0.3, bias_weight=2.0).fit(logits, labels)
    assert gradient_norm(mild, logits, labels, off_diagonal=0.3, bias_weight=2.0) < 1e-7
    free = MatrixScaler().fit(logits, labels)
    assert float(mild.bias.abs().sum()) < float(free.bias.abs().sum())


def test_vector_scaling_of_log_probabilities_is_netcals_logistic_calibration():
    """netcal's LogisticCalibration(temperature_only=False) is softmax(w * log p + b) fitted by MLE:
    ours on log-probabilities. Its optimizer uses finite differences, hence the tolerance."""
    netcal_scaling = pytest.importorskip("netcal.scaling")
    logits, labels = miscalibrated(2000, 5, seed=0)
    fit, test = slice(0, 1400), slice(1400, None)
    probs = logits.softmax(1).numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = netcal_scaling.LogisticCalibration(temperature_only=False)
        reference.fit(probs[fit], labels[fit].numpy())
        theirs = reference.transform(probs[test])
    ours = VectorScaler().fit(logits[fit].log_softmax(1), labels[fit])
    np.testing.assert_allclose(ours.transform(logits[test].log_softmax(1)).numpy(), theirs, atol=1e-4)
    np.testing.assert_allclose(ours.weight.numpy(), np.asarray(reference.weights).reshape(-1), atol=1e-3)
