"""Bench: one training step of ProGrad, PromptSRC, TCP and ProDA, the reference way vs fastcal's.

Shape: random-init ViT-B-16 (image tower 12 x 768 at 224 px, text tower 12 x 512 with 77 positions;
``--model ViT-B-32``: the same text tower, a 4x cheaper image tower),
each method's published recipe (context lengths, depths, prompts; batch 32 for ProGrad and TCP, 4 for
PromptSRC and ProDA), cross-entropy. Classes: the first ``--classes`` of open_clip's ImageNet class
names (default 100, Caltech101's shape).

Variants, one step = forward + loss + backward + optimizer step:

- reference: as the methods' public code computes it, in plain torch: every class prompt assembled as
  ``cat(prefix, ctx, suffix)`` at 77 positions (no shared prefix) and CLIP's full text forward layer by
  layer (deep prompts, TCP's class tokens), the frozen image encoder on the batch every step (the
  second, zero-shot image pass of ProGrad and PromptSRC included), the losses as the code writes them
  (ProGrad's two gradients and projection; PromptSRC's agreement terms; TCP's KgCoOp term and Adam;
  ProDA's (D, C, C) covariance over the step's 4 prompts and the class-free prompts of all 32);
- fastcal: the method from ``fastcal.methods.build_method`` stepped by ``fastcal.methods.training_step``
  (what ``fastcal train`` runs): cached image features for the frozen-image methods (ProGrad, TCP,
  ProDA), the exact truncated text encoder, the shared prefix encoded once where the prompts share it
  (ProGrad), ProDA's covariance rewritten to (B, C).

PromptSRC prompts its image encoder, so both variants run it (with fastcal's ``DeepVisualPrompts``: the
same computation) and the frozen one; its ratio is the text side's. Each variant runs in a fresh
subprocess: a warm-up step, then the timed steps; the median wall-clock and CPU time. Results:
bench/results/method_steps.json.

    .venv/bin/python bench/method_steps.py                 # 100 classes, 2 rounds
    .venv/bin/python bench/method_steps.py --quick         # 10 classes, 1 round
    .venv/bin/python bench/method_steps.py --methods tcp   # some of the methods
    .venv/bin/python bench/method_steps.py --model ViT-B-32 --classes 20   # a loaded 2-core machine
"""

from __future__ import annotations

import argparse
import statistics

import harness
import torch
import torch.nn.functional as F

METHODS = ("prograd", "promptsrc", "tcp", "proda")
VARIANTS = ("reference", "fastcal")
MODEL = "ViT-B-16"
BATCH = {"prograd": 32, "promptsrc": 4, "tcp": 32, "proda": 4}


# ---- the reference text side -----------------------------------------------------------------------
def full_prompts(model, tokenizer, texts, ctx):
    """``(N, 77, W)`` prompts with positions ``1..n`` replaced by ``ctx`` (``(n, W)`` or ``(N, n, W)``),
    and their token ids."""
    ids = tokenizer(texts)
    with torch.no_grad():
        embedding = model.token_embedding(ids)
    n = ctx.shape[-2]
    rows = ctx.expand(len(texts), -1, -1) if ctx.ndim == 2 else ctx
    return torch.cat([embedding[:, :1], rows, embedding[:, 1 + n :]], dim=1), ids


def full_text(model, prompts, ids, deep=(), injected=None):
    """CLIP's text forward at 77 positions, block by block: deep prompts replace positions ``1..n``
    before blocks ``1..len(deep)``; ``injected = (k, tokens (N, n, W))`` replaces them before block k."""
    x = prompts + model.positional_embedding
    for k, block in enumerate(model.transformer.resblocks):
        if 1 <= k <= len(deep):
            n = deep[k - 1].shape[0]
            x = torch.cat([x[:, :1], deep[k - 1].expand(x.shape[0], -1, -1), x[:, 1 + n :]], dim=1)
        if injected is not None and k == injected[0]:
            n = injected[1].shape[1]
            x = torch.cat([x[:, :1], injected[1], x[:, 1 + n :]], dim=1)
        x = block(x, attn_mask=model.attn_mask)
    x = model.ln_final(x)
    return x[torch.arange(x.shape[0]), ids.argmax(dim=-1)] @ model.text_projection


def x_words(n):
    return " ".join(["X"] * n)


# ---- the reference steps ---------------------------------------------------------------------------
def reference_prograd(model, tokenizer, names, images, labels, frozen):
    """ProGrad.public ``trainers/prograd.py`` + Dassl.ProGrad ``prograd_backward_and_update``: a teacher
    CLIP pass, the KL and CE gradients, the projection per tensor, SGD."""
    ctx = torch.nn.Parameter(torch.empty(16, model.token_embedding.weight.shape[1]).normal_(0, 0.02))
    optimizer = torch.optim.SGD([ctx], lr=0.002, momentum=0.9, weight_decay=5e-4)
    texts = [f"{x_words(16)} {name}." for name in names]
    scale = model.logit_scale.exp()

    def step():
        f = F.normalize(model.encode_image(images), dim=-1)
        with torch.no_grad():
            f0 = F.normalize(model.encode_image(images), dim=-1)  # the zero-shot CLIP's own pass
        prompts, ids = full_prompts(model, tokenizer, texts, ctx)
        logits = scale * f @ F.normalize(full_text(model, prompts, ids), dim=-1).T
        teacher = scale * f0 @ frozen.T
        kl = (-F.softmax(teacher, -1) * F.log_softmax(logits, -1)).sum(-1).mean()
        ce = F.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        kl.backward(retain_graph=True)
        g_kl = ctx.grad.clone()
        optimizer.zero_grad(set_to_none=True)
        ce.backward()
        g = ctx.grad
        unit = g_kl / g_kl.norm()
        if float((g / g.norm() * unit).sum()) < 0:
            ctx.grad = g - (g * unit).sum() * unit
        optimizer.step()
        return ce.detach()

    return step


def reference_promptsrc(model, tokenizer, names, images, labels, frozen):
    """muzairkhattak/PromptSRC ``trainers/promptsrc.py``: 4 + 4 context tokens, depth 9 in both towers,
    the frozen image pass, CE + KL / (B C) + 25 L1(text) + 10 L1(image), SGD."""
    from fastcal.models.vision_prompts import DeepVisualPrompts

    width = model.token_embedding.weight.shape[1]
    ctx = torch.nn.Parameter(torch.empty(4, width).normal_(0, 0.02))
    deep = [torch.nn.Parameter(torch.empty(4, width).normal_(0, 0.02)) for _ in range(8)]
    visual = DeepVisualPrompts(model, n_tokens=4, depth=9)
    params = [ctx, *deep, *visual.parameters()]
    optimizer = torch.optim.SGD(params, lr=0.0025, momentum=0.9, weight_decay=5e-4)
    texts = [f"{x_words(4)} {name}." for name in names]
    scale = model.logit_scale.exp()

    def step():
        f = F.normalize(visual(model, images), dim=-1)
        with torch.no_grad():
            f0 = F.normalize(model.encode_image(images), dim=-1)
        prompts, ids = full_prompts(model, tokenizer, texts, ctx)
        t = F.normalize(full_text(model, prompts, ids, deep), dim=-1)
        logits, frozen_logits = scale * f @ t.T, scale * f0 @ frozen.T
        kl = F.kl_div(
            F.log_softmax(logits, -1), F.log_softmax(frozen_logits, -1), reduction="sum", log_target=True
        )
        loss = (
            F.cross_entropy(logits, labels)
            + kl / logits.numel()
            + 25 * F.l1_loss(t, frozen)
            + 10 * F.l1_loss(f, f0)
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def reference_tcp(model, tokenizer, names, images, labels, frozen):
    """htyao89/Textual-based_Class-aware_prompt_tuning ``trainers/tcp.py``: 4 random context tokens, the
    TKE's class tokens replacing them before block 8, CE + 8 (1 - mean cos(t, t0)), Adam (eps 1e-3)."""
    from open_clip.transformer import QuickGELU

    width = model.token_embedding.weight.shape[1]
    dim = frozen.shape[1]
    ctx = torch.nn.Parameter(torch.empty(4, width).normal_(0, 0.02))
    tke = torch.nn.Sequential(
        torch.nn.Linear(dim, dim // 4), QuickGELU(), torch.nn.Linear(dim // 4, 4 * width)
    )
    optimizer = torch.optim.Adam([ctx, *tke.parameters()], lr=0.002, eps=1e-3, weight_decay=5e-4)
    texts = [f"{x_words(4)} {name}." for name in names]
    scale = model.logit_scale.exp()

    def step():
        f = F.normalize(model.encode_image(images), dim=-1)
        prompts, ids = full_prompts(model, tokenizer, texts, ctx)
        tokens = tke(frozen).reshape(len(names), 4, width)
        t = F.normalize(full_text(model, prompts, ids, injected=(8, tokens)), dim=-1)
        logits = scale * f @ t.T
        loss = F.cross_entropy(logits, labels) + 8.0 * (1 - F.cosine_similarity(t, frozen, eps=1e-7).mean())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def reference_proda(model, tokenizer, names, images, labels, frozen):
    """ml-stat-Sustech/CLIP_Calibration ``trainers/classification/proda.py``: 32 prompts of 16 tokens, a
    step's 4 of them for every class (all at 77 positions: the layout does not change the cost), the
    (D, C, C) covariance, the class-free prompts of all 32, L_upper + 0.1 L_m, SGD."""
    width = model.token_embedding.weight.shape[1]
    ctx = torch.nn.Parameter(torch.empty(32, 16, width).normal_(0, 0.02))
    optimizer = torch.optim.SGD([ctx], lr=0.001, momentum=0.9, weight_decay=5e-4)
    texts = [f"{x_words(16)} {name}." for name in names]
    scale = model.logit_scale.exp()
    subset = torch.randperm(32)[:4]
    classes = len(names)

    def step():
        f = F.normalize(model.encode_image(images), dim=-1).detach()
        rows = ctx[subset].repeat_interleave(classes, dim=0)  # (4 C, 16, W): prompt-major
        prompts, ids = full_prompts(model, tokenizer, texts * 4, rows)
        t = F.normalize(full_text(model, prompts, ids), dim=-1).reshape(4, classes, -1).transpose(0, 1)
        mean = t.mean(dim=1)
        deviation = t - mean[:, None]
        covariance = torch.einsum("akd,bkd->dab", deviation, deviation) / 5  # (D, C, C), divisor P + 1
        spread = torch.einsum("bd,dac->bac", f.square(), covariance)  # (B, C, C)
        at = spread[torch.arange(len(labels)), labels]  # (B, C): row y
        sigma = at.gather(1, labels[:, None]) + torch.diagonal(spread, dim1=1, dim2=2) - 2 * at
        logits = scale * f @ mean.T
        upper = F.cross_entropy(logits + 0.5 * scale**2 * sigma, labels)
        free, free_ids = full_prompts(model, tokenizer, [f"{x_words(16)}."] * 32, ctx)
        u = F.normalize(full_text(model, free, free_ids), dim=-1)
        similarity = u @ u.T
        loss = upper + 0.1 * similarity[~torch.eye(32, dtype=torch.bool)].abs().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


REFERENCE = {
    "prograd": reference_prograd,
    "promptsrc": reference_promptsrc,
    "tcp": reference_tcp,
    "proda": reference_proda,
}


# ---- set-up ----------------------------------------------------------------------------------------
def build(method: str, variant: str, count: int, model_name: str):
    """The step function of ``method`` / ``variant`` on fixed seeded inputs."""
    from open_clip import IMAGENET_CLASSNAMES

    from fastcal.models import load_clip

    torch.manual_seed(0)
    clip = load_clip(model_name)
    model = clip.model
    model.requires_grad_(False)
    names = list(IMAGENET_CLASSNAMES)[:count]
    batch = BATCH[method]
    generator = torch.Generator().manual_seed(1)
    labels = torch.randint(0, len(names), (batch,), generator=generator)
    images = torch.randn(batch, 3, 224, 224, generator=generator)
    dim = model.text_projection.shape[1]
    frozen = F.normalize(torch.randn(len(names), dim, generator=generator), dim=-1)
    if variant == "reference":
        return REFERENCE[method](model, clip.tokenizer, names, images, labels, frozen)

    from fastcal.methods import build_method, training_step

    built = build_method(method, model, clip.tokenizer, names)
    recipe = built.recipe
    params = [p for _, p in built.tuned_parameters()]
    if recipe.get("optimizer") == "adam":
        optimizer = torch.optim.Adam(params, lr=recipe["lr"], eps=recipe["adam_eps"], weight_decay=5e-4)
    else:
        optimizer = torch.optim.SGD(params, lr=recipe["lr"], momentum=0.9, weight_decay=5e-4)
    step = training_step(built, "ce", optimizer, frozen_text_features=frozen, progress=False)
    if built.input_kind == "images":
        return lambda: step(images, labels).loss
    cached = torch.randn(batch, dim, generator=generator)  # the batch's cached image features
    return lambda: step.from_features(cached, labels).loss


def child(method: str, variant: str, count: int, rounds: int, model_name: str) -> dict:
    """``method`` / ``variant`` in this (fresh) process: a warm-up step, then ``rounds`` timed steps."""
    step = build(method, variant, count, model_name)
    step()
    runs = harness.repeated(step, rounds, warmup=0, clocks=harness.WALL_AND_CPU)
    return {"seconds": runs.seconds["wall"], "cpu_seconds": runs.seconds["cpu"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=None, help="class count (default 100; --quick 10)")
    parser.add_argument("--quick", action="store_true", help="10 classes, one timed step per variant")
    parser.add_argument("--rounds", type=int, default=None, help="timed steps (default 2; --quick 1)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--model", default=MODEL, help=f"open_clip architecture (default {MODEL})")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    env = harness.start(args.threads)
    classes = args.classes or (10 if args.quick else 100)
    rounds = args.rounds or (1 if args.quick else 2)

    measured = {
        method: {
            variant: harness.in_subprocess(
                child, method=method, variant=variant, count=classes, rounds=rounds, model_name=args.model
            )
            for variant in VARIANTS
        }
        for method in args.methods
    }
    print(
        f"one training step (cross-entropy): {args.model}, {classes} classes; {args.threads} threads, "
        f"median of {rounds}"
    )
    print(f"{'method':<10} {'reference (s)':>14} {'fastcal (s)':>12} {'ratio':>7} {'CPU ratio':>10}")
    summary = {}
    for method, variants in measured.items():
        failed = [f"{v}: {m['error']}" for v, m in variants.items() if "error" in m]
        if failed:
            print(f"{method:<10} {'; '.join(failed)}")
            continue
        wall = {v: statistics.median(m["seconds"]) for v, m in variants.items()}
        cpu = {v: statistics.median(m["cpu_seconds"]) for v, m in variants.items()}
        ratio, cpu_ratio = wall["reference"] / wall["fastcal"], cpu["reference"] / cpu["fastcal"]
        summary[method] = {"seconds": wall, "cpu_seconds": cpu, "ratio": ratio, "cpu_ratio": cpu_ratio}
        print(
            f"{method:<10} {wall['reference']:14.3f} {wall['fastcal']:12.3f} {ratio:6.2f}x {cpu_ratio:9.2f}x"
        )
    results = {
        "shape": {"model": args.model, "classes": classes, "batch": BATCH},
        "rounds": rounds,
        "variants": measured,
        "methods": summary,
    }
    name = "method_steps" if (classes, args.model) == (100, MODEL) else f"method_steps_{args.model}_{classes}"
    harness.write_results(name, results, env)


if __name__ == "__main__":
    main()
