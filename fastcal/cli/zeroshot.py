"""Zero-shot accuracy and calibration of a CLIP on a dataset: the demo's zero-shot report on real data.

  fastcal zeroshot --model ViT-B-16 --pretrained openai --dataset oxford_pets --root $DATA
  fastcal zeroshot --model ViT-B-32 --pretrained /path/to/weights.safetensors --dataset imagefolder --root DIR
  fastcal zeroshot                  (the embedded testbed: --model fastcal-testbed --dataset testbed)

Reports all classes, base (first half) and new (second half) classes, each evaluated among its own
classes: accuracy, ECE (--n-bins, 15) and the rest of the calibration report, before and after
temperature scaling fitted on --calibration-size (50) base-class images of the validation split (the
train split when there is none; skipped when there is neither). Writes results.json and one reliability
diagram (PNG) per row and group to --output, and prints the table.

--templates hard uses the dataset's hand-crafted prompt (CoOp's zero-shot baseline), ensemble all of its
templates (CLIP's 80 for the ImageNet family). --pretrained takes an open_clip tag (from the local
Hugging Face cache; nothing is downloaded with HF_HUB_OFFLINE=1) or a checkpoint file.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from fastcal.cli import UsageError

TESTBED_DATASET = "testbed"
DEFAULT_OUTPUT = "fastcal-results/zeroshot"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default="fastcal-testbed", help="open_clip architecture (default: the testbed)"
    )
    parser.add_argument(
        "--pretrained",
        metavar="TAG|PATH",
        help="open_clip pretrained tag or checkpoint file (default for fastcal-testbed: its own weights)",
    )
    parser.add_argument(
        "--dataset",
        default=TESTBED_DATASET,
        help=f"a fastcal.data dataset name, or {TESTBED_DATASET!r} (the digits; default)",
    )
    parser.add_argument("--root", metavar="DIR", help="folder holding the dataset (CoOp's $DATA)")
    parser.add_argument("--templates", choices=("hard", "ensemble"), default="hard", help="default: hard")
    parser.add_argument("--output", default=DEFAULT_OUTPUT, metavar="DIR", help=f"default ./{DEFAULT_OUTPUT}")
    parser.add_argument("--calibration-size", type=int, default=50, metavar="N", help="default 50")
    parser.add_argument("--n-bins", type=int, default=15, metavar="M", help="ECE bins (default 15)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the calibration draw (default 0)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    parser.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default="fp32")
    parser.add_argument("--cache-dir", metavar="DIR", help="feature cache (default $FASTCAL_CACHE/features)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace the results the output folder holds"
    )


def check_arguments(args: argparse.Namespace) -> None:
    from fastcal._checks import check_choice, check_device, check_int
    from fastcal.data import DATASETS
    from fastcal.metrics.functional import MAX_BINS
    from fastcal.models.testbed import TESTBED_MODEL
    from fastcal.runs.folder import check_output_path, check_run_rules

    check_int("--calibration-size", args.calibration_size, minimum=1)
    check_int("--n-bins", args.n_bins, minimum=1, maximum=MAX_BINS)
    check_device("--device", args.device)
    if args.dataset != TESTBED_DATASET:
        check_choice("--dataset", args.dataset, [TESTBED_DATASET, *DATASETS])
    if args.model != TESTBED_MODEL and not args.model.startswith(("local-dir:", "hf-hub:")):
        import open_clip

        if open_clip.get_model_config(args.model.replace("/", "-")) is None:
            raise UsageError(f"--model: expected an open_clip architecture, got {args.model!r}")
    weights_in_source = args.model.startswith(("local-dir:", "hf-hub:"))
    if args.model != TESTBED_MODEL and args.pretrained is None and not weights_in_source:
        raise UsageError(
            f"--pretrained: expected an open_clip tag or a checkpoint file for {args.model!r}, got nothing "
            "(zero-shot evaluation of random weights is meaningless)"
        )
    if args.dataset != TESTBED_DATASET and args.root is None:
        raise UsageError(f"--root: expected the folder holding {args.dataset!r}, got nothing")
    output = check_output_path(args.output)
    check_run_rules(output, kind="zeroshot", resume=False, overwrite=args.overwrite, argument="--output")


def load_model(args: argparse.Namespace) -> Any:
    """The ``LoadedClip`` the arguments name (the testbed gets its own transforms)."""
    from fastcal.models import load_clip
    from fastcal.models.testbed import (
        TESTBED_MODEL,
        load_testbed_clip,
        make_testbed_transforms,
        register_testbed_config,
    )

    if args.model != TESTBED_MODEL:
        return load_clip(args.model, args.pretrained, device=args.device, precision=args.precision)
    if args.pretrained is None:
        clip = load_testbed_clip(progress=not args.quiet)
        model = clip.model.to(args.device)
        return clip._replace(model=model)
    register_testbed_config()
    clip = load_clip(TESTBED_MODEL, args.pretrained, device=args.device, precision=args.precision)
    train_transform, eval_transform = make_testbed_transforms()
    return clip._replace(train_transform=train_transform, eval_transform=eval_transform)


def load_splits(args: argparse.Namespace) -> Any:
    if args.dataset == TESTBED_DATASET:
        from fastcal.data.testbed import digits_splits

        return digits_splits()
    from fastcal.data import load_dataset

    return load_dataset(args.dataset, args.root)


def run(args: argparse.Namespace) -> int:
    from fastcal.runs.folder import RunFolder

    check_arguments(args)
    start = time.perf_counter()
    splits = load_splits(args)
    clip = load_model(args)
    with RunFolder.open(args.output, kind="zeroshot", overwrite=args.overwrite) as folder:
        return _report(args, splits, clip, folder, start)


def _report(args: argparse.Namespace, splits: Any, clip: Any, folder: Any, start: float) -> int:
    from fastcal._io import write_json_atomic
    from fastcal.cli.demo import check_row, format_table
    from fastcal.methods.zeroshot import base_new_groups, zeroshot_report
    from fastcal.metrics import reliability_diagram

    output = folder.path

    figures: list[str] = []

    def figure(stem: str, probs: Any, labels: Any, title: str) -> str:
        name = f"{stem}.png"
        reliability_diagram(probs, labels, n_bins=args.n_bins, path=output / name, title=title)
        figures.append(name)
        return name

    rows = zeroshot_report(
        clip,
        splits,
        modes=(args.templates,),
        groups=base_new_groups(splits.num_classes, include_all=True),
        calibration_size=args.calibration_size,
        n_bins=args.n_bins,
        seed=args.seed,
        cache_dir=args.cache_dir,
        progress=not args.quiet,
        figure=figure,
        section=f"zero-shot: {args.model} ({args.pretrained or 'testbed weights'}) on {splits.name}",
    )
    rows = [check_row("zeroshot", row) for row in rows]
    results = {
        "model": args.model,
        "pretrained": None if args.pretrained is None else str(args.pretrained),
        "dataset": splits.name,
        "root": None if args.root is None else str(Path(args.root).expanduser().absolute()),
        "classes": splits.num_classes,
        "test_images": len(splits.test),
        "templates": args.templates,
        "n_bins": args.n_bins,
        "calibration_size": args.calibration_size,
        "seed": args.seed,
        "rows": rows,
        "total_seconds": time.perf_counter() - start,
    }
    folder.write_manifest(
        {"model": results["model"], "pretrained": results["pretrained"], "dataset": splits.name}
    )
    write_json_atomic(output / "results.json", results)
    print(format_table(rows))
    print(
        f"\n{len(figures)} reliability diagrams, results in {output / 'results.json'}; "
        f"total {results['total_seconds']:.1f} s",
        file=sys.stdout,
    )
    return 0
