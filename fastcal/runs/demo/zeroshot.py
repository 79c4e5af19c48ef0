"""``fastcal demo`` stage: zero-shot CLIP on the testbed's base and new classes."""

from __future__ import annotations

from fastcal.methods.zeroshot import PROMPT_MODES
from fastcal.runs.demo import DemoContext
from fastcal.runs.predictions import predictions_path
from fastcal.runs.rows import Row
from fastcal.runs.zeroshot import zeroshot_report


def zeroshot_stage(ctx: DemoContext) -> list[Row]:
    """Zero-shot (hard prompt and ensemble) on base and new, with and without temperature scaling."""
    return zeroshot_report(
        ctx.clip,
        ctx.splits,
        modes=PROMPT_MODES,
        calibration_size=ctx.calibration_size,
        n_bins=ctx.n_bins,
        seed=ctx.seed,
        cache_dir=ctx.feature_cache_dir,
        progress=ctx.progress,
        figure=ctx.figure,
        predictions=lambda stem: predictions_path(ctx.output, stem),
    )
