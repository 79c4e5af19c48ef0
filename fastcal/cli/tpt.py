"""Test-time prompt tuning (TPT, C-TPT; FPP initialization) and its baselines, resumable and sharded.

Examples:
  fastcal tpt --output runs/tpt                                       # the testbed's new classes
  fastcal tpt --method ctpt --dataset imagenet_a --root $DATA --output runs/ctpt-a
  fastcal tpt --method ctpt --init fpp --dataset oxford_pets --root $DATA --output runs/fpp-pets
  torchrun --nproc_per_node 4 -m fastcal tpt --method tpt --dataset imagenet_r --root $DATA \\
      --output runs/tpt-r --samples-per-step 8
  fastcal tpt ... --resume                                            # after a crash or a kill

Methods: tpt (Shu et al. 2022), ctpt (loss - lambda * ATFD; lambda 50 on fine-grained sets, 20 on the
ImageNet variants), and the baselines zeroshot (hard prompt "a photo of a {}.") and ensemble (the
dataset's templates). --init fpp pretrains the context data-free first (FPP, 1,000 steps, cached in the
output folder; flatness weight 1 + 15/C on the fine-grained sets, 1.25 on the ImageNet variants as their
scripts use, and 1.25 on the testbed, whose 5 classes would give 4, far outside the formula's range).
--temperature T divides the final logits by T (TPT + temperature scaling; C-TPT's
baseline uses 1.16 for ViT); --temperature fit fits T on the dataset's validation (else train) images.
AugMix is on for the fine-grained sets and the testbed, and on the ImageNet variants for ctpt and fpp
(as their reference scripts run them); --augmix / --no-augmix overrides.

Writes records.jsonl (one line per sample, fsync'ed in batches), results.json (accuracy, ECE with 15 and
20 bins and the full reports) and reliability diagrams; under torchrun each rank takes its shard and
rank 0 merges. Without --dataset: the embedded testbed's new classes (digits five..nine) with the
pretrained testbed CLIP (flips off: a mirrored digit is another glyph).
"""

from __future__ import annotations

import argparse
import os

from fastcal.cli import UsageError

DEFAULT_MODEL = ("ViT-B-16", "openai")
TESTBED = "testbed"
RANDOM_INIT_SEED = 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", default="tpt", choices=("tpt", "ctpt", "zeroshot", "ensemble"))
    parser.add_argument(
        "--init", default="hard", choices=("hard", "fpp"), help="initial context (default hard)"
    )
    parser.add_argument(
        "--dataset", default=None, help="a fastcal dataset name (default: the embedded testbed)"
    )
    parser.add_argument("--root", default=None, help="folder holding the datasets (required with --dataset)")
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument("--model", default=None, help="open_clip architecture (default ViT-B-16; 'testbed')")
    parser.add_argument(
        "--pretrained", default=None, help="tag or checkpoint file; 'none' = random init (default openai)"
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue the run in --output, skipping finished samples"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace the run --output holds (its files are removed)"
    )
    tuning = parser.add_argument_group("tuning (defaults: the reference's)")
    tuning.add_argument("--views", type=int, default=64, help="views per sample, centre view included (64)")
    tuning.add_argument("--selection", type=float, default=0.1, help="fraction of confident views kept (0.1)")
    tuning.add_argument("--steps", type=int, default=1, help="AdamW steps per sample (1)")
    tuning.add_argument("--lr", type=float, default=5e-3, help="AdamW learning rate (5e-3)")
    tuning.add_argument("--lambda", dest="dispersion_weight", type=float, default=None, help="C-TPT's lambda")
    tuning.add_argument("--ctx-init", default="a photo of a", help="initial context phrase")
    tuning.add_argument(
        "--augmix", action=argparse.BooleanOptionalAction, default=None, help="AugMix on the views"
    )
    tuning.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None, help="random flips")
    tuning.add_argument("--fpp-steps", type=int, default=1000, help="FPP pretraining steps (1000)")
    tuning.add_argument(
        "--fpp-weight",
        type=float,
        default=None,
        help="FPP flatness weight w (default 1 + 15/C; 1.25 on the ImageNet variants and the testbed)",
    )
    tuning.add_argument(
        "--temperature", default=None, help="a fixed temperature T, or 'fit' (calibration set)"
    )
    tuning.add_argument("--calibration-size", type=int, default=500, help="images to fit T on (500)")
    tuning.add_argument("--seed", type=int, default=0, help="seeds the views (with each sample's index)")
    running = parser.add_argument_group("running")
    running.add_argument("--samples-per-step", type=int, default=1, help="samples tuned together (1)")
    running.add_argument(
        "--limit", type=int, default=None, help="evaluate a seeded random subset of this size"
    )
    running.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    running.add_argument(
        "--precision", choices=("fp32", "fp16", "bf16"), default="fp32", help="model weights"
    )
    running.add_argument("--eager", action="store_true", help="no CUDA graph (run the step eagerly)")
    running.add_argument(
        "--workers", type=int, default=None, help="decoding processes (default 4; 0 on the testbed)"
    )
    running.add_argument("--flush-every", type=int, default=16, help="records per fsync'ed append (16)")
    running.add_argument("--quiet", action="store_true", help="no progress bar")


def _init_distributed(device_arg: str | None):
    import torch
    import torch.distributed as dist

    from fastcal._checks import check_device

    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = check_device("--device", device_arg or "auto").type == "cuda"
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return device, world


def _load_model(args: argparse.Namespace, device):
    import torch

    if args.model == TESTBED or (args.model is None and args.dataset is None):
        from fastcal.models.testbed import load_testbed_clip

        if args.pretrained == "none":
            import open_clip

            from fastcal.models.clip import LoadedClip
            from fastcal.models.testbed import TESTBED_MODEL, build_testbed_model

            with torch.random.fork_rng(devices=[]):
                torch.random.default_generator.manual_seed(RANDOM_INIT_SEED)
                model = build_testbed_model().eval()
            # the runner makes its own views: no transforms needed
            clip = LoadedClip(model, open_clip.get_tokenizer(TESTBED_MODEL), None, None)
        elif args.pretrained is not None:
            raise UsageError("--pretrained: expected 'none' or nothing with the testbed model")
        else:
            clip = load_testbed_clip(progress=not args.quiet)
        clip.model.to(device)
        return clip
    from fastcal.models import load_clip

    name = args.model or DEFAULT_MODEL[0]
    pretrained = (
        args.pretrained if args.pretrained is not None else (DEFAULT_MODEL[1] if args.model is None else None)
    )
    if pretrained != "none":
        return load_clip(name, pretrained, device=device, precision=args.precision)
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(
            RANDOM_INIT_SEED
        )  # every rank and every resumed run builds the same weights
        return load_clip(name, None, device=device, precision=args.precision)


def _task(args: argparse.Namespace):
    from fastcal.tpt.runner import Task, subset_task, testbed_task

    if args.dataset is None:
        if args.root is not None:
            raise UsageError("--root needs --dataset (the testbed brings its own data)")
        return testbed_task(limit=args.limit, seed=args.seed)
    if args.root is None:
        raise UsageError("--root is required with --dataset")
    from fastcal.data import load_dataset

    splits = load_dataset(args.dataset, args.root)
    calibration = splits.val or splits.train
    task = Task(
        splits.name, list(splits.classnames), list(splits.templates), list(splits.test), list(calibration)
    )
    return subset_task(task, args.limit, args.seed)


def config_from_args(args: argparse.Namespace):
    """The runner's ``RunConfig`` for the command line (defaults per method and dataset, then the flags)."""
    from fastcal.tpt.ctpt import IMAGENET_FAMILY, default_lambda
    from fastcal.tpt.fpp import FPP_SHIFT_WEIGHT, FPPConfig
    from fastcal.tpt.runner import RunConfig
    from fastcal.tpt.step import TuningConfig

    imagenet = args.dataset in IMAGENET_FAMILY
    augmix = args.augmix
    if augmix is None:
        augmix = not imagenet or args.method == "ctpt" or args.init == "fpp"
    flip = args.flip if args.flip is not None else args.dataset is not None
    weight = 0.0
    if args.method == "ctpt":
        weight = (
            args.dispersion_weight if args.dispersion_weight is not None else default_lambda(args.dataset)
        )
    elif args.dispersion_weight is not None:
        raise UsageError("--lambda: expected only with --method ctpt")
    temperature, fit = None, False
    if args.temperature == "fit":
        fit = True
    elif args.temperature is not None:
        try:
            temperature = float(args.temperature)
        except ValueError:
            raise UsageError(f"--temperature: expected a number or 'fit', got {args.temperature!r}") from None
    workers = args.workers if args.workers is not None else (0 if args.dataset is None else 4)
    fpp_weight = args.fpp_weight
    if fpp_weight is None and (imagenet or args.dataset is None):
        fpp_weight = FPP_SHIFT_WEIGHT  # 1 + 15/C is for the fine-grained sets (C >= 10: w <= 2.5)
    return RunConfig(
        method=args.method,
        init=args.init,
        tuning=TuningConfig(
            n_views=args.views,
            selection=args.selection,
            steps=args.steps,
            lr=args.lr,
            dispersion_weight=weight,
        ),
        fpp=FPPConfig(steps=args.fpp_steps, flatness_weight=fpp_weight),
        augmix=bool(augmix),
        flip=bool(flip),
        ctx_init=args.ctx_init,
        seed=args.seed,
        temperature=temperature,
        fit_temperature=fit,
        samples_per_step=args.samples_per_step,
        flush_every=args.flush_every,
        num_workers=workers,
    )


def check_arguments(args: argparse.Namespace) -> None:
    """The checks that need no model and no data, made before anything is loaded or written."""
    from fastcal._checks import check_choice, check_int
    from fastcal.data import DATASETS
    from fastcal.runs.folder import check_output_path, check_run_rules

    if args.limit is not None:
        check_int("--limit", args.limit, minimum=1)
    for option in ("calibration_size", "fpp_steps", "flush_every", "samples_per_step"):
        check_int(f"--{option.replace('_', '-')}", getattr(args, option), minimum=1)
    if args.workers is not None:
        check_int("--workers", args.workers, minimum=0)
    if args.dataset is not None:
        check_choice("--dataset", args.dataset, DATASETS)
    if args.model not in (None, TESTBED):
        import open_clip

        if open_clip.get_model_config(args.model.replace("/", "-")) is None and not args.model.startswith(
            ("local-dir:", "hf-hub:")
        ):
            raise UsageError(
                f"--model: expected an open_clip architecture or {TESTBED!r}, got {args.model!r}"
            )
    output = check_output_path(args.output)
    rules = {"kind": "tpt", "resume": args.resume, "overwrite": args.overwrite, "argument": "--output"}
    check_run_rules(output, **rules)


def run(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    from fastcal.tpt import runner

    config = config_from_args(args)
    check_arguments(args)
    device, _ = _init_distributed(args.device)
    try:
        task = _task(args)
        if config.fit_temperature:
            task = runner.subset_calibration(task, args.calibration_size, args.seed)
        clip = _load_model(args, device)
        results = runner.run(
            clip,
            task,
            config,
            args.output,
            resume=args.resume,
            overwrite=args.overwrite,
            use_graph=False if args.eager else None,
            progress=not args.quiet,
        )
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(
                f"{results['method']} on {results['dataset']} ({results['num_samples']} samples): "
                f"accuracy {100 * results['accuracy']:.2f}%, ECE {100 * results['ece_15']:.2f}% (15 bins), "
                f"{100 * results['ece_20']:.2f}% (20 bins), T = {results['temperature']:.3f}; "
                f"results in {os.path.join(args.output, 'results.json')}"
            )
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0
