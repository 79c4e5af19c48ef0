"""The embedded testbed CLIP: a tiny open_clip ViT CLIP that fastcal pretrains itself on the digits.

No pretrained CLIP can be downloaded on an offline machine, so fastcal ships the recipe for a small real
one. The architecture is an ordinary open_clip ``CLIP`` (``configs/fastcal-testbed.json``, registered
with open_clip as ``"fastcal-testbed"``): a ViT image tower on 32 x 32 RGB images (8 x 8 patches, width
96, 3 layers, 3 heads) and the standard causal text transformer with open_clip's BPE tokenizer, vocabulary
49,408 and context length 77 (width 64, 4 heads, 3 layers), both projected to a 64-d joint space, with a
learned logit scale. Everything fastcal does to real CLIP (exact truncated text encoding, 16-token CoOp
contexts, deep visual prompts, fine-tuning) applies to it unchanged.

Pretraining (``PretrainRecipe``, ``pretrain_testbed``) is CLIP's (Radford et al., ICML 2021): the
symmetric InfoNCE loss over image-caption pairs, computed by open_clip's ``ClipLoss``
(github.com/mlfoundations/open_clip, ``loss.py``), with open_clip_train's optimizer set-up (AdamW, no
weight decay on gains, biases and the logit scale; linear warm-up then cosine decay; logit scale clamped
to ``[0, ln 100]`` after every step). The data are the train split of ``fastcal.data.testbed.digits_splits``;
an image's caption is one of several templates over its class name. Every step takes groups of one image
per class (ten pairs), so a group has no duplicate class and the in-batch contrastive targets are exact;
the loss is the mean of ``ClipLoss`` over the groups. Only ``images_per_class`` images per class are used,
so the model fits them and generalizes imperfectly: zero-shot accuracy on the test split lands well above
chance yet short of perfect, and the model is overconfident, leaving prompt tuning and calibration
something to fix (numbers in the recipe's docstring).

Training is seeded and runs in forked random generators (the caller's are untouched): the same recipe
on the same machine gives bit-identical weights. The weights are cached (safetensors through
``fastcal._io``) under ``default_cache_dir()/testbed/``, keyed by the architecture, the recipe and the
training images' fingerprint: a changed recipe or a corrupt file retrains.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fastcal._checks import check_int, check_number, fail
from fastcal._io import cached_tensors, default_cache_dir, key_digest
from fastcal.models.clip import LoadedClip
from fastcal.models.text_encoder import TextEncoder

TESTBED_MODEL = "fastcal-testbed"
CONFIG_PATH = Path(__file__).with_name("configs") / f"{TESTBED_MODEL}.json"
# Per-channel statistics of the digits' train split in [0, 1] (0.305 mean, 0.323 std, rounded).
TESTBED_MEAN = (0.30, 0.30, 0.30)
TESTBED_STD = (0.32, 0.32, 0.32)
# Captions of the pretraining pairs: plain, "alt-text" and scan-style phrasings. The testbed's prompt
# templates (fastcal.data.testbed.DIGIT_TEMPLATES) share the first two; the others are new wordings to it.
CAPTION_TEMPLATES = (
    "a photo of the digit {}.",
    "a handwritten {}.",
    "the number {}.",
    "{}",
    "a scanned digit: {}.",
    "an image of a handwritten {}.",
    "a {} written in ink.",
    "a low resolution photo of the number {}.",
)
_FORMAT_VERSION = 2  # 2: pretrained on one thread


@dataclass(frozen=True)
class PretrainRecipe:
    """How the testbed CLIP is pretrained (the defaults are the shipped model).

    The defaults were tuned so that adaptation and calibration have room to work. Zero-shot on the
    digits test split (361 base and 359 new images, each group among its own five classes), hard prompt
    "a photo of the digit {}.", 15-bin ECE: base 86.7% accuracy, 8.5% ECE; new 81.3%, 12.2% ECE; mean
    confidence 95% and 92%, so the model is overconfident (torch 2.14.1, x86-64 CPU; other machines may
    round differently and land a little apart). With more images per class the model generalizes
    better and is better calibrated (20 images, 30 epochs: 91% / 84%, ECE 2% / 5%); with fewer it is
    worse and more overconfident (5 images, 60 epochs: 81% / 71%, ECE 8% / 14%).

    Attributes:
        seed: seeds the initialization, the choice of training images, the shuffling, the captions and
            the augmentation.
        split_seed: ``digits_splits(split_seed)``; its train split provides the images.
        images_per_class: training images per digit (of about 90 in the train split): 70 image-caption
            pairs in all, so the model fits them and generalizes imperfectly.
        epochs: passes over the chosen images: 60 epochs of 4 steps, 240 steps (the loss nears 0).
        groups_per_step: groups of one image per class in a step (2 groups = 20 image-caption pairs).
        learning_rate: AdamW peak learning rate, reached after ``warmup_steps`` linear steps, then cosine
            decay to 0 at the last step.
        warmup_steps: linear warm-up steps.
        weight_decay: AdamW weight decay on the weight matrices and embeddings (none on gains, biases and
            the logit scale, as open_clip_train).
        adam_betas: AdamW betas (CLIP's 0.98 for transformers).
        adam_eps: AdamW epsilon (CLIP's 1e-6).
        crop_scale: RandomResizedCrop area range of the training augmentation.
        rotation_degrees: RandomRotation range (+-) of the training augmentation; digits are never flipped.
        caption_templates: the caption of an image is one of these (uniformly at random) over its class
            name.
    """

    seed: int = 0
    split_seed: int = 0
    images_per_class: int = 7
    epochs: int = 60
    groups_per_step: int = 2
    learning_rate: float = 1e-3
    warmup_steps: int = 10
    weight_decay: float = 0.1
    adam_betas: tuple[float, float] = (0.9, 0.98)
    adam_eps: float = 1e-6
    crop_scale: tuple[float, float] = (0.7, 1.0)
    rotation_degrees: float = 10.0
    caption_templates: tuple[str, ...] = field(default=CAPTION_TEMPLATES)

    def __post_init__(self) -> None:
        check_int("seed", self.seed, minimum=0)
        check_int("split_seed", self.split_seed, minimum=0)
        check_int("images_per_class", self.images_per_class, minimum=1)
        check_int("epochs", self.epochs, minimum=1)
        check_int("groups_per_step", self.groups_per_step, minimum=1)
        check_int("warmup_steps", self.warmup_steps, minimum=0)
        check_number("learning_rate", self.learning_rate, minimum=0.0, strict_minimum=True)
        check_number("weight_decay", self.weight_decay, minimum=0.0)
        check_number("adam_eps", self.adam_eps, minimum=0.0, strict_minimum=True)
        check_number("rotation_degrees", self.rotation_degrees, minimum=0.0, maximum=180.0)
        if len(self.adam_betas) != 2 or not all(0.0 <= b < 1.0 for b in self.adam_betas):
            raise fail("adam_betas", "two numbers in [0, 1)", repr(self.adam_betas))
        lo, hi = self.crop_scale
        if not 0.0 < lo <= hi <= 1.0:
            raise fail("crop_scale", "(lo, hi) with 0 < lo <= hi <= 1", repr(self.crop_scale))
        templates = self.caption_templates
        if not templates or not all(isinstance(t, str) and t.count("{}") == 1 for t in templates):
            raise fail(
                "caption_templates", "a non-empty tuple of strings with one '{}' each", repr(templates)
            )


@cache
def register_testbed_config() -> None:
    """Make ``"fastcal-testbed"`` an open_clip model name (``open_clip.create_model`` and friends)."""
    import open_clip

    if TESTBED_MODEL not in open_clip.list_models():
        open_clip.add_model_config(CONFIG_PATH)


def read_testbed_config() -> dict[str, Any]:
    """The open_clip model config of the testbed (``embed_dim``, ``vision_cfg``, ``text_cfg``)."""
    return json.loads(CONFIG_PATH.read_text())


def build_testbed_model() -> nn.Module:
    """A randomly initialized testbed CLIP (an ``open_clip.CLIP``) with the testbed's preprocessing."""
    import open_clip
    from open_clip.model import set_model_preprocess_cfg

    register_testbed_config()
    model = open_clip.CLIP(**read_testbed_config())
    size = model.visual.image_size[0]
    set_model_preprocess_cfg(
        model,
        {
            "size": size,
            "mode": "RGB",
            "mean": TESTBED_MEAN,
            "std": TESTBED_STD,
            "interpolation": "bilinear",
            "resize_mode": "shortest",
            "fill_color": 0,
        },
    )
    return model


def make_testbed_transforms(recipe: PretrainRecipe | None = None) -> tuple[Any, Any]:
    """``(train_transform, eval_transform)`` for 32 x 32 digit images (PIL in, normalized tensor out).

    Train: RandomResizedCrop(32, scale=recipe.crop_scale, ratio 0.9-1.1), RandomRotation(+-degrees,
    black fill), to tensor, normalize. Eval: Resize(32) and CenterCrop(32) (the identity on the testbed's
    images, a resize for others), to tensor, normalize. No flips: a mirrored digit is another glyph.
    """
    from torchvision import transforms as T

    from fastcal.data.testbed import TESTBED_IMAGE_SIZE

    recipe = recipe or PretrainRecipe()
    size = TESTBED_IMAGE_SIZE
    bilinear = T.InterpolationMode.BILINEAR
    normalize = T.Normalize(TESTBED_MEAN, TESTBED_STD)
    train = T.Compose(
        [
            T.RandomResizedCrop(size, scale=recipe.crop_scale, ratio=(0.9, 1.1), interpolation=bilinear),
            T.RandomRotation(recipe.rotation_degrees, interpolation=bilinear, fill=0),
            T.ToTensor(),
            normalize,
        ]
    )
    evaluate = T.Compose(
        [T.Resize(size, interpolation=bilinear), T.CenterCrop(size), T.ToTensor(), normalize]
    )
    return train, evaluate


def _training_images(recipe: PretrainRecipe) -> tuple[list[Any], list[int], list[str]]:
    """The train split's images grouped by class: ``images_per_class`` per class, chosen by the seed."""
    from fastcal.data.testbed import digits_splits

    splits = digits_splits(recipe.split_seed)
    by_class: list[list[Any]] = [[] for _ in splits.classnames]
    for image, label in splits.train:
        by_class[label].append(image)
    smallest = min(len(images) for images in by_class)
    if recipe.images_per_class > smallest:
        raise fail("images_per_class", f"at most {smallest} (the smallest class)", recipe.images_per_class)
    generator = torch.Generator().manual_seed(recipe.seed)
    images, labels = [], []
    for label, class_images in enumerate(by_class):
        chosen = torch.randperm(len(class_images), generator=generator)[: recipe.images_per_class]
        images.extend(class_images[i] for i in chosen.tolist())
        labels.extend([label] * recipe.images_per_class)
    return images, labels, list(splits.classnames)


def _optimizer(model: nn.Module, recipe: PretrainRecipe) -> torch.optim.Optimizer:
    """AdamW with open_clip_train's grouping: no decay on gains, biases, norms and the logit scale."""

    def exempt(name: str, p: torch.Tensor) -> bool:
        return p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name

    named = list(model.named_parameters())
    groups = [
        {"params": [p for n, p in named if exempt(n, p)], "weight_decay": 0.0},
        {"params": [p for n, p in named if not exempt(n, p)], "weight_decay": recipe.weight_decay},
    ]
    return torch.optim.AdamW(
        groups, lr=recipe.learning_rate, betas=tuple(recipe.adam_betas), eps=recipe.adam_eps, fused=True
    )


def _learning_rate(recipe: PretrainRecipe, step: int, total_steps: int) -> float:
    """Linear warm-up to the peak, then cosine decay (open_clip_train ``scheduler.cosine_lr``)."""
    if step < recipe.warmup_steps:
        return recipe.learning_rate * (step + 1) / recipe.warmup_steps
    decay_steps = max(total_steps - recipe.warmup_steps, 1)
    progress = (step - recipe.warmup_steps) / decay_steps
    return 0.5 * (1.0 + math.cos(math.pi * progress)) * recipe.learning_rate


def pretrain_testbed(recipe: PretrainRecipe | None = None, *, progress: bool = True) -> nn.Module:
    """Pretrain a testbed CLIP from scratch with ``recipe`` (module docstring); returns it in eval mode.

    Deterministic: the same recipe gives the same weights, bit for bit on a given CPU and torch build.
    It runs in forked random generators (the caller's generator state is left as it was) and on one
    torch thread whatever the caller's setting: float32 sums split over threads round differently, so
    a 2-thread process would otherwise pretrain other weights than a 1-thread one, and every number
    downstream would depend on which process filled the cache.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _pretrain_on_this_thread(recipe or PretrainRecipe(), progress)
    finally:
        torch.set_num_threads(threads)


def _pretrain_on_this_thread(recipe: PretrainRecipe, progress: bool) -> nn.Module:
    import open_clip
    from open_clip.loss import ClipLoss
    from tqdm.auto import tqdm

    from fastcal.data.items import prompt_classname

    register_testbed_config()
    images, labels, classnames = _training_images(recipe)
    num_classes = len(classnames)
    tokenizer = open_clip.get_tokenizer(TESTBED_MODEL)
    captions = tokenizer(
        [t.format(prompt_classname(c)) for c in classnames for t in recipe.caption_templates]
    )
    n_templates = len(recipe.caption_templates)
    train_transform, _ = make_testbed_transforms(recipe)
    per_class = recipe.images_per_class
    steps_per_epoch = math.ceil(per_class / recipe.groups_per_step)
    total_steps = recipe.epochs * steps_per_epoch
    loss_fn = ClipLoss()

    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(recipe.seed)
        model = build_testbed_model()
        model.train()
        optimizer = _optimizer(model, recipe)
        text_encoder = TextEncoder(model)
        # image (c, j) of the class-major list sits at c * per_class + j
        class_offsets = torch.arange(num_classes) * per_class
        step = 0
        epochs = tqdm(
            range(recipe.epochs), desc="pretraining testbed CLIP", disable=not progress, leave=False
        )
        for _ in epochs:
            # column c: a permutation of class c's images; row r: group r, one image per class
            order = torch.stack([torch.randperm(per_class) for _ in range(num_classes)], dim=1)
            order = order[torch.randperm(per_class)] + class_offsets
            epoch_loss = torch.zeros(())
            for begin in range(0, per_class, recipe.groups_per_step):
                groups = order[begin : begin + recipe.groups_per_step]
                flat = groups.reshape(-1).tolist()
                batch = torch.stack([train_transform(images[i]) for i in flat])
                batch_labels = torch.tensor([labels[i] for i in flat])
                template = torch.randint(n_templates, (len(flat),))
                texts = captions[batch_labels * n_templates + template]

                for group in optimizer.param_groups:
                    group["lr"] = _learning_rate(recipe, step, total_steps)
                image_features = F.normalize(model.encode_image(batch), dim=-1)
                text_features = F.normalize(text_encoder.encode(texts), dim=-1)
                logit_scale = model.logit_scale.exp()
                n_groups = groups.shape[0]
                image_features = image_features.view(n_groups, num_classes, -1)
                text_features = text_features.view(n_groups, num_classes, -1)
                loss = (
                    sum(loss_fn(image_features[g], text_features[g], logit_scale) for g in range(n_groups))
                    / n_groups
                )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                with torch.no_grad():
                    model.logit_scale.clamp_(0.0, math.log(100.0))
                epoch_loss += loss.detach()
                step += 1
            epochs.set_postfix(loss=f"{float(epoch_loss) / steps_per_epoch:.3f}")
    return model.eval()


def _cache_key(recipe: PretrainRecipe) -> dict[str, Any]:
    from fastcal.data.items import ImageListDataset
    from fastcal.data.testbed import digits_splits

    splits = digits_splits(recipe.split_seed)
    return {
        "kind": "testbed_clip",
        "format": _FORMAT_VERSION,
        "model": TESTBED_MODEL,
        "config": read_testbed_config(),
        "recipe": asdict(recipe),
        "train_images": ImageListDataset(splits.train, splits.classnames).fingerprint(),
    }


def _weights_path(cache_dir: str | os.PathLike | None, key: dict[str, Any]) -> Path:
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "testbed"
    return root / f"{TESTBED_MODEL}-{key_digest(key)}.safetensors"


def cached_testbed_path(
    *, cache_dir: str | os.PathLike | None = None, recipe: PretrainRecipe | None = None
) -> Path:
    """Where the weights of ``recipe`` are cached: ``cache_dir`` (default ``default_cache_dir()/testbed``)
    / ``fastcal-testbed-<key digest>.safetensors``. The file is a plain safetensors state dict, so
    ``load_clip("fastcal-testbed", pretrained=path)`` also reads it."""
    return _weights_path(cache_dir, _cache_key(recipe or PretrainRecipe()))


def load_testbed_clip(
    *,
    cache_dir: str | os.PathLike | None = None,
    recipe: PretrainRecipe | None = None,
    progress: bool = True,
) -> LoadedClip:
    """The pretrained testbed CLIP (eval mode), its tokenizer and transforms.

    Pretrained on first use (240 small steps, about 10 s of CPU time) and cached at
    ``cached_testbed_path``; later calls memory-map the file. A file written for another recipe or
    architecture, or a corrupt one, is retrained and replaced.

    Args:
        cache_dir: folder of the weight files (default ``default_cache_dir()/testbed``).
        recipe: the pretraining recipe (default ``PretrainRecipe()``, the shipped model).
        progress: report pretraining on stderr.
    """
    import open_clip

    recipe = recipe or PretrainRecipe()
    register_testbed_config()
    key = _cache_key(recipe)
    path = _weights_path(cache_dir, key)

    def pretrain() -> dict[str, torch.Tensor]:
        if progress:
            print(f"fastcal: pretraining the testbed CLIP once (cached at {path})", file=sys.stderr)
        start = time.perf_counter()
        trained = pretrain_testbed(recipe, progress=progress)
        if progress:
            print(f"fastcal: testbed CLIP pretrained in {time.perf_counter() - start:.1f} s", file=sys.stderr)
        return trained.state_dict()

    state = cached_tensors(path, key, pretrain)
    with torch.random.fork_rng(devices=[]):  # the throw-away initialization draws random numbers
        model = build_testbed_model()
    model.load_state_dict(state)
    model.eval()
    train_transform, eval_transform = make_testbed_transforms(recipe)
    return LoadedClip(model, open_clip.get_tokenizer(TESTBED_MODEL), train_transform, eval_transform)
