"""Hugging Face CLIP and SigLIP behind fastcal (``fastcal.models.hf``), checked against the
``transformers`` model's own ``get_text_features`` / ``get_image_features`` on hf_tiny random-init models
built offline: values and gradients, in float64, with the exact truncated encoder, prompt learners,
packed prompts, loading from a folder and from the Hugging Face cache."""

import json
import sys

import pytest
import torch
import torch.nn.functional as F

from fastcal.methods.coop import CoOp
from fastcal.methods.prompt_learner import PromptLearner
from fastcal.models import TextEncoder, WeightsNotFoundError, load_clip
from fastcal.models.cache import zeroshot_class_features
from fastcal.models.hf import HFCLIP, HFTokenizer

PROMPTS = [
    "a photo of a dog.",
    "a photo of a golden retriever, a kind of dog with a long coat.",
    "x",
    "an origami of a great white shark.",
]
NAMES = ["dog", "golden_retriever", "great  white shark", "x"]


def tokenizer(hf_tiny):
    return HFTokenizer(hf_tiny.clip_tokenizer(), hf_tiny.CONTEXT_LENGTH)


def hf_text(model, ids):
    out = model.get_text_features(input_ids=ids)
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def hf_image(model, images):
    out = model.get_image_features(pixel_values=images)
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def siglip_ids(texts, length=16):
    """SigLIP-like token ids: words, then the end token (1) padded to the full length; no start token."""
    rows = []
    for text in texts:
        words = [3 + sum(map(ord, w)) % 97 for w in text.replace(".", " .").split()][: length - 1]
        rows.append(words + [1] * (length - len(words)))
    return torch.tensor(rows)


def text_grads(model, features):
    model.zero_grad(set_to_none=True)
    cotangent = torch.linspace(-1, 1, features.numel(), dtype=features.dtype).view_as(features)
    (features * cotangent).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("eos_token_id", [49407, 2], ids=["eos", "legacy-argmax"])
def test_truncated_text_features_and_gradients_equal_get_text_features(attn, eos_token_id, hf_tiny):
    model = hf_tiny.clip_model(eos_token_id=eos_token_id, attn=attn).double().requires_grad_(True)
    encoder = TextEncoder(HFCLIP(model), bucket=True)
    ids = tokenizer(hf_tiny)(PROMPTS)
    assert encoder.is_causal
    groups, _ = encoder._plan(ids)
    assert max(length for _, length in groups) < hf_tiny.CONTEXT_LENGTH  # it really ran fewer positions

    ours, theirs = encoder.encode(ids), hf_text(model, ids)
    torch.testing.assert_close(ours, theirs, atol=1e-12, rtol=1e-10)
    ours_grads, theirs_grads = text_grads(model, ours), text_grads(model, theirs)
    assert {n for n in theirs_grads if n.startswith("text")} <= set(ours_grads)
    assert "text_model.embeddings.token_embedding.weight" in ours_grads
    for name, grad in theirs_grads.items():
        torch.testing.assert_close(ours_grads[name], grad, atol=1e-12, rtol=1e-9, msg=name)


def test_image_features_and_the_open_clip_interface(hf_tiny):
    model = hf_tiny.clip_model().double()
    clip = HFCLIP(model)
    images = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    torch.testing.assert_close(clip.encode_image(images), hf_image(model, images), atol=1e-12, rtol=0)
    torch.testing.assert_close(clip.visual(images), hf_image(model, images), atol=1e-12, rtol=0)
    assert clip.visual.output_dim == 24 and clip.visual.image_size == 32
    assert clip.logit_scale.shape == () and clip.logit_bias is None
    # the wrapped model's weights are listed once, under "hf."
    names = list(clip.state_dict())
    assert names == ["hf." + n for n in model.state_dict()]
    image, text, scale = clip(images, tokenizer(hf_tiny)(PROMPTS[:3]))
    logits = scale * image @ text.T
    ids = tokenizer(hf_tiny)(PROMPTS[:3])
    reference = model(input_ids=ids, pixel_values=images).logits_per_image
    torch.testing.assert_close(logits, reference, atol=1e-10, rtol=0)


def test_prompt_learner_and_packed_prompts_equal_the_hand_crafted_prompt_and_its_gradient(hf_tiny):
    model = hf_tiny.clip_model().double()
    clip = HFCLIP(model)
    coop = CoOp(clip, tokenizer(hf_tiny), NAMES, n_ctx=4, ctx_init="a photo of a").double()
    assert coop.packed is not None  # the shared prefix runs once: the tower is causal
    prompts = [f"a photo of a {name}." for name in ("dog", "golden retriever", "great white shark", "x")]
    ids = tokenizer(hf_tiny)(prompts)

    # the context starts as the embeddings of "a photo of a": the features are the prompt's
    features = coop.class_features()
    torch.testing.assert_close(features, hf_text(model, ids), atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(coop.prompt_learner(), features, atol=1e-12, rtol=1e-10)

    # gradient to the context == the gradient of HF's forward to the token embeddings at positions 1..4
    captured = {}

    def keep(module, inputs, output):
        captured["embeddings"] = output.requires_grad_(True)  # a leaf: the model is frozen

    hook = model.text_model.embeddings.token_embedding.register_forward_hook(keep)
    (
        hf_text(model, ids) * torch.linspace(-1, 1, features.numel()).view_as(features).double()
    ).sum().backward()
    hook.remove()
    expected = captured["embeddings"].grad[:, 1:5].sum(dim=0)
    (
        coop.class_features() * torch.linspace(-1, 1, features.numel()).view_as(features).double()
    ).sum().backward()
    torch.testing.assert_close(coop.prompt_learner.ctx.grad, expected, atol=1e-12, rtol=1e-9)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_siglip_runs_at_full_length_exactly_and_refuses_prompt_learners(attn, hf_tiny):
    model = hf_tiny.siglip_model(attn=attn).double().requires_grad_(True)
    clip = HFCLIP(model)
    encoder = TextEncoder(clip, bucket=True)
    assert not encoder.is_causal  # bidirectional: never truncated
    ids = siglip_ids(PROMPTS)
    ours, theirs = encoder.encode(ids), hf_text(model, ids)
    torch.testing.assert_close(ours, theirs, atol=1e-12, rtol=0)
    ours_grads, theirs_grads = text_grads(model, ours), text_grads(model, theirs)
    for name, grad in theirs_grads.items():
        torch.testing.assert_close(ours_grads[name], grad, atol=1e-12, rtol=1e-9, msg=name)
    # truncating it would be wrong: the same ids cut to 10 positions give other features
    cut = hf_text(model, ids[:, :10])
    assert (cut - theirs).abs().max() > 1e-3
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    torch.testing.assert_close(clip.encode_image(images), hf_image(model, images), atol=1e-12, rtol=0)
    assert float(clip.logit_bias.detach()) == -10.0

    with pytest.raises(
        ValueError, match="tokenizer: expected one that starts every prompt with a start token"
    ):
        PromptLearner(TextEncoder(clip), siglip_ids, ["dog", "cat"], ctx_init="a photo of a")
    # zero-shot classification works: full-length features of the templates (float64 model: float64)
    features = zeroshot_class_features(clip, siglip_ids, ["dog", "cat"], ["a photo of a {}."])
    reference = F.normalize(hf_text(model, siglip_ids(["a photo of a dog.", "a photo of a cat."])), dim=-1)
    torch.testing.assert_close(features, reference, atol=1e-12, rtol=0)


def test_class_names_are_cleaned_on_every_path_to_a_prompt(hf_tiny):
    clip = HFCLIP(hf_tiny.clip_model())
    tok = tokenizer(hf_tiny)
    clean = zeroshot_class_features(clip, tok, ["golden retriever"], ["a photo of a {}."])
    for messy in ("golden_retriever", " golden  retriever ", "golden_ retriever"):
        torch.testing.assert_close(zeroshot_class_features(clip, tok, [messy], ["a photo of a {}."]), clean)
        learner = PromptLearner(TextEncoder(clip), tok, [messy], ctx_init="a photo of a")
        assert learner.classnames == ["golden retriever"]
        torch.testing.assert_close(F.normalize(learner().detach(), dim=-1), clean, atol=1e-6, rtol=0)


def test_load_clip_from_a_saved_folder(tmp_path, hf_tiny):
    folder = tmp_path / "tiny-clip"
    model = hf_tiny.save_clip_folder(folder)
    loaded = load_clip(f"hf:{folder}")
    assert isinstance(loaded.model, HFCLIP) and loaded.tokenizer.context_length == hf_tiny.CONTEXT_LENGTH
    ids = loaded.tokenizer(PROMPTS)
    torch.testing.assert_close(ids, tokenizer(hf_tiny)(PROMPTS))
    with torch.no_grad():
        torch.testing.assert_close(
            TextEncoder(loaded.model).encode(ids), hf_text(model, ids), atol=1e-5, rtol=0
        )
    from PIL import Image

    image = Image.new("RGB", (40, 48), (200, 30, 90))
    assert tuple(loaded.eval_transform(image).shape) == (3, 32, 32)
    assert loaded.model.visual.preprocess_cfg["resize_mode"] == "shortest"
    assert loaded.model.visual.preprocess_cfg["mean"] == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    assert loaded.model.training is False


def _fake_hub_cache(root, repo, folder):
    """``folder``'s files laid out as the Hugging Face cache holds repository ``repo`` at one commit."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    base = root / f"models--{repo.replace('/', '--')}"
    snapshot = base / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for file in folder.iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(commit)


def test_load_clip_by_hub_id_from_the_cache_offline_and_a_one_line_error_when_missing(
    tmp_path, monkeypatch, hf_tiny
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = tmp_path / "saved"
    hf_tiny.save_clip_folder(folder)
    cache = tmp_path / "hub"
    _fake_hub_cache(cache, "someone/hf_tiny-clip", folder)
    loaded = load_clip("hf:someone/hf_tiny-clip", cache_dir=cache)
    assert isinstance(loaded.model, HFCLIP)

    with pytest.raises(WeightsNotFoundError) as error:
        load_clip("hf:someone/not-here", cache_dir=cache)
    message = str(error.value)
    assert "\n" not in message and "huggingface-cli download someone/not-here" in message
    assert "offline mode is on" in message and "hf:/path/to/folder" in message

    with pytest.raises(FileNotFoundError, match="name: expected a Hugging Face model folder"):
        load_clip(f"hf:{tmp_path / 'nothing'}")
    with pytest.raises(ValueError, match="pretrained: expected None with 'hf:"):
        load_clip(f"hf:{folder}", pretrained="openai")


def test_a_missing_transformers_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=r"pip install 'fastcal\[hf\]'"):
        load_clip(f"hf:{tmp_path}")


def test_a_folder_of_another_model_type_is_refused(tmp_path, hf_tiny):
    folder = tmp_path / "bert"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="name: expected a Hugging Face CLIP or SigLIP model"):
        load_clip(f"hf:{folder}")
