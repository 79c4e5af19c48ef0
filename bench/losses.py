"""Bench: TCPT's calibrated loss, forward + backward on CPU: eager, torch.compile, native, recipe.

Variants, all on the same inputs (image features (B, D), tuned text (C, D) and the logit scale require
grad; frozen text (C, D) does not), one step = loss + backward:

- eager:     fastcal's torch reference (``backend="torch"``), the formula as it reads;
- compiled:  ``torch.compile`` of that reference (default mode; compilation happens in the warm-up);
- native:    ``backend="native"``, the fused C++ backend (what ``backend="auto"`` runs on CPU);
- native_mkl: the same with ``torch.backends.mkldnn`` off, so its products go through at::mm (MKL,
             what eager and compiled use) instead of oneDNN: the share of the speed-up that is the
             GEMM library's;
- recipe:    TCPT's public step as its code runs it (TCPT trainers/coop.py): logits from the
             model's forward, then separate eager calls for cross-entropy, ``margin_mean_var`` (clone,
             fill the targets with -inf, max) and ``text_moment_matching`` (two D x D covariances),
             summed as CE + margin + 5 * moment. Compared with one fused call (native).

Time: warm-up, then rounds that run every variant once in turn (so load on a shared machine hits all
alike); the median per variant. Peak memory: each variant runs in a fresh subprocess with glibc's mmap
threshold at 64 KiB (so freed tensors go back to the kernel and RSS follows the live tensors); peak =
VmHWM during one step minus VmRSS before it (high-water mark reset through /proc/self/clear_refs after
the warm-up). Targets (this CPU): native >= 1.5x eager and >= 1.0x compiled at (256, 1000, 512).
Results go to bench/results/losses.json.

    .venv/bin/python bench/losses.py              # 3 shapes, 30 rounds, memory of every variant
    .venv/bin/python bench/losses.py --quick      # 5 rounds, memory at the target shape only
    .venv/bin/python bench/losses.py --threads 1  # steadier ratios on a shared machine
"""

from __future__ import annotations

import argparse
import sys

import harness
import torch
import torch.nn.functional as F

SHAPES = ((32, 100, 512), (256, 1000, 512), (64, 1000, 768))
TARGET_SHAPE = (256, 1000, 512)
TARGETS = {"eager": 1.5, "compiled": 1.0}
VARIANTS = ("eager", "compiled", "native", "native_mkl", "recipe")
MEMORY_VARIANTS = ("eager", "compiled", "native", "recipe")
ALPHA, BETA, MOMENT_WEIGHT, SCALE = 0.1, 0.01, 5.0, 100.0


def make_inputs(b: int, c: int, d: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    frozen = torch.randn(c, d, generator=g)
    return {
        "image": torch.randn(b, d, generator=g).requires_grad_(),
        # tuned text = frozen + a perturbation, as after some prompt tuning
        "text": (frozen + 0.3 * torch.randn(c, d, generator=g)).requires_grad_(),
        "labels": torch.randint(0, c, (b,), generator=g),
        "scale": torch.tensor(SCALE).requires_grad_(),
        "frozen": frozen,
    }


# TCPT's step as its public code runs it (functions named after TCPT's regularizers).
def margin_mean_var(logits: torch.Tensor, labels: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    rows = torch.arange(logits.shape[0])
    target = logits[rows, labels]
    others = logits.clone()
    others[rows, labels] = -float("inf")
    margins = target - others.max(dim=1).values
    return -alpha * margins.mean() + beta * margins.var(unbiased=False)


def text_moment_matching(tuned: torch.Tensor, frozen: torch.Tensor) -> torch.Tensor:
    n = tuned.shape[0]
    mu_t, mu_f = tuned.mean(dim=0, keepdim=True), frozen.mean(dim=0, keepdim=True)
    mean_cost = F.mse_loss(mu_t, mu_f, reduction="sum")
    centered_t, centered_f = tuned - mu_t, frozen - mu_f
    cov_t = centered_t.t() @ centered_t / n
    cov_f = centered_f.t() @ centered_f / n
    return mean_cost + (cov_t - cov_f).pow(2).sum()


def recipe_loss(image, text, labels, scale, zero_shot_text):
    image = image / image.norm(dim=-1, keepdim=True)
    text = text / text.norm(dim=-1, keepdim=True)
    logits = scale * image @ text.t()
    loss = F.cross_entropy(logits, labels)
    loss = loss + margin_mean_var(logits, labels, ALPHA, BETA)
    return loss + MOMENT_WEIGHT * text_moment_matching(text, zero_shot_text)


def make_step(variant: str, inputs: dict):
    """A closure running one forward + backward of ``variant`` on ``inputs``."""
    from fastcal.ops import calibrated_prompt_loss, calibrated_prompt_loss_reference

    image, text, labels, scale, frozen = (inputs[k] for k in ("image", "text", "labels", "scale", "frozen"))
    leaves = (image, text, scale)
    if variant == "eager":

        def loss_fn():
            return calibrated_prompt_loss(image, text, labels, scale, frozen, backend="torch")[0]
    elif variant in ("native", "native_mkl"):

        def loss_fn():
            return calibrated_prompt_loss(image, text, labels, scale, frozen, backend="native")[0]
    elif variant == "compiled":
        compiled = torch.compile(lambda *args: calibrated_prompt_loss_reference(*args)[0])

        def loss_fn():
            return compiled(image, text, labels, scale, frozen)
    else:
        # TCPT's zero-shot text features are normalized once, when the model is built.
        zero_shot = frozen / frozen.norm(dim=-1, keepdim=True)

        def loss_fn():
            return recipe_loss(image, text, labels, scale, zero_shot)

    def step():
        for leaf in leaves:
            leaf.grad = None
        onednn = torch.backends.mkldnn.enabled
        # native_mkl: the native backend with oneDNN off, so its products go through at::mm (MKL).
        torch.backends.mkldnn.enabled = onednn and variant != "native_mkl"
        try:
            loss = loss_fn()
            loss.backward()
        finally:
            torch.backends.mkldnn.enabled = onednn
        return loss

    return step


def memory_child(variant: str, shape: list[int]) -> dict:
    """The peak memory of one step of ``variant``, in this (fresh) process, after three warm-up steps."""
    step = make_step(variant, make_inputs(*shape))
    for _ in range(3):
        step()
    peak, _ = harness.peak_memory(step)
    return {"peak_bytes": peak}


def measure_memory(variant: str, shape: tuple[int, int, int]) -> int | None:
    memory = harness.in_subprocess(memory_child, variant=variant, shape=list(shape))
    if "error" in memory:
        print(f"  memory probe {variant} {shape} failed: {memory['error']}")
    return memory.get("peak_bytes")


def measure_times(shape: tuple[int, int, int], rounds: int) -> dict[str, float]:
    steps = {variant: make_step(variant, make_inputs(*shape)) for variant in VARIANTS}
    runs = harness.interleaved(steps, rounds, warmup=3)
    return {variant: run.median["wall"] for variant, run in runs.items()}


def check_agreement(shape: tuple[int, int, int]) -> float:
    """Largest relative difference of the loss and gradients between native and eager (sanity)."""
    outputs = {}
    for variant in ("eager", "native", "recipe"):
        inputs = make_inputs(*shape)
        loss = make_step(variant, inputs)()
        outputs[variant] = [loss.detach()] + [inputs[k].grad for k in ("image", "text", "scale")]
    worst = 0.0
    for other in ("native", "recipe"):  # native_mkl differs from native only in the GEMM library
        for a, b in zip(outputs["eager"], outputs[other], strict=True):
            worst = max(worst, float((a - b).abs().max() / a.abs().max().clamp_min(1e-30)))
    return worst


def print_table(rows: list[dict]) -> None:
    """A Markdown table: times (ms), ratios (baseline time / native time), peak MiB per variant."""
    titles = ["B, C, D", "eager ms", "compiled ms", "native ms", "x eager", "x compiled"]
    titles += ["native, MKL ms", "x eager (MKL)", "recipe ms", "x recipe"]
    titles += [f"{variant} MiB" for variant in MEMORY_VARIANTS] + ["max rel. diff"]
    lines = [titles, ["---"] * len(titles)]
    for row in rows:
        t = {variant: seconds * 1e3 for variant, seconds in row["seconds"].items()}
        memory = [row["peak_bytes"].get(variant) for variant in MEMORY_VARIANTS]
        cells = [", ".join(map(str, row["shape"]))]
        cells += [f"{t['eager']:.2f}", f"{t['compiled']:.2f}", f"{t['native']:.2f}"]
        cells += [f"{t['eager'] / t['native']:.2f}", f"{t['compiled'] / t['native']:.2f}"]
        cells += [f"{t['native_mkl']:.2f}", f"{t['eager'] / t['native_mkl']:.2f}"]
        cells += [f"{t['recipe']:.2f}", f"{t['recipe'] / t['native']:.2f}"]
        cells += [f"{m / 2**20:.1f}" if m is not None else "-" for m in memory]
        cells += [f"{row['max_rel_diff']:.1e}"]
        lines.append(cells)
    for line in lines:
        print("| " + " | ".join(line) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5 rounds; memory at the target shape only")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = parser.parse_args()
    env = harness.start(args.threads)

    from fastcal.ops import native_available

    if not native_available(warn=True):
        sys.exit("bench/losses.py: the native backend is not available (no C++ compiler?)")
    rounds = 5 if args.quick else args.rounds
    rows = []
    for shape in SHAPES:
        times = measure_times(shape, rounds)
        memory = {}
        if not args.quick or shape == TARGET_SHAPE:
            memory = {variant: measure_memory(variant, shape) for variant in MEMORY_VARIANTS}
        rows.append(
            {"shape": shape, "seconds": times, "peak_bytes": memory, "max_rel_diff": check_agreement(shape)}
        )

    print_table(rows)
    target = next(row for row in rows if row["shape"] == TARGET_SHAPE)["seconds"]
    verdicts = harness.report_targets(
        {
            baseline: harness.Target(
                f"native vs {baseline} at {TARGET_SHAPE}", target[baseline] / target["native"], wanted
            )
            for baseline, wanted in TARGETS.items()
        }
    )
    for baseline, verdict in verdicts.items():
        ratio_mkl = target[baseline] / target["native_mkl"]
        verdict["ratio_with_mkl_products"] = ratio_mkl
        print(f"  (native with its products on MKL, as {baseline} has them: {ratio_mkl:.2f}x)")
    rows = [{**row, "shape": list(row["shape"])} for row in rows]
    harness.write_results("losses", {"rounds": rounds, "rows": rows, "targets": verdicts}, env)


if __name__ == "__main__":
    main()
