"""Bench: one CaRot step vs one FLYP step (random-init ViT-B-32, CPU), and the EMA update.

Step: ``fastcal.finetune.trainer.Finetuner.train_step`` on a batch of 64 random 224 x 224 images with
captions "a photo of a {class}." over ImageNet class names (so the text lengths are realistic): FLYP =
student forward (both towers), contrastive loss, backward, AdamW; CaRot = the same plus the EMA
teacher's forward (no gradient) and the distillation loss. The teacher update (every 500 steps in CaRot)
is kept out of the timed steps and timed on its own: ``torch._foreach_lerp_`` over all parameters
(``fastcal.finetune.ema.ema_update_``) vs the per-tensor loop of the reference code (``mul_`` +
``add_``), the two in alternating rounds. Median of repeats after a warm-up; results to
bench/results/finetune_step.json.

    .venv/bin/python bench/finetune_step.py              # batch 64, 3 repeats
    .venv/bin/python bench/finetune_step.py --quick      # batch 16, 1 repeat
    .venv/bin/python bench/finetune_step.py --threads 1  # steadier on a shared machine
"""

from __future__ import annotations

import argparse
import sys

import harness
import torch

MODEL = "ViT-B-32"


def make_batch(tokenizer, batch: int, image_size: int, seed: int = 0):
    from fastcal.data.imagenet import imagenet_classnames

    generator = torch.Generator().manual_seed(seed)
    names = imagenet_classnames()
    labels = torch.randint(len(names), (batch,), generator=generator)
    images = torch.randn(batch, 3, image_size, image_size, generator=generator)
    texts = tokenizer([f"a photo of a {names[i]}." for i in labels.tolist()])
    return images, labels, texts


def build(method: str, steps: int):
    from fastcal.finetune.carot import CarotMethod
    from fastcal.finetune.config import published_config
    from fastcal.finetune.flyp import FlypMethod
    from fastcal.finetune.trainer import Finetuner
    from fastcal.models import load_clip

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        clip = load_clip(MODEL)
    config = published_config(method).replace(warmup_steps=1)
    if method == "flyp":
        trainer_method = FlypMethod(clip.model)
    else:
        # teacher updates only after step 0 (the warm-up step) within the timed window
        trainer_method = CarotMethod(clip.model, teacher_update_every=10_000)
    return clip, Finetuner(trainer_method, config, total_steps=steps)


def time_steps(finetuner, batch, repeats: int) -> harness.Runs:
    """A warm-up step (allocations, the first teacher update for CaRot), then ``repeats`` timed steps."""
    return harness.repeated(lambda: float(finetuner.train_step(batch)["loss"]), repeats)


def time_ema(model, repeats: int) -> dict[str, float]:
    from fastcal.finetune.ema import ema_update_, ema_update_loop_

    student = [p.detach() for p in model.parameters()]
    teacher = [p.clone() for p in student]
    runs = harness.interleaved(
        {
            "loop": lambda: ema_update_loop_(teacher, student, 0.9),
            "foreach": lambda: ema_update_(teacher, student, 0.9),
        },
        repeats,
    )
    result = {name: run.median["wall"] for name, run in runs.items()}
    result["tensors"] = len(student)
    result["parameters"] = sum(t.numel() for t in student)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch 16, 1 repeat")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default 64, 16 with --quick)")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per method (default 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = parser.parse_args()
    env = harness.start(args.threads)
    batch_size = args.batch or (16 if args.quick else 64)
    repeats = args.repeats or (1 if args.quick else 3)

    rows = {}
    for method in ("flyp", "carot"):
        clip, finetuner = build(method, steps=repeats + 2)
        image_size = clip.model.visual.image_size[0]
        batch = make_batch(clip.tokenizer, batch_size, image_size)
        runs = time_steps(finetuner, batch, repeats)
        rows[method] = {"median_s": runs.median["wall"], "times_s": runs.seconds["wall"]}
        if method == "carot":
            ema = time_ema(clip.model, max(repeats, 3))
        del clip, finetuner

    overhead = rows["carot"]["median_s"] / rows["flyp"]["median_s"]
    ema_ratio = ema["loop"] / ema["foreach"]
    print(f"{MODEL} random init, batch {batch_size}, CPU")
    print(f"{'step':<34} {'median s':>10}")
    print(f"{'FLYP (student fwd/bwd, AdamW)':<34} {rows['flyp']['median_s']:10.3f}")
    print(f"{'CaRot (+ teacher fwd, distill.)':<34} {rows['carot']['median_s']:10.3f}")
    print(f"CaRot / FLYP step time: {overhead:.3f}x (on paper ~1.33x: one extra forward of a fwd+bwd of ~3)")
    print()
    print(f"EMA update over {ema['tensors']} tensors, {ema['parameters'] / 1e6:.1f}M parameters")
    print(f"{'update':<34} {'median ms':>10}")
    print(f"{'loop (mul_ + add_, reference)':<34} {1e3 * ema['loop']:10.2f}")
    print(f"{'foreach (_foreach_lerp_)':<34} {1e3 * ema['foreach']:10.2f}")
    print(f"loop / foreach: {ema_ratio:.2f}x (issue: no numeric target)")
    harness.write_results(
        "finetune_step",
        {
            "model": MODEL,
            "batch": batch_size,
            "repeats": repeats,
            "steps": rows,
            "carot_over_flyp": overhead,
            "ema": ema,
            "ema_loop_over_foreach": ema_ratio,
        },
        env,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
