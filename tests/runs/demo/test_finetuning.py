"""The ``fastcal demo`` stage of robust fine-tuning on the testbed CLIP, with one-step schedules and
trimmed evaluation sets (the real stage runs in ``fastcal demo``)."""

import contextlib
import dataclasses

import pytest

import fastcal.runs.demo.finetuning as finetune_demo
import fastcal.runs.finetune as experiment
from fastcal import registry
from fastcal.runs.demo import DemoContext
from fastcal.runs.rows import check_row, format_table


def test_demo_stage_rows(testbed_clip, cache_dir, tmp_path, monkeypatch):
    full = experiment.testbed_data()

    def small(eval_set, n):
        return dataclasses.replace(eval_set, items=eval_set.items[:n])

    trimmed = dataclasses.replace(
        full,
        heldout=small(full.heldout, 30),
        test=small(full.test, 40),
        ood=tuple(small(s, 40) for s in full.ood),
    )
    monkeypatch.setattr(experiment, "testbed_data", lambda: trimmed)
    clip = testbed_clip
    ctx = DemoContext(tmp_path, clip, None, cache_dir, progress=False)
    before = {k: v.clone() for k, v in clip.model.state_dict().items()}

    with contextlib.ExitStack() as one_step_schedules:
        for method in finetune_demo.METHODS:
            spec = registry.get("finetune_method", method)
            short = dataclasses.replace(spec, testbed=spec.testbed.replace(max_steps=1, batch_size=16))
            one_step_schedules.enter_context(registry.registered("finetune_method", method, short))
        rows = [check_row("finetune", row) for row in finetune_demo.finetuning_stage(ctx)]
    methods = [row["method"] for row in rows]
    assert methods == [
        "CLIP zero-shot (ensemble)",
        "CLIP zero-shot (ensemble) + TS",
        "FT",
        "FT + TS",
        "WiSE-FT (FT, alpha=0.5)",
        "WiSE-FT (FT, alpha=0.5) + TS",
        "FLYP",
        "FLYP + TS",
        "CaRot",
        "CaRot + TS",
    ]
    for row in rows:
        assert set(row["metrics"]) == {"ID", "OOD"}
        assert row["metrics"]["ID"]["count"] == 40 and row["metrics"]["ID"]["n_bins"] == 15
        assert ("temperature" in row["notes"]) == row["method"].endswith("+ TS")
        assert set(row["notes"]["figures"]) == {"ID", "OOD"}
    assert len(ctx.figures) == 20 and all((tmp_path / name).is_file() for name in ctx.figures)
    for method in finetune_demo.METHODS:  # each a run folder with its predictions
        assert (tmp_path / "finetune" / method / "predictions" / "digits_shifted.npz").is_file()
    assert rows[0]["metrics"]["ID"]["accuracy"] == pytest.approx(rows[1]["metrics"]["ID"]["accuracy"])
    # the shared pretrained model is left as it was (each method fine-tunes a copy)
    for name, value in clip.model.state_dict().items():
        assert value.equal(before[name]), name
    table = format_table(rows)
    assert "ID acc" in table and "OOD ECE" in table and "CaRot + TS" in table
