"""Hook points on any torch module: record activations and patch them.

A hook point is a module path as ``named_modules()`` spells it, meaning that module's output,
or ``<path>:input`` for its (first positional) input. The same mechanism serves the built-in
policy, Hugging Face models and arbitrary modules.
"""

from __future__ import annotations

import contextlib
import difflib
from typing import Callable, Iterator

import torch
from torch import nn

from ..errors import DataError, SpecError
from .hook_names import HookPoint, expand_hook_points, is_pattern, matches, pattern_regex  # noqa: F401 - re-exported


def resolve_module(model: nn.Module, point: HookPoint, available: list[str]) -> nn.Module:
    modules = dict(model.named_modules())
    if point.module not in modules or point.module not in {HookPoint.parse(a).module for a in available}:
        near = difflib.get_close_matches(str(point), available, n=5, cutoff=0.4)
        raise SpecError(
            str(point),
            [f"hook point '{point}' does not exist in the subject; "
             + (f"closest: {', '.join(near)}; " if near else "")
             + f"available: {', '.join(available)}"],
        )
    return modules[point.module]


def module_hook_points(model: nn.Module) -> list[str]:
    """Every module's output and input, as named_modules() spells the paths."""
    return [point for name, _ in model.named_modules() if name for point in (name, f"{name}:input")]


class StopForward(Exception):
    """Raised by the last needed hook so the rest of the forward pass is skipped."""


def _first_tensor(value):
    return value[0] if isinstance(value, (tuple, list)) and value else value


def _activation(value, name: str) -> torch.Tensor:
    """The recorded activation of hook point ``name``: a tensor ``[batch, ..., d]``."""
    if isinstance(value, (tuple, list)) and not value:
        raise DataError(f"hook point '{name}': the module was called with no positional argument (keywords only), "
                        "so it has no input to record; choose the output of the module that computes it")
    value = _first_tensor(value)
    if not isinstance(value, torch.Tensor):
        what = "received" if name.endswith(":input") else "returned"
        raise DataError(f"hook point '{name}': the module {what} {type(value).__name__}, not a tensor; "
                        "choose a hook point whose activation is a tensor [batch, ..., d]")
    if value.dim() < 2:
        raise DataError(f"hook point '{name}': activation of shape {list(value.shape)}, expected [batch, ..., d] "
                        "(one row per input, or per input and position)")
    return value.detach()


@contextlib.contextmanager
def recording(model: nn.Module, points: list[str], available: list[str], stop_after: bool = False) -> Iterator[dict]:
    """Record every hook point's activation in one forward pass into the yielded dict.

    With ``stop_after`` the forward pass is cut (StopForward) once all points are recorded;
    the caller runs the model inside ``contextlib.suppress(StopForward)``.
    """
    store: dict[str, torch.Tensor] = {}
    handles = []
    wanted = set(points)

    def done() -> None:
        if stop_after and wanted <= store.keys():
            raise StopForward

    for text in points:
        point = HookPoint.parse(text)
        module = resolve_module(model, point, available)
        if point.io == "output":
            def hook(mod, args, output, name=text):
                store[name] = _activation(output, name)
                done()
            handles.append(module.register_forward_hook(hook))
        else:
            def pre_hook(mod, args, name=text):
                store[name] = _activation(args, name)
                done()
            handles.append(module.register_forward_pre_hook(pre_hook))
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def patching(
    model: nn.Module,
    target: str,
    replace: Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor],
    available: list[str],
    read: list[str] = (),
) -> Iterator[None]:
    """Replace the activation at ``target`` by ``replace(original, recorded)``, where
    ``recorded`` holds the activations of the ``read`` hook points from the same forward pass
    (a transcoder reads its source there)."""
    point = HookPoint.parse(target)
    module = resolve_module(model, point, available)
    with recording(model, [r for r in read if r != target], available) as recorded:
        if point.io == "output":
            def hook(mod, args, output):
                if isinstance(output, tuple):
                    return (replace(output[0], recorded), *output[1:])
                return replace(output, recorded)
            handle = module.register_forward_hook(hook)
        else:
            def pre_hook(mod, args):
                return (replace(args[0], recorded), *args[1:])
            handle = module.register_forward_pre_hook(pre_hook)
        try:
            yield
        finally:
            handle.remove()
