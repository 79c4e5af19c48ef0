"""Every registered calibrator: it lowers the ECE of held-out miscalibrated data, survives a state_dict
round trip, follows the label-set rule and refuses bad input with one clear error."""

import pytest
import torch
import torch.nn.functional as F

from fastcal import registry
from fastcal.calibrate import TRANSFERABLE, Calibrator, DistanceAwareCalibrator
from fastcal.metrics import ece

NAMES = registry.names("calibrator")


def text_context(c, seed=5, dim=16):
    g = torch.Generator().manual_seed(seed)
    tuned = F.normalize(torch.randn(c, dim, generator=g, dtype=torch.float64), dim=1)
    zeroshot = F.normalize(tuned + 0.3 * torch.randn(c, dim, generator=g, dtype=torch.float64), dim=1)
    return {"text_features": tuned, "zeroshot_text_features": zeroshot}


def context_for(calibrator, c):
    return text_context(c) if calibrator.uses_text_features else {}


def fitted(name, logits, labels):
    calibrator = registry.get("calibrator", name)()
    return calibrator.fit(logits, labels, **context_for(calibrator, logits.shape[1]))


def test_every_calibrator_is_registered():
    assert set(NAMES) == {"ts", "vector", "matrix", "histogram", "isotonic", "dac"}
    assert {n for n in NAMES if registry.get("calibrator", n).transfers_classes} == set(TRANSFERABLE)


@pytest.mark.parametrize("name", NAMES)
def test_lowers_held_out_ece_and_round_trips_its_state(name, fit_and_test):
    fit_logits, fit_labels, logits, labels = fit_and_test
    calibrator = fitted(name, fit_logits, fit_labels)
    context = context_for(calibrator, logits.shape[1])
    before = float(ece(logits.softmax(1), labels))
    probs = calibrator.transform(logits, **context)
    after = float(ece(probs, labels))
    assert before > 0.15 and after < before / 3, (name, before, after)
    torch.testing.assert_close(probs.sum(1), torch.ones(len(labels), dtype=probs.dtype))
    assert torch.isfinite(calibrator(logits, **context)).all()

    state = calibrator.state_dict()
    restored = type(calibrator)()
    restored.load_state_dict(state)
    torch.testing.assert_close(restored(logits, **context), calibrator(logits, **context), rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_bad_inputs_give_one_clear_error(name, fit_and_test):
    fit_logits, fit_labels, logits, _ = fit_and_test
    calibrator = registry.get("calibrator", name)()
    context = context_for(calibrator, 7)
    with pytest.raises(ValueError, match=r"logits: expected logits .*, got rows that are probabilities"):
        calibrator.fit(fit_logits.softmax(1), fit_labels, **context)
    nan = fit_logits.clone()
    nan[3, 2] = float("nan")
    with pytest.raises(
        ValueError, match=r"logits: expected finite values \(no NaN or inf\), got 1 non-finite"
    ):
        calibrator.fit(nan, fit_labels, **context)
    with pytest.raises(ValueError, match=r"labels: expected labels in \[0, 7\), got values in \[1, 7\]"):
        calibrator.fit(fit_logits, torch.where(fit_labels == 0, 7, fit_labels), **context)
    with pytest.raises(ValueError, match="logits: expected at least 2 calibration samples"):
        calibrator.fit(fit_logits[:1], fit_labels[:1], **context)
    if isinstance(calibrator, Calibrator):  # TemperatureScaler starts as T = 1, a valid identity
        with pytest.raises(ValueError, match=r"expected a fitted calibrator \(call fit first\)"):
            calibrator(logits, **context)


@pytest.mark.parametrize("name", [n for n in NAMES if n not in TRANSFERABLE])
def test_class_bound_calibrators_refuse_another_class_set(name, fit_and_test):
    fit_logits, fit_labels, logits, _ = fit_and_test
    classnames = [f"class {i}" for i in range(7)]
    calibrator = registry.get("calibrator", name)().fit(fit_logits, fit_labels, classnames=classnames)
    transferable = "calibrators that transfer to other classes: ts, dac"
    with pytest.raises(ValueError, match=f"logits: expected 7 classes .*{transferable}.*got 5 classes"):
        calibrator(logits[:, :5])
    renamed = [*classnames[:6], "another"]
    with pytest.raises(ValueError, match=f"classnames: expected the fitted classes .*{transferable}"):
        calibrator(logits, classnames=renamed)
    calibrator(logits, classnames=classnames)  # the fitted classes are fine


def test_transferable_calibrators_apply_to_other_classes(fit_and_test):
    fit_logits, fit_labels, logits, labels = fit_and_test
    base, new = slice(0, 4), slice(4, 7)
    keep = labels >= 4
    for name in TRANSFERABLE:
        calibrator = registry.get("calibrator", name)()
        context = context_for(calibrator, 7)
        fit_rows = fit_labels < 4
        fit_context = {k: v[base] for k, v in context.items()}
        calibrator.fit(fit_logits[fit_rows][:, base], fit_labels[fit_rows], **fit_context)
        apply_context = {k: v[new] for k, v in context.items()}
        out = calibrator(logits[keep][:, new], classnames=["a", "b", "c"], **apply_context)
        assert out.shape == (int(keep.sum()), 3)


def test_dac_needs_the_text_features(fit_and_test):
    fit_logits, fit_labels, logits, _ = fit_and_test
    with pytest.raises(ValueError, match=r"text_features: expected \(7, D\) class text features"):
        DistanceAwareCalibrator().fit(fit_logits, fit_labels)
    context = text_context(7)
    calibrator = DistanceAwareCalibrator().fit(fit_logits, fit_labels, **context)
    with pytest.raises(ValueError, match="zeroshot_text_features: expected"):
        calibrator(logits, text_features=context["text_features"])
    with pytest.raises(ValueError, match="text_features: expected 7 rows"):
        calibrator(logits, **text_context(5))
