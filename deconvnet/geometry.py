"""Geometry: the receptive field of any unit, from the layers' kernel, stride and padding.

Fig. 2's input patches, the receptive-field crop that makes projections fast and the region an
occluder changes (Fig. 7) are the same arithmetic, one way round or the other. Works along the
chain of spatial layers (conv, max/avg-pool) that a sequential model runs before the named layer.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from .errors import UserError
from .probe import find_module, layer_names


@dataclass(frozen=True)
class Step:
    """One spatial layer: ``kernel``, ``stride``, ``padding`` (square) and pooling's ``ceil_mode``."""

    name: str
    kernel: int
    stride: int
    padding: int
    ceil_mode: bool = False

    def out_size(self, n: int) -> int:
        """Output size for input size ``n`` (PyTorch's rule, incl. ceil mode's last-window check)."""
        span = n + 2 * self.padding - self.kernel
        out = (math.ceil(span / self.stride) if self.ceil_mode else span // self.stride) + 1
        if self.ceil_mode and (out - 1) * self.stride >= n + self.padding:
            out -= 1
        return out


def _pair(v) -> int:
    if isinstance(v, (tuple, list)):
        if len(set(v)) != 1:
            raise UserError(f"non-square kernel/stride/padding {v} is not supported by the geometry")
        return int(v[0])
    return int(v)


def _step(name: str, m: nn.Module) -> Step | None:
    if isinstance(m, nn.Conv2d):
        if _pair(m.dilation) != 1:
            raise UserError(f"{name}: dilated convolutions are not supported")
        return Step(name, _pair(m.kernel_size), _pair(m.stride), _pair(m.padding))
    if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
        if _pair(getattr(m, "dilation", 1)) != 1:
            raise UserError(f"{name}: dilated pooling is not supported")
        stride = m.stride if m.stride is not None else m.kernel_size
        return Step(name, _pair(m.kernel_size), _pair(stride), _pair(m.padding), bool(m.ceil_mode))
    return None


def steps_to(model: nn.Module, layer: str) -> list[Step]:
    """The spatial layers from the input up to and including ``layer`` (module registration order)."""
    find_module(model, layer)
    modules = dict(model.named_modules())
    names = layer_names(model)
    if layer not in names:  # a container: its last leaf
        names_in = [n for n in names if n.startswith(layer + ".")]
        layer = names_in[-1]
    steps = []
    for name in names[: names.index(layer) + 1]:
        m = modules[name]
        if isinstance(m, (nn.Linear, nn.Flatten, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
            raise UserError(f"layer {layer!r} is above the spatial layers; receptive fields are per conv/pool unit")
        step = _step(name, m)
        if step is not None:
            steps.append(step)
    return steps


def receptive_field(steps: list[Step], y: int, x: int, size: int | None = None) -> tuple[int, int, int, int]:
    """Input box ``(top, left, bottom, right)`` (inclusive) seen by output unit ``(y, x)``.

    Clipped to the image when ``size`` (input height = width) is given.
    """
    top, bottom, left, right = y, y, x, x
    for s in reversed(steps):
        top, bottom = top * s.stride - s.padding, bottom * s.stride - s.padding + s.kernel - 1
        left, right = left * s.stride - s.padding, right * s.stride - s.padding + s.kernel - 1
    if size is not None:
        top, left = max(top, 0), max(left, 0)
        bottom, right = min(bottom, size - 1), min(right, size - 1)
    return top, left, bottom, right


def output_sizes(steps: list[Step], size: int) -> list[int]:
    """Spatial size after each step for an input of ``size`` x ``size``."""
    sizes = []
    for s in steps:
        size = s.out_size(size)
        sizes.append(size)
    return sizes


def affected(steps: list[Step], lo: int, hi: int, size: int) -> list[tuple[int, int]]:
    """Per step, the output index range ``[lo, hi]`` (inclusive) whose inputs touch input rows ``[lo, hi]``.

    The forward direction of :func:`receptive_field`: what an occluder over ``[lo, hi]`` changes.
    """
    ranges = []
    for s in steps:
        n_out = s.out_size(size)
        lo = max(0, math.ceil((lo + s.padding - s.kernel + 1) / s.stride))
        hi = min(n_out - 1, (hi + s.padding) // s.stride)
        ranges.append((lo, hi))
        size = n_out
    return ranges
