"""Occlusion sensitivity (Sec. 4.2, Fig. 7): slide a grey square over the image and record, for every
position, (b) the total activation of the feature map that is strongest on the unoccluded image,
(d) the probability of the correct class and (e) the most probable label; (c) is the deconvnet
projection of that map's strongest activation.

Exact and incremental, as in Krypton (Nakandala et al., SIGMOD 2019): the unoccluded image runs once,
and for each square only the region of each layer whose receptive field touches the square
(:func:`geometry.affected`) is recomputed, from the unoccluded activations pasted around it. Max-pools
see ``-inf`` padding (ceil mode's partial windows included) and convolutions zero padding, exactly as
PyTorch pads, so every value equals a forward pass of the occluded image. After the last conv/pool
layer the patched maps run through the rest (fc6..fc8) whole. Models that are not a flat chain of
conv, max-pool and pointwise layers (ReLU, LRN, dropout) fall back to batched forward passes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ._analysis import eval_mode, output_layer, to_rgb
from .deconvnet import Deconvnet, contrast_stretch
from .errors import UserError
from .geometry import Step, affected, receptive_field, steps_to
from .probe import activations

SPATIAL = (nn.Conv2d, nn.MaxPool2d)
POINTWISE = (nn.ReLU, nn.LocalResponseNorm, nn.Dropout)  # act per position (LRN mixes channels only)
CHUNK = 256  # occluder positions per batch
OBJECT, BACKGROUND = 0.5, 0.1  # a square "covers the object" / "covers background" (fraction of object pixels)


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
    projection: torch.Tensor  # (c) deconvnet projection of ``unit``, (C, H, W)
    image: torch.Tensor  # (C, H, W), the model's input
    target: int
    layer: str
    size: int
    stride: int
    clean_activity: float
    clean_probability: float
    clean_label: int


def occlusion(model: nn.Module, image: torch.Tensor, target: int | None = None, size: int | None = None,
              stride: int | None = None, layer: str = "conv5", fill=None) -> Occlusion:
    """Occlusion maps of Fig. 7 for ``image`` (C, H, W), in the model's input space.

    Args:
        target: the class whose probability is mapped (d); default the prediction on the clean image.
        size, stride: the square's side and step in pixels; default the paper's 35 and 14 at 224 px,
            scaled to the image.
        layer: the layer whose strongest feature map is followed in (b) and (c).
        fill: the square's value, a number or one per channel; default 0, the mean pixel after mean
            subtraction (the paper's grey).
    """
    if image.dim() != 3:
        raise UserError(f"occlusion takes one image (C, H, W), got shape {tuple(image.shape)}")
    channels, height, width = image.shape
    size = max(1, round(35 * height / 224)) if size is None else size
    stride = max(1, round(14 * height / 224)) if stride is None else stride
    if not 1 <= size <= min(height, width) or stride < 1:
        raise UserError(f"square size {size} must be in 1..{min(height, width)} and stride {stride} >= 1")
    fill = torch.zeros(channels) if fill is None else torch.as_tensor(fill, dtype=torch.float32).reshape(-1)
    fill = fill.expand(channels).to(image.dtype)
    # from the top-left corner in steps of ``stride`` until every pixel is covered: the last row and
    # column of squares may be cut by the border (as in Captum's Occlusion)
    tops, lefts = range(0, height - size + stride, stride), range(0, width - size + stride, stride)
    positions = [(t, l) for t in tops for l in lefts]
    image = image.detach()

    with eval_mode(model), torch.no_grad():
        clean = activations(model, image[None], [layer, output_layer(model)])
        maps = clean[layer][0]
        if maps.dim() != 3:
            raise UserError(f"layer {layer!r} has no feature maps (output shape {tuple(clean[layer].shape)})")
        feature = int(maps.flatten(1).amax(1).argmax())
        y, x = divmod(int(maps[feature].argmax()), maps.shape[-1])
        logits = clean[output_layer(model)][0]
        target = int(logits.argmax()) if target is None else int(target)
        if not 0 <= target < len(logits):
            raise UserError(f"target class {target} is not in 0..{len(logits) - 1}")
        plan = _plan(model, layer)
        run = _incremental if plan is not None else _direct
        activity, scores = run(model, plan, image, positions, size, fill, layer, feature)
        projection = Deconvnet(model).project(image[None], layer, units=[(feature, y, x)])[0]
    probs = torch.softmax(scores, dim=1)
    grid = (len(tops), len(lefts))
    return Occlusion(
        activity=activity.reshape(grid), probability=probs[:, target].reshape(grid),
        label=probs.argmax(1).reshape(grid), positions=positions, feature=feature, unit=(feature, y, x),
        receptive_field=receptive_field(steps_to(model, layer), y, x, height), projection=projection,
        image=image, target=target, layer=layer, size=size, stride=stride,
        clean_activity=float(maps[feature].sum()), clean_probability=float(torch.softmax(logits, 0)[target]),
        clean_label=int(logits.argmax()))


def _occluded(image: torch.Tensor, positions, size: int, fill: torch.Tensor) -> torch.Tensor:
    """A copy of ``image`` per position with the square filled: (B, C, H, W)."""
    x = image.expand(len(positions), *image.shape).clone()
    for b, (t, l) in enumerate(positions):
        x[b, :, t:t + size, l:l + size] = fill[:, None, None]
    return x


def _direct(model, _plan, image, positions, size, fill, layer, feature):
    """Reference: a forward pass of every occluded image -> (activity (P,), class scores (P, K))."""
    out = output_layer(model)
    activity, scores = [], []
    for start in range(0, len(positions), 32):
        a = activations(model, _occluded(image, positions[start:start + 32], size, fill), [layer, out])
        activity.append(a[layer][:, feature].sum((1, 2)))
        scores.append(a[out])
    return torch.cat(activity), torch.cat(scores)


# ----------------------------------------------------------------------------- incremental (Krypton)

@dataclass
class _Plan:
    """A flat chain split into its conv/pool/pointwise ``head`` and the ``tail`` run on whole maps."""

    head: list[tuple[str, nn.Module]]
    tail: list[tuple[str, nn.Module]]
    steps: list[Step]  # the conv/pool layers of ``head``, in order


def _plan(model: nn.Module, layer: str) -> _Plan | None:
    """The incremental plan of ``model``, or ``None`` if it is not a flat chain (holding ``layer``)
    that this module can patch."""
    if not isinstance(model, nn.Sequential):
        return None
    children = list(model.named_children())
    if layer not in dict(children):
        return None
    n = 0
    for i, (_, m) in enumerate(children):
        if isinstance(m, nn.Conv2d) and (m.padding_mode != "zeros" or isinstance(m.padding, str)):
            break
        if isinstance(m, nn.MaxPool2d) and (m.dilation not in (1, (1, 1)) or m.return_indices):
            break
        if isinstance(m, SPATIAL):
            n = i + 1
        elif not isinstance(m, POINTWISE):
            break
    if n == 0:
        return None
    try:
        steps = steps_to(model, children[n - 1][0])
    except UserError:  # non-square or dilated kernels
        return None
    return _Plan(children[:n], children[n:], steps)


def _patch(base: torch.Tensor, win: torch.Tensor, wy: torch.Tensor, wx: torch.Tensor,
           ry: torch.Tensor, rx: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Rows ``ry[b]..+h`` and columns ``rx[b]..+w`` of ``base`` (1, C, H, W) with window ``win[b]``
    (B, C, h', w') pasted at ``(wy[b], wx[b])``: (B, C, h, w), channels-last. Window parts outside
    the region are dropped.

    One ``index_select`` over pixels stored channels-last, each pixel a contiguous C-vector taken
    either from ``base`` or from a window.
    """
    _, channels, height, width = base.shape
    n, _, wh, ww = win.shape
    rows = ry[:, None] + torch.arange(h)  # (B, h)
    cols = rx[:, None] + torch.arange(w)  # (B, w)
    r, c = rows - wy[:, None], cols - wx[:, None]  # in window coordinates
    inside = ((r >= 0) & (r < wh))[:, :, None] & ((c >= 0) & (c < ww))[:, None, :]  # (B, h, w)
    from_base = rows[:, :, None] * width + cols[:, None, :]
    from_win = height * width + (torch.arange(n)[:, None, None] * wh + r.clamp(0, wh - 1)[:, :, None]) * ww \
        + c.clamp(0, ww - 1)[:, None, :]
    pixels = torch.cat([base[0].permute(1, 2, 0).reshape(-1, channels), win.permute(0, 2, 3, 1).reshape(-1, channels)])
    out = pixels.index_select(0, torch.where(inside, from_win, from_base).flatten())
    return out.view(n, h, w, channels).permute(0, 3, 1, 2)


def _windows(ranges: list[tuple[int, int]], n_out: int) -> tuple[torch.Tensor, int]:
    """Start of each square's output window along one axis (inside the map), and their common length."""
    length = max(hi - lo + 1 for lo, hi in ranges)
    return torch.tensor([min(lo, n_out - length) for lo, _ in ranges]), length


def _incremental(model, plan: _Plan, image, positions, size, fill, layer, feature):
    """As :func:`_direct`, recomputing only what each square changes."""
    inputs, x = [], image[None]
    for name, m in plan.head:  # the clean pass, keeping every layer's input
        inputs.append(x)
        x = m(x)
        if name == layer:
            clean_map = x[:, feature:feature + 1].clone()  # (1, 1, H, W); a later in-place ReLU can't touch it
    top = x
    tops, lefts = [t for t, _ in positions], [l for _, l in positions]

    # Per conv/pool step: the changed output range of every square -> fixed-size windows, and the
    # step's input padded as PyTorch pads it (zeros for conv, -inf for max-pool incl. ceil mode's tail).
    height, width = image.shape[1:]
    row_ranges = {t: affected(plan.steps, t, min(t + size, height) - 1, height) for t in set(tops)}
    col_ranges = {l: affected(plan.steps, l, min(l + size, width) - 1, width) for l in set(lefts)}
    geometry, k = {}, 0
    for (name, m), x_in in zip(plan.head, inputs):
        if not isinstance(m, SPATIAL):
            continue
        s = plan.steps[k]
        n_y, n_x = s.out_size(x_in.shape[2]), s.out_size(x_in.shape[3])
        sy, ly = _windows([row_ranges[t][k] for t in tops], n_y)
        sx, lx = _windows([col_ranges[l][k] for l in lefts], n_x)
        extra_y = max(0, (n_y - 1) * s.stride + s.kernel - x_in.shape[2] - 2 * s.padding)
        extra_x = max(0, (n_x - 1) * s.stride + s.kernel - x_in.shape[3] - 2 * s.padding)
        value = 0.0 if isinstance(m, nn.Conv2d) else float("-inf")
        padded = F.pad(x_in, (s.padding, s.padding + extra_x, s.padding, s.padding + extra_y), value=value)
        geometry[name] = (s, padded, sy, ly, sx, lx)
        k += 1

    activity, scores = [], []
    tops, lefts = torch.tensor(tops), torch.tensor(lefts)
    for start in range(0, len(positions), CHUNK):
        sl = slice(start, start + CHUNK)
        # the window: the occluded image over a size x size area inside the image holding the square
        wy, wx = tops[sl].clamp(max=height - size), lefts[sl].clamp(max=width - size)
        win = torch.empty(len(wy), image.shape[0], size, size, dtype=image.dtype)
        for b, ((t, l), y, x) in enumerate(zip(positions[sl], wy.tolist(), wx.tolist())):
            win[b] = image[:, y:y + size, x:x + size]
            win[b, :, t - y:, l - x:] = fill[:, None, None]
        for name, m in plan.head:
            if isinstance(m, SPATIAL):
                s, padded, sy, ly, sx, lx = geometry[name]
                region = _patch(padded, win, wy + s.padding, wx + s.padding, sy[sl] * s.stride, sx[sl] * s.stride,
                                (ly - 1) * s.stride + s.kernel, (lx - 1) * s.stride + s.kernel)
                if isinstance(m, nn.Conv2d):
                    win = F.conv2d(region, m.weight, m.bias, s.stride, 0, 1, m.groups)
                else:
                    win = F.max_pool2d(region, s.kernel, s.stride)
                wy, wx = sy[sl], sx[sl]
            else:
                win = m(win)
            if name == layer:
                zero = torch.zeros_like(wy)
                full = _patch(clean_map, win[:, feature:feature + 1], wy, wx, zero, zero, *clean_map.shape[2:])
                activity.append(full.sum((1, 2, 3)))
        zero = torch.zeros_like(wy)
        x = _patch(top, win, wy, wx, zero, zero, *top.shape[2:]).contiguous()
        for name, m in plan.tail:
            x = m(x)
            if name == layer:
                activity.append(x[:, feature].flatten(1).sum(1))
        scores.append(x)
    return torch.cat(activity), torch.cat(scores)


# ----------------------------------------------------------------------------- findings, JSON, figure

def occlusion_findings(results: list[Occlusion], objects: list[torch.Tensor]) -> dict:
    """Fig. 7's claim over images: p(target) is lower when the square covers the object than when it
    covers background. ``objects[i]``: bool (H, W), the object's pixels in image i. A square covers the
    object when at least half its pixels are object, background when under a tenth are. Means are over
    the images that have both kinds of square: of p(target), and of its largest drop from the clean p."""
    per_image = []
    for result, mask in zip(results, objects):
        cover = torch.stack([mask[t:t + result.size, l:l + result.size].float().mean() for t, l in result.positions])
        p = result.probability.flatten()
        on, off = cover >= OBJECT, cover < BACKGROUND
        per_image.append({
            "p_unoccluded": result.clean_probability,
            "p_square_on_object": float(p[on].mean()) if on.any() else None,
            "p_square_on_background": float(p[off].mean()) if off.any() else None,
            "largest_drop_on_object": result.clean_probability - float(p[on].min()) if on.any() else None,
            "largest_drop_on_background": result.clean_probability - float(p[off].min()) if off.any() else None,
            "positions_on_object": int(on.sum()), "positions_on_background": int(off.sum()),
        })
    both = [f for f in per_image if f["positions_on_object"] and f["positions_on_background"]]

    def mean(key: str) -> float | None:
        return sum(f[key] for f in both) / len(both) if both else None

    return {
        "claim": "p(correct class) is lower when the square covers the object than background (Fig. 7d)",
        "images_with_both": len(both),
        "p_square_on_object": mean("p_square_on_object"), "p_square_on_background": mean("p_square_on_background"),
        "largest_drop_on_object": mean("largest_drop_on_object"),
        "largest_drop_on_background": mean("largest_drop_on_background"),
        "images_where_lower_on_object": sum(f["p_square_on_object"] < f["p_square_on_background"] for f in both),
        "holds": None if not both else mean("p_square_on_object") < mean("p_square_on_background"),
        "per_image": per_image,
    }


def occlusion_to_json(result: Occlusion, classes: list[str] | None = None) -> dict:
    """The numbers of :class:`Occlusion` as plain JSON types; class names when ``classes`` is given."""
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
    }


def draw_occlusion(result: Occlusion, path, picture: torch.Tensor | None = None,
                   classes: list[str] | None = None) -> None:
    """Fig. 7's row as a PNG: (a) the image with the square where p(target) is lowest, (b) activity,
    (c) projection with its receptive field, (d) p(target), (e) most probable label.

    ``picture``: the image to show, (C, H, W) in [0, 1]; default ``result.image`` rescaled.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch, Rectangle

    img = result.image
    picture = (img - img.min()) / (img.max() - img.min()).clamp_min(1e-12) if picture is None else picture
    rows, cols = result.activity.shape
    t0, l0 = result.positions[0]
    t1, l1 = result.positions[-1]
    half, step = result.size / 2, result.stride / 2
    extent = (l0 + half - step - 0.5, l1 + half + step - 0.5, t1 + half + step - 0.5, t0 + half - step - 0.5)
    name = (lambda k: classes[k]) if classes else str

    fig, axes = plt.subplots(1, 5, figsize=(17, 3.6))
    ax = axes[0]
    ax.imshow(to_rgb(picture), cmap="gray", vmin=0, vmax=1)
    t, l = result.positions[int(result.probability.argmin())]
    ax.add_patch(Rectangle((l - 0.5, t - 0.5), result.size, result.size, color="0.5"))
    ax.set_title(f"(a) input, true: {name(result.target)}")
    ax = axes[1]
    im = ax.imshow(result.activity.numpy(), cmap="jet", extent=extent)
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_title(f"(b) {result.layer} map {result.feature}: total")
    ax = axes[2]
    ax.imshow(to_rgb(contrast_stretch(result.projection[None])[0]), cmap="gray", vmin=0, vmax=1)
    top, left, bottom, right = result.receptive_field
    ax.add_patch(Rectangle((left - 0.5, top - 0.5), right - left + 1, bottom - top + 1, fill=False, color="k", lw=2))
    ax.set_title(f"(c) projection of map {result.feature}")
    ax = axes[3]
    im = ax.imshow(result.probability.numpy(), cmap="jet", vmin=0, vmax=1, extent=extent)
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_title(f"(d) p({name(result.target)})")
    ax = axes[4]
    labels = result.label.unique().tolist()
    index = {k: i for i, k in enumerate(labels)}
    cmap = plt.get_cmap("tab10" if len(labels) <= 10 else "tab20", len(labels))
    codes = result.label.clone().apply_(lambda k: index[k])
    ax.imshow(codes.numpy(), cmap=cmap, vmin=-0.5, vmax=len(labels) - 0.5, extent=extent, interpolation="nearest")
    ax.legend(handles=[Patch(color=cmap(index[k]), label=name(k)) for k in labels], fontsize=7,
              loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title("(e) most probable label")
    for ax in axes:
        ax.set_xlim(-0.5, img.shape[2] - 0.5)
        ax.set_ylim(img.shape[1] - 0.5, -0.5)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
