"""Evaluate a saved prompt (a `fastcal train` run) on new classes, other datasets and shifted domains.

  fastcal eval --run RUN_DIR                                  # the run's dataset: base and new classes
  fastcal eval --run RUN_DIR --targets cross --root DIR       # CoCoOp's cross-dataset transfer
  fastcal eval --run RUN_DIR --targets domain --root DIR      # ImageNet -> V2, Sketch, A, R
  fastcal eval --run RUN_DIR --targets dtd,eurosat --root DIR

A run on the embedded testbed is evaluated on the testbed's base and new classes and on their
style-shifted images (targets testbed, testbed_shifted). The training dataset is evaluated per class
group (base, new; HM), other datasets on all their classes (--groups overrides). Writes eval.json and
reliability diagrams to --output (default: the run folder).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fastcal.cli import UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from fastcal.runs.train.transfer import GROUP_CHOICES

    parser.add_argument(
        "--run",
        dest="run_dir",
        required=True,
        metavar="DIR",
        help="a fastcal train output folder (or its prompt.pt)",
    )
    parser.add_argument(
        "--targets",
        metavar="NAMES",
        help="cross, domain, or comma-separated dataset names (testbed, testbed_shifted on the testbed); "
        "default: the run's dataset",
    )
    parser.add_argument("--root", metavar="DIR", help="the folder holding the target datasets")
    parser.add_argument(
        "--groups",
        default="auto",
        choices=GROUP_CHOICES,
        help="class groups (auto: base and new for the training dataset, all classes for others)",
    )
    parser.add_argument(
        "--output", metavar="DIR", help="where eval.json and the diagrams go (default: --run)"
    )
    parser.add_argument("--n-bins", type=int, default=15, help="ECE bins (15)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace the evaluation a separate --output folder holds"
    )


def target_names(spec: str | None, trained_on: str | None) -> list[str]:
    """Dataset names of ``--targets`` (``cross``, ``domain``, a list; default: the training dataset)."""
    from fastcal.data.protocols import CROSS_DATASET_TARGETS, DOMAIN_GENERALIZATION_TARGETS
    from fastcal.runs.train.transfer import TESTBED_TARGETS

    if spec is None:
        return list(TESTBED_TARGETS) if trained_on is None else [trained_on]
    if spec == "cross":
        return list(CROSS_DATASET_TARGETS)
    if spec == "domain":
        return list(DOMAIN_GENERALIZATION_TARGETS)
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        raise UsageError(f"--targets: expected cross, domain or dataset names, got {spec!r}")
    return names


def run(args: argparse.Namespace) -> int:
    from fastcal._checks import check_device, check_int
    from fastcal._io import write_json_atomic
    from fastcal.data import DATASETS, load_dataset
    from fastcal.metrics.functional import MAX_BINS
    from fastcal.runs.folder import RunFolder, check_output_path
    from fastcal.runs.train.loop import prompt_metadata
    from fastcal.runs.train.transfer import TESTBED_TARGETS, evaluate_saved_prompt, testbed_target

    check_int("--n-bins", args.n_bins, minimum=1, maximum=MAX_BINS)
    check_int("--batch-size", args.batch_size, minimum=1)
    device = check_device("--device", args.device)
    run_dir = Path(args.run_dir)
    if not run_dir.exists():
        raise FileNotFoundError(
            f"--run: expected a fastcal train run folder or its prompt.pt, got {run_dir}, not found"
        )
    metadata = prompt_metadata(args.run_dir, what="--run")
    config = metadata["config"]
    trained_on = config.get("dataset")
    targets = []
    for name in target_names(args.targets, trained_on):
        if name in TESTBED_TARGETS:
            splits = testbed_target(name)
        elif name in DATASETS:
            root = args.root or (config.get("root") if name == trained_on else None)
            if root is None:
                raise UsageError(f"--root: expected the folder holding {name}, got none")
            splits = load_dataset(name, root)
        else:
            known = ", ".join([*TESTBED_TARGETS, *DATASETS])
            raise UsageError(f"--targets: expected names among {known}, got {name!r}")
        own = name == trained_on or (trained_on is None and name in TESTBED_TARGETS)
        groups = args.groups if args.groups != "auto" else ("base_new" if own else "all")
        targets.append((name, splits, groups))
    own_folder = run_dir if run_dir.is_dir() else run_dir.parent
    output = check_output_path(args.output) if args.output else own_folder
    if output.resolve() == own_folder.resolve():  # eval.json joins the training run's folder
        folder = RunFolder.open(output, kind="train", resume=True, argument="--run", resume_argument="--run")
    else:
        folder = RunFolder.open(output, kind="eval", overwrite=args.overwrite)
    with folder:
        results = evaluate_saved_prompt(
            args.run_dir,
            targets,
            output=output,
            n_bins=args.n_bins,
            batch_size=args.batch_size,
            device=device,
            cache_dir=config.get("cache_dir"),
            progress=not args.quiet,
        )
        if folder.kind == "eval":
            folder.write_manifest({"run": str(own_folder.absolute()), "targets": [t[0] for t in targets]})
        write_json_atomic(output / "eval.json", results)
    for name, reports in results["targets"].items():
        for group, report in reports.items():
            if group == "hm":
                print(f"{name:>16} {'HM':>5}: accuracy {100 * report['accuracy']:.2f}")
            else:
                print(
                    f"{name:>16} {group:>5}: accuracy {100 * report['accuracy']:.2f}  "
                    f"ECE({report['n_bins']} bins) {100 * report['ece']:.2f}"
                )
    print(f"results in {output / 'eval.json'}")
    return 0
