"""Test-time prompt tuning (TPT, C-TPT; FPP initialization) and its baselines, resumable and sharded.

Examples:
  fastcal tpt --output runs/tpt                                       # the testbed's new classes
  fastcal tpt --method ctpt --dataset imagenet_a --root $DATA --output runs/ctpt-a
  fastcal tpt --method ctpt --init fpp --dataset oxford_pets --root $DATA --output runs/fpp-pets
  torchrun --nproc_per_node 4 -m fastcal tpt --method tpt --dataset imagenet_r --root $DATA \\
      --output runs/tpt-r --samples-per-step 8
  fastcal tpt ... --resume                                            # after a crash or a kill

Methods: tpt (Shu et al. 2022), ctpt (C-TPT: loss - lambda * ATFD; lambda 50 on fine-grained sets, 20 on
the ImageNet variants), otpt (O-TPT: loss + lambda * orthogonality penalty; 18 on the fine-grained sets
and ImageNet, 2 on its variants), and the baselines zeroshot (hard prompt "a photo of a {}.") and
ensemble (the dataset's templates). --init fpp pretrains the context data-free first (FPP, 1,000 steps,
cached in the output folder; flatness weight 1 + 15/C on the fine-grained sets, 1.25 on the ImageNet
variants as their scripts use, and 1.25 on the testbed, whose 5 classes would give 4, far outside the
formula's range); --init ensemble tunes one context per template of the dataset, their features
averaged (C-TPT's "Ensemble" initialization).
--temperature T divides the final logits by T (TPT + temperature scaling; C-TPT's baseline uses 1.16 for
ViT); --temperature fit fits T on the dataset's validation (else train) images. AugMix is on for the
fine-grained sets and the testbed, and on the ImageNet variants for ctpt and fpp (as their reference
scripts run them); --augmix / --no-augmix overrides.

Writes run.json, records.jsonl (one line per sample with its logits, fsync'ed in batches), results.json
(accuracy, ECE with 15 and 20 bins and the full reports), predictions/<dataset>.npz and reliability
diagrams; under torchrun each rank takes its shard and rank 0 merges. Without --dataset: the embedded
testbed's new classes (digits five..nine) with the pretrained testbed CLIP (flips off: a mirrored digit
is another glyph).
"""

from __future__ import annotations

import argparse
import os


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from fastcal.runs.options import add_options
    from fastcal.runs.tpt import TptConfig

    add_options(parser, TptConfig, title="settings (unset: the method's recipe for the dataset)")


def run(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    from fastcal.cli import UsageError
    from fastcal.runs.options import settings_from_args
    from fastcal.runs.tpt import TptConfig, run_tpt

    config = settings_from_args(args, TptConfig)
    if config.output is None:
        raise UsageError("--output: expected a run folder, got none")
    try:
        results = run_tpt(config)
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(
                f"{results['method']} on {results['dataset']} ({results['num_samples']} samples): "
                f"accuracy {100 * results['accuracy']:.2f}%, ECE {100 * results['ece_15']:.2f}% (15 bins), "
                f"{100 * results['ece_20']:.2f}% (20 bins), T = {results['temperature']:.3f}; "
                f"results in {os.path.join(config.output, 'results.json')}"
            )
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0
