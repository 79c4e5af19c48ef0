"""Test-time prompt tuning at scale: TPT, C-TPT and FPP.

- ``fastcal.tpt.augment``: TPT's 64 views of a test image made in one batch on the device.
- ``fastcal.tpt.step``: the graph-capturable tuning step for one or several samples at once.
- ``fastcal.tpt.tpt`` / ``ctpt`` / ``fpp``: the methods.
- ``fastcal.tpt.specs``: the methods and initializations runs choose by name (``fastcal.registry``).

The resumable, sharded runner behind ``fastcal tpt`` is ``fastcal.runs.tpt``.
"""

from fastcal.tpt.augment import ViewAugmenter, sample_generator
from fastcal.tpt.ctpt import ctpt_config, default_lambda
from fastcal.tpt.fpp import FPPConfig, flatness_weight, fpp_losses, pretrain_context
from fastcal.tpt.step import TestTimeStep, TuningConfig
from fastcal.tpt.tpt import TPT, TuneResult

__all__ = [
    "TPT",
    "FPPConfig",
    "TestTimeStep",
    "TuneResult",
    "TuningConfig",
    "ViewAugmenter",
    "ctpt_config",
    "default_lambda",
    "flatness_weight",
    "fpp_losses",
    "pretrain_context",
    "sample_generator",
]
