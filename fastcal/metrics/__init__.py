"""Calibration metrics: functional core, streaming meter, reliability diagrams.

``probs`` are (N, C) probabilities (softmax your logits first) and ``labels`` (N,) integers in [0, C).
See ``fastcal.metrics.functional`` for the definitions and references.
"""

from fastcal.metrics.functional import (
    REPORT_KEYS,
    SUMMARY_KEYS,
    ReliabilityBins,
    accuracy,
    ace,
    bootstrap_interval,
    bootstrap_report,
    brier_score,
    calibration_error,
    calibration_report,
    calibration_summary,
    ece,
    mce,
    negative_log_likelihood,
    reliability_bins,
    smooth_ece,
)
from fastcal.metrics.meter import CalibrationMeter
from fastcal.metrics.plots import reliability_diagram

__all__ = [
    "REPORT_KEYS",
    "SUMMARY_KEYS",
    "CalibrationMeter",
    "ReliabilityBins",
    "accuracy",
    "ace",
    "bootstrap_interval",
    "bootstrap_report",
    "brier_score",
    "calibration_error",
    "calibration_report",
    "calibration_summary",
    "ece",
    "mce",
    "negative_log_likelihood",
    "reliability_bins",
    "reliability_diagram",
    "smooth_ece",
]
