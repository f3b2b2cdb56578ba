"""Top-k activations per feature map over a dataset, and the Fig. 2 gallery built from them.

Fig. 2 shows, for a random subset of feature maps in layers 1-5, the top 9 activations over the
validation set, each projected to pixels separately by the deconvnet (Sec. 2.1) beside the input
patch under its receptive field. As there, the k entries of a map come from k different images:
each image offers its strongest position in that map. One streaming pass keeps a (maps, k) table
per layer, so memory does not grow with the dataset; ties break by image index, so the table is
the same however the data is split over ``torchrun`` processes.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from ._analysis import callable_module, eval_mode, picture, to_rgb
from .data import Preprocess, Source, batches
from .deconvnet import Deconvnet, contrast_stretch
from .errors import UserError
from .findings import Finding, pct
from .geometry import layer_field, unit_box
from .probe import apply_at
from .runner import (cache_dir, cache_key, cached, collective_device, load_cached, model_device, model_fingerprint,
                     progress, world)
from .figures import finish, new_figure

if TYPE_CHECKING:
    from matplotlib.figure import Figure


@dataclass
class TopK:
    """The ``k`` strongest activations of every feature map of one layer, best first.

    ``values`` (C, k); ``images`` (C, k) dataset indices, -1 where the data had fewer than k images;
    ``ys``, ``xs`` (C, k) positions in the layer's output; ``boxes`` (C, k, 4) their receptive fields
    ``(top, left, bottom, right)`` (inclusive) in the model's input, clipped to it.
    """

    values: torch.Tensor
    images: torch.Tensor
    ys: torch.Tensor
    xs: torch.Tensor
    boxes: torch.Tensor | None = None


def _merge(a: TopK, b: TopK, k: int) -> TopK:
    """The best ``k`` of both tables per map: by value, then by smaller image index."""
    values, images = torch.cat([a.values, b.values], 1), torch.cat([a.images, b.images], 1)
    ys, xs = torch.cat([a.ys, b.ys], 1), torch.cat([a.xs, b.xs], 1)
    order = images.argsort(dim=1, stable=True)
    order = order.gather(1, values.gather(1, order).argsort(dim=1, descending=True, stable=True))[:, :k]
    return TopK(values.gather(1, order), images.gather(1, order), ys.gather(1, order), xs.gather(1, order))


def _empty(maps: int, k: int) -> TopK:
    zeros = torch.zeros(maps, k, dtype=torch.long)
    return TopK(torch.full((maps, k), -torch.inf), zeros - 1, zeros, zeros.clone())


def _add_batch(table: TopK, a: torch.Tensor, indices: torch.Tensor, k: int) -> TopK:
    """Merge each image's strongest position per map of ``a`` (B, C, H, W) into ``table``.

    One read of ``a`` for the maxima; positions (the first maximum in raster order) only for the
    entries that enter the table, found while ``a`` is still the layer's output.
    """
    b, c, _, width = a.shape
    rows = torch.arange(b).expand(c, b)
    batch = TopK(a.flatten(2).amax(2).T.float().cpu(), indices[None].expand(c, b), -1 - rows, -1 - rows)
    t = _merge(table, batch, k)
    maps, slots = (t.ys < 0).nonzero(as_tuple=True)  # entries from this batch: -1 - their row
    flat = a[(-1 - t.ys[maps, slots]).to(a.device), maps.to(a.device)].flatten(1).argmax(1).cpu()
    t.ys[maps, slots], t.xs[maps, slots] = flat // width, flat % width
    return t


def _gather_ranks(table: TopK, k: int) -> TopK:
    """Merge the tables of all ``torchrun`` processes; every process gets the same result."""
    size, where = dist.get_world_size(), collective_device()  # NCCL gathers on the GPU
    parts = []
    for t in (table.values, table.images, table.ys, table.xs):
        out = [torch.empty_like(t, device=where) for _ in range(size)]
        dist.all_gather(out, t.contiguous().to(where))
        parts.append([o.cpu() for o in out])
    merged = _empty(table.values.shape[0], k)
    for values, images, ys, xs in zip(*parts):
        merged = _merge(merged, TopK(values, images, ys, xs), k)
    return merged


@torch.inference_mode()
def topk_pass(model: nn.Module, source: Source, preprocess: Preprocess, layers: list[str], k: int = 9,
              indices=None, batch_size: int = 256, workers: int | None = None) -> dict[str, TopK]:
    """One pass over ``source`` (or its ``indices``): the ``k`` strongest activations of every map.

    Runs the model (in eval mode) up to the last of ``layers`` on the center crop of each image.
    Under ``torchrun`` each process takes every world-th image and the tables are merged.
    """
    if k < 1:
        raise UserError("k must be at least 1")
    indices = torch.arange(len(source)) if indices is None else torch.as_tensor(indices, dtype=torch.long)
    rank, procs = world()
    mine = indices[rank::procs]
    tables: dict[str, TopK] = {}
    device = model_device(model)
    with eval_mode(model), progress(total=len(mine), desc="top-k", unit="img") as bar:
        for start, (raw, _) in zip(range(0, len(mine), batch_size),
                                   batches(source, mine, batch_size, workers, pin=device.type == "cuda")):
            batch = mine[start:start + len(raw)]

            def update(name: str, a: torch.Tensor) -> None:
                if a.dim() != 4:
                    raise UserError(f"layer {name!r} has no feature maps (output shape {tuple(a.shape[1:])})")
                tables[name] = _add_batch(tables[name] if name in tables else _empty(a.shape[1], k), a, batch, k)

            apply_at(model, preprocess.eval(raw.to(device, non_blocking=True)), layers, update)
            bar.update(len(raw))
    if procs > 1:
        tables = {name: _gather_ranks(t, k) for name, t in tables.items()}
    size = preprocess.input_size
    for name, t in tables.items():
        boxes: dict[tuple[int, int], tuple] = {}  # one per position: a measured field costs a backward pass
        for y, x in zip(t.ys.flatten().tolist(), t.xs.flatten().tolist()):
            if (y, x) not in boxes:
                boxes[y, x] = unit_box(model, name, y, x, size)
        t.boxes = torch.tensor([[boxes[y, x] for y, x in zip(ys, xs)]
                                for ys, xs in zip(t.ys.tolist(), t.xs.tolist())], dtype=torch.long)
    return tables


def topk_cache_path(model: nn.Module, source: Source, preprocess: Preprocess, layers: list[str], k: int = 9,
                indices=None) -> tuple[Path, str]:
    """``(path, key)`` of :func:`topk_pass`'s tables in the runner's cache: keyed by the model's weights, the
    preprocessing, the data, the images, the layers, ``k`` and the source of this module."""
    indices = list(range(len(source))) if indices is None else [int(i) for i in indices]
    mean = hashlib.sha256(preprocess.mean.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
    arguments = {"model": model_fingerprint(model), "preprocess": preprocess.to_dict(), "mean": mean,
                 "data": source.name, "images": hashlib.sha256(json.dumps(indices).encode()).hexdigest(),
                 "layers": list(layers), "k": k}
    key = cache_key(topk_pass, arguments)
    return cache_dir() / "topk" / f"{key[:32]}.pt", key


def cached_topk(model: nn.Module, source: Source, preprocess: Preprocess, layers: list[str], k: int = 9,
                indices=None, batch_size: int = 256, workers: int | None = None) -> tuple[dict[str, TopK], str, bool]:
    """:func:`topk_pass` through the runner's cache, shared by ``topk``, ``serve`` and ``atlas``: the same
    model, data and layers are passed over once. Returns the tables, their cache key and whether they
    were read from the cache."""
    path, key = topk_cache_path(model, source, preprocess, layers, k, indices)
    tables, reused = cached(path, key, lambda: {name: vars(t) for name, t in
                                                topk_pass(model, source, preprocess, layers, k, indices, batch_size,
                                                          workers).items()})
    return {name: TopK(**fields) for name, fields in tables.items()}, key, reused


def load_topk(model: nn.Module, source: Source, preprocess: Preprocess, layers: list[str], k: int = 9,
               indices=None) -> dict[str, TopK] | None:
    """The cached tables of :func:`cached_topk`, or None when that pass has not run."""
    tables = load_cached(*topk_cache_path(model, source, preprocess, layers, k, indices))
    return None if tables is None else {name: TopK(**fields) for name, fields in tables.items()}


# ----------------------------------------------------------------------------- the Fig. 2 gallery

@dataclass
class Gallery:
    """Fig. 2 for one layer: for each chosen map, its top activations projected and the input patches.

    ``projections`` and ``patches`` are (M, k, C, R, R) tiles of the receptive field's full size R:
    the projection (raw values) and the input picture in [0, 1], placed where the clipped field sits;
    the rest of a tile is NaN (outside the image).
    """

    layer: str
    maps: list[int]
    projections: torch.Tensor
    patches: torch.Tensor


def choose_maps(table: TopK, count: int, seed: int = 0) -> list[int]:
    """A random (seeded) subset of ``count`` maps among those that fire on some image (Fig. 2)."""
    alive = (table.values[:, 0] > 0).nonzero().flatten()
    generator = torch.Generator().manual_seed(seed)
    return sorted(alive[torch.randperm(len(alive), generator=generator)[:count]].tolist())


def gallery(model: nn.Module, source: Source, preprocess: Preprocess, layer: str, table: TopK,
            maps: list[int], other_activations: str = "error") -> Gallery:
    """Project the top activations of ``maps`` in ``layer`` (one batched deconvnet pass) and cut the
    input patch under each receptive field (Fig. 2). ``other_activations``: as in :class:`Deconvnet`."""
    entries = [(c, j) for c in maps for j in range(table.values.shape[1]) if table.images[c, j] >= 0]
    wanted = sorted({int(table.images[c, j]) for c, j in entries})
    raw = source.get(wanted)
    row = {image: i for i, image in enumerate(wanted)}
    which = torch.tensor([row[int(table.images[c, j])] for c, j in entries], dtype=torch.long)
    units = [(c, int(table.ys[c, j]), int(table.xs[c, j])) for c, j in entries]
    with eval_mode(model):
        projections = Deconvnet(model, other_activations).project(preprocess.eval(raw)[which], layer, units)
    pictures = picture(preprocess, raw)[which]
    field = layer_field(model, layer, preprocess.input_size)
    boxes = [table.boxes[c, j].tolist() for c, j in entries]
    if field is not None:  # the field's full size; a box cut by the border sits where the image was
        size = max(field[0])
    else:  # a field the geometry had to measure: the largest box, each at the tile's corner
        size = max([b[2] - b[0] + 1 for b in boxes] + [b[3] - b[1] + 1 for b in boxes] + [1])
    k = table.values.shape[1]
    shape = (len(maps), k, projections.shape[1], size, size)
    tiles_p, tiles_x = torch.full(shape, torch.nan), torch.full(shape, torch.nan)
    for n, (c, j) in enumerate(entries):
        y0, x0, y1, x1 = boxes[n]
        dy = dx = 0
        if field is not None:
            full_top, full_left, _, _ = unit_box(model, layer, units[n][1], units[n][2], preprocess.input_size,
                                                 clip=False)
            dy, dx = y0 - full_top, x0 - full_left
        m = maps.index(c)
        tiles_p[m, j, :, dy:dy + y1 - y0 + 1, dx:dx + x1 - x0 + 1] = projections[n, :, y0:y1 + 1, x0:x1 + 1]
        tiles_x[m, j, :, dy:dy + y1 - y0 + 1, dx:dx + x1 - x0 + 1] = pictures[n, :, y0:y1 + 1, x0:x1 + 1]
    return Gallery(layer, list(maps), tiles_p, tiles_x)


def tile_pixels(tile: torch.Tensor, stretch: bool) -> torch.Tensor:
    """A gallery tile (C, R, R), NaN outside the image -> values in [0, 1] to show, 1 (white) outside.
    ``stretch``: a projection, contrast-stretched over its own range as in Fig. 2. The one tile
    renderer of the gallery, the atlas and the viewer."""
    inside = ~tile.isnan()
    if stretch and inside.any():
        tile = contrast_stretch(torch.where(inside, tile, tile[inside].min())[None])[0]
    return torch.where(inside, tile.clamp(0, 1), torch.ones(()))


def mosaic(tiles: torch.Tensor, stretch: bool) -> torch.Tensor:
    """(k, C, R, R) tiles -> one (C, rows*R, cols*R) square-ish mosaic with 1 px white gaps."""
    k, c, r, _ = tiles.shape
    cols = math.ceil(math.sqrt(k))
    rows = -(-k // cols)
    out = torch.ones(c, rows * (r + 1) - 1, cols * (r + 1) - 1)
    for j, tile in enumerate(tiles):
        tile = tile_pixels(tile, stretch)
        y, x = divmod(j, cols)
        out[:, y * (r + 1):y * (r + 1) + r, x * (r + 1):x * (r + 1) + r] = tile
    return out


def draw_gallery(result: Gallery, path=None, title: str = "") -> Figure:
    """One PNG: per map, its top-k projections (each contrast-stretched) beside the input patches."""
    n = len(result.maps)
    cols = min(3, n) or 1
    rows = -(-n // cols) or 1
    fig, axes = new_figure(rows, cols, figsize=(4.2 * cols, 2.3 * rows + 0.5), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for m, (c, ax) in enumerate(zip(result.maps, axes.flat)):
        proj = mosaic(result.projections[m], stretch=True)
        patch = mosaic(result.patches[m], stretch=False)
        gap = torch.ones(proj.shape[0], proj.shape[1], max(2, proj.shape[2] // 12))
        ax.imshow(to_rgb(torch.cat([proj, gap, patch], 2)), cmap="gray", vmin=0, vmax=1,
                  interpolation="nearest")
        ax.set_title(f"map {c}", fontsize=9)
    fig.suptitle(title or f"{result.layer}: top activations projected (left), input patches (right)", fontsize=10)
    return finish(fig, path)


def map_purity(tables: dict[str, TopK], labels: torch.Tensor) -> dict[str, list[float]]:
    """Per layer, one value per feature map that fires (its strongest activation above 0) over every map
    of the table, not only the maps drawn: the share of the map's top images that carry its most common
    label."""
    purity = {}
    for name, t in tables.items():
        shares = []
        for c in range(t.values.shape[0]):
            images = t.images[c][t.images[c] >= 0]
            if len(images) and t.values[c, 0] > 0:
                shares.append(labels[images].bincount().max().item() / len(images))
        purity[name] = shares
    return purity


def class_purity(tables: dict[str, TopK], labels: torch.Tensor) -> dict[str, float | None]:
    """Per layer, the mean of :func:`map_purity` over the maps that fire (None where no map fires)."""
    return {name: sum(v) / len(v) if v else None for name, v in map_purity(tables, labels).items()}


def topk_findings(tables: dict[str, TopK], labels: torch.Tensor) -> list[Finding]:
    """Fig. 2's reading in numbers: how often a map's top images share one class, per layer.

    Layer 1 responds to edges found in every class, higher layers to object parts (Fig. 2), so a map's
    top images should come from fewer classes higher up. Set-up: one purity per map that fires, over
    every map of the first and the last layer (:func:`map_purity`); the last layer's mean minus the
    first's, the maps of the two layers taken as two independent groups
    (:func:`stats.difference_interval` with ``paired=False``); held when its 95% interval lies above 0.
    Both layers' tables hold the same k images per map, so chance purity is the same in both.
    """
    from .findings import interval_text
    from .stats import difference_interval, verdict

    per_map = map_purity(tables, labels)
    purity = class_purity(tables, labels)
    first, last = next(iter(per_map)), list(per_map)[-1]
    claim = f"a feature map's top images share a class more often in {last} than in {first} (Fig. 2)"
    paper = "layer 1: edges and colours; higher layers: object parts, whole objects"
    quantity = f"share of a map's top images with its most common class, mean over {last}'s maps minus {first}'s"
    if_not_held = ("Of the scale: Fashion-MNIST's ten classes share outlines at 28 px, so even upper-layer maps "
                   "of a small net may respond to parts common to several classes.")
    shown = ", ".join(f"{k} {pct(v)} of {len(per_map[k])} maps" for k, v in purity.items() if v is not None)
    ours = {"class_purity": {name: round(v, 3) for name, v in purity.items() if v is not None},
            "maps_that_fire": {name: len(v) for name, v in per_map.items()}}
    if first == last or not per_map[first] or not per_map[last]:
        why = ("only one layer was given" if first == last else
               f"no map fired in {first if not per_map[first] else last}")
        return [Finding(claim, paper, ours, verdict(None), f"Not measured: {why}, so the layers cannot be compared.",
                        quantity=quantity, n=0, unit="maps", if_not_held=if_not_held)]
    estimate, interval = difference_interval(per_map[last], per_map[first], paired=False)
    n = len(per_map[first]) + len(per_map[last])
    result = verdict(interval)
    reading = (f"The strongest images of a feature map share one class {pct(purity[first])} of the time in "
               f"{first} and {pct(purity[last])} in {last} ({shown}); {last} minus {first}: "
               f"{interval_text({'estimate': estimate, 'interval': interval, 'n': n, 'unit': 'maps'})}. "
               + {"held": "Higher layers respond to more class-specific structure, as the paper shows by eye.",
                  "not held": "At this scale the higher layers are less class-specific.",
                  "inconclusive": "The interval contains 0: the higher layer is not shown to be more "
                                  "class-specific."}[result])
    return [Finding(claim, paper, ours, result, reading, quantity=quantity, estimate=estimate, interval=interval,
                    n=n, unit="maps", if_not_held=if_not_held)]


def topk_to_json(tables: dict[str, TopK], galleries: dict[str, list[int]] | None = None) -> dict:
    """Every map's entries: image index, value, position and receptive-field box; the gallery's maps."""
    out = {}
    for name, t in tables.items():
        maps = []
        for c in range(t.values.shape[0]):
            maps.append({"map": c, "top": [
                {"image": int(t.images[c, j]), "value": float(t.values[c, j]), "y": int(t.ys[c, j]),
                 "x": int(t.xs[c, j]), "box": t.boxes[c, j].tolist()}
                for j in range(t.values.shape[1]) if t.images[c, j] >= 0]})
        out[name] = {"gallery_maps": (galleries or {}).get(name, []), "maps": maps}
    return out


def topk(model, data, layers: list[str] | None = None, k: int = 9, limit: int | None = None) -> dict[str, TopK]:
    """Fig. 2's pass: the ``k`` strongest activations of every feature map of ``layers`` over a data set,
    through the shared cache (a second call with the same model, data and layers reads it).

    Args:
        model: the model under study (:class:`~deconvnet.subject.Subject`), or an ``nn.Module``
            wrapped by :func:`~deconvnet.subject.as_subject`.
        data: a data spec (``folder:PATH``, ``fashion-mnist:test``, ...) or an open source.
        layers: default the model's stages (``conv1`` .. ``conv5`` for ours).
        limit: only the first ``limit`` images.
    """
    from .subject import as_subject

    subject = as_subject(model)
    source = subject.open_data(data) if isinstance(data, str) else data
    n = len(source) if limit is None else min(limit, len(source))
    return cached_topk(subject.model, source, subject.preprocess, subject.layers(layers), k=k,
                       indices=list(range(n)))[0]


callable_module(__name__, topk)
