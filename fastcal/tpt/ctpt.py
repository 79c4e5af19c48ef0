"""C-TPT: calibrated test-time prompt tuning (Yoon et al., ICLR 2024;
github.com/hee-suk-yoon/C-TPT).

TPT's loss minus ``lambda`` times the average text feature dispersion of the tuned class features,
``ATFD = mean_c ||t_c - mean_c' t_c'||_2`` over L2-normalized ``t`` (``fastcal.losses.text_dispersion``),
computed on the same text features as the entropy: ``L = H(p_bar) - lambda * ATFD``. Prompts whose class
features spread further apart are better calibrated; the reference uses lambda = 50 on the fine-grained
datasets and 20 on the ImageNet variants, where it also turns AugMix on (``--I_augmix``).
"""

from __future__ import annotations

from dataclasses import replace

from fastcal._checks import check_number
from fastcal.tpt.step import TuningConfig

CTPT_LAMBDA_FINE_GRAINED = 50.0
CTPT_LAMBDA_IMAGENET = 20.0
IMAGENET_FAMILY = ("imagenet", "imagenet_a", "imagenet_r", "imagenet_v2", "imagenet_sketch")


def default_lambda(dataset: str | None) -> float:
    """The reference's lambda for ``dataset``: 20 for ImageNet and its variants, else 50."""
    return CTPT_LAMBDA_IMAGENET if dataset in IMAGENET_FAMILY else CTPT_LAMBDA_FINE_GRAINED


def ctpt_config(
    config: TuningConfig | None = None, *, dispersion_weight: float = CTPT_LAMBDA_FINE_GRAINED
) -> TuningConfig:
    """``config`` (default: TPT's) with C-TPT's dispersion term of weight ``dispersion_weight`` (> 0)."""
    check_number("dispersion_weight", dispersion_weight, minimum=0.0, strict_minimum=True)
    return replace(config or TuningConfig(), dispersion_weight=float(dispersion_weight))
