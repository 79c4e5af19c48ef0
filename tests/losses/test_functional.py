"""fastcal.losses.functional: validation, parts, and the torch-only losses against their formulas."""

import math

import pytest
import torch
import torch.nn.functional as F

from fastcal.losses import functional as LF


def problem(b=9, c=13, d=8, *, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(b, d, generator=g, dtype=torch.float64),
        torch.randn(c, d, generator=g, dtype=torch.float64),
        torch.randint(0, c, (b,), generator=g),
        torch.randn(c, d, generator=g, dtype=torch.float64),
    )


def with_entry(x, index, value):
    x = x.clone()
    x[index] = value
    return x


IMAGE, TEXT, LABELS, FROZEN = problem()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"image_features": with_entry(IMAGE, (2, 3), float("nan"))},
            "image_features: expected finite values",
        ),
        ({"text_features": with_entry(TEXT, (0, 0), float("inf"))}, "text_features: expected finite values"),
        (
            {"frozen_text_features": with_entry(FROZEN, (4, 1), -float("inf"))},
            "frozen_text_features: expected finite",
        ),
        ({"labels": with_entry(LABELS, 0, 13)}, r"labels: expected labels in \[0, 13\), got values in"),
        ({"labels": with_entry(LABELS, 1, -1)}, r"labels: expected labels in \[0, 13\)"),
        ({"labels": LABELS[:5]}, "labels: expected 9 labels"),
        ({"labels": LABELS.float()}, "labels: expected an integer tensor"),
        (
            {"text_features": TEXT[:1], "frozen_text_features": FROZEN[:1]},
            "text_features: expected at least 2 rows",
        ),
        ({"text_features": TEXT[:, :5]}, "text_features: expected dim 8 to match image_features"),
        ({"frozen_text_features": FROZEN[:4]}, r"frozen_text_features: expected shape \(13, 8\)"),
        ({"image_features": IMAGE[0]}, "image_features: expected a 2-D tensor"),
        ({"image_features": IMAGE.long()}, "image_features: expected a floating-point tensor"),
        ({"image_features": IMAGE[:0]}, "image_features: expected a non-empty tensor"),
        ({"image_features": with_entry(IMAGE, 4, 0.0)}, "image_features: expected rows with a nonzero norm"),
        ({"logit_scale": 0.0}, r"logit_scale: expected an exponentiated scale in \(0, 10000\]"),
        (
            {"logit_scale": torch.tensor(-3.0)},
            r"logit_scale: expected an exponentiated scale in \(0, 10000\]",
        ),
        ({"logit_scale": torch.tensor([1.0, 2.0])}, "logit_scale: expected a float or a 0-dim tensor"),
        ({"logit_scale": torch.tensor(float("nan"))}, "logit_scale: expected finite values"),
    ],
)
def test_calibrated_loss_rejects_bad_inputs(overrides, message):
    args = {
        "image_features": IMAGE,
        "text_features": TEXT,
        "labels": LABELS,
        "logit_scale": 10.0,
        "frozen_text_features": FROZEN,
    }
    args.update(overrides)
    with pytest.raises(ValueError, match=message):
        LF.calibrated_prompt_loss(**args, backend="torch")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"reduction": "avg"}, "reduction: expected one of 'mean', 'sum', 'none'"),
        ({"backend": "cuda"}, "backend: expected one of 'auto', 'torch', 'triton', 'native'"),
        ({"label_smoothing": 1.5}, "label_smoothing: expected a number <= 1.0"),
        ({"margin_beta": -0.1}, "margin_beta: expected a number >= 0.0"),
        ({"moment_weight": float("inf")}, "moment_weight: expected a finite number"),
    ],
)
def test_calibrated_loss_rejects_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        LF.calibrated_prompt_loss(IMAGE, TEXT, LABELS, 10.0, FROZEN, **options)


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_calibrated_loss_parts_and_defaults(backend):
    text = TEXT.clone().requires_grad_()
    scale = torch.tensor(12.0, dtype=torch.float64, requires_grad=True)
    loss, parts = LF.calibrated_prompt_loss(
        IMAGE, text, LABELS, scale, FROZEN, backend=backend, return_parts=True
    )
    assert set(parts) == {"ce", "margin", "moment"}
    assert all(p.ndim == 0 and not p.requires_grad for p in parts.values())
    # TCPT's code weights: alpha 0.1, beta 0.01, moment 5.0.
    torch.testing.assert_close(loss.detach(), parts["ce"] + parts["margin"] + 5.0 * parts["moment"])
    loss.backward()
    assert text.grad is not None and scale.grad is not None and scale.grad.shape == ()
    without = LF.calibrated_prompt_loss(IMAGE, TEXT, LABELS, 12.0, None, backend=backend)
    torch.testing.assert_close(without, parts["ce"] + parts["margin"])


def test_calibrated_loss_single_row_is_finite():
    loss = LF.calibrated_prompt_loss(IMAGE[:1], TEXT, LABELS[:1], 10.0, FROZEN, backend="torch")
    assert torch.isfinite(loss)


def test_kgcoop_loss_is_twice_one_minus_cosine():
    t = TEXT.clone().requires_grad_()
    cos = F.cosine_similarity(TEXT, FROZEN, dim=-1)
    torch.testing.assert_close(LF.kgcoop_loss(TEXT, FROZEN), 2 * (1 - cos).mean())
    torch.testing.assert_close(LF.kgcoop_loss(TEXT, FROZEN, reduction="none"), 2 * (1 - cos))
    torch.testing.assert_close(LF.kgcoop_loss(TEXT, FROZEN, reduction="sum"), 2 * (1 - cos).sum())
    assert torch.autograd.gradcheck(lambda t: LF.kgcoop_loss(t, FROZEN), (t,))
    assert float(LF.kgcoop_loss(TEXT, 3.0 * TEXT)) == pytest.approx(0.0, abs=1e-14)
    with pytest.raises(ValueError, match=r"frozen_text_features: expected shape \(13, 8\)"):
        LF.kgcoop_loss(TEXT, FROZEN[:3])


def test_text_dispersion_and_dispersion_loss():
    t = F.normalize(TEXT, dim=-1)
    centroid = sum(t[c] for c in range(t.shape[0])) / t.shape[0]
    want = sum(math.sqrt(float(((t[c] - centroid) ** 2).sum())) for c in range(t.shape[0])) / t.shape[0]
    assert float(LF.text_dispersion(TEXT)) == pytest.approx(want, rel=1e-12)
    torch.testing.assert_close(LF.dispersion_loss(TEXT), -LF.text_dispersion(TEXT))
    assert float(LF.text_dispersion(TEXT[:1])) == 0.0
    assert torch.autograd.gradcheck(LF.dispersion_loss, (TEXT.clone().requires_grad_(),))
    with pytest.raises(ValueError, match="text_features: expected finite values"):
        LF.text_dispersion(with_entry(TEXT, (1, 1), float("nan")))


def atfd_by_hand(text):
    """Float64 loops: mean_c ||t_c - centroid|| over normalized rows."""
    rows = [[float(v) for v in row] for row in text]
    rows = [[v / math.sqrt(sum(u * u for u in row)) for v in row] for row in rows]
    centroid = [sum(column) / len(rows) for column in zip(*rows, strict=True)]
    return sum(math.dist(row, centroid) for row in rows) / len(rows)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_text_dispersion_per_sample_class_sets(reduction):
    texts = torch.randn(3, 7, 5, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    per_sample = torch.tensor([atfd_by_hand(t) for t in texts], dtype=torch.float64)
    want = {"mean": per_sample.mean(), "sum": per_sample.sum(), "none": per_sample}[reduction]
    torch.testing.assert_close(LF.text_dispersion(texts, reduction=reduction), want, rtol=1e-12, atol=0)
    torch.testing.assert_close(LF.dispersion_loss(texts, reduction=reduction), -want, rtol=1e-12, atol=0)
    assert torch.autograd.gradcheck(
        lambda t: LF.text_dispersion(t, reduction=reduction), (texts.clone().requires_grad_(),)
    )
    with pytest.raises(ValueError, match="text_features: expected rows with a nonzero norm"):
        LF.text_dispersion(with_entry(texts, (2, 4), 0.0))
    with pytest.raises(ValueError, match="text_features: expected a 2-D or 3-D tensor"):
        LF.text_dispersion(texts[None])


def test_outlier_drift_loss():
    tuned, frozen = IMAGE, IMAGE + 0.3 * torch.randn_like(IMAGE)
    cos = (tuned * frozen).sum(-1) / (tuned.norm(dim=-1) * frozen.norm(dim=-1))
    torch.testing.assert_close(LF.outlier_drift_loss(tuned, frozen), 1 - cos.mean())
    torch.testing.assert_close(LF.outlier_drift_loss(tuned, frozen, reduction="none"), 1 - cos)
    torch.testing.assert_close(LF.outlier_drift_loss(tuned, frozen, reduction="sum"), (1 - cos).sum())
    assert torch.autograd.gradcheck(
        lambda x: LF.outlier_drift_loss(x, frozen), (tuned.clone().requires_grad_(),)
    )
    with pytest.raises(ValueError, match="frozen_outlier_features: expected shape"):
        LF.outlier_drift_loss(tuned, frozen[:, :3])


@pytest.mark.parametrize("eps", [0.0, 0.1, 1.0])
def test_label_smoothed_cross_entropy(eps):
    logits = torch.randn(9, 13, dtype=torch.float64)
    log_p = logits.log_softmax(-1)
    want = -((1 - eps) * log_p.gather(1, LABELS[:, None]).squeeze(1) + eps * log_p.mean(-1))
    torch.testing.assert_close(LF.label_smoothed_cross_entropy(logits, LABELS, smoothing=eps), want.mean())
    got_rows = LF.label_smoothed_cross_entropy(logits, LABELS, smoothing=eps, reduction="none")
    torch.testing.assert_close(got_rows, want)
    leaf = logits.clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda z: LF.label_smoothed_cross_entropy(z, LABELS, smoothing=eps), (leaf,)
    )
    with pytest.raises(ValueError, match=r"labels: expected labels in \[0, 13\)"):
        LF.label_smoothed_cross_entropy(logits, with_entry(LABELS, 3, 20))


def test_marginal_entropy():
    logits = torch.randn(6, 10, dtype=torch.float64) * 3
    p_bar = logits.softmax(-1).mean(0)
    torch.testing.assert_close(LF.marginal_entropy(logits), -(p_bar * p_bar.log()).sum())
    # Golden values: uniform views give log C; identical one-hot-like views give ~0.
    assert float(LF.marginal_entropy(torch.zeros(4, 10))) == pytest.approx(math.log(10), rel=1e-6)
    assert float(LF.marginal_entropy(torch.tensor([[1000.0, 0.0, 0.0]] * 3))) == pytest.approx(0.0, abs=1e-6)
    batch = torch.randn(5, 6, 10, dtype=torch.float64)
    per_sample = LF.marginal_entropy(batch, reduction="none")
    assert per_sample.shape == (5,)
    torch.testing.assert_close(per_sample[2], LF.marginal_entropy(batch[2]))
    torch.testing.assert_close(LF.marginal_entropy(batch), per_sample.mean())
    assert torch.autograd.gradcheck(LF.marginal_entropy, (logits.clone().requires_grad_(),))
    with pytest.raises(ValueError, match="logits: expected a 2-D or 3-D tensor"):
        LF.marginal_entropy(torch.randn(10))
    with pytest.raises(ValueError, match="logits: expected finite values"):
        LF.marginal_entropy(with_entry(logits, (0, 0), float("inf")))


def test_value_checks_off_reads_no_values_but_keeps_shape_checks():
    nan_image = with_entry(IMAGE, (2, 3), float("nan"))
    with LF.value_checks(False):
        loss = LF.calibrated_prompt_loss(nan_image, TEXT, LABELS, 10.0, FROZEN, backend="torch")
        assert torch.isnan(loss)  # not validated: the NaN reaches the result
        assert torch.isnan(LF.kgcoop_loss(with_entry(TEXT, (0, 0), float("nan")), FROZEN))
        with pytest.raises(ValueError, match="labels: expected length 9 to match image_features"):
            LF.calibrated_prompt_loss(IMAGE, TEXT, LABELS[:5], 10.0, FROZEN)
        with LF.value_checks(True), pytest.raises(ValueError, match="image_features: expected finite values"):
            LF.calibrated_prompt_loss(nan_image, TEXT, LABELS, 10.0, FROZEN)  # nested: on again
        assert torch.isnan(LF.calibrated_prompt_loss(nan_image, TEXT, LABELS, 10.0, FROZEN, backend="torch"))
    with pytest.raises(ValueError, match="image_features: expected finite values"):
        LF.calibrated_prompt_loss(nan_image, TEXT, LABELS, 10.0, FROZEN)
    # the values a check-free call computes are the checked call's
    with LF.value_checks(False):
        unchecked = LF.calibrated_prompt_loss(IMAGE, TEXT, LABELS, 10.0, FROZEN, backend="torch")
    checked = LF.calibrated_prompt_loss(IMAGE, TEXT, LABELS, 10.0, FROZEN, backend="torch")
    assert torch.equal(unchecked, checked)


def test_value_checks_are_per_thread():
    import threading

    seen = []
    with LF.value_checks(False):
        worker = threading.Thread(target=lambda: seen.append(LF._values_readable(IMAGE)))
        worker.start()
        worker.join()
        assert not LF._values_readable(IMAGE)
    assert seen == [True]


@pytest.mark.parametrize("backend", ["torch", "native", "auto"])
@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8])
def test_narrow_integer_labels_give_the_int64_result(backend, dtype):
    image, text, labels, frozen = problem(b=11, c=7, seed=3)
    want = LF.calibrated_prompt_loss(image, text, labels, 25.0, frozen, backend="torch")
    got = LF.calibrated_prompt_loss(image, text, labels.to(dtype), 25.0, frozen, backend=backend)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=0)


@pytest.mark.parametrize("backend", ["torch", "native", "triton"])
@pytest.mark.parametrize("scale", [1e30, 0.0, -3.0, torch.tensor(1e30, dtype=torch.float64)])
def test_the_logit_scale_range_is_checked_alike_on_every_backend(backend, scale):
    image, text, labels, frozen = problem()
    with pytest.raises(ValueError, match=r"logit_scale: expected an exponentiated scale in \(0, 10000\]"):
        LF.calibrated_prompt_loss(image, text, labels, scale, frozen, backend=backend)
