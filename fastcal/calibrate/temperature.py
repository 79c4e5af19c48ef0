"""Temperature scaling (Guo et al., "On Calibration of Modern Neural Networks", ICML 2017).

One scalar T > 0 divides the logits: p_i = softmax(z_i / T). T minimizes the negative log-likelihood
on a held-out calibration set,

    F(T) = mean_i [ logsumexp_k(s z_ik) - s z_i,y_i ],   s = 1 / T.

F is convex in s: F'(s) = g(s) = mean_i (E_{p_i}[z_i] - z_i,y_i) and F''(s) = mean_i Var_{p_i}(z_i) >= 0,
so F has a single basin in u = log T as well. ``fit_temperature`` finds the root of g(e^{-u}) over
u = log T in float64 by Newton's method with these exact derivatives, safeguarded by bisection on a
bracket of [log T_MIN, log T_MAX], so it converges for CLIP-scale logits (logit scale 100), for a single
sample and for any label set (T does not depend on which classes the calibration set has, which is how
the ICML 2024 study of VLM calibration transfers T across label sets). When F has no minimum inside
[T_MIN, T_MAX] (e.g. every calibration sample is classified correctly, so F decreases as T -> 0) the
bound is returned. Known failures this avoids: a float32 finite-difference fit that stalls at T = 1
(netcal issue #61) and an unconstrained T that turns negative (gpleiss/temperature_scaling issue #31).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from fastcal._checks import check_labels, check_number, check_tensor, fail
from fastcal.calibrate.base import check_fit_inputs, looks_like_probabilities

T_MIN = 1e-4
T_MAX = 1e4
_MAX_ITERATIONS = 200
_TOLERANCE = 1e-12  # on log T


# Rows per block of a derivatives' pass: its float64 work buffers stay within the CPU's cache, are
# allocated once per pass, and the logits are never copied whole.
_BLOCK_ELEMENTS = 1 << 17


def _centered_blocks(logits: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
    """``(first row, float64 rows minus their mean)`` of ``logits`` in blocks (softmax and g are
    invariant to a per-row shift). Every block is written into one buffer: a block is valid until the
    next one is drawn."""
    rows = min(logits.shape[0], max(1, _BLOCK_ELEMENTS // logits.shape[1]))
    buffer = torch.empty(rows, logits.shape[1], dtype=torch.float64, device=logits.device)
    for start in range(0, logits.shape[0], rows):
        block = logits[start : start + rows]
        z = buffer[: len(block)].copy_(block)
        yield start, z.sub_(z.mean(dim=1, keepdim=True))


def _gradient_and_curvature(logits: torch.Tensor, target: torch.Tensor, s: float) -> tuple[float, float]:
    """g(s) = mean_i (E_p[z_i] - z_i,y) and g'(s) = mean_i Var_p(z_i) with p = softmax(s z_i), ``target``
    the centered logits of the labels."""
    sums = torch.zeros(2, dtype=torch.float64, device=logits.device)
    probabilities = work = None
    for start, z in _centered_blocks(logits):
        if probabilities is None:  # the first block is the largest
            probabilities, work = torch.empty_like(z), torch.empty_like(z)
        p = torch.mul(z, s, out=probabilities[: len(z)])
        p.sub_(p.amax(dim=1, keepdim=True)).exp_()
        p.div_(p.sum(dim=1, keepdim=True))
        mean = torch.mul(p, z, out=work[: len(z)]).sum(dim=1)
        sums[0] += (mean - target[start : start + len(z)]).sum()
        sums[1] += torch.sub(z, mean[:, None], out=work[: len(z)]).square_().mul_(p).sum()
    gradient, curvature = (sums / logits.shape[0]).tolist()
    return gradient, curvature


def fit_temperature(
    logits: torch.Tensor, labels: torch.Tensor, *, init: float = 1.0, assume_logits: bool = False
) -> float:
    """The temperature T in [T_MIN, T_MAX] minimizing the NLL of softmax(logits / T) (see module doc).

    Args:
        logits: (N, C) logits, C >= 2 (any dtype; the fit runs in float64).
        labels: (N,) integers in [0, C).
        init: starting temperature (> 0); the result does not depend on it, only the iteration count.
        assume_logits: accept inputs that look like probabilities (entries in [0, 1], rows summing
            to 1). Temperature scaling of probabilities is almost always a mistake (pass the logits, or
            their log), so it is refused unless this is True.
    """
    check_tensor("logits", logits, ndim=2, floating=True)
    if logits.shape[1] < 2:
        raise fail("logits", "at least 2 classes (columns)", f"shape {tuple(logits.shape)}")
    check_labels("labels", labels, logits.shape[0], logits.shape[1])
    init = check_number("init", init, minimum=0.0, strict_minimum=True)
    if not assume_logits and looks_like_probabilities(logits):
        raise fail(
            "logits",
            "logits (temperature scaling divides logits, not probabilities; pass the logits or "
            "log-probabilities, or assume_logits=True if these really are logits)",
            "rows that are probabilities (entries in [0, 1] summing to 1)",
        )
    z = logits.detach()
    index = labels.detach().long().to(z.device)[:, None]
    target = torch.cat(
        [block.gather(1, index[start : start + len(block)]) for start, block in _centered_blocks(z)]
    )
    target = target.squeeze(1)

    def phi(u: float) -> tuple[float, float]:
        """g(e^{-u}) and its derivative in u; g decreases in u and vanishes at the optimum."""
        s = math.exp(-u)
        g, curvature = _gradient_and_curvature(z, target, s)
        return g, -s * curvature

    lo, hi = math.log(T_MIN), math.log(T_MAX)
    if phi(lo)[0] <= 0.0:
        return T_MIN
    if phi(hi)[0] >= 0.0:
        return T_MAX
    u = min(max(math.log(init), lo), hi)
    for _ in range(_MAX_ITERATIONS):
        value, slope = phi(u)
        if value == 0.0:
            break
        if value > 0.0:
            lo = u
        else:
            hi = u
        step = value / slope if slope < 0.0 else math.inf
        if abs(step) <= _TOLERANCE:
            u -= step
            break
        u = u - step if lo < u - step < hi else 0.5 * (lo + hi)
        if hi - lo <= _TOLERANCE:
            break
    return math.exp(u)


class TemperatureScaler(nn.Module):
    """``forward(logits) = logits / T``, with T stored as the float64 buffer ``log_temperature``
    (saved and restored by ``state_dict``). ``fit`` sets T by ``fit_temperature`` and, as every
    calibrator's (``fastcal.calibrate.base``), refuses fewer than 2 samples; one T for all classes, so
    it applies to any class set (base -> new)."""

    name = "ts"
    transfers_classes = True
    uses_text_features = False

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        temperature = check_number("temperature", temperature, minimum=0.0, strict_minimum=True)
        self.register_buffer("log_temperature", torch.tensor(math.log(temperature), dtype=torch.float64))

    @property
    def temperature(self) -> float:
        return math.exp(float(self.log_temperature))

    @torch.no_grad()
    def fit(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        *,
        classnames: Sequence[str] | None = None,
        assume_logits: bool = False,
    ) -> TemperatureScaler:
        """Fit T on calibration ``logits`` (N, C) and ``labels`` (N,); return this module.
        ``classnames`` is accepted for the calibrators' common signature (T does not depend on them)."""
        check_fit_inputs(logits, labels, assume_logits=assume_logits)
        temperature = fit_temperature(logits, labels, init=self.temperature, assume_logits=assume_logits)
        self.log_temperature.fill_(math.log(temperature))
        return self

    def forward(self, logits: torch.Tensor, *, classnames: Sequence[str] | None = None) -> torch.Tensor:
        """Scaled logits (same shape and dtype; the class dimension is the last)."""
        check_tensor("logits", logits, floating=True, finite=False)
        return logits / torch.exp(self.log_temperature).to(device=logits.device, dtype=logits.dtype)

    def transform(self, logits: torch.Tensor, *, classnames: Sequence[str] | None = None) -> torch.Tensor:
        """Calibrated probabilities, ``softmax(logits / T)`` over the last dimension."""
        return torch.softmax(self(logits), dim=-1)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature:.6g}"
