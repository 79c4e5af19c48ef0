"""Training steps of every prompt method, with each loss and with DOR, traced on fake CUDA tensors
(``tests/fake_cuda.py``): the loop's own ``train_epoch`` runs two steps with no device mismatch and no
host read (FakeTensorMode raises on either). By default every method and every loss run once (and DOR
once); ``-m slow`` runs every pair and DOR on every method it supports.

The run is set up as ``fastcal.runs.train`` sets it up (``prepare``, on the CPU), then converted to fake
CUDA. What an epoch does before its first step stays outside the trace: this epoch's inputs (read from
the feature cache or the image loader: replaced by fake CUDA tensors of their shapes) and the
regularizers' per-epoch draw (DOR's outliers, drawn on the CPU before conversion). The trace ends where
the steps end, at the scheduler's step, before the epoch's summary reads its mean loss once.

Without CUDA the run's gradient scaler is off, as with ``--no-amp``. With AMP (the default on CUDA),
torch's ``GradScaler.step`` reads one flag per step on the host (whether the gradients hold an inf)
before it steps a non-fused optimizer; the last test pins that read as the step's only one.
"""

import pytest
import torch
from torch._subclasses.fake_tensor import DataDependentOutputException

from fastcal import registry
from fastcal.methods import get_method
from fastcal.runs.train import TrainConfig, loop

METHODS = registry.names("prompt_method")
DOR_METHODS = [m for m in METHODS if get_method(m).build.supports_outliers]
LOSSES = registry.names("loss")
ONCE_EACH = [
    (METHODS[i % len(METHODS)], LOSSES[i % len(LOSSES)]) for i in range(max(len(METHODS), len(LOSSES)))
]
PAIRS = [
    pytest.param(method, loss, marks=() if (method, loss) in ONCE_EACH else pytest.mark.slow)
    for method in METHODS
    for loss in LOSSES
]
OUTLIER_WORDS = ["wolf", "fox", "tiger", "pony", "zebra", "kitten", "toaster", "sofa", "kayak", "lamp"]


class _StepsDone(Exception):
    """Raised by the scheduler's step: every batch of the epoch has run."""


def _prepare(tmp_path, tiny_clip, synthetic_splits, method, loss, *, dor=False):
    values = {
        "method": method,
        "loss": loss,
        "shots": 2,
        "epochs": 1,
        "progress": False,
        "device": "cpu",
        "output": str(tmp_path / "run"),
        "cache_dir": str(tmp_path / "cache"),
    }
    if method == "maple":
        values["prompt_depth"] = 2  # the tiny CLIP has 3 layers
    if dor:
        words = tmp_path / "words.txt"
        words.write_text("\n".join(OUTLIER_WORDS) + "\n")
        values["regularizers"] = ["dor"]
        values["regularizer_options"] = {"dor": {"vocabulary": str(words), "pool_size": 6, "n_outliers": 4}}
    run = loop.prepare(TrainConfig.from_dict(values), clip=tiny_clip, splits=synthetic_splits)
    n = len(run.data.train_items)
    assert n % 2 == 0
    run.config = run.config.replace(batch_size=n // 2)  # two steps of the same size
    return run


def _trace_two_steps(run, fake_cuda, monkeypatch):
    n = len(run.data.train_items)
    generator = torch.Generator().manual_seed(0)
    if run.method.input_kind == "features":
        width = run.clip.model.text_projection.shape[1]
        inputs = torch.randn(n, width, generator=generator)
    else:
        size = run.clip.model.visual.image_size
        size = size[0] if isinstance(size, tuple) else size
        inputs = torch.randn(n, 3, size, size, generator=generator)
    labels = torch.tensor([label for _, label in run.data.train_items])
    for regularizer in run.step.regularizers:
        regularizer.on_epoch_start(0)
    with torch.no_grad():  # the text encoder's plans (one sync per token-id tensor, once per run)
        batch = slice(0, run.config.batch_size)
        run.step.objective(inputs[batch], labels[batch])
        run.method.eval()  # every prompt (ProDA's evaluation mean covers each class-token position)
        run.method.output(inputs[batch])
        run.method.train()

    mode = fake_cuda.new_mode()
    run, inputs, labels = fake_cuda.to_fake_cuda(mode, run, inputs, labels)
    monkeypatch.setattr(loop, "_epoch_inputs", lambda run, epoch: (inputs, labels))
    for regularizer in run.step.regularizers:
        monkeypatch.setattr(regularizer, "on_epoch_start", lambda epoch: None)  # drawn above

    def steps_done():
        raise _StepsDone

    monkeypatch.setattr(run.scheduler, "step", steps_done)
    before = {name: p for name, p in run.method.tuned_parameters()}
    with fake_cuda.trace(mode), pytest.raises(_StepsDone):
        loop.train_epoch(run, 0)
    assert before, "the method tunes nothing"
    for name, p in before.items():
        assert p.grad is not None and p.grad.device.type == "cuda", name
        assert run.step.optimizer.state[p], f"{name} was not stepped"


@pytest.mark.parametrize(("method", "loss"), PAIRS)
def test_a_training_step_traces_on_fake_cuda(
    tmp_path, tiny_clip, synthetic_splits, fake_cuda, monkeypatch, method, loss
):
    run = _prepare(tmp_path, tiny_clip, synthetic_splits, method, loss)
    _trace_two_steps(run, fake_cuda, monkeypatch)


@pytest.mark.parametrize(
    "method", [pytest.param(m, marks=() if m == DOR_METHODS[0] else pytest.mark.slow) for m in DOR_METHODS]
)
def test_a_training_step_with_dor_traces_on_fake_cuda(
    tmp_path, tiny_clip, synthetic_splits, fake_cuda, monkeypatch, method
):
    run = _prepare(tmp_path, tiny_clip, synthetic_splits, method, "calibrated", dor=True)
    assert [r.name for r in run.step.regularizers][-1] == "dor"
    _trace_two_steps(run, fake_cuda, monkeypatch)


def test_with_amp_the_scalers_inf_check_is_the_only_host_read(
    tmp_path, tiny_clip, synthetic_splits, fake_cuda, monkeypatch
):
    run = _prepare(tmp_path, tiny_clip, synthetic_splits, "coop", "calibrated")
    with monkeypatch.context() as cuda_present:  # the scaler a CUDA run builds (it disables itself without)
        cuda_present.setattr(torch.cuda, "is_available", lambda: True)
        run.step.scaler = torch.amp.GradScaler("cuda")
    assert run.step.scaler.is_enabled()
    with pytest.raises(DataDependentOutputException) as caught:
        _trace_two_steps(run, fake_cuda, monkeypatch)
    frames = [(frame.name, str(frame.path)) for frame in caught.traceback]
    ours = [name for name, path in frames if "/fastcal/" in path]
    assert ours[-1] == "_step" and frames[-1][0] != "_step"
    assert any(name == "_maybe_opt_step" and path.endswith("grad_scaler.py") for name, path in frames)
