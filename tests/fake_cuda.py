"""Tracing a step on fake CUDA tensors on a machine without CUDA (the ``fake_cuda`` fixture).

``torch._subclasses.fake_tensor.FakeTensorMode`` runs torch code on tensors that have a device, a shape
and a dtype but no data. An op that mixes a CUDA tensor with a CPU one (other than a 0-dim CPU scalar,
which a GPU takes too) raises ``FakeTensorDeviceMismatchError``, and reading a value on the host
(``.item()``, ``float(t)``, ``bool(t)``, ``.tolist()``, ``nonzero``, ...) raises
``DataDependentOutputException`` or ``DynamicOutputShapeException``: a step that runs to its end inside
``trace()`` mixes no devices and reads nothing back. Two gaps of a CPU-only machine are bridged here.

Objects: a module cannot be moved with ``.to("cuda")`` inside the mode, and the set-up a run does
between steps (tokenizing, drawing outliers, reading caches) reads values. So objects are built as a run
builds them, on the CPU, outside the mode, and ``to_fake_cuda`` then replaces every tensor they hold
(parameters, buffers, tensor attributes of fastcal's own objects, in lists, tuples and dicts) by a fake
CUDA tensor of the same shape, dtype and ``requires_grad`` (parameters stay ``nn.Parameter``, tensors
shared between objects stay shared; optimizers keep theirs, before their first step), and every
``torch.device("cpu")`` they record by ``cuda``. Set-up a step memoizes (the text encoder's plan for a
prompt learner's fixed token ids) is carried over with the version counters its memo checks, so a
step that is run once on the CPU before conversion starts the trace as it starts its second call.

Backward: torch's autograd engine cannot run on fake CUDA tensors without a CUDA driver. Before it runs
a node it records the current stream of each CUDA device that has a context
(``GraphTask::stash_current_streams``, for stream synchronization at the end), and that asks the CUDA
hooks ``hasPrimaryContext(0)``, which fails with no device ("hasPrimaryContext expects a valid device
index", pytorch issue 92627). That query is C++-internal and cannot be patched from Python. Inside
``trace()`` ``Tensor.backward`` and ``torch.autograd.backward`` run ``backward`` below instead: the same
graph walk as the engine, in Python, calling the same nodes (the C++ derivative formulas, custom
``autograd.Function`` backwards and the ``AccumulateGrad`` nodes that write ``.grad``) in dependency
order, summing the gradients that meet at a node, and checking each gradient against the metadata of
the input it flows into as the engine's ``validate_outputs`` does: shape reduced with ``sum_to_size``
where broadcast, dtype cast, and a device mismatch an error (except 0-dim, which the engine moves). A
custom Function's backward returns one result per forward argument and the engine keeps those of the
tensor arguments; which arguments were tensors is recorded as each Function is applied inside
``trace()``. Only the stream bookkeeping is left out, which has nothing to check on fake tensors, and
hooks do not run (fastcal registers none). Why this is sound: every derivative formula the engine
would run, runs, on the same fake CUDA tensors, so a device mismatch or a host read in any of them
raises as in the forward. ``tests/test_fake_cuda.py`` checks the walk against the engine on real
tensors and that it catches a mismatch and a read in a backward.
"""

from __future__ import annotations

import contextlib
import weakref
from collections import Counter
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

CUDA = torch.device("cuda", 0)
_TORCH_MODULE_STATE = frozenset(vars(nn.Module()))  # nn.Module's own bookkeeping: never converted


def _fake(mode: FakeTensorMode, tensor: torch.Tensor, memo: dict[int, Any]) -> torch.Tensor:
    """The fake CUDA twin of ``tensor`` (``memo`` maps ids to (original, twin): the originals stay alive,
    so an id is never reused by another object during one conversion)."""
    if isinstance(tensor, FakeTensor):  # converted already, through another reference
        return tensor
    if id(tensor) not in memo:
        fake = mode.from_tensor(tensor.detach(), static_shapes=True)
        with mode:
            fake = fake.to(CUDA)
        # a memo keyed on the tensor's version (fastcal's text encoder keeps some) must still match
        torch._C._autograd._unsafe_set_version_counter((fake,), (tensor._version,))
        if isinstance(tensor, nn.Parameter):
            fake = nn.Parameter(fake, requires_grad=tensor.requires_grad)
        elif tensor.requires_grad:
            fake.requires_grad_(True)
        memo[id(tensor)] = (tensor, fake)
    return memo[id(tensor)][1]


def _convert(mode: FakeTensorMode, value: Any, memo: dict[int, Any]) -> Any:
    if isinstance(value, torch.Tensor):
        return _fake(mode, value, memo)
    if isinstance(value, torch.device):
        return CUDA if value.type == "cpu" else value
    if isinstance(value, list | tuple):
        converted = [_convert(mode, v, memo) for v in value]
        return type(value)(converted) if isinstance(value, list) else tuple(converted)
    if isinstance(value, dict):
        return type(value)((k, _convert(mode, v, memo)) for k, v in value.items())
    if isinstance(value, torch.optim.Optimizer):
        if id(value) not in memo:
            memo[id(value)] = (value, value)
            for group in value.param_groups:
                group["params"] = [_fake(mode, p, memo) for p in group["params"]]
            state = {_fake(mode, p, memo): _convert(mode, s, memo) for p, s in value.state.items()}
            value.state = type(value.state)(dict, state)
        return value
    if isinstance(value, nn.Module) or type(value).__module__.startswith("fastcal"):
        if id(value) not in memo:
            memo[id(value)] = (value, value)
            _convert_object(mode, value, memo)
        return value
    return value


def _convert_object(mode: FakeTensorMode, obj: Any, memo: dict[int, Any]) -> None:
    if isinstance(obj, nn.Module):
        for module in obj.modules():
            for name, p in module._parameters.items():
                if p is not None:
                    module._parameters[name] = _fake(mode, p, memo)
            for name, b in module._buffers.items():
                if b is not None:
                    module._buffers[name] = _fake(mode, b, memo)
    ours = type(obj).__module__.startswith("fastcal")
    for name, value in list(vars(obj).items()):
        if name not in _TORCH_MODULE_STATE and (ours or not name.startswith("_")):
            vars(obj)[name] = _convert(mode, value, memo)
    if isinstance(obj, nn.Module):
        for child in obj.modules():
            _convert(mode, child, memo)


def to_fake_cuda(mode: FakeTensorMode, *objects: Any) -> Any:
    """The objects with every tensor they hold on fake CUDA (module docstring), converted in place
    (pass copies of anything shared); one object is returned as is, several as a tuple."""
    memo: dict[int, Any] = {}
    converted = tuple(_convert(mode, obj, memo) for obj in objects)
    return converted[0] if len(converted) == 1 else converted


def _checked(node: Any, slot: int, grad: torch.Tensor) -> torch.Tensor:
    """``grad`` as it enters input ``slot`` of ``node`` (the engine's ``validate_outputs``)."""
    metadata = node._input_metadata[slot]
    if grad.device != metadata.device:
        if grad.dim() != 0:
            raise RuntimeError(
                f"invalid gradient for {node.name()} input {slot}: expected device {metadata.device}, "
                f"got {grad.device}"
            )
        grad = grad.to(metadata.device)
    if grad.dtype != metadata.dtype:
        grad = grad.to(metadata.dtype)
    if tuple(grad.shape) != tuple(metadata.shape):
        grad = grad.sum_to_size(metadata.shape)
    return grad


# Python autograd.Function nodes made inside trace(): which forward arguments were tensors. The engine
# routes the backward's i-th result to the next edge only for those (``is_variable_input``, set by
# ``Function.apply``); the others must be None.
_TENSOR_ARGUMENTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _call(node: Any, grads: list[torch.Tensor | None]) -> tuple[torch.Tensor | None, ...]:
    if callable(node):  # a C++ node
        out = node(*grads)
        return out if isinstance(out, tuple) else (out,)
    # a Python autograd.Function's node: undefined gradients become zeros, as torch does
    grads = [
        g if g is not None else torch.zeros(m.shape, dtype=m.dtype, device=m.device)
        for g, m in zip(grads, node._input_metadata, strict=True)
    ]
    out = node.apply(*grads)
    out = out if isinstance(out, tuple) else (out,)
    tensor_arguments = _TENSOR_ARGUMENTS.get(node)
    if tensor_arguments is None:
        raise RuntimeError(f"{node.name()} was made outside trace(): its tensor arguments are unknown")
    if any(g is not None for g, is_tensor in zip(out, tensor_arguments, strict=False) if not is_tensor):
        raise RuntimeError(f"{node.name()} returned a gradient for an argument that is not a tensor")
    return tuple(g for g, is_tensor in zip(out, tensor_arguments, strict=False) if is_tensor)


def backward(tensor: torch.Tensor, gradient: torch.Tensor | None = None, **options: Any) -> None:
    """``tensor.backward(gradient)`` by the Python graph walk (module docstring); accumulates into the
    leaves' ``.grad``."""
    if options.get("create_graph") or options.get("inputs") is not None:
        raise NotImplementedError("the fake-CUDA backward takes neither create_graph nor inputs")
    _walk(tensor, gradient, None)


def grad(
    outputs: Any,
    inputs: Any,
    grad_outputs: Any = None,
    retain_graph: bool | None = None,
    create_graph: bool = False,
    allow_unused: bool | None = None,
    **options: Any,
) -> tuple[torch.Tensor | None, ...]:
    """``torch.autograd.grad`` by the same walk, for leaf ``inputs``: their gradients are returned and no
    ``.grad`` is written (the walk stops at every leaf)."""
    if create_graph or options.get("is_grads_batched"):
        raise NotImplementedError("the fake-CUDA grad takes neither create_graph nor batched gradients")
    outputs = [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)
    inputs = [inputs] if isinstance(inputs, torch.Tensor) else list(inputs)
    if any(t.grad_fn is not None for t in inputs):
        raise NotImplementedError("the fake-CUDA grad takes leaf inputs only")
    given = grad_outputs if isinstance(grad_outputs, list | tuple) else [grad_outputs] * len(outputs)
    captured: dict[int, torch.Tensor | None] = {id(t): None for t in inputs}
    for output, gradient in zip(outputs, given, strict=True):
        _walk(output, gradient, captured)
    result = tuple(captured[id(t)] for t in inputs)
    if not allow_unused and any(g is None for g in result):
        raise RuntimeError("One of the differentiated Tensors appears to not have been used in the graph")
    return result


def _walk(
    tensor: torch.Tensor, gradient: torch.Tensor | None, captured: dict[int, torch.Tensor | None] | None
) -> None:
    """Run the graph below ``tensor``; with ``captured`` (leaf id -> gradient), the leaves' gradients are
    summed there instead of accumulated into ``.grad``."""
    root = tensor.grad_fn
    if root is None:
        raise RuntimeError("element 0 of tensors does not require grad and does not have a grad_fn")
    if gradient is None:
        if tensor.numel() != 1:
            raise RuntimeError("grad can be implicitly created only for scalar outputs")
        gradient = torch.ones_like(tensor)
    waiting: Counter = Counter()
    seen, stack = {root}, [root]
    while stack:
        for child, _ in stack.pop().next_functions:
            if child is not None:
                waiting[child] += 1
                if child not in seen:
                    seen.add(child)
                    stack.append(child)
    buffers: dict[Any, list[torch.Tensor | None]] = {root: [None] * len(root._input_metadata)}
    buffers[root][tensor.output_nr] = _checked(root, tensor.output_nr, gradient)
    ready = [root]
    while ready:
        node = ready.pop()
        grads = buffers.pop(node)
        if captured is not None and node.name() == "torch::autograd::AccumulateGrad":
            key = id(node.variable)
            if key in captured and grads[0] is not None:
                captured[key] = grads[0] if captured[key] is None else captured[key] + grads[0]
            continue
        outputs = _call(node, grads)
        for (child, slot), grad in zip(node.next_functions, outputs, strict=True):
            if child is None:
                continue
            buffer = buffers.setdefault(child, [None] * len(child._input_metadata))
            if grad is not None:
                grad = _checked(child, slot, grad)
                buffer[slot] = grad if buffer[slot] is None else buffer[slot] + grad
            waiting[child] -= 1
            if waiting[child] == 0:
                ready.append(child)


def _tensor_backward(self: torch.Tensor, gradient: torch.Tensor | None = None, *args: Any, **kwargs: Any):
    backward(self, gradient, **kwargs)


def _autograd_backward(tensors: Any, grad_tensors: Any = None, **kwargs: Any) -> None:
    tensors = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
    grads = grad_tensors if isinstance(grad_tensors, list | tuple) else [grad_tensors] * len(tensors)
    for t, g in zip(tensors, grads, strict=True):
        backward(t, g, **kwargs)


_FUNCTION_APPLY = vars(torch.autograd.Function)["apply"]


def _recording_apply(cls: Any, *args: Any, **kwargs: Any) -> Any:
    result = _FUNCTION_APPLY.__get__(None, cls)(*args, **kwargs)
    outputs = result if isinstance(result, tuple | list) else (result,)
    for output in outputs:
        if isinstance(output, torch.Tensor) and output.grad_fn is not None:
            _TENSOR_ARGUMENTS[output.grad_fn] = tuple(isinstance(a, torch.Tensor) for a in args)
            break
    return result


@contextlib.contextmanager
def trace(mode: FakeTensorMode | None) -> Iterator[None]:
    """Inside ``mode`` (None: on real tensors), with ``backward`` and ``grad`` standing in for the autograd
    engine."""
    patches = [
        (torch.Tensor, "backward", _tensor_backward),
        (torch.autograd, "backward", _autograd_backward),
        (torch.autograd, "grad", grad),
        (torch.autograd.Function, "apply", classmethod(_recording_apply)),
    ]
    with contextlib.ExitStack() as stack:
        if mode is not None:
            stack.enter_context(mode)
        for owner, name, replacement in patches:
            stack.callback(
                setattr, owner, name, vars(owner)[name] if name in vars(owner) else getattr(owner, name)
            )
            setattr(owner, name, replacement)
        yield


def new_mode() -> FakeTensorMode:
    """A fake mode that fails on ops without a fake kernel rather than running them for real."""
    return FakeTensorMode(allow_fallback_kernels=False)
