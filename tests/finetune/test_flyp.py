import math

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from fastcal.finetune.flyp import CaptionSampler, ClipFeatures, ContrastiveLoss


def _features(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    text = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    return image, text, torch.tensor(13.7, dtype=torch.float64)


def _hand_contrastive(image, text, scale, eps):
    """Float64 loops: 1/2 [mean_i CE_i(image->text) + mean_i CE_i(text->image)] with smoothed targets."""
    n = image.shape[0]
    total = 0.0
    for a, b in ((image, text), (text, image)):
        for i in range(n):
            logits = [float(scale) * float(a[i] @ b[j]) for j in range(n)]
            top = max(logits)
            log_z = top + math.log(sum(math.exp(z - top) for z in logits))
            for j in range(n):
                target = (1 - eps) * (1.0 if i == j else 0.0) + eps / n
                total -= target * (logits[j] - log_z) / n
    return total / 2


def test_contrastive_equals_open_clip_clip_loss():
    image, text, scale = _features(7, 5, seed=1)
    out = ContrastiveLoss()(image, text, scale)
    torch.testing.assert_close(out.loss, ClipLoss()(image, text, scale), rtol=0, atol=1e-12)
    torch.testing.assert_close(out.logits_per_image, scale * image @ text.T)
    torch.testing.assert_close(out.logits_per_text, scale * text @ image.T)


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.37])
def test_label_smoothed_contrastive_matches_hand_formula(eps):
    image, text, scale = _features(9, 6, seed=2)
    loss = ContrastiveLoss(label_smoothing=eps)(image, text, scale).loss
    assert abs(float(loss) - _hand_contrastive(image, text, scale, eps)) < 1e-10


def test_contrastive_rejects_bad_arguments():
    with pytest.raises(ValueError, match="label_smoothing"):
        ContrastiveLoss(label_smoothing=1.5)
    with pytest.raises(ValueError, match="rank"):
        ContrastiveLoss(rank=2, world_size=2)


def test_clip_features_match_open_clip_forward_and_gradients_reach_both_towers(tiny_clip):
    model = tiny_clip.build_tiny_clip()
    images, _, tokens = tiny_clip.random_batch(6, seed=3)
    features = ClipFeatures(model)
    image_f, text_f, scale = features(images, tokens)
    ref_image, ref_text, ref_scale = model(images, tokens)
    torch.testing.assert_close(image_f, ref_image)
    torch.testing.assert_close(text_f, ref_text, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(scale, ref_scale)

    ContrastiveLoss(label_smoothing=0.1)(image_f, text_f, scale).loss.backward()
    for name, tower in (("visual", model.visual), ("text", model.transformer)):
        grads = [p.grad for p in tower.parameters()]
        assert all(g is not None for g in grads), name
        assert sum(float(g.abs().sum()) for g in grads) > 0, name
    assert model.text_projection.grad.abs().sum() > 0
    assert model.token_embedding.weight.grad.abs().sum() > 0
    assert model.logit_scale.grad is not None and model.logit_scale.grad != 0


def test_caption_sampler_draws_templates_per_draw():
    seen = []

    def tokenizer(texts):
        seen.extend(texts)
        return torch.arange(len(texts) * 4).view(len(texts), 4) + len(seen)

    sampler = CaptionSampler(tokenizer, ["big_cat", "dog"], ["a {}.", "the {}!", "{}"])
    assert sampler.caption(0, 4) == "the big cat!"
    assert sampler.caption(1, 3) == "a dog."
    first = sampler(0, 1)
    again = sampler(0, 4)  # same template (4 % 3 == 1): memoized, tokenized once
    assert torch.equal(first, again)
    assert seen == ["the big cat!"]
    with pytest.raises(ValueError, match="templates"):
        CaptionSampler(tokenizer, ["a"], ["no placeholder"])
    with pytest.raises(ValueError, match="classnames"):
        CaptionSampler(tokenizer, [], ["{}"])
