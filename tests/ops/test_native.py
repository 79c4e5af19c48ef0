"""The native (C++) backend against the float64 torch reference: values, every gradient, edge cases.

Tolerances: float64 runs agree with the reference to rounding (1e-10 relative: the C++ sums in another
order). float32 runs are compared with the float64 reference at 1e-4 of the largest entry: the
GEMMs and row sums add up to ~10^3 terms of relative error 6e-8 (a few 1e-6 at worst), times a
margin of 25. Half inputs are compared with the reference on the same (rounded) inputs: only the
gradients' rounding to the half type remains, 2^-11 (fp16) and 2^-8 (bf16) relative.
"""

import warnings

import pytest
import torch

from fastcal.ops import calibrated_prompt_loss, calibrated_prompt_loss_reference, native, resolve_backend

needs_native = pytest.mark.skipif(
    not native.native_available(), reason="no C++ toolchain for the native backend"
)


def problem(b, c, d, *, seed=0, dtype=torch.float64, frozen=True):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(b, d, generator=g, dtype=torch.float64).to(dtype)
    text = torch.randn(c, d, generator=g, dtype=torch.float64).to(dtype)
    labels = torch.randint(0, c, (b,), generator=g)
    frozen_text = torch.randn(c, d, generator=g, dtype=torch.float64).to(dtype) if frozen else None
    return image, text, labels, frozen_text


def run(backend, image, text, labels, scale, frozen, *, upstream_seed=1, **hyper):
    """Loss, parts and the gradients of <loss, random weights> for every input that requires grad."""
    loss, parts = calibrated_prompt_loss(image, text, labels, scale, frozen, backend=backend, **hyper)
    weights = torch.rand(
        loss.shape, generator=torch.Generator().manual_seed(upstream_seed), dtype=torch.float64
    )
    weights = weights.to(loss.dtype)
    leaves = [x for x in (image, text, frozen, scale) if isinstance(x, torch.Tensor) and x.requires_grad]
    grads = torch.autograd.grad((loss * weights).sum(), leaves) if leaves else ()
    return loss.detach(), parts, grads


def assert_scaled_close(got, want, rel):
    """max |got - want| <= rel * max |want| (compared in float64)."""
    got, want = got.double(), want.double()
    assert got.shape == want.shape
    err = (got - want).abs().max().item()
    assert err <= rel * want.abs().max().item() + 1e-300, (
        f"error {err:.3e} vs scale {want.abs().max().item():.3e}"
    )


def fresh(*tensors):
    """Leaf copies that require grad."""
    return [x.detach().clone().requires_grad_() for x in tensors]


@needs_native
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize(("b", "c", "d"), [(37, 101, 67), (37, 11, 67)])  # D x D side, Gram side
def test_native_matches_reference_float64(b, c, d, eps, reduction):
    image, text, labels, frozen = problem(b, c, d, seed=c + d)
    scale = torch.tensor(30.0, dtype=torch.float64)
    hyper = {"label_smoothing": eps, "reduction": reduction}
    want = run("torch", *fresh(image, text), labels, *fresh(scale, frozen), **hyper)
    got = run("native", *fresh(image, text), labels, *fresh(scale, frozen), **hyper)
    torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-12)
    for key in ("ce", "margin", "moment"):
        torch.testing.assert_close(got[1][key], want[1][key], rtol=1e-10, atol=1e-12)
    assert len(got[2]) == 4
    for g, w in zip(got[2], want[2], strict=True):
        assert_scaled_close(g, w, 1e-10)


@needs_native
@pytest.mark.parametrize(("reduction", "onednn"), [("mean", True), ("none", True), ("mean", False)])
def test_native_float32_against_float64_reference(reduction, onednn, monkeypatch):
    """Large float32 products run through oneDNN unless torch.backends.mkldnn is turned off (then at::mm)."""
    image, text, labels, frozen = problem(64, 1000, 512, seed=7)
    scale = torch.tensor(100.0, dtype=torch.float64)
    want = run("torch", *fresh(image, text), labels, *fresh(scale), frozen, reduction=reduction)
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", onednn)
    got = run(
        "native",
        *fresh(image.float(), text.float()),
        labels,
        *fresh(scale.float()),
        frozen.float(),
        reduction=reduction,
    )
    assert got[0].dtype == torch.float32
    assert_scaled_close(got[0], want[0], 1e-5)
    for g, w in zip(got[2], want[2], strict=True):
        assert g.dtype == torch.float32
        assert_scaled_close(g, w, 1e-4)


@needs_native
@pytest.mark.parametrize(("dtype", "rel"), [(torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_native_half_inputs(dtype, rel):
    image, text, labels, frozen = problem(19, 23, 40, seed=3, dtype=dtype)
    got = run("native", *fresh(image, text), labels, 20.0, frozen)
    want = run("torch", *fresh(image.double(), text.double()), labels, 20.0, frozen.double())
    assert got[0].dtype == torch.float32
    assert_scaled_close(got[0], want[0], 1e-5)
    for g, w in zip(got[2], want[2], strict=True):
        assert g.dtype == dtype
        assert_scaled_close(g, w, rel)


@needs_native
def test_native_without_frozen_features_with_float_scale_and_single_row():
    for b in (1, 5):
        image, text, labels, _ = problem(b, 9, 16, seed=b, frozen=False)
        want = run("torch", *fresh(image, text), labels, 12.5, None)
        got = run("native", *fresh(image, text), labels, 12.5, None)
        torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-12)
        assert float(got[1]["moment"]) == 0.0
        for g, w in zip(got[2], want[2], strict=True):
            assert_scaled_close(g, w, 1e-10)


@needs_native
def test_native_only_requested_gradients_and_no_grad_forward():
    image, text, labels, frozen = problem(8, 12, 10)
    text = text.requires_grad_()
    loss, _ = calibrated_prompt_loss(image, text, labels, 10.0, frozen, backend="native")
    loss.backward()
    want, _ = calibrated_prompt_loss_reference(image, text, labels, 10.0, frozen)
    (want_grad,) = torch.autograd.grad(want, [text])
    assert image.grad is None and frozen.grad is None
    assert_scaled_close(text.grad, want_grad, 1e-10)
    with torch.no_grad():
        loss_ng, _ = calibrated_prompt_loss(image, text, labels, 10.0, frozen, backend="native")
    torch.testing.assert_close(loss_ng, loss.detach())


@needs_native
def test_native_backward_twice_with_retained_graph():
    image, text, labels, frozen = problem(6, 9, 11)
    text = text.requires_grad_()
    loss, _ = calibrated_prompt_loss(image, text, labels, 10.0, frozen, backend="native")
    (first,) = torch.autograd.grad(loss, [text], retain_graph=True)
    (second,) = torch.autograd.grad(loss, [text])
    torch.testing.assert_close(first, second, rtol=0, atol=0)


@needs_native
def test_native_ties_send_the_margin_gradient_to_the_first_runner_up():
    # Classes 3 and 5 have the same text feature: every image ties between them.
    text = torch.tensor([[0, 1], [3, 4], [-1, 0], [2, 0], [0, -1], [2, 0]], dtype=torch.float64)
    image = torch.tensor([[5.0, 0.0], [4.0, 3.0], [1.0, 1.0]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 4])
    want = run("torch", *fresh(image, text), labels, 10.0, None)
    got = run("native", *fresh(image, text), labels, 10.0, None)
    torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-12)
    for g, w in zip(got[2], want[2], strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    text_grad = got[2][1]
    assert not torch.allclose(text_grad[3], text_grad[5])  # only class 3 gets the margin's gradient


@needs_native
@pytest.mark.parametrize("label", [0, 4])
def test_native_rows_of_nan_give_nan_without_reading_past_the_row(label):
    # fastcal.ops does not validate values (fastcal.losses does, unless value_checks(False)): a NaN row
    # has no runner-up value to find, and the search must stay inside the row.
    image, text, labels, frozen = problem(7, 5, 3, seed=4)
    image[2] = float("nan")
    labels[2] = label
    loss, _ = calibrated_prompt_loss(image, text, labels, 10.0, frozen, backend="native", reduction="none")
    want, _ = calibrated_prompt_loss(image, text, labels, 10.0, frozen, backend="torch", reduction="none")
    assert torch.isnan(want[2])  # the margin variance spreads it to every row, in both backends
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12, equal_nan=True)


@needs_native
def test_native_refuses_labels_out_of_range_itself():
    image, text, labels, frozen = problem(6, 5, 3, seed=5)
    for bad in (5, -1):
        labels[3] = bad
        with pytest.raises(RuntimeError, match=r"expected labels in \[0, 5\)"):
            calibrated_prompt_loss(image, text, labels, 10.0, frozen, backend="native")


@needs_native
def test_auto_takes_native_on_cpu_and_native_refuses_other_devices():
    assert resolve_backend("auto", torch.device("cpu")) == "native"
    with pytest.raises(ValueError, match="backend: expected CPU tensors for 'native'"):
        resolve_backend("native", torch.device("meta"))


def test_missing_compiler_falls_back_to_torch_with_one_warning(monkeypatch):
    monkeypatch.setattr(native, "_STATE", native._NativeState())
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    image, text, labels, frozen = problem(5, 7, 6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first, _ = calibrated_prompt_loss(image, text, labels, 10.0, frozen, backend="native")
        second, _ = calibrated_prompt_loss(image, text, labels, 10.0, frozen, backend="auto")
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "no C++ compiler" in messages[0] and "torch backend" in messages[0]
    want, _ = calibrated_prompt_loss_reference(image, text, labels, 10.0, frozen)
    torch.testing.assert_close(first, want, rtol=0, atol=0)
    torch.testing.assert_close(second, want, rtol=0, atol=0)
