"""The deconvnet (Sec. 2.1, Fig. 1): project any activation of a convnet back to input pixels.

From one activation of a named layer, every other activation of that layer set to zero, the signal
goes down to pixel space by repeatedly (i) unpooling with the switches recorded on the forward pass,
(ii) rectifying with a ReLU and (iii) filtering with the layer's transposed filters. No contrast
normalisation and no biases on the way down. That is back-propagation with two changes (Sec. 2.1):
each ReLU rectifies the signal itself instead of gating it by the forward pass, and local response
norm passes the signal unchanged. So a projection is autograd with a hook on every ReLU's backward
node; only that hook differs between the rules ``deconvnet`` (the paper), ``guided`` (guided
backprop, Springenberg et al. 2015: rectify and gate) and ``gradient`` (plain back-propagation).

Speed: a unit depends only on the input under its receptive field, so each projection runs forward
and backward over that crop alone, and many (image, unit) pairs go through in one batch.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .errors import UserError
from .geometry import Step, output_sizes, receptive_field, steps_to
from .probe import apply_at, find_module, hooks

RULES = ("deconvnet", "guided", "gradient")
_RELU_NODES = {"ReluBackward0", "ReluBackward1", "ThresholdBackward0", "ThresholdBackward1"}
_SPATIAL_NODES = {"ConvolutionBackward0", "MaxPool2DWithIndicesBackward0", "AvgPool2DBackward0"}
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


def _chain(root, x: torch.Tensor, leads: dict) -> list | None:
    """The nodes from ``root`` down to ``x`` if they form a single chain (no branch, no skip), else None."""
    path, node = [], root
    while getattr(node, "variable", None) is not x:
        path.append(node)
        below = [n for n in _next(node) if leads.get(n)]
        if len(below) != 1:
            return None
        node = below[0]
    return path


class Deconvnet:
    """Projects activations of ``model`` down to its input pixels (Zeiler & Fergus 2014, Sec. 2.1).

    Preconditions: ``model`` is in eval mode and its ReLUs are ``nn.ReLU`` modules (in-place or not),
    so the rule can be attached to them; a ReLU applied as a function is an error for the
    ``deconvnet`` and ``guided`` rules. Max-pool backward is the unpooling with switches;
    ``nn.LocalResponseNorm`` passes the signal down unchanged. Works on our models and on
    torchvision-style ones (``features.10``).
    """

    def __init__(self, model: nn.Module):
        self.model = model

    def project(self, images: torch.Tensor, layer: str, units, rule: str = "deconvnet") -> torch.Tensor:
        """Project one activation per image down to pixel space.

        Args:
            images: (N, C, H, W), as the model takes them.
            layer: module name (``conv5``, ``features.10``); the activation is that module's output.
            units: N positions ``(channel, y, x)`` in the layer's output, one per image (repeat an image
                to project several of its units); ``(channel,)`` for a fully connected layer.
            rule: ``deconvnet`` (Sec. 2.1), ``guided`` or ``gradient``.

        Returns:
            (N, C, H, W) projections. The seed is the activation's own value with every other
            activation of the layer zero (Sec. 2.1), so a projection scales with how strongly it fires.

        Each unit runs forward and backward over the crop of the input under its receptive field
        alone, the crop's origin a multiple of the layer's total stride so that every pooling window
        and switch lines up with the full image: the result is that of the full image. Where the
        geometry cannot vouch for that (branches, non-square kernels, layers above the convs) the
        full image runs.
        """
        if rule not in RULES:
            raise UserError(f"unknown rule {rule!r}; use one of {', '.join(RULES)}")
        if self.model.training:
            raise UserError("the model is in training mode; call model.eval() before projecting")
        find_module(self.model, layer)
        if images.dim() != 4:
            raise UserError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
        units = [tuple(int(v) for v in u) for u in units]
        if len(units) != len(images):
            raise UserError(f"{len(units)} units for {len(images)} images; give one (channel, y, x) per image")
        steps = self._steps(layer)
        if steps is not None and all(len(u) == 3 for u in units):
            result = self._project_crops(images, layer, units, rule, steps)
            if result is not None:
                return result
        return torch.cat([self._run(images[i:i + _CHUNK], layer, units[i:i + _CHUNK], rule)
                          for i in range(0, len(images), _CHUNK)])

    def _steps(self, layer: str) -> list[Step] | None:
        try:
            steps = steps_to(self.model, layer)
        except UserError:  # non-square or dilated kernels, or a layer above the spatial ones
            return None
        return steps or None

    def _project_crops(self, images, layer, units, rule, steps) -> torch.Tensor | None:
        """Projections computed on receptive-field crops; None if the model is not a plain chain."""
        h, w = images.shape[-2:]
        stride = math.prod(s.stride for s in steps)
        out_h, out_w = output_sizes(steps, h)[-1], output_sizes(steps, w)[-1]
        top, left, bottom, right = receptive_field(steps, 0, 0)
        crop_h = _crop_size(h, bottom - top + 1, top % stride, stride)
        crop_w = _crop_size(w, right - left + 1, left % stride, stride)
        origins = []
        for c, y, x in units:
            if not (0 <= y < out_h and 0 <= x < out_w):
                return None  # the full image says why (or the geometry was wrong)
            top, left, _, _ = receptive_field(steps, y, x)
            origins.append((min(max(top, 0) // stride * stride, h - crop_h),
                            min(max(left, 0) // stride * stride, w - crop_w)))
        result = torch.zeros_like(images)
        for start in range(0, len(units), _CHUNK):
            chunk = range(start, min(start + _CHUNK, len(units)))
            crops = torch.stack([images[i, :, origins[i][0]:origins[i][0] + crop_h,
                                        origins[i][1]:origins[i][1] + crop_w] for i in chunk])
            crop_units = [(units[i][0], units[i][1] - origins[i][0] // stride, units[i][2] - origins[i][1] // stride)
                          for i in chunk]
            grads = self._run(crops, layer, crop_units, rule, steps)
            if grads is None:
                return None
            for grad, i in zip(grads, chunk):
                result[i, :, origins[i][0]:origins[i][0] + crop_h, origins[i][1]:origins[i][1] + crop_w] = grad
        return result

    def _run(self, x: torch.Tensor, layer: str, units: list[tuple], rule: str,
             steps: list[Step] | None = None) -> torch.Tensor | None:
        """One forward/backward pass. With ``steps`` (a crop run): None unless the graph is their chain."""
        x = x.detach().clone().requires_grad_(True)  # a leaf of our own (also from inference-mode tensors)
        names: dict = {}  # autograd node -> name of the module whose output it made
        relus: set = set()  # backward nodes of nn.ReLU modules
        node_handles: list = []
        hook_rule = _relu_hook(rule)

        def make_hook(name: str):
            def hook(module, inputs, output):
                if not isinstance(output, torch.Tensor):
                    return None
                if isinstance(module, nn.LocalResponseNorm):  # no contrast normalisation on the way down
                    output = _SkipBackward.apply(inputs[0], output.detach())
                if isinstance(module, nn.ReLU):
                    relus.add(output.grad_fn)
                    if rule != "gradient":
                        node_handles.append(output.grad_fn.register_hook(hook_rule))
                names.setdefault(output.grad_fn, name)
                return output
            return hook

        leaves = [(n, m) for n, m in self.model.named_modules() if n and not list(m.children())]
        forward_hooks = [m.register_forward_hook(make_hook(n)) for n, m in leaves]
        with torch.enable_grad(), hooks(node_handles), hooks(forward_hooks):
            out = apply_at(self.model, x, layer, lambda _name, output: output)[layer]  # in the graph
            for u in units:
                if len(u) != out.dim() - 1 or not all(0 <= v < s for v, s in zip(u, out.shape[1:])):
                    raise UserError(f"unit {u} is outside {layer}'s output of shape {tuple(out.shape[1:])}")
            leads = _leads_to(out.grad_fn, x)
            if rule != "gradient":
                _check_relus(leads, relus, names, rule)
            if steps is not None and not _is_chain_of(steps, out, x, leads, names):
                return None
            index = (torch.arange(len(x)), *zip(*units))
            seed = torch.zeros_like(out)
            seed[index] = out.detach()[index]
            (grad,) = torch.autograd.grad(out, x, seed)
        return grad


def _check_relus(leads: dict, relus: set, names: dict, rule: str) -> None:
    """A clear error for a ReLU applied as a function: the rule could not be attached to it."""
    for node, on_path in leads.items():
        if on_path and node.name() in _RELU_NODES and node not in relus:
            after = [names[n] for n in _next(node) if n in names]
            where = f" to the output of {after[0]!r}" if after else ""
            raise UserError(f"the model applies a ReLU as a function (torch.relu / F.relu){where}, not as an "
                            f"nn.ReLU module, so the {rule} rule cannot act on it; make it an nn.ReLU module")


def _is_chain_of(steps: list[Step], out: torch.Tensor, x: torch.Tensor, leads: dict, names: dict) -> bool:
    """Whether ``x`` -> ``out`` is one chain whose convs and pools are exactly ``steps``, in order."""
    path = _chain(out.grad_fn, x, leads)
    if path is None:
        return False
    spatial = [names.get(n) for n in reversed(path) if n.name() in _SPATIAL_NODES]
    sizes = (output_sizes(steps, x.shape[-2])[-1], output_sizes(steps, x.shape[-1])[-1])
    return spatial == [s.name for s in steps] and tuple(out.shape[-2:]) == sizes


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


def draw_projection(picture: torch.Tensor, projection: torch.Tensor, box: tuple[int, int, int, int], path,
                    title: str = "") -> None:
    """One PNG: the input (C, H, W) in [0, 1] with the unit's receptive field ``box`` outlined, the
    projection (C, H, W) contrast-stretched, and both cut to the field side by side."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from ._analysis import to_rgb

    top, left, bottom, right = box
    stretched = contrast_stretch(projection[None])[0]
    field = contrast_stretch(projection[None, :, top:bottom + 1, left:right + 1])[0]
    gap = torch.ones(field.shape[0], field.shape[1], max(1, field.shape[2] // 10))
    patch = picture[:, top:bottom + 1, left:right + 1]
    panels = [("input and receptive field", picture), ("projection", stretched),
              ("in the field: projection | input", torch.cat([field, gap, patch], 2))]
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.6))
    for ax, (name, img) in zip(axes, panels):
        ax.imshow(to_rgb(img), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    axes[0].add_patch(Rectangle((left - 0.5, top - 0.5), right - left + 1, bottom - top + 1,
                                fill=False, edgecolor="red", linewidth=1.5))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
