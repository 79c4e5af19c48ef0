"""Bench: one CoOp training step with TCPT's calibrated loss, the reference way vs fastcal's.

Shape: random-init ViT-B-16 (image tower 12 x 768 at 224 px, text tower 12 x 512 with 77 positions),
a batch of 32, CoOp's default 16-token random context (unified, class token at the end), SGD on the
context. Classes: Caltech101's shape by default (100 classes; the names are the first 100 of open_clip's
ImageNet class names, for realistic token lengths), ImageNet's with ``--full`` (all 1,000 names), or the
first ``--classes N``.

Variants, one step = forward + loss + backward + SGD step:

- reference: as CoOp / TCPT's code runs it (KaiyangZhou/CoOp ``trainers/coop.py``; ashshaksharifdeen/TCPT
  ``trainers/coop.py``, ``trainers/regularizers.py``): the image encoder on the batch's images every step
  (no gradient reaches it), prompts built as ``cat(prefix, ctx, suffix)`` at 77 positions and CLIP's
  full text forward, and the loss as separate eager calls: cross-entropy, ``margin_mean_var`` (clone the
  logits, fill the targets with -inf, max; alpha 0.1, beta 0.01) and ``text_moment_matching`` (mean gap +
  D x D covariance gap, weight 5);
- cached + 77 tokens (ablation): the same text side and loss, image features read from the cache;
- fastcal: ``fastcal.methods.coop.CoOp`` on cached image features (the trainer's path), the start token
  and context computed once for all classes (``fastcal.methods.prefix.PackedPrompts``, exact) and the
  fused ``CalibratedPromptLoss`` (``backend="auto"``: the native C++ kernel on CPU) through
  ``fastcal.methods.objectives.CalibratedLoss``;
- fastcal, whole prompts (ablation): the same with every class prompt run whole through the exact
  truncated, length-bucketed text encoder (``PromptLearner`` over ``TextEncoder``).

Each variant runs in a fresh subprocess (one model in memory at a time; a variant the kernel kills for
memory is reported as such) with glibc's mmap threshold at 64 KiB (freed tensors go back to the kernel):
a warm-up step, then the timed steps. Time: the median, on the wall clock and in the process's CPU time
(all threads; steadier when other processes share the cores). Peak memory: VmHWM during the timed steps
minus VmRSS before them (high-water mark reset through /proc/self/clear_refs after the warm-up). Target
(this CPU): fastcal >= 4x the reference. Results: bench/results/coop_step.json.

    .venv/bin/python bench/coop_step.py                # 100 classes, 3 rounds
    .venv/bin/python bench/coop_step.py --full         # 1,000 classes (the reference needs > 24 GB)
    .venv/bin/python bench/coop_step.py --classes 500  # any other class count
    .venv/bin/python bench/coop_step.py --quick        # 1 timed step per variant
    .venv/bin/python bench/coop_step.py --threads 1    # steadier ratios on a shared machine
"""

from __future__ import annotations

import argparse
import statistics

import harness
import torch
import torch.nn.functional as F

TARGET = 4.0
VARIANTS = ("reference", "cached_77", "fastcal_unpacked", "fastcal")
LABELS = {
    "reference": "reference (image encoder, 77 tokens, eager loss)",
    "cached_77": "cached features, 77 tokens, eager loss",
    "fastcal_unpacked": "fastcal, each prompt whole (truncated, bucketed)",
    "fastcal": "fastcal (cached, shared prefix once, fused loss)",
}
MODEL = "ViT-B-16"
BATCH = 32
N_CTX = 16
LR = 0.002
MARGIN_ALPHA, MARGIN_BETA, MOMENT_WEIGHT = 0.1, 0.01, 5.0


# ---- the reference, as the published code runs it --------------------------------------------------
class ReferencePromptLearner(torch.nn.Module):
    """CoOp's prompt learner: frozen prefix / suffix embeddings at 77 positions around ``ctx``."""

    def __init__(self, model, tokenizer, classnames):
        super().__init__()
        ids = tokenizer([" ".join(["X"] * N_CTX) + f" {name}." for name in classnames])
        with torch.no_grad():
            embedding = model.token_embedding(ids)
        self.register_buffer("prefix", embedding[:, :1])
        self.register_buffer("suffix", embedding[:, 1 + N_CTX :])
        self.tokenized = ids
        self.ctx = torch.nn.Parameter(torch.empty(N_CTX, embedding.shape[-1]).normal_(0, 0.02))

    def forward(self):
        ctx = self.ctx.unsqueeze(0).expand(self.prefix.shape[0], -1, -1)
        return torch.cat([self.prefix, ctx, self.suffix], dim=1)


def reference_text(model, prompts, tokenized):
    x = prompts + model.positional_embedding
    x = model.transformer(x, attn_mask=model.attn_mask)
    x = model.ln_final(x)
    return x[torch.arange(x.shape[0]), tokenized.argmax(dim=-1)] @ model.text_projection


def margin_mean_var(logits, labels, alpha, beta):
    """TCPT's margin regularizer: -alpha mean(m) + beta var(m), m = target - best other logit."""
    target = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.clone()
    others.scatter_(1, labels[:, None], float("-inf"))
    margin = target - others.max(dim=1).values
    return -alpha * margin.mean() + beta * margin.var(unbiased=False)


def text_moment_matching(text, frozen):
    """TCPT's moment matching: squared mean gap + squared Frobenius gap of the D x D covariances."""
    mu, mu0 = text.mean(0), frozen.mean(0)
    centered, centered0 = text - mu, frozen - mu0
    cov = centered.T @ centered / text.shape[0]
    cov0 = centered0.T @ centered0 / frozen.shape[0]
    return (mu - mu0).pow(2).sum() + (cov - cov0).pow(2).sum()


def reference_loss(image_features, text_features, labels, scale, frozen):
    f = image_features / image_features.norm(dim=-1, keepdim=True)
    t = text_features / text_features.norm(dim=-1, keepdim=True)
    logits = scale * f @ t.T
    loss = F.cross_entropy(logits, labels)
    loss = loss + margin_mean_var(logits, labels, MARGIN_ALPHA, MARGIN_BETA)
    return loss + MOMENT_WEIGHT * text_moment_matching(t, frozen)


# ---- set-up ----------------------------------------------------------------------------------------
def classnames(count: int) -> list[str]:
    """The first ``count`` of open_clip's ImageNet class names."""
    from open_clip import IMAGENET_CLASSNAMES

    return list(IMAGENET_CLASSNAMES)[:count]


def build(variant: str, count: int):
    """The step function of ``variant`` (and what it needs), on fixed seeded inputs."""
    from fastcal.models import load_clip

    torch.manual_seed(0)
    clip = load_clip(MODEL)
    model = clip.model
    model.requires_grad_(False)
    names = classnames(count)
    generator = torch.Generator().manual_seed(1)
    labels = torch.randint(0, len(names), (BATCH,), generator=generator)
    images = torch.randn(BATCH, 3, 224, 224, generator=generator)
    dim = model.text_projection.shape[1]
    frozen = F.normalize(torch.randn(len(names), dim, generator=generator), dim=-1)
    cached = torch.randn(4 * BATCH, dim, generator=generator)  # a cached epoch of image features
    index = torch.randperm(4 * BATCH, generator=generator)[:BATCH]
    scale = model.logit_scale.exp()

    if variant.startswith("fastcal"):
        from fastcal.methods.base import MethodOutput
        from fastcal.methods.coop import CoOp
        from fastcal.methods.objectives import CalibratedLoss, StepBatch

        # the ablation: every class prompt through the truncated encoder, the shared prefix not reused
        method_class = (
            CoOp if variant == "fastcal" else type("WholePromptCoOp", (CoOp,), {"packs_prompts": False})
        )
        method = method_class(model, clip.tokenizer, names, n_ctx=N_CTX)
        loss_fn = CalibratedLoss(
            margin_alpha=MARGIN_ALPHA,
            margin_beta=MARGIN_BETA,
            moment_weight=MOMENT_WEIGHT,
            label_smoothing=0.0,
        )
        optimizer = torch.optim.SGD([p for _, p in method.tuned_parameters()], lr=LR, momentum=0.9)

        def step():
            out: MethodOutput = method.output(cached[index])
            loss = loss_fn(StepBatch(out, labels, method, frozen, 0))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            return loss.detach()

        return step

    learner = ReferencePromptLearner(model, clip.tokenizer, names)
    optimizer = torch.optim.SGD([learner.ctx], lr=LR, momentum=0.9)

    def step():
        image_features = model.encode_image(images) if variant == "reference" else cached[index]
        text_features = reference_text(model, learner(), learner.tokenized)
        loss = reference_loss(image_features, text_features, labels, scale, frozen)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


# ---- measurement -----------------------------------------------------------------------------------
def child(variant: str, count: int, rounds: int) -> dict:
    """Run ``variant`` in this (fresh) process: a warm-up step, then ``rounds`` timed steps; their times
    and the peak memory of the timed steps."""
    step = build(variant, count)
    step()  # warm-up (and the native loss's first load)
    peak, runs = harness.peak_memory(
        lambda: harness.repeated(step, rounds, warmup=0, clocks=harness.WALL_AND_CPU)
    )
    return {"seconds": runs.seconds["wall"], "cpu_seconds": runs.seconds["cpu"], "peak_bytes": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="ImageNet shape: 1,000 classes")
    parser.add_argument(
        "--classes", type=int, default=None, help="another class count (default 100; --full 1000)"
    )
    parser.add_argument("--quick", action="store_true", help="one timed step per variant")
    parser.add_argument(
        "--rounds", type=int, default=None, help="timed steps (default 3; --full 1; --quick 1)"
    )
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    env = harness.start(args.threads)
    args.classes = args.classes or (1000 if args.full else 100)
    rounds = args.rounds or (1 if args.quick or args.classes > 100 else 3)

    measured = {
        variant: harness.in_subprocess(child, variant=variant, count=args.classes, rounds=rounds)
        for variant in VARIANTS
    }
    wall = {v: statistics.median(m["seconds"]) for v, m in measured.items() if "seconds" in m}
    cpu = {v: statistics.median(m["cpu_seconds"]) for v, m in measured.items() if "seconds" in m}

    shape = f"{MODEL}, {args.classes} classes, batch {BATCH}, n_ctx {N_CTX}"
    print(f"one CoOp step with the calibrated loss: {shape}; {args.threads} threads, median of {rounds}")
    print(f"{'variant':<52} {'wall (s)':>9} {'ratio':>7} {'CPU (s)':>9} {'ratio':>7} {'peak MiB':>9}")
    for variant in VARIANTS:
        if variant not in wall:
            print(f"{LABELS[variant]:<52} {measured[variant]['error']}")
            continue
        ratios = ["-", "-"]
        if "reference" in wall:
            ratios = [
                f"{wall['reference'] / wall[variant]:6.2f}x",
                f"{cpu['reference'] / cpu[variant]:6.2f}x",
            ]
        peak = measured[variant]["peak_bytes"] / 2**20
        print(
            f"{LABELS[variant]:<52} {wall[variant]:9.3f} {ratios[0]:>7} {cpu[variant]:9.3f} {ratios[1]:>7} "
            f"{peak:9.0f}"
        )
    ratio = wall["reference"] / wall["fastcal"] if {"reference", "fastcal"} <= set(wall) else None
    target = harness.Target(f"fastcal vs the reference, wall clock ({args.classes} classes)", ratio, TARGET)
    targets = harness.report_targets({"fastcal_vs_reference": target})

    results = {
        "shape": {"model": MODEL, "classes": args.classes, "batch": BATCH, "n_ctx": N_CTX},
        "rounds": rounds,
        "variants": measured,
        "seconds": wall,
        "cpu_seconds": cpu,
        "ratio": None if ratio is None else {v: wall["reference"] / wall[v] for v in wall},
        "target": TARGET,
        "met": target.met,
        "targets": targets,
    }
    harness.write_results("coop_step" if args.classes == 100 else f"coop_step_{args.classes}", results, env)


if __name__ == "__main__":
    main()
