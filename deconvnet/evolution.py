"""Feature evolution during training (Sec. 4, Fig. 4): for chosen feature maps of layers 1-5, the
strongest activation over a fixed set of training images at each snapshot epoch, projected to pixels.

The paper judges by eye that "the lower layers converge within a few epochs, the upper layers only
after 40-50". Here a number says it: a map is *stable* from the first snapshot after which its
strongest activation stays in the same image and each consecutive pair of projections correlates at
least ``STABLE_CORRELATION``; a layer's stable epoch is the mean over its maps.

Budget: with 5 maps per layer over 2000 images, about 2 s per snapshot for a 28 px model on 2 CPU
cores. Train with ``--snapshots 1,2,3,...`` to get every epoch (the default keeps Fig. 4's epochs).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ._analysis import to_rgb
from .checkpoint import CheckpointInfo, load_checkpoint
from .data import Preprocess, Source
from .errors import UserError
from .features import feature_layers
from .runner import progress
from .topk import mosaic, choose_maps, gallery, top_k
from .figures import finish, new_figure
from .findings import Finding
from .findings import to_json as to_findings_json

if TYPE_CHECKING:
    from matplotlib.figure import Figure

STABLE_CORRELATION = 0.9


def snapshot_paths(run: str | Path) -> list[tuple[int, Path]]:
    """``[(epoch, path)]`` of ``RUN/checkpoints/epoch-K.pt``, in epoch order."""
    found = []
    for path in (Path(run) / "checkpoints").glob("epoch-*.pt"):
        match = re.fullmatch(r"epoch-(\d+)\.pt", path.name)
        if match:
            found.append((int(match.group(1)), path))
    if len(found) < 2:
        raise UserError(f"{run} has {len(found)} snapshot(s) under checkpoints/; feature evolution needs at "
                        "least 2 (train with --snapshots 1,2,3,...)")
    return sorted(found)


@dataclass
class LayerEvolution:
    """One layer of Fig. 4. ``images`` (M, S): the image holding each map's strongest activation at each
    snapshot; ``projections`` (M, S, C, R, R): its projection cut to the receptive field (NaN outside the
    image); ``correlation`` (M, S-1) between consecutive projections; ``stable_epoch`` per map."""

    layer: str
    maps: list[int]
    images: np.ndarray
    values: np.ndarray
    projections: torch.Tensor
    correlation: np.ndarray
    stable_epoch: list[int]

    @property
    def mean_stable_epoch(self) -> float:
        return float(np.mean(self.stable_epoch)) if self.stable_epoch else float("nan")


@dataclass
class EvolutionResult:
    epochs: list[int]
    layers: dict[int, LayerEvolution]  # by layer number 1..5


def _correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of two projections (NaN = outside the image, counted as 0)."""
    a, b = a.nan_to_num(0.0).flatten().double(), b.nan_to_num(0.0).flatten().double()
    a, b = a - a.mean(), b - b.mean()
    denominator = (a.norm() * b.norm()).item()
    return float((a @ b).item() / denominator) if denominator > 0 else 0.0


def stable_from(epochs: list[int], images: np.ndarray, correlation: np.ndarray,
                threshold: float = STABLE_CORRELATION) -> int:
    """The first snapshot epoch after which the strongest image stays the same and every consecutive
    projection pair correlates >= ``threshold`` (the last epoch if it never settles)."""
    start = len(epochs) - 1
    for i in range(len(epochs) - 2, -1, -1):
        if images[i] != images[i + 1] or correlation[i] < threshold:
            break
        start = i
    return epochs[start]


def evolution(snapshots: list[tuple[int, torch.nn.Module]], preprocess: Preprocess, source: Source, indices,
              maps: int = 5, seed: int = 0) -> EvolutionResult:
    """Fig. 4 from ``[(epoch, model)]`` snapshots of one run, over the images ``source[indices]``.

    For each layer 1-5, ``maps`` maps are chosen at random among those alive in the last snapshot;
    at every snapshot their strongest activation is found and projected (Sec. 2.1).
    """
    epochs = [e for e, _ in snapshots]
    names = {n: name for n, name in feature_layers(snapshots[-1][1]).items() if n <= 5}
    per_snapshot = []  # [(tables, {layer: Gallery})]
    chosen: dict[int, list[int]] = {}
    for _, model in progress(snapshots[::-1], desc="snapshots", unit="ckpt"):  # the last first: it picks the maps
        tables = top_k(model, source, preprocess, list(names.values()), k=1, indices=indices)
        if not chosen:
            chosen = {n: choose_maps(tables[name], maps, seed) for n, name in names.items()}
        shown = {n: gallery(model, source, preprocess, name, tables[name], chosen[n]) for n, name in names.items()}
        per_snapshot.append((tables, shown))
    per_snapshot.reverse()
    layers = {}
    for n, name in names.items():
        images = np.stack([t[name].images[chosen[n], 0].numpy() for t, _ in per_snapshot], 1)  # (M, S)
        values = np.stack([t[name].values[chosen[n], 0].numpy() for t, _ in per_snapshot], 1)
        projections = torch.stack([g[n].projections[:, 0] for _, g in per_snapshot], 1)  # (M, S, C, R, R)
        correlation = np.array([[_correlation(p[s], p[s + 1]) for s in range(len(epochs) - 1)] for p in projections])
        stable = [stable_from(epochs, images[m], correlation[m]) for m in range(len(chosen[n]))]
        correlation = correlation.reshape(len(chosen[n]), len(epochs) - 1)  # (M, S-1), also when M = 0
        layers[n] = LayerEvolution(name, chosen[n], images, values, projections, correlation, stable)
    return EvolutionResult(epochs, layers)


def load_snapshots(run: str | Path) -> tuple[list[tuple[int, torch.nn.Module]], CheckpointInfo]:
    """``([(epoch, model)], info of the last one)`` for a training run directory: its snapshots, and
    ``final.pt`` too when its epoch is later than the last snapshot's."""
    loaded = [(epoch, load_checkpoint(path)) for epoch, path in snapshot_paths(run)]
    final = Path(run) / "final.pt"
    if final.is_file():
        model, info = load_checkpoint(final)
        if info.epoch is not None and info.epoch > loaded[-1][0]:
            loaded.append((info.epoch, (model, info)))
    return [(epoch, model) for epoch, (model, _) in loaded], loaded[-1][1][1]


def evolution_findings(result: EvolutionResult) -> list[Finding]:
    """Fig. 4's claim with our numbers: lower layers stabilise earlier."""
    stable = {n: layer.mean_stable_epoch for n, layer in result.layers.items()}
    low = [stable[n] for n in (1, 2) if n in stable]
    high = [stable[n] for n in (4, 5) if n in stable]
    held = bool(low and high and np.mean(low) < np.mean(high))
    shown = ", ".join(f"layer {n} {v:.1f}" for n, v in stable.items())
    reading = (f"Mean epoch from which each layer's strongest image and its projection stop changing, over "
               f"snapshots at epochs {', '.join(map(str, result.epochs))}: {shown}. "
               + ("Lower layers settle first, as in the paper." if held else
                  "Lower layers do not settle first here: with a one-cycle schedule every layer keeps changing "
                  "until the learning rate anneals, unlike the paper's stepwise 70-epoch schedule."))
    return [Finding("lower layers converge within a few epochs, upper layers only later "
                    "(held if layers 1-2 stabilise earlier on average than layers 4-5)",
                    "layers 1-2 settle within a few epochs; layers 4-5 only after 40-50 of 70",
                    {f"layer{n}": v for n, v in stable.items()}, held, reading)]


def evolution_to_json(result: EvolutionResult) -> dict:
    """Per layer and map: the strongest image, its value and the consecutive correlations per snapshot."""
    return {"analysis": "feature evolution (Fig. 4)", "epochs": result.epochs,
            "stable_definition": f"first snapshot after which the strongest image is unchanged and consecutive "
                                 f"projections correlate >= {STABLE_CORRELATION}",
            "layers": {f"layer{n}": {"module": layer.layer, "mean_stable_epoch": layer.mean_stable_epoch,
                                     "maps": [{"map": c, "images": layer.images[m].tolist(),
                                               "values": [round(float(v), 4) for v in layer.values[m]],
                                               "correlation": [round(float(v), 4) for v in layer.correlation[m]],
                                               "stable_epoch": layer.stable_epoch[m]}
                                              for m, c in enumerate(layer.maps)]}
                       for n, layer in result.layers.items()},
            "findings": to_findings_json(evolution_findings(result))}


def draw_evolution_layer(result: EvolutionResult, n: int, path=None) -> Figure:
    """Fig. 4 for layer ``n``: one row per map, one column per snapshot epoch (each tile stretched)."""
    layer = result.layers[n]
    rows, cols = len(layer.maps), len(result.epochs)
    fig, axes = new_figure(rows, cols, figsize=(1.2 * cols + 0.8, 1.2 * rows + 0.8), squeeze=False)
    for m, c in enumerate(layer.maps):
        for s, epoch in enumerate(result.epochs):
            ax = axes[m, s]
            ax.imshow(to_rgb(mosaic(layer.projections[m, s][None], stretch=True)), cmap="gray", vmin=0, vmax=1,
                      interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if m == 0:
                ax.set_title(f"epoch {epoch}", fontsize=8)
            if s == 0:
                ax.set_ylabel(f"map {c}", fontsize=8)
    fig.suptitle(f"Layer {n} ({layer.layer}): strongest activation projected per snapshot; "
                 f"stable from epoch {layer.mean_stable_epoch:.1f} (mean)", fontsize=9)
    return finish(fig, path)


def draw_evolution(result: EvolutionResult, path=None) -> Figure:
    """The measured claim: mean stable epoch per layer (each map a dot)."""
    fig, ax = new_figure(figsize=(5, 3.6))
    for n, layer in result.layers.items():
        ax.scatter([n] * len(layer.stable_epoch), layer.stable_epoch, color="grey", s=12)
    ns = list(result.layers)
    ax.plot(ns, [result.layers[n].mean_stable_epoch for n in ns], marker="o", label="mean over maps")
    ax.set_xlabel("layer")
    ax.set_ylabel("stable from epoch")
    ax.set_xticks(ns)
    ax.set_title("When the strongest activation stops changing (Fig. 4)", fontsize=9)
    ax.legend(fontsize=8)
    return finish(fig, path)
