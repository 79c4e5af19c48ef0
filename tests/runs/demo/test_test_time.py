"""The ``fastcal demo`` stage of TPT, C-TPT and FPP + C-TPT, shrunk to a few samples."""

from fastcal.models.clip import LoadedClip
from fastcal.runs.demo import DemoContext
from fastcal.runs.demo import test_time as demo
from fastcal.runs.rows import check_row, format_table


def test_demo_stage_rows(random_testbed, synthetic_splits, tmp_path, monkeypatch, cache_dir):
    monkeypatch.setattr(demo, "DEMO_SAMPLES", 3)
    monkeypatch.setattr(demo, "DEMO_VIEWS", 16)
    monkeypatch.setattr(demo, "DEMO_FPP_STEPS", 2)
    model, tokenizer = random_testbed
    clip = LoadedClip(model, tokenizer, None, None)
    ctx = DemoContext(tmp_path, clip, synthetic_splits, cache_dir, progress=False)
    rows = [check_row("tpt", row) for row in demo.test_time_stage(ctx)]
    assert [r["method"] for r in rows] == [
        "zero-shot (hard prompt, same samples)",
        "TPT",
        "C-TPT",
        "O-TPT",
        "FPP + C-TPT",
        "zero-shot (5-prompt ensemble, same samples)",
        "C-TPT (ensemble init)",
    ]
    assert all(r["section"] == demo.SECTION and r["metrics"]["new"]["count"] == 3 for r in rows)
    assert rows[4]["notes"]["fpp_steps"] == 2
    assert len(ctx.figures) == 14 and all((tmp_path / name).exists() for name in ctx.figures)
    assert "FPP + C-TPT" in format_table(rows)
