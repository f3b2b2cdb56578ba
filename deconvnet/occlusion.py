"""Occlusion sensitivity (Sec. 4.2, Fig. 7): slide a grey square over the image and record, for every
position, (b) the total activation of the feature map that is strongest on the unoccluded image,
(d) the probability of the correct class and (e) the most probable label; (c) is the deconvnet
projection of that map's strongest activation.

Exact and incremental, as in Krypton (Nakandala et al., SIGMOD 2019), on any graph the model runs:
the unoccluded image runs once through the model's traced graph (:func:`geometry.replay`), keeping
every op's output; then, per
batch of squares, each op recomputes only the window of its map the square can reach
(:func:`geometry.reach`) and reads the clean activations elsewhere. Squares are batched with
others of similar reach (near a border a square reaches less), as a batch pays per square for its
largest window. Convolutions and pools run on
the window cut from their input, pre-padded as PyTorch pads it (zeros; ``-inf`` for max-pools, ceil
mode's tail included), with the changed window of the input pasted in; per-position ops (ReLU,
BatchNorm, residual additions, channel concatenations, ...) run on the union of their inputs'
windows. Ops the geometry does not follow (flatten, linear, uneven adaptive pools, ...) run on whole
maps. Two squares are checked against direct forward passes; where they differ, or the graph cannot
be replayed, every square runs as a forward pass of the occluded image (``method`` says which).
Panel (c) is an extra: where no projection can be made (an activation the paper has no rule for),
``projection`` is None and ``projection_missing`` says why.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import itertools
import textwrap
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_map

from ._analysis import callable_module, eval_mode, strongest_units, to_rgb
from .deconvnet import Deconvnet, contrast_stretch
from .errors import UserError
from .findings import Finding
from .geometry import Graph, Node, Ref, bound_arguments, graph_of, reach, replay, trace, unit_box, unpadded
from .probe import hooks, resolve
from .runner import model_device
from .figures import finish, heatmap_pixels, label_colors, new_figure

if TYPE_CHECKING:
    from matplotlib.figure import Figure

CHUNK = 128  # occluder positions per batch, at most
GROUPS = 2  # per axis, groups of square positions of similar reach batched together (4 batches)
OBJECT, BACKGROUND = 0.5, 0.1  # a square "covers the object" / "covers background" (fraction of object pixels)
CHECKED = 2  # squares checked against direct forward passes


@dataclass
class Occlusion:
    """Fig. 7 for one image. The maps hold one value per square position, shape (rows, cols);
    ``positions[i]`` is the (top, left) pixel of the square of cell ``i`` in row-major order."""

    activity: torch.Tensor  # (b) total activation of map ``feature`` of ``layer``
    probability: torch.Tensor  # (d) p(target)
    label: torch.Tensor  # (e) most probable class (int64)
    positions: list[tuple[int, int]]
    feature: int
    unit: tuple[int, int, int]  # (feature, y, x): the map's strongest activation, unoccluded
    receptive_field: tuple[int, int, int, int]  # input box (top, left, bottom, right) under ``unit``
    projection: torch.Tensor | None  # (c) deconvnet projection of ``unit``, (C, H, W); None: see below
    image: torch.Tensor  # (C, H, W), the model's input
    target: int
    layer: str
    size: int
    stride: int
    clean_activity: float
    clean_probability: float
    clean_label: int
    projection_missing: str | None = None  # why (c) could not be computed
    method: str = "incremental"  # or "direct: <why>"
    recomputed: float | None = None  # share of the forward pass's multiply-adds recomputed per square
    picture: torch.Tensor | None = None  # (C, H, W) in [0, 1]: the user's own pixels, for panel (a)
    classes: list[str] | None = None  # the model's class names, for the titles and the JSON


def occlude_image(model: nn.Module, image: torch.Tensor, target: int | None = None, size: int | None = None,
              stride: int | None = None, layer: str = "conv5", fill=None,
              other_activations: str = "error") -> Occlusion:
    """Occlusion maps of Fig. 7 for ``image`` (C, H, W), in the model's input space.

    Args:
        target: the class whose probability is mapped (d); default the prediction on the clean image.
        size, stride: the square's side and step in pixels; default the paper's 35 and 14 at 224 px,
            scaled to the image.
        layer: the (per-call) layer whose strongest feature map is followed in (b) and (c).
        fill: the square's value, a number or one per channel; default 0, the mean pixel after mean
            subtraction (the paper's grey).
        other_activations: for panel (c), as in :class:`Deconvnet` (``"error"``: no projection
            through ReLU6, SiLU, ...; ``"gradient"``: they act as in back-propagation).
    """
    if image.dim() != 3:
        raise UserError(f"occlusion takes one image (C, H, W), got shape {tuple(image.shape)}")
    channels, height, width = image.shape
    size = max(1, round(35 * height / 224)) if size is None else size
    stride = max(1, round(14 * height / 224)) if stride is None else stride
    if not 1 <= size <= min(height, width) or stride < 1:
        raise UserError(f"square size {size} must be in 1..{min(height, width)} and stride {stride} >= 1")
    fill = torch.zeros(channels) if fill is None else torch.as_tensor(fill, dtype=torch.float32).reshape(-1)
    device = model_device(model)  # runs where the model is; the result comes back on the CPU
    fill = fill.expand(channels).to(device, image.dtype)
    # from the top-left corner in steps of ``stride`` until every pixel is covered: the last row and
    # column of squares may be cut by the border (as in Captum's Occlusion)
    tops, lefts = range(0, height - size + stride, stride), range(0, width - size + stride, stride)
    positions = [(t, l) for t in tops for l in lefts]
    image = image.detach().to(device)
    resolve(model, layer)

    with eval_mode(model), torch.no_grad():
        graph = _clean_pass(model, image)
        node = graph.node(model, layer)
        if not node.spatial:
            raise UserError(f"layer {layer!r} has no feature maps (output shape {node.shape})")
        maps = node.value[0]
        feature, y, x = strongest_units(maps)[0]
        logits = graph.nodes[graph.output].value[0].flatten()
        target = int(logits.argmax()) if target is None else int(target)
        if not 0 <= target < len(logits):
            raise UserError(f"target class {target} is not in 0..{len(logits) - 1}")
        method, recomputed = "incremental", None
        try:
            if device.type != "cpu":  # many small window ops: a GPU runs the batched direct pass instead
                raise _Fallback(f"on {device.type}, batched forward passes of the occluded images")
            run = _Incremental(graph, node, feature, image, size, fill, positions)
            activity, scores = run.all()
            recomputed = run.recomputed()
            check = [0, len(positions) // 2][:CHECKED]
            a, s = _direct(model, image, [positions[i] for i in check], size, fill, layer, feature)
            scale = max(1.0, float(s.abs().max()))
            if not (torch.allclose(activity[check], a, rtol=1e-4, atol=1e-4 * max(1.0, float(a.abs().max())))
                    and torch.allclose(scores[check], s, rtol=1e-4, atol=1e-4 * scale)):
                raise _Fallback("the incremental pass differed from a direct forward pass")
        except _Fallback as e:
            method = f"direct: {e}"
            activity, scores = _direct(model, image, positions, size, fill, layer, feature)
        projection, missing = None, None
        try:
            projection = Deconvnet(model, other_activations).project(image[None], layer, units=[(feature, y, x)])[0]
        except UserError as e:
            missing = str(e)
    probs = torch.softmax(scores.float(), dim=1).cpu()
    grid = (len(tops), len(lefts))
    return Occlusion(
        activity=activity.cpu().reshape(grid), probability=probs[:, target].reshape(grid),
        label=probs.argmax(1).reshape(grid), positions=positions, feature=feature, unit=(feature, y, x),
        receptive_field=unit_box(model, layer, y, x, (height, width)),
        projection=None if projection is None else projection.cpu(), image=image.cpu(), target=target, layer=layer, size=size, stride=stride,
        clean_activity=float(maps[feature].sum()), clean_probability=float(torch.softmax(logits, 0)[target]),
        clean_label=int(logits.argmax()), projection_missing=missing, method=method, recomputed=recomputed)


def _clean_pass(model: nn.Module, image: torch.Tensor) -> Graph:
    """The model's graph with every op's output on the unoccluded ``image`` (C, H, W), in eval mode
    and without grad: the cached graph (:func:`geometry.graph_of`) replayed on the image, when the
    replay's output equals a forward pass of the model bit for bit.

    Otherwise (rare: the forward pass branches on values, or reads a number out of a tensor, so the
    graph traced on zeros is not the one the image runs; or the model cannot be traced on zeros)
    the image gets its own :func:`geometry.trace` with ``keep_values``: a second, module-hooked
    pass, which records the ops this image really runs (and raises what tracing it raises)."""
    x = image[None]
    try:
        graph = replay(graph_of(model, tuple(image.shape[1:]), channels=image.shape[0]), x)
        if torch.equal(graph.nodes[graph.output].value, model(x)):
            return graph
    except Exception:  # noqa: BLE001 - the image's own trace says what is wrong, or follows the model
        pass
    return trace(model, x, keep_values=True)


def _occluded(image: torch.Tensor, positions, size: int, fill: torch.Tensor) -> torch.Tensor:
    """A copy of ``image`` per position with the square filled: (B, C, H, W)."""
    x = image.expand(len(positions), *image.shape).clone()
    for b, (t, l) in enumerate(positions):
        x[b, :, t:t + size, l:l + size] = fill[:, None, None]
    return x


def _direct(model, image, positions, size, fill, layer, feature):
    """Reference: a forward pass of every occluded image -> (activity (P,), class scores (P, K))."""
    module, call = resolve(model, layer)
    activity, scores = [], []
    for start in range(0, len(positions), 32):
        seen = []

        def hook(_module, _inputs, output):
            if len(seen) == call:
                activity.append(output[:, feature].flatten(1).sum(1))
            seen.append(True)

        with hooks([module.register_forward_hook(hook)]):
            scores.append(model(_occluded(image, positions[start:start + 32], size, fill)).flatten(1))
    return torch.cat(activity), torch.cat(scores)


# ----------------------------------------------------------------------------- incremental (Krypton)

class _Fallback(Exception):
    """The incremental pass cannot replay this graph: run direct forward passes."""


@dataclass
class _Win:
    """The changed window of a node's map per square: ``t`` (B, C, h, w) at rows ``ys``, cols ``xs``."""

    t: torch.Tensor
    ys: torch.Tensor
    xs: torch.Tensor


def _patch(base: torch.Tensor, win: _Win | None, ry: torch.Tensor, rx: torch.Tensor, h: int, w: int,
           shift: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """Rows ``ry[b]..+h`` and columns ``rx[b]..+w`` of ``base`` (1, C, H, W) with ``win`` pasted at its
    place (moved by ``shift``): (B, C, h, w), channels-last. Window parts outside the region are dropped.

    Pixels stored channels-last, each a contiguous C-vector: one ``index_select`` from ``base``, then
    one ``index_copy_`` of the window's pixels over them.
    """
    _, channels, height, width = base.shape
    rows = ry[:, None] + torch.arange(h)  # (B, h)
    cols = rx[:, None] + torch.arange(w)  # (B, w)
    index = rows[:, :, None] * width + cols[:, None, :]
    out = base[0].permute(1, 2, 0).reshape(-1, channels).index_select(0, index.flatten())
    if win is not None:
        n, _, wh, ww = win.t.shape
        r = (win.ys + shift[0] - ry)[:, None] + torch.arange(wh)  # the window's rows, in the region
        c = (win.xs + shift[1] - rx)[:, None] + torch.arange(ww)
        inside = (((r >= 0) & (r < h))[:, :, None] & ((c >= 0) & (c < w))[:, None, :]).flatten()
        to = ((torch.arange(n)[:, None, None] * h + r[:, :, None]) * w + c[:, None, :]).flatten()
        pixels = win.t.permute(0, 2, 3, 1).reshape(-1, channels)
        if inside.all():
            out.index_copy_(0, to, pixels)
        else:
            out.index_copy_(0, to[inside], pixels[inside])
    return out.view(len(ry), h, w, channels).permute(0, 3, 1, 2)


def _windows(ranges: list, n: int) -> tuple[torch.Tensor, int] | None:
    """Start of each square's window along one axis (inside the map) and their common length; None
    when no square reaches the axis."""
    lengths = [hi - lo + 1 for r in ranges if r is not None for lo, hi in [r]]
    if not lengths:
        return None
    length = max(lengths)
    return torch.tensor([0 if r is None else min(r[0], n - length) for r in ranges]), length


def _groups(costs: dict[int, int], k: int) -> list[set[int]]:
    """Split the keys into at most ``k`` groups, cheapest first, that minimise the sum over groups of
    size x largest cost: the work of batches that each pay, per square, for their largest window."""
    order = sorted(costs, key=costs.get)
    n = len(order)

    def work(cuts: tuple) -> int:
        bounds = (0, *cuts, n)
        return sum((b - a) * costs[order[b - 1]] for a, b in zip(bounds, bounds[1:]))

    cuts = min(itertools.combinations(range(1, n), min(k, n) - 1), key=work)
    bounds = (0, *cuts, n)
    return [set(order[a:b]) for a, b in zip(bounds, bounds[1:])]


def _fold_batch_norms(graph: Graph, keep: set[int]) -> dict[int, tuple]:
    """Eval BatchNorms that alone read a conv, folded into its weights and bias: one op per window
    instead of two. ``{conv node: (BatchNorm node, weight, bias)}``; convs in ``keep`` stay as they are."""
    readers: dict[int, list[int]] = {}
    for node in graph.nodes:
        for i in node.inputs:
            readers.setdefault(i, []).append(node.index)
    folded = {}
    for bn in graph.nodes:
        if getattr(bn.func, "__name__", "") != "batch_norm" or bn.kind != "pointwise":
            continue
        b = bound_arguments("batch_norm", bn.args, bn.kwargs)
        conv = graph.nodes[bn.inputs[0]]
        if b["input"] != Ref(conv.index) or readers[conv.index] != [bn.index] or conv.index in keep \
                or not _macs(conv, 1, 1) or any(isinstance(b[k], Ref) for k in ("running_mean", "running_var",
                                                                                 "weight", "bias")):
            continue
        c = bound_arguments("conv2d", conv.args, conv.kwargs)
        weight, bias = c["weight"], c.get("bias")
        scale = (b["running_var"].double() + b.get("eps", 1e-5)).rsqrt()
        if b["weight"] is not None:
            scale = scale * b["weight"].double()
        shift = ((0 if bias is None else bias.double()) - b["running_mean"].double()) * scale
        if b["bias"] is not None:
            shift = shift + b["bias"].double()
        folded[conv.index] = (bn.index, (weight.double() * scale[:, None, None, None]).to(weight.dtype),
                              shift.to(weight.dtype))
    return folded


def _macs(node: Node, rows: int, cols: int) -> int:
    """Multiply-adds of a conv node over ``rows`` x ``cols`` output positions (0 for other ops)."""
    if node.kind != "window" or getattr(node.func, "__name__", "") != "conv2d":
        return 0
    return rows * cols * bound_arguments("conv2d", node.args, node.kwargs)["weight"].numel()


@dataclass
class _Plan:
    """What the squares recompute where, from the graph and the square positions alone.

    ``row_reach[t]`` / ``col_reach[l]``: per node, the rows and columns of its map a square at row
    ``t`` / column ``l`` can change (:func:`geometry.reach`); a square's window at a node is its row's
    rows x its column's columns. ``batches``: lists of indices into ``positions``; per axis the
    square positions are split into ``GROUPS`` groups of similar reach (near a border a square
    reaches fewer rows and columns), and a batch is a row group x a column group, ``CHUNK`` squares
    at most, as a batch recomputes at each node one window as large as its largest square's.
    ``last_use``: per node, the last node that reads its output. ``tail``: the first node after the
    last feature map (the ops from there on run once for all squares); ``ends``: the outputs before
    it that the tail reads. ``folded``: eval BatchNorms folded into the convs they follow
    (:func:`_fold_batch_norms`).
    """

    graph: Graph
    positions: list[tuple[int, int]]
    row_reach: dict[int, dict]
    col_reach: dict[int, dict]
    batches: list[list[int]]
    last_use: dict[int, int]
    tail: int
    ends: list[int]
    folded: dict[int, tuple]

    @staticmethod
    def make(graph: Graph, layer: Node, image_hw: tuple[int, int], size: int, positions) -> _Plan:
        """The plan for squares of ``size`` at ``positions`` on an image of ``image_hw``, (b) followed
        at ``layer`` (whose conv keeps its own BatchNorm); :class:`_Fallback` where the tail reads a
        tuple."""
        height, width = image_hw
        last = graph.nodes[-1].index
        tops, lefts = {t for t, _ in positions}, {l for _, l in positions}  # a square's reach: its row's x its column's
        row_reach = {t: reach(graph, (t, min(t + size, height) - 1), (0, width - 1)) for t in tops}
        col_reach = {l: reach(graph, (0, height - 1), (l, min(l + size, width) - 1)) for l in lefts}
        convs = [n for n in graph.nodes if n.spatial and _macs(n, 1, 1)]

        def cost(reached: dict, axis: int) -> int:  # conv multiply-adds of one square, the other axis whole
            total = 0
            for n in convs:
                span = reached.get(n.index, (None, None))[axis]
                if span is not None:
                    extent = list(n.shape[2:])
                    extent[axis] = span[1] - span[0] + 1
                    total += _macs(n, *extent)
            return total

        row_groups = _groups({t: cost(r, 0) for t, r in row_reach.items()}, GROUPS)
        col_groups = _groups({l: cost(r, 1) for l, r in col_reach.items()}, GROUPS)
        batches = []
        for rows in row_groups:
            for cols in col_groups:
                batch = [i for i, (t, l) in enumerate(positions) if t in rows and l in cols]
                batches += [batch[i:i + CHUNK] for i in range(0, len(batch), CHUNK)]
        last_use = {i: n.index for n in graph.nodes for i in n.inputs}
        last_use[graph.output] = last + 1
        tail = max(n.index for n in graph.nodes if n.spatial) + 1
        ends = sorted({i for n in graph.nodes[tail:] for i in n.inputs if i < tail}
                      | ({graph.output} if graph.output < tail else set()))
        if any(graph.nodes[i].shape is None for i in ends):
            raise _Fallback("the ops after the last feature map read a tuple")
        folded = _fold_batch_norms(graph, keep={layer.index, graph.output})
        return _Plan(graph, positions, row_reach, col_reach, batches, last_use, tail, ends, folded)

    def windows(self, positions: list[tuple[int, int]]) -> dict[int, tuple]:
        """Per node reached: (row starts, rows, col starts, cols), one start per square."""
        windows = {}
        for node in self.graph.nodes[1:]:
            if not node.spatial:
                continue
            rows = _windows([self.row_reach[t].get(node.index, (None, None))[0] for t, _ in positions], node.shape[2])
            cols = _windows([self.col_reach[l].get(node.index, (None, None))[1] for _, l in positions], node.shape[3])
            if rows is not None and cols is not None:
                windows[node.index] = (*rows, *cols)
        return windows


class _Clean:
    """The unoccluded pass's values (the graph's ``value``) in the forms the per-op functions read,
    each made once: maps channels-last, as the windows are (each position's C values side by side,
    as :func:`_patch` reads them); conv and pool inputs padded as the op pads them; conv weights
    channels-last."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.maps: dict[int, torch.Tensor] = {}
        self.padded: dict[tuple, torch.Tensor] = {}
        self.weights: dict[int, torch.Tensor] = {}

    def map(self, index: int) -> torch.Tensor:
        """Node ``index``'s clean map (1, C, H, W), channels-last."""
        if index not in self.maps:
            self.maps[index] = self.graph.nodes[index].value.contiguous(memory_format=torch.channels_last)
        return self.maps[index]

    def padded_input(self, node: Node, native: tuple, pads: tuple) -> torch.Tensor:
        """The clean input of window op ``node`` padded by ``pads`` with its fill (``native``: the axes
        the conv pads itself, part of the key)."""
        key = (node.index, native)
        if key not in self.padded:
            self.padded[key] = F.pad(self.map(node.inputs[0]), pads, value=node.fill)
        return self.padded[key]

    def weight(self, node: Node, weight: torch.Tensor) -> torch.Tensor:
        """Conv ``node``'s ``weight`` channels-last, as the windows are: a cheaper reorder per call."""
        if node.index not in self.weights:
            self.weights[node.index] = weight.contiguous(memory_format=torch.channels_last)
        return self.weights[node.index]

    def full(self, node: Node, state, n: int) -> torch.Tensor:
        """A node's output for every square as whole tensors (B, ...): ``state`` its window or whole
        output per square, None where no square changed it."""
        if state is None:
            if node.value.shape[0] != 1:
                raise _Fallback(f"{node.describe()} has no batch dimension")
            return node.value.expand(n, *node.value.shape[1:])
        if isinstance(state, _Win):
            return _patch(self.map(node.index), state, torch.zeros_like(state.ys), torch.zeros_like(state.xs),
                          *node.shape[2:])
        return state


# --- one op for a batch of squares: ``states`` holds, per node computed so far, its window (_Win) or
# whole output per square, or nothing where no square changed it

def _windowed(node: Node, win: _Win, window: tuple, clean: _Clean, folding: tuple | None) -> _Win:
    """A conv or pool over its output ``window`` (row starts, rows, col starts, cols), from its
    pre-padded clean input with ``win`` pasted in; ``folding``: the conv's BatchNorm folded in
    (:func:`_fold_batch_norms`), or None.

    Along an axis where a conv's window spans its whole output, the region is the whole input and
    the conv pads that axis itself: the same numbers, and oneDNN skips the taps that read padding
    (a fifth of the multiply-adds of a 7 x 7 map)."""
    ys, rows, xs, cols = window
    source = clean.graph.nodes[node.inputs[0]]
    wy, wx = node.axes
    (n_in, m_in), (n_out, m_out) = source.shape[2:], node.shape[2:]
    conv = getattr(node.func, "__name__", "") == "conv2d"
    native = tuple(conv and count == n_o and (n_i + 2 * a.padding - a.span) // a.stride + 1 == n_o
                   for a, count, n_i, n_o in ((wy, rows, n_in, n_out), (wx, cols, m_in, m_out)))
    pads = (0, 0) if native[1] else (wx.padding, max(0, (m_out - 1) * wx.stride + wx.span - wx.padding - m_in))
    pads += (0, 0) if native[0] else (wy.padding, max(0, (n_out - 1) * wy.stride + wy.span - wy.padding - n_in))
    h = n_in if native[0] else (rows - 1) * wy.stride + wy.span  # the input region
    w = m_in if native[1] else (cols - 1) * wx.stride + wx.span
    pointlike = all(a.span == 1 and a.stride == 1 and a.padding == 0 for a in node.axes)
    if pointlike and win.t.shape[2:] == (rows, cols) and torch.equal(win.ys, ys) and torch.equal(win.xs, xs):
        region = win.t  # a 1x1 conv over the same window (LRN's band sum): nothing to paste
    elif win.t.shape[2:] == (n_in, m_in) and (ys == ys[0]).all() and (xs == xs[0]).all():
        # the window is the whole map (deep in a ResNet): padded as the op pads, nothing clean to paste
        y, x = int(ys[0]) * wy.stride, int(xs[0]) * wx.stride
        region = (F.pad(win.t, pads, value=node.fill) if any(pads) else win.t)[:, :, y:y + h, x:x + w]
    else:
        region = _patch(clean.padded_input(node, native, pads), win, ys * wy.stride, xs * wx.stride, h, w,
                        shift=(0 if native[0] else wy.padding, 0 if native[1] else wx.padding))
    if not conv:
        out = unpadded(node, region)
    else:
        padding = (wy.padding if native[0] else 0, wx.padding if native[1] else 0)
        out = _conv(node, region, padding, clean, folding)
    if tuple(out.shape[2:]) != (rows, cols):
        raise _Fallback(f"{node.describe()} did not compute its window")
    return _Win(out, ys, xs)


def _conv(node: Node, region: torch.Tensor, padding: tuple[int, int], clean: _Clean,
          folding: tuple | None) -> torch.Tensor:
    """A conv node on ``region`` with ``padding``: its BatchNorm folded in where ``folding`` gives it
    (``(BatchNorm node, weight, bias)``), weights and input channels-last."""
    wy, wx = node.axes
    b = bound_arguments("conv2d", node.args, node.kwargs)
    weight, bias = b["weight"], b.get("bias")
    if folding is not None:
        weight, bias = folding[1:]
    return F.conv2d(region.contiguous(memory_format=torch.channels_last), clean.weight(node, weight), bias,
                    (wy.stride, wx.stride), padding, (wy.dilation, wx.dilation), b.get("groups", 1))


def _pointwise(node: Node, states: dict, window: tuple, clean: _Clean) -> _Win:
    """A per-position op on its output ``window``: each input cut to it, clean around its own window."""
    ys, rows, xs, cols = window
    size = node.shape[2:]

    def arg(a):
        if not isinstance(a, Ref):
            return a
        source, state = clean.graph.nodes[a.index], states.get(a.index)
        if tuple(source.shape[2:]) == tuple(size):
            if isinstance(state, _Win) and state.t.shape[2:] == (rows, cols) and torch.equal(state.ys, ys) \
                    and torch.equal(state.xs, xs):
                return state.t
            return _patch(clean.map(a.index), state, ys, xs, rows, cols)
        if tuple(source.shape[2:]) == (1, 1):  # broadcast over the map (a squeeze-excitation scale)
            return source.value.clone() if state is None and node.inplace else \
                source.value if state is None else state.t
        raise _Fallback(f"{node.describe()} broadcasts a map of {source.shape[2:]} over {size}")

    # an in-place op may overwrite the windows of this pass (the program it replays no longer
    # reads them), never a clean value
    args, kwargs = tree_map(arg, node.args), tree_map(arg, node.kwargs)
    out = node.func(*args, **kwargs)
    if tuple(out.shape[2:]) != (rows, cols) or out.shape[0] != len(ys):
        raise _Fallback(f"{node.describe()} did not keep its window")
    return _Win(out, ys, xs)


def _whole(node: Node, states: dict, n: int, clean: _Clean):
    """An op on whole maps (B, ...) for every square: what the geometry does not follow."""
    def arg(a):
        if not isinstance(a, Ref):
            return a
        source = clean.graph.nodes[a.index]
        if source.shape is None:  # a tuple-valued op
            return states.get(a.index, source.value)
        return clean.full(source, states.get(a.index), n)

    args, kwargs = tree_map(arg, node.args), tree_map(arg, node.kwargs)
    if node.inplace and isinstance(args[0], torch.Tensor) and states.get(node.inputs[0]) is None:
        args = (args[0].clone(), *args[1:])  # a clean value, expanded: never overwritten
    try:
        out = node.func(*args, **kwargs)
    except RuntimeError as e:
        raise _Fallback(f"{node.describe()} cannot run on a batch of squares ({str(e).splitlines()[0]})") from None
    if node.shape is not None and (not isinstance(out, torch.Tensor) or tuple(out.shape[1:]) != node.shape[1:]
                                   or out.shape[0] != n):
        raise _Fallback(f"{node.describe()} depends on the batch size")
    return out


class _Incremental:
    """The Krypton-style pass over a traced graph (every node holding its clean ``value``) for a list
    of square positions: the batch loop. :class:`_Plan` says what each batch recomputes where;
    per node, :meth:`run` picks the op's path (:func:`_windowed`, :func:`_pointwise`, :func:`_whole`).
    """

    def __init__(self, graph: Graph, layer: Node, feature: int, image, size, fill, positions):
        self.graph, self.layer, self.feature = graph, layer, feature
        self.image, self.size, self.fill, self.positions = image, size, fill, positions
        self.plan = _Plan.make(graph, layer, tuple(image.shape[1:]), size, positions)
        self.clean = _Clean(graph)
        self.normalised: set[int] = set()  # convs whose window this batch holds with their BatchNorm applied
        self.done = 0  # conv multiply-adds recomputed, summed over squares

    def all(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(b)'s activity (P,) and the class scores (P, K), in the order of ``positions``."""
        self.done = 0
        activity, ends = [], []
        for batch in self.plan.batches:
            a, states = self.chunk(batch)
            activity.append(a)
            ends.append(states)
        # the tail (flatten, linear, ...: no maps left) once for all squares: its weights are read once
        states = {i: torch.cat([e[i] for e in ends]) for i in self.plan.ends}
        n = len(self.positions)
        self.steps(self.graph.nodes[self.plan.tail:], states, {}, n)
        out = self.graph.nodes[self.graph.output]
        scores = self.clean.full(out, states.get(out.index), n).flatten(1)
        inverse = torch.argsort(torch.tensor([i for batch in self.plan.batches for i in batch]))
        return torch.cat(activity)[inverse], scores[inverse]

    def recomputed(self) -> float:
        """Mean share of the conv multiply-adds recomputed per square (windows; whole maps where dense)."""
        total = sum(_macs(n, n.shape[2], n.shape[3]) for n in self.graph.nodes if n.spatial)
        return self.done / (total * len(self.positions)) if total else 0.0

    def chunk(self, batch: list[int]) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """The squares ``batch`` up to the tail: (b)'s activity and the outputs the tail reads."""
        positions = [self.positions[i] for i in batch]
        n = len(positions)
        windows = self.plan.windows(positions)
        self.normalised.clear()
        height, width = self.image.shape[1:]
        tops = torch.tensor([t for t, _ in positions])
        lefts = torch.tensor([l for _, l in positions])
        # the input's window: the occluded image over a size x size area inside the image holding the square
        wy, wx = tops.clamp(max=height - self.size), lefts.clamp(max=width - self.size)
        win = self.image[None, :, :self.size, :self.size].repeat(n, 1, 1, 1)
        for b, ((t, l), y, x) in enumerate(zip(positions, wy.tolist(), wx.tolist())):
            win[b] = self.image[:, y:y + self.size, x:x + self.size]
            win[b, :, t - y:, l - x:] = self.fill[:, None, None]
        states: dict[int, object] = {0: _Win(win, wy, wx)}
        activity = self.steps(self.graph.nodes[1:self.plan.tail], states, windows, n)
        return activity, {i: self.clean.full(self.graph.nodes[i], states.get(i), n) for i in self.plan.ends}

    def steps(self, nodes: list[Node], states: dict, windows: dict, n: int) -> torch.Tensor | None:
        """Run ``nodes`` for ``n`` squares, updating ``states`` (a node's window or whole output per
        square; dropped after its last use); (b)'s activity when the layer followed is among them."""
        activity = None
        for node in nodes:
            if any(i in states for i in node.inputs):
                state = self.run(node, states, windows.get(node.index), n)
                if state is not None:
                    states[node.index] = state
                    if node.spatial:  # a window, or the whole map
                        self.done += n * _macs(node, *(state.t if isinstance(state, _Win) else state).shape[2:])
            if node is self.layer:
                activity = self.activity(states.get(node.index), n)
            for i in node.inputs:
                if self.plan.last_use.get(i) == node.index:
                    states.pop(i, None)
        return activity

    def run(self, node: Node, states: dict, window: tuple | None, n: int):
        """One node for the batch: its window, its whole output per square, or None (unchanged)."""
        ins = [states.get(i) for i in node.inputs]
        if node.inputs[0] in self.normalised and self.plan.folded[node.inputs[0]][0] == node.index:
            return ins[0]  # the BatchNorm its conv already applied
        if window is not None and not any(s is not None and not isinstance(s, _Win) for s in ins):
            if node.kind in ("window", "adaptive") and node.fill is not None:
                folding = self.plan.folded.get(node.index)  # folded BatchNorms follow convs only
                if folding is not None:
                    self.normalised.add(node.index)
                return _windowed(node, ins[0], window, self.clean, folding)
            if node.kind == "pointwise":
                return _pointwise(node, states, window, self.clean)
        if window is None and node.spatial and node.kind != "unknown":
            return None  # no square reaches this map
        return _whole(node, states, n, self.clean)

    def activity(self, state, n: int) -> torch.Tensor:
        """(b) for the batch: the followed map's total, from its window per square where it has one."""
        clean = self.layer.value[:, self.feature:self.feature + 1]
        total = clean.sum()
        if state is None:
            return total.expand(n)
        if isinstance(state, _Win):
            h, w = state.t.shape[2:]
            under = _patch(clean, None, state.ys, state.xs, h, w)
            return total + state.t[:, self.feature].flatten(1).sum(1) - under.flatten(1).sum(1)
        return state[:, self.feature].flatten(1).sum(1)


# ----------------------------------------------------------------------------- findings, JSON, figure

def cover_statistics(result: Occlusion, mask: torch.Tensor) -> dict:
    """One image's numbers for Fig. 7's claim: p(target) mean and largest drop from the unoccluded p with
    the square on the object (at least ``OBJECT`` of its pixels are object) and on the background (under
    ``BACKGROUND``), and how many positions each has. ``mask``: bool (H, W), the object's pixels."""
    cover = torch.stack([mask[t:t + result.size, l:l + result.size].float().mean() for t, l in result.positions])
    p = result.probability.flatten()
    on, off = cover >= OBJECT, cover < BACKGROUND
    return {
        "p_unoccluded": result.clean_probability,
        "predicted": result.clean_label == result.target,
        "p_square_on_object": float(p[on].mean()) if on.any() else None,
        "p_square_on_background": float(p[off].mean()) if off.any() else None,
        "largest_drop_on_object": result.clean_probability - float(p[on].min()) if on.any() else None,
        "largest_drop_on_background": result.clean_probability - float(p[off].min()) if off.any() else None,
        "positions_on_object": int(on.sum()), "positions_on_background": int(off.sum()),
    }


def occlusion_findings(results: list[Occlusion], objects: list[torch.Tensor]) -> list[Finding]:
    """Fig. 7's claim over images (Sec. 4.2): p(target) is lower when the square covers the object than
    when it covers background.

    Set-up, the fair analogue of the paper's: the paper shows images its model classifies correctly and
    reads how p(correct class) falls as the square moves over them. So the images used are those whose
    followed class is the model's answer on the unoccluded image, with squares both on the object and on
    the background (:func:`cover_statistics`); the others are counted and left out. Per image, p(target)
    mean with the square on the background minus on the object; the claim holds when the 95% interval of
    its mean over images lies above 0 (:func:`stats.mean_interval`). The same paired comparison of the
    largest drop is reported beside it. ``objects[i]``: bool (H, W), the object's pixels in image i."""
    from .findings import interval_text
    from .stats import mean_interval, verdict

    per_image = [cover_statistics(r, m) for r, m in zip(results, objects)]
    wrong = sum(not f["predicted"] for f in per_image)
    one_side = sum(f["predicted"] and not (f["positions_on_object"] and f["positions_on_background"])
                   for f in per_image)
    both = [f for f in per_image if f["predicted"] and f["positions_on_object"] and f["positions_on_background"]]
    claim = "p(correct class) is lower when the square covers the object than when it covers background (Fig. 7d)"
    paper = "Fig. 7: the probability of the true class drops sharply when the object is covered"
    quantity = "p(correct) with the square on the background minus on the object, mean over images"
    if_not_held = ("Of the set-up rather than the scale: Fashion-MNIST's garments lie on a blank black "
                   "background that carries no evidence at any resolution, so a not held would point at the "
                   "object masks (pixels above 0.1) or at squares too large for 28 px images.")
    left_out = {"not_predicted": wrong, "no_square_on_one_side": one_side,
                "no_object_mask": len(results) - len(per_image)}
    if not both:
        why = ("no object masks were given (photos have no black background to find the object by)" if not objects
               else f"no image of {len(results)} was both classified as its followed class and had squares on "
                    "the object and on the background")
        return [Finding(claim, paper, {"images": len(results), "images_used": 0, "left_out": left_out}, verdict(None),
                        f"Not measured: {why}.", quantity=quantity, n=0, unit="images", if_not_held=if_not_held)]
    gap = [f["p_square_on_background"] - f["p_square_on_object"] for f in both]
    drop = [f["largest_drop_on_object"] - f["largest_drop_on_background"] for f in both]
    estimate, interval = mean_interval(gap)
    drop_estimate, drop_interval = mean_interval(drop)

    def mean(key: str) -> float:
        return sum(f[key] for f in both) / len(both)

    ours = {"images": len(results), "images_used": len(both), "left_out": left_out,
            "p_square_on_object": mean("p_square_on_object"), "p_square_on_background": mean("p_square_on_background"),
            "largest_drop_on_object": mean("largest_drop_on_object"),
            "largest_drop_on_background": mean("largest_drop_on_background"),
            "largest_drop_object_minus_background": {"estimate": drop_estimate,
                                                     "interval": list(drop_interval) if drop_interval else None},
            "images_where_lower_on_object": sum(g > 0 for g in gap)}
    result = verdict(interval)
    unit = "images"
    words = {"estimate": estimate, "interval": interval, "n": len(both), "unit": unit}
    reading = (f"Over {len(both)} of {len(results)} images ({wrong} not classified as their followed class, "
               f"{one_side} without squares on both sides, left out), mean p(correct class) is "
               f"{ours['p_square_on_object']:.3f} with the square on the object and "
               f"{ours['p_square_on_background']:.3f} on the background: background minus object "
               f"{interval_text(words)}; the largest drop, object minus background, is "
               f"{interval_text({**words, 'estimate': drop_estimate, 'interval': drop_interval})}. ")
    reading += {"held": "The classifier relies on the object, not its surroundings, as in the paper.",
                "not held": "Covering the background lowers it more: the classifier relies on the surroundings.",
                "inconclusive": "The interval contains 0: at this sample size the object is not shown to matter "
                                "more than the background."}[result]
    return [Finding(claim, paper, ours, result, reading, quantity=quantity, estimate=estimate, interval=interval,
                    n=len(both), unit=unit, if_not_held=if_not_held)]


def occlusion_to_json(result: Occlusion, classes: list[str] | None = None) -> dict:
    """The numbers of :class:`Occlusion` as plain JSON types; class names from ``classes``, default the
    result's own."""
    classes = classes or result.classes

    def name(k: int):
        return classes[k] if classes else k

    return {
        "layer": result.layer, "feature": result.feature, "unit": list(result.unit),
        "receptive_field": list(result.receptive_field), "size": result.size, "stride": result.stride,
        "target": result.target, "target_name": name(result.target),
        "grid": list(result.activity.shape), "positions": [list(p) for p in result.positions],
        "activity": result.activity.tolist(), "probability": result.probability.tolist(),
        "label": result.label.tolist(), "label_names": {str(k): name(k) for k in result.label.unique().tolist()},
        "unoccluded": {"activity": result.clean_activity, "probability": result.clean_probability,
                       "label": result.clean_label, "label_name": name(result.clean_label)},
        "projection_missing": result.projection_missing, "method": result.method, "recomputed": result.recomputed,
    }


def draw_occlusion(result: Occlusion, path=None, picture: torch.Tensor | None = None,
                   classes: list[str] | None = None) -> Figure:
    """Fig. 7's row as a PNG: (a) the image with the square where p(target) is lowest, (b) activity,
    (c) projection with its receptive field, (d) p(target), (e) most probable label.

    ``picture``: the image to show, (C, H, W) in [0, 1]; default the result's own ``picture`` (set by
    :func:`occlusion` for pixels or files), else ``result.image`` rescaled. ``classes``: class names,
    default the result's own.
    """
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.patches import Patch, Rectangle

    img = result.image
    picture = result.picture if picture is None else picture
    picture = (img - img.min()) / (img.max() - img.min()).clamp_min(1e-12) if picture is None else picture
    classes = classes or result.classes
    rows, cols = result.activity.shape
    t0, l0 = result.positions[0]
    t1, l1 = result.positions[-1]
    half, step = result.size / 2, result.stride / 2
    extent = (l0 + half - step - 0.5, l1 + half + step - 0.5, t1 + half + step - 0.5, t0 + half - step - 0.5)
    name = (lambda k: classes[k]) if classes else str

    fig, axes = new_figure(1, 5, figsize=(17, 3.6))
    ax = axes[0]
    ax.imshow(to_rgb(picture), cmap="gray", vmin=0, vmax=1)
    t, l = result.positions[int(result.probability.argmin())]
    ax.add_patch(Rectangle((l - 0.5, t - 0.5), result.size, result.size, color="0.5"))
    ax.set_title(f"(a) input, class followed: {name(result.target)}")
    ax = axes[1]
    lo, hi = float(result.activity.min()), float(result.activity.max())
    ax.imshow(heatmap_pixels(result.activity, lo, hi), extent=extent)  # as the viewer draws it
    fig.colorbar(ScalarMappable(Normalize(lo, hi), "jet"), ax=ax, fraction=0.046)
    ax.set_title(f"(b) {result.layer} map {result.feature}: total")
    ax = axes[2]
    top, left, bottom, right = result.receptive_field
    if result.projection is not None:
        ax.imshow(to_rgb(contrast_stretch(result.projection[None])[0]), cmap="gray", vmin=0, vmax=1)
        ax.set_title(f"(c) projection of map {result.feature}")
    else:  # the maps stand without it; say why it is missing
        ax.imshow(to_rgb(picture), cmap="gray", vmin=0, vmax=1, alpha=0.3)
        ax.text(0.5, 0.5, textwrap.fill(f"no projection: {result.projection_missing}", 40), transform=ax.transAxes,
                ha="center", va="center", fontsize=7)
        ax.set_title(f"(c) field of map {result.feature}'s peak")
    ax.add_patch(Rectangle((left - 0.5, top - 0.5), right - left + 1, bottom - top + 1, fill=False, color="k", lw=2))
    ax = axes[3]
    ax.imshow(heatmap_pixels(result.probability, 0.0, 1.0), extent=extent)
    fig.colorbar(ScalarMappable(Normalize(0, 1), "jet"), ax=ax, fraction=0.046)
    ax.set_title(f"(d) p({name(result.target)})")
    ax = axes[4]
    labels = result.label.unique().tolist()
    colors = label_colors(len(labels))  # the viewer's colours too
    codes = result.label.clone().apply_(labels.index)
    ax.imshow(colors[codes.numpy()], extent=extent, interpolation="nearest")
    ax.legend(handles=[Patch(color=colors[i], label=name(k)) for i, k in enumerate(labels)], fontsize=7,
              loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title("(e) most probable label")
    for ax in axes:
        ax.set_xlim(-0.5, img.shape[2] - 0.5)
        ax.set_ylim(img.shape[1] - 0.5, -0.5)
        ax.set_xticks([])
        ax.set_yticks([])
    return finish(fig, path)


def occlusion(model, images, targets=None, size: int | None = None, stride: int | None = None,
              layer: str | None = None, fill=None) -> list[Occlusion]:
    """Fig. 7 for each of ``images``: the occluder's effect on the strongest feature map of ``layer``
    and on the class probability (Sec. 4.2).

    Args:
        model: the model under study (:class:`~deconvnet.subject.Subject`), or an ``nn.Module``
            wrapped by :func:`~deconvnet.subject.as_subject` (ImageNet preprocessing at 224 px).
        images: image files or uint8 pixels (N, C, H, W) / (C, H, W), preprocessed by the model's
            preprocessing; or a float tensor, the model's input as it is (:meth:`Subject.inputs`).
        targets: the class mapped in panel (d), one per image or one for all; default each image's
            predicted class.
        size, stride, fill: as in :func:`occlude_image` (default the paper's 35 and 14 at 224 px).
        layer: default the model's top stage (``conv5`` for ours; ``layer4`` for a ResNet).

    Each result carries the image as the user sees it (``picture``, for files and pixels) and the
    model's class names, so ``draw_occlusion(result, path)`` needs nothing else.
    """
    from .subject import as_subject

    subject = as_subject(model, like=images)
    pixels, to_input = subject.inputs(images)
    layer = subject.layers(layer)[-1]
    if targets is None or isinstance(targets, int):
        targets = [targets] * len(pixels)
    targets = list(targets)
    if len(targets) != len(pixels):
        raise UserError(f"{len(targets)} targets for {len(pixels)} images")
    pictures = [None] * len(pixels) if pixels.is_floating_point() else subject.pictures(pixels)
    return [replace(occlude_image(subject.model, x, target, size=size, stride=stride, layer=layer, fill=fill,
                                  other_activations=subject.other_activations), picture=shown, classes=subject.classes)
            for x, target, shown in zip(to_input(pixels), targets, pictures)]


callable_module(__name__, occlusion)
