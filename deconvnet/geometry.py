"""Geometry from the graph the model actually runs: the receptive field of any unit (Fig. 2's input
patches, the projection crops of Sec. 2.1) and the region an input change reaches (Sec. 4.2's
occluder, Fig. 7).

One forward pass is traced at the torch-function level (``F.conv2d``, ``F.relu``, ``torch.cat``,
``Tensor.add_``, ...), with module hooks naming the outputs per call (``layer3.1.relu_1``), so
branches, residual additions, concatenations, reused modules and functional ops all appear as they
run. That traced graph (:func:`graph_of`, cached per model and input size) is the package's one
record of what a model runs: the layers it has (:func:`layer_calls`), their shapes, and the
geometry below; :func:`replay` reruns it on an image, keeping every op's output.

Per spatial axis, intervals of positions go down the graph (receptive field: the union over all
paths) or up it (affected region), through convolutions (stride, padding, dilation, per axis),
max/avg pools, adaptive pools, and ops that act per position (ReLU and other activations, eval-mode
BatchNorm, LRN, dropout, additions, products, channel concatenations; a size-1 map broadcast over a
larger one, as in squeeze-excitation, reaches all of it). Whatever else the signal passes (a reshape,
a permute, an upsampling) the geometry does not guess about: a unit's box is then measured as the
support of its input gradient over random inputs, and a warning says so.
"""
from __future__ import annotations

import math
import operator
import warnings
import weakref
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

from .errors import UserError
from .probe import LayerCall, hooks, input_channels, module_calls, resolve

Interval = tuple[int, int]  # inclusive (lo, hi) along one axis

POINTWISE = {  # act on each position alone (channel mixing allowed): the map's geometry is unchanged
    "relu", "relu_", "relu6", "hardtanh", "hardtanh_", "silu", "gelu", "hardswish", "hardsigmoid", "sigmoid",
    "sigmoid_", "tanh", "tanh_", "elu", "elu_", "leaky_relu", "leaky_relu_", "mish", "softplus", "selu", "celu",
    "threshold", "threshold_", "batch_norm", "dropout", "dropout2d", "alpha_dropout", "feature_alpha_dropout",
    "local_response_norm", "contiguous", "clone", "detach", "neg", "abs", "clamp", "clamp_", "clamp_min",
    "clamp_min_", "add", "add_", "__add__", "__radd__", "__iadd__", "sub", "sub_", "__sub__", "__rsub__",
    "__isub__", "mul", "mul_", "__mul__", "__rmul__", "__imul__", "div", "div_", "__truediv__", "__rtruediv__",
    "__itruediv__", "pow", "pow_", "__pow__", "__rpow__", "sqrt", "rsqrt", "exp", "log", "square", "reciprocal",
    "to", "float", "type_as", "cat", "concat", "concatenate",
}
_RANDOM_IN_TRAINING = {"batch_norm", "dropout", "dropout2d", "alpha_dropout", "feature_alpha_dropout"}
_SIGNATURES = {
    "conv2d": ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
    "max_pool2d": ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"),
    "avg_pool2d": ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"),
    "batch_norm": ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"),
    "dropout": ("input", "p", "training", "inplace"),
    "cat": ("tensors", "dim"),
}
_DEFAULTS = {"stride": None, "padding": 0, "dilation": 1, "ceil_mode": False, "return_indices": False,
             "count_include_pad": True, "divisor_override": None, "dim": 0}


@dataclass(frozen=True)
class Ref:
    """A traced tensor in a node's arguments: the output of node ``index``."""

    index: int


@dataclass(frozen=True)
class Window:
    """A conv or pool along one axis: kernel, stride, padding before the first position, dilation."""

    kernel: int
    stride: int
    padding: int
    dilation: int = 1

    @property
    def span(self) -> int:
        return self.dilation * (self.kernel - 1) + 1

    def down(self, lo: int, hi: int) -> Interval:
        """Input positions under outputs ``lo..hi`` (padding positions included)."""
        return lo * self.stride - self.padding, hi * self.stride - self.padding + self.span - 1

    def up(self, lo: int, hi: int) -> Interval:
        """Outputs whose window holds an input position in ``lo..hi`` (the hull)."""
        return -((self.span - 1 - self.padding - lo) // self.stride), (hi + self.padding) // self.stride


@dataclass
class Node:
    """One traced op: ``func(*args, **kwargs)`` with :class:`Ref` for traced tensors.

    ``kind``: ``input``; ``window`` (conv/pool, ``axes`` one :class:`Window` per spatial axis);
    ``adaptive`` (adaptive pool); ``pointwise``; or ``unknown`` (the geometry cannot reason about it).
    ``fill``: the value a window op's padding holds (0 for conv and counted avg-pool padding, -inf
    for max-pool), None when the op cannot be computed on a pre-padded window.
    """

    index: int
    func: Any
    args: tuple
    kwargs: dict
    inputs: tuple[int, ...]
    shape: tuple | None
    kind: str = "unknown"
    axes: tuple | None = None
    fill: float | None = None
    inplace: bool = False
    names: list[str] = field(default_factory=list)
    value: torch.Tensor | None = None

    @property
    def spatial(self) -> bool:
        return self.shape is not None and len(self.shape) == 4

    def describe(self) -> str:
        name = getattr(self.func, "__name__", repr(self.func))
        return f"{name} ({self.names[0]})" if self.names else name


@dataclass(frozen=True)
class Call:
    """A module call of the traced pass whose output is a tensor: its per-call ``name``, the
    ``module``'s own name (as ``named_modules`` gives it) and class name ``type``, the output's
    ``shape`` (batch dimension included), and ``node``, the node that output is (None where it is not
    a traced tensor, e.g. a constant the module made)."""

    name: str
    module: str
    type: str
    shape: tuple
    node: int | None


@dataclass
class Graph:
    """The traced forward pass: nodes in execution order (node 0 the input), per-call layer names,
    the output node (None where the model's output is not a traced tensor), and every module call
    whose output is a tensor, in the order the calls returned."""

    nodes: list[Node]
    names: dict[str, int]
    output: int | None
    calls: list[Call] = field(default_factory=list)

    def node(self, model: nn.Module, layer: str) -> Node:
        """The node whose output is the layer called ``layer`` (per-call name)."""
        if layer not in self.names:
            resolve(model, layer)  # a one-line error for names the model does not have
            raise UserError(f"layer {layer!r} did not run in the forward pass, or its output is not a tensor "
                            "(see `deconvnet inspect`)")
        return self.nodes[self.names[layer]]


# ----------------------------------------------------------------------------- tracing

def _name(func) -> str:
    return getattr(func, "__name__", "")


def bound_arguments(name: str, args: tuple, kwargs: dict) -> dict:
    """The arguments of a traced call of ``name`` (``conv2d``, ``max_pool2d``, ``avg_pool2d``,
    ``batch_norm``, ``dropout``, ``cat``) by parameter name, the defaults filled in: what a node's
    ``args`` and ``kwargs`` mean, whether they came positionally or by keyword."""
    values = dict(_DEFAULTS)
    values.update(zip(_SIGNATURES[name], args))
    values.update(kwargs)
    return values


def _pair(v) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        return (int(v[0]), int(v[-1]))
    return (int(v), int(v))


def _classify(node: Node, nodes: list[Node]) -> None:
    """Set ``kind``, ``axes`` and ``fill`` of a traced op from its function and arguments."""
    name = _name(node.func)
    spatial_in = [nodes[i] for i in node.inputs]
    if not node.spatial or not spatial_in or not all(n.spatial for n in spatial_in):
        return
    b = bound_arguments(name, node.args, node.kwargs) if name in _SIGNATURES else {}
    if name in ("conv2d", "max_pool2d", "avg_pool2d"):
        if not isinstance(b["input"], Ref) or len(node.inputs) != 1:
            return
        if name == "conv2d":
            kernel, stride, dilation = b["weight"].shape[2:], _pair(b["stride"] or 1), _pair(b["dilation"])
            padding = b["padding"]
            if isinstance(padding, str):
                padding = (0, 0) if padding == "valid" else tuple(d * (k - 1) // 2 for k, d in zip(kernel, dilation))
            node.fill = 0.0
        else:
            kernel = _pair(b["kernel_size"])
            stride = _pair(b["stride"]) if b["stride"] not in (None, (), []) else kernel
            dilation = _pair(b["dilation"])
            if name == "max_pool2d":
                node.fill = None if b["return_indices"] else float("-inf")
            elif not b["ceil_mode"] and b["divisor_override"] is None and (b["count_include_pad"] or b["padding"] == 0):
                node.fill = 0.0
        padding = _pair(padding if name == "conv2d" else b["padding"])
        node.kind = "window"
        node.axes = tuple(Window(int(k), s, p, d) for k, s, p, d in zip(kernel, stride, padding, dilation))
    elif name in ("adaptive_avg_pool2d", "adaptive_max_pool2d"):
        node.kind = "adaptive"
        n_in, n_out = spatial_in[0].shape[2:], node.shape[2:]
        if all(i % o == 0 for i, o in zip(n_in, n_out)) and not (len(node.args) > 2 and node.args[2]):
            node.axes = tuple(Window(i // o, i // o, 0) for i, o in zip(n_in, n_out))  # = a plain pool
            node.fill = 0.0
    elif name in POINTWISE:
        signature = "batch_norm" if name == "batch_norm" else "dropout"
        if name in _RANDOM_IN_TRAINING and bound_arguments(signature, node.args, node.kwargs).get(
                "training", name != "batch_norm"):
            return  # batch statistics or random masks: not per position
        if name in ("cat", "concat", "concatenate"):
            dim = bound_arguments("cat", node.args, node.kwargs)["dim"]
            if dim % 4 in (0, 2, 3):
                return
        size = node.shape[2:]
        if all(all(s in (o, 1) for s, o in zip(n.shape[2:], size)) for n in spatial_in):
            node.kind = "pointwise"


class _Tracer(TorchFunctionMode):
    """Records every torch function whose arguments hold a traced tensor."""

    def __init__(self, keep_values: bool):
        super().__init__()
        self.nodes: list[Node] = []
        self.ids: dict[int, int] = {}
        self.alive: list = []  # traced tensors stay referenced, so no id is reused
        self.keep_values = keep_values

    def add(self, tensor: torch.Tensor, node: Node) -> None:
        node.shape = tuple(tensor.shape)
        if self.keep_values:
            node.value = tensor.detach().clone()  # as it is now, before any later in-place op
        self.ids[id(tensor)] = node.index
        self.alive.append(tensor)
        self.nodes.append(node)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        leaves, _ = tree_flatten((args, kwargs))
        inputs = tuple(dict.fromkeys(self.ids[id(a)] for a in leaves
                                     if isinstance(a, torch.Tensor) and id(a) in self.ids))
        if not inputs:
            return out
        to_ref = lambda a: Ref(self.ids[id(a)]) if isinstance(a, torch.Tensor) and id(a) in self.ids else a  # noqa: E731
        r_args, r_kwargs = tree_map(to_ref, args), tree_map(to_ref, kwargs)
        inplace = any(out is a for a in leaves if isinstance(a, torch.Tensor))
        if isinstance(out, torch.Tensor):
            node = Node(len(self.nodes), func, r_args, r_kwargs, inputs, None, inplace=inplace)
            self.add(out, node)
            try:
                _classify(node, self.nodes)
            except Exception:  # noqa: BLE001 - arguments the geometry does not follow: it says so
                node.kind, node.axes, node.fill = "unknown", None, None
        elif isinstance(out, (tuple, list)) and any(isinstance(o, torch.Tensor) for o in out):
            parent = Node(len(self.nodes), func, r_args, r_kwargs, inputs, None)
            self.nodes.append(parent)
            for i, o in enumerate(out):
                if isinstance(o, torch.Tensor):
                    self.add(o, Node(len(self.nodes), operator.getitem, (Ref(parent.index), i), {}, (parent.index,), None))
        return out


def trace(model: nn.Module, x: torch.Tensor, keep_values: bool = False) -> Graph:
    """Trace one forward pass of ``model`` on ``x`` (no grad). With ``keep_values`` every node keeps
    its output as it was produced (what incremental occlusion pastes around its windows; from a
    cached graph, :func:`replay` gives the same without hooking the model)."""
    return _with_output(_record(model, x, keep_values))


def _record(model: nn.Module, x: torch.Tensor, keep_values: bool) -> Graph:
    """The traced pass, whatever the model's output is (``output`` None where it is not a traced
    tensor)."""
    tracer = _Tracer(keep_values)
    names: dict[str, int] = {}
    calls: list[Call] = []
    modules = {id(m): n for n, m in model.named_modules()}

    def name_output(name, module, _inputs, output):
        if not isinstance(output, torch.Tensor):
            return
        index = tracer.ids.get(id(output))  # traced tensors stay alive: no other tensor has their id
        calls.append(Call(name, modules[id(module)], type(module).__name__, tuple(output.shape), index))
        if index is not None:
            tracer.nodes[index].names.append(name)
            names.setdefault(name, index)

    x = x.detach()
    tracer.add(x, Node(0, None, (), {}, (), None, kind="input"))
    with torch.no_grad(), hooks(module_calls(model, name_output)):
        with tracer:
            out = model(x)
    output = tracer.ids.get(id(out)) if isinstance(out, torch.Tensor) else None
    return Graph(tracer.nodes, names, output, calls)


def _with_output(graph: Graph) -> Graph:
    if graph.output is None:
        raise UserError("the model's output is not a tensor computed from its input; geometry needs one tensor")
    return graph


_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _hw(input_hw) -> tuple[int, int]:
    return (int(input_hw), int(input_hw)) if isinstance(input_hw, int) else (int(input_hw[0]), int(input_hw[1]))


def _version(t: torch.Tensor) -> int | None:
    """The tensor's in-place version counter (None for inference tensors, which have none)."""
    try:
        return t._version
    except RuntimeError:
        return None


def graph_of(model: nn.Module, input_hw, channels: int | None = None) -> Graph:
    """The traced graph (without values) for an input of ``input_hw`` (rows, cols) or a square size
    and ``channels`` (default :func:`probe.input_channels`), traced in eval mode on zeros; cached per
    model, input shape, module layout, and the identity, dtype, device and version (in-place
    changes) of its parameters and buffers: the graph's arguments hold tensors the forward pass
    used, so a replay of it computes with the weights as they are now. Not in the key: forward hooks
    (other threads' passes register and remove theirs while a model is shared). A
    :class:`UserError` where the model's output is not a tensor computed from its input."""
    return _with_output(_traced(model, input_hw, channels))


def _traced(model: nn.Module, input_hw, channels: int | None = None) -> Graph:
    """:func:`graph_of`'s cached trace, whatever the model's output is."""
    h, w = _hw(input_hw)
    channels = input_channels(model) if channels is None else int(channels)
    layout = tuple((n, id(m)) for n, m in model.named_modules())
    tensors = tuple((id(t), t.dtype, t.device, _version(t)) for t in [*model.parameters(), *model.buffers()])
    per_model = _CACHE.setdefault(model, {})
    key = (channels, h, w, layout, tensors)
    if key not in per_model:
        like = next(model.parameters(), torch.zeros(()))
        was_training = model.training
        model.eval()
        try:
            per_model.clear()
            with torch.inference_mode(False):  # constants made in the forward pass can take part in autograd
                per_model[key] = _record(model, torch.zeros(1, channels, h, w, dtype=like.dtype, device=like.device),
                                         keep_values=False)
        finally:
            model.train(was_training)
    return per_model[key]


def layer_calls(model: nn.Module, input_hw, channels: int | None = None) -> list[LayerCall]:
    """Every module call of the traced forward pass (:func:`graph_of`, at an input of ``input_hw``
    and ``channels``) whose output is a tensor, leaves and containers (``layer2``, ``features``)
    alike, in the order their outputs are produced: per-call name, module, class name, and output
    shape without the batch dimension."""
    modules = dict(model.named_modules())
    return [LayerCall(c.name, modules[c.module], c.type, c.shape[1:]) for c in _traced(model, input_hw, channels).calls]


def replay(graph: Graph, x: torch.Tensor) -> Graph:
    """The graph's ops run again on ``x`` (of the traced input's shape; no hooks, under the caller's
    grad mode), every node keeping its output as it was produced, as :func:`trace` with
    ``keep_values`` keeps them (in-place ops run on copies of their arguments, so no kept value and
    no tensor of the model changes). The ops are those traced: where the model's forward pass on
    ``x`` would run others (it branches on values, or reads a number out of a tensor), the replay
    does not follow it, so a caller that needs the model's own values compares the output with a
    forward pass."""
    if tuple(x.shape) != graph.nodes[0].shape:
        raise ValueError(f"the graph was traced on {graph.nodes[0].shape}, not {tuple(x.shape)}")
    last_use = {i: n.index for n in graph.nodes for i in n.inputs}
    outputs: dict[int, Any] = {0: x.detach()}
    nodes = [replace(graph.nodes[0], value=outputs[0].clone())]
    for node in graph.nodes[1:]:
        args, kwargs = tree_map(lambda a: outputs[a.index] if isinstance(a, Ref) else a, (node.args, node.kwargs))
        if node.inplace:
            args, kwargs = tree_map(lambda a: a.clone() if isinstance(a, torch.Tensor) else a, (args, kwargs))
        out = outputs[node.index] = node.func(*args, **kwargs)
        value = out.detach().clone() if node.shape is not None else None
        nodes.append(replace(node, value=value))
        for i in node.inputs:
            if last_use.get(i) == node.index:
                del outputs[i]
    return Graph(nodes, graph.names, graph.output, graph.calls)


def unpadded(node: Node, x: torch.Tensor, conv2d=F.conv2d) -> torch.Tensor:
    """The conv or pool of a ``window`` node over ``x``, a region of its input that already holds the
    padding (its ``fill``) where it reaches past the map: the node's kernel, stride and dilation, no
    padding of its own. ``x`` spans whole windows: ``(outputs - 1) * stride + span`` per axis.
    ``conv2d``: the function convolutions run with (``F.conv2d``'s signature)."""
    name = _name(node.func)
    kernel = tuple(a.kernel for a in node.axes)
    stride = tuple(a.stride for a in node.axes)
    dilation = tuple(a.dilation for a in node.axes)
    if name == "conv2d":
        b = bound_arguments(name, node.args, node.kwargs)
        return conv2d(x, b["weight"], b.get("bias"), stride, 0, dilation, b.get("groups", 1))
    if "max" in name:
        return F.max_pool2d(x, kernel, stride, 0, dilation)
    return F.avg_pool2d(x, kernel, stride, 0)


# ----------------------------------------------------------------------------- receptive fields

class UnknownGeometry(Exception):
    """A unit's cone passes ``node``, an op the geometry cannot reason about (a reshape, a permute, an
    upsampling, ...); the message describes it."""

    def __init__(self, node: Node):
        super().__init__(node.describe())
        self.node = node


def boxes_below(node: Node, nodes: list[Node], box: tuple[Interval, Interval],
                clip: bool) -> list[tuple[int, tuple]]:
    """``[(input node index, box)]``: the box of each of ``node``'s inputs that its outputs in ``box``
    ((rows, cols), inclusive) depend on, cut to the input's map with ``clip`` (inputs it does not
    reach left out) or with padding positions included without. :class:`UnknownGeometry` where
    ``node`` is an op the geometry cannot reason about."""
    if node.kind == "input":
        return []
    if node.kind == "unknown":
        raise UnknownGeometry(node)
    result = []
    for i in node.inputs:
        size_in, size_out = nodes[i].shape[2:], node.shape[2:]
        axes = []
        for axis, ((lo, hi), n_in, n_out) in enumerate(zip(box, size_in, size_out)):
            if node.kind == "window" or (node.kind == "adaptive" and node.axes is not None):
                lo, hi = node.axes[axis].down(lo, hi)
            elif node.kind == "adaptive":
                lo, hi = lo * n_in // n_out, -(-(hi + 1) * n_in // n_out) - 1
            elif n_in == 1 and n_out > 1:
                lo, hi = 0, 0
            if clip:
                lo, hi = max(lo, 0), min(hi, n_in - 1)
            axes.append((lo, hi))
        if all(lo <= hi for lo, hi in axes):
            result.append((i, tuple(axes)))
    return result


def unit_cone(graph: Graph, node: Node, y: int, x: int, clip: bool = True) -> tuple[dict, tuple | None]:
    """The cone of unit ``(y, x)`` of ``node``: ``({node index: box}, box in the input)``, each box
    ``((top, bottom), (left, right))`` (inclusive) the positions of that node's map the unit depends
    on, the union over every path (:func:`boxes_below`, ``clip`` as there); the input's box None
    where the unit does not depend on the input. :class:`UnknownGeometry` where the cone passes an
    op the geometry cannot reason about."""
    boxes = {node.index: ((y, y), (x, x))}
    for index in range(node.index, -1, -1):
        if index not in boxes:
            continue
        for i, box in boxes_below(graph.nodes[index], graph.nodes, boxes[index], clip):
            if i in boxes:
                (a, b), (c, d) = boxes[i]
                box = ((min(a, box[0][0]), max(b, box[0][1])), (min(c, box[1][0]), max(d, box[1][1])))
            boxes[i] = box
    return boxes, boxes.get(0)


def _spatial_node(graph: Graph, model: nn.Module, layer: str) -> Node:
    node = graph.node(model, layer)
    if not node.spatial:
        raise UserError(f"layer {layer!r} has no spatial units (output shape {node.shape[1:]}); "
                        "receptive fields are per position of a feature map")
    return node


def unit_box(model: nn.Module, layer: str, y: int, x: int, input_hw, clip: bool = True) -> tuple[int, int, int, int]:
    """The input box ``(top, left, bottom, right)`` (inclusive, inside the image) that unit ``(y, x)``
    of ``layer`` can see: the union over every path from the input, for an input of ``input_hw``
    (rows, cols) or a square size. Where the path holds an op the geometry cannot reason about, the
    box is the support of the unit's input gradient (measured, with a warning). ``clip=False``: the
    box before cutting it to the image (padding positions included; never measured)."""
    graph = graph_of(model, input_hw)
    node = _spatial_node(graph, model, layer)
    if not (0 <= y < node.shape[2] and 0 <= x < node.shape[3]):
        raise UserError(f"unit ({y}, {x}) is outside {layer}'s map of {node.shape[2]}x{node.shape[3]}")
    try:
        _, box = unit_cone(graph, node, y, x, clip)
    except UnknownGeometry as e:
        if not clip:
            raise UserError(f"geometry: {layer!r} depends on {e}, which it cannot reason about") from None
        warnings.warn(f"geometry: {layer!r} depends on {e} which it cannot reason about; the receptive field "
                      "is measured as the support of the input gradient", stacklevel=2)
        return measured_box(model, layer, y, x, input_hw)
    if box is None:
        raise UserError(f"unit ({y}, {x}) of {layer!r} does not depend on the input")
    (top, bottom), (left, right) = box
    return top, left, bottom, right


def measured_box(model: nn.Module, layer: str, y: int, x: int, input_hw, samples: int = 4) -> tuple[int, int, int, int]:
    """The support of the gradient of unit ``(y, x)`` of ``layer`` (all its channels) with respect to
    the input, over ``samples`` random inputs: the box of the pixels that moved it."""
    from .probe import apply_at

    h, w = _hw(input_hw)
    was_training = model.training
    model.eval()
    try:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        gen = torch.Generator().manual_seed(0)
        with torch.inference_mode(False), torch.enable_grad():  # also when called under inference mode (topk_pass)
            x_in = torch.randn(samples, input_channels(model), h, w, generator=gen).to(device).requires_grad_(True)
            out = apply_at(model, x_in, layer, lambda _n, o: o)[layer]
            (grad,) = torch.autograd.grad(out[:, :, y, x].pow(2).sum(), x_in)
    finally:
        model.train(was_training)
    rows = grad.abs().sum((0, 1, 3)).nonzero().flatten()
    cols = grad.abs().sum((0, 1, 2)).nonzero().flatten()
    if len(rows) == 0:
        raise UserError(f"unit ({y}, {x}) of {layer!r} does not depend on the input")
    return int(rows[0]), int(cols[0]), int(rows[-1]), int(cols[-1])


def layer_field(model: nn.Module, layer: str, input_hw) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """``((rows, cols), (stride_rows, stride_cols))``: the receptive field size of a unit of ``layer``
    away from the borders (padding included) and the step between neighbouring units, in input
    pixels; None when the layer has no spatial units or the geometry cannot reason about its path."""
    graph = graph_of(model, input_hw)
    node = graph.node(model, layer)
    if not node.spatial:
        return None
    y, x = node.shape[2] // 2, node.shape[3] // 2
    try:
        _, box = unit_cone(graph, node, y, x, clip=False)
        _, step_y = unit_cone(graph, node, min(y + 1, node.shape[2] - 1), x, clip=False)
        _, step_x = unit_cone(graph, node, y, min(x + 1, node.shape[3] - 1), clip=False)
    except UnknownGeometry:
        return None
    if box is None:
        return None
    size = (box[0][1] - box[0][0] + 1, box[1][1] - box[1][0] + 1)
    stride = (step_y[0][0] - box[0][0] or stride_of(graph, node)[0], step_x[1][0] - box[1][0] or stride_of(graph, node)[1])
    return size, stride


def stride_of(graph: Graph, node: Node, fixed: bool = False) -> tuple[int, int] | None:
    """The total stride (input pixels per position) of ``node``'s map along rows and columns: the
    least common multiple over the paths (an input of its own when they disagree).

    A map's stride is a multiple of the strides of every map below it, so it is also the least
    common multiple over the whole cone of any of its units: a crop whose origin is a multiple of it
    lines up every window of the cone with the full image's. ``fixed``: None where a path from the
    input passes an op with no fixed stride (an adaptive pool with uneven bins), which no crop lines
    up; without, such an op counts as stride 1."""
    strides: dict[int, tuple[int, int] | None] = {0: (1, 1)}
    for n in graph.nodes[1:node.index + 1]:
        if not n.spatial:
            continue
        below = [strides[i] for i in n.inputs if i in strides and graph.nodes[i].spatial]
        if not below:
            continue
        if fixed and (None in below or (n.kind == "adaptive" and n.axes is None)):
            strides[n.index] = None
            continue
        s = tuple(math.lcm(*(b[a] for b in below)) for a in range(2))
        if n.kind in ("window", "adaptive") and n.axes is not None:
            s = tuple(v * w.stride for v, w in zip(s, n.axes))
        strides[n.index] = s
    return strides.get(node.index, (1, 1))


# ----------------------------------------------------------------------------- the region an input change reaches

def reach(graph: Graph, rows: Interval, cols: Interval) -> dict[int, tuple[Interval | None, Interval | None]]:
    """Per node, the rows and columns of its map that can change when input rows ``rows`` x columns
    ``cols`` change (None along an axis: nothing changes). The forward direction of the receptive
    field; ops the geometry cannot reason about change all of their output."""
    result: dict[int, tuple] = {0: (rows, cols)}
    for node in graph.nodes[1:]:
        ins = [(i, result[i]) for i in node.inputs if i in result]
        ins = [(i, box) for i, box in ins if box[0] is not None and box[1] is not None]
        if not ins:
            continue
        if not node.spatial:
            result[node.index] = ((0, 0), (0, 0))  # changed as a whole
            continue
        axes = []
        for axis in range(2):
            n_out = node.shape[2 + axis]
            lo, hi = n_out, -1
            for i, box in ins:
                n_in = graph.nodes[i].shape[2 + axis] if graph.nodes[i].spatial else None
                a, b = box[axis]
                if node.kind == "window" or (node.kind == "adaptive" and node.axes is not None):
                    a, b = node.axes[axis].up(a, b)
                elif node.kind == "adaptive":
                    a = next(o for o in range(n_out) if -(-(o + 1) * n_in // n_out) - 1 >= a)
                    b = max(o for o in range(n_out) if o * n_in // n_out <= b)
                elif node.kind != "pointwise" or n_in != n_out:
                    a, b = 0, n_out - 1  # unknown ops and broadcasts reach all of the map
                lo, hi = min(lo, max(a, 0)), max(hi, min(b, n_out - 1))
            axes.append((lo, hi) if lo <= hi else None)
        result[node.index] = tuple(axes)
    return result

