"""Hugging Face ``transformers`` CLIP and SigLIP as fastcal backbones: ``load_clip("hf:<id or folder>")``.

``HFCLIP`` wraps a ``transformers`` ``CLIPModel`` or ``SiglipModel`` (its weights, not a copy) and shows
fastcal what it reads from an open_clip CLIP: ``encode_text``, ``encode_image``, ``logit_scale``, an
image tower ``visual`` (``image_size``, ``preprocess_cfg``, ``output_dim``) and a text tower ``text`` in
open_clip's shape (``token_embedding``, ``positional_embedding``, ``transformer.resblocks``,
``attn_mask``, ``ln_final``, ``text_projection``, ``pool_type``, ``eos_id``), so that the exact text
encoder (``fastcal.models.TextEncoder``), the prompt learners and the packed prompts run on it.

The two text towers differ in what is exact:

- CLIP's is causal (``CLIPTextModel`` runs it with a causal mask) and reads the feature at the end token:
  the first ``eos_token_id`` of each row, or the largest id for configs from before transformers' PR
  #24773 (``eos_token_id == 2``), as ``CLIPTextModel.forward`` does. The view's ``attn_mask`` is that
  causal mask, so ``TextEncoder`` runs only up to the longest prompt, as for open_clip.
- SigLIP's is bidirectional and reads the last position (``SiglipTextModel``: ``head(x[:, -1])``), of
  text padded to its full length (64 for the released models, as they were trained). The view has no
  mask, so ``TextEncoder`` never truncates it and always runs the full padded length. Its tokenizer
  puts no start token first, which prompt learners need (the context goes right after it): CoOp, TPT
  and the other prompt methods refuse a SigLIP; zero-shot classification and fine-tuning work. Under a
  softmax over classes SigLIP's ``logit_bias`` cancels, so fastcal's logits ``exp(logit_scale) * cos``
  give SigLIP's class probabilities up to its per-pair sigmoid (not a softmax).

Layers are called with an explicit additive mask (a ``transformers`` 5 layer called without one attends
in both directions), so the attention implementation must take one: ``"eager"`` or ``"sdpa"``. Both the
4.x layer signature (with ``causal_attention_mask``, returning a tuple) and the 5.x one are handled.
Half precision: ``transformers`` casts every weight, layer norms included (open_clip keeps those in
float32), so fp16 / bf16 features differ from open_clip's mixed precision at that rounding.

``transformers`` is the optional extra ``fastcal[hf]``; this module imports it only to load a model.
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastcal._checks import check_choice, fail

HF_PREFIX = "hf:"
MODEL_TYPES = ("clip", "siglip")
ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa")
INSTALL_HINT = "pip install 'fastcal[hf]'"
# What a model folder needs: config, weights (safetensors first), tokenizer files, preprocessing.
_CONFIG_FILES = [
    "config.json",
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "spiece.model",
]
_SAFETENSORS = ["model.safetensors", "model.safetensors.index.json", "model-*.safetensors"]
_PYTORCH_WEIGHTS = ["pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*.bin"]
_OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
_RESAMPLE = {2: "bilinear", 3: "bicubic"}


def _pooled(output: Any) -> torch.Tensor:
    """A ``get_*_features`` result: a tensor (transformers 4) or an output whose ``pooler_output`` is
    the projected feature (transformers 5)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _inner_text_model(model: nn.Module) -> nn.Module:
    text = model.text_model
    return text if hasattr(text, "encoder") else text.text_model  # 4.x wraps a *TextTransformer


def _attention_mask(
    mask: torch.Tensor | None, batch: int, heads: int, dtype: torch.dtype
) -> torch.Tensor | None:
    """An open_clip / ``nn.MultiheadAttention`` mask as a 4-D additive mask for a ``transformers`` layer.

    ``(L, L)`` -> ``(1, 1, L, L)``; ``(N * heads, L, L)`` -> ``(N, heads, L, L)``; boolean (True: blocked)
    -> 0 / -inf.
    """
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    mask = mask.to(dtype)
    if mask.ndim == 2:
        return mask[None, None]
    return mask.view(batch, heads, *mask.shape[-2:])


class HFBlock(nn.Module):
    """One ``transformers`` encoder layer called as open_clip calls a block: ``block(x, attn_mask=...)``."""

    def __init__(self, layer: nn.Module, heads: int) -> None:
        super().__init__()
        self.layer = layer
        self.heads = heads
        # 4.x CLIP layers take a separate causal mask and return a tuple
        self.separate_causal_mask = "causal_attention_mask" in inspect.signature(layer.forward).parameters

    @property
    def attn(self) -> nn.Module:
        """The layer's attention (``num_heads``, as ``nn.MultiheadAttention`` has)."""
        return self.layer.self_attn

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        mask = _attention_mask(attn_mask, x.shape[0], self.heads, x.dtype)
        out = self.layer(x, None, mask) if self.separate_causal_mask else self.layer(x, mask)
        return out[0] if isinstance(out, tuple) else out


class HFTransformer(nn.Module):
    """The layers of a ``transformers`` text encoder as open_clip's ``Transformer`` (batch first)."""

    batch_first = True

    def __init__(self, layers: nn.ModuleList, heads: int) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(HFBlock(layer, heads) for layer in layers)

    def get_cast_dtype(self) -> torch.dtype:
        return next(self.resblocks[0].parameters()).dtype

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, attn_mask=attn_mask)
        return x


class HFTextTower(nn.Module):
    """A ``transformers`` CLIP or SigLIP text tower in open_clip's ``TextTransformer`` shape (module
    docstring); every module is the model's own."""

    cls_emb = None
    use_pad_mask = False

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        text = _inner_text_model(model)
        implementation = getattr(text.config, "_attn_implementation", None) or "eager"
        check_choice("attn_implementation", implementation, ATTENTION_IMPLEMENTATIONS)
        self.token_embedding = text.embeddings.token_embedding
        self.position_embedding = text.embeddings.position_embedding
        self.transformer = HFTransformer(text.encoder.layers, text.config.num_attention_heads)
        self.ln_final = text.final_layer_norm
        self.causal = not hasattr(text, "head")
        if self.causal:  # CLIP
            self.text_projection = model.text_projection
            eos = text.config.eos_token_id
            self.pool_type, self.eos_id = ("argmax", None) if eos == 2 else ("eos", eos)
        else:  # SigLIP: a biased linear head on the last position
            self.text_projection = text.head
            self.pool_type, self.eos_id = "last", None
        self._mask: torch.Tensor | None = None

    @property
    def positional_embedding(self) -> torch.Tensor:
        """``(context_length, W)``: the position embeddings, added as ``x + pos[:L]``."""
        return self.position_embedding.weight

    @property
    def context_length(self) -> int:
        return self.position_embedding.weight.shape[0]

    @property
    def attn_mask(self) -> torch.Tensor | None:
        """CLIP: the additive causal mask ``(L, L)`` (-inf above the diagonal), on the weights' device
        (the same tensor while the device is unchanged); SigLIP: ``None`` (bidirectional)."""
        if not self.causal:
            return None
        device = self.position_embedding.weight.device
        if self._mask is None or self._mask.device != device:
            length = self.context_length
            self._mask = torch.full((length, length), float("-inf"), device=device).triu(1)
        return self._mask


class HFImageTower(nn.Module):
    """A ``transformers`` image tower with its projection: ``forward(images) -> features (B, D)``."""

    def __init__(self, model: nn.Module, preprocess_cfg: dict[str, Any]) -> None:
        super().__init__()
        self.vision_model = model.vision_model
        self.visual_projection = getattr(model, "visual_projection", None)  # SigLIP: none
        config = model.config
        self.image_size = int(config.vision_config.image_size)
        self.output_dim = int(getattr(config, "projection_dim", 0) or config.vision_config.hidden_size)
        self.preprocess_cfg = dict(preprocess_cfg)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        output = self.vision_model(pixel_values=images)
        features = output[1] if isinstance(output, tuple) else output.pooler_output
        return features if self.visual_projection is None else self.visual_projection(features)


class HFCLIP(nn.Module):
    """A ``transformers`` ``CLIPModel`` or ``SiglipModel`` behind open_clip's CLIP interface.

    ``hf`` is the wrapped model (registered: ``state_dict``, ``.to()`` and ``train()`` go to it);
    ``text`` and ``visual`` are views of its towers, kept as plain attributes so nothing is listed twice.

    Args:
        model: the ``transformers`` model (attention ``"eager"`` or ``"sdpa"``).
        preprocess_cfg: open_clip's preprocessing settings of the image tower (``size``, ``mean``,
            ``std``, ``interpolation``, ``resize_mode``); default: the model type's.
    """

    def __init__(self, model: nn.Module, preprocess_cfg: dict[str, Any] | None = None) -> None:
        super().__init__()
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in MODEL_TYPES:
            raise fail("model", "a transformers CLIPModel or SiglipModel", type(model).__name__)
        self.model_type = model_type
        self.hf = model
        cfg = preprocess_cfg or default_preprocess_cfg(model_type, int(model.config.vision_config.image_size))
        object.__setattr__(self, "text", HFTextTower(model))
        object.__setattr__(self, "visual", HFImageTower(model, cfg))
        self.train(model.training)

    @property
    def logit_scale(self) -> torch.Tensor:
        """The learned log-scale (0-dim; SigLIP stores it as a 1-element tensor)."""
        return self.hf.logit_scale.reshape(())

    @property
    def logit_bias(self) -> torch.Tensor | None:
        """SigLIP's learned bias of every pair's logit (0-dim), or ``None`` (CLIP)."""
        bias = getattr(self.hf, "logit_bias", None)
        return None if bias is None else bias.reshape(())

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Text features ``(N, D)`` of token ids ``(N, L)``: ``get_text_features`` (full length)."""
        device = self.text.position_embedding.weight.device
        features = _pooled(self.hf.get_text_features(input_ids=text.to(device)))
        return nn.functional.normalize(features, dim=-1) if normalize else features

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Image features ``(N, D)`` of preprocessed images: ``get_image_features``."""
        features = _pooled(self.hf.get_image_features(pixel_values=image))
        return nn.functional.normalize(features, dim=-1) if normalize else features

    def forward(
        self, image: torch.Tensor, text: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(normalize(f_I), normalize(f_T), exp(logit_scale))``, as an open_clip CLIP returns them."""
        return self.encode_image(image, True), self.encode_text(text, True), self.logit_scale.exp()


class HFTokenizer:
    """A ``transformers`` tokenizer as fastcal calls one: ``tokenizer(texts) -> (N, context_length)``
    token ids, padded to the full context length (SigLIP's features depend on it)."""

    def __init__(self, tokenizer: Any, context_length: int) -> None:
        self.tokenizer = tokenizer
        self.context_length = int(context_length)

    def __call__(self, texts: str | list[str]) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        encoded = self.tokenizer(
            texts, padding="max_length", max_length=self.context_length, truncation=True, return_tensors="pt"
        )
        return encoded["input_ids"]


def default_preprocess_cfg(model_type: str, image_size: int) -> dict[str, Any]:
    """The image preprocessing of ``CLIPImageProcessor`` / ``SiglipImageProcessor`` defaults, in
    open_clip's terms: CLIP resizes the shorter side and crops the centre, with OpenAI's mean and std;
    SigLIP resizes to a square, mean = std = 0.5; both bicubic."""
    if model_type == "siglip":
        return {
            "size": image_size,
            "mean": (0.5,) * 3,
            "std": (0.5,) * 3,
            "interpolation": "bicubic",
            "resize_mode": "squash",
        }
    return {
        "size": image_size,
        "mean": _OPENAI_MEAN,
        "std": _OPENAI_STD,
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }


def preprocess_cfg_from_folder(folder: Path, model_type: str, image_size: int) -> dict[str, Any]:
    """The preprocessing a model folder's ``preprocessor_config.json`` describes (defaults where it is
    silent or missing)."""
    cfg = default_preprocess_cfg(model_type, image_size)
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        return cfg
    saved = json.loads(path.read_text())
    if "image_mean" in saved:
        cfg["mean"] = tuple(float(v) for v in saved["image_mean"])
    if "image_std" in saved:
        cfg["std"] = tuple(float(v) for v in saved["image_std"])
    cfg["interpolation"] = _RESAMPLE.get(saved.get("resample"), cfg["interpolation"])
    size, crop = saved.get("size"), saved.get("crop_size")
    if isinstance(size, dict) and "shortest_edge" in size:
        cfg["resize_mode"] = "shortest"
        cfg["size"] = _square(crop if saved.get("do_center_crop", True) and crop else size["shortest_edge"])
    elif size is not None:
        cfg["resize_mode"] = "squash"
        cfg["size"] = _square(size)
    return cfg


def _square(size: Any) -> int:
    if isinstance(size, dict):
        height, width = size.get("height"), size.get("width")
        if height != width:
            raise fail("preprocessor_config.json size", "a square size", f"{height} x {width}")
        return int(height)
    return int(size)


# ---- loading ---------------------------------------------------------------------------------------
def import_transformers() -> Any:
    """``transformers``, or an ImportError saying which extra to install."""
    try:
        import transformers
    except ImportError as e:
        raise ImportError(f"Hugging Face models need the 'transformers' package: {INSTALL_HINT}") from e
    return transformers


def model_folder(source: str, cache_dir: str | os.PathLike | None) -> Path:
    """The local folder of ``source``: a folder as given, or a Hub repository's files in the Hugging Face
    cache, fetched when they are not there (one probe of the Hub, no retries; offline or unreachable, a
    ``WeightsNotFoundError`` says what to fetch and copy)."""
    folder = Path(source).expanduser()
    if folder.is_dir() or source.startswith((".", "/", "~")):
        if not (folder / "config.json").is_file():
            state = "no such folder" if not folder.is_dir() else "config.json is missing"
            raise FileNotFoundError(
                f"name: expected a Hugging Face model folder (save_pretrained output, with config.json), "
                f"got {folder} ({state})"
            )
        return folder
    import huggingface_hub
    import huggingface_hub.constants as hf_constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    from fastcal.models.clip import _first_line, _offline

    cache = None if cache_dir is None else str(cache_dir)
    for weights in (_SAFETENSORS, _PYTORCH_WEIGHTS):
        try:
            found = Path(
                huggingface_hub.snapshot_download(
                    source, cache_dir=cache, local_files_only=True, allow_patterns=_CONFIG_FILES + weights
                )
            )
        except LocalEntryNotFoundError:
            continue
        if (found / "config.json").is_file() and any(any(found.glob(pattern)) for pattern in weights):
            return found
    if _offline():
        raise _not_cached(source, cache, "offline mode is on (HF_HUB_OFFLINE)")
    try:
        url = huggingface_hub.hf_hub_url(source, "config.json")
        huggingface_hub.get_hf_file_metadata(
            url, timeout=hf_constants.HF_HUB_ETAG_TIMEOUT, retry_on_errors=False
        )
        return Path(
            huggingface_hub.snapshot_download(
                source, cache_dir=cache, allow_patterns=_CONFIG_FILES + _SAFETENSORS + _PYTORCH_WEIGHTS
            )
        )
    except Exception as e:
        raise _not_cached(
            source, cache, f"could not be fetched ({type(e).__name__}: {_first_line(e)})"
        ) from e


def _not_cached(source: str, cache: str | None, reason: str) -> Exception:
    import huggingface_hub.constants as hf_constants

    from fastcal.models.clip import WeightsNotFoundError

    return WeightsNotFoundError(
        f"hf:{source} is not in the Hugging Face cache ({cache or hf_constants.HF_HUB_CACHE}) and {reason}; "
        f"fetch it on a machine with network access (huggingface-cli download {source}), then copy that "
        "cache here (cache_dir or HF_HUB_CACHE) or pass the model's folder as hf:/path/to/folder"
    )


def load_hf_clip(
    source: str,
    *,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    cache_dir: str | os.PathLike | None = None,
) -> Any:
    """``LoadedClip`` of a ``transformers`` CLIP or SigLIP: a Hub repository id (``"openai/clip-vit-base-
    patch32"``) or a local folder written by ``save_pretrained`` (config, weights, tokenizer and
    optionally ``preprocessor_config.json``)."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    from fastcal.models.clip import PRECISIONS, LoadedClip

    check_choice("precision", precision, PRECISIONS)
    transformers = import_transformers()
    folder = model_folder(source, cache_dir)
    config = transformers.AutoConfig.from_pretrained(folder)
    if config.model_type not in MODEL_TYPES:
        raise fail(
            "name", "a Hugging Face CLIP or SigLIP model (model_type clip or siglip)", config.model_type
        )
    model_class = transformers.CLIPModel if config.model_type == "clip" else transformers.SiglipModel
    model = model_class.from_pretrained(folder, attn_implementation="sdpa")
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    model = model.to(device=device, dtype=dtype).eval()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    except (ImportError, ValueError, OSError) as e:
        raise ValueError(f"name: the tokenizer of hf:{source} could not be loaded ({e})") from e
    image_size = int(config.vision_config.image_size)
    cfg = preprocess_cfg_from_folder(folder, config.model_type, image_size)
    clip = HFCLIP(model, cfg)
    preprocess = PreprocessCfg(**cfg)
    return LoadedClip(
        clip,
        HFTokenizer(tokenizer, clip.text.context_length),
        image_transform_v2(preprocess, is_train=True),
        image_transform_v2(preprocess, is_train=False),
    )
