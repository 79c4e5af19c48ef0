"""Ahead-of-time builds of fastcal's Triton kernels for GPU targets, on any machine (no GPU needed).

Every specialization the launches of ``fastcal.ops.triton_launches`` can choose on a GPU is compiled
with ``triton.compile`` for a target (sm_80, sm_90; sm_100 with the ``ptxas-blackwell`` that ships in
the triton wheel), and the PTX is assembled again with the wheel's ``ptxas -v`` and Triton's own flags
to read registers per thread, spill stores and loads, and the stack frame. A specialization is what
Triton's JIT would compile for a launch: the kernel, the element type of every pointer, which integer
arguments are multiples of 16 (Triton vectorizes on it: a class count or width that is not gives other
code), the constexprs and ``num_warps``. The specializations are found by calling the launch functions
on meta tensors over a covering set of problems (every input and compute dtype, every flag, each block
rule's range, widths that are multiples of 16 and widths that are not), then keeping the distinct ones.

Occupancy follows CUDA's rule (``cuda_occupancy.h``): registers are allocated per warp in units of 256
from four 16,384-register quarters of the SM, so ``warps by registers = 4 * floor(16384 /
(ceil(32 R / 256) * 256))`` for ``R`` registers per thread; resident warps per SM are
``W * min(floor(that / W), floor(64 / W), 32, shared-memory limit)`` for ``W`` warps per program.

Run as ``python -m fastcal.ops.triton_build [--arch 80,90,100] [--representative] [--json PATH]``
(without TRITON_INTERPRET: the interpreter replaces the kernels' compiler). It prints one line per
build and exits 1 when a build fails or spills.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import torch

ARCHS = (80, 90, 100)
# Resident-warp limits per SM: sm_80 (A100) 164 KB of shared memory, sm_90 (H100/H200) and sm_100 228 KB.
_MAX_WARPS_PER_SM = 64
_MAX_PROGRAMS_PER_SM = 32
_SHARED_PER_SM = {80: 164 * 1024, 90: 228 * 1024, 100: 228 * 1024}
_RESERVED_SHARED_PER_PROGRAM = 1024
_PTXAS_REGISTERS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")

_FLOATS = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# (input dtype, compute dtype) pairs the launchers can meet: the compute dtype is float64 when any
# input is float64 (so a half-precision input may meet float64 buffers), float32 otherwise.
DTYPE_PAIRS = [(d, c) for d in _FLOATS.values() for c in (torch.float32, torch.float64)] + [
    (torch.float64, torch.float64)
]


@dataclass(frozen=True)
class Specialization:
    """One program Triton would compile: ``label`` says which problem produced it."""

    kernel: str
    label: str
    signature: dict[str, str]
    constexprs: dict[str, Any]
    aligned: tuple[str, ...]
    num_warps: int

    def key(self) -> str:
        return json.dumps([self.kernel, self.signature, self.constexprs, self.aligned, self.num_warps])


@dataclass(frozen=True)
class BuildResult:
    kernel: str
    label: str
    arch: int
    num_warps: int
    constexprs: dict[str, Any]
    registers: int
    spill_stores: int
    spill_loads: int
    stack_bytes: int
    shared_bytes: int
    warps_per_sm: int
    compile_seconds: float


def _meta(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def specialize(launch: Any, label: str) -> Specialization:
    """What Triton's JIT compiles for ``launch`` (a ``KernelLaunch``), by its own argument specializer.

    Every kernel parameter must be given by the launch, and every argument must be a parameter.
    """
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    names = list(launch.kernel.arg_names)
    given = set(launch.args) | set(launch.constexprs)
    if given != set(names):
        missing, unknown = sorted(set(names) - given), sorted(given - set(names))
        raise ValueError(f"{launch.kernel.fn.__name__}: launch misses {missing} and names unknown {unknown}")
    signature, constexprs, aligned = {}, dict(launch.constexprs), []
    for name in names:
        if name in launch.constexprs:
            signature[name] = "constexpr"
            continue
        kind, attribute = native_specialize_impl(BaseBackend, launch.args[name], False, True, True)
        signature[name] = kind
        if kind == "constexpr":  # an integer equal to 1 becomes a compile-time constant
            constexprs[name] = launch.args[name]
        elif isinstance(attribute, str) and "D" in attribute:
            aligned.append(name)
    return Specialization(
        launch.kernel.fn.__name__, label, signature, constexprs, tuple(aligned), launch.num_warps
    )


def _problems() -> Iterator[tuple[str, Any]]:
    """``(label, launch)`` over the covering set of problems (module docstring), on meta tensors."""
    from fastcal.ops import triton_launches as L

    rows = 1000
    for dtype, compute in DTYPE_PAIRS:
        for dim in (512, 500):
            tag = f"{str(dtype)[6:]}->{str(compute)[6:]} D={dim}"
            x, out, rnorm = _meta(rows, dim, dtype=dtype), _meta(rows, dim, dtype=compute), _meta(rows)
            yield f"normalize {tag}", L.normalize_rows_launch(x, out, rnorm.to(compute))
            buffers = [_meta(rows, dim, dtype=compute), _meta(rows, dim, dtype=compute)]
            yield (
                f"normalize_backward {tag}",
                L.normalize_rows_backward_launch(
                    *buffers, _meta(rows, dtype=compute), _meta(1, dtype=compute), x, 0.5
                ),
            )
    batch = 256
    for compute in (torch.float32, torch.float64):
        name = str(compute)[6:]
        for n_classes in (1000, 1024, 5000, 4096):
            cos = _meta(batch, n_classes, dtype=compute)
            labels = _meta(batch, dtype=torch.int64)
            stats = [_meta(batch, dtype=compute) for _ in range(3)]
            for compute_grad in (True, False):
                for eps in (0.0, 0.1):
                    yield (
                        f"ce_margin_rows {name} C={n_classes} grad={compute_grad} eps={eps}",
                        L.ce_margin_rows_launch(
                            cos,
                            labels,
                            _meta(1, dtype=compute),
                            *stats,
                            _meta(batch, dtype=torch.int64),
                            _meta(batch, dtype=compute),
                            eps,
                            compute_grad,
                        ),
                    )
        for n_classes in (1000, 1024):
            rows_in = {k: _meta(batch, dtype=compute) for k in ("ce", "g_target", "g_runner", "h")}
            rows_in.update(runner=_meta(batch, dtype=torch.int64), labels=_meta(batch, dtype=torch.int64))
            outputs = {k: _meta(batch, dtype=compute) for k in ("per_row", "margins")}
            outputs.update({k: _meta(dtype=compute) for k in ("loss", "ce_mean", "margin_reg")})
            for reduction in (0, 1, 2):
                for compute_grad in (True, False):
                    for has_moment in (True, False):
                        yield (
                            f"margin_finalize {name} C={n_classes} reduction={reduction} "
                            f"grad={compute_grad} moment={has_moment}",
                            L.margin_finalize_launch(
                                rows_in,
                                _meta(1, dtype=compute),
                                _meta(dtype=compute),
                                _meta(batch, n_classes, dtype=compute),
                                outputs,
                                alpha=0.1,
                                beta=0.01,
                                moment_weight=5.0,
                                reduction=reduction,
                                compute_grad=compute_grad,
                                has_moment=has_moment,
                            ),
                        )
        for dim in (512, 500):
            t, t0 = _meta(rows, dim, dtype=compute), _meta(rows, dim, dtype=compute)
            outputs = {k: _meta(rows, dim, dtype=compute) for k in ("sum", "diff", "a", "b")}
            outputs["delta"] = _meta(dim, dtype=compute)
            for write_a in (True, False):
                for write_b in (True, False):
                    yield (
                        f"center_pair {name} D={dim} write_a={write_a} write_b={write_b}",
                        L.center_pair_launch(t, t0, outputs, write_a=write_a, write_b=write_b),
                    )


def specializations() -> list[Specialization]:
    """The distinct specializations of every launch (module docstring), in a fixed order."""
    found: dict[str, Specialization] = {}
    for label, launch in _problems():
        spec = specialize(launch, label)
        found.setdefault(spec.key(), spec)
    return list(found.values())


# One build per kernel for quick checks: the float32 variant with the most work per program.
REPRESENTATIVE = (
    "normalize float16->float32 D=500",
    "normalize_backward bfloat16->float32 D=500",
    "ce_margin_rows float32 C=5000 grad=True eps=0.1",
    "margin_finalize float32 C=1000 reduction=0 grad=True moment=True",
    "center_pair float32 D=500 write_a=True write_b=True",
)


def kernel_names() -> list[str]:
    """The Triton kernels of ``fastcal_kernels.calibrated_loss`` (every ``@triton.jit`` function)."""
    from fastcal_kernels import calibrated_loss

    return sorted(
        name
        for name, value in vars(calibrated_loss).items()
        if name.endswith("_kernel") and hasattr(value, "fn")
    )


def warps_per_sm(registers: int, num_warps: int, shared_bytes: int, arch: int) -> int:
    """Resident warps per SM of a kernel (module docstring)."""
    registers_per_warp = math.ceil(registers * 32 / 256) * 256
    warps_by_registers = 4 * (16384 // registers_per_warp)
    programs = min(warps_by_registers // num_warps, _MAX_WARPS_PER_SM // num_warps, _MAX_PROGRAMS_PER_SM)
    if shared_bytes:
        programs = min(programs, _SHARED_PER_SM[arch] // (shared_bytes + _RESERVED_SHARED_PER_PROGRAM))
    return programs * num_warps


def ptxas_usage(ptx: str, arch: int) -> dict[str, int]:
    """Registers, spills and stack frame of ``ptx`` from the triton wheel's ``ptxas -v`` (Triton's flags)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as folder:
        source = os.path.join(folder, "kernel.ptx")
        with open(source, "w") as f:
            f.write(ptx)
        command = [
            get_ptxas(arch).path,
            "-lineinfo",
            "-v",
            "--regAllocOptLevel=2",
            f"--gpu-name={sm_arch_from_capability(arch)}",
            source,
            "-o",
            source + ".o",
        ]
        log = subprocess.run(command, capture_output=True, text=True, check=True).stderr
    registers, spills = _PTXAS_REGISTERS.search(log), _PTXAS_SPILLS.search(log)
    if registers is None or spills is None:
        raise RuntimeError(f"ptxas -v for sm_{arch}: expected register and spill lines, got:\n{log}")
    return {
        "registers": int(registers.group(1)),
        "stack_bytes": int(spills.group(1)),
        "spill_stores": int(spills.group(2)),
        "spill_loads": int(spills.group(3)),
    }


def build(spec: Specialization, arch: int) -> BuildResult:
    """Compile ``spec`` for sm_``arch`` and read its resource usage."""
    import triton
    from fastcal_kernels import calibrated_loss
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = getattr(calibrated_loss, spec.kernel)
    names = list(kernel.arg_names)
    attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in spec.aligned}
    source = ASTSource(fn=kernel, signature=spec.signature, constexprs=spec.constexprs, attrs=attrs)
    start = time.perf_counter()
    compiled = triton.compile(
        source, target=GPUTarget("cuda", arch, 32), options={"num_warps": spec.num_warps}
    )
    seconds = time.perf_counter() - start
    usage = ptxas_usage(compiled.asm["ptx"], arch)
    shared = int(compiled.metadata.shared)
    return BuildResult(
        kernel=spec.kernel,
        label=spec.label,
        arch=arch,
        num_warps=spec.num_warps,
        constexprs=spec.constexprs,
        shared_bytes=shared,
        warps_per_sm=warps_per_sm(usage["registers"], spec.num_warps, shared, arch),
        compile_seconds=round(seconds, 3),
        **usage,
    )


def _build_one(item: tuple[Specialization, int]) -> BuildResult | str:
    spec, arch = item
    try:
        return build(spec, arch)
    except Exception as error:  # reported per build: one failure must not hide the others
        return f"{spec.label} sm_{arch}: {type(error).__name__}: {error}"


def build_all(
    specs: Sequence[Specialization], archs: Sequence[int], *, jobs: int = 1, report: Callable | None = None
) -> tuple[list[BuildResult], list[str]]:
    """Build every ``spec`` for every arch; ``(results, failures)``."""
    items = [(spec, arch) for spec in specs for arch in archs]
    results, failures = [], []
    if jobs > 1:
        import multiprocessing

        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            outcomes = pool.map(_build_one, items)
            for outcome in outcomes:
                (failures if isinstance(outcome, str) else results).append(outcome)
                if report is not None:
                    report(outcome)
    else:
        for item in items:
            outcome = _build_one(item)
            (failures if isinstance(outcome, str) else results).append(outcome)
            if report is not None:
                report(outcome)
    return results, failures


def _line(outcome: BuildResult | str) -> str:
    if isinstance(outcome, str):
        return f"FAILED {outcome}"
    r = outcome
    spill = f"spill {r.spill_stores}/{r.spill_loads} B" if r.spill_stores or r.spill_loads else "no spill"
    return (
        f"sm_{r.arch} {r.label}: {r.registers} registers, {spill}, {r.shared_bytes} B shared, "
        f"{r.num_warps} warps, {r.warps_per_sm} warps/SM ({r.compile_seconds:.1f} s)"
    )


def _group(result: BuildResult) -> tuple[str, ...]:
    """A row of the summary: kernel, compute dtype, block, and whether the widths are multiples of 16."""
    words = result.label.split()
    compute = words[1].split("->")[-1]
    width = next(w for w in words if w.startswith(("C=", "D=")))
    aligned = "multiple of 16" if int(width[2:]) % 16 == 0 else "not a multiple of 16"
    block = result.constexprs.get("BLOCK")
    tile = (
        f"BLOCK {block}"
        if block is not None
        else "x".join(str(result.constexprs[k]) for k in ("BLOCK_ROWS", "BLOCK_COLS"))
    )
    return result.kernel, compute, tile, f"{width[0]} {aligned}"


def summary_table(results: Sequence[BuildResult], archs: Sequence[int]) -> str:
    """Markdown: per kernel, compute dtype, tile and width class, each arch's registers (range over the
    input dtypes and flags), spilled bytes, shared memory and the fewest resident warps per SM."""
    rows: dict[tuple[str, ...], dict[int, list[BuildResult]]] = {}
    for r in results:
        rows.setdefault(_group(r), {}).setdefault(r.arch, []).append(r)
    head = "| kernel | compute | tile | width | warps | " + " | ".join(
        f"sm_{a}: registers / spill B / shared B / warps per SM" for a in archs
    )
    lines = [head + " |", "|" + "---|" * (5 + len(archs))]
    for (kernel, compute, tile, width), by_arch in rows.items():
        cells = []
        for arch in archs:
            group = by_arch.get(arch, [])
            if not group:
                cells.append("-")
                continue
            low, high = min(r.registers for r in group), max(r.registers for r in group)
            spill = max(r.spill_stores for r in group)
            shared = max(r.shared_bytes for r in group)
            occupancy = min(r.warps_per_sm for r in group)
            registers = f"{low}-{high}" if low != high else str(low)
            cells.append(f"{registers} / {spill} / {shared} / {occupancy}")
        warps = sorted({r.num_warps for group in by_arch.values() for r in group})
        lines.append(
            f"| {kernel} | {compute} | {tile} | {width} | {','.join(map(str, warps))} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fastcal.ops.triton_build", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--arch", default=",".join(map(str, ARCHS)), help="comma-separated: 80,90,100")
    parser.add_argument("--representative", action="store_true", help="one build per kernel")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--jobs", type=int, default=1, help="parallel builds")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("triton_build: unset TRITON_INTERPRET (the interpreter replaces the compiler)", file=sys.stderr)
        return 2
    archs = [int(a) for a in args.arch.split(",")]
    specs = specializations()
    if args.representative:
        specs = [s for s in specs if s.label in REPRESENTATIVE]
    missing = sorted(set(kernel_names()) - {s.kernel for s in specs})
    results, failures = build_all(specs, archs, jobs=args.jobs, report=lambda o: print(_line(o), flush=True))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "kernels": kernel_names(),
                    "missing": missing,
                    "specializations": len(specs),
                    "results": [asdict(r) for r in results],
                    "failures": failures,
                },
                f,
                indent=1,
            )
    if not args.representative:
        print(summary_table(results, archs))
    spilled = [r for r in results if r.spill_stores or r.spill_loads]
    print(
        f"{len(results)} builds, {len(failures)} failed, {len(spilled)} spilling; kernels without a build: "
        f"{missing or 'none'}"
    )
    return 1 if failures or spilled or missing else 0


if __name__ == "__main__":
    sys.exit(main())
