"""``fastcal demo`` stage: robust fine-tuning on the testbed, in-distribution and under a style shift.

The testbed CLIP is fine-tuned on the base digits 0-4 (train split) with each method's short testbed
schedule (``FinetuneSpec.testbed``) through the same runner as ``fastcal finetune``
(``fastcal.runs.finetune``: run folders under ``<demo output>/finetune/<method>``) and evaluated on their
test images (ID) and on the same images style-shifted (OOD: sheared and tinted;
``fastcal.data.testbed.shifted``), each without and with temperature scaling fitted on their val split.
Rows: zero-shot CLIP (the prompt ensemble), FT, WiSE-FT (FT mixed with zero-shot at alpha = 0.5,
CaRot's choice), FLYP and CaRot.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from fastcal import registry
from fastcal.finetune.config import WISE_ALPHA
from fastcal.runs.demo import DemoContext
from fastcal.runs.rows import Row

SECTION = "robust fine-tuning (base digits; ID = test, OOD = style-shifted test)"
METHODS = ("ft", "flyp", "carot")


def _report(entry: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in entry.items() if k not in ("temperature", "temperature_scaled")}


def _rows(label: str, results: dict[str, Any], figures: dict[str, str], notes: dict[str, Any]) -> list[dict]:
    """Two rows of one model: without and with temperature scaling."""
    ood = results["ood"]["digits_shifted"]
    temperature = results["id"]["temperature"]
    plain = {"ID": _report(results["id"]), "OOD": _report(ood)}
    scaled = {"ID": results["id"]["temperature_scaled"], "OOD": ood["temperature_scaled"]}
    return [
        {
            "section": SECTION,
            "method": label,
            "metrics": plain,
            "notes": {**notes, "figures": figures.get("", {})},
        },
        {
            "section": SECTION,
            "method": f"{label} + TS",
            "metrics": scaled,
            "notes": {**notes, "temperature": temperature, "figures": figures.get("ts", {})},
        },
    ]


def _figure_hook(ctx: DemoContext, stem: str, label: str, figures: dict[str, dict[str, str]]):
    groups = {"digits": "ID", "digits_shifted": "OOD"}

    def write(name: str, logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> None:
        group = groups[name]
        for key, scale, suffix in (("", 1.0, ""), ("ts", temperature, " + TS")):
            probs = torch.softmax(logits.double() / scale, dim=1)
            file_stem = f"{stem}{'-ts' if key else ''}_{group}"
            figures.setdefault(key, {})[group] = ctx.figure(
                file_stem, probs, labels, f"{label}{suffix} ({group})"
            )

    return write


def finetuning_stage(ctx: DemoContext) -> list[Row]:
    """Rows for ZS, FT, WiSE-FT, FLYP and CaRot (each without and with TS), ``ctx.n_bins`` bins."""
    from fastcal.finetune.evaluate import evaluate
    from fastcal.models import LoadedClip
    from fastcal.runs.finetune import (
        FinetuneRunConfig,
        classifier_factory,
        run_finetune,
        run_wise,
        testbed_data,
    )

    data = testbed_data()
    pretrained = ctx.clip

    def fresh() -> LoadedClip:
        return LoadedClip(
            copy.deepcopy(pretrained.model),
            pretrained.tokenizer,
            pretrained.train_transform,
            pretrained.eval_transform,
        )

    folder = ctx.output / "finetune"
    rows: dict[str, list[Row]] = {}
    for method in METHODS:
        label = registry.get("finetune_method", method).title
        ctx.log(f"fastcal demo: fine-tuning {label}")
        settings = FinetuneRunConfig(
            method=method,
            output=str(folder / method),
            n_bins=ctx.n_bins,
            keep_checkpoint=False,  # 43-57 MB each on the testbed, and the demo never resumes
            progress=ctx.progress,
        )
        figures: dict[str, dict[str, str]] = {}
        results = run_finetune(
            settings,
            data=data,
            backbone=fresh(),
            figure=_figure_hook(ctx, f"finetune-{method}", label, figures),
            cache_dir=ctx.feature_cache_dir,
        )
        notes = {"steps": results["config"]["total_steps"], "hyperparameters": results["config"]["finetune"]}
        rows[method] = _rows(label, results, figures, notes)
    ctx.log("fastcal demo: WiSE-FT")
    wise_figures: dict[str, dict[str, str]] = {}
    wise = run_wise(
        folder / "ft",
        [],
        folder / "wise",
        select=WISE_ALPHA,
        data=data,
        backbone=fresh(),
        figure=_figure_hook(ctx, "finetune-wise", "WiSE-FT", wise_figures),
        n_bins=ctx.n_bins,
        progress=ctx.progress,
        cache_dir=ctx.feature_cache_dir,
    )
    zero_figures: dict[str, dict[str, str]] = {}
    zero_shot = evaluate(
        classifier_factory(pretrained.model, pretrained.tokenizer, cache_dir=ctx.feature_cache_dir),
        data.test,
        data.heldout,
        data.ood,
        pretrained.eval_transform,
        n_bins=ctx.n_bins,
        figure=_figure_hook(ctx, "finetune-zeroshot", "CLIP zero-shot", zero_figures),
    )
    wise_label = f"WiSE-FT (FT, alpha={WISE_ALPHA:g})"
    return [
        *_rows("CLIP zero-shot (ensemble)", zero_shot, zero_figures, {"templates": len(data.templates)}),
        *rows["ft"],
        *_rows(wise_label, wise, wise_figures, {"alpha": WISE_ALPHA}),
        *rows["flyp"],
        *rows["carot"],
    ]
