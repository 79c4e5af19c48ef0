"""The TPT and C-TPT step on fake CUDA tensors (``tests/fake_cuda.py``): building the step (its first
run) and calls with full and partial batches mix no devices and read nothing on the host, which is what
lets the step be captured in a CUDA graph.

TPT is built on the CPU as a run builds it (prompt learner, packed prompts, the step), which also makes
the text encoder's plans once; the learner and its packed encoder are then converted to fake CUDA and
the step is built again on them exactly as ``TPT`` builds it, with the AdamW state on the device
(``capturable``), as on a GPU. Building the step checks that the initial context is finite, a host
read of set-up by design: that one check is told the values are finite, and everything after it,
the first run included, is traced.
"""

import copy

import pytest
import torch

from fastcal._checks import check_tensor
from fastcal.tpt import step as step_module
from fastcal.tpt.ctpt import ctpt_config
from fastcal.tpt.step import TestTimeStep, TuningConfig
from fastcal.tpt.tpt import TPT

N_VIEWS = 16


@pytest.mark.parametrize("samples_per_step", [1, 4])
@pytest.mark.parametrize("method", ["tpt", "ctpt"])
def test_the_step_traces_on_fake_cuda(
    tiny_clip, classnames, fake_cuda, monkeypatch, method, samples_per_step
):
    model, tokenizer = tiny_clip
    model = copy.deepcopy(model)  # converted below: never the session's model
    config = TuningConfig(n_views=N_VIEWS)
    if method == "ctpt":
        config = ctpt_config(config, dispersion_weight=50.0)
    tpt = TPT(model, tokenizer, classnames, config=config, samples_per_step=samples_per_step)
    assert tpt.packed is not None and not tpt.graph_used
    dim = tpt.step.image_features.shape[-1]
    generator = torch.Generator().manual_seed(0)
    views = torch.nn.functional.normalize(
        torch.randn(samples_per_step, N_VIEWS, dim, generator=generator), dim=-1
    )

    monkeypatch.setattr(
        step_module, "check_tensor", lambda *args, **kw: check_tensor(*args, **kw, finite=False)
    )
    mode = fake_cuda.new_mode()
    learner, packed, start, logit_scale, views = fake_cuda.to_fake_cuda(
        mode, tpt.learner, tpt.packed, tpt.hard_ctx, model.logit_scale.detach().clone(), views
    )
    with fake_cuda.trace(mode):
        step = TestTimeStep(
            learner,
            start,
            logit_scale,
            dim,
            samples_per_step=samples_per_step,
            config=config,
            use_graph=False,
            encoder=packed,
        )
        assert step.optimizer.defaults["capturable"]
        logits = step(views)
        partial = step(views[: max(1, samples_per_step - 1)])
    assert logits.device.type == "cuda" and logits.shape == (samples_per_step, len(classnames))
    assert partial.shape == (max(1, samples_per_step - 1), len(classnames))
    state = step.optimizer.state[step.ctx]
    assert {v.device.type for v in state.values()} == {"cuda"}  # step count included: no host counter
