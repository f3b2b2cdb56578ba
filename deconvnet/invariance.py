"""Invariance (Sec. 4, Fig. 5): translate (vertically), scale and rotate images by varying amounts
and follow the Euclidean distance between the feature vectors of the original and the transformed
image at a low and a high layer (layers 1 and 7), and the probability of the true label.

Transforms act on the raw image before preprocessing (so the per-pixel mean is subtracted from the
transformed image, as it would be from a photo of the moved object); uncovered pixels are black, the
background of Fashion-MNIST. Translation moves whole pixels; scale (about the centre) and rotation
(degrees, clockwise as shown) resample bilinearly. Amount 0 (scale 1) is the image itself.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ._analysis import callable_module, features
from .errors import UserError
from .figures import finish, new_figure
from .findings import Finding, pct

if TYPE_CHECKING:
    from matplotlib.figure import Figure

KINDS = ("translation", "scale", "rotation")
IDENTITY = {"translation": 0.0, "scale": 1.0, "rotation": 0.0}


@dataclass
class Invariance:
    """Fig. 5's curves. Per kind: ``amounts`` (A,), and per image and amount (N, A) the ``distance``
    at each layer and ``probability`` of the true label; ``norm`` (N,) is the untransformed feature
    vector's length per layer, to read distances relative to it."""

    layers: list[str]
    labels: torch.Tensor  # (N,)
    amounts: dict[str, list[float]]
    distance: dict[str, dict[str, torch.Tensor]]  # kind -> layer -> (N, A)
    probability: dict[str, torch.Tensor]  # kind -> (N, A)
    clean_probability: torch.Tensor  # (N,), p(true) of the untransformed image
    norm: dict[str, torch.Tensor]  # layer -> (N,)


def default_amounts(size: int) -> dict[str, list[float]]:
    """Sweeps like Fig. 5's: shifts up to a quarter of the image, scale 0.6-1.4, a full turn in 15 degrees."""
    quarter = size // 4
    step = max(1, quarter // 7)
    return {"translation": [float(v) for v in range(-quarter, quarter + 1, step)],
            "scale": [round(0.6 + 0.1 * i, 2) for i in range(9)],
            "rotation": [float(v) for v in range(0, 360, 15)]}


def transform(raw: torch.Tensor, kind: str, amount: float) -> torch.Tensor:
    """Raw images (N, C, S, S) -> float (N, C, S, S), moved down by ``amount`` pixels, scaled by
    ``amount`` about the centre, or rotated clockwise by ``amount`` degrees about it; uncovered pixels are 0."""
    if kind not in KINDS:
        raise UserError(f"unknown transform {kind!r}; use one of {', '.join(KINDS)}")
    x = raw.float()
    if amount == IDENTITY[kind]:
        return x
    if kind == "translation":
        shift, out = int(round(amount)), torch.zeros_like(x)
        if abs(shift) < x.shape[2]:
            if shift > 0:
                out[:, :, shift:] = x[:, :, :-shift]
            else:
                out[:, :, :shift] = x[:, :, -shift:]
        return out
    if kind == "scale":
        theta = torch.tensor([[1 / amount, 0.0, 0.0], [0.0, 1 / amount, 0.0]], dtype=x.dtype, device=x.device)
    else:
        a = math.radians(amount)
        theta = torch.tensor([[math.cos(a), math.sin(a), 0.0], [-math.sin(a), math.cos(a), 0.0]],
                             dtype=x.dtype, device=x.device)
    grid = F.affine_grid(theta.expand(len(x), 2, 3), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


@torch.no_grad()
def invariance(model, images, labels=None, layers: list[str] | None = None,
               amounts: dict[str, list[float]] | None = None) -> Invariance:
    """Fig. 5 for ``images`` under vertical translation, scale and rotation (Sec. 4).

    Args:
        model: the model under study (:class:`~deconvnet.subject.Subject`), or an ``nn.Module``
            wrapped by :func:`~deconvnet.subject.as_subject`.
        images: image files or uint8 pixels (N, C, H, W), transformed then preprocessed; or a float
            tensor, the model's input as it is, transformed as it is (:meth:`Subject.inputs`).
        labels: each image's true class (model index), None where unknown; default (and for None)
            the model's answer on the untransformed image.
        layers: the low and high layer, default layers 1 and 7 (ours: ``norm1``, ``relu7``).
        amounts: per kind in ``KINDS``, the amounts to sweep; default :func:`default_amounts`.
    """
    from .subject import as_subject

    subject = as_subject(model, like=images)
    model, preprocess = subject.model, subject.preprocess
    raw, to_input = subject.inputs(images)
    given = [None] * len(raw) if labels is None else [None if y is None else int(y) for y in labels]
    if len(given) != len(raw):
        raise UserError(f"{len(given)} labels for {len(raw)} images")
    if None in given:
        given = [p if y is None else y for y, p in zip(given, subject.predict(raw, to_input))]
    labels = given
    layers = subject.layers(layers, [1, 7])
    if len(layers) != 2:
        raise UserError(f"name two layers, a low and a high one; got {layers}")
    amounts = default_amounts(preprocess.input_size) if amounts is None else amounts
    unknown = set(amounts) - set(KINDS)
    if unknown:
        raise UserError(f"unknown transform(s) {sorted(unknown)}; use {', '.join(KINDS)}")
    labels = torch.as_tensor(labels, dtype=torch.long)
    out = subject.output
    wanted = list(dict.fromkeys(layers + [out]))
    clean = features(model, to_input(raw), wanted)
    distance, probability = {}, {}
    for kind, values in amounts.items():
        d: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
        p = []
        for a in values:  # one amount at a time: memory grows with the images, not with the sweep
            f = features(model, to_input(transform(raw, kind, a)), wanted)
            for name in layers:
                d[name].append((f[name] - clean[name]).norm(dim=1))
            p.append(torch.softmax(f[out], dim=1)[torch.arange(len(raw)), labels])
        distance[kind] = {name: torch.stack(v, 1) for name, v in d.items()}
        probability[kind] = torch.stack(p, 1)
    clean_p = torch.softmax(clean[out], dim=1)[torch.arange(len(raw)), labels]
    return Invariance(layers, labels, {k: list(v) for k, v in amounts.items()}, distance, probability, clean_p,
                      {name: clean[name].norm(dim=1) for name in layers})


def invariance_findings(result: Invariance) -> list[Finding]:
    """The claims of Sec. 4 on Fig. 5, each as a paired quantity over images with its 95% interval.

    1. Small translations change the low layer a lot, the high layer less: per image, the distance at
       the smallest shift (both directions averaged) relative to the feature vector's length, low minus
       high layer (held when above 0). Distances are relative because the layers' vectors differ in
       length; the share of the largest distance of the sweep reached at that shift, low minus high,
       must hold too (the paper's "dramatic" jump at layer 1 against a quasi-linear rise at layer 7).
    2. The output is stable to translation and scale, not to rotation: per image, the mean drop of
       p(true) over the rotation sweep minus the larger of the translation and scale sweeps' drops.

    Every image counts, including those the model misclassifies (their p(true) has little to lose,
    which pulls both sides of the comparison towards 0, never towards the claim).
    """
    from .findings import interval_text
    from .stats import all_of, mean_interval, verdict

    low, high = result.layers
    n, unit = len(result.labels), "images"
    out = []
    shifts = torch.tensor(result.amounts.get("translation", []))
    if (shifts != 0).any():
        small = float(shifts.abs()[shifts != 0].min())
        at = (shifts.abs() == small).nonzero().flatten()
        d = result.distance["translation"]
        rel = {name: d[name][:, at].mean(1) / result.norm[name].clamp_min(1e-12) for name in (low, high)}
        share = {name: d[name][:, at].mean(1) / d[name].amax(1).clamp_min(1e-12) for name in (low, high)}
        estimate, interval = mean_interval((rel[low] - rel[high]).tolist())
        share_estimate, share_interval = mean_interval((share[low] - share[high]).tolist())
        result_verdict = all_of([verdict(interval), verdict(share_interval)])
        words = {"estimate": estimate, "interval": interval, "n": n, "unit": unit}
        out.append(Finding(
            f"a shift of {small:g} px changes {low} relatively more than {high}",
            "Fig. 5 a2/b2/c2 vs a3/b3/c3: small transformations change layer 1 a lot, layer 7 less",
            {"shift_px": small, "relative_distance": {k: float(v.mean()) for k, v in rel.items()},
             "share_of_largest_distance": {k: float(v.mean()) for k, v in share.items()},
             "share_low_minus_high": {"estimate": share_estimate,
                                      "interval": list(share_interval) if share_interval else None}},
            result_verdict,
            f"A {small:g} px shift moves {low}'s features by {pct(float(rel[low].mean()))} of their norm and "
            f"{high}'s by {pct(float(rel[high].mean()))} on average: low minus high {interval_text(words)}; the "
            f"share of the sweep's largest distance, low minus high, is "
            f"{interval_text({**words, 'estimate': share_estimate, 'interval': share_interval})}. "
            + {"held": "The top layer is the more invariant, as in the paper.",
               "not held": "The top layer is not the more invariant here.",
               "inconclusive": "The intervals do not settle which layer is the more invariant."}[result_verdict],
            quantity=f"relative feature distance under a shift of {small:g} px, {low} minus {high}, mean over images "
                     "(the share of the sweep's largest distance, low minus high, must lie above 0 too)",
            estimate=estimate, interval=interval, n=n, unit=unit,
            if_not_held="Of the scale: zfnet-small pools fewer times than ZFNet before layer 7, so at 28 px its "
                        "top layer may keep more of an object's position."))
    drops = {}
    for kind, amounts in result.amounts.items():
        moved = torch.tensor([a != IDENTITY[kind] for a in amounts])
        if moved.any():
            drops[kind] = (result.clean_probability[:, None] - result.probability[kind][:, moved]).mean(1)
    if {"translation", "scale", "rotation"} <= set(drops):
        gap = drops["rotation"] - torch.maximum(drops["translation"], drops["scale"])
        estimate, interval = mean_interval(gap.tolist())
        result_verdict = verdict(interval)
        mean_drop = {k: float(v.mean()) for k, v in drops.items()}
        out.append(Finding(
            "p(true) drops less under translation and scale than under rotation",
            "Fig. 5 a4/b4/c4: the output is stable to translation and scale, not to rotation",
            {"mean_drop_of_p_true": mean_drop}, result_verdict,
            f"p(true class) falls on average by {mean_drop['translation']:.2f} under translation, "
            f"{mean_drop['scale']:.2f} under scaling and {mean_drop['rotation']:.2f} under rotation; per image, "
            f"rotation's drop minus the larger of the other two is "
            f"{interval_text({'estimate': estimate, 'interval': interval, 'n': n, 'unit': unit})}. "
            + {"held": "Rotation is what the network is not invariant to, as in the paper.",
               "not held": "Rotation is not the transformation that hurts most here.",
               "inconclusive": "The interval contains 0: rotation is not shown to hurt more."}[result_verdict],
            quantity="mean drop of p(true) over the rotation sweep minus the larger of the translation and scale "
                     "sweeps' drops, mean over images",
            estimate=estimate, interval=interval, n=n, unit=unit,
            if_not_held="Of the set-up: the sweeps' ranges (shifts up to a quarter of the image, scale 0.6-1.4, a "
                        "full turn) decide which transformation hurts most at any scale."))
    return out


def invariance_to_json(result: Invariance, classes: list[str] | None = None) -> dict:
    """The numbers of :class:`Invariance` as plain JSON types."""
    return {
        "layers": result.layers,
        "labels": result.labels.tolist(),
        "p_true_untransformed": result.clean_probability.tolist(),
        "label_names": [classes[k] for k in result.labels.tolist()] if classes else None,
        "feature_norm": {name: v.tolist() for name, v in result.norm.items()},
        "sweeps": {kind: {"amounts": result.amounts[kind],
                          "distance": {name: d.tolist() for name, d in result.distance[kind].items()},
                          "p_true": result.probability[kind].tolist()}
                   for kind in result.amounts},
    }


SHOWN = 5  # images drawn as their own curves in Fig. 5; the mean and its band are over every image


def draw_invariance(result: Invariance, path=None, classes: list[str] | None = None) -> Figure:
    """Fig. 5 as a PNG: rows translation, scale, rotation; columns low-layer distance, high-layer
    distance, p(true). The first :data:`SHOWN` images as thin curves, the mean over every image in
    black with its 95% interval (:func:`stats.mean_interval`) as a grey band."""
    from .stats import mean_interval

    kinds = [k for k in KINDS if k in result.amounts]
    units = {"translation": "vertical shift (px)", "scale": "scale factor", "rotation": "rotation (degrees)"}
    n = len(result.labels)
    fig, axes = new_figure(len(kinds), 3, figsize=(12, 3.2 * len(kinds)), squeeze=False)
    for row, kind in zip(axes, kinds):
        x = result.amounts[kind]
        series = [result.distance[kind][result.layers[0]], result.distance[kind][result.layers[1]],
                  result.probability[kind]]
        titles = [f"{result.layers[0]}: distance", f"{result.layers[1]}: distance", "p(true label)"]
        for ax, ys, title in zip(row, series, titles):
            for i, y in enumerate(ys[:SHOWN]):
                name = classes[int(result.labels[i])] if classes else int(result.labels[i])
                ax.plot(x, y.numpy(), lw=0.8, alpha=0.7, label=f"{i}: {name}")
            if n > 1:
                bands = [mean_interval(ys[:, a].tolist()) for a in range(len(x))]
                bands = [(m, i or (m, m)) for m, i in bands]  # no spread (e.g. at the identity): no band
                ax.fill_between(x, [b[1][0] for b in bands], [b[1][1] for b in bands], color="0.6", alpha=0.4,
                                lw=0, label="95% interval")
                ax.plot(x, [b[0] for b in bands], color="k", lw=2, label=f"mean of {n}")
            ax.set_title(f"{kind}: {title}", fontsize=10)
            ax.set_xlabel(units[kind])
        row[2].set_ylim(-0.02, 1.02)
    axes[0, 2].legend(fontsize=7)
    return finish(fig, path)


callable_module(__name__, invariance)
