"""Bench: a CoOp epoch over cached image features vs re-encoding the images every epoch.

With a frozen image encoder (CoOp, KgCoOp, ...), each epoch's image features are the same function of
the same pixels: fastcal.models.cache.image_features computes them once and memory-maps them after.

Set-up: a random-init ViT-B-32 (load_clip), --images synthetic 224x224 images (default 320; --quick 64)
over 10 classes, already tensors (no decoding or resizing: that would only add to the re-encode
side). The training step is a stand-in for CoOp's, since the prompt learner is not written yet: a
linear probe whose parameters have the shape of the class-text features, (C, D), trained with CoOp's
loss and optimizer (cosine logits scaled by 100, cross-entropy, SGD lr 0.002 momentum 0.9, batch 32).
The text side is excluded on purpose: it is the same in both variants.

Variants, per epoch: "re-encode" (encode_image on every batch, then the step), "cold cache" (compute
and write the cache file, then the steps: the first epoch), "warm cache" (memory-map the file, then the
steps: every later epoch). Time: after a warm-up, --repeats rounds that run each variant once in turn;
the median, wall-clock and this process's CPU time (steadier when other processes share the cores);
cold runs each use a fresh cache folder. Also printed: a whole CoOp run of --epochs epochs (default 50,
CoOp's ImageNet schedule) as cold + (epochs - 1) x warm vs epochs x re-encode, and the features' max
abs diff (cached vs re-encoded).

    .venv/bin/python bench/feature_cache.py
    .venv/bin/python bench/feature_cache.py --quick
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import harness
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from fastcal.models import load_clip, model_fingerprint
from fastcal.models.cache import image_features

CLASSES = 10
BATCH = 32


class SyntheticImages(Dataset):
    """Deterministic 224x224 images (smooth noise), following fastcal's dataset protocol."""

    def __init__(self, n: int, seed: int = 0):
        self.n, self.seed = n, seed
        self.classnames = [f"class {i}" for i in range(CLASSES)]
        self.labels = [i % CLASSES for i in range(n)]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        coarse = torch.randn(1, 3, 14, 14, generator=g)
        image = F.interpolate(coarse, size=224, mode="bilinear", align_corners=False)[0]
        return image, self.labels[index]

    def fingerprint(self) -> str:
        return f"synthetic-images-{self.n}-{self.seed}"


class Probe(torch.nn.Module):
    """Stand-in for the prompt learner: class weights shaped like the class-text features."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = torch.nn.Parameter(F.normalize(torch.randn(CLASSES, dim), dim=-1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return 100.0 * F.normalize(features, dim=-1) @ F.normalize(self.weight, dim=-1).T


def step(probe, optimizer, features, labels) -> None:
    loss = F.cross_entropy(probe(features), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def new_probe(dim: int):
    torch.manual_seed(1)
    probe = Probe(dim)
    return probe, torch.optim.SGD(probe.parameters(), lr=0.002, momentum=0.9)


def epoch_reencode(model, dataset, dim) -> torch.Tensor:
    probe, optimizer = new_probe(dim)
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))
    features = []
    for batch in order.split(BATCH):
        images = torch.stack([dataset[int(i)][0] for i in batch])
        labels = torch.tensor([dataset.labels[int(i)] for i in batch])
        with torch.no_grad():
            batch_features = model.encode_image(images)
        features.append(batch_features)
        step(probe, optimizer, batch_features, labels)
    return torch.cat(features)[torch.argsort(order)]


def epoch_cached(model, dataset, dim, key: str, cache_dir: Path) -> torch.Tensor:
    probe, optimizer = new_probe(dim)
    features, labels = image_features(
        model.encode_image, dataset, model_key=key, transform_key="none", cache_dir=cache_dir, progress=False
    )
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))
    for batch in order.split(BATCH):
        step(probe, optimizer, features[batch], labels[batch])
    return features


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="64 images, 1 repeat")
    parser.add_argument("--images", type=int, default=None, help="number of images (default 320)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default 3; --quick 1)")
    parser.add_argument("--epochs", type=int, default=50, help="epochs of the whole-run estimate")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    n_images = args.images or (64 if args.quick else 320)
    repeats = args.repeats or (1 if args.quick else 3)
    env = harness.start(args.threads)

    torch.manual_seed(0)
    model = load_clip("ViT-B-32").model
    for p in model.parameters():
        p.requires_grad_(False)
    dataset = SyntheticImages(n_images)
    dim = model.visual.output_dim
    key = model_fingerprint(model)

    with tempfile.TemporaryDirectory(prefix="fastcal-bench-cache-") as tmp:
        tmp = Path(tmp)
        with torch.no_grad():
            model.encode_image(torch.stack([dataset[i][0] for i in range(4)]))  # warm-up
        epoch_cached(model, dataset, dim, key, tmp / "warm")  # writes the file the warm epochs read
        cold_runs = iter(range(repeats))
        runs = harness.interleaved(
            {
                "reencode": lambda: epoch_reencode(model, dataset, dim),
                "cold": lambda: epoch_cached(model, dataset, dim, key, tmp / f"cold{next(cold_runs)}"),
                "warm": lambda: epoch_cached(model, dataset, dim, key, tmp / "warm"),
            },
            repeats,
            warmup=0,
            clocks=harness.WALL_AND_CPU,
        )
        file_bytes = sum(f.stat().st_size for f in (tmp / "warm").rglob("*.safetensors"))

    reencode_s, cold_s, warm_s = (runs[variant].median for variant in ("reencode", "cold", "warm"))
    diff = float((runs["warm"].output - runs["reencode"].output).abs().max())
    setup = f"{n_images} images 224x224, {CLASSES} classes, batch {BATCH}, {repeats} repeats"
    print(f"ViT-B-32 (random init), {setup}")
    timings = {}
    for clock, title in (("wall", "wall s"), ("cpu", "CPU s")):
        run_reencode = args.epochs * reencode_s[clock]
        run_cached = cold_s[clock] + (args.epochs - 1) * warm_s[clock]
        timings[clock] = {
            "reencode_epoch_s": reencode_s[clock],
            "cold_cache_epoch_s": cold_s[clock],
            "warm_cache_epoch_s": warm_s[clock],
            "run_reencode_s": run_reencode,
            "run_cached_s": run_cached,
        }
        rows = [
            ("re-encode epoch", reencode_s[clock], 1.0),
            ("cold cache epoch", cold_s[clock], reencode_s[clock] / cold_s[clock]),
            ("warm cache epoch", warm_s[clock], reencode_s[clock] / warm_s[clock]),
            (f"{args.epochs}-epoch run, re-encode", run_reencode, 1.0),
            (f"{args.epochs}-epoch run, cached", run_cached, run_reencode / run_cached),
        ]
        print(f"\n{'variant':<28} {title:>10} {'speed-up':>9}")
        for name, seconds, ratio in rows:
            print(f"{name:<28} {seconds:>10.3f} {ratio:>8.1f}x")
    print(f"\ncache file {file_bytes / 1e3:.1f} kB; max abs diff cached vs re-encoded features {diff:.2e}")
    harness.write_results(
        "feature_cache",
        {
            "quick": args.quick,
            "images": n_images,
            "repeats": repeats,
            "epochs": args.epochs,
            "timings": timings,
            "cache_file_bytes": file_bytes,
            "max_abs_diff": diff,
        },
        env,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
