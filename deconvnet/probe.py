"""The probe: run a model up to named layers and capture their outputs (Sec. 2.1 needs them).

Layers are addressed by module name, for our models (``conv1`` .. ``fc8``) and torchvision-style
ones (``features.10``) alike. The forward pass stops right after the last requested layer, so layers
above it never run. Hooks are removed in ``finally``.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable

import torch
from torch import nn

from .errors import UserError


def layer_names(model: nn.Module) -> list[str]:
    """Names of the leaf modules in registration order (the order a sequential model runs them)."""
    return [name for name, m in model.named_modules() if name and not list(m.children())]


def find_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name``, or a one-line :class:`UserError` listing the valid names."""
    modules = dict(model.named_modules())
    if not name or name not in modules:
        names = layer_names(model)
        shown = ", ".join(names[:30]) + (" ..." if len(names) > 30 else "")
        raise UserError(f"unknown layer {name!r}; this model has: {shown}")
    return modules[name]


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


def apply_at(model: nn.Module, x: torch.Tensor, layers: list[str] | str,
             fn: Callable[[str, torch.Tensor], Any]) -> dict:
    """``{name: fn(name, output)}`` for the named ``layers``, each called as the forward pass leaves
    that layer (before a later in-place op can touch its output); runs no layer above the last."""
    layers = [layers] if isinstance(layers, str) else list(layers)
    modules = {name: find_module(model, name) for name in layers}
    results: dict = {}

    def make_hook(name):
        def hook(_module, _inputs, output):
            results[name] = fn(name, output)
            if len(results) == len(modules):
                raise _Stop
        return hook

    with hooks([m.register_forward_hook(make_hook(n)) for n, m in modules.items()]):
        try:
            model(x)
        except _Stop:
            pass
    missing = [n for n in layers if n not in results]
    if missing:
        raise UserError(f"layer(s) {missing} did not run in the forward pass")
    return results


def activations(model: nn.Module, x: torch.Tensor, layers: list[str] | str) -> dict[str, torch.Tensor]:
    """Outputs of the named ``layers`` for input ``x`` (N, C, H, W); runs no layer above the last.

    Captured tensors are clones, so a following ``ReLU(inplace=True)`` cannot change them.
    """
    return apply_at(model, x, layers, lambda _name, output: output.clone())

