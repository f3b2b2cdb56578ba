"""Correspondence (Sec. 4.3, Table 1): mask the same object part in N images of one kind of object in
a similar pose and measure how consistently the features change.

For image i and layer l, eps_i = x_i - x~_i (features of the original minus the masked image);
Delta_l = sum over pairs i != j of H(sign(eps_i), sign(eps_j)), H the Hamming distance normalised by
the feature count. Table 1 reports, per part, the mean +- std of H over the pairs (so
Delta_l = N (N - 1) x mean); the control masks random boxes of the same sizes inside the object,
repeated with a seed, and pools all its pairs. Lower means tighter correspondence.

Fashion-MNIST (the embedded data) has no faces; its sneakers are photographed side-on with the toe to
the left, the heel to the right and the opening on top, so ``FASHION_PARTS["Sneaker"]`` names three
parts as fractions (top, left, bottom, right) of each sneaker's bounding box:
toe (lower left), heel (right end), laces (the opening, top centre).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from dataclasses import dataclass

import numpy as np
import torch

from ._analysis import callable_module, features, to_rgb
from .errors import UserError
from .figures import finish, new_figure
from .findings import Finding

if TYPE_CHECKING:
    from matplotlib.figure import Figure

Box = tuple[int, int, int, int]  # (top, left, bottom, right), inclusive pixel coordinates

FASHION_PARTS = {
    "Sneaker": {"toe": (0.4, 0.0, 1.0, 0.3), "heel": (0.0, 0.72, 0.75, 1.0), "laces": (0.0, 0.38, 0.5, 0.68)},
}


def object_box(mask: torch.Tensor) -> Box:
    """The bounding box of an object's pixels, ``mask`` bool (H, W); the whole image if it has none."""
    ys, xs = mask.nonzero(as_tuple=True)
    if len(ys) == 0:
        return 0, 0, mask.shape[0] - 1, mask.shape[1] - 1
    return int(ys.min()), int(xs.min()), int(ys.max()), int(xs.max())


def relative_box(frame: Box, fractions: tuple[float, float, float, float]) -> Box:
    """The box at ``fractions`` (top, left, bottom, right in 0..1) of ``frame``."""
    top, left, bottom, right = frame
    h, w = bottom - top + 1, right - left + 1
    t, l, b, r = fractions
    return (top + round(t * h), left + round(l * w), top + max(round(b * h) - 1, round(t * h)),
            left + max(round(r * w) - 1, round(l * w)))


def random_boxes(like: list[Box], frames: list[Box], shape: tuple[int, int], generator: torch.Generator) -> list[Box]:
    """Per image, a box the size of ``like[i]`` at a uniformly random place inside ``frames[i]``
    (pushed back into the ``shape`` (H, W) image when the frame is smaller than the box)."""
    out = []
    for (t, l, b, r), (ft, fl, fb, fr) in zip(like, frames):
        h, w = b - t + 1, r - l + 1
        y = ft + int(torch.randint(max(1, fb - ft + 2 - h), (1,), generator=generator))
        x = fl + int(torch.randint(max(1, fr - fl + 2 - w), (1,), generator=generator))
        y, x = min(y, shape[0] - h), min(x, shape[1] - w)
        out.append((y, x, y + h - 1, x + w - 1))
    return out


def mask_boxes(images: torch.Tensor, boxes: list[Box], fill=None) -> torch.Tensor:
    """A copy of ``images`` (N, C, H, W) with ``boxes[i]`` of image i set to ``fill`` (default 0, the
    mean pixel in the model's input space)."""
    out = images.clone()
    value = 0.0 if fill is None else torch.as_tensor(fill, dtype=images.dtype).reshape(-1, 1, 1)
    for i, (t, l, b, r) in enumerate(boxes):
        out[i, :, t:b + 1, l:r + 1] = value
    return out


def sign_hamming(eps: torch.Tensor) -> torch.Tensor:
    """Normalised Hamming distance between sign(eps_i) and sign(eps_j) for every pair i < j:
    eps (N, D) -> (N (N - 1) / 2,)."""
    s = eps.sign()
    i, j = torch.triu_indices(len(s), len(s), offset=1)
    return (s[i] != s[j]).float().mean(1)


@dataclass
class Correspondence:
    """Table 1: per set of masks (each part, and ``"random"``) and layer, the pairwise Hamming
    distances of the sign changes; ``boxes`` holds each set's box per image."""

    layers: list[str]
    boxes: dict[str, list[list[Box]]]  # set -> one list of per-image boxes per draw (parts: one draw)
    hamming: dict[str, dict[str, torch.Tensor]]  # set -> layer -> pair distances, all draws pooled
    seed: int

    def delta(self, name: str, layer: str) -> float:
        """Delta_l of Sec. 4.3, the sum over ordered pairs i != j (for ``"random"``, the mean over draws)."""
        n = len(self.boxes[name][0])
        return n * (n - 1) * float(self.hamming[name][layer].mean())


@torch.no_grad()
def correspondence(model, images, parts: dict[str, list[Box]], objects: list[Box] | None = None,
                   layers: list[str] | None = None, repeats: int = 5, seed: int = 0, fill=None) -> Correspondence:
    """Table 1 for ``images``, N >= 2 (Sec. 4.3).

    Args:
        model: the model under study (:class:`~deconvnet.subject.Subject`), or an ``nn.Module``
            wrapped by :func:`~deconvnet.subject.as_subject`.
        images: image files or uint8 pixels (N, C, H, W), preprocessed; or a float tensor, the
            model's input as it is (:meth:`Subject.inputs`). The boxes are in the model's input.
        parts: part name -> its box (top, left, bottom, right) in every image.
        objects: each image's object box, where random boxes go; default the whole image.
        layers: default layers 5 and 7 (ours: ``pool5``, ``relu7``).
        repeats: random draws per part size (the control masks random boxes the size of each part).
        seed: seeds the random boxes.
        fill: the mask's value, default 0 (the mean pixel).
    """
    from .subject import as_subject

    subject = as_subject(model, like=images)
    pixels, to_input = subject.inputs(images)
    model, images = subject.model, to_input(pixels)
    n, _, height, width = images.shape
    if n < 2:
        raise UserError("correspondence needs at least 2 images")
    if "random" in parts:
        raise UserError("'random' names the control; call the part something else")
    for name, boxes in parts.items():
        if len(boxes) != n:
            raise UserError(f"part {name!r} has {len(boxes)} boxes for {n} images")
        for t, l, b, r in boxes:
            if not (0 <= t <= b < height and 0 <= l <= r < width):
                raise UserError(f"part {name!r}: box {(t, l, b, r)} is not inside the {height}x{width} image")
    layers = subject.layers(layers, [5, 7])
    objects = objects or [(0, 0, height - 1, width - 1)] * n
    generator = torch.Generator().manual_seed(seed)
    sets = {name: [list(boxes)] for name, boxes in parts.items()}
    sets["random"] = [random_boxes(boxes, objects, (height, width), generator)
                      for _ in range(repeats) for boxes in parts.values()]
    draws = [(name, boxes) for name, all_boxes in sets.items() for boxes in all_boxes]
    masked = torch.cat([images] + [mask_boxes(images, boxes, fill) for _, boxes in draws])
    f = features(model, masked, layers)
    hamming: dict[str, dict[str, list[torch.Tensor]]] = {name: {l: [] for l in layers} for name in sets}
    for k, (name, _) in enumerate(draws, start=1):
        for layer in layers:
            eps = f[layer][:n] - f[layer][k * n:(k + 1) * n]
            hamming[name][layer].append(sign_hamming(eps))
    pooled = {name: {l: torch.cat(v) for l, v in by_layer.items()} for name, by_layer in hamming.items()}
    return Correspondence(layers, sets, pooled, seed)


def pair_matrix(hamming: torch.Tensor, n: int) -> np.ndarray:
    """The pair distances of one set (``Correspondence.hamming[set][layer]``, draws pooled) as an (n, n)
    symmetric matrix, the draws averaged per pair; the diagonal is 0 and never read."""
    per_pair = hamming.view(-1, n * (n - 1) // 2).mean(0).double().numpy()
    out = np.zeros((n, n))
    i, j = torch.triu_indices(n, n, offset=1).numpy()
    out[i, j] = out[j, i] = per_pair
    return out


def image_bootstrap(difference: np.ndarray) -> tuple[float, tuple[float, float] | None]:
    """The mean of ``difference`` (n, n) over pairs of distinct images and its 95% interval, resampling
    images, not pairs (:func:`stats.unit_interval`: a bootstrap of images, the jackknife below 20): the
    pairs share images, so they are not independent. A resample's pairs are those of two different draws
    of two different images; a resample of one image drawn n times has no pair and counts as 0 (no
    difference), which can only widen the interval to 0. No interval for two images: leaving one out
    leaves no pair."""
    from .stats import unit_interval

    def mean_over_pairs(picked: np.ndarray) -> float:
        idx = picked.astype(int)
        distinct = idx[:, None] != idx[None, :]
        return float(difference[np.ix_(idx, idx)][distinct].mean()) if distinct.any() else 0.0

    return unit_interval(mean_over_pairs, len(difference))


def correspondence_findings(result: Correspondence) -> list[Finding]:
    """Table 1's reading (Sec. 4.3): every named part scores a lower mean H than random boxes at the first
    layer (layer 5).

    Set-up: per part, random's mean H minus the part's, over the pairs of images (the random draws
    averaged per pair), with a 95% interval from resampling images (:func:`image_bootstrap`); held when
    every part's interval lies above 0 (:func:`stats.all_of`). At the last layer (layer 7) the paper finds
    no difference and states no margin, so those differences are reported with their intervals in
    ``ours`` and the reading, without a verdict of their own."""
    from .findings import interval_text
    from .stats import all_of, verdict

    low, high = result.layers[0], result.layers[-1]
    parts = [name for name in result.hamming if name != "random"]
    n = len(result.boxes[parts[0]][0]) if parts else 0
    claim = f"masking a named part changes {low} more consistently (lower mean H) than random boxes"
    paper = "Table 1, layer 5: eyes 0.067-0.069, nose 0.079, random 0.107"
    if not parts:
        return [Finding(claim, paper, None, verdict(None), "Not measured: no part was named.", n=0, unit="images")]
    mean = {name: {l: float(result.hamming[name][l].mean()) for l in result.layers} for name in result.hamming}
    gaps = {}
    for layer in dict.fromkeys((low, high)):
        random = pair_matrix(result.hamming["random"][layer], n)
        gaps[layer] = {p: image_bootstrap(random - pair_matrix(result.hamming[p][layer], n)) for p in parts}
    verdicts = {p: verdict(gaps[low][p][1]) for p in parts}
    overall = all_of(list(verdicts.values()))
    # the part with the lowest interval decides; one without an interval (too few images) first of all
    worst = min(parts, key=lambda p: -np.inf if gaps[low][p][1] is None else gaps[low][p][1][0])
    estimate, interval = gaps[low][worst]

    def cell(layer: str) -> str:
        return "; ".join(f"{p} {interval_text({'estimate': e, 'interval': i, 'n': n, 'unit': 'images'})}"
                         for p, (e, i) in gaps[layer].items())

    reading = (f"Random minus part mean H (above 0 = tighter correspondence than random), in {low}: {cell(low)}"
               + (f". In {high}: {cell(high)} (the paper finds no difference there)" if high != low else "")
               + ". " + {"held": "Every part corresponds more tightly than random boxes, as in the paper.",
                         "not held": "A part changes the features less consistently than random boxes.",
                         "inconclusive": "Not every part's interval lies above 0 at this number of images."}[overall])
    ours = {"mean_hamming": mean,
            "random_minus_part": {layer: {p: {"estimate": e, "interval": list(i) if i else None}
                                          for p, (e, i) in by.items()}
                                  for layer, by in gaps.items()},
            "part_verdicts": verdicts}
    return [Finding(claim, paper, ours, overall, reading,
                    quantity=f"random's mean H minus the part's in {low}, mean over pairs of images (shown for the "
                             f"part with the lowest interval, {worst}; every part must lie above 0)",
                    estimate=estimate, interval=interval, n=n, unit="images",
                    if_not_held="Of the set-up: the parts of a 28 px sneaker (toe, heel, laces) are a few pixels "
                                "wide and placed by fixed fractions of its bounding box, a looser match across "
                                "images than the paper's eyes and nose in aligned faces.")]


def correspondence_to_json(result: Correspondence) -> dict:
    """Table 1 as JSON: per set and layer mean +- std of the pair distances and Delta; the boxes used."""
    table = {}
    for name, by_layer in result.hamming.items():
        table[name] = {layer: {"mean": float(h.mean()), "std": float(h.std(unbiased=False)),
                               "delta": result.delta(name, layer), "pairs": len(h)}
                       for layer, h in by_layer.items()}
    return {"layers": result.layers, "seed": result.seed, "table": table,
            "boxes": {name: [[list(b) for b in draw] for draw in draws] for name, draws in result.boxes.items()}}


SHOWN = 5  # images drawn with their masks in Table 1's figure; its numbers are over every image


def draw_correspondence(result: Correspondence, pictures: torch.Tensor, path=None) -> Figure:
    """Fig. 8 and Table 1 as a PNG: the first :data:`SHOWN` images with each part masked (and one random
    draw), then the mean +- std of H per layer over every pair of every image. ``pictures``: the images,
    (N, C, H, W) in [0, 1]."""
    from matplotlib.patches import Rectangle

    names = list(result.boxes)
    n = min(len(pictures), SHOWN)
    fig, axes = new_figure(len(names), n + 1, figsize=(1.8 * (n + 1) + 2.5, 1.9 * len(names)), squeeze=False,
                             gridspec_kw={"width_ratios": [1] * n + [2.2]})
    for row, name in zip(axes, names):
        for i, ax in enumerate(row[:n]):
            ax.imshow(to_rgb(pictures[i]), cmap="gray", vmin=0, vmax=1)
            t, l, b, r = result.boxes[name][0][i]
            ax.add_patch(Rectangle((l - 0.5, t - 0.5), r - l + 1, b - t + 1, color="0.5"))
            ax.set_xticks([])
            ax.set_yticks([])
        row[0].set_ylabel(name)
        text = "\n".join(f"{layer}: {float(h.mean()):.3f} ± {float(h.std(unbiased=False)):.3f}"
                         for layer, h in result.hamming[name].items())
        row[n].text(0.02, 0.5, text, va="center", fontsize=9, family="monospace")
        row[n].axis("off")
    axes[0, n].set_title(f"mean ± std of H, {len(pictures)} images", fontsize=9)
    return finish(fig, path)


callable_module(__name__, correspondence)
