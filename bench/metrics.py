"""Bench: streaming ECE over 10^7 samples, fastcal.metrics.CalibrationMeter vs torchmetrics; with
--posthoc, the post-hoc calibrators' fits, fastcal.calibrate vs netcal.

Both consume the same stream of (chunk, C) float32 probability chunks (a pool of distinct chunks
cycled, so generating data is not timed) and then compute their result. torchmetrics'
MulticlassCalibrationError keeps every sample's confidence and hit (O(N) "cat" states); the meter keeps
3 * n_bins + 2 float64 sums (and computes ECE, MCE, l2, Brier, NLL, accuracy and mean confidence).

Time: a warm-up, then rounds that run each variant's whole stream once in turn; the median per variant,
in this process. Peak memory: each variant runs the whole stream in a fresh subprocess (glibc's
allocator left as it is); the peak is VmHWM after the stream minus VmRSS before it (the kernel's
high-water mark is reset after the data pool is built, via /proc/self/clear_refs). Also reported: the
bytes each metric object holds after the stream. Results go to bench/results/metrics.json.

    .venv/bin/python bench/metrics.py            # 10^7 samples
    .venv/bin/python bench/metrics.py --quick    # 10^6 samples, 1 repeat
    .venv/bin/python bench/metrics.py --threads 1  # steadier timings on a shared machine

--posthoc: each calibrator (ts, histogram, isotonic, vector, matrix) is fitted by fastcal and by
netcal's equivalent (TemperatureScaling, HistogramBinning, IsotonicRegression, LogisticCalibration with
temperature_only=False; netcal has no matrix scaling) on the same synthetic data: 90% of
--posthoc-samples rows of --posthoc-classes miscalibrated logits (3 x the true logits plus a class
bias), the last 10% held out. fastcal fits the float32 logits (vector scaling: their log-softmax, where
netcal's definition coincides), netcal the float64 softmax probabilities (its API takes probabilities;
float32 would make its TS the identity, its issue #61). Each fit runs once in a fresh subprocess, which
also reports its peak memory and the held-out ECE after the fit; glibc's allocator keeps its defaults
there (a user's setting: returning every freed block to the kernel would time page faults, not fits).
Results go to bench/results/metrics_posthoc.json.

    .venv/bin/python bench/metrics.py --posthoc                       # 10^6 x 1,000
    .venv/bin/python bench/metrics.py --posthoc --posthoc-samples 100000 --posthoc-calibrators ts,isotonic
"""

from __future__ import annotations

import argparse
import sys

import harness
import torch

VARIANTS = ("torchmetrics", "fastcal")
POOL_CHUNKS = 8


def make_pool(chunk: int, classes: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    pool = []
    for _ in range(POOL_CHUNKS):
        logits = torch.randn(chunk, classes, generator=generator) * 2.0
        probs = torch.softmax(logits, dim=1)
        labels = torch.multinomial(torch.softmax(logits * 1.3, dim=1), 1, generator=generator).squeeze(1)
        pool.append((probs, labels))
    return pool


def make_metric(variant: str, n_bins: int, classes: int, validate: bool):
    if variant == "fastcal":
        from fastcal.metrics import CalibrationMeter

        return CalibrationMeter(n_bins, validate=validate)
    from torchmetrics.classification import MulticlassCalibrationError

    return MulticlassCalibrationError(num_classes=classes, n_bins=n_bins, norm="l1", validate_args=validate)


def run_stream(metric, pool, n_chunks: int) -> float:
    for i in range(n_chunks):
        probs, labels = pool[i % len(pool)]
        metric.update(probs, labels)
    result = metric.compute()
    return float(result["ece"] if isinstance(result, dict) else result)


def held_bytes(metric) -> int:
    """Bytes of tensors the metric object holds (its accumulated state)."""
    total = 0
    for value in vars(metric).values():
        items = value if isinstance(value, (list, tuple)) else [value]
        total += sum(t.numel() * t.element_size() for t in items if isinstance(t, torch.Tensor))
    return total


def memory_child(variant: str, samples: int, chunk: int, classes: int, n_bins: int, validate: bool) -> dict:
    """Run one variant's stream in this (fresh) process: its peak memory and the bytes it holds after."""
    pool = make_pool(chunk, classes)
    metric = make_metric(variant, n_bins, classes, validate)
    run_stream(metric, pool, 2)  # import-time and first-call allocations are not the metric's
    metric.reset()
    peak, _ = harness.peak_memory(lambda: run_stream(metric, pool, samples // chunk))
    return {"peak_bytes": peak, "held_bytes": held_bytes(metric)}


def measure_memory(variant: str, args, validate: bool) -> dict:
    memory = harness.in_subprocess(
        memory_child,
        release_freed=False,
        variant=variant,
        samples=args.samples,
        chunk=args.chunk,
        classes=args.classes,
        n_bins=args.n_bins,
        validate=validate,
    )
    if "error" in memory:
        sys.exit(f"bench/metrics.py: memory of {variant}: {memory['error']}")
    return memory


def measure_times(pool, args, validate: bool) -> dict[str, harness.Runs]:
    """Every variant's whole stream (update + compute) once per round; the output is the ECE."""
    n_chunks = args.samples // args.chunk
    metrics = {variant: make_metric(variant, args.n_bins, args.classes, validate) for variant in VARIANTS}
    for metric in metrics.values():
        run_stream(metric, pool, min(n_chunks, 5))  # warm-up

    def stream(metric):
        def run():
            metric.reset()
            return run_stream(metric, pool, n_chunks)

        return run

    return harness.interleaved(
        {variant: stream(metric) for variant, metric in metrics.items()}, args.repeats, warmup=0
    )


# ---- post-hoc calibrators --------------------------------------------------------------------------
POSTHOC = ("ts", "histogram", "isotonic", "vector", "matrix")
NETCAL = {
    "ts": ("netcal.scaling", "TemperatureScaling", {}),
    "histogram": ("netcal.binning", "HistogramBinning", {"bins": 10}),
    "isotonic": ("netcal.binning", "IsotonicRegression", {}),
    "vector": ("netcal.scaling", "LogisticCalibration", {"temperature_only": False}),
}
DATA_CHUNK = 100_000


def miscalibrated_logits(samples: int, classes: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 logits 3 t + bias and labels drawn from softmax(t), t ~ 1.5 N(0, 1), made in chunks."""
    generator = torch.Generator().manual_seed(seed)
    bias = torch.linspace(-1.0, 1.0, classes)
    logits = torch.empty(samples, classes)
    labels = torch.empty(samples, dtype=torch.long)
    for start in range(0, samples, DATA_CHUNK):
        true = torch.randn(min(DATA_CHUNK, samples - start), classes, generator=generator) * 1.5
        labels[start : start + len(true)] = torch.multinomial(
            true.softmax(1), 1, generator=generator
        ).squeeze(1)
        logits[start : start + len(true)] = true * 3.0 + bias
    return logits, labels


def posthoc_child(library: str, calibrator: str, samples: int, classes: int) -> dict:
    """Fit one calibrator in this (fresh) process; its fit time, peak memory and held-out ECE."""
    import time
    import warnings

    from fastcal.metrics import ece

    logits, labels = miscalibrated_logits(samples, classes)
    split = samples * 9 // 10
    test_labels = labels[split:]
    if library == "fastcal":
        from fastcal import registry

        model = registry.get("calibrator", calibrator)()
        inputs = logits.log_softmax(1) if calibrator == "vector" else logits
        start = time.perf_counter()
        peak, _ = harness.peak_memory(lambda: model.fit(inputs[:split], labels[:split]))
        seconds = time.perf_counter() - start
        after = model.transform(inputs[split:]).double()
    else:
        import importlib

        module, name, options = NETCAL[calibrator]
        probs = logits.double().softmax(1).numpy()
        del logits
        model = getattr(importlib.import_module(module), name)(**options)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            start = time.perf_counter()
            peak, _ = harness.peak_memory(lambda: model.fit(probs[:split], labels[:split].numpy()))
            seconds = time.perf_counter() - start
            after = torch.from_numpy(model.transform(probs[split:])).double()
        after = after / after.sum(1, keepdim=True)  # netcal clips to [0, 1]; rows re-summed to 1
        inputs = torch.from_numpy(probs).log()
    before = float(ece(inputs[split:].double().softmax(1), test_labels))
    return {
        "seconds": seconds,
        "peak_bytes": peak,
        "ece_before": before,
        "ece_after": float(ece(after, test_labels)),
    }


def posthoc(args, env) -> None:
    calibrators = [c for c in args.posthoc_calibrators.split(",") if c]
    for name in calibrators:
        if name not in POSTHOC:
            sys.exit(f"bench/metrics.py: --posthoc-calibrators: expected names of {POSTHOC}, got {name!r}")
    size = {"samples": args.posthoc_samples, "classes": args.posthoc_classes}
    rows = []
    for name in calibrators:
        row = {"calibrator": name, **size}
        for library in ("fastcal", "netcal") if name in NETCAL else ("fastcal",):
            row[library] = harness.in_subprocess(
                posthoc_child, release_freed=False, library=library, calibrator=name, **size
            )
        if "seconds" in row.get("netcal", {}) and "seconds" in row["fastcal"]:
            row["time_ratio"] = row["netcal"]["seconds"] / row["fastcal"]["seconds"]
        rows.append(row)
    print(f"\nPost-hoc fits: {size['samples']:,} x {size['classes']:,} classes (90% fit, 10% held out)")
    columns = [  # title, library, key, scale, format
        ("fastcal s", "fastcal", "seconds", 1.0, ".2f"),
        ("netcal s", "netcal", "seconds", 1.0, ".2f"),
        ("fc peak MiB", "fastcal", "peak_bytes", 2**-20, ".0f"),
        ("nc peak MiB", "netcal", "peak_bytes", 2**-20, ".0f"),
        ("ECE before", "fastcal", "ece_before", 1.0, ".4f"),
        ("fc after", "fastcal", "ece_after", 1.0, ".4f"),
        ("nc after", "netcal", "ece_after", 1.0, ".4f"),
    ]
    header = f"{'calibrator':<11}{'ratio':>8}" + "".join(f"{title:>13}" for title, *_ in columns)
    print(header)
    print("-" * len(header))
    for r in rows:
        cells = []
        for _, library, key, scale, fmt in columns:
            result = r.get(library, {})
            cells.append(f"{result[key] * scale:{fmt}}" if key in result else result.get("error", "-")[:12])
        ratio = f"{r['time_ratio']:.1f}x" if "time_ratio" in r else "-"
        print(f"{r['calibrator']:<11}{ratio:>8}" + "".join(f"{c:>13}" for c in cells))
    print("Ratios are netcal / fastcal fit time; no numeric target for this bench.")
    harness.write_results("metrics_posthoc", {**size, "rows": rows}, env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10^6 samples, 1 repeat")
    parser.add_argument("--samples", type=int, default=10_000_000)
    parser.add_argument("--chunk", type=int, default=100_000)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--n-bins", type=int, default=15)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--posthoc", action="store_true", help="bench the post-hoc calibrators' fits instead")
    parser.add_argument("--posthoc-samples", type=int, default=1_000_000)
    parser.add_argument("--posthoc-classes", type=int, default=1000)
    parser.add_argument("--posthoc-calibrators", default=",".join(POSTHOC), help="comma-separated")
    args = parser.parse_args()
    env = harness.start(args.threads)
    if args.posthoc:
        posthoc(args, env)
        return
    if args.quick:
        args.samples, args.repeats = 1_000_000, 1

    pool = make_pool(args.chunk, args.classes)
    rows = []
    for validate in (True, False):
        runs = measure_times(pool, args, validate)
        row = {"validate": validate}
        for variant in VARIANTS:
            memory = measure_memory(variant, args, validate)
            row[variant] = {"seconds": runs[variant].median["wall"], "ece": runs[variant].output, **memory}
        row["time_ratio"] = row["torchmetrics"]["seconds"] / row["fastcal"]["seconds"]
        row["peak_memory_ratio"], row["peak_memory_ratio_is_lower_bound"] = harness.peak_ratio(
            row["torchmetrics"]["peak_bytes"], row["fastcal"]["peak_bytes"]
        )
        row["held_memory_ratio"] = row["torchmetrics"]["held_bytes"] / row["fastcal"]["held_bytes"]
        row["ece_abs_diff"] = abs(row["torchmetrics"]["ece"] - row["fastcal"]["ece"])
        rows.append(row)

    mib = 1 / 2**20
    print(
        f"\nStreaming ECE: {args.samples:,} samples, C={args.classes}, chunks of {args.chunk:,}, "
        f"{args.n_bins} bins, median of {args.repeats}"
    )
    header = (
        f"{'validation':<11}{'torchmetrics s':>15}{'fastcal s':>11}{'ratio':>8}"
        f"{'tm peak MiB':>13}{'fc peak MiB':>13}{'ratio':>8}"
        f"{'tm held MiB':>13}{'fc held B':>11}{'|dECE|':>10}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        tm, fc = r["torchmetrics"], r["fastcal"]
        peak_ratio = (">" if r["peak_memory_ratio_is_lower_bound"] else "") + f"{r['peak_memory_ratio']:.1f}x"
        print(
            f"{'on' if r['validate'] else 'off':<11}{tm['seconds']:>15.3f}{fc['seconds']:>11.3f}"
            f"{r['time_ratio']:>7.2f}x{tm['peak_bytes'] * mib:>13.1f}{fc['peak_bytes'] * mib:>13.1f}"
            f"{peak_ratio:>8}{tm['held_bytes'] * mib:>13.1f}{fc['held_bytes']:>11d}"
            f"{r['ece_abs_diff']:>10.1e}"
        )
    print(
        "Targets: no numeric target for this bench (it asks for time and peak memory); "
        "ratios are torchmetrics / fastcal."
    )
    harness.write_results(
        "metrics",
        {
            "samples": args.samples,
            "classes": args.classes,
            "chunk": args.chunk,
            "n_bins": args.n_bins,
            "repeats": args.repeats,
            "rows": rows,
        },
        env,
    )


if __name__ == "__main__":
    main()
