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

Speed: a unit depends only on its cone, the positions of every map below it that reach it
(:mod:`geometry`, from the traced graph: the receptive field layer by layer). So a projection replays
the traced graph over the cone alone: each op computes just the box of its map the unit depends on,
convolutions and pools unpadded over a region of their input in which positions past the map's border
hold the padding value, so every value and switch is the full image's; many (image, unit) pairs go
through in one batch. Where the cone cannot be replayed (an op the geometry does not follow, a map
broadcast over another, a pool that hides its padding) the receptive-field crop of the input runs
through the model instead, or else the full image.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils._pytree import tree_map

from .errors import UserError
from .geometry import (Graph, Node, Ref, UnknownGeometry, boxes_below, graph_of, stride_of, unit_cone,
                       unpadded)
from .probe import apply_at, hooks, module_calls, resolve
from .runner import model_device
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


class _ImageConv(torch.autograd.Function):
    """``F.conv2d`` (no padding, no dilation, one group) whose input gradient is ATen's im2col kernel:
    on CPU, oneDNN's is about 3x slower when the input has an image's few channels (BENCHMARKS.md)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias, stride) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.stride = stride
        return F.conv2d(x, weight, bias, stride)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x = torch.ops.aten._slow_conv2d_backward.output_mask(
            grad, x, weight, weight.shape[2:], ctx.stride, (0, 0), (True, False, False))[0]
        return grad_x, None, None, None


_HAS_SLOW_CONV = hasattr(torch.ops.aten, "_slow_conv2d_backward")  # a private ATen op: used only where present


def _image_conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1) -> torch.Tensor:
    """``F.conv2d`` for the convolution that reads the image: :class:`_ImageConv` where it applies."""
    if (x.device.type == "cpu" and x.shape[1] <= 4 and padding == 0 and groups == 1 and tuple(dilation) == (1, 1)
            and _HAS_SLOW_CONV):
        return _ImageConv.apply(x, weight, bias, stride)
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)


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


@dataclass(frozen=True)
class Projection:
    """What :meth:`Deconvnet.projection` returns: the projections and how they were computed.

    ``values``: (N, C, H, W), as :meth:`Deconvnet.project` returns them. ``method``: the strategy
    that ran, ``"cone"``, ``"crop: WHY"`` or ``"full image: WHY"``, WHY being the reason the cone did
    not apply (module docstring)."""

    values: torch.Tensor
    method: str


class Deconvnet:
    """Projects activations of ``model`` down to its input pixels (Zeiler & Fergus 2014, Sec. 2.1).

    Preconditions: ``model`` is in eval mode. Max-pool backward is the unpooling with switches;
    ``nn.LocalResponseNorm`` passes the signal down unchanged; every ReLU call the signal passes gets
    the rule. ``other_activations``: ``"error"`` (default) refuses a projection through an activation
    the paper has no rule for, naming it; ``"gradient"`` lets such activations act as they do in
    back-propagation (the rule still applies at every ReLU).

    :meth:`projection` also says how a projection ran (:class:`Projection`); the object holds no
    state between calls. The cone replays the model's traced forward pass
    (:func:`geometry.graph_of`, cached per input size while the modules and weights stay the same),
    so a forward hook added after the first projection at that size does not act in it.
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

        Each unit runs forward and backward over its cone alone (module docstring), with the values
        and switches of the full image, so the result is the full image's. Where the cone does not
        apply, over the crop of the input under its receptive field (the union over all paths of the
        traced graph), the crop's origin a multiple of every total stride in the unit's cone so that
        every window and switch lines up with the full image. Where the geometry cannot vouch for
        either (an op it cannot reason about, uneven adaptive pools, a field as large as the image)
        the full image runs. :meth:`projection` says which.
        """
        return self.projection(images, layer, units, rule).values

    def projection(self, images: torch.Tensor, layer: str, units, rule: str = "deconvnet") -> Projection:
        """:meth:`project`'s projections with the strategy that computed them (:class:`Projection`)."""
        return self.projections(images, layer, units, (rule,))[rule]

    def projections(self, images: torch.Tensor, layer: str, units, rules=RULES) -> dict[str, Projection]:
        """:meth:`projection` for several rules at once: one forward pass, one pass down per rule
        (the rules differ only on the way down, Sec. 2.1). ``{rule: Projection}``, each equal to
        ``projection(images, layer, units, rule)``."""
        rules = tuple(dict.fromkeys(rules))
        for rule in rules:
            if rule not in RULES:
                raise UserError(f"unknown rule {rule!r}; use one of {', '.join(RULES)}")
        if not rules:
            raise UserError(f"no rule given; use some of {', '.join(RULES)}")
        if self.model.training:
            raise UserError("the model is in training mode; call model.eval() before projecting")
        resolve(self.model, layer)
        if images.dim() != 4:
            raise UserError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
        units = [tuple(int(v) for v in u) for u in units]
        if len(units) != len(images):
            raise UserError(f"{len(units)} units for {len(images)} images; give one (channel, y, x) per image")
        request = _Request(self.model, layer, rules, self.other_activations)
        given = images.device  # the projections go back where the images came from
        images = images.to(model_device(self.model))

        def result(values: torch.Tensor, method: str) -> dict[str, Projection]:
            return {rule: Projection(v.to(given), method) for rule, v in zip(rules, values)}

        why = "the layer has no spatial units"
        if units and all(len(u) == 3 for u in units):
            try:
                return result(_project_cone(request, images, units), "cone")
            except _NoCone as e:
                why = str(e)
            values = _project_crops(request, images, units)
            if values is not None:
                return result(values, f"crop: {why}")
        return result(_project_full_image(request, images, units), f"full image: {why}")


@dataclass(frozen=True)
class _Request:
    """What the three strategies share: the model, the (per-call) layer projected from, the rules, and
    what activations the paper has no rule for do (:class:`Deconvnet`)."""

    model: nn.Module
    layer: str
    rules: tuple[str, ...] = ("deconvnet",)
    other_activations: str = "error"

    def run(self, x: torch.Tensor, units: list[tuple], crop: bool = False) -> torch.Tensor | None:
        """One forward pass through the model itself and one pass down per rule: (rules, N, C, H, W).
        On a crop (``crop``): None if a unit falls outside the map."""
        x = x.detach().clone().requires_grad_(True)  # a leaf of our own (also from inference-mode tensors)
        names: dict = {}  # autograd node -> per-call name of the module whose output it made

        def on_output(name, module, inputs, output):
            if not isinstance(output, torch.Tensor) or output.grad_fn is None:
                return None
            if isinstance(module, nn.LocalResponseNorm):  # no contrast normalisation on the way down
                output = _SkipBackward.apply(inputs[0], output.detach())
            names.setdefault(output.grad_fn, name)
            return output

        with torch.enable_grad(), hooks(module_calls(self.model, on_output)):
            out = apply_at(self.model, x, self.layer, lambda _name, output: output)[self.layer]  # in the graph
            for u in units:
                if len(u) != out.dim() - 1 or not all(0 <= v < s for v, s in zip(u, out.shape[1:])):
                    if crop:
                        return None
                    raise UserError(f"unit {u} is outside {self.layer}'s output of shape {tuple(out.shape[1:])}")
            return self.down(out, x, units, names)

    def down(self, out: torch.Tensor, x: torch.Tensor, units: list[tuple], names: dict) -> torch.Tensor:
        """The passes down from ``out`` (N, ...), the layer's output computed from the leaf ``x``, one
        per rule: (rules, N, ...) like ``x``. The seed is each unit's own value, every ReLU on the way
        gets the rule. ``names``: autograd node -> layer name, for errors."""
        layer = self.layer
        if out.grad_fn is None:
            raise UserError(f"{layer!r} does not depend on the input")
        index = (torch.arange(len(x)), *zip(*units))
        seed = torch.zeros_like(out)
        seed[index] = out.detach()[index]
        with torch.enable_grad():
            on_path = [node for node, leads in _leads_to(out.grad_fn, x).items() if leads]
        relus = [n for n in on_path if n.name() in _RELU_NODES]
        grads = []
        for i, rule in enumerate(self.rules):
            node_handles: list = []
            with torch.enable_grad(), hooks(node_handles):
                if rule != "gradient":
                    others = [n for n in on_path if _other_kind(n)]
                    if others and self.other_activations == "error":
                        first = max(others, key=lambda n: n._sequence_nr())  # the first the signal meets going down
                        raise UserError(f"the signal from {layer!r} passes a {_other_kind(first)} at {_where(first, names)}, "
                                        f"which the paper has no {rule} rule for; use --rule gradient, or treat such "
                                        "activations as the gradient does (other_activations='gradient')")
                    hook = _relu_hook(rule)
                    node_handles.extend(n.register_hook(hook) for n in relus)
                # the graph of the one forward pass serves every rule: kept until the last
                (grad,) = torch.autograd.grad(out, x, seed, retain_graph=i < len(self.rules) - 1)
            grads.append(grad)
        return torch.stack(grads)


# ----------------------------------------------------------------------------- the cone

def _project_cone(request: _Request, images: torch.Tensor, units: list[tuple]) -> torch.Tensor:
    """Projections computed over the units' cones, (rules, N, C, H, W); :class:`_NoCone` where the cone
    does not apply."""
    plan = _Cone.plan(request.model, images, request.layer, units)
    result = images.new_zeros(len(request.rules), *images.shape)
    (top, bottom), (left, right) = plan.margin
    (sy, sx), origins = plan.size[0], plan.origin[0].tolist()
    for start in range(0, len(units), _CHUNK):
        chunk = range(start, min(start + _CHUNK, len(units)))
        padded = F.pad(images[start:chunk.stop], (left, right, top, bottom))
        x = torch.stack([padded[i - start, :, origins[i][0] + top:origins[i][0] + top + sy,
                                origins[i][1] + left:origins[i][1] + left + sx] for i in chunk])
        x = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_(True)  # faster pools
        with torch.enable_grad():
            out, names = plan.forward(x, chunk)
            grads = request.down(out, x, [(units[i][0], 0, 0) for i in chunk], names)
        for k, i in enumerate(chunk):  # paste the part inside the image
            y0, x0 = origins[i]
            y1, x1 = min(y0 + sy, images.shape[2]), min(x0 + sx, images.shape[3])
            result[:, i, :, max(y0, 0):y1, max(x0, 0):x1] = grads[:, k, :, max(-y0, 0):y1 - y0, max(-x0, 0):x1 - x0]
    return result


class _NoCone(Exception):
    """The cone cannot be replayed for these units; the message says why."""


@dataclass
class _Cone:
    """A cone pass planned for units of one layer: the traced ops under the layer that reach the units,
    in execution order, each over a box of its map of the same size for every unit.

    ``size[i]``: the box's (rows, cols) at node ``i``; ``origin[i]``: (N, 2) its first row and column
    per unit (negative, or past the map, where the cone reaches past a border); ``cut[i, j]``: the
    region of input ``j``'s box that node ``i`` reads (row offset, col offset, rows, cols);
    ``inside[i]``: (N, 1, rows, cols), which positions of that region lie inside the input's map, for
    the window ops whose region reaches past it; ``skip``: the contrast normalisations (passed
    unchanged on the way down); ``margin``: ((top, bottom), (left, right)) padding of the images
    that holds every unit's input box.
    """

    nodes: list[Node]
    output: int
    size: dict[int, tuple[int, int]]
    origin: dict[int, torch.Tensor]
    cut: dict[tuple[int, int], tuple[int, int, int, int]]
    inside: dict[int, torch.Tensor]
    skip: set[int]
    margin: tuple

    @staticmethod
    def plan(model: nn.Module, images: torch.Tensor, layer: str, units: list[tuple]) -> _Cone:
        """The cone pass for ``units`` (channel, y, x) of ``layer``, one per image; :class:`_NoCone`
        where it does not apply."""
        try:
            graph = graph_of(model, tuple(images.shape[-2:]))
        except Exception as e:  # noqa: BLE001 - a model the tracer cannot follow runs otherwise
            raise _NoCone(f"the model cannot be traced ({type(e).__name__})") from None
        if layer not in graph.names or not graph.nodes[graph.names[layer]].spatial:
            raise _NoCone(f"{layer!r} is not a traced feature map")
        top = graph.nodes[graph.names[layer]]
        per_position: dict[tuple[int, int], tuple] = {}
        for c, y, x in units:
            if not (0 <= c < top.shape[1] and 0 <= y < top.shape[2] and 0 <= x < top.shape[3]):
                raise _NoCone(f"unit ({c}, {y}, {x}) is outside the map")  # the full image says so
            if (y, x) not in per_position:
                per_position[y, x] = _Cone._boxes(graph, top, y, x)
        boxes, cuts = next(iter(per_position.values()))
        size = {i: (b[0][1] - b[0][0] + 1, b[1][1] - b[1][0] + 1) for i, b in boxes.items()}
        for i, (rows, cols) in size.items():  # past both borders of a map the cone costs more than the image
            if rows > graph.nodes[i].shape[2] or cols > graph.nodes[i].shape[3]:
                where = "the input" if i == 0 else graph.nodes[i].describe()
                raise _NoCone(f"the cone is larger than the map of {where} (the field is larger than the image)")
        for other, other_cuts in per_position.values():  # one batch needs one shape per node
            if other_cuts != cuts or {i: (b[0][1] - b[0][0] + 1, b[1][1] - b[1][0] + 1) for i, b in other.items()} != size:
                raise _NoCone("the cone's boxes differ in shape between units")
        origin = {i: torch.tensor([[per_position[y, x][0][i][0][0], per_position[y, x][0][i][1][0]] for _, y, x in units])
                  for i in boxes}
        nodes = [graph.nodes[i] for i in sorted(boxes) if i > 0]
        inside = {}
        for n in nodes:
            if n.kind == "pointwise":
                continue
            j = n.inputs[0]
            dy, dx, rows, cols = cuts[n.index, j]
            at_rows = origin[j][:, :1] + dy + torch.arange(rows)  # (N, rows): positions in j's map
            at_cols = origin[j][:, 1:] + dx + torch.arange(cols)
            ok_rows = (at_rows >= 0) & (at_rows < graph.nodes[j].shape[2])
            ok_cols = (at_cols >= 0) & (at_cols < graph.nodes[j].shape[3])
            if not (ok_rows.all() and ok_cols.all()):
                inside[n.index] = (ok_rows[:, None, :, None] & ok_cols[:, None, None, :]).to(images.device)
        skip = {n.index for n in nodes
                if any(isinstance(resolve(model, name)[0], nn.LocalResponseNorm) for name in n.names)}
        (h, w), corner = size[0], origin[0]
        margin = ((max(0, -int(corner[:, 0].min())), max(0, int(corner[:, 0].max()) + h - images.shape[2])),
                  (max(0, -int(corner[:, 1].min())), max(0, int(corner[:, 1].max()) + w - images.shape[3])))
        return _Cone(nodes, top.index, size, origin, cuts, inside, skip, margin)

    @staticmethod
    def _boxes(graph: Graph, top: Node, y: int, x: int) -> tuple[dict, dict]:
        """Unit (y, x) of ``top``: its cone's box per node (padding positions included) and where
        each op reads each input inside that input's box."""
        try:
            boxes, _ = unit_cone(graph, top, y, x, clip=False)
            cuts = {}
            for i in sorted(boxes):
                n = graph.nodes[i]
                if i == 0:
                    continue
                if n.kind not in ("window", "adaptive", "pointwise") or (n.kind != "pointwise" and n.fill is None):
                    raise _NoCone(f"the cone holds {n.describe()}, which runs on whole maps or hides its padding")
                if n.kind == "pointwise" and any(graph.nodes[j].shape[2:] != n.shape[2:] for j in n.inputs):
                    raise _NoCone(f"{n.describe()} broadcasts one map over another")
                for j, ((top_, bottom), (left, right)) in boxes_below(n, graph.nodes, boxes[i], clip=False):
                    cuts[i, j] = (top_ - boxes[j][0][0], left - boxes[j][1][0], bottom - top_ + 1, right - left + 1)
        except UnknownGeometry as e:
            raise _NoCone(f"the cone holds {e}, which the geometry does not follow") from None
        return boxes, cuts

    def forward(self, x: torch.Tensor, chunk: range) -> tuple[torch.Tensor, dict]:
        """Replay the cone on input boxes ``x`` (B, C, rows, cols) of units ``chunk``: the layer's output
        (B, C', 1, 1) and, per autograd node, the layer name it belongs to."""
        values, names = {0: x}, {}
        for n in self.nodes:
            def read(a, n=n):  # a traced argument -> the region of its box this op reads
                if not isinstance(a, Ref):
                    return a
                t, (dy, dx, rows, cols) = values[a.index], self.cut[n.index, a.index]
                return t if (dy, dx, rows, cols) == (0, 0, *t.shape[2:]) else t[:, :, dy:dy + rows, dx:dx + cols]

            if n.kind == "pointwise":
                args, kwargs = tree_map(read, n.args), tree_map(read, n.kwargs)
                try:
                    if n.index in self.skip:  # no contrast normalisation on the way down
                        with torch.no_grad():
                            out = n.func(*args, **kwargs)
                        out = _SkipBackward.apply(read(Ref(n.inputs[0])), out)  # the map normalised
                    else:
                        out = n.func(*args, **kwargs)
                except RuntimeError as e:
                    raise _NoCone(f"{n.describe()} cannot run on its box ({str(e).splitlines()[0]})") from None
            else:
                region = read(Ref(n.inputs[0]))
                if n.index in self.inside:  # past the map's border: the padding value
                    fill = torch.tensor(n.fill, dtype=region.dtype, device=region.device)
                    region = torch.where(self.inside[n.index][chunk.start:chunk.stop], region, fill)
                out = unpadded(n, region, _image_conv2d if n.inputs[0] == 0 else F.conv2d)
            if not isinstance(out, torch.Tensor) or out.shape[0] != len(x) or tuple(out.shape[2:]) != self.size[n.index]:
                raise _NoCone(f"{n.describe()} did not keep its box")
            values[n.index] = out
            if n.names and out.grad_fn is not None:
                names.setdefault(out.grad_fn, n.names[0])
        return values[self.output], names


# ----------------------------------------------------------------------------- receptive-field crops

def _project_crops(request: _Request, images: torch.Tensor, units: list[tuple]) -> torch.Tensor | None:
    """Projections computed on receptive-field crops, (rules, N, C, H, W); None where the full image must
    run."""
    plan = _crop_plan(request.model, images, request.layer, units)
    if plan is None:
        return None
    crop_h, crop_w, origins, (sy, sx) = plan
    result = images.new_zeros(len(request.rules), *images.shape)
    for start in range(0, len(units), _CHUNK):
        chunk = range(start, min(start + _CHUNK, len(units)))
        crops = torch.stack([images[i, :, origins[i][0]:origins[i][0] + crop_h,
                                    origins[i][1]:origins[i][1] + crop_w] for i in chunk])
        crop_units = [(units[i][0], units[i][1] - origins[i][0] // sy, units[i][2] - origins[i][1] // sx)
                      for i in chunk]
        grads = request.run(crops, crop_units, crop=True)
        if grads is None:
            return None
        for k, i in enumerate(chunk):
            result[:, i, :, origins[i][0]:origins[i][0] + crop_h, origins[i][1]:origins[i][1] + crop_w] = grads[:, k]
    return result


def _crop_plan(model: nn.Module, images: torch.Tensor, layer: str, units: list[tuple]) -> tuple | None:
    """``(crop_h, crop_w, origins, stride)`` for the units, or None where the full image must run."""
    h, w = images.shape[-2:]
    try:
        graph = graph_of(model, (h, w))
    except Exception:  # noqa: BLE001 - a model the tracer cannot follow runs on the full image
        return None
    node = graph.nodes[graph.names[layer]] if layer in graph.names else None
    if node is None or not node.spatial:
        return None
    stride = stride_of(graph, node, fixed=True)  # every map of a unit's cone lines up at a multiple of it
    if stride is None:
        return None  # an adaptive pool with uneven bins: no crop lines up with the full image
    fields = []
    try:
        for _, y, x in units:
            if not (0 <= y < node.shape[2] and 0 <= x < node.shape[3]):
                return None  # the full image says why
            _, box = unit_cone(graph, node, y, x, clip=False)
            if box is None:
                return None
            fields.append(box)
    except UnknownGeometry:
        return None
    centre = unit_cone(graph, node, node.shape[2] // 2, node.shape[3] // 2, clip=False)[1]
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


# ----------------------------------------------------------------------------- the full image

def _project_full_image(request: _Request, images: torch.Tensor, units: list[tuple]) -> torch.Tensor:
    """Projections computed by passes of the whole images through the model, ``_CHUNK`` at a time:
    (rules, N, C, H, W)."""
    return torch.cat([request.run(images[i:i + _CHUNK], units[i:i + _CHUNK]) for i in range(0, len(images), _CHUNK)], 1)


def project(model, images, layer: str | None = None, units=None, rule: str = "deconvnet") -> torch.Tensor:
    """Sec. 2.1 for a Python caller, as ``deconvnet project`` does it: one unit per image of ``layer``
    projected to pixels.

    Args:
        model: the model under study (:class:`~deconvnet.subject.Subject`), or an ``nn.Module``
            wrapped by :func:`~deconvnet.subject.as_subject`.
        images: image files or uint8 pixels (N, C, H, W), preprocessed by the model's preprocessing;
            or a float tensor, the model's input as it is (:meth:`Subject.inputs`).
        layer: per-call layer name; default the model's top stage (``conv5`` for ours).
        units: ``(channel, y, x)`` per image; default each image's strongest activation of ``layer``.
        rule: ``deconvnet`` (Sec. 2.1), ``guided`` or ``gradient``.

    Returns:
        (N, C, H, W) projections in the model's input space, on the CPU (draw one with
        :func:`draw_projection`).
    """
    from ._analysis import eval_mode, strongest_units
    from .probe import activations
    from .subject import as_subject

    subject = as_subject(model, like=images)
    pixels, to_input = subject.inputs(images)
    x = to_input(pixels)
    layer = subject.layers(layer)[-1]
    with eval_mode(subject.model):
        if units is None:
            with torch.no_grad():
                maps = activations(subject.model, x, layer)[layer].cpu()
            if maps.dim() != 4:
                raise UserError(f"layer {layer!r} has no feature maps; give units=[(channel,), ...]")
            units = [strongest_units(m)[0] for m in maps]
        return Deconvnet(subject.model, subject.other_activations).project(x.cpu(), layer, units, rule)


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
