"""The ``fastcal demo`` stage of TPT, C-TPT and FPP + C-TPT, shrunk to a few samples."""

from types import SimpleNamespace

from fastcal.cli.demo import check_row, format_table
from fastcal.models.clip import LoadedClip
from fastcal.tpt import demo
from fastcal.tpt.fpp import FPPConfig


def test_demo_stage_rows(tiny_clip, tmp_path, monkeypatch, cache_dir):
    monkeypatch.setattr(demo, "DEMO_SAMPLES", 3)
    monkeypatch.setattr(demo, "DEMO_VIEWS", 16)
    monkeypatch.setattr(demo, "FPP_DEMO", FPPConfig(steps=2, flatness_weight=1.25))
    model, tokenizer = tiny_clip
    ctx = SimpleNamespace(
        clip=LoadedClip(model, tokenizer, None, None),
        output=tmp_path,
        seed=0,
        n_bins=15,
        progress=False,
        figures=[],
    )
    rows = [check_row("tpt", row) for row in demo.demo_stage(ctx)]
    assert [r["method"] for r in rows] == [
        "zero-shot (hard prompt, same samples)",
        "TPT",
        "C-TPT",
        "FPP + C-TPT",
    ]
    assert all(r["section"] == demo.SECTION and r["metrics"]["new"]["count"] == 3 for r in rows)
    assert rows[-1]["notes"]["fpp_steps"] == 2
    assert len(ctx.figures) == 8 and all((tmp_path / name).exists() for name in ctx.figures)
    assert "FPP + C-TPT" in format_table(rows)
