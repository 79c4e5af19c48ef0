"""Zero-shot accuracy and calibration of a CLIP on a dataset: the demo's zero-shot report on real data.

  fastcal zeroshot --model ViT-B-16 --pretrained openai --dataset oxford_pets --root $DATA
  fastcal zeroshot --model ViT-B-32 --pretrained /path/to/weights.safetensors --dataset imagefolder --root DIR
  fastcal zeroshot                  (the embedded testbed: --model fastcal-testbed --dataset testbed)

Reports all classes, base (first half) and new (second half) classes, each evaluated among its own
classes: accuracy, ECE (--n-bins, 15) and the rest of the calibration report, before and after
temperature scaling fitted on --calibration-size (50) base-class images of the validation split (the
train split when there is none; skipped when there is neither). Writes run.json, results.json, one
reliability diagram (PNG) and one predictions/<row>_<group>.npz per row and group to --output, and
prints the table.

--templates hard uses the dataset's hand-crafted prompt (CoOp's zero-shot baseline), ensemble all of its
templates (CLIP's 80 for the ImageNet family). --pretrained takes an open_clip tag (from the local
Hugging Face cache; nothing is downloaded with HF_HUB_OFFLINE=1) or a checkpoint file.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from fastcal.runs.options import add_options
    from fastcal.runs.zeroshot import ZeroshotConfig

    add_options(parser, ZeroshotConfig)


def run(args: argparse.Namespace) -> int:
    from fastcal.runs.options import settings_from_args
    from fastcal.runs.rows import format_table
    from fastcal.runs.zeroshot import ZeroshotConfig, run_zeroshot

    config = settings_from_args(args, ZeroshotConfig)
    results = run_zeroshot(config)
    print(format_table(results["rows"]))
    print(
        f"\n{len(results['figures'])} reliability diagrams, results in {config.output}/results.json; "
        f"total {results['total_seconds']:.1f} s"
    )
    return 0
