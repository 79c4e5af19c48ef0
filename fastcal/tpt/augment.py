"""TPT's test-time views of one image, made in one batch on the image's device.

TPT (Shu et al., NeurIPS 2022; github.com/azshue/TPT, ``data/datautils.py`` ``AugMixAugmenter`` and
``data/augmix_ops.py``) turns each test image into ``n_views`` views (64):

- view 0: ``Resize(size, bicubic)`` of the shorter side, then ``CenterCrop(size)``;
- views 1..n-1: ``RandomResizedCrop(size)`` (area fraction ~ U(0.08, 1), log aspect ratio ~
  U(log 3/4, log 4/3), ten tries then a centred fallback, as torchvision's ``get_params``) and a
  horizontal flip with probability 1/2;
- with AugMix (on fine-grained datasets in TPT; on the ImageNet variants too in C-TPT and FPP), each
  crop ``x`` becomes ``m * x + (1 - m) * sum_c w_c chain_c(x)`` with ``w ~ Dirichlet(1, 1, 1)``,
  ``m ~ Beta(1, 1)`` and three chains, each of 1-3 operations (uniform) drawn uniformly from
  autocontrast, equalize, posterize, rotate, solarize, shear x/y, translate x/y. An operation's level is
  ``l ~ U(0.1, severity)`` (severity 1) and its magnitude ``int(l * 4 / 10)`` bits off posterize,
  ``int(l * 30 / 10)`` degrees of rotation, threshold ``256 - int(l * 256 / 10)`` for solarize,
  ``l * 0.3 / 10`` of shear and ``int(l * (size / 3) / 10)`` pixels of translation (rotation, shear and
  translation with a random sign). Operations act on 8-bit images, as PIL's do.

The reference augments each view as a PIL image on the CPU (~63 x 3 x 2 PIL operations per test image).
Here the image is decoded once, moved to its device, and every step is a batched tensor operation over
all views: the crops and the resize in one ``torchvision.ops.roi_align`` (bilinear, averaging
``ceil(crop / size)``^2 samples per output pixel when shrinking, an anti-aliased resize), flips with
``torch.where``, autocontrast and equalize from ``torchvision.transforms.v2.functional`` (already
batched), and the operations torchvision only offers with one parameter per call (posterize, solarize
and the affine warps) written here with a parameter per view (the warps: ``affine_grid`` +
``grid_sample``, PIL's conventions: output pixel centre ``p`` reads input ``A p``, black outside).
Random parameters are drawn on the CPU from a ``torch.Generator`` with the reference's distributions
(the samplers are vectorized; the tests compare their distributions with the reference's), so a seed
fixes the views whatever the device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torchvision.ops import roi_align

from fastcal._checks import check_int, check_number, fail

CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
CROP_TRIES = 10
AUGMIX_OPS = (
    "autocontrast",
    "equalize",
    "posterize",
    "rotate",
    "solarize",
    "shear_x",
    "shear_y",
    "translate_x",
    "translate_y",
)
AUGMIX_WIDTH = 3
AUGMIX_MAX_DEPTH = 3
_LEVEL_LOW = 0.1
_SIGNED_OPS = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")


# ---- random parameters (CPU, vectorized, the reference's distributions) ----------------------------------
@dataclass(frozen=True)
class CropParams:
    """Per view: crop box ``(top, left, height, width)`` in source pixels and a horizontal flip."""

    top: torch.Tensor
    left: torch.Tensor
    height: torch.Tensor
    width: torch.Tensor
    flip: torch.Tensor


def sample_crops(
    height: int,
    width: int,
    n: int,
    generator: torch.Generator,
    *,
    scale: tuple[float, float] = CROP_SCALE,
    ratio: tuple[float, float] = CROP_RATIO,
    flip_probability: float = 0.5,
) -> CropParams:
    """``n`` RandomResizedCrop boxes of a ``height`` x ``width`` image, plus flips.

    torchvision's ``RandomResizedCrop.get_params`` for all views at once: per view ten tries of
    ``area * U(scale)`` and ``exp(U(log ratio))``, ``w = round(sqrt(a r))``, ``h = round(sqrt(a / r))``,
    the first try that fits wins and is placed uniformly; without one, the largest centred crop whose
    aspect ratio is clamped to ``ratio``.
    """
    check_int("height", height, minimum=1)
    check_int("width", width, minimum=1)
    check_int("n", n, minimum=0)
    area = float(height * width)
    log_ratio = torch.log(torch.tensor(ratio, dtype=torch.float64))
    target_area = area * (
        scale[0] + (scale[1] - scale[0]) * torch.rand(n, CROP_TRIES, generator=generator, dtype=torch.float64)
    )
    aspect = torch.exp(
        log_ratio[0]
        + (log_ratio[1] - log_ratio[0]) * torch.rand(n, CROP_TRIES, generator=generator, dtype=torch.float64)
    )
    w = torch.round(torch.sqrt(target_area * aspect)).long()
    h = torch.round(torch.sqrt(target_area / aspect)).long()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    found = fits.any(dim=1)
    first = torch.argmax(fits.to(torch.int8), dim=1)
    h = h.gather(1, first[:, None]).squeeze(1)
    w = w.gather(1, first[:, None]).squeeze(1)

    in_ratio = width / height
    if in_ratio < min(ratio):
        fallback_w, fallback_h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        fallback_h, fallback_w = height, round(height * max(ratio))
    else:
        fallback_w, fallback_h = width, height
    h = torch.where(found, h, fallback_h)
    w = torch.where(found, w, fallback_w)
    u_top, u_left = torch.rand(2, n, generator=generator, dtype=torch.float64)
    top = torch.where(found, (u_top * (height - h + 1)).long(), (height - fallback_h) // 2)
    left = torch.where(found, (u_left * (width - w + 1)).long(), (width - fallback_w) // 2)
    flip = torch.rand(n, generator=generator) < flip_probability
    return CropParams(top, left, h, w, flip)


@dataclass(frozen=True)
class AugMixParams:
    """Per view: chain weights ``(n, 3)``, blend ``(n,)``, chain depths ``(n, 3)`` in 1..3, and per chain
    and depth the operation index into ``AUGMIX_OPS``, its level and its sign ``(n, 3, 3)``."""

    weights: torch.Tensor
    blend: torch.Tensor
    depth: torch.Tensor
    ops: torch.Tensor
    levels: torch.Tensor
    signs: torch.Tensor


def sample_augmix(n: int, generator: torch.Generator, *, severity: float = 1.0) -> AugMixParams:
    """AugMix parameters of ``n`` views: Dirichlet(1, 1, 1) weights (normalized Exp(1) draws), Beta(1, 1)
    blend, depth ~ U{1, 2, 3} per chain, operation ~ U(AUGMIX_OPS), level ~ U(0.1, severity), sign +-1."""
    check_int("n", n, minimum=0)
    check_number("severity", severity, minimum=_LEVEL_LOW, strict_minimum=True)
    exponential = -torch.log1p(-torch.rand(n, AUGMIX_WIDTH, generator=generator, dtype=torch.float64))
    weights = (exponential / exponential.sum(dim=1, keepdim=True)).float()
    blend = torch.rand(n, generator=generator)
    depth = torch.randint(1, AUGMIX_MAX_DEPTH + 1, (n, AUGMIX_WIDTH), generator=generator)
    shape = (n, AUGMIX_WIDTH, AUGMIX_MAX_DEPTH)
    ops = torch.randint(len(AUGMIX_OPS), shape, generator=generator)
    levels = _LEVEL_LOW + (severity - _LEVEL_LOW) * torch.rand(
        shape, generator=generator, dtype=torch.float64
    )
    signs = torch.where(torch.rand(shape, generator=generator) < 0.5, 1.0, -1.0).double()
    return AugMixParams(weights, blend, depth, ops, levels, signs)


def op_magnitude(op: str, level: torch.Tensor, sign: torch.Tensor, size: int) -> torch.Tensor:
    """The reference's magnitude of operation ``op`` at ``level`` (float64 tensors) for ``size`` pixels:
    bits to keep (posterize), degrees (rotate), threshold (solarize), shear factor, pixels (translate)."""
    if op == "posterize":
        return 4 - torch.floor(level * 4 / 10)
    if op == "rotate":
        return torch.floor(level * 30 / 10) * sign
    if op == "solarize":
        return 256 - torch.floor(level * 256 / 10)
    if op in ("shear_x", "shear_y"):
        return level * 0.3 / 10 * sign
    if op in ("translate_x", "translate_y"):
        return torch.floor(level * (size / 3) / 10) * sign
    return torch.zeros_like(level)


# ---- batched 8-bit operations with one parameter per image --------------------------------------------
def posterize(images: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Keep the top ``bits[i]`` bits of every channel of uint8 image ``i`` (PIL ``ImageOps.posterize``)."""
    keep = (bits.to(images.device, torch.int64)).clamp(0, 8)
    mask = (255 - ((1 << (8 - keep)) - 1)).to(torch.uint8)
    return images & mask.view(-1, *([1] * (images.ndim - 1)))


def solarize(images: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Invert every uint8 value ``>= threshold[i]`` in image ``i`` (PIL ``ImageOps.solarize``; a threshold
    above 255 inverts nothing)."""
    shape = (-1, *([1] * (images.ndim - 1)))
    threshold = threshold.to(images.device, torch.int64)
    active = (threshold <= 255).view(shape)
    invert = (images >= threshold.clamp(0, 255).to(torch.uint8).view(shape)) & active
    return torch.where(invert, 255 - images, images)


def rotation_matrices(degrees: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """PIL's ``Image.rotate`` (counter-clockwise about the centre) as output-to-input maps ``(n, 2, 3)``."""
    angle = -torch.deg2rad(degrees.double())
    cos, sin = torch.cos(angle), torch.sin(angle)
    cx, cy = width / 2.0, height / 2.0
    tx = cos * -cx + sin * -cy + cx
    ty = -sin * -cx + cos * -cy + cy
    return torch.stack([torch.stack([cos, sin, tx], -1), torch.stack([-sin, cos, ty], -1)], dim=1)


def _unit_affines(n: int) -> torch.Tensor:
    return torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64).repeat(n, 1, 1)


def op_matrices(op: str, magnitude: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Output-to-input affine maps ``(n, 2, 3)`` in pixels for a geometric AugMix operation (PIL's)."""
    if op == "rotate":
        return rotation_matrices(magnitude, height, width)
    matrices = _unit_affines(magnitude.shape[0])
    position = {"shear_x": (0, 1), "shear_y": (1, 0), "translate_x": (0, 2), "translate_y": (1, 2)}[op]
    matrices[:, position[0], position[1]] = magnitude.double()
    return matrices


def affine_warp(images: torch.Tensor, matrices: torch.Tensor) -> torch.Tensor:
    """Warp uint8 images ``(n, C, H, W)``, each by its own output-to-input map ``(n, 2, 3)`` in pixel
    coordinates, as PIL's ``Image.transform(AFFINE, BILINEAR)`` does: output pixel ``(x, y)`` reads the
    input at ``A (x + 1/2, y + 1/2)``; a point outside ``[0, W) x [0, H)`` gives 0, one inside is
    interpolated bilinearly with the border pixels repeated. Rounded to uint8."""
    n, _, height, width = images.shape
    device = images.device
    a = matrices.to(device, torch.float32).view(n, 6, 1, 1).unbind(1)
    px = (torch.arange(width, device=device, dtype=torch.float32) + 0.5).view(1, 1, width)
    py = (torch.arange(height, device=device, dtype=torch.float32) + 0.5).view(1, height, 1)
    gx = (a[0] * px + a[1] * py + a[2]) * (2.0 / width) - 1.0
    gy = (a[3] * px + a[4] * py + a[5]) * (2.0 / height) - 1.0
    inside = ((gx >= -1) & (gx < 1) & (gy >= -1) & (gy < 1)).unsqueeze(1)
    grid = torch.stack([gx, gy], dim=-1)
    warped = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return torch.where(inside, warped.round_(), 0.0).clamp_(0, 255).to(torch.uint8)


def apply_op(op: str, images: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """One AugMix operation on uint8 images ``(n, C, H, W)``, magnitude per image (``op_magnitude``)."""
    if op == "autocontrast":
        return TF.autocontrast(images)
    if op == "equalize":
        return TF.equalize(images)
    if op == "posterize":
        return posterize(images, magnitude)
    if op == "solarize":
        return solarize(images, magnitude)
    return affine_warp(images, op_matrices(op, magnitude, images.shape[-2], images.shape[-1]))


# ---- the views ----------------------------------------------------------------------------------------
def decode(image: Image.Image | torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """An image as a uint8 ``(3, H, W)`` tensor on ``device`` (a PIL image is converted to RGB once)."""
    if isinstance(image, Image.Image):
        tensor = TF.pil_to_tensor(image.convert("RGB"))
    elif isinstance(image, torch.Tensor):
        if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
            raise fail(
                "image", "a PIL image or a uint8 (3, H, W) tensor", f"{image.dtype} {tuple(image.shape)}"
            )
        tensor = image
    else:
        raise TypeError(f"image: expected a PIL image or a uint8 tensor, got {type(image).__name__}")
    return tensor.to(device) if device is not None else tensor


class ViewAugmenter:
    """TPT's ``n_views`` views of an image as one normalized float32 batch ``(n_views, 3, size, size)``.

    Args:
        size: the model's input size (224 for CLIP ViT-B, 32 for the testbed).
        mean, std: the model's normalization (``model.visual.preprocess_cfg``).
        n_views: views per image, view 0 included (TPT: 64).
        augmix: AugMix on the crops (module docstring).
        severity: AugMix level upper bound (TPT: 1).
        flip: random horizontal flips (TPT: on; off for data where a mirror image is another class).
        device: where the views are made (default: where the image is).
    """

    def __init__(
        self,
        size: int,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        *,
        n_views: int = 64,
        augmix: bool = False,
        severity: float = 1.0,
        flip: bool = True,
        device: torch.device | str | None = None,
    ) -> None:
        self.size = check_int("size", size, minimum=1)
        self.n_views = check_int("n_views", n_views, minimum=1)
        self.severity = check_number("severity", severity, minimum=_LEVEL_LOW, strict_minimum=True)
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise fail("mean/std", "three means and three positive stds", f"{mean!r} / {std!r}")
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.augmix = bool(augmix)
        self.flip = bool(flip)
        self.device = device

    def __repr__(self) -> str:
        return (
            f"ViewAugmenter(size={self.size}, n_views={self.n_views}, augmix={self.augmix}, "
            f"severity={self.severity}, flip={self.flip})"
        )

    def _normalize(self, images: torch.Tensor, total_weight: torch.Tensor | float = 1.0) -> torch.Tensor:
        """``(x / 255 - w mean) / std`` for ``x`` a mix of 8-bit images with weights summing to ``w``
        (in place when ``images`` is already float32)."""
        mean, std = self.mean.to(images.device), self.std.to(images.device)
        if isinstance(total_weight, torch.Tensor):
            total_weight = total_weight.view(-1, 1, 1, 1)
        out = images.to(torch.float32)
        return out.mul_(1.0 / (255.0 * std)).sub_(total_weight * mean / std)

    def center_view(self, image: torch.Tensor) -> torch.Tensor:
        """View 0 as uint8 ``(3, size, size)``: bicubic resize of the shorter side, centre crop."""
        resized = TF.resize(image, self.size, interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
        return TF.center_crop(resized, [self.size, self.size])

    def crops(self, image: torch.Tensor, params: CropParams) -> torch.Tensor:
        """The resized, flipped crops as uint8 ``(n, 3, size, size)``.

        On the CPU each crop is resized by torchvision's 8-bit anti-aliased kernel (PIL's triangle filter,
        vectorized; faster there than any batched float operation); elsewhere all crops are one
        ``roi_align``.
        """
        device = image.device
        if device.type == "cpu":
            boxes = torch.stack([params.top, params.left, params.height, params.width], dim=1).tolist()
            crops = [
                TF.resized_crop(image, top, left, height, width, [self.size, self.size], antialias=True)
                for top, left, height, width in boxes
            ]
            flips = params.flip.tolist()
            return torch.stack(
                [crop.flip(-1) if flip else crop for crop, flip in zip(crops, flips, strict=True)]
            )
        boxes = torch.stack(
            [
                torch.zeros_like(params.left),
                params.left,
                params.top,
                params.left + params.width,
                params.top + params.height,
            ],
            dim=1,
        ).to(device, torch.float32)
        crops = roi_align(image[None].float(), boxes, (self.size, self.size), 1.0, -1, aligned=True)
        crops = crops.round_().clamp_(0, 255).to(torch.uint8)
        flip = params.flip.to(device).view(-1, 1, 1, 1)
        return torch.where(flip, crops.flip(-1), crops)

    def mix(self, crops: torch.Tensor, params: AugMixParams) -> torch.Tensor:
        """AugMix of uint8 crops ``(n, 3, s, s)``, normalized float32 (module docstring).

        The three chains of every view are one batch; at each depth the rows that apply a rotation,
        shear or translation share one warp (each row its own matrix), and each other operation runs
        on its rows, so a depth costs five batched calls whatever the number of views.
        """
        n = crops.shape[0]
        device = crops.device
        chains = crops.repeat_interleave(AUGMIX_WIDTH, dim=0)  # row i * 3 + c: chain c of view i
        depth = params.depth.reshape(-1)
        ops = params.ops.reshape(-1, AUGMIX_MAX_DEPTH)
        levels = params.levels.reshape(-1, AUGMIX_MAX_DEPTH)
        signs = params.signs.reshape(-1, AUGMIX_MAX_DEPTH)
        height, width = crops.shape[-2:]
        for step in range(AUGMIX_MAX_DEPTH):
            active = depth > step
            warp_rows, warp_matrices = [], []
            for index, op in enumerate(AUGMIX_OPS):
                rows = torch.nonzero(active & (ops[:, step] == index)).squeeze(1)
                if rows.numel() == 0:
                    continue
                magnitude = op_magnitude(op, levels[rows, step], signs[rows, step], self.size)
                if op in _SIGNED_OPS:
                    warp_rows.append(rows)
                    warp_matrices.append(op_matrices(op, magnitude, height, width))
                    continue
                rows_device = rows.to(device)
                chains[rows_device] = apply_op(op, chains[rows_device], magnitude)
            if warp_rows:
                rows_device = torch.cat(warp_rows).to(device)
                chains[rows_device] = affine_warp(chains[rows_device], torch.cat(warp_matrices))
        weights = params.weights.to(device)
        blend = params.blend.to(device)
        coefficients = torch.cat([blend[:, None], (1 - blend)[:, None] * weights], dim=1)  # (n, 4)
        chains = chains.view(n, AUGMIX_WIDTH, *crops.shape[1:])
        mixed = crops.to(torch.float32).mul_(coefficients[:, 0].view(-1, 1, 1, 1))
        for c in range(AUGMIX_WIDTH):
            mixed.addcmul_(chains[:, c].to(torch.float32), coefficients[:, c + 1].view(-1, 1, 1, 1))
        return self._normalize(mixed, coefficients.sum(dim=1))

    def batch(
        self, images: Sequence[Image.Image | torch.Tensor], generators: Sequence[torch.Generator]
    ) -> torch.Tensor:
        """The views of several images, ``(len(images) * n_views, 3, size, size)``, image ``i``'s drawn from
        ``generators[i]`` exactly as ``self(images[i], generators[i])`` draws them. Crops are cut per image
        (sizes differ); AugMix runs once over the crops of all images."""
        if len(images) != len(generators) or not images:
            raise fail("generators", f"one per image ({len(images)} images)", len(generators))
        n_random = self.n_views - 1
        centres, crops, mixes = [], [], []
        for image, generator in zip(images, generators, strict=True):
            image = decode(image, self.device)
            centres.append(self.center_view(image))
            if n_random == 0:
                continue
            flip = 0.5 if self.flip else 0.0
            params = sample_crops(image.shape[1], image.shape[2], n_random, generator, flip_probability=flip)
            crops.append(self.crops(image, params))
            if self.augmix:
                mixes.append(sample_augmix(n_random, generator, severity=self.severity))
        first = self._normalize(torch.stack(centres))
        if n_random == 0:
            return first
        all_crops = torch.cat(crops)
        if self.augmix:
            joined = AugMixParams(
                *(torch.cat([getattr(m, f.name) for m in mixes]) for f in fields(AugMixParams))
            )
            rest = self.mix(all_crops, joined)
        else:
            rest = self._normalize(all_crops)
        rest = rest.view(len(images), n_random, *rest.shape[1:])
        return torch.cat([first[:, None], rest], dim=1).flatten(0, 1)

    def __call__(self, image: Image.Image | torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The ``n_views`` normalized views of ``image`` (PIL or uint8 ``(3, H, W)``) from ``generator``."""
        return self.batch([image], [generator])


def sample_seed(seed: int, index: int) -> int:
    """The generator seed of test sample ``index`` in a run seeded ``seed``: views depend on the sample,
    never on which process or step handles it."""
    return (int(seed) * 0x9E3779B97F4A7C15 + int(index) * 0xBF58476D1CE4E5B9 + 1) % (1 << 63)


def sample_generator(seed: int, index: int) -> torch.Generator:
    """A CPU generator seeded by ``sample_seed(seed, index)``."""
    return torch.Generator().manual_seed(sample_seed(seed, index))


def view_size(model: torch.nn.Module) -> int:
    """The square input size of a CLIP image tower (``model.visual.image_size``)."""
    image_size = getattr(getattr(model, "visual", None), "image_size", None)
    if image_size is None:
        raise fail("model", "a CLIP model with visual.image_size", type(model).__name__)
    if isinstance(image_size, (tuple, list)):
        if image_size[0] != image_size[1]:
            raise fail("model", "a square image input", tuple(image_size))
        return int(image_size[0])
    return int(image_size)


def normalization(model: torch.nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` of a CLIP image tower's preprocessing (open_clip's ``preprocess_cfg``)."""
    cfg = getattr(getattr(model, "visual", None), "preprocess_cfg", None) or {}
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    mean = tuple(float(v) for v in cfg.get("mean", OPENAI_DATASET_MEAN))
    std = tuple(float(v) for v in cfg.get("std", OPENAI_DATASET_STD))
    return mean, std


__all__ = [
    "AUGMIX_OPS",
    "CROP_RATIO",
    "CROP_SCALE",
    "AugMixParams",
    "CropParams",
    "ViewAugmenter",
    "affine_warp",
    "apply_op",
    "decode",
    "normalization",
    "op_magnitude",
    "op_matrices",
    "posterize",
    "rotation_matrices",
    "sample_augmix",
    "sample_crops",
    "sample_generator",
    "sample_seed",
    "solarize",
    "view_size",
]
