"""Load a CLIP: any open_clip architecture, random init, a pretrained tag or a local checkpoint; or a
Hugging Face ``transformers`` CLIP / SigLIP (``"hf:<model id or folder>"``, ``fastcal.models.hf``).

``load_clip`` wraps ``open_clip.create_model`` (open_clip 3.x, github.com/mlfoundations/open_clip,
``factory.py``) and adds what an offline machine needs:

- Pretrained tags are resolved to a file in the local Hugging Face cache *before* anything else, so a
  cached model loads with no network call at all.
- A file that is neither cached nor reachable gives one ``WeightsNotFoundError`` naming the repository
  and file and how to pass a local path instead. With ``HF_HUB_OFFLINE=1`` nothing is attempted; online,
  the Hub is probed once without retries (huggingface_hub otherwise retries a failed lookup with a 60 s
  timeout and exponential back-off, minutes in all, when the endpoint is unreachable).
- A tag that OpenAI trained with QuickGELU (``quick_gelu`` in open_clip's tag table, e.g. ViT-B-32
  ``openai``) gets QuickGELU even under the plain architecture name; open_clip only warns, and the
  plain-GELU model then computes different features from the published ones.
"""

from __future__ import annotations

import difflib
import os
import posixpath
from pathlib import Path
from typing import Any, NamedTuple

import open_clip
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2
from torch import nn

from fastcal._checks import check_choice, fail

PRECISIONS = ("fp32", "fp16", "bf16")
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".npz", ".ckpt")
_TRUE_VALUES = {"1", "ON", "YES", "TRUE"}


class LoadedClip(NamedTuple):
    """What ``load_clip`` returns: the model (eval mode), its tokenizer and image transforms."""

    model: nn.Module
    tokenizer: Any
    train_transform: Any
    eval_transform: Any


class WeightsNotFoundError(FileNotFoundError):
    """Pretrained weights are neither on disk nor downloadable; the message says what to pass instead."""


def load_clip(
    name: str,
    pretrained: str | os.PathLike | None = None,
    *,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    cache_dir: str | os.PathLike | None = None,
) -> LoadedClip:
    """Build an open_clip model with its tokenizer and train / eval transforms.

    Args:
        name: an open_clip architecture (``open_clip.list_models()``, e.g. ``"ViT-B-32"``; a ``/`` is
            read as ``-``), ``"local-dir:DIR"`` (a folder with ``open_clip_config.json`` and optionally
            a checkpoint), ``"hf-hub:ORG/REPO"`` (an open_clip model on the Hub) or ``"hf:ID_OR_FOLDER"``
            (a ``transformers`` CLIP or SigLIP: a Hub id such as ``"openai/clip-vit-base-patch32"`` or a
            ``save_pretrained`` folder; needs ``pip install 'fastcal[hf]'``).
        pretrained: ``None`` for random initialization, an open_clip pretrained tag
            (``open_clip.list_pretrained_tags_by_model(name)``), or the path of a checkpoint file (a state
            dict or an open_clip training checkpoint with a ``"state_dict"`` entry; ``.pt``, ``.bin``,
            ``.safetensors``). Must be ``None`` with a ``local-dir:``, ``hf-hub:`` or ``hf:`` name.
        device: where the model is placed.
        precision: ``"fp32"``, ``"fp16"`` or ``"bf16"`` (open_clip's mixed precision: weights in the low
            precision, layer norms in float32).
        cache_dir: the Hugging Face cache to read and download into (default: huggingface_hub's,
            ``$HF_HUB_CACHE``).

    Raises:
        ValueError: unknown architecture or tag, or a checkpoint that does not fit the architecture.
        WeightsNotFoundError: the weights are not on disk and cannot be downloaded.
    """
    if not isinstance(name, str) or not name:
        raise fail("name", "an open_clip model name such as 'ViT-B-32'", repr(name))
    check_choice("precision", precision, PRECISIONS)
    if pretrained is not None and not isinstance(pretrained, (str, os.PathLike)):
        raise fail("pretrained", "None, a pretrained tag or a checkpoint path", repr(pretrained))
    cache_dir = None if cache_dir is None else str(cache_dir)

    if name.startswith("hf:"):
        if pretrained is not None:
            raise fail(
                "pretrained", f"None with {name!r} (the weights come from that model)", repr(pretrained)
            )
        from fastcal.models.hf import load_hf_clip

        return load_hf_clip(name[len("hf:") :], device=device, precision=precision, cache_dir=cache_dir)
    if name.startswith(("local-dir:", "hf-hub:")):
        if pretrained is not None:
            raise fail(
                "pretrained",
                f"None with {name!r} (the weights come from that source; to load a separate file, use the "
                "architecture name and pretrained=PATH)",
                repr(pretrained),
            )
        source = _local_dir_source(name, cache_dir)
        checkpoint, tag_cfg = None, {}
    else:
        source = name.replace("/", "-")
        if open_clip.get_model_config(source) is None:
            raise fail("name", _known_models_hint(source), repr(name))
        checkpoint, tag_cfg = _resolve_pretrained(source, pretrained, cache_dir)

    preprocess = {k: tag_cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in tag_cfg}
    config = open_clip.get_model_config(source) or {}
    force_quick_gelu = bool(tag_cfg.get("quick_gelu")) and not config.get("quick_gelu", False)
    try:
        model = open_clip.create_model(
            source,
            pretrained=checkpoint,
            precision=precision,
            device=device,
            force_quick_gelu=force_quick_gelu,
            force_preprocess_cfg=preprocess,
            pretrained_text=False,
            cache_dir=cache_dir,
        )
    except ImportError as e:
        raise ValueError(f"name: {name!r} needs the package {e.name!r}, which is not installed") from e
    except Exception as e:
        if checkpoint is None:
            raise
        raise ValueError(
            f"pretrained: expected an open_clip checkpoint of {name}, got {checkpoint}, which could not be "
            f"loaded into it ({type(e).__name__}: {_first_line(e)})"
        ) from e
    model.eval()

    preprocess_cfg = PreprocessCfg(**model.visual.preprocess_cfg)
    train_transform = image_transform_v2(preprocess_cfg, is_train=True)
    eval_transform = image_transform_v2(preprocess_cfg, is_train=False)
    try:
        tokenizer = open_clip.get_tokenizer(source, cache_dir=cache_dir)
    except ImportError as e:
        raise ValueError(f"name: the tokenizer of {name!r} needs {e.name!r}, which is not installed") from e
    except OSError as e:
        raise WeightsNotFoundError(
            f"the tokenizer files of {name!r} are not in the local cache and could not be downloaded "
            f"({_first_line(e)}); copy the Hugging Face cache from a machine with network access"
        ) from e
    return LoadedClip(model, tokenizer, train_transform, eval_transform)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _known_models_hint(model_name: str) -> str:
    close = difflib.get_close_matches(model_name, open_clip.list_models(), n=5, cutoff=0.6)
    hint = "an open_clip architecture (open_clip.list_models() lists them"
    if close:
        hint += "; close matches: " + ", ".join(close)
    return hint + "), 'local-dir:DIR' with an open_clip_config.json, 'hf-hub:ORG/REPO', or 'hf:ID_OR_FOLDER'"


def _resolve_pretrained(
    model_name: str, pretrained: str | os.PathLike | None, cache_dir: str | None
) -> tuple[str | None, dict[str, Any]]:
    """The checkpoint file to load (``None`` for random init) and the tag's table entry (or ``{}``)."""
    if pretrained is None:
        return None, {}
    as_path = Path(pretrained).expanduser()
    if as_path.is_file():
        return str(as_path), {}
    if as_path.is_dir():
        raise fail("pretrained", "a checkpoint file (for a folder, use name='local-dir:DIR')", str(as_path))
    if isinstance(pretrained, str):
        tag_cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
        if tag_cfg:
            return _tag_checkpoint(model_name, pretrained, tag_cfg, cache_dir), tag_cfg
    text = str(pretrained)
    if isinstance(pretrained, os.PathLike) or os.sep in text or text.endswith(_CHECKPOINT_SUFFIXES):
        raise WeightsNotFoundError(f"pretrained: checkpoint file {as_path.absolute()} does not exist")
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    known = f"one of {', '.join(tags)}" if tags else "none: open_clip has no pretrained tag for it"
    raise fail(
        "pretrained",
        f"a pretrained tag of {model_name} ({known}) or the path of a checkpoint file",
        repr(pretrained),
    )


def _tag_checkpoint(model_name: str, tag: str, tag_cfg: dict[str, Any], cache_dir: str | None) -> str:
    if tag_cfg.get("file"):
        return str(tag_cfg["file"])
    hub = tag_cfg.get("hf_hub", "")
    if not hub:
        raise WeightsNotFoundError(
            f"pretrained: open_clip lists {model_name} {tag!r} only as the URL {tag_cfg.get('url', '?')}; "
            f"download it yourself and pass load_clip({model_name!r}, pretrained='/path/to/file')"
        )
    # open_clip's convention: "org/repo/file" names a file, "org/repo/" the repository's default file.
    repo_id, filename = posixpath.split(hub)
    return hub_file(repo_id, _weight_file_candidates(filename), cache_dir, what=f"{model_name} {tag!r}")


def _weight_file_candidates(filename: str) -> list[str]:
    """The files open_clip would try for a Hub weight file, safetensors first (``pretrained.py``)."""
    if not filename:
        return [open_clip.constants.HF_SAFE_WEIGHTS_NAME, open_clip.constants.HF_WEIGHTS_NAME]
    if filename.endswith((".bin", ".pth")):
        return [filename[:-4] + ".safetensors", filename]
    return [filename]


def _offline() -> bool:
    import huggingface_hub.constants as hf_constants

    from_env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return from_env.upper() in _TRUE_VALUES or bool(hf_constants.HF_HUB_OFFLINE)


def hub_file(repo_id: str, filenames: list[str], cache_dir: str | None, *, what: str) -> str:
    """Path of the first of ``filenames`` found for ``repo_id``: local cache first, then one Hub probe.

    Raises ``WeightsNotFoundError`` when none is cached and either offline mode is on, the Hub cannot be
    reached (one attempt, no retries; the timeout is ``HF_HUB_ETAG_TIMEOUT``, 10 s by default) or it
    has none of the files.
    """
    import huggingface_hub
    import huggingface_hub.constants as hf_constants
    from huggingface_hub.errors import EntryNotFoundError

    for filename in filenames:
        cached = huggingface_hub.try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir)
        if isinstance(cached, str) and os.path.isfile(cached):
            return cached

    cache_location = cache_dir or hf_constants.HF_HUB_CACHE
    wanted = " or ".join(f"{repo_id}/{f}" for f in filenames)

    def missing(reason: str) -> WeightsNotFoundError:
        return WeightsNotFoundError(
            f"pretrained weights for {what} not found: {wanted} is not in the Hugging Face cache "
            f"({cache_location}) and {reason}. Fetch it on a machine with network access "
            f"(huggingface-cli download {repo_id} {filenames[0]}) and copy it here, then pass the file: "
            f"load_clip(..., pretrained='/path/to/{filenames[0]}'), or point cache_dir / HF_HUB_CACHE at "
            "a cache that holds it"
        )

    if _offline():
        raise missing("offline mode is on (HF_HUB_OFFLINE)")
    for filename in filenames:
        url = huggingface_hub.hf_hub_url(repo_id, filename)
        try:
            huggingface_hub.get_hf_file_metadata(
                url, timeout=hf_constants.HF_HUB_ETAG_TIMEOUT, retry_on_errors=False
            )
        except EntryNotFoundError:
            continue
        except Exception as e:
            raise missing(f"the Hub could not be reached ({type(e).__name__}: {_first_line(e)})") from e
        try:
            return huggingface_hub.hf_hub_download(repo_id, filename, cache_dir=cache_dir)
        except Exception as e:
            raise missing(f"the download failed ({type(e).__name__}: {_first_line(e)})") from e
    raise missing("the Hub has none of these files")


def _local_dir_source(name: str, cache_dir: str | None) -> str:
    """A ``local-dir:`` source for ``name``; an ``hf-hub:`` repository is first resolved into the cache."""
    if name.startswith("local-dir:"):
        folder = Path(name[len("local-dir:") :]).expanduser()
        if not (folder / "open_clip_config.json").is_file():
            raise FileNotFoundError(
                f"name: expected a folder with open_clip_config.json, got {folder} "
                f"({'no such folder' if not folder.is_dir() else 'the config file is missing'})"
            )
        return f"local-dir:{folder}"
    repo_id = name[len("hf-hub:") :]
    config = hub_file(repo_id, ["open_clip_config.json"], cache_dir, what=name)
    hub_file(repo_id, _weight_file_candidates(""), cache_dir, what=name)
    return f"local-dir:{Path(config).parent}"
