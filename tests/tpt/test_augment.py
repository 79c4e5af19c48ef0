"""TPT's views: parameter distributions against the reference's samplers, operations against PIL.

The reference (azshue/TPT ``data/datautils.py`` and ``data/augmix_ops.py``) draws crops with
torchvision's ``RandomResizedCrop.get_params`` and AugMix parameters with NumPy, one view at a time, and
applies the operations with PIL. Here the reference samplers are run as they are (torchvision) or
re-stated with NumPy the way the reference calls them, and compared with fastcal's vectorized samplers
by two-sample tests on fixed seeds; each batched operation is compared with PIL on a real image.
"""

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageOps
from scipy import stats
from torchvision import transforms as T
from torchvision.transforms import functional as F1

from fastcal.tpt.augment import (
    AUGMIX_OPS,
    CropParams,
    ViewAugmenter,
    apply_op,
    op_magnitude,
    sample_augmix,
    sample_crops,
)

P_MIN = 1e-3  # fixed seeds make these deterministic; a real mismatch gives p far below this


def smooth_image(height, width, seed=0):
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(height // 8, 2), max(width // 8, 2), 3)).astype(np.uint8)
    return Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)


def reference_crops(height, width, n, seed):
    torch.manual_seed(seed)
    image = torch.zeros(3, height, width)
    boxes = [T.RandomResizedCrop.get_params(image, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) for _ in range(n)]
    return np.array(boxes, dtype=np.float64)  # (top, left, h, w)


def crop_statistics(boxes, height, width):
    top, left, h, w = boxes.T
    return {
        "area": h * w / (height * width),
        "log_ratio": np.log(w / h),
        "top": top / np.maximum(height - h + 1, 1),
        "left": left / np.maximum(width - w + 1, 1),
    }


@pytest.mark.parametrize(("height", "width"), [(300, 200), (32, 32), (60, 240)])
def test_crop_scale_ratio_and_position_match_torchvision(height, width):
    n = 4000
    ours = sample_crops(height, width, n, torch.Generator().manual_seed(1))
    ours_boxes = torch.stack([ours.top, ours.left, ours.height, ours.width], 1).double().numpy()
    theirs = crop_statistics(reference_crops(height, width, n, seed=2), height, width)
    mine = crop_statistics(ours_boxes, height, width)
    for key in theirs:
        assert stats.ks_2samp(mine[key], theirs[key]).pvalue > P_MIN, key
    assert (ours.height <= height).all() and (ours.width <= width).all()
    assert (ours.top + ours.height <= height).all() and (ours.left + ours.width <= width).all()
    assert 0.4 < ours.flip.float().mean() < 0.6


def test_crop_test_detects_a_wrong_scale_range():
    # the same comparison rejects a sampler with another area range: the bound above is meaningful
    n = 4000
    wrong = sample_crops(300, 200, n, torch.Generator().manual_seed(1), scale=(0.2, 1.0))
    wrong_boxes = torch.stack([wrong.top, wrong.left, wrong.height, wrong.width], 1).double().numpy()
    theirs = crop_statistics(reference_crops(300, 200, n, seed=2), 300, 200)
    assert stats.ks_2samp(crop_statistics(wrong_boxes, 300, 200)["area"], theirs["area"]).pvalue < 1e-6


def reference_augmix_draws(n_views, seed, size):
    """The reference's NumPy draws, in its order: per view w ~ Dirichlet, m ~ Beta, then per chain a
    depth and per operation a choice and (where the operation uses one) a level and a sign."""
    rng = np.random.RandomState(seed)
    weights, blends, depths, ops, magnitudes = [], [], [], [], {op: [] for op in AUGMIX_OPS}
    for _ in range(n_views):
        weights.append(rng.dirichlet([1.0, 1.0, 1.0]).astype(np.float32))
        blends.append(np.float32(rng.beta(1.0, 1.0)))
        for _chain in range(3):
            depth = rng.randint(1, 4)
            depths.append(depth)
            for _ in range(depth):
                op = AUGMIX_OPS[rng.randint(len(AUGMIX_OPS))]  # np.random.choice over the list
                ops.append(AUGMIX_OPS.index(op))
                level = rng.uniform(low=0.1, high=1)
                if op == "posterize":
                    magnitudes[op].append(4 - int(level * 4 / 10))
                elif op == "rotate":
                    magnitudes[op].append(int(level * 30 / 10) * (-1 if rng.uniform() > 0.5 else 1))
                elif op == "solarize":
                    magnitudes[op].append(256 - int(level * 256 / 10))
                elif op in ("shear_x", "shear_y"):
                    magnitudes[op].append(float(level) * 0.3 / 10 * (-1 if rng.uniform() > 0.5 else 1))
                elif op in ("translate_x", "translate_y"):
                    magnitudes[op].append(int(level * (size / 3) / 10) * (-1 if rng.random() > 0.5 else 1))
    return np.array(weights), np.array(blends), np.array(depths), np.array(ops), magnitudes


def two_sample_chi_square(a, b):
    values = np.union1d(a, b)
    table = np.array([[np.sum(a == v) for v in values], [np.sum(b == v) for v in values]])
    if table.shape[1] == 1:
        return 1.0
    return stats.chi2_contingency(table)[1]


def test_augmix_parameters_match_the_reference_draws():
    n, size = 3000, 224
    params = sample_augmix(n, torch.Generator().manual_seed(3))
    ref_w, ref_m, ref_depth, ref_ops, ref_mag = reference_augmix_draws(n, seed=4, size=size)

    w = params.weights.numpy()
    assert np.allclose(w.sum(1), 1.0, atol=1e-6)
    for c in range(3):  # Dirichlet(1,1,1) marginals are Beta(1, 2)
        assert stats.ks_2samp(w[:, c], ref_w[:, c]).pvalue > P_MIN
        assert stats.kstest(w[:, c], stats.beta(1, 2).cdf).pvalue > P_MIN
    assert stats.ks_2samp(params.blend.numpy(), ref_m).pvalue > P_MIN
    depth = params.depth.reshape(-1).numpy()
    assert two_sample_chi_square(depth, ref_depth) > P_MIN
    assert set(np.unique(depth)) == {1, 2, 3}

    used = torch.arange(3)[None, None, :] < params.depth[:, :, None]  # operations a chain applies
    ops = params.ops[used].numpy()
    assert two_sample_chi_square(ops, ref_ops) > P_MIN
    assert stats.chisquare(np.bincount(ops, minlength=len(AUGMIX_OPS))).pvalue > P_MIN

    levels, signs = params.levels[used], params.signs[used]
    assert stats.kstest(levels.numpy(), stats.uniform(0.1, 0.9).cdf).pvalue > P_MIN
    for index, op in enumerate(AUGMIX_OPS):
        chosen = params.ops[used] == index
        mine = op_magnitude(op, levels[chosen], signs[chosen], size).numpy()
        if op in ("autocontrast", "equalize"):
            continue
        if op.startswith("shear"):
            assert stats.ks_2samp(mine, ref_mag[op]).pvalue > P_MIN, op
        else:
            assert two_sample_chi_square(mine, np.array(ref_mag[op])) > P_MIN, op


def test_magnitudes_at_severity_one():
    level = torch.tensor([0.1, 0.34, 0.99], dtype=torch.float64)
    plus = torch.ones(3, dtype=torch.float64)
    assert op_magnitude("posterize", level, plus, 224).tolist() == [4, 4, 4]
    assert op_magnitude("rotate", level, -plus, 224).tolist() == [0, -1, -2]
    assert op_magnitude("solarize", level, plus, 224).tolist() == [254, 248, 231]
    assert op_magnitude("translate_x", level, plus, 224).tolist() == [0, 2, 7]
    assert op_magnitude("translate_x", level, plus, 32).tolist() == [0, 0, 1]
    assert torch.allclose(op_magnitude("shear_y", level, plus, 224), level * 0.03)


PIL_OPS = {
    "autocontrast": lambda im, m: ImageOps.autocontrast(im),
    "equalize": lambda im, m: ImageOps.equalize(im),
    "posterize": lambda im, m: ImageOps.posterize(im, int(m)),
    "solarize": lambda im, m: ImageOps.solarize(im, int(m)),
    "rotate": lambda im, m: im.rotate(m, resample=Image.Resampling.BILINEAR),
    "shear_x": lambda im, m: im.transform(
        im.size, Image.Transform.AFFINE, (1, m, 0, 0, 1, 0), Image.Resampling.BILINEAR
    ),
    "shear_y": lambda im, m: im.transform(
        im.size, Image.Transform.AFFINE, (1, 0, 0, m, 1, 0), Image.Resampling.BILINEAR
    ),
    "translate_x": lambda im, m: im.transform(
        im.size, Image.Transform.AFFINE, (1, 0, m, 0, 1, 0), Image.Resampling.BILINEAR
    ),
    "translate_y": lambda im, m: im.transform(
        im.size, Image.Transform.AFFINE, (1, 0, 0, 0, 1, m), Image.Resampling.BILINEAR
    ),
}
MAGNITUDES = {
    "autocontrast": [0.0, 0.0],
    "equalize": [0.0, 0.0],
    "posterize": [4.0, 3.0],
    "solarize": [231.0, 254.0],
    "rotate": [2.0, -25.0],
    "shear_x": [0.03, -0.017],
    "shear_y": [-0.03, 0.011],
    "translate_x": [7.0, -3.0],
    "translate_y": [-5.0, 2.0],
}


@pytest.mark.parametrize("op", AUGMIX_OPS)
def test_batched_operations_match_pil(op):
    images = [smooth_image(45, 45, seed=s) for s in (5, 6)]
    # low contrast, so that autocontrast and equalize have work to do
    images = [Image.eval(im, lambda v: 60 + v // 3) for im in images]
    batch = torch.stack([TF.pil_to_tensor(im) for im in images])
    magnitude = torch.tensor(MAGNITUDES[op], dtype=torch.float64)
    out = apply_op(op, batch, magnitude)
    assert out.dtype == torch.uint8 and out.shape == batch.shape
    for i, im in enumerate(images):
        expected = TF.pil_to_tensor(PIL_OPS[op](im, float(magnitude[i])))
        difference = (out[i].int() - expected.int()).abs()
        assert int(difference.max()) <= 1, op  # bilinear rounding; the rest is exact
        if op in ("equalize", "posterize", "solarize", "translate_x", "translate_y"):
            assert int(difference.max()) == 0, op


@pytest.mark.parametrize(("box", "flip"), [((10, 20, 300, 200), False), ((5, 3, 40, 61), True)])
def test_crops_match_pil_resized_crop(box, flip):
    image = smooth_image(400, 500, seed=7)
    augmenter = ViewAugmenter(96, (0.5,) * 3, (0.25,) * 3)
    params = CropParams(*(torch.tensor([v]) for v in box), torch.tensor([flip]))
    ours = augmenter.crops(TF.pil_to_tensor(image), params)[0]
    expected = TF.pil_to_tensor(F1.resized_crop(image, *box, [96, 96]))
    if flip:
        expected = expected.flip(-1)
    difference = (ours.float() - expected.float()).abs()
    assert float(difference.mean()) < 2.0  # roi_align averages samples, PIL uses a triangle filter
    assert float(difference.max()) <= 12


def test_centre_view_matches_the_reference_transform():
    image = smooth_image(150, 113, seed=8)
    augmenter = ViewAugmenter(64, (0.5,) * 3, (0.25,) * 3)
    ours = augmenter.center_view(TF.pil_to_tensor(image))
    reference = T.Compose([T.Resize(64, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(64)])
    expected = TF.pil_to_tensor(reference(image))
    assert ours.shape == expected.shape == (3, 64, 64)
    assert float((ours.float() - expected.float()).abs().max()) <= 2


@pytest.mark.parametrize("augmix", [False, True])
def test_views_are_seeded_normalized_and_view_zero_is_the_centre(augmix):
    image = smooth_image(70, 90, seed=9)
    mean, std = (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)
    augmenter = ViewAugmenter(32, mean, std, n_views=12, augmix=augmix)
    first = augmenter(image, torch.Generator().manual_seed(11))
    again = augmenter(image, torch.Generator().manual_seed(11))
    other = augmenter(image, torch.Generator().manual_seed(12))
    assert first.shape == (12, 3, 32, 32) and first.dtype == torch.float32
    assert torch.equal(first, again) and not torch.equal(first[1:], other[1:])
    centre = augmenter.center_view(TF.pil_to_tensor(image)).float() / 255
    expected = (centre - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    assert torch.allclose(first[0], expected, atol=1e-5)
    pixels = first * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    assert float(pixels.min()) >= -1e-5 and float(pixels.max()) <= 1 + 1e-5


def test_without_augmix_the_views_are_the_flipped_crops():
    image = TF.pil_to_tensor(smooth_image(50, 64, seed=10))
    augmenter = ViewAugmenter(24, (0.0,) * 3, (1.0,) * 3, n_views=9)
    views = augmenter(image, torch.Generator().manual_seed(3))
    params = sample_crops(50, 64, 8, torch.Generator().manual_seed(3))
    assert torch.allclose(views[1:], augmenter.crops(image, params).float() / 255)


def test_no_flip_option_never_flips():
    params = sample_crops(40, 40, 500, torch.Generator().manual_seed(0), flip_probability=0.0)
    assert not params.flip.any()


def test_bad_images_are_refused():
    augmenter = ViewAugmenter(16, (0.5,) * 3, (0.5,) * 3)
    with pytest.raises(ValueError, match="image"):
        augmenter(torch.zeros(3, 8, 8), torch.Generator())
    with pytest.raises(TypeError, match="image"):
        augmenter([1, 2, 3], torch.Generator())
    with pytest.raises(ValueError, match="mean/std"):
        ViewAugmenter(16, (0.5,) * 3, (0.5, 0.0, 0.5))


@pytest.mark.parametrize("augmix", [False, True])
def test_a_batch_of_images_gives_each_image_its_own_views(augmix):
    images = [smooth_image(40, 56, seed=13), TF.pil_to_tensor(smooth_image(64, 48, seed=14))]
    augmenter = ViewAugmenter(24, (0.5,) * 3, (0.25,) * 3, n_views=7, augmix=augmix)
    together = augmenter.batch(images, [torch.Generator().manual_seed(s) for s in (1, 2)])
    apart = torch.cat(
        [augmenter(im, torch.Generator().manual_seed(s)) for im, s in zip(images, (1, 2), strict=True)]
    )
    assert together.shape == (14, 3, 24, 24)
    assert torch.allclose(together, apart, atol=1e-6)
