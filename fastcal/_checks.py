"""Argument validation shared by every public entry point.

Every check raises ``ValueError`` (``TypeError`` for a wrong type) whose message names the argument,
what was expected and what was received, in the form ``"<name>: expected <what>, got <value>"``.
Checks that read tensor values (finiteness, label range) synchronize with the device; call them at the
entry point only, never inside a hot loop.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch


def fail(name: str, expected: str, received: Any) -> ValueError:
    """The error every check raises: ``"<name>: expected <expected>, got <received>"``."""
    return ValueError(f"{name}: expected {expected}, got {received}")


def _describe(x: torch.Tensor) -> str:
    return f"tensor of shape {tuple(x.shape)} and dtype {x.dtype}"


def _all_finite(x: torch.Tensor) -> bool:
    """No entry of the floating tensor ``x`` is NaN or infinite. A NaN or an infinity makes the sum
    non-finite, so a finite sum decides in one reduction without a temporary of x's size; a non-finite
    sum (which an overflow of finite entries also gives) is checked entry by entry."""
    if bool(torch.isfinite(x.sum())):
        return True
    return bool(torch.isfinite(x).all())


def check_tensor(
    name: str,
    x: Any,
    *,
    ndim: int | tuple[int, ...] | None = None,
    floating: bool | None = None,
    integer: bool | None = None,
    nonempty: bool = True,
    finite: bool = True,
) -> torch.Tensor:
    """Check that ``x`` is a tensor of the given rank and kind, non-empty and finite; return it."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else ndim
        if x.ndim not in allowed:
            want = " or ".join(f"{d}-D" for d in allowed)
            raise fail(name, f"a {want} tensor", _describe(x))
    if floating and not x.is_floating_point():
        raise fail(name, "a floating-point tensor", _describe(x))
    if integer and (x.is_floating_point() or x.is_complex() or x.dtype == torch.bool):
        raise fail(name, "an integer tensor", _describe(x))
    if nonempty and x.numel() == 0:
        raise fail(name, "a non-empty tensor", _describe(x))
    if finite and x.is_floating_point() and x.numel() and not _all_finite(x):
        n_bad = int((~torch.isfinite(x)).sum())
        raise fail(name, "finite values (no NaN or inf)", f"{n_bad} non-finite entries")
    return x


def check_labels(name: str, labels: Any, n_rows: int, n_classes: int) -> torch.Tensor:
    """Check a 1-D integer label tensor of length ``n_rows`` with values in ``[0, n_classes)``."""
    check_tensor(name, labels, ndim=1, integer=True)
    if labels.shape[0] != n_rows:
        raise fail(name, f"{n_rows} labels (one per row)", f"{labels.shape[0]}")
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= n_classes:
        raise fail(name, f"labels in [0, {n_classes})", f"values in [{lo}, {hi}]")
    return labels


def check_same_size(name: str, size: int, other_name: str, other_size: int, dim: str) -> None:
    """Check that two arguments agree on a dimension (``dim`` names it in the message)."""
    if size != other_size:
        raise fail(name, f"{dim} {other_size} to match {other_name}", f"{dim} {size}")


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    """Check that ``value`` is one of ``choices``; return it."""
    choices = tuple(choices)
    if value not in choices:
        raise fail(name, "one of " + ", ".join(repr(c) for c in choices), repr(value))
    return value


def check_int(name: str, value: Any, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """Check an integer (bool refused) within ``[minimum, maximum]``; return it."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__} {value!r}")
    if minimum is not None and value < minimum:
        raise fail(name, f"an integer >= {minimum}", value)
    if maximum is not None and value > maximum:
        raise fail(name, f"an integer <= {maximum}", value)
    return value


def check_number(
    name: str,
    value: Any,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    strict_minimum: bool = False,
) -> float:
    """Check a finite real number within the bounds; return it as float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__} {value!r}")
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise fail(name, "a finite number", value)
    if minimum is not None:
        if strict_minimum and value <= minimum:
            raise fail(name, f"a number > {minimum}", value)
        if not strict_minimum and value < minimum:
            raise fail(name, f"a number >= {minimum}", value)
    if maximum is not None and value > maximum:
        raise fail(name, f"a number <= {maximum}", value)
    return value


def check_device(name: str, value: Any) -> torch.device:
    """``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` of a GPU this machine has,
    as a ``torch.device``."""
    text = str(value)
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise fail(name, "auto, cpu, cuda or cuda:N", repr(value))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise fail(name, "cpu or auto (CUDA is not available on this machine)", repr(value))
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise fail(name, f"a GPU index below {torch.cuda.device_count()}", repr(value))
    return device
