"""Prompt templates: CoOp's hand-crafted prompts and CLIP's ImageNet ensemble from open_clip."""

import open_clip
import pytest

from fastcal.data.templates import HARD_PROMPTS, check_template, dataset_templates, imagenet_templates


def test_imagenet_templates_equal_open_clip_callables():
    templates = imagenet_templates()
    assert len(templates) == len(open_clip.OPENAI_IMAGENET_TEMPLATES) == 80
    for template, fn in zip(templates, open_clip.OPENAI_IMAGENET_TEMPLATES, strict=True):
        assert template.format("sea lion") == fn("sea lion")
        check_template("template", template)


def test_dataset_templates_put_the_hard_prompt_first():
    assert dataset_templates("oxford_pets") == ["a photo of a {}, a type of pet."]
    assert dataset_templates("eurosat") == ["a centered satellite photo of {}."]
    assert dataset_templates("dtd") == ["{} texture."]
    ensemble = dataset_templates("imagenet_v2")
    assert ensemble[0] == "a photo of a {}." and len(ensemble) == len(set(ensemble)) == 80
    for name, template in HARD_PROMPTS.items():
        assert dataset_templates(name)[0] == check_template(name, template)
    with pytest.raises(ValueError, match="oxford_pets"):
        dataset_templates("pets")


def test_check_template_refuses_bad_formats():
    for bad in ("a photo.", "{} and {}", "a {name}.", "{} {x}"):
        with pytest.raises(ValueError, match="exactly one"):
            check_template("template", bad)
