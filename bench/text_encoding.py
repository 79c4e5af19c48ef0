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
batch's longest EOT) and with bucketing (the default for frozen class features). Time: median of
--repeats after a warm-up (the first batch), on two clocks: wall-clock, and this process's CPU time
(all threads; steadier when other processes share the cores; the load average is printed and saved).
Max abs diff: fastcal's features vs open_clip's.

Floor: the text-tower FLOPs that actually ran (sequence lengths recorded by a hook on the transformer:
per layer 24 T W^2 for the projections and MLP plus 4 T^2 W for attention, per row; plus the final
projection) divided by this machine's fp32 GEMM rate (the best median of torch.mm at three shapes, per
wall second and per CPU second).
Targets (issue 5): speed-up >= 3x for (a), >= 6x for (b), fastcal within 1.5x of its floor.

    .venv/bin/python bench/text_encoding.py            # 1,000 classes and 2,000 nouns, both models
    .venv/bin/python bench/text_encoding.py --quick    # 100 classes, 200 nouns
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import time
from pathlib import Path

import open_clip
import torch

from fastcal._io import write_json_atomic
from fastcal.models import TextEncoder, load_clip

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "text_encoding.json"
TARGETS = {"coop": 3.0, "photo": 6.0}
FLOOR_TARGET = 1.5


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def measure(fn, repeats: int, warm_up=None) -> tuple[dict[str, float], object]:
    """Median wall-clock and process-CPU seconds of ``fn()`` over ``repeats`` runs, and its output.

    ``warm_up`` (default ``fn``) runs once first, untimed."""
    (warm_up or fn)()
    samples: dict[str, list[float]] = {clock: [] for clock in CLOCKS}
    out = None
    for _ in range(repeats):
        start = {clock: read() for clock, read in CLOCKS.items()}
        out = fn()
        for clock, read in CLOCKS.items():
            samples[clock].append(read() - start[clock])
    return {clock: statistics.median(values) for clock, values in samples.items()}, out


def gemm_rate(repeats: int) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Best median fp32 torch.mm rate (FLOP per wall / CPU second) over shapes like the tower's GEMMs."""
    rates: dict[str, dict[str, float]] = {clock: {} for clock in CLOCKS}
    for m, k, n in ((8192, 512, 2048), (8192, 2048, 512), (2048, 2048, 2048)):
        a, b = torch.randn(m, k), torch.randn(k, n)
        seconds, _ = measure(lambda a=a, b=b: torch.mm(a, b), max(5, repeats))
        for clock in CLOCKS:
            rates[clock][f"{m}x{k}x{n}"] = 2 * m * k * n / seconds[clock]
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

    def encode(fn):
        def run():
            shapes.clear()
            return torch.cat([fn(c) for c in chunks])

        return run

    def warm_up(fn):  # the first batch: allocations and one-time set-up, at a fraction of the cost
        return lambda: fn(chunks[0])

    with torch.inference_mode():
        full_s, full = measure(encode(model.encode_text), repeats, warm_up(model.encode_text))
        full_shapes = list(shapes)
        plain_s, plain_out = measure(encode(plain.encode), repeats, warm_up(plain.encode))
        plain_shapes = list(shapes)
        bucket_s, bucket_out = measure(encode(bucketed.encode), repeats, warm_up(bucketed.encode))
        bucket_shapes = list(shapes)
    hook.remove()
    layers, width = len(model.transformer.resblocks), model.transformer.width
    out_dim = full.shape[1]
    flops = {
        name: tower_flops(s, layers, width, out_dim)
        for name, s in (("full", full_shapes), ("plain", plain_shapes), ("bucketed", bucket_shapes))
    }
    lengths = token_ids.argmax(-1) + 1
    result = {
        "prompts": token_ids.shape[0],
        "eot_mean": float(lengths.float().mean()),
        "eot_max": int(lengths.max()),
        "passes_bucketed": len(bucket_shapes),
        "flops": flops,
        "max_abs_diff_plain": float((plain_out - full).abs().max()),
        "max_abs_diff_bucketed": float((bucket_out - full).abs().max()),
        "feature_max_abs": float(full.abs().max()),
    }
    for clock in CLOCKS:
        floor = {name: f / rate[clock] for name, f in flops.items()}
        result[clock] = {
            "full_s": full_s[clock],
            "plain_s": plain_s[clock],
            "bucketed_s": bucket_s[clock],
            "ratio_plain": full_s[clock] / plain_s[clock],
            "ratio_bucketed": full_s[clock] / bucket_s[clock],
            "floor_full_s": floor["full"],
            "floor_plain_s": floor["plain"],
            "floor_bucketed_s": floor["bucketed"],
            "floor_factor": bucket_s[clock] / floor["bucketed"],
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
    if args.threads:
        torch.set_num_threads(args.threads)

    load_start = os.getloadavg()
    rate, rates = gemm_rate(repeats)
    print(
        f"fp32 GEMM rate: {rate['wall'] / 1e9:.1f} GFLOP per wall second, "
        f"{rate['cpu'] / 1e9:.1f} per CPU second "
        f"(best of {', '.join(rates['wall'])}), {torch.get_num_threads()} threads, "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    coop, coop_source = coop_prompts(n_classes)
    nouns, noun_source = noun_list(n_nouns, args.wordnet_dir)
    print(f"(a) {len(coop)} CoOp prompts (16 context tokens) over {coop_source}")
    print(f"(b) {len(nouns)} 'a photo of a {{}}.' prompts over {noun_source}")
    workloads = {"coop": coop, "photo": [f"a photo of a {noun}." for noun in nouns]}

    rows = []
    for name in args.models:
        torch.manual_seed(0)
        model, tokenizer, _, _ = load_clip(name)
        for workload, prompts in workloads.items():
            result = run_workload(model, tokenizer(prompts), args.batch, repeats, rate)
            result.update(model=name, workload=workload)
            for clock in CLOCKS:
                timing = result[clock]
                timing["ratio_met"] = timing["ratio_bucketed"] >= TARGETS[workload]
                timing["floor_met"] = timing["floor_factor"] <= FLOOR_TARGET
            result["ratio_target"] = TARGETS[workload]
            rows.append(result)
            print(f"  {name} {workload}: done ({result['wall']['full_s']:.2f} s full)", flush=True)
        del model

    header = (
        f"{'model':<9} {'workload':<6} {'N':>5} {'EOT mean/max':>12} {'full s':>8} {'plain s':>8} "
        f"{'bucket s':>8} {'ratio':>6} {'target':>7} {'floor s':>8} {'x floor':>8} {'<=1.5x':>7} "
        f"{'max diff':>9}"
    )
    for clock, title in (("wall", "wall-clock seconds"), ("cpu", "process CPU seconds (all threads)")):
        print(f"\n{title}\n{header}\n{'-' * len(header)}")
        for r in rows:
            t = r[clock]
            print(
                f"{r['model']:<9} {r['workload']:<6} {r['prompts']:>5} "
                f"{r['eot_mean']:>7.1f}/{r['eot_max']:<4} {t['full_s']:>8.3f} {t['plain_s']:>8.3f} "
                f"{t['bucketed_s']:>8.3f} {t['ratio_bucketed']:>5.2f}x "
                f"{'met' if t['ratio_met'] else 'NOT met':>7} {t['floor_bucketed_s']:>8.3f} "
                f"{t['floor_factor']:>7.2f}x {'met' if t['floor_met'] else 'NOT met':>7} "
                f"{r['max_abs_diff_bucketed']:>9.2e}"
            )
    print(
        "\nratio = full / bucketed (target >= 3x CoOp, >= 6x photo); "
        "x floor = bucketed / (FLOPs run / GEMM rate); "
        "plain = truncated to each batch's longest EOT, no bucketing"
    )
    write_json_atomic(
        RESULTS,
        {
            "bench": "text_encoding",
            "quick": args.quick,
            "repeats": repeats,
            "batch": args.batch,
            "threads": torch.get_num_threads(),
            "gemm_rate_flops": rate,
            "cpus": os.cpu_count(),
            "gemm_rates": rates,
            "load_average_start": load_start,
            "load_average_end": os.getloadavg(),
            "machine": platform.platform(),
            "torch": torch.__version__,
            "coop_source": coop_source,
            "noun_source": noun_source,
            "rows": rows,
        },
    )
    print(f"wrote {RESULTS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
