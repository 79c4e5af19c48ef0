"""The triton backend against the float64 torch reference: values and every gradient.

On CPU the kernels run in the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1), which
computes float64 problems in float64: those agree with the reference to rounding (1e-10). float32 is
compared with the float64 reference at 1e-4 of the largest entry (sums of ~10^3 terms of relative
error 6e-8, with a margin of 25). Half inputs are compared with the reference on the same rounded
inputs: the gradients' rounding to fp16 (2^-11) and, for bf16, the interpreter's truncating conversion
(2^-7). On a GPU (tests marked gpu) float32 GEMMs may run in TF32 (10-bit mantissa, 2^-11 relative per
product), hence 2e-3 there.
"""

import pytest
import torch

from fastcal.ops import calibrated_prompt_loss, resolve_backend
from fastcal.ops.calibrated import triton_installed, triton_interpreting

pytestmark = pytest.mark.skipif(not triton_installed(), reason="triton is not installed")


def problem(b, c, d, *, seed=0, dtype=torch.float64, device="cpu", frozen=True):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(b, d, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    text = torch.randn(c, d, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    labels = torch.randint(0, c, (b,), generator=g).to(device)
    frozen_text = torch.randn(c, d, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    return image, text, labels, frozen_text if frozen else None


def fresh(*tensors):
    return [x.detach().clone().requires_grad_() for x in tensors]


def run(backend, image, text, labels, scale, frozen, **hyper):
    """Loss, parts and the gradients of <loss, random weights> for every input that requires grad."""
    loss, parts = calibrated_prompt_loss(image, text, labels, scale, frozen, backend=backend, **hyper)
    weights = torch.rand(loss.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    leaves = [x for x in (image, text, frozen, scale) if isinstance(x, torch.Tensor) and x.requires_grad]
    grads = torch.autograd.grad((loss * weights.to(loss)).sum(), leaves)
    return loss.detach(), parts, grads


def assert_scaled_close(got, want, rel):
    """max |got - want| <= rel * max |want| (compared in float64 on the CPU)."""
    got, want = got.double().cpu(), want.double().cpu()
    assert got.shape == want.shape
    err = (got - want).abs().max().item()
    assert err <= rel * want.abs().max().item() + 1e-300, (
        f"error {err:.3e} vs scale {want.abs().max().item():.3e}"
    )


def compare(got, want, rel):
    assert_scaled_close(got[0], want[0], rel)
    for key in ("ce", "margin", "moment"):
        assert_scaled_close(got[1][key], want[1][key], rel)
    assert len(got[2]) == len(want[2])
    for g, w in zip(got[2], want[2], strict=True):
        assert_scaled_close(g, w, rel)


interpreter_only = pytest.mark.skipif(not triton_interpreting(), reason="needs TRITON_INTERPRET=1")


@interpreter_only
@pytest.mark.parametrize(
    ("b", "c", "d", "reduction", "eps"),
    [
        (37, 101, 67, "mean", 0.0),
        (37, 101, 67, "sum", 0.1),
        (37, 101, 67, "none", 0.1),
        (37, 11, 67, "mean", 0.1),  # Gram side of the moment term
        (37, 11, 67, "none", 0.0),
    ],
)
def test_triton_matches_reference_float64(b, c, d, reduction, eps):
    image, text, labels, frozen = problem(b, c, d, seed=c)
    scale = torch.tensor(30.0, dtype=torch.float64)
    hyper = {"label_smoothing": eps, "reduction": reduction}
    want = run("torch", *fresh(image, text), labels, *fresh(scale, frozen), **hyper)
    got = run("triton", *fresh(image, text), labels, *fresh(scale, frozen), **hyper)
    assert len(got[2]) == 4
    compare(got, want, 1e-10)


@interpreter_only
def test_triton_clip_size_float32():
    image, text, labels, frozen = problem(32, 1000, 512, seed=11)
    scale = torch.tensor(100.0, dtype=torch.float64)
    want = run("torch", *fresh(image, text), labels, *fresh(scale), frozen, label_smoothing=0.1)
    got = run(
        "triton",
        *fresh(image.float(), text.float()),
        labels,
        *fresh(scale.float()),
        frozen.float(),
        label_smoothing=0.1,
    )
    assert got[0].dtype == torch.float32 and all(g.dtype == torch.float32 for g in got[2])
    compare(got, want, 1e-4)


@interpreter_only
@pytest.mark.parametrize(("dtype", "rel"), [(torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_triton_half_inputs(dtype, rel):
    image, text, labels, frozen = problem(19, 23, 40, seed=3, dtype=dtype)
    got = run("triton", *fresh(image, text), labels, 20.0, frozen)
    want = run("torch", *fresh(image.double(), text.double()), labels, 20.0, frozen.double())
    assert got[0].dtype == torch.float32 and all(g.dtype == dtype for g in got[2])
    assert_scaled_close(got[0], want[0], 1e-5)
    for g, w in zip(got[2], want[2], strict=True):
        assert_scaled_close(g, w, rel)


@interpreter_only
def test_triton_without_frozen_features_single_row_and_float_scale():
    for b in (1, 6):
        image, text, labels, _ = problem(b, 9, 16, seed=b, frozen=False)
        want = run("torch", *fresh(image, text), labels, 12.5, None)
        got = run("triton", *fresh(image, text), labels, 12.5, None)
        compare(got, want, 1e-10)
        assert float(got[1]["moment"]) == 0.0


@interpreter_only
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NaN arithmetic, on purpose
def test_triton_nan_rows_and_labels_out_of_range_stay_inside_the_rows():
    # fastcal.ops does not validate values (fastcal.losses does, unless value_checks(False)).
    image, text, labels, frozen = problem(7, 5, 3, seed=4)
    image[2] = float("nan")
    want = calibrated_prompt_loss(image, text, labels, 10.0, frozen, backend="torch", reduction="none")[0]
    got = calibrated_prompt_loss(image, text, labels, 10.0, frozen, backend="triton", reduction="none")[0]
    assert torch.isnan(want[2])
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, equal_nan=True)
    image, text, labels, frozen = problem(6, 5, 3, seed=5)
    labels[3] = 5
    loss = calibrated_prompt_loss(image, text, labels, 10.0, frozen, backend="triton", reduction="none")[0]
    assert torch.isnan(loss).all()  # the margin variance spreads the bad row's NaN to every row


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend: expected CUDA tensors for 'triton'"):
        resolve_backend("triton", torch.device("cpu"))


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize(("b", "c", "d"), [(37, 101, 67), (256, 1000, 512), (64, 1000, 768)])
def test_triton_cuda_float32_against_float64_reference(b, c, d):
    image, text, labels, frozen = problem(b, c, d, seed=d, device="cuda")
    scale = torch.tensor(100.0, dtype=torch.float64, device="cuda")
    want = run("torch", *fresh(image, text), labels, *fresh(scale, frozen), label_smoothing=0.1)
    got = run(
        "triton",
        *fresh(image.float(), text.float()),
        labels,
        *fresh(scale.float(), frozen.float()),
        label_smoothing=0.1,
    )
    compare(got, want, 2e-3)


@pytest.mark.gpu
@gpu
def test_triton_cuda_bfloat16_and_auto():
    image, text, labels, frozen = problem(64, 1000, 512, seed=2, device="cuda", dtype=torch.bfloat16)
    assert resolve_backend("auto", image.device) == "triton"
    got = run("auto", *fresh(image, text), labels, 50.0, frozen)
    want = run("torch", *fresh(image.double(), text.double()), labels, 50.0, frozen.double())
    for g, w in zip(got[2], want[2], strict=True):
        assert g.dtype == torch.bfloat16
        assert_scaled_close(g, w, 1e-2)


@pytest.mark.gpu
@gpu
def test_triton_step_captures_in_a_cuda_graph():
    """No host sync in forward or backward: the step replays from a CUDA graph with the eager result."""
    image, text, labels, frozen = problem(32, 100, 512, seed=5, device="cuda", dtype=torch.float32)
    text = text.requires_grad_()
    scale = torch.tensor(100.0, device="cuda")

    def step():
        text.grad = None
        loss, _ = calibrated_prompt_loss(image, text, labels, scale, frozen, backend="triton")
        loss.backward()
        return loss

    eager_loss = step().detach().clone()
    eager_grad = text.grad.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    text.grad = None
    with torch.cuda.graph(graph):
        static_loss, _ = calibrated_prompt_loss(image, text, labels, scale, frozen, backend="triton")
        static_loss.backward()
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(static_loss, eager_loss)
    torch.testing.assert_close(text.grad, eager_grad)


@interpreter_only
@pytest.mark.parametrize(
    ("b", "c", "d", "dtype", "rel"),
    [
        (37, 101, 67, torch.float64, 1e-10),
        (9, 1500, 36, torch.float64, 1e-10),
        (21, 11, 67, torch.float32, 1e-4),
    ],
    ids=["block-1024", "block-4096", "gram-float32"],
)
def test_the_gpu_tiles_compute_the_reference_in_the_interpreter(monkeypatch, b, c, d, dtype, rel):
    """The GPU's blocks and tiles (fastcal.ops.triton_launches), run on CPU tensors in the interpreter."""
    from fastcal.ops import triton_launches

    monkeypatch.setattr(triton_launches, "interpreter_tiles", lambda device: False)
    image, text, labels, frozen = problem(b, c, d, seed=c)
    scale = torch.tensor(30.0, dtype=torch.float64)
    for reduction in ("mean", "none"):
        hyper = {"label_smoothing": 0.1, "reduction": reduction}
        want = run("torch", *fresh(image, text), labels, *fresh(scale, frozen), **hyper)
        inputs = [x.to(dtype) for x in (image, text, scale, frozen)]
        got = run("triton", *fresh(*inputs[:2]), labels, *fresh(*inputs[2:]), **hyper)
        compare(got, want, rel)


@interpreter_only
@pytest.mark.parametrize(
    ("reduction", "frozen", "needs"),
    [
        (1, True, (True, True, True, True)),
        (0, True, (False, True, False, True)),
        (2, False, (True, False, False, False)),
    ],
)
def test_the_custom_ops_pass_torch_library_opcheck(reduction, frozen, needs):
    """Schema, autograd registration, the fake implementations against the real ones (shapes, dtypes,
    devices, strides) and AOT dispatch with dynamic shapes, for both ops."""
    from fastcal.ops.fused_triton import calibrated_loss_backward_op, calibrated_loss_op

    image, text, labels, frozen_text = problem(7, 5, 13, seed=reduction, frozen=frozen)
    text = text.float()  # mixed dtypes: float64 compute, a float32 gradient
    scale = torch.tensor([10.0], dtype=torch.float64)
    leaves = [
        x.requires_grad_(need) if x is not None else None
        for x, need in zip((image, text, frozen_text, scale), needs, strict=True)
    ]
    wanted = [need and x is not None for x, need in zip(leaves, needs, strict=True)]
    args = (*leaves, labels, 0.1, 0.01, 0.1, 5.0, reduction, *wanted)
    torch.library.opcheck(calibrated_loss_op, args)
    outputs = calibrated_loss_op(*args)
    grad = torch.ones_like(outputs[0])
    dtypes = (image.dtype, text.dtype, frozen_text.dtype if frozen_text is not None else text.dtype)
    backward_args = (
        grad,
        *[o.detach() for o in outputs[4:]],
        labels,
        scale.detach(),
        0.01,
        5.0,
        reduction,
        *dtypes,
        *args[-4:],
    )
    torch.library.opcheck(calibrated_loss_backward_op, backward_args)


@interpreter_only
def test_torch_compile_passes_through_the_op():
    image, text, labels, frozen = problem(7, 5, 13, seed=8)
    scale = torch.tensor(10.0, dtype=torch.float64)

    def loss_of(image, text, scale):
        return calibrated_prompt_loss(
            image, text, labels, scale, frozen, backend="triton", label_smoothing=0.1
        )[0]

    leaves = fresh(image, text, scale)
    eager = loss_of(*leaves)
    eager_grads = torch.autograd.grad(eager, leaves)
    compiled = torch.compile(loss_of, backend="aot_eager", fullgraph=True)
    leaves = fresh(image, text, scale)
    loss = compiled(*leaves)
    grads = torch.autograd.grad(loss, leaves)
    torch.testing.assert_close(loss, eager, rtol=1e-12, atol=0)
    for g, w in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-14)
