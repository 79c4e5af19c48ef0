"""Robust fine-tuning of CLIP (FT, FLYP, CaRot) with ID / OOD accuracy and calibration.

Examples:
  fastcal finetune --method carot --output runs/carot                  # the embedded digits testbed
  fastcal finetune --method flyp --dataset imagenet --root $DATA --output runs/flyp
  torchrun --nproc_per_node 8 -m fastcal finetune --method carot --dataset imagenet --root $DATA \\
      --output runs/carot --precision bf16

Without --dataset the run uses the embedded testbed: the testbed CLIP fine-tuned on the digits of the
base classes 0-4; ID = their test images, OOD = the same images style-shifted (sheared and
tinted). With a dataset, the published recipe is the default (AdamW, lr 1e-5, or 3e-5 for FT, weight decay
0.1, global batch 512, 10 epochs, cosine after 500 warm-up steps, ViT-B/16); ImageNet is evaluated on
ImageNet-V2, -R, -A, -Sketch and ObjectNet where present under --root. ECE uses 10 bins, with and
without temperature scaling fitted on held-out ID images. The output folder gets results.json
({"id", "ood", "config"}), model.safetensors (head.safetensors for FT), checkpoint.safetensors,
train_log.jsonl and reliability diagrams; --resume continues from the checkpoint, exactly.
"""

from __future__ import annotations

import argparse

METHOD_CHOICES = ("ft", "flyp", "carot")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", required=True, choices=METHOD_CHOICES, help="fine-tuning method")
    parser.add_argument(
        "--dataset", default=None, help="a fastcal dataset name (default: the embedded testbed)"
    )
    parser.add_argument("--root", default=None, help="folder holding the datasets (required with --dataset)")
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument("--ood", default=None, help="comma-separated OOD datasets (default: the dataset's)")
    parser.add_argument(
        "--heldout", type=int, default=None, help="held-out train images for temperature scaling"
    )
    parser.add_argument(
        "--model", default=None, help="open_clip architecture (default: ViT-B-16, or the testbed's)"
    )
    parser.add_argument(
        "--pretrained",
        default=None,
        help="pretrained tag or checkpoint file; 'none' for random init (default: openai)",
    )
    group = parser.add_argument_group(
        "hyperparameters (default: the published recipe, or the testbed's short one)"
    )
    group.add_argument("--lr", type=float, default=None, help="peak learning rate")
    group.add_argument("--weight-decay", type=float, default=None)
    group.add_argument("--batch-size", type=int, default=None, help="global batch over all processes")
    group.add_argument("--epochs", type=int, default=None)
    group.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    group.add_argument("--warmup-steps", type=int, default=None)
    group.add_argument("--label-smoothing", type=float, default=None)
    group.add_argument("--grad-clip", type=float, default=None, help="clip the gradient norm")
    group.add_argument(
        "--distill-weight", type=float, default=None, help="CaRot lambda (paper normalization)"
    )
    group.add_argument("--teacher-update-every", type=int, default=None, help="CaRot EMA interval (steps)")
    group.add_argument("--cross-modal-weight", type=float, default=None, help="CaRot ||W_v W_t^T||_F weight")
    group.add_argument(
        "--orthogonality-weight", type=float, default=None, help="CaRot ||W_v^T W_v - I||_F weight"
    )
    group.add_argument("--seed", type=int, default=None)
    run = parser.add_argument_group("running")
    run.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default=None, help="autocast precision")
    run.add_argument(
        "--grad-checkpointing", action="store_true", help="recompute blocks in the backward pass"
    )
    run.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    run.add_argument(
        "--workers", type=int, default=None, help="data-loading workers (default 8, 0 on the testbed)"
    )
    run.add_argument("--eval-batch-size", type=int, default=256)
    run.add_argument("--checkpoint-every", type=int, default=1000, help="steps between checkpoints")
    run.add_argument("--log-every", type=int, default=50, help="steps between log lines")
    run.add_argument("--resume", action="store_true", help="continue from the output folder's checkpoint")
    run.add_argument(
        "--overwrite", action="store_true", help="replace the run --output holds (its files are removed)"
    )
    run.add_argument("--no-diagrams", action="store_true", help="skip the reliability diagrams")
    run.add_argument("--quiet", action="store_true", help="no progress bars")


def config_from_args(args: argparse.Namespace):
    """The ``FinetuneConfig`` of the command line: the preset of the method and data, then the flags."""
    from fastcal.finetune.config import published_config, testbed_config

    base = testbed_config(args.method) if args.dataset is None else published_config(args.method)
    return base.replace(
        learning_rate=args.lr,
        weight_decay=args.weight_decay,
        batch_size=args.batch_size,
        epochs=args.epochs,
        max_steps=args.max_steps,
        warmup_steps=args.warmup_steps,
        label_smoothing=args.label_smoothing,
        grad_clip_norm=args.grad_clip,
        distill_weight=args.distill_weight,
        teacher_update_every=args.teacher_update_every,
        cross_modal_weight=args.cross_modal_weight,
        orthogonality_weight=args.orthogonality_weight,
        seed=args.seed,
        precision=args.precision,
        grad_checkpointing=True if args.grad_checkpointing else None,
    )


def check_arguments(args: argparse.Namespace) -> None:
    """The checks that need no model and no data, made before anything is loaded or written."""
    from fastcal._checks import check_choice, check_int
    from fastcal.data import DATASETS
    from fastcal.finetune.experiment import TESTBED_MODEL
    from fastcal.runs.folder import check_output_path, check_run_rules

    if args.dataset is not None:
        check_choice("--dataset", args.dataset, DATASETS)
    for option in ("eval_batch_size", "checkpoint_every", "log_every"):
        check_int(f"--{option.replace('_', '-')}", getattr(args, option), minimum=1)
    if args.workers is not None:
        check_int("--workers", args.workers, minimum=0)
    if args.heldout is not None:
        check_int("--heldout", args.heldout, minimum=1)
    if args.model not in (None, TESTBED_MODEL) and not args.model.startswith(("local-dir:", "hf-hub:")):
        import open_clip

        if open_clip.get_model_config(args.model.replace("/", "-")) is None:
            raise ValueError(
                f"--model: expected an open_clip architecture or {TESTBED_MODEL!r}, got {args.model!r}"
            )
    output = check_output_path(args.output)
    rules = {"kind": "finetune", "resume": args.resume, "overwrite": args.overwrite, "argument": "--output"}
    check_run_rules(output, **rules)


def backbone_choice(args: argparse.Namespace) -> tuple[str, str | None]:
    """(model, pretrained) of the command line, with the defaults of the testbed or the published run."""
    from fastcal.finetune.config import PUBLISHED_MODEL
    from fastcal.finetune.experiment import TESTBED_MODEL

    if args.model is None:
        model, pretrained = (TESTBED_MODEL, None) if args.dataset is None else PUBLISHED_MODEL
    else:
        model, pretrained = args.model, None
    if args.pretrained is not None:
        pretrained = args.pretrained
    return model, pretrained


def run(args: argparse.Namespace) -> int:
    from fastcal._checks import check_device
    from fastcal.cli import UsageError
    from fastcal.finetune.distributed import init_distributed
    from fastcal.finetune.experiment import dataset_data, load_backbone, run_finetune, testbed_data

    if args.dataset is not None and args.root is None:
        raise UsageError("--root is required with --dataset")
    if args.dataset is None and (args.root is not None or args.ood is not None or args.heldout is not None):
        raise UsageError("--root, --ood and --heldout need --dataset (the testbed brings its own data)")
    config = config_from_args(args)
    check_arguments(args)
    context = init_distributed(check_device("--device", args.device or "auto"))
    progress = not args.quiet and context.is_main
    if args.dataset is None:
        data = testbed_data()
    else:
        ood = None if args.ood is None else [name.strip() for name in args.ood.split(",") if name.strip()]
        data = dataset_data(args.dataset, args.root, ood=ood, heldout=args.heldout, seed=config.seed)
    model_name, pretrained = backbone_choice(args)
    backbone = load_backbone(
        model_name, pretrained, device=context.device, seed=config.seed, progress=progress
    )
    workers = args.workers if args.workers is not None else (0 if args.dataset is None else 8)
    results = run_finetune(
        config,
        data,
        backbone,
        args.output,
        model_name=model_name,
        pretrained=pretrained,
        context=context,
        resume=args.resume,
        overwrite=args.overwrite,
        num_workers=workers,
        eval_batch_size=args.eval_batch_size,
        checkpoint_every=args.checkpoint_every,
        log_every=args.log_every,
        diagrams=not args.no_diagrams,
        progress=progress,
    )
    if context.is_main:
        print(summary_table(config.method.upper(), results))
        print(f"results: {args.output}/results.json")
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
