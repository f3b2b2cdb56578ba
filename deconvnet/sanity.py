"""Can the picture be trusted? Sanity checks for projections (Adebayo et al. 2018, "Sanity checks for
saliency maps"; Nie et al. 2018; Sixt et al. 2020).

Sec. 2.1 reads a projection as what the unit learned; the paper assumes it and does not test it. Three
tests, per layer, for each image's strongest unit(s) (:func:`~deconvnet._analysis.strongest_units`),
for each rule of :mod:`deconvnet.deconvnet`:

1. **Cascading randomisation** (Adebayo et al. 2018, Sec. 3, Fig. 2). The parametrised modules (Conv,
   Linear, BatchNorm, ...) called up to the unit's layer, in forward order, are re-initialised from
   the layer downwards one layer at a time, cumulatively, on a ``copy.deepcopy`` of the model; after
   each step the same unit (channel, y, x) is projected again on the same image in the randomised
   model (its own switches and ReLU masks). A norm layer (BatchNorm, GroupNorm, LayerNorm, ...)
   goes with the module called just before it, so a step is one conv or linear layer with its norm.
   Re-initialisation: module ``i`` (its place in the forward order of the parametrised modules,
   counted from 0) is reset by its own ``reset_parameters()`` under ``torch.manual_seed(seed + i)``
   (BatchNorm: weight 1, bias 0, running mean 0, variance 1); a module without one gets each
   parameter redrawn from a normal distribution with the parameter's own mean and standard
   deviation. The global random state is left as it was. Similarity to the trained model's
   projection after each step, within the unit's receptive field (outside it both maps are 0, and
   those ties would count as agreement): Spearman rank correlation of ``|projection|`` summed over
   channels, SSIM of the same maps each scaled to [0, 1] by its maximum (:func:`ssim`), and the
   rank correlation of the signed maps summed over channels.
   To randomise from the logits downwards, as Adebayo et al. do for class scores, name the model's
   output layer among ``layers``: its unit is the predicted class ``(k,)``.

2. **Specificity** (Nie et al. 2018; Sixt et al. 2020). Per image and layer, the Spearman correlation
   of ``|projection|`` of the strongest unit with that of (a) other units of the same layer on the same
   image: the 2nd-4th strongest channels at the unit's position, which see the same pixels (the peaks
   of other maps lie elsewhere, with other fields, and would mostly compare where the fields lie);
   (b) the image's edge map (Sobel magnitude of the model's input, summed over channels); (c) the same
   unit projected on another image (the next one). All three within the unit's receptive field. A rule
   that mostly reconstructs the image scores high on (a) and (b).

3. **Deletion and insertion** (pixel flipping, Samek et al. 2017, adapted to a unit; insertion as in
   Petsiuk et al. 2018). Pixel positions (all channels together) are ordered by the projection's
   magnitude (``|projection|`` summed over channels, largest first, ties in raster order); in
   ``steps`` steps the first ones are removed (set to the mean pixel, 0 after preprocessing: the
   occluder of :mod:`deconvnet.occlusion`), tracking the unit's activation divided by its clean value
   and the probability of the class the model predicts on the clean image. Insertion starts from the
   all-mean image and puts the first pixels back. ``random``: a seeded random order per image, the
   same for every layer and unit; its insertion order is the deletion order reversed (a uniformly
   random order too), so random insertion reuses the images of random deletion. Step ``k`` moves
   ``floor(k P / steps)`` of the ``P`` pixels for ``k <= steps / 2`` and ``P - floor((steps - k) P /
   steps)`` above, so that steps ``k`` and ``steps - k`` split the pixels exactly. AUC: trapezoid
   over the fraction moved. Every modified image runs once (the clean and the all-mean image once per
   image), in batches: one pass of the whole model gives every layer's units and the class scores.

The work is shared where it is the same: one randomised copy serves every layer whose parametrised
modules are a prefix of another's (a unit of a lower layer cannot depend on modules called after its
layer), every rule projects on each randomised copy, and the images of each deletion step run in
batches. Every value equals the straightforward computation (tests and ``benchmarks/bench_sanity.py``).
"""
from __future__ import annotations

import copy
import math
import textwrap
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ._analysis import callable_module, eval_mode, strongest_units
from .deconvnet import RULES, Deconvnet
from .errors import UserError
from .figures import finish, new_figure
from .findings import Finding, interval_text, unmeasured
from .probe import activations, apply_at, hooks, resolve
from .runner import model_device

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from .subject import Subject

THRESHOLD = 0.5  # a projection "depends on the learned weights" when its rank correlation after
# randomising every layer below falls under this (Adebayo et al. 2018 read 0.5 as clearly changed)
OTHER_UNITS = 3  # specificity: the 2nd..4th strongest channels at the unit's position
CHUNK = 16  # modified images per forward pass on the CPU (4x that on an accelerator, where batches pay)
SHOWN_STEPS = 12  # randomisation steps drawn at most per row of draw_sanity (the last always)
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm,
          nn.LocalResponseNorm)
_SSIM_WINDOW, _SSIM_SIGMA = 11, 1.5  # Wang et al. 2004
_SSIM_C1, _SSIM_C2 = 0.01 ** 2, 0.03 ** 2  # for maps in [0, 1]


@dataclass
class LayerSanity:
    """The three tests for one layer. N images, U units per image, S randomisation steps, K = steps + 1
    points of the deletion curves.

    ``units[n]``: image n's units, strongest first (``(channel, y, x)``, or ``(k,)`` for a layer
    without maps); ``boxes[n][u]``: the unit's receptive field (top, left, bottom, right), inclusive.
    ``randomised[s]``: the modules re-initialised at step ``s + 1`` (top first: step 1 is the layer's
    own or the nearest below it). Per rule: ``spearman``, ``ssim``, ``signed`` (S, N, U), the
    similarity to the trained model's projection after each step (NaN where either map is constant:
    ``vanished`` (S, N, U) marks the units whose projection became all 0, the unit no longer firing on
    the image in the randomised model); ``shown`` (S + 1, h, w): for image
    0's first unit, ``|projection|`` summed over channels in its field, the trained model's then after
    each step (for :func:`draw_sanity`); ``projections`` (N, U, C, H, W): the trained model's, from
    which the deletion orders come. Specificity per rule (N,): ``other_units``, ``edges``,
    ``other_images`` (NaN where not measurable: a unit that does not fire, a single image).
    Deletion per order (rules and ``random``), (N, U, K): ``deletion`` and ``insertion`` of the unit's
    activation divided by ``clean_activation`` (N, U) (NaN where that is not positive), and
    ``deletion_probability``, ``insertion_probability`` of the predicted class."""

    layer: str
    units: list[list[tuple[int, ...]]]
    boxes: list[list[tuple[int, int, int, int]]]
    randomised: list[list[str]]
    spearman: dict[str, torch.Tensor]
    ssim: dict[str, torch.Tensor]
    signed: dict[str, torch.Tensor]
    vanished: dict[str, torch.Tensor]
    shown: dict[str, torch.Tensor]
    projections: dict[str, torch.Tensor]
    other_units: dict[str, torch.Tensor]
    edges: dict[str, torch.Tensor]
    other_images: dict[str, torch.Tensor]
    deletion: dict[str, torch.Tensor]
    insertion: dict[str, torch.Tensor]
    deletion_probability: dict[str, torch.Tensor]
    insertion_probability: dict[str, torch.Tensor]
    clean_activation: torch.Tensor
    fractions: torch.Tensor

    def auc(self, curves: str = "deletion") -> dict[str, torch.Tensor]:
        """Per order, the area under each curve of ``curves`` (``deletion``, ``insertion``,
        ``deletion_probability``, ``insertion_probability``) over ``fractions``: (N, U)."""
        return {order: torch.trapezoid(c.double(), self.fractions, dim=-1) for order, c in getattr(self, curves).items()}


@dataclass
class Sanity:
    """The result of :func:`sanity`: ``layers`` (as given; the default bottom to top), ``rules``;
    ``per_layer[layer]``: a :class:`LayerSanity`; ``fractions`` (K,): the fraction of pixels moved at
    each deletion step;
    ``predicted`` (N,): the class each clean image is predicted as, ``probability`` (N,) its
    probability; ``random_order`` (N, P): the seeded random pixel order per image; ``fill`` (C,): the
    value removed pixels take; ``pictures`` (N, C, H, W) in [0, 1] to draw; ``model``: the subject's
    name; ``seed``, ``steps``, ``threshold``: as used."""

    layers: list[str]
    rules: list[str]
    per_layer: dict[str, LayerSanity]
    fractions: torch.Tensor
    predicted: torch.Tensor
    probability: torch.Tensor
    random_order: torch.Tensor
    fill: torch.Tensor
    pictures: torch.Tensor
    model: str
    seed: int
    steps: int
    threshold: float = THRESHOLD


# ----------------------------------------------------------------------------- measures

def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 1..P along the last axis of ``x`` (B, P), ties given their mean rank (SciPy's
    ``rankdata``), in float64."""
    b, p = x.shape
    values, where = x.sort(dim=1, stable=True)
    new = torch.ones_like(values, dtype=torch.bool)
    new[:, 1:] = values[:, 1:] != values[:, :-1]
    group = (new.cumsum(1) - 1 + torch.arange(b, device=x.device)[:, None] * p).flatten()  # tie groups, per row
    position = torch.arange(1, p + 1, dtype=torch.float64, device=x.device).repeat(b)
    total = torch.zeros(b * p, dtype=torch.float64, device=x.device).index_add_(0, group, position)
    count = torch.zeros(b * p, dtype=torch.float64, device=x.device).index_add_(0, group, torch.ones_like(position))
    mean = (total / count.clamp_min(1))[group].reshape(b, p)
    return torch.empty_like(mean).scatter_(1, where, mean)


def rank_correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation of each row of ``a`` and ``b`` (B, ...), flattened per row (ties get
    their mean rank): (B,) float64, NaN where either row is constant."""
    ra, rb = _ranks(a.flatten(1).double()), _ranks(b.flatten(1).double())
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
    den = ((ra * ra).sum(1) * (rb * rb).sum(1)).sqrt()
    return torch.where(den > 0, (ra * rb).sum(1) / den.clamp_min(1e-300), torch.full_like(den, math.nan))


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004) of maps ``a``, ``b`` (B, h, w) in [0, 1]: a Gaussian
    window of 11 pixels, sigma 1.5 (the largest odd size that fits where a map is smaller),
    C1 = 0.01^2, C2 = 0.03^2; the mean of the SSIM map over the window positions inside the maps.
    (B,) float64."""
    x, y = a.double()[:, None], b.double()[:, None]
    size = min(_SSIM_WINDOW, x.shape[2], x.shape[3])
    size -= 1 - size % 2
    g = torch.exp(-((torch.arange(size, dtype=torch.float64, device=x.device) - (size - 1) / 2) ** 2)
                  / (2 * _SSIM_SIGMA ** 2))
    g = g / g.sum()

    def mean(t: torch.Tensor) -> torch.Tensor:  # the window's weighted mean at every position where it fits
        return (t.unfold(3, size, 1) @ g).unfold(2, size, 1) @ g

    mx, my = mean(x), mean(y)
    vx, vy, cov = mean(x * x) - mx * mx, mean(y * y) - my * my, mean(x * y) - mx * my
    s = ((2 * mx * my + _SSIM_C1) * (2 * cov + _SSIM_C2)) / ((mx * mx + my * my + _SSIM_C1) * (vx + vy + _SSIM_C2))
    return s.mean((1, 2, 3))


def _by_shape(a: list[torch.Tensor], b: list[torch.Tensor], measure: Callable) -> torch.Tensor:
    """``measure`` of each pair ``(a[i], b[i])`` of maps, batched over the pairs of one shape: (len(a),)."""
    out = torch.full((len(a),), math.nan, dtype=torch.float64)
    shapes: dict[tuple, list[int]] = {}
    for i, m in enumerate(a):
        shapes.setdefault(tuple(m.shape), []).append(i)
    for members in shapes.values():
        index = torch.tensor(members)
        out[index] = measure(torch.stack([a[i] for i in members]), torch.stack([b[i] for i in members])).cpu()
    return out


def _similarity(original: torch.Tensor, other: torch.Tensor, boxes: list) -> torch.Tensor:
    """(Spearman of |.|, SSIM of |.| each scaled to [0, 1] by its maximum, Spearman of the signed maps)
    of projections ``original[i]`` and ``other[i]`` (B, C, H, W), summed over channels within
    ``boxes[i]``: (B, 3) float64 (SSIM NaN where a map is all 0)."""
    def crops(p: torch.Tensor, i: int) -> torch.Tensor:
        top, left, bottom, right = boxes[i]
        return p[i, :, top:bottom + 1, left:right + 1].double()

    a = [crops(original, i) for i in range(len(boxes))]
    b = [crops(other, i) for i in range(len(boxes))]
    abs_a, abs_b = [m.abs().sum(0) for m in a], [m.abs().sum(0) for m in b]

    def scaled_ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        top_x, top_y = x.flatten(1).amax(1), y.flatten(1).amax(1)
        value = ssim(x / top_x.clamp_min(1e-300)[:, None, None], y / top_y.clamp_min(1e-300)[:, None, None])
        return torch.where((top_x > 0) & (top_y > 0), value, torch.full_like(value, math.nan))

    return torch.stack([_by_shape(abs_a, abs_b, rank_correlation), _by_shape(abs_a, abs_b, scaled_ssim),
                        _by_shape([m.sum(0) for m in a], [m.sum(0) for m in b], rank_correlation)], 1)


def edge_map(x: torch.Tensor) -> torch.Tensor:
    """Sobel gradient magnitude of images (N, C, H, W), summed over channels: (N, H, W) (borders
    replicated)."""
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=x.dtype, device=x.device)
    kernels = torch.stack([kx, kx.t()])[:, None].repeat(x.shape[1], 1, 1, 1)  # (2C, 1, 3, 3)
    g = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernels, groups=x.shape[1])
    g = g.reshape(len(x), x.shape[1], 2, *x.shape[2:])
    return (g[:, :, 0] ** 2 + g[:, :, 1] ** 2).sqrt().sum(1)


def pixel_order(projection: torch.Tensor) -> torch.Tensor:
    """Pixel positions (raster index into H x W) of a projection (C, H, W), largest ``|projection|``
    summed over channels first, ties in raster order: the deletion order."""
    return projection.abs().sum(0).flatten().argsort(descending=True, stable=True)


def step_counts(pixels: int, steps: int) -> list[int]:
    """Pixels moved at each of the ``steps + 1`` points: ``floor(k P / steps)`` for ``k <= steps / 2``,
    ``P`` minus that of ``steps - k`` above (so steps k and steps - k split the pixels exactly)."""
    half = [k * pixels // steps for k in range(steps // 2 + 1)]
    return half + [pixels - half[steps - k] for k in range(steps // 2 + 1, steps + 1)]


def modified(x: torch.Tensor, order: torch.Tensor, count: int, fill: torch.Tensor, insert: bool = False) -> torch.Tensor:
    """Image ``x`` (C, H, W) with the first ``count`` positions of ``order`` set to ``fill`` (C,), or,
    with ``insert``, the all-``fill`` image with those positions taken from ``x``."""
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order))
    moved = (rank < count).reshape(x.shape[1:])
    background = fill.to(x.dtype)[:, None, None].expand_as(x)
    return torch.where(moved, x, background) if insert else torch.where(moved, background, x)


# ----------------------------------------------------------------------------- randomisation

def parametrised_modules(model: nn.Module, x: torch.Tensor, layer: str) -> list[str]:
    """Names of the modules holding parameters of their own, in the order of their first call in a
    forward pass of ``x`` up to ``layer`` (the layer's own modules included): those a unit of
    ``layer`` can depend on (Adebayo et al. 2018, Sec. 3, randomise these from the top down)."""
    order: list[str] = []

    def make(name):
        def hook(_module, _inputs, _output):
            if name not in order:
                order.append(name)
        return hook

    handles = [m.register_forward_hook(make(n)) for n, m in model.named_modules()
               if n and next(m.parameters(recurse=False), None) is not None]
    with torch.no_grad(), hooks(handles):
        apply_at(model, x, layer, lambda _name, _output: None)
    return order


@torch.no_grad()
def reinitialise(module: nn.Module, seed: int) -> None:
    """Re-initialise ``module``'s own parameters as a fresh module's: ``reset_parameters()`` under
    ``torch.manual_seed(seed)``; without one, each parameter redrawn from a normal distribution with
    its own mean and standard deviation. The global random state is restored afterwards. Parameters on
    a GPU draw from its generator (other numbers than on the CPU for the same seed)."""
    gpus = sorted({p.device.index or 0 for p in module.parameters(recurse=False) if p.is_cuda})
    with torch.random.fork_rng(devices=gpus):
        torch.manual_seed(seed)
        if callable(getattr(module, "reset_parameters", None)):
            module.reset_parameters()
            return
        for p in module.parameters(recurse=False):
            std = float(p.std()) if p.numel() > 1 else 0.0
            if std > 0:
                p.normal_(float(p.mean()), std)


def randomisation_steps(model: nn.Module, names: list[str]) -> list[list[int]]:
    """The cascade's steps, top first: indices into ``names`` (forward order) re-initialised together,
    each a module with the norm layers called right after it."""
    modules = dict(model.named_modules())
    groups: list[list[int]] = []
    for i, name in enumerate(names):
        if groups and isinstance(modules[name], _NORMS):
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups[::-1]


# ----------------------------------------------------------------------------- the analysis

def _check(subject, images: torch.Tensor, layers, rules, units_per_image: int, steps: int) -> tuple[list[str], list[str]]:
    if len(images) == 0:
        raise UserError("give at least one image")
    rules = [rules] if isinstance(rules, str) else list(rules)
    for rule in rules:
        if rule not in RULES:
            raise UserError(f"unknown rule {rule!r}; use one of {', '.join(RULES)}")
    if not rules:
        raise UserError(f"give at least one rule of {', '.join(RULES)}")
    if units_per_image < 1:
        raise UserError(f"units_per_image must be >= 1, got {units_per_image}")
    if steps < 2:
        raise UserError(f"steps must be >= 2, got {steps}")
    if layers is None:
        stages = list(subject.stages)
        if not stages:
            raise UserError("this model has no default layers; name them (deconvnet inspect lists them)")
        layers = list(dict.fromkeys([stages[len(stages) // 2], stages[-1]]))
    layers = [layers] if isinstance(layers, str) else list(dict.fromkeys(layers))
    for layer in layers:
        resolve(subject.model, layer)
    return layers, list(dict.fromkeys(rules))


def _units(maps: torch.Tensor, count: int) -> list[tuple[int, ...]]:
    """The ``count`` strongest units of one image's layer output: (C, H, W) maps or a (K,) vector."""
    if maps.dim() == 3:
        return strongest_units(maps, count)
    return [(int(k),) for k in maps.flatten().argsort(descending=True, stable=True)[:count]]


def _others(maps: torch.Tensor, unit: tuple[int, ...]) -> list[tuple[int, ...]]:
    """The next :data:`OTHER_UNITS` strongest channels at ``unit``'s position (same field)."""
    values = maps[(slice(None), *unit[1:])] if maps.dim() == 3 else maps.flatten()
    order = [c for c in values.argsort(descending=True, stable=True).tolist() if c != unit[0]]
    return [(c, *unit[1:]) for c in order[:OTHER_UNITS]]


def _box(model: nn.Module, layer: str, unit: tuple[int, ...], hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """The unit's receptive field (:func:`geometry.unit_box`); the whole image for a unit without a
    position or where the geometry cannot say."""
    from .geometry import unit_box

    if len(unit) == 3:
        try:
            return unit_box(model, layer, unit[1], unit[2], hw)
        except Exception:  # noqa: BLE001 - a model the geometry cannot follow: the whole image
            pass
    return 0, 0, hw[0] - 1, hw[1] - 1


def _project(model: nn.Module, other: str, x: torch.Tensor, layer: str, pairs: list[tuple[int, tuple]],
             rules) -> dict[str, torch.Tensor]:
    """Projections of (image index, unit) ``pairs`` of ``layer`` on images ``x`` by each rule, from one
    forward pass (:meth:`Deconvnet.projections`): ``{rule: (len(pairs), C, H, W)}`` on ``x``'s device."""
    images = x[torch.tensor([n for n, _ in pairs], dtype=torch.long, device=x.device)]
    got = Deconvnet(model, other).projections(images, layer, [u for _, u in pairs], rules)
    return {rule: p.values for rule, p in got.items()}


def _forward(model: nn.Module, xs: torch.Tensor, layers: list[str], output: str,
             take: Callable[[str, torch.Tensor], torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One forward pass of ``xs`` (:func:`probe.apply_at` up to ``output``, the class scores'
    layer): ``({layer: take(layer, output)}, class scores (B, K))``, on the CPU; ``take`` runs as each
    layer's call returns."""
    def both(name: str, out: torch.Tensor):
        return (take(name, out) if name in layers else None), (out.flatten(1).clone() if name == output else None)

    x = xs.contiguous(memory_format=torch.channels_last) if xs.dim() == 4 else xs
    got = apply_at(model, x, list(dict.fromkeys([*layers, output])), both)
    return {name: got[name][0].cpu() for name in layers}, got[output][1].cpu()


def _unit_values(units: dict[str, list[list[tuple]]]) -> Callable:
    """``take`` for :func:`_forward`: each image's units of each layer, (B, U), for a batch whose row b
    is image ``rows[b]`` (set ``take.rows`` before the pass)."""
    index = {layer: torch.tensor(u, dtype=torch.long) for layer, u in units.items()}  # (N, U, 1 or 3)

    def take(name, output):
        i, rows = index[name], take.rows
        b = torch.arange(len(rows))[:, None]
        if output.dim() == 4:
            return output[b, i[rows, :, 0], i[rows, :, 1], i[rows, :, 2]].float()
        return output.flatten(1)[b, i[rows, :, 0]].float()

    take.rows = torch.zeros(0, dtype=torch.long)
    return take


@torch.no_grad()
def sanity(subject: Subject, images: torch.Tensor, layers: list[str] | None = None, rules=RULES,
           units_per_image: int = 1, steps: int = 10, seed: int = 0) -> Sanity:
    """Can the projections of ``subject``'s units be trusted? The three tests of the module docstring
    (Adebayo et al. 2018 Sec. 3; Nie et al. 2018; Sixt et al. 2020) for each image's strongest units.

    Args:
        subject: the model under study (:class:`~deconvnet.subject.Subject`; an ``nn.Module`` is wrapped
            by :func:`~deconvnet.subject.as_subject`, ImageNet preprocessing at 224 px).
        images: image files or uint8 pixels (N, C, H, W), resized to the subject's stored size
            (:meth:`Subject.images`); ``subject.prepare`` makes the input.
        layers: per-call layer names; default a middle stage and the top stage (``conv3`` and ``conv5``
            for ours, ``layer2`` and ``layer4`` for a ResNet). Name the output layer to randomise from
            the logits down (its unit: the predicted class).
        rules: projection rules (:data:`deconvnet.deconvnet.RULES`).
        units_per_image: the strongest units per image and layer (peaks of the strongest maps).
        steps: deletion/insertion steps (``steps + 1`` points).
        seed: re-initialisation (module ``i`` under ``seed + i``) and the random pixel orders.

    Runs on the model's device; the results are on the CPU.
    """
    from .subject import Subject, as_subject

    if not isinstance(subject, (Subject, nn.Module)):
        raise UserError(f"sanity takes the model under study (a Subject, or an nn.Module), got {type(subject).__name__}")
    subject = as_subject(subject)
    images = subject.images(images)
    layers, rules = _check(subject, images, layers, rules, units_per_image, steps)
    model, other = subject.model, subject.other_activations
    with eval_mode(model):
        x = subject.prepare(images).float().to(model_device(model))  # results come back to the CPU
        n_images, channels, height, width = x.shape
        hw, pixels = (height, width), height * width
        output = subject.output  # the class scores, read in the same pass as the layers
        first = activations(model, x, list(dict.fromkeys([*layers, output])))
        maps, scores = {layer: first[layer] for layer in layers}, first[output].flatten(1).cpu()
        units = {layer: [_units(maps[layer][n], units_per_image) for n in range(n_images)] for layer in layers}
        u_count = min(len(u) for per in units.values() for u in per)
        units = {layer: [u[:u_count] for u in per] for layer, per in units.items()}
        boxes = {layer: [[_box(model, layer, u, hw) for u in per] for per in units[layer]] for layer in layers}
        pairs = {layer: [(n, u) for n in range(n_images) for u in units[layer][n]] for layer in layers}
        projections = {layer: _project(model, other, x, layer, pairs[layer], rules) for layer in layers}

        cascade = _cascade(model, other, x, layers, rules, pairs, boxes, projections, seed)
        specific = _specificity(model, other, x, layers, rules, maps, units, boxes, projections)
        generator = torch.Generator().manual_seed(seed)
        random_order = torch.stack([torch.randperm(pixels, generator=generator) for _ in range(n_images)])
        fill = torch.zeros(channels)  # the mean pixel after mean subtraction, as occlusion's square
        counts = step_counts(pixels, steps)
        deletion, clean = _deletion(model, x, output, maps, scores, fill, layers, rules, units, projections,
                                    random_order, counts)

    fractions = torch.tensor(counts, dtype=torch.float64) / pixels
    probs = torch.softmax(scores.double(), 1)
    predicted = probs.argmax(1)
    per_layer = {}
    for layer in layers:
        shape = (n_images, u_count, *projections[layer][rules[0]].shape[1:])
        per_layer[layer] = LayerSanity(
            layer=layer, units=units[layer], boxes=boxes[layer], randomised=cascade[layer]["randomised"],
            spearman=cascade[layer]["spearman"], ssim=cascade[layer]["ssim"], signed=cascade[layer]["signed"],
            vanished=cascade[layer]["vanished"],
            shown=cascade[layer]["shown"], projections={r: p.reshape(shape).cpu() for r, p in projections[layer].items()},
            other_units=specific[layer]["other_units"], edges=specific[layer]["edges"],
            other_images=specific[layer]["other_images"], clean_activation=clean[layer], fractions=fractions,
            **deletion[layer])
    return Sanity(layers, rules, per_layer, fractions, predicted, probs[torch.arange(n_images), predicted].float(),
                  random_order, fill, subject.pictures(images), subject.name, seed, steps)


def _cascade(model, other, x, layers, rules, pairs, boxes, projections, seed) -> dict:
    """Cascading randomisation (Adebayo et al. 2018, Sec. 3) for every layer: per layer, the modules
    re-initialised at each step and the similarity of each rule's projection to the trained model's."""
    names = {layer: parametrised_modules(model, x[:1], layer) for layer in layers}
    chains: list[tuple[list[str], list[str]]] = []  # (the modules of one randomised copy, its layers)
    for layer in sorted(layers, key=lambda name: -len(names[name])):
        for modules, members in chains:
            if modules[:len(names[layer])] == names[layer]:
                members.append(layer)
                break
        else:
            chains.append((names[layer], [layer]))
    out = {}
    for layer in layers:
        flat_boxes = [b for per in boxes[layer] for b in per]
        groups = randomisation_steps(model, names[layer])
        out[layer] = {"randomised": [[names[layer][i] for i in g] for g in groups],
                      "spearman": {}, "ssim": {}, "signed": {}, "vanished": {}, "shown": {},
                      "_boxes": flat_boxes, "_steps": len(groups)}
        first = flat_boxes[0]
        for rule in rules:
            for key in ("spearman", "ssim", "signed"):
                out[layer][key][rule] = torch.full((len(groups), len(flat_boxes)), math.nan)
            out[layer]["vanished"][rule] = torch.zeros(len(groups), len(flat_boxes), dtype=torch.bool)
            top, left, bottom, right = first
            original = projections[layer][rule][0, :, top:bottom + 1, left:right + 1].abs().sum(0).cpu()
            out[layer]["shown"][rule] = torch.zeros(len(groups) + 1, *original.shape)
            out[layer]["shown"][rule][0] = original
    for modules, members in chains:
        if not modules:
            continue
        randomised = copy.deepcopy(model)
        named = dict(randomised.named_modules())
        due: dict[int, list[tuple[str, int]]] = {}  # step of this copy -> (layer, the layer's step)
        # a layer's step t is the copy's step that re-initialises the lowest module of the layer's group t:
        # then every module from there up to the layer is re-initialised and none below it (groups start
        # at the same modules in both lists, the layer's being a prefix of the copy's)
        start = {g[0]: s for s, g in enumerate(randomisation_steps(model, modules))}
        for layer in members:
            for t, g in enumerate(randomisation_steps(model, names[layer])):
                due.setdefault(start[g[0]], []).append((layer, t))
        for s, group in enumerate(randomisation_steps(model, modules)):
            for i in group:
                reinitialise(named[modules[i]], seed + i)
            for layer, t in due.get(s, []):
                randomised_projections = _project(randomised, other, x, layer, pairs[layer], rules)
                boxes_of = out[layer]["_boxes"]
                for rule in rules:
                    p = randomised_projections[rule]
                    sims = _similarity(projections[layer][rule], p, boxes_of).float()
                    for k, key in enumerate(("spearman", "ssim", "signed")):
                        out[layer][key][rule][t] = sims[:, k]
                    for j, (top, left, bottom, right) in enumerate(boxes_of):
                        out[layer]["vanished"][rule][t, j] = not bool(p[j, :, top:bottom + 1, left:right + 1].any())
                    top, left, bottom, right = boxes_of[0]
                    out[layer]["shown"][rule][t + 1] = p[0, :, top:bottom + 1, left:right + 1].abs().sum(0).cpu()
    n_images = len(x)
    for layer in layers:
        shape = (out[layer]["_steps"], n_images, len(out[layer]["_boxes"]) // n_images)
        for key in ("spearman", "ssim", "signed", "vanished"):
            out[layer][key] = {r: v.reshape(shape) for r, v in out[layer][key].items()}
    return out


def _specificity(model, other, x, layers, rules, maps, units, boxes, projections) -> dict:
    """Per layer and rule, per image: Spearman of |projection| of the strongest unit with other units
    at its position, with the edge map, and with the same unit on the next image (in the field)."""
    n_images = len(x)
    edges = edge_map(x)
    out = {}
    for layer in layers:
        firsts = [units[layer][n][0] for n in range(n_images)]
        others = [_others(maps[layer][n], firsts[n]) for n in range(n_images)]
        pairs = [(n, u) for n in range(n_images) for u in others[n]]
        if n_images > 1:
            pairs += [((n + 1) % n_images, firsts[n]) for n in range(n_images)]
        u_count = len(units[layer][0])
        out[layer] = {"other_units": {}, "edges": {}, "other_images": {}}
        projected = _project(model, other, x, layer, pairs, rules) if pairs else {}
        crops = []
        for n in range(n_images):
            top, left, bottom, right = boxes[layer][n][0]
            crops.append((slice(None), slice(top, bottom + 1), slice(left, right + 1)))
        for rule in rules:
            p = projected.get(rule, x.new_zeros(0, *x.shape[1:]))
            mine = [projections[layer][rule][n * u_count][crops[n]].abs().sum(0) for n in range(n_images)]
            owner, theirs = [], []  # the other units' projections come first in p, image by image
            for n in range(n_images):
                for _ in others[n]:
                    theirs.append(p[len(owner)][crops[n]].abs().sum(0))
                    owner.append(n)
            rho = _by_shape([mine[n] for n in owner], theirs, rank_correlation).numpy()
            owner = np.array(owner, dtype=int)
            other_units = [float(np.nanmean(rho[owner == n])) if np.isfinite(rho[owner == n]).any() else math.nan
                           for n in range(n_images)]
            out[layer]["other_units"][rule] = torch.tensor(other_units)
            out[layer]["edges"][rule] = _by_shape(mine, [edges[n][crops[n][1:]] for n in range(n_images)],
                                                  rank_correlation).float()
            at = len(owner)
            out[layer]["other_images"][rule] = (
                _by_shape(mine, [p[at + n][crops[n]].abs().sum(0) for n in range(n_images)], rank_correlation).float()
                if n_images > 1 else torch.full((n_images,), math.nan))
    return out


def _deletion(model, x, output, maps, scores, fill, layers, rules, units, projections, random_order,
              counts) -> tuple[dict, dict]:
    """Deletion and insertion curves (module docstring, 3.) and the units' clean values: every
    modified image runs once, in batches (:data:`CHUNK` images on the CPU), each pass giving every
    layer's units and the class scores (``output``'s). The clean images' pass is the caller's: ``maps``
    of ``layers`` and class ``scores`` (N, K)."""
    n_images, channels = x.shape[:2]
    pixels, steps = x.shape[2] * x.shape[3], len(counts) - 1
    u_count = len(units[layers[0]][0])
    take = _unit_values(units)
    take.rows = torch.arange(n_images)
    clean = {layer: take(layer, maps[layer]).cpu() for layer in layers}
    predicted = scores.argmax(1)
    # the all-mean image, the same for every image: once, every image's units read from its maps
    fill = fill.to(x.device)
    full, fill_scores = _forward(model, fill[None, :, None, None].expand(1, channels, *x.shape[2:]).clone(),
                                 layers, output, lambda _name, out: out.clone())
    at_fill = {}
    for layer in layers:
        index = torch.tensor(units[layer], dtype=torch.long)  # (N, U, d)
        out = full[layer][0]
        at_fill[layer] = (out[index[..., 0], index[..., 1], index[..., 2]] if out.dim() == 3
                          else out.flatten()[index[..., 0]]).float()
    fill_probs = torch.softmax(fill_scores.double(), 1)[0, predicted]  # (N,)
    clean_probs = torch.softmax(scores.double(), 1)[torch.arange(n_images), predicted]

    ranks: dict = {}  # order key -> (P,) rank of each position in the order
    for n in range(n_images):
        ranks["random", n] = torch.empty(pixels, dtype=torch.long)
        ranks["random", n][random_order[n]] = torch.arange(pixels)
    jobs: list[tuple[int, tuple, int, bool]] = []  # (image, order key, pixels moved, insert)
    for n in range(n_images):
        jobs += [(n, ("random", n), counts[k], False) for k in range(1, steps)]
    for layer in layers:
        for rule in rules:
            for n in range(n_images):
                for u in range(u_count):
                    key = (layer, rule, n, u)
                    order = pixel_order(projections[layer][rule][n * u_count + u]).cpu()
                    ranks[key] = torch.empty(pixels, dtype=torch.long)
                    ranks[key][order] = torch.arange(pixels)
                    jobs += [(n, key, counts[k], insert) for insert in (False, True) for k in range(1, steps)]
    row = {job: i for i, job in enumerate(jobs)}
    values = {layer: torch.empty(len(jobs), u_count) for layer in layers}
    probability = torch.empty(len(jobs), dtype=torch.float64)
    flat = x.flatten(2)  # (N, C, P)
    size = CHUNK if x.device.type == "cpu" else 4 * CHUNK
    for begin in range(0, len(jobs), size):
        chunk = jobs[begin:begin + size]
        rows = torch.tensor([n for n, _, _, _ in chunk])
        moved = torch.stack([ranks[key] < count for _, key, count, _ in chunk])[:, None].to(x.device)  # (B, 1, P)
        insert = torch.tensor([ins for _, _, _, ins in chunk])[:, None, None].to(x.device)
        source = flat[rows.to(x.device)]
        background = fill[None, :, None].expand_as(source)
        batch = torch.where(moved == insert, source, background).reshape(len(chunk), *x.shape[1:])
        take.rows = rows
        taken, s = _forward(model, batch, layers, output, take)
        for layer in layers:
            values[layer][begin:begin + len(chunk)] = taken[layer]
        probability[begin:begin + len(chunk)] = torch.softmax(s.double(), 1)[torch.arange(len(chunk)), predicted[rows]]

    def curve(n, key, insert, layer, u):
        """(activations (K,), probabilities (K,)) of one order; random insertion reads random deletion
        at ``steps - k`` (the reversed order)."""
        act, prob = torch.empty(steps + 1), torch.empty(steps + 1, dtype=torch.float64)
        for k in range(steps + 1):
            j, ins = (steps - k, False) if insert and len(key) == 2 else (k, insert)
            if j in (0, steps):
                fully = (j == steps) != ins  # every pixel is the fill
                act[k] = at_fill[layer][n, u] if fully else clean[layer][n, u]
                prob[k] = fill_probs[n] if fully else clean_probs[n]
                continue
            i = row[n, key, counts[j], ins]
            act[k], prob[k] = values[layer][i, u], probability[i]
        return act, prob

    result = {}
    for layer in layers:
        base = clean[layer]
        scale = torch.where(base > 0, base, torch.full_like(base, math.nan))
        curves = {name: {} for name in ("deletion", "insertion", "deletion_probability", "insertion_probability")}
        for order in [*rules, "random"]:
            for kind in ("deletion", "insertion"):
                act = torch.empty(n_images, u_count, steps + 1)
                prob = torch.empty(n_images, u_count, steps + 1)
                for n in range(n_images):
                    for u in range(u_count):
                        key = ("random", n) if order == "random" else (layer, order, n, u)
                        a, p = curve(n, key, kind == "insertion", layer, u)
                        act[n, u], prob[n, u] = a / scale[n, u], p.float()
                curves[kind][order] = act
                curves[f"{kind}_probability"][order] = prob
        result[layer] = curves
    return result, clean


# ----------------------------------------------------------------------------- findings, JSON, figures

def _per_image(values: torch.Tensor) -> np.ndarray:
    """(N, U) -> (N,): the mean over each image's units that were measured (NaN if none)."""
    v = values.double().numpy()
    out = np.full(len(v), np.nan)
    for n, row in enumerate(v):
        if np.isfinite(row).any():
            out[n] = np.nanmean(row)
    return out


def _paired(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    keep = np.isfinite(a) & np.isfinite(b)
    return a[keep], b[keep]


def _left_out(total: int, used: int, why: str) -> str:
    """The reading's note on images a finding could not use, counted (empty when none was left out)."""
    return f" {total - used} of {total} images left out ({why})." if used < total else ""


def sanity_findings(result: Sanity) -> list[Finding]:
    """The paper's reading of a projection, "it shows what the unit learned (Sec. 2.1)", assumed and
    not tested there, checked per layer and rule three ways, each with a 95% interval over images:

    1. Cascading randomisation (Adebayo et al. 2018, Sec. 3): 1 - Spearman rank correlation of
       ``|projection|`` after re-initialising every parametrised layer up to the unit's layer, held
       when above ``1 - THRESHOLD`` (the correlation's whole interval under :data:`THRESHOLD`), not
       held when the correlation's whole interval lies above it. A unit that stops firing in the
       randomised model leaves no projection: it counts as correlation 0. ``|projection|`` keeps the
       envelope of the receptive field (more paths reach its centre), so even two unrelated random
       networks correlate above 0 (a stack of three random linear convolutions: about 0.45); the
       signed correlation, near 0 for them, is reported beside it.
    2. Deletion (pixel flipping for the unit): deletion AUC of the random order minus the
       projection's order (paired over images), held when above 0.
    3. Specificity: similarity of the same unit on another image minus that of other units on the same
       image (paired), held when above 0 (a projection that reconstructs the image scores the reverse).
    """
    from .stats import difference_interval, mean_interval, verdict

    paper = "assumed, not tested (Sec. 2.1 reads a projection as what the unit learned)"
    total = len(result.predicted)
    out: list[Finding] = []
    for layer in result.layers:
        r = result.per_layer[layer]
        aucs = r.auc("deletion")
        insertion_aucs = r.auc("insertion")
        probability_aucs = r.auc("deletion_probability")
        for rule in result.rules:
            claim = f"projections show what the unit learned (Sec. 2.1): {rule} projections of {layer}"
            # 1. cascading randomisation
            steps = len(r.randomised)
            if steps == 0:
                out.append(unmeasured(f"{claim} depend on the learned weights", paper,
                                      f"{layer} has no parametrised module below it to randomise"))
            else:
                last = r.spearman[rule][-1].clone()
                gone = r.vanished[rule][-1]
                last[gone] = 0.0  # nothing of the picture is left
                rho = _per_image(last)
                rho = rho[np.isfinite(rho)]
                if len(rho) == 0:
                    out.append(unmeasured(f"{claim} depend on the learned weights", paper,
                                          "no unit's projection could be compared (all zero)"))
                else:
                    mean, interval = mean_interval(rho.tolist())
                    decorrelation = (1 - interval[1], 1 - interval[0]) if interval else None
                    v = verdict(decorrelation, 1 - result.threshold)
                    structural = float(np.nanmean(_per_image(r.ssim[rule][-1])))
                    signed = float(np.nanmean(_per_image(r.signed[rule][-1])))
                    words = {"estimate": 1 - mean, "interval": decorrelation, "n": len(rho), "unit": "images"}
                    out.append(Finding(
                        f"{claim} depend on the learned weights: they change when every layer below is "
                        "re-initialised (cascading randomisation)",
                        f"{paper}; Adebayo et al. 2018 (Sec. 3, Fig. 2) find guided backprop nearly unchanged",
                        {"rank_correlation": mean, "rank_correlation_interval": list(interval) if interval else None,
                         "ssim": structural, "signed_rank_correlation": signed, "steps": steps,
                         "vanished_units": int(gone.sum()), "images": total, "left_out": total - len(rho),
                         "first_step_rank_correlation": float(np.nanmean(_per_image(r.spearman[rule][0])))},
                        v,
                        f"After re-initialising all {steps} parametrised layers up to {layer}, the {rule} projection "
                        f"keeps a rank correlation of {mean:.2f} with the trained model's (SSIM {structural:.2f}, "
                        f"signed {signed:.2f})"
                        + (f"; {int(gone.sum())} unit(s) stopped firing, their projection vanished (counted as "
                           "correlation 0)" if gone.any() else "")
                        + f"; 1 - correlation: {interval_text(words)}. "
                        + {"held": "The picture depends on the learned weights.",
                           "not held": "The picture survives the loss of the learned weights: it shows the "
                                       "architecture and the image more than what the unit learned.",
                           "inconclusive": f"The interval contains {1 - result.threshold:g}: the data cannot tell."}[v]
                        + _left_out(total, len(rho), "a constant projection has no rank correlation"),
                        quantity=f"1 - Spearman rank correlation of |projection| with the trained model's after "
                                 f"re-initialising every layer up to {layer}, mean over images (held when above "
                                 f"{1 - result.threshold:g}: correlation below {result.threshold:g})",
                        estimate=1 - mean, interval=decorrelation, n=len(rho), unit="images",
                        threshold=1 - result.threshold,
                        if_not_held="Of the rule and the architecture, not the scale: Adebayo et al. (2018) and Nie "
                                    "et al. (2018) find such projections nearly unchanged by randomisation in "
                                    "ImageNet-size networks too."))
            # 2. deletion
            random, ours = _paired(_per_image(aucs["random"]), _per_image(aucs[rule]))
            if len(ours) == 0:
                out.append(unmeasured(f"{claim} find the pixels the unit responds to", paper,
                                      "no unit with a positive clean activation"))
            else:
                diff, interval = difference_interval(random, ours)
                v = verdict(interval)
                ins_rule, ins_random = _paired(_per_image(insertion_aucs[rule]), _per_image(insertion_aucs["random"]))
                words = {"estimate": diff, "interval": interval, "n": len(ours), "unit": "images"}
                out.append(Finding(
                    f"{claim} find the pixels the unit responds to: removing them first lowers the unit faster "
                    "than removing random pixels (deletion)",
                    f"{paper}; pixel flipping (Samek et al. 2017) adapted to one unit",
                    {"deletion_auc": float(ours.mean()), "random_deletion_auc": float(random.mean()),
                     "insertion_auc": float(ins_rule.mean()) if len(ins_rule) else None,
                     "random_insertion_auc": float(ins_random.mean()) if len(ins_random) else None,
                     "class_probability_deletion_auc": float(np.nanmean(_per_image(probability_aucs[rule]))),
                     "random_class_probability_deletion_auc":
                         float(np.nanmean(_per_image(probability_aucs["random"]))),
                     "images": total, "left_out": total - len(ours)},
                    v,
                    f"Removing pixels in the {rule} projection's order leaves the unit an area of {ours.mean():.2f} "
                    f"of its clean activation, random order {random.mean():.2f}; random minus projection "
                    f"{interval_text(words)}. Insertion: {ins_rule.mean():.2f} against {ins_random.mean():.2f} "
                    "at random. "
                    + {"held": "The projection ranks the pixels the unit depends on first.",
                       "not held": "Random pixels matter more to the unit than the projection's first ones.",
                       "inconclusive": "The interval contains 0."}[v]
                    + _left_out(total, len(ours), "the unit does not fire on the clean image"),
                    quantity="deletion AUC of the unit's activation (divided by its clean value) over the fraction "
                             "removed: random order minus the projection's, paired over images",
                    estimate=diff, interval=interval, n=len(ours), unit="images",
                    if_not_held="Of the set-up more than the scale: pixel-wise removal to the mean pixel makes "
                                "edges the unit may respond to (Sixt et al. 2020), at any scale."))
            # 3. specificity
            same, others = _paired(r.other_images[rule].double().numpy(), r.other_units[rule].double().numpy())
            if len(same) == 0:
                out.append(unmeasured(f"{claim} are specific to the unit", paper,
                                      "needs two or more images with units that fire"))
            else:
                diff, interval = difference_interval(same, others)
                v = verdict(interval)
                edge = float(np.nanmean(r.edges[rule].numpy())) if np.isfinite(r.edges[rule].numpy()).any() else None
                words = {"estimate": diff, "interval": interval, "n": len(same), "unit": "images"}
                out.append(Finding(
                    f"{claim} are specific to the unit: the same unit on another image is more alike than other "
                    "units on the same image",
                    f"{paper}; Nie et al. 2018 show guided backprop and the deconvnet reconstruct the image",
                    {"same_unit_other_image": float(same.mean()), "other_units_same_image": float(others.mean()),
                     "edge_map": edge, "images": total, "left_out": total - len(same)},
                    v,
                    f"In the unit's field, |projection| correlates {others.mean():.2f} with other units' on the same "
                    f"image, {same.mean():.2f} with the same unit's on another image"
                    + (f" and {edge:.2f} with the image's edges" if edge is not None else "")
                    + f"; same unit minus other units {interval_text(words)}. "
                    + {"held": "The projection follows the unit more than the image.",
                       "not held": "The projection follows the image more than the unit.",
                       "inconclusive": "The interval contains 0."}[v]
                    + _left_out(total, len(same), "the unit does not fire on the next image, or a projection is "
                                                  "constant"),
                    quantity="Spearman of |projection| in the unit's field: same unit on the next image minus the "
                             f"{OTHER_UNITS} next strongest channels at the unit's position on the same image, paired "
                             "over images",
                    estimate=diff, interval=interval, n=len(same), unit="images",
                    if_not_held="Of the rule: a projection that reconstructs the image (Nie et al. 2018) looks "
                                "alike for every unit of an image at any scale."))
    return out


def _clean(value):
    """Nested lists of floats with NaN as None (JSON has no NaN)."""
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


def sanity_to_json(result: Sanity) -> dict:
    """The numbers of :class:`Sanity` as plain JSON types (NaN as null); the projections and pictures
    are left out."""
    layers = {}
    for layer in result.layers:
        r = result.per_layer[layer]
        layers[layer] = {
            "units": [[list(u) for u in per] for per in r.units],
            "receptive_fields": [[list(b) for b in per] for per in r.boxes],
            "randomised": r.randomised,
            "cascade": {key: {rule: _clean(t.tolist()) for rule, t in getattr(r, key).items()}
                        for key in ("spearman", "ssim", "signed", "vanished")},
            "specificity": {key: {rule: _clean(t.tolist()) for rule, t in getattr(r, key).items()}
                            for key in ("other_units", "edges", "other_images")},
            "clean_activation": _clean(r.clean_activation.tolist()),
            "curves": {key: {order: _clean(t.tolist()) for order, t in getattr(r, key).items()}
                       for key in ("deletion", "insertion", "deletion_probability", "insertion_probability")},
            "auc": {key: {order: _clean(t.tolist()) for order, t in r.auc(key).items()}
                    for key in ("deletion", "insertion", "deletion_probability", "insertion_probability")},
        }
    return {"model": result.model, "layers": result.layers, "rules": result.rules, "seed": result.seed,
            "steps": result.steps, "threshold": result.threshold, "fractions": result.fractions.tolist(),
            "predicted": result.predicted.tolist(), "probability": result.probability.tolist(),
            "fill": result.fill.tolist(), "per_layer": layers}


def _display(m: torch.Tensor) -> np.ndarray:
    """A map scaled to [0, 1] for display: by its 99th percentile, clipped (a few bright pixels would
    leave the rest black)."""
    top = float(torch.quantile(m.flatten().double(), 0.99)) if m.numel() > 1 else float(m.max())
    top = top if top > 0 else float(m.max())
    return (m / top).clamp(0, 1).numpy() if top > 0 else np.zeros(tuple(m.shape))


def draw_sanity(result: Sanity, path=None, layer: str | None = None) -> Figure:
    """Adebayo et al. 2018 Fig. 2 for one image and unit (image 0's strongest unit of ``layer``,
    default the top layer): rows are the rules, columns the input in the unit's field, the trained
    model's projection, then the projection after each cascading randomisation step (re-initialised
    down to the module named above it; at most :data:`SHOWN_STEPS` steps, evenly spaced, the last
    always). Each panel is ``|projection|`` summed over channels in the field, scaled by its own 99th
    percentile, with its rank correlation to the trained model's."""
    from ._analysis import to_rgb

    layer = result.layers[-1] if layer is None else layer
    if layer not in result.per_layer:
        raise UserError(f"no sanity results for layer {layer!r}; have {', '.join(result.layers)}")
    r = result.per_layer[layer]
    total = len(r.randomised)
    shown = sorted(set(np.linspace(1, total, min(total, SHOWN_STEPS)).round().astype(int).tolist())) if total else []
    cols = 2 + len(shown)
    rows = len(result.rules)
    width = max(7.0, 1.3 * cols + 0.5)
    fig, axes = new_figure(rows, cols, figsize=(width, 1.55 * rows + 1.1), squeeze=False)
    top, left, bottom, right = r.boxes[0][0]
    picture = result.pictures[0, :, top:bottom + 1, left:right + 1]
    for i, rule in enumerate(result.rules):
        panels = [("input\n(field)", None, None, False), ("trained\n", r.shown[rule][0], None, False)]
        panels += [(f"step {s}\n{r.randomised[s - 1][0]}", r.shown[rule][s], float(r.spearman[rule][s - 1, 0, 0]),
                    bool(r.vanished[rule][s - 1, 0, 0])) for s in shown]
        for j, (title, img, rho, gone) in enumerate(panels):
            ax = axes[i, j]
            if img is None:
                ax.imshow(to_rgb(picture), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            else:
                ax.imshow(_display(img), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(title, fontsize=6.5)
            if gone:
                ax.set_xlabel("vanished", fontsize=7)
            elif rho is not None:
                ax.set_xlabel(f"\u03c1 = {rho:.2f}" if math.isfinite(rho) else "\u03c1 n/a", fontsize=7)
        axes[i, 0].set_ylabel(rule, fontsize=9)
    unit = ", ".join(str(v) for v in r.units[0][0])
    words = (f"each step re-initialises one more layer (with its norm) from {layer} down, {total} in all "
             "(Adebayo et al. 2018, Fig. 2); \u03c1: Spearman of |projection| with the trained model's")
    fig.suptitle(f"{result.model}: cascading randomisation of {layer} unit ({unit}), image 0, in its field\n"
                 + textwrap.fill(words, int(width * 16)), fontsize=8)
    return finish(fig, path)


def draw_deletion(result: Sanity, path=None) -> Figure:
    """Deletion and insertion curves: rows are the layers; columns the unit's activation (divided by its
    clean value) under deletion and insertion, then the predicted class's probability under both. Each
    rule's mean over images in colour with its 95% interval as a band, the random order in grey
    (dashed); the legend gives each order's mean AUC."""
    from .stats import mean_interval

    panels = [("deletion", "unit activation / clean"), ("insertion", "unit activation / clean"),
              ("deletion_probability", "p(predicted class)"), ("insertion_probability", "p(predicted class)")]
    colours = {"deconvnet": "tab:blue", "guided": "tab:orange", "gradient": "tab:green", "random": "0.4"}
    x = result.fractions.numpy()
    fig, axes = new_figure(len(result.layers), 4, figsize=(15, 3.1 * len(result.layers) + 0.4), squeeze=False)
    for row, layer in zip(axes, result.layers):
        r = result.per_layer[layer]
        for ax, (key, label) in zip(row, panels):
            aucs = r.auc(key)
            for order, curves in getattr(r, key).items():
                per_image = np.stack([_per_image(curves[:, :, k]) for k in range(len(x))], 1)  # (N, K)
                mean, low, high = [], [], []
                for k in range(len(x)):
                    v = per_image[:, k][np.isfinite(per_image[:, k])]
                    if len(v) == 0:
                        mean.append(np.nan), low.append(np.nan), high.append(np.nan)
                        continue
                    m, interval = mean_interval(v.tolist())
                    mean.append(m)
                    low.append(interval[0] if interval else m)
                    high.append(interval[1] if interval else m)
                colour = colours.get(order)
                auc = float(np.nanmean(_per_image(aucs[order]))) if np.isfinite(_per_image(aucs[order])).any() else math.nan
                ax.fill_between(x, low, high, color=colour, alpha=0.15, lw=0)
                ax.plot(x, mean, color=colour, lw=1.8, ls="--" if order == "random" else "-",
                        label=f"{order} (AUC {auc:.3f})")
            ax.set_title(f"{layer}: {key.replace('_', ' ')}", fontsize=10)
            ax.set_xlabel("fraction of pixels " + ("inserted" if key.startswith("insertion") else "removed"))
            ax.set_ylabel(label)
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
    fig.suptitle(f"{result.model}: deletion and insertion for each image's strongest unit, "
                 f"mean over {len(result.predicted)} images with 95% intervals", fontsize=10)
    return finish(fig, path)


callable_module(__name__, sanity)
