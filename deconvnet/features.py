"""What transfer (Tables 4/5, Fig. 9) and per-layer features (Table 7) share: the features of
layer n, the N-per-class train/test folds of Sec. 5.2 and a linear classifier scored by the mean of
per-class accuracies."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ._analysis import eval_mode
from .data import Preprocess, Source
from .errors import UserError
from .probe import activations
from .runner import progress

# The modules of layer n, bottom to top; "layer n" means the output of the last one present (Fig. 3).
LAYER_BLOCKS = {
    1: ("conv1", "relu1", "pool1", "norm1"),
    2: ("conv2", "relu2", "pool2", "norm2"),
    3: ("conv3", "relu3"),
    4: ("conv4", "relu4"),
    5: ("conv5", "relu5", "pool5"),
    6: ("fc6", "relu6"),
    7: ("fc7", "relu7"),
}


def layer_output(model: nn.Module, n: int) -> str | None:
    """Name of the module whose output is layer ``n`` (1..7), or ``None`` if the model has no layer n."""
    names = dict(model.named_modules())
    present = [name for name in LAYER_BLOCKS[n] if name in names]
    return present[-1] if present else None


def feature_layers(model: nn.Module) -> dict[int, str]:
    """``{n: module name}`` for every layer 1..7 the model has (ablated models lack some)."""
    found = {n: layer_output(model, n) for n in LAYER_BLOCKS}
    return {n: name for n, name in found.items() if name is not None}


@torch.no_grad()
def pooled_features(model: nn.Module, preprocess: Preprocess, source: Source, indices, layers: list[str],
                   grid: int, batch_size: int = 256) -> dict[str, np.ndarray]:
    """Features of the named ``layers`` for ``source`` images ``indices`` (center crop, eval mode).

    Spatial maps (B, C, H, W) larger than ``grid`` are max-pooled to (B, C, grid, grid), then
    flattened: returns ``{layer: float32 array (N, D)}``.
    """
    indices = torch.as_tensor(indices, dtype=torch.long)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in layers}
    with eval_mode(model):
        for start in progress(range(0, len(indices), batch_size), desc="features", unit="batch"):
            x = preprocess.eval(source.get(indices[start:start + batch_size]))
            for name, a in activations(model, x, layers).items():
                if a.dim() == 4 and a.shape[-1] > grid:
                    a = F.adaptive_max_pool2d(a, grid)
                parts[name].append(a.flatten(1).float().cpu().numpy())
    return {name: np.concatenate(p) for name, p in parts.items()}


@dataclass(frozen=True)
class Split:
    """One train/test fold: indices into the target set."""

    train: np.ndarray
    test: np.ndarray


def per_class_folds(labels, n_train: int, folds: int = 5, n_test: int = 50, seed: int = 0,
                    exclude=()) -> list[Split]:
    """``folds`` random splits with ``n_train`` images per class for training and up to ``n_test``
    other images per class for testing (Caltech-101 protocol, Sec. 5.2).

    ``exclude`` lists indices never used (overlap with the pretraining set). Every class needs at
    least ``n_train + 1`` usable images.
    """
    if n_train < 1 or folds < 1 or n_test < 1:
        raise UserError(f"need at least 1 training image per class, 1 fold and 1 test image per class; "
                        f"got --per-class {n_train}, --folds {folds}, {n_test} test images")
    labels = np.asarray(labels)
    usable = np.setdiff1d(np.arange(len(labels)), np.asarray(list(exclude), dtype=np.int64))
    by_class = [usable[labels[usable] == c] for c in np.unique(labels)]
    short = [len(idx) for idx in by_class if len(idx) <= n_train]
    if short:
        raise UserError(f"{n_train} training images per class need at least {n_train + 1} images in every "
                        f"class; the smallest class has {min(len(i) for i in by_class)}")
    splits = []
    for fold in range(folds):
        rng = np.random.default_rng([seed, n_train, fold])
        train, test = [], []
        for idx in by_class:
            perm = rng.permutation(idx)
            train.append(perm[:n_train])
            test.append(perm[n_train:n_train + n_test])
        splits.append(Split(np.sort(np.concatenate(train)), np.sort(np.concatenate(test))))
    return splits


def mean_class_accuracy(y_true, y_pred) -> float:
    """The mean over classes of the per-class accuracy (the metric of Tables 4, 5 and 7)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    return float(np.mean([(y_pred[y_true == c] == c).mean() for c in np.unique(y_true)]))


def fit_linear(kind: str, features: np.ndarray, labels, split: Split, seed: int = 0) -> float:
    """Train a linear classifier on ``features[split.train]``; mean class accuracy on ``split.test``.

    ``kind``: ``"softmax"`` (multinomial logistic regression, the new top layer of Sec. 5.2) or
    ``"svm"`` (linear SVM, one-vs-rest, Table 7). Features are standardised on the training images.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC
    from threadpoolctl import threadpool_limits

    labels = np.asarray(labels)
    scaler = StandardScaler().fit(features[split.train])
    x_train, x_test = scaler.transform(features[split.train]), scaler.transform(features[split.test])
    if kind == "softmax":
        clf = LogisticRegression(C=1.0, max_iter=1000, random_state=seed)
    elif kind == "svm":
        clf = LinearSVC(C=1.0, max_iter=5000, random_state=seed)
    else:
        raise ValueError(f"unknown classifier {kind!r}; use 'softmax' or 'svm'")
    with threadpool_limits(1):  # a few hundred samples: BLAS threads only add overhead (100x under load)
        clf.fit(x_train, labels[split.train])
    return mean_class_accuracy(labels[split.test], clf.predict(x_test))
