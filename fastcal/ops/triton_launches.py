"""How each Triton kernel of the calibrated loss is launched: grid, arguments by name, block sizes, warps.

The one place that turns tensors into a launch of a ``fastcal_kernels.calibrated_loss`` kernel: the
launchers in ``fastcal.ops.fused_triton`` run what these functions return, and the ahead-of-time builds
(``fastcal.ops.triton_build``) compile what they return for meta tensors, so a kernel argument renamed
on one side fails both (a keyword the kernel does not take) rather than skipping a build.

Two tile policies, chosen by the tensors' device:

- GPU (CUDA tensors; meta tensors in the builds): few fixed tiles, so a new problem size seldom costs a
  new compilation, and warps chosen from ``ptxas`` register counts of every specialization on sm_80,
  sm_90 and sm_100 (bench/README.md has the table): about 8 float32 (4 float64) elements per thread
  per tile keeps every kernel at or below 128 registers without a spill, widths that are multiples of
  16 or not. Each function says what the former choice cost.
- Interpreter (CPU tensors under TRITON_INTERPRET=1): each program costs about a millisecond whatever
  its size, so tiles of up to 64k elements keep a test to tens of programs. ``num_warps`` is ignored
  there. ``interpreter_tiles`` decides; a test runs the GPU tiles in the interpreter by patching it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import triton
from fastcal_kernels.calibrated_loss import (
    ce_margin_rows_kernel,
    center_pair_kernel,
    margin_finalize_kernel,
    normalize_rows_backward_kernel,
    normalize_rows_kernel,
)

# Interpreter tiles (elements per program).
_INTERPRETER_TILE = 65536
_INTERPRETER_ROW_BLOCK = 16384
_INTERPRETER_FINALIZE_BLOCK = 1024
# GPU tiles and warps (module docstring; each function says what the register counts were).
NORMALIZE_TILE = (8, 256)
NORMALIZE_WARPS = 8
ROW_BLOCKS = (1024, 4096)
ROW_BYTES_PER_WARP = 1024
FINALIZE_BLOCK_BYTES = 4096
FINALIZE_ELEMENTS_PER_THREAD = 8
CENTER_TILE = (128, 16)
CENTER_WARPS = 4


@dataclass(frozen=True)
class KernelLaunch:
    """One launch: the kernel, its grid, its run-time arguments by name and its compile-time ones."""

    kernel: Any
    grid: tuple[int, ...]
    args: dict[str, Any]
    constexprs: dict[str, Any]
    num_warps: int

    def __call__(self) -> None:
        self.kernel[self.grid](**self.args, **self.constexprs, num_warps=self.num_warps)


def interpreter_tiles(device: torch.device) -> bool:
    """Whether launches on ``device`` take the interpreter's tiles (CPU tensors) or the GPU's."""
    return device.type == "cpu"


def _row_tile(n_rows: int, n_cols: int, device: torch.device) -> tuple[int, int]:
    if not interpreter_tiles(device):
        return NORMALIZE_TILE
    block_cols = min(triton.next_power_of_2(n_cols), _INTERPRETER_TILE)
    return min(triton.next_power_of_2(n_rows), max(1, _INTERPRETER_TILE // block_cols)), block_cols


def normalize_rows_launch(x: torch.Tensor, out: torch.Tensor, rnorm: torch.Tensor) -> KernelLaunch:
    """``out = x / ||x||``, ``rnorm = 1 / ||x||`` per row of ``x`` (N, D), unit stride along D.

    GPU: 8 x 256 tiles at 8 warps, looping over wider rows. The former tiles (up to 4096 elements, 4
    warps) took up to 155 registers here and 207 in the backward (float64; 8 warps per SM), and spilled
    in the backward with a 16-bit output on sm_80; a 16 x 256 tile at 8 warps still took 206 in the
    backward when D is not a multiple of 16.
    """
    n_rows, n_cols = x.shape
    block_rows, block_cols = _row_tile(n_rows, n_cols, x.device)
    return KernelLaunch(
        normalize_rows_kernel,
        (triton.cdiv(n_rows, block_rows),),
        {
            "x_ptr": x,
            "out_ptr": out,
            "rnorm_ptr": rnorm,
            "n_rows": n_rows,
            "n_cols": n_cols,
            "stride_x": x.stride(0),
            "stride_out": out.stride(0),
        },
        {"BLOCK_ROWS": block_rows, "BLOCK_COLS": block_cols},
        NORMALIZE_WARPS,
    )


def normalize_rows_backward_launch(
    grad: torch.Tensor,
    x_hat: torch.Tensor,
    rnorm: torch.Tensor,
    scale: torch.Tensor,
    out: torch.Tensor,
    scale_mult: float,
) -> KernelLaunch:
    """The gradient through row normalization (``normalize_rows_backward_kernel``); tiles as forward."""
    n_rows, n_cols = x_hat.shape
    block_rows, block_cols = _row_tile(n_rows, n_cols, x_hat.device)
    return KernelLaunch(
        normalize_rows_backward_kernel,
        (triton.cdiv(n_rows, block_rows),),
        {
            "grad_ptr": grad,
            "xhat_ptr": x_hat,
            "rnorm_ptr": rnorm,
            "scale_ptr": scale,
            "out_ptr": out,
            "scale_mult": scale_mult,
            "n_rows": n_rows,
            "n_cols": n_cols,
            "stride_grad": grad.stride(0),
            "stride_xhat": x_hat.stride(0),
            "stride_out": out.stride(0),
        },
        {"BLOCK_ROWS": block_rows, "BLOCK_COLS": block_cols},
        NORMALIZE_WARPS,
    )


def row_block(n_classes: int, device: torch.device) -> int:
    """Columns per step of the one-pass row kernel."""
    if interpreter_tiles(device):
        return min(triton.next_power_of_2(n_classes), _INTERPRETER_ROW_BLOCK)
    return ROW_BLOCKS[0] if n_classes <= ROW_BLOCKS[0] else ROW_BLOCKS[1]


def ce_margin_rows_launch(
    cos: torch.Tensor,
    labels: torch.Tensor,
    scale: torch.Tensor,
    ce: torch.Tensor,
    g_target: torch.Tensor,
    g_runner: torch.Tensor,
    runner: torch.Tensor,
    h: torch.Tensor,
    label_smoothing: float,
    compute_grad: bool,
) -> KernelLaunch:
    """One program per row of the cosines (B, C).

    GPU: 1024 columns per step for C <= 1024, else 4096 (the loop over columns handles any C), one warp
    per 1 KB of a step (256 float32 or 128 float64 columns). At 4 warps the 4096 block took 128
    registers in float32 (168 when C is not a multiple of 16, the issue's first look: 12 warps per SM)
    and 238-255 in float64 with spills on sm_90 and sm_100; one warp per 256 columns in float64 still
    spilled 8 bytes on every architecture.
    """
    n_rows, n_classes = cos.shape
    block = row_block(n_classes, cos.device)
    return KernelLaunch(
        ce_margin_rows_kernel,
        (n_rows,),
        {
            "cos_ptr": cos,
            "labels_ptr": labels,
            "scale_ptr": scale,
            "ce_ptr": ce,
            "g_target_ptr": g_target,
            "g_runner_ptr": g_runner,
            "runner_ptr": runner,
            "h_ptr": h,
            "n_cols": n_classes,
            "stride_cos": cos.stride(0),
            "label_smoothing": label_smoothing,
        },
        {"COMPUTE_GRAD": compute_grad, "HAS_SMOOTHING": label_smoothing > 0, "BLOCK": block},
        max(1, block * cos.element_size() // ROW_BYTES_PER_WARP),
    )


def margin_finalize_launch(
    rows: dict[str, torch.Tensor],
    scale: torch.Tensor,
    moment: torch.Tensor,
    grad: torch.Tensor,
    outputs: dict[str, torch.Tensor],
    *,
    alpha: float,
    beta: float,
    moment_weight: float,
    reduction: int,
    compute_grad: bool,
    has_moment: bool,
) -> KernelLaunch:
    """The one-program second stage. ``rows``: ``ce``, ``g_target``, ``g_runner``, ``runner``,
    ``labels``, ``h`` (B,); ``outputs``: ``per_row``, ``margins`` (B,), ``loss``, ``ce_mean``,
    ``margin_reg``.

    GPU: 1024 rows per step (512 in float64) at 8 elements per thread (4 warps; 2 in float64). One
    program, so registers limit nothing here, but ptxas (with Triton's ``--regAllocOptLevel=2``) spilled
    4-8 bytes at 8 or 16 warps (32-80 registers) and in float64 at 1024 rows and 4 warps on sm_100.
    """
    n_rows, n_classes = grad.shape
    if interpreter_tiles(grad.device):
        block = min(triton.next_power_of_2(n_rows), _INTERPRETER_FINALIZE_BLOCK)
    else:
        block = FINALIZE_BLOCK_BYTES // grad.element_size()
    return KernelLaunch(
        margin_finalize_kernel,
        (1,),
        {
            "ce_ptr": rows["ce"],
            "g_target_ptr": rows["g_target"],
            "g_runner_ptr": rows["g_runner"],
            "runner_ptr": rows["runner"],
            "labels_ptr": rows["labels"],
            "h_ptr": rows["h"],
            "scale_ptr": scale,
            "moment_ptr": moment,
            "grad_ptr": grad,
            "per_row_ptr": outputs["per_row"],
            "margins_ptr": outputs["margins"],
            "loss_ptr": outputs["loss"],
            "ce_mean_ptr": outputs["ce_mean"],
            "margin_reg_ptr": outputs["margin_reg"],
            "n_rows": n_rows,
            "n_cols": n_classes,
            "stride_grad": grad.stride(0),
            "alpha": alpha,
            "beta": beta,
            "moment_weight": moment_weight,
        },
        {
            "REDUCTION": reduction,
            "COMPUTE_GRAD": compute_grad,
            "HAS_MOMENT": has_moment,
            "BLOCK": block,
        },
        max(1, block // (32 * FINALIZE_ELEMENTS_PER_THREAD)),
    )


def center_pair_launch(
    t: torch.Tensor,
    t0: torch.Tensor,
    outputs: dict[str, torch.Tensor],
    *,
    write_a: bool,
    write_b: bool,
) -> KernelLaunch:
    """Column means and centered sum / difference of ``t``, ``t0`` (C, D), one program per block of
    columns. ``outputs``: ``sum``, ``diff``, ``a``, ``b`` (C, D; ``a``/``b`` written only when asked)
    and ``delta`` (D,).

    GPU: 128 x 16 tiles (64 x 16 in float64) at 4 warps, one program per 16 columns (32 at D = 512).
    The former 128 x 32 tile took 140 registers (195-228 when D is not a multiple of 16) and 246-255 in
    float64, spilling on every architecture; the float64 128 x 16 tile still took 156.
    """
    n_classes, dim = t.shape
    if interpreter_tiles(t.device):
        block_cols = min(triton.next_power_of_2(dim), 128)
        block_rows = min(triton.next_power_of_2(n_classes), max(1, _INTERPRETER_TILE // block_cols))
    else:
        block_rows, block_cols = CENTER_TILE
        block_rows //= t.element_size() // 4  # the same bytes per tile in float64
    return KernelLaunch(
        center_pair_kernel,
        (triton.cdiv(dim, block_cols),),
        {
            "t_ptr": t,
            "t0_ptr": t0,
            "sum_ptr": outputs["sum"],
            "diff_ptr": outputs["diff"],
            "a_ptr": outputs["a"],
            "b_ptr": outputs["b"],
            "delta_ptr": outputs["delta"],
            "n_rows": n_classes,
            "n_cols": dim,
            "stride": t.stride(0),
        },
        {"WRITE_A": write_a, "WRITE_B": write_b, "BLOCK_ROWS": block_rows, "BLOCK_COLS": block_cols},
        CENTER_WARPS,
    )
