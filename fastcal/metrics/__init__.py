"""Calibration metrics: functional core, streaming meter, reliability diagrams; selective risk (AURC,
AUGRC, the risk-coverage curve and plot) and proximity-informed calibration (PIECE).

``probs`` are (N, C) probabilities (softmax your logits first) and ``labels`` (N,) integers in [0, C).
See ``fastcal.metrics.functional`` for the definitions and references.
"""

from fastcal.metrics.functional import (
    REPORT_KEYS,
    SUMMARY_KEYS,
    ReliabilityBins,
    accuracy,
    ace,
    base_new_means,
    bootstrap_interval,
    bootstrap_report,
    brier_score,
    calibration_error,
    calibration_report,
    calibration_summary,
    ece,
    harmonic_mean,
    mce,
    negative_log_likelihood,
    reliability_bins,
    smooth_ece,
)
from fastcal.metrics.meter import CalibrationMeter
from fastcal.metrics.plots import reliability_diagram, risk_coverage_plot
from fastcal.metrics.proximity import knn_proximity, piece
from fastcal.metrics.selective import RiskCoverageCurve, augrc, aurc, risk_coverage_curve

__all__ = [
    "REPORT_KEYS",
    "SUMMARY_KEYS",
    "CalibrationMeter",
    "ReliabilityBins",
    "RiskCoverageCurve",
    "accuracy",
    "ace",
    "augrc",
    "aurc",
    "base_new_means",
    "bootstrap_interval",
    "bootstrap_report",
    "brier_score",
    "calibration_error",
    "calibration_report",
    "calibration_summary",
    "ece",
    "harmonic_mean",
    "knn_proximity",
    "mce",
    "negative_log_likelihood",
    "piece",
    "reliability_bins",
    "reliability_diagram",
    "risk_coverage_curve",
    "risk_coverage_plot",
    "smooth_ece",
]
