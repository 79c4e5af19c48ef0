"""Prompt templates per dataset: the hand-crafted prompt first, then the ensemble where one exists.

``HARD_PROMPTS`` holds the per-dataset templates of CoOp's zero-shot CLIP baseline (``CUSTOM_TEMPLATES``
in KaiyangZhou/CoOp ``trainers/zsclip.py``, reused by KgCoOp ``trainers/kgcoop.py`` as the frozen
text anchor), keyed by fastcal's dataset names. The ImageNet family also gets CLIP's 80-template
ensemble, taken from open_clip (``open_clip.OPENAI_IMAGENET_TEMPLATES``, stored there as callables and
turned here into ``str.format`` strings by calling each one with ``"{}"``).

A template is a ``str.format`` string with one ``{}`` for the class name.
"""

from __future__ import annotations

from functools import cache

from fastcal._checks import check_choice

HARD_PROMPTS: dict[str, str] = {
    "imagenet": "a photo of a {}.",
    "caltech101": "a photo of a {}.",
    "oxford_pets": "a photo of a {}, a type of pet.",
    "stanford_cars": "a photo of a {}.",
    "oxford_flowers": "a photo of a {}, a type of flower.",
    "food101": "a photo of {}, a type of food.",
    "fgvc_aircraft": "a photo of a {}, a type of aircraft.",
    "sun397": "a photo of a {}.",
    "dtd": "{} texture.",
    "eurosat": "a centered satellite photo of {}.",
    "ucf101": "a photo of a person doing {}.",
    "imagenet_a": "a photo of a {}.",
    "imagenet_r": "a photo of a {}.",
    "imagenet_v2": "a photo of a {}.",
    "imagenet_sketch": "a photo of a {}.",
    "imagefolder": "a photo of a {}.",
}

IMAGENET_FAMILY = ("imagenet", "imagenet_a", "imagenet_r", "imagenet_v2", "imagenet_sketch")


@cache
def _openai_imagenet_templates() -> tuple[str, ...]:
    from open_clip import OPENAI_IMAGENET_TEMPLATES

    return tuple(t("{}") if callable(t) else str(t) for t in OPENAI_IMAGENET_TEMPLATES)


def imagenet_templates() -> list[str]:
    """CLIP's 80 ImageNet prompt templates (open_clip's ``OPENAI_IMAGENET_TEMPLATES``), as strings."""
    return list(_openai_imagenet_templates())


def check_template(name: str, template: str) -> str:
    """Check that ``template`` formats one class name (exactly one ``{}`` field); return it."""
    if not isinstance(template, str) or template.count("{}") != 1 or template.replace("{}", "").count("{"):
        raise ValueError(f"{name}: expected a format string with exactly one '{{}}', got {template!r}")
    return template


def dataset_templates(name: str) -> list[str]:
    """``[hard prompt, *ensemble]`` for a dataset; the ensemble (ImageNet family only) without repeats."""
    hard = HARD_PROMPTS[check_choice("name", name, HARD_PROMPTS)]
    if name not in IMAGENET_FAMILY:
        return [hard]
    return [hard, *(t for t in _openai_imagenet_templates() if t != hard)]
