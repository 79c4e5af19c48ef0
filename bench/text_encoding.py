"""Bench: exact truncated text encoding (fastcal.models.TextEncoder) vs open_clip's full encode_text.

Workloads, on random-init ViT-B-32 and ViT-B-16 (their text towers: 12 layers, width 512, 8 heads,
77 positions), no-grad inference:

(a) CoOp prompts: "X X ... X {classname}." with 16 placeholder tokens, over open_clip's ImageNet class
    names (all 1,000; --quick: 100);
(b) "a photo of a {}." over 2,000 WordNet nouns (--quick: 200), a seeded sample of all noun lemmas.
    Source, in order: nltk's WordNet corpus, the WordNet 3.0 database files (--wordnet-dir, default
    /usr/share/wordnet: Debian's wordnet-base), else whole-word tokens of CLIP's BPE vocabulary
    (not all nouns). The source used is printed and saved.

Prompts are encoded in batches of --batch (default 500), the same batches for every variant: open_clip
``model.encode_text`` (77 positions), TextEncoder without bucketing (one pass per batch, truncated to the
batch's longest EOT) and with bucketing (the default for frozen class features). Time: after a warm-up
(the first batch), --repeats rounds that run each variant once in turn; the median, on two clocks:
wall-clock, and this process's CPU time (all threads; steadier when other processes share the cores;
the load average is printed and saved).
Max abs diff: fastcal's features vs open_clip's.

Floor: the text-tower FLOPs that actually ran (sequence lengths recorded by a hook on the transformer:
per layer 24 T W^2 for the projections and MLP plus 4 T^2 W for attention, per row; plus the final
projection) divided by this machine's fp32 GEMM rate (the best median of torch.mm at three shapes, per
wall second and per CPU second).
Targets: speed-up >= 3x for (a), >= 6x for (b), fastcal within 1.5x of its floor.

    .venv/bin/python bench/text_encoding.py            # 1,000 classes and 2,000 nouns, both models
    .venv/bin/python bench/text_encoding.py --quick    # 100 classes, 200 nouns
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import harness
import open_clip
import torch

from fastcal.models import TextEncoder, load_clip

TARGETS = {"coop": 3.0, "photo": 6.0}
FLOOR_TARGET = 1.5
CLOCKS = harness.WALL_AND_CPU


def gemm_rate(repeats: int) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Best median fp32 torch.mm rate (FLOP per wall / CPU second) over shapes like the tower's GEMMs."""
    flops, products = {}, {}
    for m, k, n in ((8192, 512, 2048), (8192, 2048, 512), (2048, 2048, 2048)):
        a, b = torch.randn(m, k), torch.randn(k, n)
        shape = f"{m}x{k}x{n}"
        flops[shape], products[shape] = 2 * m * k * n, lambda a=a, b=b: torch.mm(a, b)
    runs = harness.interleaved(products, max(5, repeats), clocks=CLOCKS)
    rates = {
        clock: {shape: flops[shape] / run.median[clock] for shape, run in runs.items()} for clock in CLOCKS
    }
    return {clock: max(r.values()) for clock, r in rates.items()}, rates


def coop_prompts(n_classes: int) -> tuple[list[str], str]:
    names = open_clip.IMAGENET_CLASSNAMES[:n_classes]
    return [" ".join(["X"] * 16) + " " + name + "." for name in names], "open_clip.IMAGENET_CLASSNAMES"


def noun_list(n: int, wordnet_dir: Path, seed: int = 0) -> tuple[list[str], str]:
    lemmas: list[str] = []
    source = ""
    try:
        from nltk.corpus import wordnet

        lemmas = sorted(set(wordnet.all_lemma_names(pos="n")))
        source = "WordNet 3.0 nouns (nltk corpus)"
    except LookupError:
        index = wordnet_dir / "index.noun"
        if index.is_file():
            with open(index, encoding="utf-8") as f:
                lemmas = sorted({line.split()[0] for line in f if line and not line.startswith(" ")})
            source = f"WordNet 3.0 nouns ({index})"
    if len(lemmas) < n:
        vocabulary = open_clip.tokenizer.SimpleTokenizer().encoder
        lemmas = sorted(w[:-4] for w in vocabulary if w.endswith("</w>") and w[:-4].isalpha() and len(w) > 6)
        source = "whole-word tokens of CLIP's BPE vocabulary (WordNet not found; not all are nouns)"
    sample = random.Random(seed).sample(lemmas, n)
    return [lemma.replace("_", " ") for lemma in sample], source


def tower_flops(shapes: list[tuple[int, int]], layers: int, width: int, out_dim: int) -> float:
    """FLOPs of the text passes that ran, ``shapes`` = [(rows, length)]."""
    total = 0.0
    for rows, length in shapes:
        total += rows * layers * (24 * length * width**2 + 4 * length**2 * width) + rows * 2 * width * out_dim
    return total


def run_workload(model, token_ids: torch.Tensor, batch: int, repeats: int, rate: dict[str, float]) -> dict:
    chunks = list(token_ids.split(batch))
    plain, bucketed = TextEncoder(model), TextEncoder(model, bucket=True)
    shapes: list[tuple[int, int]] = []
    hook = model.transformer.register_forward_pre_hook(
        lambda m, args: shapes.append(tuple(args[0].shape[:2]))
    )

    encoders = {"full": model.encode_text, "plain": plain.encode, "bucketed": bucketed.encode}

    def encode(fn):
        def run():
            shapes.clear()
            return torch.cat([fn(c) for c in chunks]), list(shapes)

        return run

    with torch.inference_mode():
        for fn in encoders.values():  # warm-up on the first batch: allocations and one-time set-up
            fn(chunks[0])
        runs = harness.interleaved(
            {name: encode(fn) for name, fn in encoders.items()}, repeats, warmup=0, clocks=CLOCKS
        )
    hook.remove()
    features = {name: run.output[0] for name, run in runs.items()}
    full = features["full"]
    layers, width = len(model.transformer.resblocks), model.transformer.width
    flops = {name: tower_flops(run.output[1], layers, width, full.shape[1]) for name, run in runs.items()}
    lengths = token_ids.argmax(-1) + 1
    result = {
        "prompts": token_ids.shape[0],
        "eot_mean": float(lengths.float().mean()),
        "eot_max": int(lengths.max()),
        "passes_bucketed": len(runs["bucketed"].output[1]),
        "flops": flops,
        "max_abs_diff_plain": float((features["plain"] - full).abs().max()),
        "max_abs_diff_bucketed": float((features["bucketed"] - full).abs().max()),
        "feature_max_abs": float(full.abs().max()),
    }
    for clock in CLOCKS:
        floor = {name: f / rate[clock] for name, f in flops.items()}
        seconds = {name: run.median[clock] for name, run in runs.items()}
        result[clock] = {
            "full_s": seconds["full"],
            "plain_s": seconds["plain"],
            "bucketed_s": seconds["bucketed"],
            "ratio_plain": seconds["full"] / seconds["plain"],
            "ratio_bucketed": seconds["full"] / seconds["bucketed"],
            "floor_full_s": floor["full"],
            "floor_plain_s": floor["plain"],
            "floor_bucketed_s": floor["bucketed"],
            "floor_factor": seconds["bucketed"] / floor["bucketed"],
        }
    return result


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="100 classes, 200 nouns, 1 repeat")
    parser.add_argument("--models", nargs="+", default=["ViT-B-32", "ViT-B-16"])
    parser.add_argument("--classes", type=int, default=None, help="ImageNet classes for (a) (default 1000)")
    parser.add_argument("--nouns", type=int, default=None, help="nouns for (b) (default 2000)")
    parser.add_argument("--batch", type=int, default=500, help="prompts per encode call")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default 3; --quick 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--wordnet-dir", type=Path, default=Path("/usr/share/wordnet"))
    args = parser.parse_args()
    n_classes = args.classes or (100 if args.quick else 1000)
    n_nouns = args.nouns or (200 if args.quick else 2000)
    repeats = args.repeats or (1 if args.quick else 3)
    env = harness.start(args.threads)

    rate, rates = gemm_rate(repeats)
    print(
        f"fp32 GEMM rate: {rate['wall'] / 1e9:.1f} GFLOP per wall second, "
        f"{rate['cpu'] / 1e9:.1f} per CPU second (best of {', '.join(rates['wall'])})"
    )
    coop, coop_source = coop_prompts(n_classes)
    nouns, noun_source = noun_list(n_nouns, args.wordnet_dir)
    print(f"(a) {len(coop)} CoOp prompts (16 context tokens) over {coop_source}")
    print(f"(b) {len(nouns)} 'a photo of a {{}}.' prompts over {noun_source}")
    workloads = {"coop": coop, "photo": [f"a photo of a {noun}." for noun in nouns]}

    rows, targets = [], {}
    for name in args.models:
        torch.manual_seed(0)
        model, tokenizer, _, _ = load_clip(name)
        for workload, prompts in workloads.items():
            result = run_workload(model, tokenizer(prompts), args.batch, repeats, rate)
            result.update(model=name, workload=workload)
            for clock in CLOCKS:
                timing, case = result[clock], f"{name} {workload} ({clock})"
                speedup = harness.Target(f"{case} speed-up", timing["ratio_bucketed"], TARGETS[workload])
                floor = harness.Target(f"{case} x floor", timing["floor_factor"], FLOOR_TARGET, "<=")
                timing["ratio_met"], timing["floor_met"] = speedup.met, floor.met
                targets |= {target.label: target for target in (speedup, floor)}
            result["ratio_target"] = TARGETS[workload]
            rows.append(result)
            print(f"  {name} {workload}: done ({result['wall']['full_s']:.2f} s full)", flush=True)
        del model

    header = (
        f"{'model':<9} {'workload':<6} {'N':>5} {'EOT mean/max':>12} {'full s':>8} {'plain s':>8} "
        f"{'bucket s':>8} {'ratio':>6} {'floor s':>8} {'x floor':>8} {'max diff':>9}"
    )
    for clock, title in (("wall", "wall-clock seconds"), ("cpu", "process CPU seconds (all threads)")):
        print(f"\n{title}\n{header}\n{'-' * len(header)}")
        for r in rows:
            t = r[clock]
            print(
                f"{r['model']:<9} {r['workload']:<6} {r['prompts']:>5} "
                f"{r['eot_mean']:>7.1f}/{r['eot_max']:<4} {t['full_s']:>8.3f} {t['plain_s']:>8.3f} "
                f"{t['bucketed_s']:>8.3f} {t['ratio_bucketed']:>5.2f}x {t['floor_bucketed_s']:>8.3f} "
                f"{t['floor_factor']:>7.2f}x {r['max_abs_diff_bucketed']:>9.2e}"
            )
    print(
        "\nratio = full / bucketed (target >= 3x CoOp, >= 6x photo); "
        "x floor = bucketed / (FLOPs run / GEMM rate); "
        "plain = truncated to each batch's longest EOT, no bucketing"
    )
    verdicts = harness.report_targets(targets)
    harness.write_results(
        "text_encoding",
        {
            "quick": args.quick,
            "repeats": repeats,
            "batch": args.batch,
            "gemm_rate_flops": rate,
            "gemm_rates": rates,
            "coop_source": coop_source,
            "noun_source": noun_source,
            "rows": rows,
            "targets": verdicts,
        },
        env,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
