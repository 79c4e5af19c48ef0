"""Robust fine-tuning of CLIP (FT, FLYP, CaRot) with ID / OOD accuracy and calibration.

Examples:
  fastcal finetune --method carot --output runs/carot                  # the embedded digits testbed
  fastcal finetune --method flyp --dataset imagenet --root $DATA --output runs/flyp
  torchrun --nproc_per_node 8 -m fastcal finetune --method carot --dataset imagenet --root $DATA \\
      --output runs/carot --precision bf16

Without --dataset the run uses the embedded testbed: the testbed CLIP fine-tuned on the digits of the
base classes 0-4; ID = their test images, OOD = the same images style-shifted (sheared and tinted).
With a dataset, the published recipe is the default (AdamW, lr 1e-5, or 3e-5 for FT, weight decay 0.1,
global batch 512, 10 epochs, cosine after 500 warm-up steps, ViT-B/16); ImageNet is evaluated on
ImageNet-V2, -R, -A, -Sketch and ObjectNet where present under --root. ECE uses 10 bins, with and
without temperature scaling fitted on held-out ID images. The output folder gets run.json, results.json
({"id", "ood", "config"}), predictions/<set>.npz, model.safetensors (head.safetensors for FT),
checkpoint.safetensors, train_log.jsonl and reliability diagrams; --resume continues from the
checkpoint, exactly.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from fastcal.runs.finetune import FinetuneRunConfig
    from fastcal.runs.options import add_options

    add_options(parser, FinetuneRunConfig, title="settings (unset: the method's published recipe)")


def run(args: argparse.Namespace) -> int:
    from fastcal.runs.distributed import is_main_process
    from fastcal.runs.finetune import FinetuneRunConfig, run_finetune
    from fastcal.runs.options import settings_from_args

    settings = settings_from_args(args, FinetuneRunConfig)
    if settings.output is None:
        raise ValueError("--output: expected a run folder, got none")
    results = run_finetune(settings)
    if is_main_process():
        title = settings.method.upper()
        print(summary_table(title, results))
        print(f"results: {settings.output}/results.json")
    return 0


def summary_table(label: str, results: dict) -> str:
    """A short text table: ID and OOD (mean) accuracy and ECE, with and without temperature scaling."""
    rows = [("ID " + results["config"]["data"].get("dataset", ""), results["id"])]
    for name, entry in results["ood"].items():
        rows.append(("OOD " + name, entry))
    lines = [f"{label:<28} {'acc':>7} {'ECE':>7} {'ECE(TS)':>8}"]
    for name, entry in rows:
        scaled = entry["temperature_scaled"]["ece"]
        lines.append(f"{name:<28} {entry['accuracy']:7.4f} {entry['ece']:7.4f} {scaled:8.4f}")
    return "\n".join(lines)
