"""DAC, distance-aware calibration of prompt-tuned CLIP on new classes (Wang et al., "Open-Vocabulary
Calibration for Fine-tuned CLIP", ICML 2024), as its public code computes it
(ml-stat-Sustech/CLIP_Calibration ``trainers/calibration/distanse_aware_calibration.py``, ``fit`` and
``predict``; k = 5 from ``train.py``'s ``CALIBRATION.DAC.K``).

Prompt tuning leaves a new class's text feature farther from the base classes than the zero-shot
feature was, and the model is over-confident on exactly those classes. For every class c being
evaluated, with L2-normalized features, base classes b and Euclidean distances:

    D_zs(c) = mean of the k smallest ||t_zs(c) - t_zs(b)||   (zero-shot text features)
    D_ft(c) = mean of the k smallest ||t_ft(c) - t_ft(b)||   (tuned text features)
    s_c     = exp(-D_ft(c)) / exp(-D_zs(c)) = exp(D_zs(c) - D_ft(c))
    s_c     = 1 when the nearest tuned-space distance is below 0.05 (c is a base class)

and a row's logits are all multiplied by s of its predicted class: z_i <- s_{argmax z_i} z_i (the argmax
is unchanged). Here the logits are first divided by a temperature T fitted on the base-class
calibration set (``base_temperature=True``, the code's ``CALIBRATION=TempScaling`` combination);
``base_temperature=False`` keeps the model's own scale (T = 1, its shipped run script's setting). So
DAC is a per-sample temperature T / s_{y_hat}: it transfers to any class set whose text features are
given, and on the base classes themselves (every s = 1) it is temperature scaling.

``fit(logits, labels, text_features=, zeroshot_text_features=)`` takes the base-class calibration set
and the base classes' tuned and zero-shot text features (C_base, D); ``calibrator(logits,
text_features=, zeroshot_text_features=)`` the evaluated classes' (C, D).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from fastcal._checks import check_int, check_number, check_tensor, fail
from fastcal.calibrate.base import Calibrator
from fastcal.calibrate.temperature import fit_temperature

DAC_K = 5
BASE_CLASS_DISTANCE = 0.05
_f64 = torch.float64


def _features(name: str, features: Any, num_classes: int) -> torch.Tensor:
    if features is None:
        raise fail(name, f"({num_classes}, D) class text features (DAC reads them)", None)
    check_tensor(name, features, ndim=2, floating=True)
    if features.shape[0] != num_classes:
        raise fail(name, f"{num_classes} rows (one per class)", features.shape[0])
    norms = features.to(_f64).norm(dim=1)
    if bool((norms == 0).any()):
        raise fail(name, "rows with a nonzero norm (they are L2-normalized)", "an all-zero row")
    return features.to(_f64) / norms[:, None]


def mean_nearest_distance(
    queries: torch.Tensor, references: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each query row, the mean of its ``k`` smallest Euclidean distances to the reference rows, and
    the smallest one."""
    distances = torch.cdist(queries, references)
    nearest = distances.topk(min(k, references.shape[0]), dim=1, largest=False).values
    return nearest.mean(dim=1), nearest[:, 0]


class DistanceAwareCalibrator(Calibrator):
    """DAC (module docstring): ``k`` nearest base classes, the base-class guard distance, and whether a
    base temperature is fitted first."""

    name = "dac"
    transfers_classes = True
    uses_text_features = True

    def __init__(
        self, k: int = DAC_K, *, base_distance: float = BASE_CLASS_DISTANCE, base_temperature: bool = True
    ) -> None:
        super().__init__()
        self.k = check_int("k", k, minimum=1)
        self.base_distance = check_number("base_distance", base_distance, minimum=0.0)
        self.base_temperature = bool(base_temperature)
        self.temperature = 1.0
        self.base_text_features: torch.Tensor | None = None  # (C_base, D), L2-normalized
        self.base_zeroshot_text_features: torch.Tensor | None = None

    def _fit(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        *,
        text_features: torch.Tensor | None = None,
        zeroshot_text_features: torch.Tensor | None = None,
    ) -> None:
        c = logits.shape[1]
        tuned = _features("text_features", text_features, c)
        zeroshot = _features("zeroshot_text_features", zeroshot_text_features, c)
        if zeroshot.shape != tuned.shape:
            expected = f"shape {tuple(tuned.shape)} like text_features"
            raise fail("zeroshot_text_features", expected, tuple(zeroshot.shape))
        self.temperature = fit_temperature(logits, labels) if self.base_temperature else 1.0
        self.base_text_features, self.base_zeroshot_text_features = tuned, zeroshot

    def class_factors(
        self, text_features: torch.Tensor, zeroshot_text_features: torch.Tensor
    ) -> torch.Tensor:
        """s_c (C,) of the classes whose tuned and zero-shot text features (C, D) are given."""
        check_tensor("text_features", text_features, ndim=2, floating=True)
        c = text_features.shape[0]
        tuned = _features("text_features", text_features, c)
        zeroshot = _features("zeroshot_text_features", zeroshot_text_features, c)
        dim = self.base_text_features.shape[1]
        for name, features in (("text_features", tuned), ("zeroshot_text_features", zeroshot)):
            if features.shape[1] != dim:
                raise fail(name, f"feature dimension {dim} like the fitted base classes", features.shape[1])
        base_tuned = self.base_text_features.to(tuned.device)
        base_zeroshot = self.base_zeroshot_text_features.to(tuned.device)
        d_zeroshot, _ = mean_nearest_distance(zeroshot, base_zeroshot, self.k)
        d_tuned, nearest_tuned = mean_nearest_distance(tuned, base_tuned, self.k)
        factors = torch.exp(d_zeroshot - d_tuned)
        return torch.where(nearest_tuned < self.base_distance, torch.ones_like(factors), factors)

    def _apply(
        self,
        logits: torch.Tensor,
        *,
        text_features: torch.Tensor | None = None,
        zeroshot_text_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if text_features is None or zeroshot_text_features is None:
            missing = "text_features" if text_features is None else "zeroshot_text_features"
            raise fail(missing, f"({logits.shape[1]}, D) class text features of the logits' classes", None)
        if text_features.shape[0] != logits.shape[1]:
            expected = f"{logits.shape[1]} rows (one per column of logits)"
            raise fail("text_features", expected, text_features.shape[0])
        device = logits.device
        factors = self.class_factors(text_features.to(device), zeroshot_text_features.to(device))
        row_factor = factors[logits.argmax(dim=1)] / self.temperature
        return (logits.to(_f64) * row_factor[:, None]).to(torch.promote_types(logits.dtype, torch.float32))

    def _state_keys(self) -> tuple[str, ...]:
        return ("base_text_features", "base_zeroshot_text_features", "log_temperature")

    def _state(self) -> dict[str, torch.Tensor]:
        return {
            "base_text_features": self.base_text_features,
            "base_zeroshot_text_features": self.base_zeroshot_text_features,
            "log_temperature": torch.tensor(math.log(self.temperature), dtype=_f64),
        }

    def _load(self, state: Mapping[str, torch.Tensor]) -> None:
        c = self.num_classes
        tuned = _features("state['base_text_features']", torch.as_tensor(state["base_text_features"]), c)
        zeroshot = _features(
            "state['base_zeroshot_text_features']", torch.as_tensor(state["base_zeroshot_text_features"]), c
        )
        self.base_text_features, self.base_zeroshot_text_features = tuned, zeroshot
        self.temperature = math.exp(float(state["log_temperature"]))

    def __repr__(self) -> str:
        return (
            f"DistanceAwareCalibrator(k={self.k}, base_distance={self.base_distance}, "
            f"base_temperature={self.base_temperature})"
        )
