"""The ``native`` backend: fastcal's C++ CPU kernels (package ``fastcal_csrc``), built on first use.

The sources are compiled once with ``torch.utils.cpp_extension.load`` (g++, OpenMP, the vector ISA
torch reports for this CPU; large float32 products through oneDNN when torch was built with it) in
fastcal's cache (``<cache>/native/<module name>``, ``$FASTCAL_NATIVE_BUILD_DIR`` instead of
``<cache>/native``). The module name carries a digest of the sources, the flags and the torch and
Python versions, so a change rebuilds and concurrent processes share one build (cpp_extension locks
the directory); the sources are copied into that directory first, so two checkouts of the same sources
share the build instead of rebuilding each other's (ninja rebuilds when a source path changes).
Without a compiler, or when the build fails, the backend is unavailable: callers fall back to the
``torch`` backend with one warning per process.

What the C++ computes, and the derivation of its gradient, is written at the top of
``csrc/calibrated_loss.cpp``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
import threading
import warnings
from importlib import resources
from types import ModuleType
from typing import Any

import torch
from torch.autograd.function import once_differentiable

from fastcal._io import atomic_path, default_cache_dir

REDUCTION_CODES = {"none": 0, "mean": 1, "sum": 2}
_SOURCE_NAMES = ("calibrated_loss.cpp", "row_exp.h")


class _NativeState:
    """The loaded extension, or why it could not be loaded; built once per process."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.module: ModuleType | None = None
        self.error: str | None = None
        self.warned = False


_STATE = _NativeState()


def _isa_flags() -> list[str]:
    """Vector ISA flags for the CPU torch detected; CPU_CAPABILITY picks ATen's Vectorized implementation."""
    capability = torch.backends.cpu.get_cpu_capability()
    avx2 = ["-mavx2", "-mfma", "-mf16c", "-mbmi", "-mbmi2"]
    if capability.startswith("AVX512"):
        avx512 = ["-mavx512f", "-mavx512dq", "-mavx512bw", "-mavx512vl"]
        return [*avx2, *avx512, "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"]
    if capability.startswith("AVX2"):
        return [*avx2, "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    return ["-DCPU_CAPABILITY=DEFAULT"]


def _build() -> ModuleType:
    # cpp_extension logs "No CUDA runtime is found" at import on CPU-only machines: not our concern here.
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        logger.setLevel(level)

    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler found (looked for {compiler!r}; set $CXX)")
    source_dir = resources.files("fastcal_csrc")
    sources = [str(source_dir / name) for name in _SOURCE_NAMES]
    cflags = ["-O3", "-fopenmp", *_isa_flags()]
    # torch's mkldnn_matmul refuses to run on a CPU without AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT,
    # whatever the dtype: there the products stay on at::mm.
    onednn_usable = torch.backends.cpu.get_cpu_capability().startswith("AVX512")
    if torch.backends.mkldnn.is_available() and onednn_usable:
        cflags.append("-DFASTCAL_WITH_ONEDNN")
    digest = hashlib.sha256()
    for path in sources:
        with open(path, "rb") as handle:
            digest.update(handle.read())
    digest.update(" ".join([*cflags, torch.__version__, sys.version]).encode())
    name = f"fastcal_native_{digest.hexdigest()[:12]}"
    root = os.environ.get("FASTCAL_NATIVE_BUILD_DIR") or str(default_cache_dir() / "native")
    build_dir = os.path.join(root, name)
    copied = os.path.join(build_dir, "src")
    os.makedirs(copied, exist_ok=True)
    for path in sources:
        target = os.path.join(copied, os.path.basename(path))
        if not os.path.isfile(target):  # the name is the content's digest: an existing copy is this one
            with atomic_path(target) as tmp:
                shutil.copyfile(path, tmp)
    return cpp_extension.load(
        name=name,
        sources=[os.path.join(copied, os.path.basename(sources[0]))],
        extra_cflags=cflags,
        extra_ldflags=["-fopenmp"],
        build_directory=build_dir,
        verbose=False,
    )


def _summarize(error: Exception) -> str:
    """The first compiler error line of a failed build, or the exception's last line."""
    lines = str(error).strip().splitlines() or [type(error).__name__]
    first_error = next((line.strip() for line in lines if "error:" in line), lines[-1].strip())
    return f"{type(error).__name__}: {first_error}"


def load_native() -> ModuleType:
    """The compiled extension; builds it on first call. Raises RuntimeError saying why it is missing."""
    with _STATE.lock:
        if _STATE.module is None and _STATE.error is None:
            try:
                _STATE.module = _build()
            except Exception as error:  # a failed build of any kind leaves the torch backend
                _STATE.error = _summarize(error)
        if _STATE.module is None:
            raise RuntimeError(f"fastcal native backend unavailable ({_STATE.error})")
        return _STATE.module


def native_available(*, warn: bool = False) -> bool:
    """Whether the native backend can be used (builds it on first call); ``warn``: warn once if not."""
    try:
        load_native()
        return True
    except RuntimeError as error:
        if warn and not _STATE.warned:
            _STATE.warned = True
            warnings.warn(f"{error}; using the torch backend instead", RuntimeWarning, stacklevel=3)
        return False


class NativeCalibratedLoss(torch.autograd.Function):
    """Fused forward / backward of the calibrated prompt loss on CPU (float32 or float64 inputs).

    Returns ``(loss, ce, margin, moment)``; the last three are non-differentiable logging values.
    """

    @staticmethod
    def forward(
        ctx: Any,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        frozen_text_features: torch.Tensor | None,
        scale_tensor: torch.Tensor | None,
        labels: torch.Tensor,
        scale: float,
        alpha: float,
        beta: float,
        label_smoothing: float,
        moment_weight: float,
        reduction: str,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        ext = load_native()
        need_image, need_text, need_frozen, need_scale = ctx.needs_input_grad[:4]
        need_frozen = need_frozen and frozen_text_features is not None
        code = REDUCTION_CODES[reduction]
        outputs = ext.forward(
            image_features,
            text_features,
            frozen_text_features,
            labels,
            scale,
            alpha,
            beta,
            label_smoothing,
            moment_weight,
            code,
            need_image,
            need_text,
            need_frozen,
            need_scale,
        )
        loss, ce, margin, moment = outputs[:4]
        ctx.save_for_backward(*outputs[4:])  # in the order ext.backward takes them
        ctx.hyper = (scale, beta, moment_weight, code, need_image, need_text, need_frozen, need_scale)
        ctx.scale_meta = (scale_tensor.dtype, scale_tensor.shape) if scale_tensor is not None else None
        ctx.mark_non_differentiable(ce, margin, moment)
        return loss, ce, margin, moment

    @staticmethod
    @once_differentiable
    def backward(
        ctx: Any, grad_loss: torch.Tensor, *_unused: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        ext = load_native()
        scale, beta, moment_weight, code, need_image, need_text, need_frozen, need_scale = ctx.hyper
        saved = ctx.saved_tensors
        grad_image, grad_text, grad_frozen, grad_scale = ext.backward(
            grad_loss,
            *saved,
            scale,
            beta,
            moment_weight,
            code,
            need_image,
            need_text,
            need_frozen,
            need_scale,
        )
        if grad_scale is not None:
            scale_dtype, scale_shape = ctx.scale_meta
            grad_scale = grad_scale.to(scale_dtype).reshape(scale_shape)
        return grad_image, grad_text, grad_frozen, grad_scale, None, None, None, None, None, None, None
