"""Bench: DOR's outlier bank (fastcal.outliers) — cold build, warm load, near-OOD top-K, DOR step cost.

Model: a random-init open_clip ViT-B-32 (text tower: 12 layers, width 512, 77 positions); weights do
not change the cost. Vocabulary: WordNet 3.0's nouns (``fastcal.outliers.wordnet_nouns``, 119,034
terms); template "a photo of a {}.".

1. Cold build over a seeded sample of --terms WordNet nouns (default 5,000; --quick 500): the usual way,
   open_clip ``model.encode_text`` on the 77-token ids in batches of --batch in vocabulary order, vs
   ``fastcal.outliers.encode_prompts`` (length-sorted batches through the exact truncated, bucketed
   ``TextEncoder``), both tokenizing inside the timed region. One timed run each after a warm-up batch
   (a cold build is minutes on a CPU), on two clocks: wall and process CPU (all threads). Max abs diff
   of the normalized features. Extrapolated to the whole vocabulary (time per term x 119,034); with
   --full, fastcal's ``OutlierBank.build`` of the whole vocabulary is measured once.
2. Warm load: ``wordnet_nouns()`` from its cache, and ``OutlierBank.build`` finding the full-size bank
   file (119,034 x 512 float32; memory-mapped, checksum verified); median of --repeats. Without --full
   the file holds random features under the real key (the load path does not look at the values).
   The three parts are timed apart: vocabulary, ``model_fingerprint`` (the key), bank file.
3. Top-K near-OOD selection (K = 5,000) over the full vocabulary for 1,000 random classes: fastcal's
   chunked ``max_class_similarity`` + topk vs one dense (T, C) similarity matrix + topk; then the
   class-name exclusion and the whole ``select_outliers``.
4. A training step, CoOp vs CoOp + DOR (ViT-B-32, --step-classes classes, batch 32 cached image
   features, context "a photo of a", 100 outliers): forward, loss, backward, SGD step; median of
   --repeats after a warm-up. The overhead is the 100 outlier prompts through the text tower.

Targets: cold build speed-up >= 6x; warm load < 1 s.

    .venv/bin/python bench/outlier_bank.py            # 5,000-term cold build, 1,000 classes
    .venv/bin/python bench/outlier_bank.py --quick    # 500 terms, fewer repeats
    .venv/bin/python bench/outlier_bank.py --full     # also the whole vocabulary, once (long on a CPU)
"""

from __future__ import annotations

import argparse
import random
import tempfile
from pathlib import Path
from types import SimpleNamespace

import harness
import open_clip
import torch
import torch.nn.functional as F

from fastcal._io import key_digest, save_tensors
from fastcal.models.fingerprint import model_fingerprint
from fastcal.outliers import (
    DORegularizer,
    OutlierBank,
    Vocabulary,
    class_exclusion_mask,
    encode_prompts,
    max_class_similarity,
    select_outliers,
    wordnet_nouns,
)
from fastcal.outliers.selection import CHUNK_ELEMENTS

TEMPLATE = "a photo of a {}."
TARGETS = {"cold_speedup": 6.0, "warm_load_seconds": 1.0}
CLOCKS = harness.WALL_AND_CPU


def baseline_encode(model, tokenizer, prompts: list[str], batch: int) -> torch.Tensor:
    """The usual way: 77-token ids, ``model.encode_text`` batch by batch, in vocabulary order."""
    chunks = []
    with torch.no_grad():
        for begin in range(0, len(prompts), batch):
            chunks.append(model.encode_text(tokenizer(prompts[begin : begin + batch])).float())
    return F.normalize(torch.cat(chunks), dim=-1)


def cold_build(model, tokenizer, vocabulary: Vocabulary, n_terms: int, batch: int, seed: int) -> dict:
    rng = random.Random(seed)
    sample = rng.sample(range(len(vocabulary)), n_terms)
    prompts = [TEMPLATE.format(vocabulary.terms[i]) for i in sample]
    warm = prompts[:batch]
    baseline_encode(model, tokenizer, warm, batch)
    encode_prompts(model, tokenizer, warm, batch_size=batch, progress=False)
    base_seconds, base = harness.timed(lambda: baseline_encode(model, tokenizer, prompts, batch), CLOCKS)
    fast_seconds, fast = harness.timed(
        lambda: encode_prompts(model, tokenizer, prompts, batch_size=batch, progress=False), CLOCKS
    )
    lengths = (tokenizer(prompts).argmax(dim=-1) + 1).float()
    return {
        "terms": n_terms,
        "mean_tokens": float(lengths.mean()),
        "max_tokens": int(lengths.max()),
        "baseline_seconds": base_seconds,
        "fastcal_seconds": fast_seconds,
        "speedup": {clock: base_seconds[clock] / fast_seconds[clock] for clock in CLOCKS},
        "max_abs_diff": float((base - fast).abs().max()),
        "extrapolated_full": {
            name: {clock: seconds[clock] / n_terms * len(vocabulary) for clock in CLOCKS}
            for name, seconds in (("baseline", base_seconds), ("fastcal", fast_seconds))
        },
    }


def full_size_bank(model, tokenizer, vocabulary: Vocabulary, cache: Path, measure_full: bool) -> dict:
    """The whole vocabulary's bank file: built for real (timed once) with --full, else random
    features under the real key."""
    if measure_full:
        seconds, bank = harness.timed(
            lambda: OutlierBank.build(model, tokenizer, vocabulary, TEMPLATE, cache_dir=cache, progress=True),
            CLOCKS,
        )
        return {"measured_seconds": seconds, "dim": bank.features.shape[1], "synthetic": False}
    key = OutlierBank.cache_key(model, tokenizer, vocabulary, TEMPLATE)
    dim = model.text_projection.shape[1]
    features = F.normalize(
        torch.randn(len(vocabulary), dim, generator=torch.Generator().manual_seed(0)), dim=-1
    )
    save_tensors(cache / f"bank-{key_digest(key)}.safetensors", {"features": features}, key)
    return {"measured_seconds": None, "dim": dim, "synthetic": True}


def warm_load(model, tokenizer, cache: Path, repeats: int) -> dict:
    vocabulary = harness.repeated(wordnet_nouns, repeats, clocks=CLOCKS)
    fingerprint = harness.repeated(lambda: model_fingerprint(model), repeats, clocks=CLOCKS)
    bank = harness.repeated(
        lambda: OutlierBank.build(
            model,
            tokenizer,
            vocabulary.output,
            TEMPLATE,
            cache_dir=cache,
            progress=False,
            model_key=fingerprint.output,
        ),
        repeats,
        clocks=CLOCKS,
    )
    parts = (vocabulary.median, fingerprint.median, bank.median)
    return {
        "vocabulary_seconds": vocabulary.median,
        "fingerprint_seconds": fingerprint.median,
        "bank_seconds": bank.median,
        "total_seconds": {c: sum(p[c] for p in parts) for c in CLOCKS},
        "file_bytes": bank.output.path.stat().st_size,
        "bank": bank.output,
    }


def selection(bank: OutlierBank, n_classes: int, repeats: int) -> dict:
    generator = torch.Generator().manual_seed(1)
    classes = F.normalize(torch.randn(n_classes, bank.features.shape[1], generator=generator), dim=-1)
    classnames = [f"class {i}" for i in range(n_classes)]

    def chunked():
        return max_class_similarity(bank.features, classes).topk(5000).indices

    def dense():
        return (bank.features @ classes.T).amax(dim=1).topk(5000).indices

    runs = harness.interleaved(
        {
            "chunked": chunked,
            "dense": dense,
            "select_outliers": lambda: select_outliers(bank, classes, classnames, k=5000),
            "exclusion": lambda: class_exclusion_mask(bank.vocabulary, classnames),
        },
        repeats,
        clocks=CLOCKS,
    )
    return {
        "classes": n_classes,
        "k": 5000,
        "fastcal_seconds": runs["chunked"].median,
        "dense_seconds": runs["dense"].median,
        "select_outliers_seconds": runs["select_outliers"].median,
        "exclusion_seconds": runs["exclusion"].median,
        "fastcal_peak_matrix_bytes": 4 * CHUNK_ELEMENTS,
        "dense_matrix_bytes": 4 * len(bank) * n_classes,
        "same_top_k": set(runs["chunked"].output.tolist()) == set(runs["dense"].output.tolist()),
    }


def training_step(model, tokenizer, pool, n_classes: int, repeats: int) -> dict:
    from fastcal.methods.coop import CoOp

    classnames = list(open_clip.IMAGENET_CLASSNAMES[:n_classes])
    method = CoOp(model, tokenizer, classnames, ctx_init="a photo of a")
    optimizer = torch.optim.SGD([method.prompt_learner.ctx], lr=0.002, momentum=0.9)
    generator = torch.Generator().manual_seed(2)
    features = torch.randn(32, model.visual.output_dim, generator=generator)
    labels = torch.randint(0, n_classes, (32,), generator=generator)
    dor = DORegularizer(pool, weight=8.0, n_outliers=100)
    dor.on_epoch_start(0)

    def step(with_dor: bool):
        output = method.output(features)
        loss = F.cross_entropy(output.logits, labels)
        if with_dor:
            loss = loss + dor(SimpleNamespace(method=method, output=output))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    runs = harness.interleaved(
        {"coop": lambda: step(False), "dor": lambda: step(True)}, repeats, clocks=CLOCKS
    )
    coop, with_dor = runs["coop"].median, runs["dor"].median
    return {
        "classes": n_classes,
        "batch": 32,
        "outliers": 100,
        "coop_seconds": coop,
        "dor_seconds": with_dor,
        "overhead": {c: with_dor[c] / coop[c] - 1.0 for c in CLOCKS},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="500 terms, 1 repeat")
    parser.add_argument("--full", action="store_true", help="also build the whole vocabulary's bank once")
    parser.add_argument("--terms", type=int, default=None, help="cold-build sample size (default 5000)")
    parser.add_argument("--batch", type=int, default=1024, help="prompts per encoder call (default 1024)")
    parser.add_argument("--classes", type=int, default=1000, help="classes for the top-K selection")
    parser.add_argument("--step-classes", type=int, default=50, help="classes of the CoOp step (default 50)")
    parser.add_argument("--repeats", type=int, default=None, help="repeats of the cheap measurements")
    parser.add_argument("--model", default="ViT-B-32", help="open_clip architecture (random init)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    env = harness.start(args.threads)
    n_terms = args.terms or (500 if args.quick else 5000)
    repeats = args.repeats or (1 if args.quick else 5)

    torch.manual_seed(0)
    model = open_clip.create_model(args.model, pretrained=None).eval().requires_grad_(False)
    tokenizer = open_clip.get_tokenizer(args.model)
    vocabulary = wordnet_nouns()
    print(f"{args.model} (random init); vocabulary: {vocabulary}")

    cold = cold_build(model, tokenizer, vocabulary, n_terms, args.batch, seed=0)
    with tempfile.TemporaryDirectory(prefix="fastcal-bench-bank-") as folder:
        cache = Path(folder)
        full = full_size_bank(model, tokenizer, vocabulary, cache, args.full)
        warm = warm_load(model, tokenizer, cache, repeats)
        bank = warm.pop("bank")
        select = selection(bank, args.classes, repeats)
        classes = F.normalize(torch.randn(args.step_classes, bank.features.shape[1]), dim=-1)
        pool = select_outliers(bank, classes, [f"class {i}" for i in range(args.step_classes)], k=5000)
        step = training_step(model, tokenizer, pool, args.step_classes, repeats)

    def row(label: str, seconds: dict, extra: str = "") -> None:
        print(f"{label:38s} {seconds['wall']:9.2f} {seconds['cpu']:9.2f}{extra}")

    tokens = f"mean {cold['mean_tokens']:.1f} tokens, max {cold['max_tokens']}"
    print(f"\n1. cold build, {n_terms:,} WordNet terms ({tokens})")
    print(f"{'variant':38s} {'wall s':>9s} {'cpu s':>9s}")
    row("open_clip encode_text (77 tokens)", cold["baseline_seconds"])
    row("fastcal encode_prompts (sorted, exact)", cold["fastcal_seconds"])
    print(
        f"speed-up: {cold['speedup']['wall']:.1f}x wall, {cold['speedup']['cpu']:.1f}x cpu; "
        f"max abs diff {cold['max_abs_diff']:.2e}"
    )
    ex = cold["extrapolated_full"]
    print(
        f"whole vocabulary ({len(vocabulary):,} terms), extrapolated (wall): "
        f"open_clip {ex['baseline']['wall'] / 60:.1f} min, fastcal {ex['fastcal']['wall'] / 60:.1f} min"
    )
    if full["measured_seconds"] is not None:
        minutes = full["measured_seconds"]["wall"] / 60
        print(f"whole vocabulary, measured once (OutlierBank.build): {minutes:.1f} min wall")
    synthetic = ", synthetic values" if full["synthetic"] else ""
    size = f"{len(vocabulary):,} x {full['dim']} float32, {warm['file_bytes'] / 2**20:.0f} MiB{synthetic}"
    print(f"\n2. warm load ({size})")
    row("vocabulary (cached JSON)", warm["vocabulary_seconds"])
    row("model_fingerprint (the cache key)", warm["fingerprint_seconds"])
    row("bank (memory-mapped, checksum)", warm["bank_seconds"])
    row("total", warm["total_seconds"])
    print(f"\n3. top-K near-OOD selection, {select['classes']:,} classes, K = 5,000")
    chunk_mib = select["fastcal_peak_matrix_bytes"] / 2**20
    dense_mib = select["dense_matrix_bytes"] / 2**20
    row(
        "fastcal chunked similarity + topk",
        select["fastcal_seconds"],
        f"   similarities <= {chunk_mib:.0f} MiB",
    )
    row("dense similarity + topk", select["dense_seconds"], f"   similarities {dense_mib:.0f} MiB")
    row("class-name exclusion (119k terms)", select["exclusion_seconds"])
    row("select_outliers (all of it)", select["select_outliers_seconds"])
    print(f"same top-K: {select['same_top_k']}")
    print(f"\n4. training step, {step['classes']} classes, batch 32, 100 outliers")
    row("CoOp", step["coop_seconds"])
    row("CoOp + DOR", step["dor_seconds"])
    print(
        f"DOR overhead: {100 * step['overhead']['wall']:.0f}% wall, {100 * step['overhead']['cpu']:.0f}% cpu"
    )

    targets = harness.report_targets(
        {
            "cold_speedup": harness.Target(
                f"cold build speed-up, {n_terms:,} terms (wall)",
                cold["speedup"]["wall"],
                TARGETS["cold_speedup"],
            ),
            "warm_load_seconds": harness.Target(
                "warm load (wall)",
                warm["total_seconds"]["wall"],
                TARGETS["warm_load_seconds"],
                "<",
                "seconds",
            ),
        }
    )
    harness.write_results(
        "outlier_bank",
        {
            "model": args.model,
            "vocabulary_terms": len(vocabulary),
            "template": TEMPLATE,
            "targets": targets,
            "cold_build": cold,
            "full_vocabulary": full,
            "warm_load": warm,
            "selection": select,
            "training_step": step,
        },
        env,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
