"""TPT from a prompt ensemble: the ensemble's class features against every template's prompts encoded at
full length one by one (float64, values and context gradients), one tuning step against a restatement,
a single template against the hard prompt, and the ensemble initialization through the runner."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastcal.models.clip import LoadedClip
from fastcal.runs import tpt as tpt_runs
from fastcal.runs.tpt import TptConfig, run_tpt
from fastcal.tpt.ensemble import PromptEnsemble, split_template
from fastcal.tpt.step import TestTimeStep, TuningConfig
from fastcal.tpt.tpt import TPT

TEMPLATES = [
    "a photo of the digit {}.",
    "a {} in a video game.",
    "the digit {}, written by hand.",
    "{} texture.",
]
N_VIEWS = 20


def full_length_features(model, tokenizer, classnames, template, ctx, reference_text):
    """Class features of ``template`` with its words before the class replaced by ``ctx`` (n, W), each
    prompt built at CLIP's full 77 positions and encoded on its own."""
    _, rest = split_template(template)
    n = ctx.shape[0]
    ids = tokenizer([" ".join(["X"] * n) + f" {name}{rest}" for name in classnames])
    rows = [
        torch.cat([model.token_embedding(ids[c])[:1], ctx, model.token_embedding(ids[c])[1 + n :]])
        for c in range(len(classnames))
    ]
    return reference_text(model, torch.stack(rows), ids)


def restated_features(model, tokenizer, classnames, contexts, reference_text):
    """mean over templates of the normalized features (the fixed one included), renormalized."""
    parts = []
    for template in TEMPLATES:
        words, _ = split_template(template)
        if words:
            parts.append(
                full_length_features(
                    model, tokenizer, classnames, template, contexts[len(parts)], reference_text
                )
            )
        else:
            ids = tokenizer([template.format(name) for name in classnames])
            parts.append(reference_text(model, model.token_embedding(ids), ids))
    return F.normalize(torch.stack([F.normalize(p, dim=-1) for p in parts]).mean(0), dim=-1)


def test_split_template():
    assert split_template("a {} in a video game.") == ("a", " in a video game.")
    assert split_template("{} texture.") == ("", " texture.")
    with pytest.raises(ValueError, match="template"):
        split_template("no field")


@pytest.mark.parametrize("pack", [False, True])
def test_ensemble_features_and_gradients_match_full_length_prompts(
    tiny_clip, classnames, reference_text, pack
):
    model64 = __import__("copy").deepcopy(tiny_clip[0]).double()
    tokenizer = tiny_clip[1]
    ensemble = PromptEnsemble(model64, tokenizer, classnames, TEMPLATES, pack_prompts=pack)
    assert ensemble.n_fixed == 1 and len(ensemble.learners) == 3 and ensemble.n_ctx == sum(ensemble.sizes)
    generator = torch.Generator().manual_seed(2)
    ctx = (
        ensemble.ctx.double()
        + 0.1 * torch.randn(ensemble.ctx.shape, generator=generator, dtype=torch.float64)
    ).requires_grad_()
    ours = F.normalize(ensemble(ctx[None])[0], dim=-1)
    reference_ctx = ctx.detach().clone().requires_grad_()
    contexts = reference_ctx.split(ensemble.sizes)
    expected = restated_features(model64, tokenizer, classnames, contexts, reference_text)
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-10)
    weights = torch.randn(ours.shape, generator=generator, dtype=torch.float64)
    (weights * ours).sum().backward()
    (weights * expected).sum().backward()
    torch.testing.assert_close(ctx.grad, reference_ctx.grad, rtol=1e-8, atol=1e-10)


def test_one_step_equals_a_restatement(tiny_clip, classnames, reference_text):
    model, tokenizer = tiny_clip
    ensemble = PromptEnsemble(model, tokenizer, classnames, TEMPLATES)
    config = TuningConfig(n_views=N_VIEWS, dispersion_weight=50.0)
    dim = model.text_projection.shape[1]
    step = TestTimeStep(
        ensemble, ensemble.ctx.detach(), model.logit_scale, dim, config=config, encoder=ensemble
    )
    generator = torch.Generator().manual_seed(4)
    views = F.normalize(
        torch.randn(1, 1, dim, generator=generator) + torch.randn(1, N_VIEWS, dim, generator=generator),
        dim=-1,
    )
    tuned = step(views)

    ctx = nn.Parameter(ensemble.ctx.detach().clone())
    optimizer = torch.optim.AdamW([ctx], lr=config.lr, weight_decay=config.weight_decay)
    scale = model.logit_scale.exp()
    text = restated_features(model, tokenizer, classnames, ctx.split(ensemble.sizes), reference_text)
    logits = scale * views[0] @ text.T
    entropy = -(logits.softmax(1) * logits.log_softmax(1)).sum(1)
    log_p = logits[torch.argsort(entropy)[: config.n_selected]].log_softmax(dim=-1)
    mean_log_p = log_p.logsumexp(dim=0) - math.log(log_p.shape[0])
    dispersion = (text - text.mean(0)).norm(dim=-1).mean()
    loss = -(mean_log_p * mean_log_p.exp()).sum() - config.dispersion_weight * dispersion
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        text = restated_features(model, tokenizer, classnames, ctx.split(ensemble.sizes), reference_text)
        expected = scale * views[0, :1] @ text.T
    torch.testing.assert_close(step.loss[0], loss.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(step.ctx[0].detach(), ctx.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(tuned, expected, rtol=1e-5, atol=1e-5)


def test_a_single_template_is_the_hard_prompt(tiny_clip, classnames):
    model, tokenizer = tiny_clip
    hard = TPT(model, tokenizer, classnames, config=TuningConfig(n_views=16), augmix=False, flip=False)
    single = TPT(
        model,
        tokenizer,
        classnames,
        config=TuningConfig(n_views=16),
        templates=["a photo of a {}."],
        augmix=False,
        flip=False,
    )
    torch.testing.assert_close(single.hard_ctx, hard.hard_ctx, rtol=0, atol=0)
    images = [
        torch.randint(0, 255, (3, 40, 36), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    ]
    a = hard(images, [torch.Generator().manual_seed(7)])
    b = single(images, [torch.Generator().manual_seed(7)])
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="init_ctx: expected None with a template ensemble"):
        TPT(model, tokenizer, classnames, templates=TEMPLATES, init_ctx=hard.hard_ctx)


def test_the_ensemble_initialization_runs_and_resumes(random_testbed, tmp_path):
    model, tokenizer = random_testbed
    clip = LoadedClip(model, tokenizer, None, None)
    task = tpt_runs.testbed_task(limit=4, seed=0)
    settings = {"method": "ctpt", "init": "ensemble", "views": 16, "progress": False, "samples_per_step": 2}
    whole = run_tpt(TptConfig(**settings, output=str(tmp_path / "whole")), clip=clip, task=task)
    assert whole["init"] == "ensemble" and whole["num_samples"] == 4
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    (crashed / "run.json").write_text((tmp_path / "whole" / "run.json").read_text())
    lines = (tmp_path / "whole" / "records.jsonl").read_text().splitlines(keepends=True)
    (crashed / "records.jsonl").write_text(lines[0] + lines[1][:30])
    resumed = run_tpt(TptConfig(**settings, output=str(crashed), resume=True), clip=clip, task=task)
    for key in ("accuracy", "ece", "brier", "nll"):
        assert resumed["metrics"]["15"][key] == pytest.approx(whole["metrics"]["15"][key], abs=1e-6)
