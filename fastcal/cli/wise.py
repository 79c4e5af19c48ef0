"""WiSE-FT: evaluate weight-space mixtures of the zero-shot and a fine-tuned model over an alpha sweep.

Example:
  fastcal finetune --method ft --output runs/ft
  fastcal wise --finetuned runs/ft --alpha 0:1:0.1            # writes runs/ft/wise/results.json

theta(alpha) = (1 - alpha) theta_zero_shot + alpha theta_fine_tuned (Wortsman et al., CVPR 2022), for the
run's method (FT: image tower and head; FLYP / CaRot: both towers, the head recomputed from the mixed
text tower). Every alpha is evaluated like the run itself (ID and OOD accuracy and 10-bin ECE, with and
without temperature scaling); results.json holds the sweep and, as "id" / "ood", the --select alpha
(0.5, CaRot's choice), whose reliability diagrams are drawn.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--finetuned", required=True, help="a finished `fastcal finetune` output folder")
    parser.add_argument(
        "--alpha", default="0:1:0.1", help="start:stop:step or a comma list (default 0:1:0.1)"
    )
    parser.add_argument(
        "--select", type=float, default=0.5, help="the alpha reported as id / ood (default 0.5)"
    )
    parser.add_argument("--output", default=None, help="output folder (default: FINETUNED/wise)")
    parser.add_argument("--root", default=None, help="datasets folder, if it moved since the run")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--workers", type=int, default=0, help="data-loading workers")
    parser.add_argument("--eval-batch-size", type=int, default=256)
    parser.add_argument("--no-diagrams", action="store_true", help="skip the reliability diagrams")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--overwrite", action="store_true", help="replace the sweep the output folder holds")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fastcal._checks import check_device, check_int, check_number
    from fastcal.finetune.distributed import init_distributed
    from fastcal.finetune.wise import parse_alphas
    from fastcal.runs.finetune import run_wise
    from fastcal.runs.folder import check_output_path, check_run_rules

    alphas = parse_alphas(args.alpha)
    select = check_number("--select", args.select, minimum=0.0, maximum=1.0)
    check_int("--workers", args.workers, minimum=0)
    check_int("--eval-batch-size", args.eval_batch_size, minimum=1)
    device = check_device("--device", args.device or "auto")
    output = check_output_path(args.output if args.output is not None else Path(args.finetuned) / "wise")
    check_run_rules(output, kind="wise", resume=False, overwrite=args.overwrite, argument="--output")
    context = init_distributed(device)
    progress = not args.quiet and context.is_main
    results = run_wise(
        args.finetuned,
        alphas,
        output,
        select=select,
        root=args.root,
        context=context,
        device=context.device,
        num_workers=args.workers,
        eval_batch_size=args.eval_batch_size,
        diagrams=not args.no_diagrams,
        progress=progress,
        overwrite=args.overwrite,
    )
    if context.is_main:
        print(sweep_table(results))
        print(f"results: {output}/results.json")
    return 0


def sweep_table(results: dict) -> str:
    """alpha | ID acc, ECE | OOD (mean) acc, ECE, one row per alpha."""
    lines = [f"{'alpha':>6} {'ID acc':>7} {'ID ECE':>7} {'OOD acc':>8} {'OOD ECE':>8}"]
    for entry in results["sweep"]:
        ood = entry["ood"].get("mean")
        ood_text = f"{ood['accuracy']:8.4f} {ood['ece']:8.4f}" if ood else f"{'-':>8} {'-':>8}"
        lines.append(
            f"{entry['alpha']:6.2f} {entry['id']['accuracy']:7.4f} {entry['id']['ece']:7.4f} {ood_text}"
        )
    return "\n".join(lines)
