"""GPU acceptance check: everything fastcal claims about a CUDA GPU, in one command and one JSON.

    .venv/bin/python bench/gpu_check.py            # about 5-10 minutes on an H100 / H200
    .venv/bin/python bench/gpu_check.py --quick    # fewer rounds, no gpu-marked tests

On a machine without CUDA it prints one line and exits 2. Sections, in order:

1. the gpu-marked tests (``pytest -m gpu`` with TRITON_INTERPRET=0, so the kernels compile for the
   device);
2. the Triton backend against the float64 torch reference, loss and every gradient (image, text,
   frozen text, logit scale), at (B, C, D) = (32, 1000, 512), (256, 1000, 512), (1024, 21843, 768) in
   float32 and bfloat16 (the reference on the same rounded inputs): max |error| / max |reference| per
   quantity, against 2e-3 for float32 (GEMMs may run in TF32) and 2e-2 for bfloat16 (gradients rounded
   to bfloat16);
3. the TPT step replayed from its CUDA graph against the eager step, at 1 and 4 samples per step
   (random-init ViT-B-32, 200 classes, 64 views, C-TPT's dispersion term on);
4. the registers and spills the JIT reports for every kernel variant it compiled in section 2
   (``CompiledKernel.n_regs`` / ``n_spills``), to set beside the ahead-of-time table in
   bench/README.md;
5. timings, medians of interleaved rounds (each variant ends with ``torch.cuda.synchronize()``):
   the loss forward + backward at the three shapes in float32, Triton vs eager (the torch reference) vs
   ``torch.compile`` of the reference; the cross-entropy part alone (normalize, cosines, CE, gradients)
   with torch's ``cross_entropy``, fastcal's kernels (the loss with no margin and no moment term) and
   Liger-Kernel's fused cross entropy where ``liger_kernel`` imports; one TPT sample, graph vs eager, at
   ``--samples-per-step`` 1, 4 and 8.

Targets (reported, met or not; a failed check of sections 1-3 exits 1): the Triton loss >= 2x eager
and >= 1.3x ``torch.compile`` at (256, 1000, 512); the graph-captured TPT step >= 1.5x eager per sample
at 1 sample per step. Results go to bench/results/gpu_check.json.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import harness
import torch

SHAPES = ((32, 1000, 512), (256, 1000, 512), (1024, 21843, 768))
TARGET_SHAPE = (256, 1000, 512)
TOLERANCE = {torch.float32: 2e-3, torch.bfloat16: 2e-2}
LOSS_TARGETS = {"eager": 2.0, "compiled": 1.3}
GRAPH_TARGET = 1.5
SAMPLES_PER_STEP = (1, 4, 8)
N_VIEWS = 64
N_CLASSES = 200
HYPER = {"margin_alpha": 0.1, "margin_beta": 0.01, "moment_weight": 5.0, "label_smoothing": 0.1}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def loss_problem(shape, dtype, device, seed=0):
    """Fresh random features (image, tuned text, frozen text), labels and a log logit scale."""
    b, c, d = shape
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(b, d, generator=g).to(device, dtype)
    text = torch.randn(c, d, generator=g).to(device, dtype)
    frozen = (text.float() + 0.1 * torch.randn(c, d, generator=g).to(device)).to(dtype)
    labels = torch.randint(0, c, (b,), generator=g).to(device)
    log_scale = torch.tensor(4.6, device=device)
    return image, text, frozen, labels, log_scale


def loss_and_grads(backend, image, text, frozen, labels, log_scale, **hyper):
    """The loss (mean) and the gradients of image, text, frozen text and the log scale."""
    from fastcal.ops import calibrated_prompt_loss

    leaves = [x.detach().clone().requires_grad_() for x in (image, text, frozen, log_scale)]
    loss, _ = calibrated_prompt_loss(
        leaves[0], leaves[1], labels, leaves[3].exp(), leaves[2], backend=backend, **{**HYPER, **hyper}
    )
    return loss.detach(), torch.autograd.grad(loss, leaves)


def check_against_reference(shapes, dtypes, device) -> list[dict[str, Any]]:
    """Section 2: relative errors of the Triton backend against the float64 reference."""
    rows = []
    for shape in shapes:
        for dtype in dtypes:
            problem = loss_problem(shape, dtype, device)
            loss, grads = loss_and_grads("triton", *problem)
            wide = [x.double() if x.is_floating_point() else x for x in problem]
            ref_loss, ref_grads = loss_and_grads("torch", *wide)
            errors = {"loss": _relative_error(loss, ref_loss)}
            for name, got, want in zip(
                ("image", "text", "frozen", "log_scale"), grads, ref_grads, strict=True
            ):
                errors[name] = _relative_error(got, want)
            worst = max(errors.values())
            rows.append(
                {
                    "shape": list(shape),
                    "dtype": str(dtype)[6:],
                    "relative_errors": errors,
                    "tolerance": TOLERANCE[dtype],
                    "ok": worst <= TOLERANCE[dtype],
                }
            )
            verdict = "ok" if rows[-1]["ok"] else "FAILED"
            print(f"  {shape} {str(dtype)[6:]:>8}: max relative error {worst:.2e} ({verdict})")
    return rows


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-300))


def random_clip(device):
    """A random-init ViT-B-32 CLIP (no download), frozen, and its tokenizer."""
    import open_clip

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = open_clip.create_model("ViT-B-32", pretrained=None)
    return model.eval().requires_grad_(False).to(device), open_clip.get_tokenizer("ViT-B-32")


def tpt_steps(model, tokenizer, samples_per_step, use_graph, n_classes=N_CLASSES, n_views=N_VIEWS):
    from fastcal.tpt.ctpt import ctpt_config
    from fastcal.tpt.step import TuningConfig
    from fastcal.tpt.tpt import TPT

    classnames = [f"object number {i}" for i in range(n_classes)]
    config = ctpt_config(TuningConfig(n_views=n_views), dispersion_weight=50.0)
    return TPT(
        model, tokenizer, classnames, config=config, samples_per_step=samples_per_step, use_graph=use_graph
    )


def view_features(samples, n_views, dim, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(samples, 1, dim, generator=g)
    views = base + 0.8 * torch.randn(samples, n_views, dim, generator=g)
    return torch.nn.functional.normalize(views, dim=-1).to(device)


def check_graph_replay(model, tokenizer, device, samples=(1, 4), **sizes) -> list[dict[str, Any]]:
    """Section 3: the graph-replayed TPT step against the eager one, on the same view features."""
    rows = []
    for s in samples:
        graph = tpt_steps(model, tokenizer, s, None, **sizes)
        eager = tpt_steps(model, tokenizer, s, False, **sizes)
        features = view_features(2 * s + 1, graph.config.n_views, graph.step.image_features.shape[-1], device)
        worst = 0.0
        for start in range(0, features.shape[0], s):  # the last call holds one sample
            chunk = features[start : start + s]
            worst = max(worst, float((graph.step(chunk) - eager.step(chunk)).abs().max()))
        ok = worst <= 1e-3 and graph.graph_used == (device.type == "cuda")
        rows.append(
            {"samples_per_step": s, "graph_used": graph.graph_used, "max_abs_difference": worst, "ok": ok}
        )
        verdict = "ok" if ok else "FAILED"
        print(f"  S={s}: graph used {graph.graph_used}, max |graph - eager| {worst:.2e} ({verdict})")
    return rows


def jit_registers() -> list[dict[str, Any]]:
    """Section 4: registers and spills of every kernel variant the JIT compiled in this process."""
    from fastcal_kernels import calibrated_loss

    from fastcal.ops.triton_build import kernel_names

    rows = []
    for name in kernel_names():
        caches = getattr(getattr(calibrated_loss, name), "device_caches", {})
        for device, cache in caches.items():
            for key, compiled in (cache[0] if isinstance(cache, tuple) else cache).items():
                rows.append(
                    {
                        "kernel": name,
                        "device": str(device),
                        "variant": str(key)[:200],
                        "registers": getattr(compiled, "n_regs", None),
                        "spills": getattr(compiled, "n_spills", None),
                        "num_warps": getattr(compiled.metadata, "num_warps", None),
                    }
                )
    return rows


def time_variants(variants: dict[str, Callable[[], Any]], rounds: int, device) -> dict[str, float]:
    """Median seconds of each variant (interleaved rounds after a warm-up), GPU work included."""

    def synced(fn):
        def call():
            fn()
            _sync(device)

        return call

    runs = harness.interleaved({k: synced(v) for k, v in variants.items()}, rounds, warmup=3)
    return {name: run.median["wall"] for name, run in runs.items()}


def loss_timings(shapes, rounds, device) -> list[dict[str, Any]]:
    """Section 5a: the loss forward + backward, float32."""
    from fastcal.ops import calibrated_prompt_loss_reference

    def compiled_reference(image, text, labels, scale, frozen):
        return calibrated_prompt_loss_reference(image, text, labels, scale, frozen, **HYPER)[0]

    compiled = torch.compile(compiled_reference)
    rows = []
    for shape in shapes:
        image, text, frozen, labels, log_scale = loss_problem(shape, torch.float32, device)
        leaves = [x.clone().requires_grad_() for x in (image, text, log_scale)]

        def backend_step(backend, leaves=leaves, labels=labels, frozen=frozen):
            from fastcal.ops import calibrated_prompt_loss

            loss, _ = calibrated_prompt_loss(
                leaves[0], leaves[1], labels, leaves[2].exp(), frozen, backend=backend, **HYPER
            )
            return torch.autograd.grad(loss, leaves)

        def compiled_step(leaves=leaves, labels=labels, frozen=frozen):
            return torch.autograd.grad(
                compiled(leaves[0], leaves[1], labels, leaves[2].exp(), frozen), leaves
            )

        variants = {
            "triton": lambda: backend_step("triton"),
            "eager": lambda: backend_step("torch"),
            "compiled": compiled_step,
        }
        seconds = time_variants(variants, rounds, device)
        rows.append({"shape": list(shape), "seconds": seconds})
        print(
            f"  {shape}: triton {seconds['triton'] * 1e3:.3f} ms, eager {seconds['eager'] * 1e3:.3f} ms "
            f"({seconds['eager'] / seconds['triton']:.2f}x), compiled {seconds['compiled'] * 1e3:.3f} ms "
            f"({seconds['compiled'] / seconds['triton']:.2f}x)"
        )
    return rows


def cross_entropy_timings(shape, rounds, device) -> dict[str, Any]:
    """Section 5b: from features to the CE loss and its gradients; Liger-Kernel's CE where it imports."""
    import torch.nn.functional as F

    image, text, _, labels, log_scale = loss_problem(shape, torch.float32, device)
    scale = log_scale.exp()

    def through(ce):
        def call():
            leaves = [x.detach().clone().requires_grad_() for x in (image, text)]
            logits = scale * F.normalize(leaves[0], dim=-1) @ F.normalize(leaves[1], dim=-1).T
            return torch.autograd.grad(ce(logits, labels), leaves)

        return call

    variants = {"torch": through(F.cross_entropy)}
    liger = "not installed"
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss

        variants["liger"] = through(LigerCrossEntropyLoss())
        liger = "installed"
    except Exception as error:  # any import failure means no peer row, never a failed check
        liger = f"unavailable ({type(error).__name__})"
    plain = {"margin_alpha": 0.0, "margin_beta": 0.0, "moment_weight": 0.0, "label_smoothing": 0.0}

    def fastcal_ce():
        from fastcal.ops import calibrated_prompt_loss

        leaves = [x.detach().clone().requires_grad_() for x in (image, text)]
        loss, _ = calibrated_prompt_loss(leaves[0], leaves[1], labels, scale, None, backend="triton", **plain)
        return torch.autograd.grad(loss, leaves)

    variants["fastcal"] = fastcal_ce
    seconds = time_variants(variants, rounds, device)
    print("  " + ", ".join(f"{k} {v * 1e3:.3f} ms" for k, v in seconds.items()) + f" (liger: {liger})")
    return {"shape": list(shape), "seconds": seconds, "liger": liger}


def tpt_timings(model, tokenizer, rounds, device, samples=SAMPLES_PER_STEP, **sizes) -> list[dict[str, Any]]:
    """Section 5c: seconds per TPT sample, graph vs eager (the step only: views and image features
    are the same work either way)."""
    rows = []
    for s in samples:
        graph = tpt_steps(model, tokenizer, s, None, **sizes)
        eager = tpt_steps(model, tokenizer, s, False, **sizes)
        features = view_features(s, graph.config.n_views, graph.step.image_features.shape[-1], device)
        variants = {
            "graph": lambda graph=graph, features=features: graph.step(features),
            "eager": lambda eager=eager, features=features: eager.step(features),
        }
        seconds = time_variants(variants, rounds, device)
        per_sample = {k: v / s for k, v in seconds.items()}
        rows.append({"samples_per_step": s, "graph_used": graph.graph_used, "seconds_per_sample": per_sample})
        graph_ms, eager_ms = per_sample["graph"] * 1e3, per_sample["eager"] * 1e3
        ratio = eager_ms / graph_ms
        print(f"  S={s}: graph {graph_ms:.2f} ms/sample, eager {eager_ms:.2f} ms/sample ({ratio:.2f}x)")
    return rows


def run_gpu_tests() -> dict[str, Any]:
    """Section 1: ``pytest -m gpu`` in a subprocess with the kernels compiled for the device."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    command = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests"]
    done = subprocess.run(command, cwd=harness.ROOT, env=env, capture_output=True, text=True, timeout=600)
    tail = (done.stdout + done.stderr).strip().splitlines()[-15:]
    print("  " + (tail[-1] if tail else "no output"))
    return {"returncode": done.returncode, "ok": done.returncode == 0, "output_tail": tail}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5 rounds, no gpu-marked tests")
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "gpu_check: expected a CUDA device, found none (torch.cuda.is_available() is False)",
            file=sys.stderr,
        )
        return 2
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("gpu_check: unset TRITON_INTERPRET (the kernels must compile for the GPU)", file=sys.stderr)
        return 2
    env = harness.start(None)
    device = torch.device("cuda")
    env["gpu"] = torch.cuda.get_device_name(device)
    env["capability"] = list(torch.cuda.get_device_capability(device))
    rounds = 5 if args.quick else args.rounds
    results: dict[str, Any] = {"quick": args.quick, "rounds": rounds}

    print("1. gpu-marked tests")
    results["tests"] = {"skipped": "--quick"} if args.quick else run_gpu_tests()
    print("2. Triton vs the float64 reference")
    results["correctness"] = check_against_reference(SHAPES, (torch.float32, torch.bfloat16), device)
    print("3. TPT step: CUDA graph replay vs eager")
    model, tokenizer = random_clip(device)
    results["graph_replay"] = check_graph_replay(model, tokenizer, device)
    print("4. registers the JIT reports")
    results["jit_registers"] = jit_registers()
    print(f"  {len(results['jit_registers'])} compiled variants")
    print("5. timings")
    results["loss_timings"] = loss_timings(SHAPES, rounds, device)
    results["cross_entropy_timings"] = cross_entropy_timings(TARGET_SHAPE, rounds, device)
    results["tpt_timings"] = tpt_timings(model, tokenizer, max(5, rounds // 2), device)

    at_target = next(r for r in results["loss_timings"] if tuple(r["shape"]) == TARGET_SHAPE)["seconds"]
    one_sample = next(r for r in results["tpt_timings"] if r["samples_per_step"] == 1)["seconds_per_sample"]
    targets = {
        f"loss_vs_{name}": harness.Target(
            f"triton loss vs {name} at {TARGET_SHAPE}", at_target[name] / at_target["triton"], wanted
        )
        for name, wanted in LOSS_TARGETS.items()
    }
    targets["tpt_graph"] = harness.Target(
        "TPT step, graph vs eager, S = 1", one_sample["eager"] / one_sample["graph"], GRAPH_TARGET
    )
    results["targets"] = harness.report_targets(targets)
    checks_ok = (
        results["tests"].get("ok", True)
        and all(r["ok"] for r in results["correctness"])
        and all(r["ok"] for r in results["graph_replay"])
    )
    results["checks_ok"] = checks_ok
    harness.write_results("gpu_check", results, env)
    print("checks: " + ("all passed" if checks_ok else "FAILED (see above)"))
    return 0 if checks_ok else 1


if __name__ == "__main__":
    sys.exit(main())
