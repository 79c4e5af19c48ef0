"""``fastcal demo`` stages of the prompt-tuning methods on the embedded testbed.

Each stage trains one method (16 shots of the base digits, the method's testbed schedule:
``MethodSpec.testbed_recipe`` over its published recipe) with ``fastcal.runs.train.train`` into
``<demo output>/runs/<stage>`` (results.json, reliability diagrams, prompt.pt) and returns one table row
with its base and new calibration reports (the demo's context is ``fastcal.runs.demo.DemoContext``)
and, in its notes, the new classes' ECE after temperature scaling and after DAC, both fitted on the base
classes' few-shot validation predictions (``new_ece_after``; ``fastcal.runs.posthoc``). The DOR stages
draw ``DEMO_OUTLIERS`` outliers per epoch instead of DOR's 100 (each goes through the text encoder at
every step: a fifth of the cost for a testbed of 5 training classes; the pool is DOR's, 5,000 WordNet
nouns).
"""

from __future__ import annotations

from pathlib import Path

from fastcal.runs.demo import DemoContext
from fastcal.runs.rows import Row

SECTION = "prompt tuning (16 shots, train base, test base and new)"
DEMO_OUTLIERS = 20


def run_stage(
    ctx: DemoContext,
    stage: str,
    method: str,
    loss: str = "ce",
    title: str | None = None,
    regularizers: tuple[str, ...] = (),
    regularizer_options: dict | None = None,
) -> list[Row]:
    """Train ``method`` with ``loss`` (and extra ``regularizers`` with their options) on the testbed and
    return its row."""
    from fastcal.methods.base import get_method
    from fastcal.runs.train import TrainConfig, train

    output = Path(ctx.output) / "runs" / stage
    config = TrainConfig(
        method=method,
        loss=loss,
        regularizers=list(regularizers),
        regularizer_options=dict(regularizer_options or {}),
        seed=ctx.seed,
        n_bins=ctx.n_bins,
        output=str(output),
        progress=ctx.progress,
        cache_dir=None if ctx.cache_dir is None else str(ctx.cache_dir),
    )
    results = train(config, clip=ctx.clip, splits=ctx.splits)
    figures = {}
    for group in ("base", "new"):
        name = str(Path("runs") / stage / f"reliability_{group}.png")
        ctx.figures.append(name)
        figures[group] = name
    resolved = results["config"]
    notes = {
        "loss": loss,
        "regularizer_options": resolved["regularizer_options"],
        "epochs": resolved["epochs"],
        "batch_size": resolved["batch_size"],
        "lr": resolved["lr"],
        "recipe_source": resolved["recipe_source"],
        "train_seconds": results["train"]["seconds"],
        "run": str(Path("runs") / stage),
        "figures": figures,
        "new_ece_after": new_class_calibration(ctx, output, resolved),
    }
    row_title = title or get_method(method).title
    return [
        {
            "section": SECTION,
            "method": row_title,
            "metrics": {g: results[g] for g in ("base", "new")},
            "notes": notes,
        }
    ]


def warm_caches(cache_dir: Path, stages: list[str]) -> None:
    """Fill the caches the section's cells share (``fastcal.runs.demo.seeds.start_warming`` runs this in
    its own process from the demo's start): the native backend of the calibrated loss (a C++ build on
    first use) and, for the DOR stages (``*_dor``), the WordNet vocabulary and its outlier bank under the
    testbed's prompt template (with the testbed CLIP, whose pretraining it waits for)."""
    from fastcal.data.testbed import digits_splits
    from fastcal.models.testbed import load_testbed_clip
    from fastcal.ops import native_available
    from fastcal.outliers.bank import OutlierBank
    from fastcal.outliers.vocabulary import load_vocabulary
    from fastcal.outliers.wordnet import WordNetNotFoundError, ensure_wordnet
    from fastcal.runs.demo import SEED

    native_available()
    if not any(stage.endswith("_dor") for stage in stages):
        return
    try:
        ensure_wordnet()
    except WordNetNotFoundError:
        return  # the DOR stages report it themselves
    vocabulary = load_vocabulary("wordnet", cache_dir=cache_dir / "wordnet")
    clip = load_testbed_clip(cache_dir=cache_dir / "testbed", progress=False)
    template = digits_splits(SEED).templates[0]
    OutlierBank.build(
        clip.model, clip.tokenizer, vocabulary, template, cache_dir=cache_dir / "outliers", progress=False
    )


def new_class_calibration(ctx: DemoContext, output: Path, resolved: dict) -> dict:
    """New-class ECE after TS and after DAC fitted on the base classes' few-shot validation split (the
    run's shots and seed; its few-shot training split where the dataset has no validation split), for
    the prompt saved in ``output``; ``fit_split`` says which."""
    from fastcal._checks import check_device
    from fastcal.data.protocols import base_new_split, few_shot_splits
    from fastcal.runs.posthoc import base_to_new_calibration
    from fastcal.runs.train.loop import load_prompt

    device = check_device("device", resolved["device"])
    base = base_new_split(few_shot_splits(ctx.splits, resolved["shots"], resolved["seed"])).base.splits
    fit_split = "val" if base.val else "train"
    after = base_to_new_calibration(
        load_prompt(output / "prompt.pt", ctx.clip, device=device),
        ctx.clip,
        base.val or base.train,
        base.classnames,
        output / "predictions" / "new.npz",
        templates=ctx.splits.templates,
        n_bins=ctx.n_bins,
        device=device,
        cache_dir=ctx.cache_dir,
    )
    return {**after, "fit_split": fit_split}


def coop_stage(ctx: DemoContext) -> list[Row]:
    """CoOp, cross-entropy."""
    return run_stage(ctx, "coop", "coop")


def coop_calibrated_stage(ctx: DemoContext) -> list[Row]:
    """CoOp with TCPT's calibrated loss."""
    return run_stage(ctx, "coop_calibrated", "coop", "calibrated", "CoOp + calibrated loss")


def dor_stage(ctx: DemoContext, stage: str, method: str, title: str) -> list[Row]:
    """``method`` with DOR (WordNet near-OOD outliers, its lambda); without WordNet, a row that says so
    (``fastcal wordnet`` sets it up)."""
    from fastcal.outliers.wordnet import WordNetNotFoundError, ensure_wordnet

    try:
        ensure_wordnet()
    except WordNetNotFoundError as err:
        skipped = f"{title} (not run: no WordNet; see `fastcal wordnet`)"
        return [{"section": SECTION, "method": skipped, "metrics": {}, "notes": {"skipped": str(err)}}]
    options = {"dor": {"n_outliers": DEMO_OUTLIERS}}
    return run_stage(ctx, stage, method, title=title, regularizers=("dor",), regularizer_options=options)


def coop_dor_stage(ctx: DemoContext) -> list[Row]:
    """CoOp with DOR (lambda 8)."""
    return dor_stage(ctx, "coop_dor", "coop", "CoOp + DOR")


def kgcoop_stage(ctx: DemoContext) -> list[Row]:
    """KgCoOp (CoOp + knowledge guidance, weight 8)."""
    return run_stage(ctx, "kgcoop", "kgcoop")


def kgcoop_dor_stage(ctx: DemoContext) -> list[Row]:
    """KgCoOp with DOR (lambda 2)."""
    return dor_stage(ctx, "kgcoop_dor", "kgcoop", "KgCoOp + DOR")


def prograd_stage(ctx: DemoContext) -> list[Row]:
    """ProGrad (CoOp with the prompt-aligned gradient rule), cross-entropy."""
    return run_stage(ctx, "prograd", "prograd")


def prograd_calibrated_stage(ctx: DemoContext) -> list[Row]:
    """ProGrad's rule on TCPT's calibrated loss."""
    return run_stage(ctx, "prograd_calibrated", "prograd", "calibrated", "ProGrad + calibrated loss")


def tcp_stage(ctx: DemoContext) -> list[Row]:
    """TCP (class-aware tokens from the textual knowledge embedding), cross-entropy."""
    return run_stage(ctx, "tcp", "tcp")


def tcp_dor_stage(ctx: DemoContext) -> list[Row]:
    """TCP with DOR (lambda 2; the outliers get class tokens from their own frozen features)."""
    return dor_stage(ctx, "tcp_dor", "tcp", "TCP + DOR")


def proda_stage(ctx: DemoContext) -> list[Row]:
    """ProDA (a Gaussian over 32 prompts, scored with their mean), cross-entropy."""
    return run_stage(ctx, "proda", "proda")


def promptsrc_stage(ctx: DemoContext) -> list[Row]:
    """PromptSRC (deep prompts in both towers, self-regulation, Gaussian aggregation), cross-entropy."""
    return run_stage(ctx, "promptsrc", "promptsrc")


def cocoop_stage(ctx: DemoContext) -> list[Row]:
    """CoCoOp, cross-entropy."""
    return run_stage(ctx, "cocoop", "cocoop")


def maple_stage(ctx: DemoContext) -> list[Row]:
    """MaPLe, cross-entropy."""
    return run_stage(ctx, "maple", "maple")


def maple_dor_stage(ctx: DemoContext) -> list[Row]:
    """MaPLe with DOR (lambda 2; the outliers go through the deep text prompts)."""
    return dor_stage(ctx, "maple_dor", "maple", "MaPLe + DOR")


def vpt_stage(ctx: DemoContext) -> list[Row]:
    """VPT (deep), cross-entropy."""
    return run_stage(ctx, "vpt", "vpt")


def vpt_dor_stage(ctx: DemoContext) -> list[Row]:
    """VPT with fastcal's image-side DOR (lambda 2; ``fastcal.methods.vpt.VPT.outlier_drift_pair``)."""
    return dor_stage(ctx, "vpt_dor", "vpt", "VPT + DOR (image side)")
