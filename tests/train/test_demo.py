"""The ``fastcal demo`` stages of the prompt-tuning methods: a row the demo's table accepts, a run folder
per stage (here on the tiny CLIP and synthetic images instead of the testbed, for speed)."""

import json
from types import SimpleNamespace

from fastcal.cli.demo import STAGES, check_row, format_table
from fastcal.train import demo


def test_stage_rows_and_run_folders(tmp_path, tiny_clip, synthetic_splits):
    ctx = SimpleNamespace(
        output=tmp_path,
        seed=0,
        n_bins=15,
        progress=False,
        cache_dir=tmp_path / "cache",
        figures=[],
        clip=tiny_clip,
        splits=synthetic_splits,
    )
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
    assert len(ctx.figures) == 4 and "CoOp + calibrated loss" in format_table(rows)
    registered = dict(STAGES)
    for name in ("coop", "coop_calibrated", "kgcoop", "cocoop", "maple", "vpt"):
        module, _, function = registered[name].partition(":")
        assert module == "fastcal.train.demo" and callable(getattr(demo, function))
