"""The probe: run a model up to named layers and capture their outputs (Sec. 2.1 needs them).

Layers are addressed by module name, for our models (``conv1`` .. ``fc8``) and torchvision-style
ones (``features.10``, ``layer3.1``) alike. A module called several times in one forward pass has
one name per call, as torchvision's feature extraction names them: ``layer3.1.relu`` (first call),
``layer3.1.relu_1``, ``layer3.1.relu_2``. A module whose own name is ``foo_1`` wins over the
call-suffix reading. The forward pass stops right after the last requested layer, so layers above
it never run. Hooks are removed in ``finally``.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from .errors import UserError
from .runner import model_device


@dataclass(frozen=True)
class LayerCall:
    """One call of a module in a forward pass: its per-call ``name``, the ``module``, its class name
    ``type`` and its output ``shape`` without the batch dimension (:func:`geometry.layer_calls` lists
    them from the traced graph)."""

    name: str
    module: nn.Module
    type: str
    shape: tuple


def layer_names(model: nn.Module) -> list[str]:
    """Names of the leaf modules in registration order (the order a sequential model runs them)."""
    return [name for name, m in model.named_modules() if name and not list(m.children())]


def call_name(name: str, call: int) -> str:
    """The per-call name of call number ``call`` (0 = first) of the module ``name``."""
    return name if call == 0 else f"{name}_{call}"


def resolve(model: nn.Module, name: str) -> tuple[nn.Module, int]:
    """``(module, call)`` for a per-call layer name (``call`` 0 = the first call), or a one-line
    :class:`UserError` listing the valid names."""
    modules = dict(model.named_modules())
    if name and name in modules:
        return modules[name], 0
    match = re.fullmatch(r"(.+)_(\d+)", name or "")
    if match and match.group(1) in modules and int(match.group(2)) >= 1 and not match.group(2).startswith("0"):
        return modules[match.group(1)], int(match.group(2))
    names = layer_names(model)
    shown = ", ".join(names[:30]) + (" ..." if len(names) > 30 else "")
    raise UserError(f"unknown layer {name!r}; this model has: {shown} (per-call names: see `deconvnet inspect`)")


def find_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule a (per-call) layer name refers to, or a one-line :class:`UserError` listing the
    valid names."""
    return resolve(model, name)[0]


class _Stop(Exception):
    """Raised by a hook once every requested layer is captured, to skip the layers above."""


@contextmanager
def hooks(handles: list):
    """Remove every hook handle in ``handles`` on exit, also after an error."""
    try:
        yield handles
    finally:
        for h in handles:
            h.remove()
        handles.clear()


def module_calls(model: nn.Module, on_output: Callable[[str, nn.Module, tuple, Any], Any]) -> list:
    """Forward hooks on every submodule that call ``on_output(per-call name, module, inputs, output)``
    as each call returns (a non-None return value replaces the output). Returns the handles; use
    with :func:`hooks`. The call counters count from zero from when the hooks are registered."""
    counts: dict[int, int] = {}

    def make_hook(name: str):
        def hook(module, inputs, output):
            call = counts.get(id(module), 0)
            counts[id(module)] = call + 1
            return on_output(call_name(name, call), module, inputs, output)
        return hook

    return [m.register_forward_hook(make_hook(n)) for n, m in model.named_modules() if n]


def input_channels(model: nn.Module) -> int:
    """The channels a model takes: those of its first convolution (3 when it has none)."""
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return conv.in_channels if conv is not None else 3


def apply_at(model: nn.Module, x: torch.Tensor, layers: list[str] | str,
             fn: Callable[[str, torch.Tensor], Any]) -> dict:
    """``{name: fn(name, output)}`` for the named ``layers`` (per-call names), each called as the
    forward pass leaves that call (before a later in-place op can touch its output); runs no layer
    above the last."""
    layers = [layers] if isinstance(layers, str) else list(layers)
    wanted: dict[tuple[int, int], list[str]] = {}  # (id(module), call) -> requested names
    modules: dict[int, nn.Module] = {}
    for name in layers:
        module, call = resolve(model, name)
        wanted.setdefault((id(module), call), []).append(name)
        modules[id(module)] = module
    results: dict = {}
    counts: dict[int, int] = {}

    def hook(module, _inputs, output):
        call = counts.get(id(module), 0)
        counts[id(module)] = call + 1
        for name in wanted.get((id(module), call), []):
            results[name] = fn(name, output)
        if len(results) == len(set(layers)):
            raise _Stop

    with hooks([m.register_forward_hook(hook) for m in modules.values()]):
        try:
            model(x.to(model_device(model)))  # the outputs ``fn`` sees are on the model's device
        except _Stop:
            pass
    missing = [n for n in layers if n not in results]
    if missing:
        raise UserError(f"layer(s) {missing} did not run in the forward pass (see `deconvnet inspect`)")
    return results


def activations(model: nn.Module, x: torch.Tensor, layers: list[str] | str) -> dict[str, torch.Tensor]:
    """Outputs of the named ``layers`` for input ``x`` (N, C, H, W); runs no layer above the last.

    Captured tensors are clones, so a following ``ReLU(inplace=True)`` cannot change them.
    """
    return apply_at(model, x, layers, lambda _name, output: output.clone())
