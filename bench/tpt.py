"""Bench: one TPT test sample (64 views, 200 classes, random-init ViT-B-32), the reference's way vs fastcal's.

The reference's way, as azshue/TPT's ``tpt_classification.py`` runs a sample (restated here, in fastcal's
words): the 64 views made one at a time with PIL (``AugMixAugmenter``: resize + centre crop, then 63 x
RandomResizedCrop + flip, AugMix with PIL operations, ToTensor + Normalize per chain), the image tower
over the 64 views, CoOp's prompt learner at the full 77 tokens through the text transformer, confidence
selection by ``argsort`` and the marginal entropy, eagerly, AdamW re-created for the sample (its state
reloaded), one step, then ``model(image)``: the image tower again on view 0 and the text transformer
again at 77 tokens.

fastcal's way: ``fastcal.tpt.TPT``: views made in one batch with tensor operations
(``fastcal.tpt.augment``), the image tower once over the views, the class prompts cut at their end token
with the shared start token and context encoded once per context (``fastcal.methods.prefix``: 960 text
positions per pass instead of 200 x 77), the step on static buffers (``TestTimeStep``).

Measured (median of repeats after a warm-up): the latency of one sample for each (AugMix on, as on the
fine-grained sets) and their ratio (target >= 5x on this CPU); the augmentation alone in views/s (AugMix on
and off); and fastcal's throughput with ``--samples-per-step`` S in samples/s. Results go to
bench/results/tpt.json.

    .venv/bin/python bench/tpt.py            # 3 repeats
    .venv/bin/python bench/tpt.py --quick    # 1 repeat, fewer samples-per-step settings
    .venv/bin/python bench/tpt.py --threads 1
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "tpt.json"
N_VIEWS = 64
N_CLASSES = 200
TARGET_RATIO = 5.0
CTX_INIT = "a photo of a"


# ---- the reference's views: PIL, one view at a time -----------------------------------------------------
def _level(rng):
    return rng.uniform(0.1, 1.0)


def _affine(image, matrix):
    return image.transform(image.size, Image.Transform.AFFINE, matrix, resample=Image.Resampling.BILINEAR)


def _signed(rng, value):
    return -value if rng.uniform() > 0.5 else value


def reference_ops(size):
    """The nine AugMix operations at severity 1 on PIL images (TPT's data/augmix_ops.py)."""
    return [
        lambda im, rng: ImageOps.autocontrast(im),
        lambda im, rng: ImageOps.equalize(im),
        lambda im, rng: ImageOps.posterize(im, 4 - int(_level(rng) * 4 / 10)),
        lambda im, rng: im.rotate(
            _signed(rng, int(_level(rng) * 30 / 10)), resample=Image.Resampling.BILINEAR
        ),
        lambda im, rng: ImageOps.solarize(im, 256 - int(_level(rng) * 256 / 10)),
        lambda im, rng: _affine(im, (1, _signed(rng, _level(rng) * 0.3 / 10), 0, 0, 1, 0)),
        lambda im, rng: _affine(im, (1, 0, 0, _signed(rng, _level(rng) * 0.3 / 10), 1, 0)),
        lambda im, rng: _affine(im, (1, 0, _signed(rng, int(_level(rng) * size / 3 / 10)), 0, 1, 0)),
        lambda im, rng: _affine(im, (1, 0, 0, 0, 1, _signed(rng, int(_level(rng) * size / 3 / 10)))),
    ]


def reference_views(image, size, mean, std, *, augmix, rng):
    """TPT's AugMixAugmenter for one image: (64, 3, size, size)."""
    from torchvision import transforms as T

    preprocess = T.Compose([T.ToTensor(), T.Normalize(mean, std)])
    base = T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size)])
    preaugment = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip()])
    ops = reference_ops(size)
    views = [preprocess(base(image))]
    for _ in range(N_VIEWS - 1):
        crop = preaugment(image)
        processed = preprocess(crop)
        if not augmix:
            views.append(processed)
            continue
        w = np.float32(rng.dirichlet([1.0, 1.0, 1.0]))
        m = np.float32(rng.beta(1.0, 1.0))
        mix = torch.zeros_like(processed)
        for i in range(3):
            chain = crop.copy()
            for _ in range(rng.randint(1, 4)):
                chain = ops[rng.randint(len(ops))](chain, rng)
            mix += w[i] * preprocess(chain)
        views.append(m * processed + (1 - m) * mix)
    return torch.stack(views)


# ---- the reference's model side: 77-token prompts, eager losses -------------------------------------------
class ReferenceTPT:
    """CoOp's prompt learner at the full context length and TPT's per-sample loop (module docstring)."""

    def __init__(self, model, tokenizer, classnames, lr=5e-3):
        self.model = model
        ids = tokenizer([f"{CTX_INIT} {name}." for name in classnames])
        self.token_ids = ids
        with torch.no_grad():
            embedding = model.token_embedding(ids)
        n_ctx = len(CTX_INIT.split())
        self.prefix, self.suffix = embedding[:, :1], embedding[:, 1 + n_ctx :]
        self.ctx_init = embedding[0, 1 : 1 + n_ctx].clone()
        self.ctx = torch.nn.Parameter(self.ctx_init.clone())
        self.lr = lr
        self.scale = model.logit_scale.exp()

    def text_features(self):
        ctx = self.ctx.unsqueeze(0).expand(self.prefix.shape[0], -1, -1)
        x = torch.cat([self.prefix, ctx, self.suffix], dim=1) + self.model.positional_embedding
        x = self.model.ln_final(self.model.transformer(x, attn_mask=self.model.attn_mask))
        features = x[torch.arange(x.shape[0]), self.token_ids.argmax(dim=-1)] @ self.model.text_projection
        return features / features.norm(dim=-1, keepdim=True)

    def logits(self, images):
        with torch.no_grad():
            image_features = self.model.encode_image(images)
        image_features = image_features / image_features.norm(dim=-1, keepdim=True)
        return self.scale * image_features @ self.text_features().T

    def __call__(self, views):
        with torch.no_grad():
            self.ctx.copy_(self.ctx_init)
        optimizer = torch.optim.AdamW([self.ctx], self.lr)
        output = self.logits(views)
        entropy = -(output.softmax(1) * output.log_softmax(1)).sum(1)
        selected = torch.argsort(entropy, descending=False)[: int(entropy.shape[0] * 0.1)]
        output = output[selected]
        log_p = output - output.logsumexp(dim=-1, keepdim=True)
        mean_log_p = log_p.logsumexp(dim=0) - math.log(log_p.shape[0])
        mean_log_p = torch.clamp(mean_log_p, min=torch.finfo(mean_log_p.dtype).min)
        loss = -(mean_log_p * torch.exp(mean_log_p)).sum(dim=-1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            return self.logits(views[:1])


# ---- timing -------------------------------------------------------------------------------------------
def median_seconds(fn, repeats, warmup=1):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def test_image(seed=0):
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (47, 63, 3)).astype(np.uint8)
    return Image.fromarray(small).resize((500, 375), Image.Resampling.BICUBIC)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 repeat, S in (1, 4)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = 1 if args.quick else 3
    sample_steps = (1, 4) if args.quick else (1, 4, 8)

    from fastcal._io import write_json_atomic
    from fastcal.data.imagenet import imagenet_classnames
    from fastcal.models import load_clip
    from fastcal.tpt import TPT, TuningConfig, sample_generator
    from fastcal.tpt.augment import ViewAugmenter, decode, normalization

    torch.manual_seed(0)
    clip = load_clip("ViT-B-32", None)
    model = clip.model.requires_grad_(False)
    classnames = imagenet_classnames()[:: 1000 // N_CLASSES][:N_CLASSES]
    mean, std = normalization(model)
    image = test_image()
    size = 224
    rows: dict[str, dict] = {}

    def report(name, seconds, unit_count=1, unit="sample"):
        rows[name] = {"seconds": seconds, f"{unit}s_per_second": unit_count / seconds}
        print(f"  {name:<46} {seconds * 1000:10.1f} ms   {unit_count / seconds:10.3g} {unit}s/s", flush=True)

    print(
        f"TPT bench: {N_VIEWS} views, {N_CLASSES} classes, random-init ViT-B-32, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    print("augmentation alone (one image, 64 views):")
    rng = np.random.RandomState(0)
    for augmix in (True, False):
        tag = "augmix" if augmix else "crop+flip"
        seconds, _ = median_seconds(
            lambda a=augmix: reference_views(image, size, mean, std, augmix=a, rng=rng), repeats
        )
        report(f"reference PIL views ({tag})", seconds, N_VIEWS, "view")
        augmenter = ViewAugmenter(size, mean, std, n_views=N_VIEWS, augmix=augmix)
        decoded = decode(image)
        seconds, _ = median_seconds(lambda a=augmenter, d=decoded: a(d, sample_generator(0, 0)), repeats)
        report(f"fastcal batched views ({tag})", seconds, N_VIEWS, "view")
    aug = {k: v for k, v in rows.items()}

    print("one test sample, end to end (AugMix on):")
    reference = ReferenceTPT(model, clip.tokenizer, classnames)

    def reference_sample():
        return reference(reference_views(image, size, mean, std, augmix=True, rng=rng))

    ref_seconds, ref_times = median_seconds(reference_sample, repeats)
    report("reference (PIL views, 77 tokens, eager)", ref_seconds)
    tpt = TPT(
        model,
        clip.tokenizer,
        classnames,
        config=TuningConfig(n_views=N_VIEWS),
        augmix=True,
        samples_per_step=1,
    )
    fast_seconds, fast_times = median_seconds(lambda: tpt([image], [sample_generator(0, 0)]), repeats)
    report("fastcal (batched views, truncated text, step)", fast_seconds)
    ratio = ref_seconds / fast_seconds
    longest = int(tpt.learner.token_ids.shape[1])
    token_rows = tpt.packed.token_rows if tpt.packed is not None else N_CLASSES * longest
    print(
        f"  ratio reference / fastcal: {ratio:.2f}x (target >= {TARGET_RATIO:.0f}x: "
        f"{'met' if ratio >= TARGET_RATIO else 'not met'}); text positions per pass: "
        f"{token_rows} packed (prompts <= {longest} tokens) vs {N_CLASSES * 77} in the reference"
    )

    print("fastcal throughput with --samples-per-step S:")
    throughput = {}
    for s in sample_steps:
        batched = TPT(
            model,
            clip.tokenizer,
            classnames,
            config=TuningConfig(n_views=N_VIEWS),
            augmix=True,
            samples_per_step=s,
        )
        images = [test_image(seed) for seed in range(s)]
        seconds, _ = median_seconds(
            lambda b=batched, im=images: b(im, [sample_generator(0, i) for i in range(len(im))]), repeats
        )
        throughput[str(s)] = s / seconds
        report(f"S = {s}", seconds, s)

    write_json_atomic(
        RESULTS,
        {
            "bench": "tpt",
            "quick": args.quick,
            "n_views": N_VIEWS,
            "n_classes": N_CLASSES,
            "model": "ViT-B-32 (random init)",
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "machine": platform.machine(),
            "python": sys.version.split()[0],
            "augmentation": aug,
            "reference_seconds": ref_seconds,
            "reference_times": ref_times,
            "fastcal_seconds": fast_seconds,
            "fastcal_times": fast_times,
            "ratio": ratio,
            "target_ratio": TARGET_RATIO,
            "target_met": ratio >= TARGET_RATIO,
            "prompt_tokens": longest,
            "text_positions_per_pass": {"fastcal": token_rows, "reference": N_CLASSES * 77},
            "samples_per_second_by_samples_per_step": throughput,
        },
    )
    print(f"results: {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
