"""DAC against its public code restated in numpy (ml-stat-Sustech/CLIP_Calibration
``trainers/calibration/distanse_aware_calibration.py``: a loop over classes, ``np.linalg.norm`` distances,
``np.sort`` for the k nearest, exp(-sum/k) scores, the 0.05 base-class guard; ``predict`` scales each row
by its predicted class's factor), a factor worked by hand, and TS on the base classes themselves."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastcal.calibrate import DistanceAwareCalibrator, TemperatureScaler
from tests.calibrate.conftest import miscalibrated

f64 = torch.float64


def reference_factors(base_zs, cur_zs, base_ft, cur_ft, k):
    factors = []
    for i in range(cur_zs.shape[0]):
        d_zs = np.sort(np.linalg.norm(base_zs - cur_zs[i], axis=1))[:k]
        d_ft = np.sort(np.linalg.norm(base_ft - cur_ft[i], axis=1))[:k]
        zs_score, ft_score = np.exp(-np.sum(d_zs) / k), np.exp(-np.sum(d_ft) / k)
        factors.append(1.0 if d_ft[0] < 0.05 else ft_score / zs_score)
    return np.array(factors)


def features(c, seed, dim=24):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(c, dim, generator=g, dtype=f64), dim=1)


def test_factors_and_logits_equal_the_reference_code():
    base_ft, base_zs = features(9, 1), features(9, 2)
    new_ft, new_zs = features(6, 3), features(6, 4)
    new_ft[2] = base_ft[4]  # a "new" class that is a base class: the guard sets its factor to 1
    logits, labels = miscalibrated(400, 9, seed=6)
    dac = DistanceAwareCalibrator(k=3, base_temperature=False).fit(
        logits, labels, text_features=base_ft, zeroshot_text_features=base_zs
    )
    expected = reference_factors(base_zs.numpy(), new_zs.numpy(), base_ft.numpy(), new_ft.numpy(), 3)
    got = dac.class_factors(new_ft, new_zs)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)
    assert got[2] == 1.0 and (got != 1.0).sum() == 5

    new_logits = torch.randn(50, 6, generator=torch.Generator().manual_seed(9), dtype=f64) * 10
    reference = new_logits.numpy() * expected[new_logits.argmax(1).numpy()][:, None]
    out = dac(new_logits, text_features=new_ft, zeroshot_text_features=new_zs)
    np.testing.assert_allclose(out.numpy(), reference, rtol=1e-12)
    assert torch.equal(out.argmax(1), new_logits.argmax(1))


def test_a_factor_by_hand():
    """k = 2, zero-shot distances of the new class to 3 base classes [0.6, 0.7, 0.9] -> D_zs = 0.65, tuned
    [0.8, 0.9, 1.0] -> D_ft = 0.85: s = exp(0.65 - 0.85) = 0.8187 (a temperature 1.2214 times higher).
    Points on a line at those distances from the new class's feature (DAC normalizes features, so the
    distances are set in the normalized space: unit vectors at angle theta have distance 2 sin(theta/2))."""

    def unit_at(distance, axis, dim=5):
        theta = 2 * math.asin(distance / 2)
        v = torch.zeros(dim, dtype=f64)
        v[0], v[axis] = math.cos(theta), math.sin(theta)
        return v

    origin = torch.zeros(1, 5, dtype=f64)
    origin[0, 0] = 1.0
    base_zs = torch.stack([unit_at(d, axis) for d, axis in ((0.6, 1), (0.7, 2), (0.9, 3))])
    base_ft = torch.stack([unit_at(d, axis) for d, axis in ((0.8, 1), (0.9, 2), (1.0, 3))])
    dac = DistanceAwareCalibrator(k=2, base_temperature=False)
    dac.fit(
        torch.randn(4, 3, dtype=f64),
        torch.tensor([0, 1, 2, 0]),
        text_features=base_ft,
        zeroshot_text_features=base_zs,
    )
    factor = float(dac.class_factors(origin, origin))
    assert factor == pytest.approx(math.exp(0.65 - 0.85), rel=1e-12)
    assert round(factor, 4) == 0.8187 and round(1 / factor, 4) == 1.2214


def test_on_its_own_base_classes_dac_is_temperature_scaling():
    logits, labels = miscalibrated(700, 5, seed=12)
    ft, zs = features(5, 7), features(5, 8)
    dac = DistanceAwareCalibrator().fit(logits, labels, text_features=ft, zeroshot_text_features=zs)
    scaler = TemperatureScaler().fit(logits, labels)
    assert dac.temperature == scaler.temperature
    torch.testing.assert_close(dac(logits, text_features=ft, zeroshot_text_features=zs), scaler(logits))
