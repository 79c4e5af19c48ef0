"""A CUDA graph capture that fails never ends a run: the TPT step warns once and runs eagerly, and the
run's results.json says the graph was not used.

No GPU here, so the capture is made to fail on the CPU: ``graph_capturable`` is told the CPU learner can
be captured, and the ``torch.cuda`` names the capture looks up are replaced by stand-ins whose
``torch.cuda.graph`` raises as a refused capture does (``torch.AcceleratorError`` is a RuntimeError) and
after which the stream reports it is not capturing.
Everything before it runs for real: the three warm-up passes on the (stand-in) side stream and the
graph object's creation.
"""

import contextlib

import pytest
import torch

from fastcal.methods.prompt_learner import PromptLearner
from fastcal.models.clip import LoadedClip
from fastcal.models.text_encoder import TextEncoder
from fastcal.runs import tpt as runner
from fastcal.tpt import step as step_module
from fastcal.tpt.step import TestTimeStep, TuningConfig

N_VIEWS = 20


class _Stream:
    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, other):
        pass


class _Graph:
    def replay(self):
        raise AssertionError("a graph whose capture failed must never replay")


@pytest.fixture
def failing_capture(monkeypatch):
    """Capture on the CPU, refused at ``torch.cuda.graph``; returns the list of attempts."""
    attempts = []

    @contextlib.contextmanager
    def refused(graph, *args, **kwargs):
        attempts.append(graph)
        raise RuntimeError("operation not permitted when stream is capturing (simulated)\nmore detail")
        yield

    monkeypatch.setattr(step_module, "graph_capturable", lambda device: True)
    monkeypatch.setattr(torch.cuda, "Stream", _Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *args: _Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _Graph)
    monkeypatch.setattr(torch.cuda, "graph", refused)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    return attempts


def _features(n, dim):
    generator = torch.Generator().manual_seed(5)
    return torch.nn.functional.normalize(torch.randn(n, N_VIEWS, dim, generator=generator), dim=-1)


def test_a_failed_capture_warns_once_and_gives_the_eager_results(tiny_clip, classnames, failing_capture):
    model, tokenizer = tiny_clip
    learner = PromptLearner(TextEncoder(model), tokenizer, classnames, ctx_init="a photo of a")
    dim = learner().shape[-1]
    config = TuningConfig(n_views=N_VIEWS, dispersion_weight=20.0)

    def make(use_graph):
        return TestTimeStep(
            learner,
            learner.ctx.detach(),
            model.logit_scale,
            dim,
            samples_per_step=2,
            config=config,
            use_graph=use_graph,
        )

    with pytest.warns(RuntimeWarning, match="capturing the CUDA graph failed") as caught:
        fallen_back = make(None)  # the default: capture where graph_capturable says so
    assert len([w for w in caught if "CUDA graph" in str(w.message)]) == 1
    assert "more detail" not in str(caught[0].message)  # the first line of the reason only
    assert len(failing_capture) == 1 and not fallen_back.graph_used
    eager = make(False)
    features = _features(5, dim)
    for start in range(0, 5, 2):  # the last call holds one sample
        torch.testing.assert_close(
            fallen_back(features[start : start + 2]), eager(features[start : start + 2])
        )


def test_the_run_completes_like_an_eager_run_and_records_no_graph(random_testbed, tmp_path, failing_capture):
    model, tokenizer = random_testbed
    clip = LoadedClip(model, tokenizer, None, None)
    task = runner.testbed_task(limit=3, seed=0)

    def run(output, graph):
        config = runner.TptConfig(
            views=N_VIEWS, flip=False, samples_per_step=2, graph=graph, output=str(output), progress=False
        )
        return runner.run_tpt(config, clip=clip, task=task)

    with pytest.warns(RuntimeWarning, match="capturing the CUDA graph failed"):
        fallen_back = run(tmp_path / "graph", True)
    assert len(failing_capture) == 1
    eager = run(tmp_path / "eager", False)
    assert fallen_back["run"]["cuda_graph"] is False and eager["run"]["cuda_graph"] is False
    for key in ("accuracy", "ece_15", "ece_20", "metrics"):
        assert fallen_back[key] == eager[key]
    records = [
        sorted(runner.read_jsonl(tmp_path / name / runner.RECORDS), key=lambda r: r["index"])
        for name in ("graph", "eager")
    ]
    assert [r["logits"] for r in records[0]] == [r["logits"] for r in records[1]]
