"""The ``fastcal demo`` stages of the prompt-tuning methods: a row the demo's table accepts, a run folder
per stage (here on the tiny CLIP and synthetic images instead of the testbed, for speed)."""

import json

from fastcal.runs.demo import STAGES, DemoContext
from fastcal.runs.demo import prompt_tuning as demo
from fastcal.runs.rows import check_row, format_table


def test_stage_rows_and_run_folders(tmp_path, tiny_clip, synthetic_splits):
    ctx = DemoContext(tmp_path, tiny_clip, synthetic_splits, tmp_path / "cache", progress=False)
    rows = [check_row("cocoop", row) for row in demo.cocoop_stage(ctx)]
    rows += [check_row("coop_calibrated", row) for row in demo.coop_calibrated_stage(ctx)]
    assert [r["method"] for r in rows] == ["CoCoOp", "CoOp + calibrated loss"]
    for row in rows:
        assert set(row["metrics"]) == {"base", "new"} and "hm_accuracy" in row
        run = tmp_path / row["notes"]["run"]
        assert json.loads((run / "results.json").read_text())["new"] == row["metrics"]["new"]
        for group in ("base", "new"):
            assert (tmp_path / row["notes"]["figures"][group]).stat().st_size > 0
    assert rows[1]["notes"]["loss"] == "calibrated" and rows[0]["notes"]["epochs"] == 10
    # new-class ECE after TS and DAC fitted on the base classes (these splits have no val: train);
    # CoCoOp's per-image classifiers have no class text features for DAC
    coop_after = rows[1]["notes"]["new_ece_after"]
    assert coop_after["fit_split"] == "train" and 0 <= coop_after["ts"] <= 1 and 0 <= coop_after["dac"] <= 1
    cocoop_after = rows[0]["notes"]["new_ece_after"]
    assert 0 <= cocoop_after["ts"] <= 1 and cocoop_after["dac"] is None and "dac_skipped" in cocoop_after
    assert len(ctx.figures) == 4 and "CoOp + calibrated loss" in format_table(rows)
    registered = dict(STAGES)
    for name in ("coop", "coop_calibrated", "kgcoop", "cocoop", "maple", "vpt"):
        module, _, function = registered[name].partition(":")
        assert module == "fastcal.runs.demo.prompt_tuning" and callable(getattr(demo, function))
