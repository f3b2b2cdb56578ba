"""What the per-image analyses (occlusion, invariance, correspondence) share: eval mode, the features
of named layers for a batch of images, and turning an image back into
pixels to draw."""
from __future__ import annotations

import sys
import types
from contextlib import contextmanager

import torch
from torch import nn

from .data import Preprocess
from .probe import activations


@contextmanager
def eval_mode(model: nn.Module):
    """Run ``model`` in eval mode (dropout off), restoring its previous mode on exit."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@torch.no_grad()
def features(model: nn.Module, x: torch.Tensor, layers: list[str], batch_size: int = 64) -> dict[str, torch.Tensor]:
    """Flattened outputs of the named ``layers`` for images ``x`` (N, C, H, W): ``{layer: (N, D)}``, eval mode."""
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    with eval_mode(model):
        for start in range(0, len(x), batch_size):
            for name, a in activations(model, x[start:start + batch_size], layers).items():
                parts[name].append(a.flatten(1).cpu())
    return {name: torch.cat(p) for name, p in parts.items()}


def strongest_units(maps: torch.Tensor, count: int = 1) -> list[tuple[int, int, int]]:
    """The peak ``(channel, y, x)`` of the ``count`` maps of ``maps`` (C, H, W) whose peaks are highest,
    strongest first; within a map, the first maximum in raster order. The one definition of "the
    strongest unit" used by ``project``, occlusion (Fig. 7) and the viewer."""
    peaks, where = maps.flatten(1).max(1)
    chosen = peaks.argsort(descending=True, stable=True)[:count].tolist()
    return [(c, *divmod(int(where[c]), maps.shape[-1])) for c in chosen]


def picture(preprocess: Preprocess, raw: torch.Tensor) -> torch.Tensor:
    """Raw images (N, C, S, S) at the stored size -> float (N, C, H, W) in [0, 1], cropped like the
    model's input, to draw under the analyses' overlays."""
    x = raw.float() / 255.0
    if preprocess.pad:
        x = torch.nn.functional.pad(x, (preprocess.pad,) * 4)
    return preprocess.crop(x, 4)


def foreground(pictures: torch.Tensor, threshold: float = 0.1) -> torch.Tensor:
    """Object pixels of images on a black background (Fashion-MNIST): (N, C, H, W) -> bool (N, H, W)."""
    return pictures.mean(1) > threshold


def to_rgb(img: torch.Tensor):
    """(C, H, W) float in [0, 1] -> an array matplotlib draws, (H, W) grey or (H, W, 3)."""
    img = img.clamp(0, 1)
    return img[0].numpy() if img.shape[0] == 1 else img.permute(1, 2, 0).numpy()


def callable_module(name: str, function) -> None:
    """Make the module ``name`` callable as its analysis ``function``: ``deconvnet.occlusion(model,
    images)`` runs the analysis while ``deconvnet.occlusion.draw_occlusion`` (and every other name of
    the module) stays reachable, so one name serves both."""
    class Analysis(types.ModuleType):
        def __call__(self, *args, **kwargs):
            return function(*args, **kwargs)

    Analysis.__call__.__doc__ = function.__doc__
    sys.modules[name].__class__ = Analysis
