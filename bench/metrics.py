"""Bench: streaming ECE over 10^7 samples, fastcal.metrics.CalibrationMeter vs torchmetrics.

Both consume the same stream of (chunk, C) float32 probability chunks (a pool of distinct chunks
cycled, so generating data is not timed) and then compute their result. torchmetrics'
MulticlassCalibrationError keeps every sample's confidence and hit (O(N) "cat" states); the meter keeps
3 * n_bins + 2 float64 sums (and computes ECE, MCE, l2, Brier, NLL, accuracy and mean confidence).

Time: median over repeats after a warm-up, in this process. Peak memory: each variant runs the whole
stream in a fresh subprocess; the peak is VmHWM after the stream minus VmRSS before it (the kernel's
high-water mark is reset after the data pool is built, via /proc/self/clear_refs). Also reported: the
bytes each metric object holds after the stream. Results go to bench/results/metrics.json.

    .venv/bin/python bench/metrics.py            # 10^7 samples
    .venv/bin/python bench/metrics.py --quick    # 10^6 samples, 1 repeat
    .venv/bin/python bench/metrics.py --threads 1  # steadier timings on a shared machine
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "metrics.json"
POOL_CHUNKS = 8
PEAK_RESOLUTION = 2**20  # bytes


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


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(args) -> None:
    """Run one variant's stream in this (fresh) process and print its peak memory as JSON."""
    pool = make_pool(args.chunk, args.classes)
    metric = make_metric(args.memory_child, args.n_bins, args.classes, validate=not args.no_validate)
    run_stream(metric, pool, 2)  # import-time and first-call allocations are not the metric's
    metric.reset()
    Path("/proc/self/clear_refs").write_text("5")
    baseline = _status_kib("VmRSS")
    run_stream(metric, pool, args.samples // args.chunk)
    peak = _status_kib("VmHWM")
    print(json.dumps({"peak_bytes": (peak - baseline) * 1024, "held_bytes": held_bytes(metric)}))


def measure_memory(variant: str, args) -> dict:
    command = [
        sys.executable,
        __file__,
        "--memory-child",
        variant,
        "--samples",
        str(args.samples),
        "--chunk",
        str(args.chunk),
        "--classes",
        str(args.classes),
        "--n-bins",
        str(args.n_bins),
        "--threads",
        str(args.threads),
    ]
    if args.no_validate:
        command.append("--no-validate")
    out = subprocess.run(command, check=True, capture_output=True, text=True, cwd=ROOT).stdout
    return json.loads(out.strip().splitlines()[-1])


def measure_time(variant: str, pool, args, validate: bool) -> tuple[float, float]:
    n_chunks = args.samples // args.chunk
    run_stream(make_metric(variant, args.n_bins, args.classes, validate), pool, min(n_chunks, 5))  # warm-up
    times, value = [], float("nan")
    for _ in range(args.repeats):
        metric = make_metric(variant, args.n_bins, args.classes, validate)
        start = time.perf_counter()
        value = run_stream(metric, pool, n_chunks)
        times.append(time.perf_counter() - start)
    return statistics.median(times), value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10^6 samples, 1 repeat")
    parser.add_argument("--samples", type=int, default=10_000_000)
    parser.add_argument("--chunk", type=int, default=100_000)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--n-bins", type=int, default=15)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--no-validate", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--memory-child", choices=("fastcal", "torchmetrics"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args)
        return
    if args.quick:
        args.samples, args.repeats = 1_000_000, 1

    from fastcal._io import write_json_atomic

    pool = make_pool(args.chunk, args.classes)
    rows = []
    for validate in (True, False):
        args.no_validate = not validate
        row = {"validate": validate}
        for variant in ("torchmetrics", "fastcal"):
            seconds, value = measure_time(variant, pool, args, validate)
            memory = measure_memory(variant, args)
            row[variant] = {"seconds": seconds, "ece": value, **memory}
        row["time_ratio"] = row["torchmetrics"]["seconds"] / row["fastcal"]["seconds"]
        # below a MiB, VmHWM - VmRSS is page-level noise (freed chunks reused), not a measurable peak:
        # the ratio is then a lower bound
        fastcal_peak = row["fastcal"]["peak_bytes"]
        row["peak_memory_ratio"] = row["torchmetrics"]["peak_bytes"] / max(fastcal_peak, PEAK_RESOLUTION)
        row["peak_memory_ratio_is_lower_bound"] = fastcal_peak < PEAK_RESOLUTION
        row["held_memory_ratio"] = row["torchmetrics"]["held_bytes"] / row["fastcal"]["held_bytes"]
        row["ece_abs_diff"] = abs(row["torchmetrics"]["ece"] - row["fastcal"]["ece"])
        rows.append(row)

    mib = 1 / 2**20
    print(
        f"\nStreaming ECE: {args.samples:,} samples, C={args.classes}, chunks of {args.chunk:,}, "
        f"{args.n_bins} bins, median of {args.repeats} (torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads)"
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
        "Targets: issue 3 sets no numeric target for this bench (it asks for time and peak memory); "
        "ratios are torchmetrics / fastcal."
    )

    write_json_atomic(
        RESULTS,
        {
            "bench": "metrics",
            "samples": args.samples,
            "classes": args.classes,
            "chunk": args.chunk,
            "n_bins": args.n_bins,
            "repeats": args.repeats,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "machine": platform.platform(),
            "cpu_count": os.cpu_count(),
            "rows": rows,
        },
    )
    print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
