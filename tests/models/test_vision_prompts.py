"""Deep visual prompts against open_clip's own ``VisionTransformer.forward`` with hooks that insert the
prompts the way the reference does (appended before ``ln_pre``, replaced before each deeper block)."""

import open_clip
import pytest
import torch

from fastcal.models.vision_prompts import DeepVisualPrompts, prompted_image_features

CFG = {
    "embed_dim": 24,
    "vision_cfg": {"image_size": 40, "layers": 3, "width": 48, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def model():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        return open_clip.CLIP(**CFG).eval()


def hooked_forward(model, images, prompts):
    """``model.encode_image`` with forward pre-hooks: ln_pre's input gets ``prompts[0]`` appended, block
    k's input gets its last n tokens replaced by ``prompts[k]`` (CLS pooling ignores extra tokens)."""
    visual = model.visual
    n = prompts[0].shape[-2]
    batch = images.shape[0]

    def expand(p):
        return p.expand(batch, -1, -1) if p.ndim == 2 else p

    handles = [
        visual.ln_pre.register_forward_pre_hook(lambda m, a: (torch.cat([a[0], expand(prompts[0])], 1),))
    ]
    for k in range(1, len(prompts)):

        def replace(module, args, kwargs, k=k):
            return (torch.cat([args[0][:, :-n], expand(prompts[k])], 1),), kwargs

        handles.append(visual.transformer.resblocks[k].register_forward_pre_hook(replace, with_kwargs=True))
    try:
        return model.encode_image(images)
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("per_image", [False, True])
def test_matches_hooked_open_clip_forward(model, depth, per_image):
    images = torch.randn(3, 3, 40, 40)
    shape = (3, 5, 48) if per_image else (5, 48)
    prompts = [torch.randn(shape) * 0.5 for _ in range(depth)]
    with torch.no_grad():
        expected = hooked_forward(model, images, prompts)
        features = prompted_image_features(model, images, prompts)
    assert features.shape == (3, 24)
    torch.testing.assert_close(features, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(features, model.encode_image(images).detach(), atol=1e-3)


def test_gradients_reach_the_prompts_only(model):
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    model.requires_grad_(False)
    prompts = DeepVisualPrompts(model, n_tokens=4, depth=3)
    assert prompts.prompts.shape == (3, 4, 48)
    optimizer = torch.optim.SGD(prompts.parameters(), lr=1.0)
    prompts(model, torch.randn(2, 3, 40, 40)).square().sum().backward()
    assert prompts.prompts.grad.abs().sum(dim=(1, 2)).gt(0).all()
    before = prompts.prompts.detach().clone()
    optimizer.step()
    assert not torch.equal(before, prompts.prompts.detach())
    for key, value in model.state_dict().items():
        assert torch.equal(value, frozen[key]), key
    model.requires_grad_(True)


def test_invalid_prompts(model):
    images = torch.randn(2, 3, 40, 40)
    with pytest.raises(ValueError, match="prompts"):
        prompted_image_features(model, images, [torch.zeros(2, 48)] * 4)
    with pytest.raises(ValueError, match="prompts"):
        prompted_image_features(model, images, [])
    with pytest.raises(ValueError, match=r"prompts\[1\]"):
        prompted_image_features(model, images, [torch.zeros(2, 48), torch.zeros(3, 48)])
    with pytest.raises(ValueError, match=r"prompts\[0\]"):
        prompted_image_features(model, images, [torch.zeros(5, 2, 48)])
    with pytest.raises(ValueError, match="depth"):
        DeepVisualPrompts(model, n_tokens=2, depth=4)
    resnet = open_clip.CLIP(
        embed_dim=16,
        vision_cfg={"image_size": 32, "layers": [1, 1, 1, 1], "width": 16},
        text_cfg={"context_length": 8, "vocab_size": 100, "width": 16, "heads": 2, "layers": 1},
    )
    with pytest.raises(TypeError, match="VisionTransformer"):
        prompted_image_features(resnet, torch.randn(1, 3, 32, 32), [torch.zeros(1, 16)])
