"""Post-hoc calibrators: fitted on a calibration set's logits and labels, applied to logits.

| registry name | class | what it fits | transfers to other classes |
|---|---|---|---|
| ``ts`` | ``TemperatureScaler`` | one temperature (Guo et al. 2017) | yes |
| ``vector`` | ``VectorScaler`` | a weight and a bias per class (Guo et al.; ODIR's bias penalty) | no |
| ``matrix`` | ``MatrixScaler`` | a C x C matrix and biases (Guo et al.; Kull et al. 2019's ODIR) | no |
| ``histogram`` | ``HistogramBinning`` | one-vs-rest equal-width bins, renormalized | no |
| ``isotonic`` | ``IsotonicCalibrator`` | one-vs-rest isotonic regression, renormalized | no |
| ``dac`` | ``DistanceAwareCalibrator`` | a base temperature; per-class factors from text (DAC) | yes |

Each has ``fit(logits, labels)``, ``__call__(logits)`` (calibrated logits), ``transform(logits)``
(calibrated probabilities) and ``state_dict`` / ``load_state_dict``; ``fastcal.calibrate.base`` holds
their shared checks and the label-set rule. ``fit_temperature`` is temperature scaling's fit as a
function.
"""

from fastcal.calibrate.base import TRANSFERABLE, Calibrator
from fastcal.calibrate.binning import HistogramBinning, IsotonicCalibrator
from fastcal.calibrate.dac import DistanceAwareCalibrator
from fastcal.calibrate.scaling import MatrixScaler, VectorScaler
from fastcal.calibrate.temperature import T_MAX, T_MIN, TemperatureScaler, fit_temperature

__all__ = [
    "TRANSFERABLE",
    "T_MAX",
    "T_MIN",
    "Calibrator",
    "DistanceAwareCalibrator",
    "HistogramBinning",
    "IsotonicCalibrator",
    "MatrixScaler",
    "TemperatureScaler",
    "VectorScaler",
    "fit_temperature",
]
