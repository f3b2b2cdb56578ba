"""The deconvnet (Sec. 2.1, Fig. 1): project any activation of a convnet back to input pixels.

From one activation of a named layer, every other activation of that layer set to zero, the signal
goes down to pixel space by repeatedly (i) unpooling with the switches recorded on the forward pass,
(ii) rectifying with a ReLU and (iii) filtering with the layer's transposed filters. No contrast
normalisation and no biases on the way down. That is back-propagation with two changes (Sec. 2.1):
each ReLU rectifies the signal itself instead of gating it by the forward pass, and local response
norm passes the signal unchanged. So a projection is autograd with a hook on every ReLU's backward
node; only that hook differs between the rules ``deconvnet`` (the paper), ``guided`` (guided
backprop, Springenberg et al. 2015: rectify and gate) and ``gradient`` (plain back-propagation).

The hooks go on the autograd graph of the forward pass, so every ReLU the signal passes gets the
rule: ``nn.ReLU`` modules, ``F.relu`` / ``torch.relu`` / ``Tensor.relu_``, in place or not, one module
called several times. Branches add on the way down, concatenations split, eval-mode BatchNorm passes
the signal through its linear map, average pools spread it. Activations the paper has no rule for
(ReLU6, SiLU, GELU, Hardswish, sigmoid gates, ...) are an error naming the first one the signal
meets, unless ``other_activations="gradient"`` lets them act as they do for the gradient.

Speed: a unit depends only on the input under its receptive field (:mod:`geometry`, from the traced
graph), so each projection runs forward and backward over that crop alone, and many (image, unit)
pairs go through in one batch.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from .errors import UserError
from .geometry import _field, _Unknown, cone_strides, graph_of, stride_of
from .probe import apply_at, hooks, module_calls, resolve
from .figures import finish, new_figure

if TYPE_CHECKING:
    from matplotlib.figure import Figure

RULES = ("deconvnet", "guided", "gradient")
OTHER_ACTIVATIONS = ("error", "gradient")
_RELU_NODES = {"ReluBackward0", "ReluBackward1", "ThresholdBackward0", "ThresholdBackward1"}
_OTHER_NODES = {"Hardtanh": "ReLU6/Hardtanh", "Silu": "SiLU", "Gelu": "GELU", "Hardswish": "Hardswish",
                "Hardsigmoid": "Hardsigmoid", "Sigmoid": "sigmoid", "Tanh": "tanh", "Elu": "ELU/SELU/CELU",
                "LeakyRelu": "LeakyReLU", "Mish": "Mish", "Softplus": "Softplus", "PreluKernel": "PReLU",
                "Prelu": "PReLU", "LogSigmoid": "LogSigmoid", "Rrelu": "RReLU", "Celu": "CELU"}
_CHUNK = 32  # (image, unit) pairs per forward/backward pass: bounds memory at 224 px


class _SkipBackward(torch.autograd.Function):
    """Forward: a module's output. Backward: the signal handed to the module's input unchanged."""

    @staticmethod
    def forward(ctx, inputs: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        return output.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def _relu_hook(rule: str):
    """Hook for a ReLU's backward node: returns the signal handed to the ReLU's input."""
    if rule == "deconvnet":  # rectify the signal coming down, whatever the forward pass did
        return lambda grad_inputs, grad_outputs: (grad_outputs[0].clamp(min=0),)
    return lambda grad_inputs, grad_outputs: (grad_inputs[0].clamp(min=0),)  # guided: gate, then rectify


def _next(node) -> list:
    return [n for n, _ in node.next_functions if n is not None]


def _leads_to(root, x: torch.Tensor) -> dict:
    """For every node of the autograd graph under ``root``: whether it leads to the leaf ``x``."""
    leads: dict = {}
    stack = [(root, False)]
    while stack:
        node, expanded = stack.pop()
        if expanded:
            leads[node] = any(leads[n] for n in _next(node))
        elif node not in leads:
            if getattr(node, "variable", None) is x:
                leads[node] = True
                continue
            stack.append((node, True))
            stack.extend((n, False) for n in _next(node) if n not in leads)
    return leads


def _other_kind(node) -> str | None:
    """The activation an autograd node differentiates, if it is one the paper has no rule for."""
    return _OTHER_NODES.get(node.name().removesuffix("Backward0").removesuffix("Backward1"))


def _where(node, names: dict) -> str:
    """The layer an autograd node belongs to: its module's per-call name, or the layer below it."""
    if node in names:
        return repr(names[node])
    seen, frontier = set(), _next(node)
    while frontier:
        below = frontier.pop(0)
        if below in names:
            return f"a function applied to the output of {names[below]!r}"
        if below not in seen:
            seen.add(below)
            frontier.extend(_next(below))
    return "a function applied to the input"


class Deconvnet:
    """Projects activations of ``model`` down to its input pixels (Zeiler & Fergus 2014, Sec. 2.1).

    Preconditions: ``model`` is in eval mode. Max-pool backward is the unpooling with switches;
    ``nn.LocalResponseNorm`` passes the signal down unchanged; every ReLU call the signal passes gets
    the rule. ``other_activations``: ``"error"`` (default) refuses a projection through an activation
    the paper has no rule for, naming it; ``"gradient"`` lets such activations act as they do in
    back-propagation (the rule still applies at every ReLU).
    """

    def __init__(self, model: nn.Module, other_activations: str = "error"):
        if other_activations not in OTHER_ACTIVATIONS:
            raise UserError(f"unknown other_activations {other_activations!r}; use one of {', '.join(OTHER_ACTIVATIONS)}")
        self.model = model
        self.other_activations = other_activations

    def project(self, images: torch.Tensor, layer: str, units, rule: str = "deconvnet") -> torch.Tensor:
        """Project one activation per image down to pixel space.

        Args:
            images: (N, C, H, W), as the model takes them.
            layer: per-call layer name (``conv5``, ``features.10``, ``layer3.1.relu_1``); the
                activation is that call's output.
            units: N positions ``(channel, y, x)`` in the layer's output, one per image (repeat an image
                to project several of its units); ``(channel,)`` for a fully connected layer.
            rule: ``deconvnet`` (Sec. 2.1), ``guided`` or ``gradient``.

        Returns:
            (N, C, H, W) projections. The seed is the activation's own value with every other
            activation of the layer zero (Sec. 2.1), so a projection scales with how strongly it fires.

        Each unit runs forward and backward over the crop of the input under its receptive field
        alone (the union over all paths of the traced graph), the crop's origin a multiple of every
        total stride in the unit's cone so that every window and switch lines up with the full
        image: the result is that of the full image. Where the geometry cannot vouch for that (an op
        it cannot reason about, uneven adaptive pools, a field as large as the image) the full
        image runs.
        """
        if rule not in RULES:
            raise UserError(f"unknown rule {rule!r}; use one of {', '.join(RULES)}")
        if self.model.training:
            raise UserError("the model is in training mode; call model.eval() before projecting")
        resolve(self.model, layer)
        if images.dim() != 4:
            raise UserError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
        units = [tuple(int(v) for v in u) for u in units]
        if len(units) != len(images):
            raise UserError(f"{len(units)} units for {len(images)} images; give one (channel, y, x) per image")
        if units and all(len(u) == 3 for u in units):
            result = self._project_crops(images, layer, units, rule)
            if result is not None:
                return result
        return torch.cat([self._run(images[i:i + _CHUNK], layer, units[i:i + _CHUNK], rule)
                          for i in range(0, len(images), _CHUNK)])

    def _crops(self, images, layer, units) -> tuple | None:
        """``(crop_h, crop_w, origins, stride)`` for the units, or None where the full image must run."""
        h, w = images.shape[-2:]
        try:
            graph = graph_of(self.model, (h, w))
        except Exception:  # noqa: BLE001 - a model the tracer cannot follow runs on the full image
            return None
        node = graph.nodes[graph.names[layer]] if layer in graph.names else None
        if node is None or not node.spatial:
            return None
        stride = stride_of(graph, node)
        fields = []
        try:
            for _, y, x in units:
                if not (0 <= y < node.shape[2] and 0 <= x < node.shape[3]):
                    return None  # the full image says why
                boxes, box = _field(graph, node, y, x, clip=False)
                if box is None or cone_strides(graph, boxes) != stride:
                    return None
                fields.append(box)
        except _Unknown:
            return None
        centre = _field(graph, node, node.shape[2] // 2, node.shape[3] // 2, clip=False)[1]
        crop = []
        for axis, n in enumerate((h, w)):
            lo, hi = centre[axis]
            crop.append(_crop_size(n, hi - lo + 1, lo % stride[axis], stride[axis]))
        if crop == [h, w]:
            return None
        origins = []
        for (_, y, x), box in zip(units, fields):
            origin = []
            for axis, n in enumerate((h, w)):
                lo, hi = box[axis]
                o = min(max(lo, 0) // stride[axis] * stride[axis], n - crop[axis])
                if (lo < o and o > 0) or (hi > o + crop[axis] - 1 and o + crop[axis] < n):
                    return None  # not inside the crop: the geometry cannot vouch for it
                origin.append(o)
            origins.append(tuple(origin))
        return crop[0], crop[1], origins, stride

    def _project_crops(self, images, layer, units, rule) -> torch.Tensor | None:
        """Projections computed on receptive-field crops; None where the full image must run."""
        plan = self._crops(images, layer, units)
        if plan is None:
            return None
        crop_h, crop_w, origins, (sy, sx) = plan
        result = torch.zeros_like(images)
        for start in range(0, len(units), _CHUNK):
            chunk = range(start, min(start + _CHUNK, len(units)))
            crops = torch.stack([images[i, :, origins[i][0]:origins[i][0] + crop_h,
                                        origins[i][1]:origins[i][1] + crop_w] for i in chunk])
            crop_units = [(units[i][0], units[i][1] - origins[i][0] // sy, units[i][2] - origins[i][1] // sx)
                          for i in chunk]
            grads = self._run(crops, layer, crop_units, rule, crop=True)
            if grads is None:
                return None
            for grad, i in zip(grads, chunk):
                result[i, :, origins[i][0]:origins[i][0] + crop_h, origins[i][1]:origins[i][1] + crop_w] = grad
        return result

    def _run(self, x: torch.Tensor, layer: str, units: list[tuple], rule: str,
             crop: bool = False) -> torch.Tensor | None:
        """One forward/backward pass. On a crop (``crop``): None if a unit falls outside the map."""
        x = x.detach().clone().requires_grad_(True)  # a leaf of our own (also from inference-mode tensors)
        names: dict = {}  # autograd node -> per-call name of the module whose output it made
        node_handles: list = []

        def on_output(name, module, inputs, output):
            if not isinstance(output, torch.Tensor) or output.grad_fn is None:
                return None
            if isinstance(module, nn.LocalResponseNorm):  # no contrast normalisation on the way down
                output = _SkipBackward.apply(inputs[0], output.detach())
            names.setdefault(output.grad_fn, name)
            return output

        with torch.enable_grad(), hooks(node_handles), hooks(module_calls(self.model, on_output)):
            out = apply_at(self.model, x, layer, lambda _name, output: output)[layer]  # in the graph
            for u in units:
                if len(u) != out.dim() - 1 or not all(0 <= v < s for v, s in zip(u, out.shape[1:])):
                    if crop:
                        return None
                    raise UserError(f"unit {u} is outside {layer}'s output of shape {tuple(out.shape[1:])}")
            if out.grad_fn is None:
                raise UserError(f"{layer!r} does not depend on the input")
            on_path = [node for node, leads in _leads_to(out.grad_fn, x).items() if leads]
            if rule != "gradient":
                others = [n for n in on_path if _other_kind(n)]
                if others and self.other_activations == "error":
                    first = max(others, key=lambda n: n._sequence_nr())  # the first the signal meets going down
                    raise UserError(f"the signal from {layer!r} passes a {_other_kind(first)} at {_where(first, names)}, "
                                    f"which the paper has no {rule} rule for; use --rule gradient, or treat such "
                                    "activations as the gradient does (other_activations='gradient')")
                hook = _relu_hook(rule)
                node_handles.extend(n.register_hook(hook) for n in on_path if n.name() in _RELU_NODES)
            index = (torch.arange(len(x)), *zip(*units))
            seed = torch.zeros_like(out)
            seed[index] = out.detach()[index]
            (grad,) = torch.autograd.grad(out, x, seed)
        return grad


def _crop_size(n: int, field: int, slack: int, stride: int) -> int:
    """One crop length for every unit of a layer along an axis of ``n`` pixels.

    A crop starts at a multiple of the layer's total ``stride`` (so every window and switch lines up
    with the full image's) at or before the ``field`` pixels under the unit, ``slack`` pixels before
    them when inside the image; it ends at or after the field, or at the image border. Windows outside
    the field differ from the full image's (they see padding at the crop's edges) but never reach the
    unit. The length is the shortest that also fits the last aligned start before the far border.
    """
    need = field + slack
    return n if need >= n else n - (n - need) // stride * stride


def contrast_stretch(x: torch.Tensor) -> torch.Tensor:
    """Each (C, H, W) map of ``x`` (N, C, H, W) scaled to [0, 1] for display, as the paper shows them."""
    lo = x.amin(dim=(1, 2, 3), keepdim=True)
    hi = x.amax(dim=(1, 2, 3), keepdim=True)
    return (x - lo) / (hi - lo).clamp_min(1e-12)


def draw_projection(picture: torch.Tensor, projection: torch.Tensor, box: tuple[int, int, int, int], path=None,
                    title: str = "") -> Figure:
    """One PNG: the input (C, H, W) in [0, 1] with the unit's receptive field ``box`` outlined, the
    projection (C, H, W) contrast-stretched, and both cut to the field side by side."""
    from matplotlib.patches import Rectangle

    from ._analysis import to_rgb

    top, left, bottom, right = box
    stretched = contrast_stretch(projection[None])[0]
    field = contrast_stretch(projection[None, :, top:bottom + 1, left:right + 1])[0]
    gap = torch.ones(field.shape[0], field.shape[1], max(1, field.shape[2] // 10))
    patch = picture[:, top:bottom + 1, left:right + 1]
    panels = [("input and receptive field", picture), ("projection", stretched),
              ("in the field: projection | input", torch.cat([field, gap, patch], 2))]
    fig, axes = new_figure(1, 3, figsize=(10, 3.6))
    for ax, (name, img) in zip(axes, panels):
        ax.imshow(to_rgb(img), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    axes[0].add_patch(Rectangle((left - 0.5, top - 0.5), right - left + 1, bottom - top + 1,
                                fill=False, edgecolor="red", linewidth=1.5))
    fig.suptitle(title, fontsize=10)
    return finish(fig, path)
