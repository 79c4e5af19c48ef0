"""WiSE-FT: weight-space ensembles of the zero-shot and the fine-tuned model (Wortsman et al., CVPR 2022).

``theta(alpha) = (1 - alpha) * theta_zero_shot + alpha * theta_fine_tuned`` for every floating-point
tensor of the state dict (``torch.lerp``, exact at alpha = 0 and 1); integer tensors must agree. For
FLYP and CaRot the interpolated model's zero-shot head is computed from its (interpolated) text tower;
for FT the head is interpolated with the image tower, the zero-shot model's head being the zero-shot
classifier FT starts from (WiSE-FT's ``src/wise_ft.py``; MLAI-Yonsei/CaRot ``src/wise_ft.py``).

``parse_alphas("0:1:0.1")`` is the sweep of the ``fastcal wise`` command: start, stop (inclusive) and
step, or a comma-separated list.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from fastcal._checks import check_number, fail


def parse_alphas(spec: str) -> list[float]:
    """``"a:b:s"`` -> ``[a, a + s, ..., b]`` (b included when on the grid); ``"x,y,z"`` -> that list.

    Values are rounded to 10 decimals (so 0:1:0.1 gives 0.3, not 0.30000000000000004) and must lie in
    [0, 1].
    """
    if not isinstance(spec, str) or not spec.strip():
        raise fail("alpha", "'start:stop:step' or a comma-separated list of numbers in [0, 1]", repr(spec))
    try:
        if ":" in spec:
            parts = [float(p) for p in spec.split(":")]
            if len(parts) != 3:
                raise ValueError
            start, stop, step = parts
            if not step > 0 or stop < start:
                raise fail("alpha", "start <= stop and a positive step in 'start:stop:step'", repr(spec))
            count = math.floor((stop - start) / step + 1e-9) + 1
            values = [round(start + i * step, 10) for i in range(count)]
        else:
            values = [float(p) for p in spec.split(",")]
    except ValueError as err:
        if str(err).startswith("alpha:"):
            raise
        raise fail("alpha", "'start:stop:step' or a comma-separated list of numbers", repr(spec)) from None
    for value in values:
        check_number("alpha", value, minimum=0.0, maximum=1.0)
    return values


def interpolate_state_dicts(
    zero_shot: Mapping[str, torch.Tensor], fine_tuned: Mapping[str, torch.Tensor], alpha: float
) -> dict[str, torch.Tensor]:
    """``(1 - alpha) * zero_shot + alpha * fine_tuned`` per floating tensor; equal others kept."""
    alpha = check_number("alpha", alpha, minimum=0.0, maximum=1.0)
    if set(zero_shot) != set(fine_tuned):
        only = sorted(set(zero_shot) ^ set(fine_tuned))[:5]
        raise fail("fine_tuned", "the same state-dict keys as zero_shot", f"differing keys {only}")
    merged: dict[str, torch.Tensor] = {}
    for name, zs in zero_shot.items():
        ft = fine_tuned[name]
        if zs.shape != ft.shape:
            raise fail(f"fine_tuned[{name!r}]", f"shape {tuple(zs.shape)}", tuple(ft.shape))
        if zs.is_floating_point():
            merged[name] = torch.lerp(zs.to(ft.device, ft.dtype), ft, alpha)
        elif torch.equal(zs.to(ft.device), ft):
            merged[name] = ft.clone()
        else:
            raise fail(
                f"fine_tuned[{name!r}]",
                "the zero-shot value (integer tensors are not averaged)",
                "a different value",
            )
    return merged
