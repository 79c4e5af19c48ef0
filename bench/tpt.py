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

Measured (median of repeats after a warm-up, the compared variants in alternating rounds): the latency
of one sample for each (AugMix on, as on the fine-grained sets) and their ratio (target >= 5x on this
CPU); the augmentation alone in views/s (AugMix on and off); and fastcal's throughput with
``--samples-per-step`` S in samples/s. Results go to bench/results/tpt.json.

    .venv/bin/python bench/tpt.py            # 3 repeats
    .venv/bin/python bench/tpt.py --quick    # 1 repeat, fewer samples-per-step settings
    .venv/bin/python bench/tpt.py --threads 1
"""

from __future__ import annotations

import argparse
import math
import sys

import harness
import numpy as np
import torch
from PIL import Image, ImageOps

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


def test_image(seed=0):
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (47, 63, 3)).astype(np.uint8)
    return Image.fromarray(small).resize((500, 375), Image.Resampling.BICUBIC)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 repeat, S in (1, 4)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    env = harness.start(args.threads)
    repeats = 1 if args.quick else 3
    sample_steps = (1, 4) if args.quick else (1, 4, 8)

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

    def make_tpt(samples_per_step):
        config = TuningConfig(n_views=N_VIEWS)
        return TPT(
            model, clip.tokenizer, classnames, config=config, augmix=True, samples_per_step=samples_per_step
        )

    print(f"TPT bench: {N_VIEWS} views, {N_CLASSES} classes, random-init ViT-B-32")
    print("augmentation alone (one image, 64 views):")
    rng = np.random.RandomState(0)
    decoded = decode(image)
    for augmix in (True, False):
        tag = "augmix" if augmix else "crop+flip"
        augmenter = ViewAugmenter(size, mean, std, n_views=N_VIEWS, augmix=augmix)
        runs = harness.interleaved(
            {
                f"reference PIL views ({tag})": lambda a=augmix: reference_views(
                    image, size, mean, std, augmix=a, rng=rng
                ),
                f"fastcal batched views ({tag})": lambda a=augmenter: a(decoded, sample_generator(0, 0)),
            },
            repeats,
        )
        for name, run in runs.items():
            report(name, run.median["wall"], N_VIEWS, "view")
    aug = dict(rows)

    print("one test sample, end to end (AugMix on):")
    reference = ReferenceTPT(model, clip.tokenizer, classnames)
    tpt = make_tpt(1)
    end_to_end = harness.interleaved(
        {
            "reference": lambda: reference(reference_views(image, size, mean, std, augmix=True, rng=rng)),
            "fastcal": lambda: tpt([image], [sample_generator(0, 0)]),
        },
        repeats,
    )
    ref_seconds, fast_seconds = (end_to_end[side].median["wall"] for side in ("reference", "fastcal"))
    report("reference (PIL views, 77 tokens, eager)", ref_seconds)
    report("fastcal (batched views, truncated text, step)", fast_seconds)
    ratio = ref_seconds / fast_seconds
    longest = int(tpt.learner.token_ids.shape[1])
    token_rows = tpt.packed.token_rows if tpt.packed is not None else N_CLASSES * longest
    print(
        f"  ratio reference / fastcal: {ratio:.2f}x; text positions per pass: "
        f"{token_rows} packed (prompts <= {longest} tokens) vs {N_CLASSES * 77} in the reference"
    )

    print("fastcal throughput with --samples-per-step S:")
    steps = {}
    for s in sample_steps:
        batched, images = make_tpt(s), [test_image(seed) for seed in range(s)]
        steps[s] = lambda b=batched, im=images: b(im, [sample_generator(0, i) for i in range(len(im))])
    throughput = {}
    for s, run in harness.interleaved(steps, repeats).items():
        throughput[str(s)] = s / run.median["wall"]
        report(f"S = {s}", run.median["wall"], s)
    target = harness.Target("reference / fastcal, one sample (wall)", ratio, TARGET_RATIO)
    targets = harness.report_targets({"reference_over_fastcal": target})

    harness.write_results(
        "tpt",
        {
            "quick": args.quick,
            "n_views": N_VIEWS,
            "n_classes": N_CLASSES,
            "model": "ViT-B-32 (random init)",
            "augmentation": aug,
            "reference_seconds": ref_seconds,
            "reference_times": end_to_end["reference"].seconds["wall"],
            "fastcal_seconds": fast_seconds,
            "fastcal_times": end_to_end["fastcal"].seconds["wall"],
            "ratio": ratio,
            "target_ratio": TARGET_RATIO,
            "target_met": target.met,
            "targets": targets,
            "prompt_tokens": longest,
            "text_positions_per_pass": {"fastcal": token_rows, "reference": N_CLASSES * 77},
            "samples_per_second_by_samples_per_step": throughput,
        },
        env,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
