"""fastcal.ops: autograd Functions, backend dispatch and the torch reference of fastcal's fused losses.

``calibrated_prompt_loss`` runs TCPT's calibrated loss on one of three backends behind one seam
(``torch``, ``triton``, ``native``; see ``fastcal.ops.calibrated``). Layer 2: imports only the kernels
(``fastcal_kernels``, ``fastcal_csrc``) below it, and those lazily.
"""

from fastcal.ops.calibrated import BACKENDS, REDUCTIONS, calibrated_prompt_loss, resolve_backend
from fastcal.ops.moments import covariance_gap_sq, use_gram_side
from fastcal.ops.native import load_native, native_available
from fastcal.ops.reference import calibrated_prompt_loss_reference, normalize_rows, text_moment_gap

__all__ = [
    "BACKENDS",
    "REDUCTIONS",
    "calibrated_prompt_loss",
    "calibrated_prompt_loss_reference",
    "covariance_gap_sq",
    "load_native",
    "native_available",
    "normalize_rows",
    "resolve_backend",
    "text_moment_gap",
    "use_gram_side",
]
