"""What every post-hoc calibrator shares: the input checks, the label-set rule, the state format.

A calibrator is fitted on a calibration set's ``logits`` (N, C) and ``labels`` (N,) and then maps
logits to calibrated logits: ``calibrator(logits)`` returns logits whose softmax is the calibrated
distribution (the log of the calibrated probabilities for histogram binning and isotonic regression; a
class they give probability 0 gets log of float64's smallest normal number, about -708, so the logits
stay finite and its softmax probability is below 1e-307), ``calibrator.transform(logits)`` that
softmax.
``state_dict()`` is a dict of tensors and numbers and ``load_state_dict(state)`` restores it into a
calibrator made with the same constructor arguments.

Label sets. Temperature scaling and DAC have no parameter tied to a class index (one temperature; a
factor computed from each class's text features), so they can be fitted on one set of classes and
applied to another (base -> new; the ICML 2024 study of CLIP calibration fits TS on other labels).
Vector and matrix scaling, histogram binning and isotonic regression have one parameter (or one map)
per class index: they apply only to the classes they were fitted on, and applying them to logits with
another number of classes, or to another list of class names when both are known, is an error that
names the calibrators that do transfer (``TRANSFERABLE``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch

from fastcal._checks import check_labels, check_tensor, fail

# Registry names of the calibrators that may be applied to classes they were not fitted on.
TRANSFERABLE = ("ts", "dac")


def looks_like_probabilities(logits: torch.Tensor) -> bool:
    """True when every entry is in [0, 1] and every row sums to 1 within 1e-3."""
    lo, hi = (float(v) for v in torch.aminmax(logits))
    if lo < 0.0 or hi > 1.0:
        return False
    return float((logits.sum(dim=1, dtype=torch.float64) - 1.0).abs().max()) <= 1e-3


def check_logits(logits: Any, *, assume_logits: bool = False, name: str = "logits") -> torch.Tensor:
    """A finite (N, C) floating tensor with C >= 2 that is not a matrix of probabilities (unless
    ``assume_logits``: calibrators map logits, and softmax rows passed by mistake would be calibrated
    silently wrong)."""
    check_tensor(name, logits, ndim=2, floating=True)
    if logits.shape[1] < 2:
        raise fail(name, "at least 2 classes (columns)", f"shape {tuple(logits.shape)}")
    if not assume_logits and looks_like_probabilities(logits):
        raise fail(
            name,
            "logits (calibrators map logits, not probabilities; pass the logits or log-probabilities, "
            "or assume_logits=True if these really are logits)",
            "rows that are probabilities (entries in [0, 1] summing to 1)",
        )
    return logits


def check_fit_inputs(
    logits: Any, labels: Any, *, assume_logits: bool = False, min_samples: int = 2
) -> tuple[torch.Tensor, torch.Tensor]:
    """``check_logits`` plus labels in [0, C), one per row, and at least ``min_samples`` rows (a
    calibration map fitted on one sample is that sample, not a calibration)."""
    check_logits(logits, assume_logits=assume_logits)
    check_labels("labels", labels, logits.shape[0], logits.shape[1])
    if logits.shape[0] < min_samples:
        raise fail("logits", f"at least {min_samples} calibration samples (rows)", logits.shape[0])
    return logits, labels.to(logits.device).long()


def _check_classnames(classnames: Sequence[str] | None, num_classes: int) -> list[str] | None:
    if classnames is None:
        return None
    names = [str(c) for c in classnames]
    if len(names) != num_classes:
        raise fail("classnames", f"{num_classes} names (one per column)", len(names))
    return names


class Calibrator:
    """Base class (module docstring). Subclasses set ``name`` (their registry name),
    ``transfers_classes`` and implement ``_fit`` and ``_apply``; ``uses_text_features`` marks those that
    read the classes' text features (DAC)."""

    name: ClassVar[str] = ""
    transfers_classes: ClassVar[bool] = False
    uses_text_features: ClassVar[bool] = False

    def __init__(self) -> None:
        self.num_classes: int | None = None
        self.classnames: list[str] | None = None

    @property
    def fitted(self) -> bool:
        return self.num_classes is not None

    def fit(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        *,
        classnames: Sequence[str] | None = None,
        assume_logits: bool = False,
        **context: Any,
    ) -> Calibrator:
        """Fit on calibration ``logits`` (N, C) and ``labels`` (N,); ``classnames`` (C,) are remembered
        for the label-set rule. Returns this calibrator."""
        logits, labels = check_fit_inputs(logits, labels, assume_logits=assume_logits)
        classnames = _check_classnames(classnames, logits.shape[1])
        self._fit(logits, labels, **context)
        self.num_classes, self.classnames = logits.shape[1], classnames
        return self

    def __call__(
        self, logits: torch.Tensor, *, classnames: Sequence[str] | None = None, **context: Any
    ) -> torch.Tensor:
        """Calibrated logits for ``logits`` (N, C) (module docstring); same dtype and device."""
        if not self.fitted:
            raise fail(type(self).__name__, "a fitted calibrator (call fit first)", "an unfitted one")
        check_tensor("logits", logits, ndim=2, floating=True)
        classnames = _check_classnames(classnames, logits.shape[1])
        if not self.transfers_classes:
            self._check_same_classes(logits.shape[1], classnames)
        return self._apply(logits, **context)

    def transform(self, logits: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Calibrated probabilities: the softmax of ``self(logits)``."""
        return torch.softmax(self(logits, **kwargs), dim=1)

    def _check_same_classes(self, num_classes: int, classnames: list[str] | None) -> None:
        rule = (
            f"{self.name} is bound to the classes it was fitted on; calibrators that transfer to "
            f"other classes: {', '.join(TRANSFERABLE)}"
        )
        if num_classes != self.num_classes:
            raise fail("logits", f"{self.num_classes} classes ({rule})", f"{num_classes} classes")
        if classnames is not None and self.classnames is not None and classnames != self.classnames:
            pairs = enumerate(zip(classnames, self.classnames, strict=True))
            differ = next(i for i, (a, b) in pairs if a != b)
            raise fail(
                "classnames",
                f"the fitted classes ({rule})",
                f"{classnames[differ]!r} where the fit had {self.classnames[differ]!r} (column {differ})",
            )

    # --- state --------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The fitted parameters (tensors on the CPU) and the class set, for ``load_state_dict``."""
        if not self.fitted:
            raise fail(type(self).__name__, "a fitted calibrator (call fit first)", "an unfitted one")
        state = {key: value.detach().cpu().clone() for key, value in self._state().items()}
        state["num_classes"] = self.num_classes
        if self.classnames is not None:
            state["classnames"] = list(self.classnames)
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""
        if not isinstance(state, Mapping) or "num_classes" not in state:
            raise fail("state", f"a {type(self).__name__} state_dict", type(state).__name__)
        expected = set(self._state_keys()) | {"num_classes", "classnames"}
        unknown = sorted(set(state) - expected)
        missing = sorted(set(self._state_keys()) - set(state))
        if unknown or missing:
            raise fail("state", f"the keys {sorted(expected)}", f"missing {missing}, unexpected {unknown}")
        self.num_classes = int(state["num_classes"])
        self.classnames = _check_classnames(state.get("classnames"), self.num_classes)
        self._load({key: state[key] for key in self._state_keys()})

    # --- what subclasses provide --------------------------------------------------------------------
    def _fit(self, logits: torch.Tensor, labels: torch.Tensor, **context: Any) -> None:
        raise NotImplementedError

    def _apply(self, logits: torch.Tensor, **context: Any) -> torch.Tensor:
        raise NotImplementedError

    def _state_keys(self) -> tuple[str, ...]:
        raise NotImplementedError

    def _state(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _load(self, state: Mapping[str, torch.Tensor]) -> None:
        raise NotImplementedError


def log_of_renormalized(scores: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """log(scores / row sum) for (N, C) non-negative per-class calibrated scores, a 0 floored at the
    dtype's smallest normal number; a row whose scores are all 0 (no class map gave it any mass) keeps
    the ``fallback`` log-probabilities instead of dividing by zero."""
    total = scores.sum(dim=1, keepdim=True)
    empty = total == 0
    normalized = scores / torch.where(empty, torch.ones_like(total), total)
    return torch.where(empty, fallback, normalized.clamp(min=torch.finfo(normalized.dtype).tiny).log())
