"""How discriminative each layer's features are (Sec. 5.4, Table 7): keep layers 1..n of a trained
model, put a linear SVM or a softmax (scikit-learn) on layer n's features, and score it with the
transfer protocol of Sec. 5.2 (N images per class, up to 50 test images per class, mean of per-class
accuracies over folds). Spatial features are max-pooled to the size of the model's last conv output.

Budget (2 CPU cores, ``digits`` target, 28 px model): the default ``--per-class 15,30 --folds 5``
takes about 1 minute (70 classifier fits per N); the demo budget ``--per-class 15 --folds 3`` about 20 s.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from torch import nn

from .data import Preprocess, Source
from .features import feature_grid, feature_layers, fit_linear, layer_features, per_class_folds
from .runner import progress
from .figures import finish, new_figure
from .findings import Finding
from .findings import to_json as to_findings_json

if TYPE_CHECKING:
    from matplotlib.figure import Figure

CLASSIFIERS = ("svm", "softmax")
PER_CLASS = (15, 30)  # Table 7 reports Caltech-101 at 30 and Caltech-256 at 60 images per class
PAPER = {"svm": "Caltech-101, 30/class, SVM on layers 1-5, 7: 44.8, 66.2, 72.3, 76.6, 86.2, 85.5",
         "softmax": "Caltech-101, 30/class, softmax on layers 5, 7: 82.9, 85.4"}


@dataclass
class LayerResult:
    """``scores[(classifier, n_per_class, layer)]`` = per-fold mean class accuracies (0-1)."""

    target: str
    layers: dict[int, str]  # layer number -> module name
    per_class: list[int]
    folds: int
    dims: dict[int, int]  # feature dimension per layer
    scores: dict[tuple[str, int, int], list[float]] = field(default_factory=dict)
    excluded: list[int] = field(default_factory=list)

    def mean(self, kind: str, n: int, layer: int) -> float:
        return float(np.mean(self.scores[(kind, n, layer)]))

    def std(self, kind: str, n: int, layer: int) -> float:
        return float(np.std(self.scores[(kind, n, layer)]))

    def table(self) -> str:
        """Table 7 as text: one row per classifier and layer, one column per N, mean +- std in %."""
        lines = [f"{'':<12}" + "".join(f"{f'{n}/class':>16}" for n in self.per_class)]
        for kind in CLASSIFIERS:
            for layer in self.layers:
                cells = "".join(f"{100 * self.mean(kind, n, layer):>10.1f} +-{100 * self.std(kind, n, layer):>4.1f}"
                                for n in self.per_class)
                lines.append(f"{f'{kind} ({layer})':<12}{cells}")
        return "\n".join(lines)


def layer_analysis(model: nn.Module, preprocess: Preprocess, target: Source, per_class=PER_CLASS,
                   folds: int = 5, n_test: int = 50, exclude=(), seed: int = 0,
                   layers: dict[int, str] | None = None, grid: int | None = None) -> LayerResult:
    """Table 7: a linear SVM and a softmax on the features of every layer 1..7 the model has.

    ``exclude`` holds target indices never used (images found in the pretraining set, Sec. 5.2).
    ``layers`` (layer number -> name) and ``grid`` (the spatial size maps are max-pooled to) default
    to our models' Fig. 3 layers and their top conv output; give both for other models.
    """
    layers = feature_layers(model) if layers is None else layers
    grid = feature_grid(model) if grid is None else grid
    labels = target.labels.numpy()
    splits = {n: per_class_folds(labels, n, folds, n_test, seed, exclude) for n in per_class}
    feats = layer_features(model, preprocess, target, np.arange(len(labels)), list(layers.values()), grid)
    result = LayerResult(target.name, layers, list(per_class), folds,
                         {n: int(feats[name].shape[1]) for n, name in layers.items()},
                         excluded=sorted(int(i) for i in exclude))
    jobs = [(kind, n, layer) for n in per_class for layer in layers for kind in CLASSIFIERS]
    for kind, n, layer in progress(jobs, desc="layers", unit="fit"):
        result.scores[(kind, n, layer)] = [fit_linear(kind, feats[layers[layer]], labels, s, seed) for s in splits[n]]
    return result


def layer_features_findings(result: LayerResult) -> list[Finding]:
    """Table 7's claim: accuracy rises steadily with the layer, for each classifier and N."""
    out = []
    for kind in CLASSIFIERS:
        for n in result.per_class:
            acc = [result.mean(kind, n, layer) for layer in result.layers]
            rises = all(b >= a for a, b in zip(acc, acc[1:]))
            best = list(result.layers)[int(np.argmax(acc))]
            cells = ", ".join(f"{layer}: {100 * a:.1f}" for layer, a in zip(result.layers, acc))
            reading = (f"{kind}, {n}/class, accuracy (%) by layer {cells}; best at layer {best}: "
                       + ("it rises steadily with depth, as in the paper." if rises else "it does not rise steadily."))
            out.append(Finding(f"{kind}, {n}/class: accuracy rises steadily with the layer, best at the top",
                               PAPER[kind], {f"layer{layer}": round(100 * a, 2) for layer, a in zip(result.layers, acc)},
                               bool(rises), reading))
    return out


def layer_features_to_json(result: LayerResult) -> dict:
    """Table 7 (mean, std, folds in %) and the findings, ready for ``json.dump``."""
    table = {}
    for kind in CLASSIFIERS:
        for layer, name in result.layers.items():
            table[f"{kind} ({layer})"] = {
                "module": name, "dim": result.dims[layer],
                **{f"{n}_per_class": {"mean": round(100 * result.mean(kind, n, layer), 2),
                                      "std": round(100 * result.std(kind, n, layer), 2),
                                      "folds": [round(100 * v, 2) for v in result.scores[(kind, n, layer)]]}
                   for n in result.per_class}}
    return {"analysis": "per-layer features (Table 7)", "target": result.target, "folds": result.folds,
            "metric": "mean of per-class accuracies (%)", "excluded_overlaps": result.excluded,
            "table": table, "findings": to_findings_json(layer_features_findings(result))}


def draw_layer_features(result: LayerResult, path=None) -> Figure:
    """Accuracy against the layer the classifier sits on, per classifier and N (Table 7 as a figure)."""
    fig, ax = new_figure(figsize=(6, 4))
    layers = list(result.layers)
    for kind, style in zip(CLASSIFIERS, ("-", "--")):
        for n in result.per_class:
            ax.errorbar(layers, [100 * result.mean(kind, n, layer) for layer in layers],
                        yerr=[100 * result.std(kind, n, layer) for layer in layers], linestyle=style, marker="o",
                        capsize=3, label=f"{kind}, {n}/class")
    ax.set_xlabel("features of layer")
    ax.set_ylabel("mean per-class accuracy (%)")
    ax.set_xticks(layers)
    ax.set_title(f"Per-layer features on {result.target}, cf. Table 7", fontsize=10)
    ax.legend(fontsize=8)
    return finish(fig, path)
