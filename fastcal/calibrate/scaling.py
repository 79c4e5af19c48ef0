"""Vector and matrix scaling (Guo et al., "On Calibration of Modern Neural Networks", ICML 2017), with the
ODIR regularization of Kull et al. ("Beyond temperature scaling: obtaining well-calibrated multiclass
probabilities with Dirichlet calibration", NeurIPS 2019) as an option.

Both map logits z (C,) to ``W z + b``: vector scaling with a diagonal ``W = diag(w)``, matrix scaling
with a full C x C ``W``. The parameters minimize, in float64,

    L(W, b) = mean_i CE(W z_i + b, y_i) + lambda / (C (C - 1)) sum_{j != k} W_jk^2 + mu / C sum_k b_k^2

``lambda`` (``off_diagonal_weight``) and ``mu`` (``bias_weight``) are ODIR's weights in the paper's
normalized form (dirichletcal/dirichlet_python ``dirichletcal/calib/multinomial.py``: ``_objective``
penalizes the off-diagonal weights and the intercepts, ``reg_norm`` divides them by k(k-1) and k); the
diagonal is never penalized, and both default to 0 (Guo et al.'s unregularized fit). Vector scaling has
no off-diagonal weights, so only ``mu`` applies to it. L is convex in (W, b); it is minimized from the
identity (W = I, b = 0) by L-BFGS with a strong-Wolfe line search, the NLL and its gradient accumulated
over row chunks so the (N, C) logits are never copied whole to float64.

Dirichlet calibration is the same map on log-probabilities (``W log softmax(z) + b``): pass
``logits.log_softmax(-1)``. netcal's ``LogisticCalibration(temperature_only=False)`` is that diagonal
map (its "vector scaling" acts on log p, where the per-class weight does not cancel the row's
log-sum-exp), so it equals ``VectorScaler`` fitted on log-probabilities, not on logits.

Both are bound to the classes they were fitted on (one weight per class index).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from fastcal._checks import check_int, check_number, fail
from fastcal.calibrate.base import Calibrator

_CHUNK_ELEMENTS = 1 << 24  # rows per chunk: about 16M logits (128 MiB in float64)
_f64 = torch.float64


def _row_chunks(n_rows: int, n_classes: int, extra: int = 0) -> list[slice]:
    rows = max(1, _CHUNK_ELEMENTS // (n_classes + extra))
    return [slice(start, min(start + rows, n_rows)) for start in range(0, n_rows, rows)]


class _AffineScaler(Calibrator):
    full_matrix = False

    def __init__(
        self, *, off_diagonal_weight: float = 0.0, bias_weight: float = 0.0, max_iterations: int = 500
    ) -> None:
        super().__init__()
        self.off_diagonal_weight = check_number("off_diagonal_weight", off_diagonal_weight, minimum=0.0)
        self.bias_weight = check_number("bias_weight", bias_weight, minimum=0.0)
        self.max_iterations = check_int("max_iterations", max_iterations, minimum=1)
        self.weight: torch.Tensor | None = None  # (C,) vector scaling, (C, C) matrix scaling
        self.bias: torch.Tensor | None = None  # (C,)

    def _map(self, z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return (z @ weight.T if self.full_matrix else z * weight) + bias

    def _penalty(self, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        c = bias.shape[0]
        penalty = self.bias_weight / c * bias.square().sum()
        if self.full_matrix and self.off_diagonal_weight:
            off = weight - torch.diag(torch.diagonal(weight))
            penalty = penalty + self.off_diagonal_weight / (c * (c - 1)) * off.square().sum()
        return penalty

    def _fit(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        n, c = logits.shape
        device = logits.device
        identity = torch.eye(c, dtype=_f64, device=device)
        weight = (identity if self.full_matrix else identity.diagonal().clone()).requires_grad_(True)
        bias = torch.zeros(c, dtype=_f64, device=device, requires_grad=True)
        chunks = _row_chunks(n, c, extra=c if self.full_matrix else 0)
        optimizer = torch.optim.LBFGS(
            [weight, bias],
            lr=1.0,
            max_iter=self.max_iterations,
            max_eval=2 * self.max_iterations,
            tolerance_grad=1e-10,
            tolerance_change=1e-14,
            history_size=20,
            line_search_fn="strong_wolfe",
        )

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            total = self._penalty(weight, bias)
            total.backward()
            total = total.detach()
            for rows in chunks:
                out = self._map(logits[rows].to(_f64), weight, bias)
                part = F.cross_entropy(out, labels[rows], reduction="sum") / n
                part.backward()
                total = total + part.detach()
            return total

        optimizer.step(closure)
        self.weight, self.bias = weight.detach(), bias.detach()

    def _apply(self, logits: torch.Tensor) -> torch.Tensor:
        weight = self.weight.to(logits.device)
        bias = self.bias.to(logits.device)
        return self._map(logits.to(_f64), weight, bias).to(torch.promote_types(logits.dtype, torch.float32))

    def _state_keys(self) -> tuple[str, ...]:
        return ("weight", "bias")

    def _state(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight, "bias": self.bias}

    def _load(self, state: Mapping[str, torch.Tensor]) -> None:
        c = self.num_classes
        expected = (c, c) if self.full_matrix else (c,)
        weight, bias = (torch.as_tensor(state[k], dtype=_f64) for k in ("weight", "bias"))
        if tuple(weight.shape) != expected or tuple(bias.shape) != (c,):
            got = f"{tuple(weight.shape)} and {tuple(bias.shape)}"
            raise fail("state", f"weight of shape {expected} and bias of shape ({c},)", got)
        self.weight, self.bias = weight, bias

    def extra_repr(self) -> str:
        return f"off_diagonal_weight={self.off_diagonal_weight}, bias_weight={self.bias_weight}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"


class VectorScaler(_AffineScaler):
    """Vector scaling, ``w * z + b`` per class (module docstring); ``bias_weight`` is ODIR's mu."""

    name = "vector"

    def __init__(self, *, bias_weight: float = 0.0, max_iterations: int = 500) -> None:
        super().__init__(bias_weight=bias_weight, max_iterations=max_iterations)


class MatrixScaler(_AffineScaler):
    """Matrix scaling, ``W z + b`` (module docstring); ``off_diagonal_weight`` and ``bias_weight`` are
    ODIR's lambda and mu."""

    name = "matrix"
    full_matrix = True
