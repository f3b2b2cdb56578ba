"""The atlas: Fig. 2 for every feature map of a network, as a static web site.

Fig. 2 shows, for 9 maps per layer, the top 9 activations over the validation set, each projected to
pixels by the deconvnet (Sec. 2.1) beside the input patch under its receptive field. The atlas does
it for every map of the requested layers: one streaming top-k pass over the data (:func:`topk_pass`),
then, map by map, its k projections and patches drawn into one PNG, and one HTML page per layer with
each map at a stable address ``LAYER.html#MAP``. The site reads from disk, no server needed::

    OUT/index.html           layers, counts, the model and data it was made from
    OUT/LAYER.html           every map of LAYER, an element id="MAP" each
    OUT/LAYER/MAP.png        row 1: the k projections, row 2: the input patches (best first)
    OUT/atlas.json           every map's top-k entries (image, class, value, position, box)
    OUT/manifest.json        the maps whose PNG is finished, and the key of their inputs (reused)

The top-k tables come from the runner's cache, where ``deconvnet topk`` and ``serve`` find them too;
the manifest's key is the runner's key of the tables and of this module's source (a code change
redraws the maps).

Killed midway, a rerun finishes the rest; a rerun of a finished atlas redoes nothing but the pages.
Under ``torchrun`` the top-k pass is sharded over images and the maps over processes (the i-th map
of the whole atlas to process i % world); the site is the same as one process makes.
"""
from __future__ import annotations

import html
import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ._analysis import eval_mode
from .data import Preprocess, Source
from .errors import UserError
from .runner import atomic_write_bytes, atomic_write_json, atomic_write_text, cache_key, progress, world
from .topk import TopK, cached_topk, class_purity, gallery, tile_pixels

TILE = 48  # a tile's least side in the PNG (small receptive fields are enlarged, nearest neighbour)
_OUTSIDE = (0.92, 0.93, 0.96)  # tile pixels outside the image (a field clipped by the border)
_BYTES_PER_CHUNK = 96 * 2 ** 20  # images and projections held at once while projecting


def build_atlas(model: nn.Module, source: Source, preprocess: Preprocess, layers: list[str], out: str | Path,
                k: int = 9, classes: list[str] | None = None, indices=None, about: dict | None = None,
                batch_size: int = 256, other_activations: str = "error", workers: int | None = None) -> dict:
    """Write the atlas of ``layers`` over ``source`` (or its ``indices``) to the directory ``out``.
    ``other_activations``: as in :class:`Deconvnet` (ReLU6, SiLU, ... on the way down).

    ``classes`` names the labels (default: the source's); ``about`` (``{"model": ..., "data": ...}``,
    strings) is shown on the index page. Returns a summary: maps per layer, maps projected by this
    process and maps reused from an earlier run. Every process of a ``torchrun`` job calls it.
    """
    out = Path(out)
    layers = list(dict.fromkeys(layers))
    if not layers:
        raise UserError("give at least one layer")
    indices = torch.arange(len(source)) if indices is None else torch.as_tensor(indices, dtype=torch.long)
    if len(indices) == 0:
        raise UserError("the data has no images")
    classes = list(source.classes if classes is None else classes)
    rank, procs = world()
    # every process looks before any writes: the pass ends with a merge that waits for all of them
    tables, tables_key, topk_reused = cached_topk(model, source, preprocess, layers, k, indices, batch_size, workers)
    key = cache_key(build_atlas, {"tables": tables_key})

    done = _read_done(out, key)
    jobs = [(name, c) for name in layers for c in range(tables[name].values.shape[0])]
    mine = [job for i, job in enumerate(jobs) if i % procs == rank]
    todo = [job for job in mine if job[1] not in done.get(job[0], set())]
    labels = source.labels
    per_entry = 3 * 4 * preprocess.channels * preprocess.input_size ** 2
    chunk = max(1, min(64, _BYTES_PER_CHUNK // (per_entry * k)))  # maps per batched projection
    with eval_mode(model), progress(total=len(todo), desc="atlas", unit="map") as bar:
        for name in layers:
            maps = [c for layer, c in todo if layer == name]
            for start in range(0, len(maps), chunk):
                part = maps[start:start + chunk]
                g = gallery(model, source, preprocess, name, tables[name], part, other_activations)
                for m, c in enumerate(part):
                    atomic_write_bytes(out / name / f"{c}.png", _png(g.projections[m], g.patches[m]))
                    done.setdefault(name, set()).add(c)
                _write_done(out / f".manifest-rank{rank}.json", key, done)
                bar.update(len(part))
    if procs > 1:
        dist.barrier()
    summary = {"out": str(out), "images": len(indices), "k": k,
               "maps": {name: int(tables[name].values.shape[0]) for name in layers},
               "projected": len(todo), "reused": len(mine) - len(todo), "topk_reused": topk_reused}
    if rank != 0:
        return summary
    done = _read_done(out, key)
    missing = [job for job in jobs if job[1] not in done.get(job[0], set())]
    if missing:
        raise RuntimeError(f"{len(missing)} maps unfinished, e.g. {missing[0]}")
    _write_done(out / "manifest.json", key, done)
    for stale in out.glob(".manifest-rank*.json"):
        stale.unlink()
    _write_site(out, tables, labels, classes, preprocess, indices, about or {}, k)
    return summary


# ----------------------------------------------------------------------------- resumable state

def _read_done(out: Path, key: str) -> dict[str, set[int]]:
    """Finished maps, from the manifest and the processes' progress files, whose PNG exists."""
    done: dict[str, set[int]] = {}
    for path in [out / "manifest.json", *sorted(out.glob(".manifest-rank*.json"))]:
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if record.get("key") != key:
            continue
        for name, maps in record.get("done", {}).items():
            done.setdefault(name, set()).update(c for c in maps if (out / name / f"{c}.png").is_file())
    return done


def _write_done(path: Path, key: str, done: dict[str, set[int]]) -> None:
    atomic_write_json(path, {"key": key, "done": {name: sorted(maps) for name, maps in done.items()}})


# ----------------------------------------------------------------------------- drawing

def _png(projections: torch.Tensor, patches: torch.Tensor) -> bytes:
    """One map's strip: (k, C, R, R) projections above (k, C, R, R) patches, NaN outside the image.

    Each projection is contrast-stretched over its own range, as in Fig. 2.
    """
    from io import BytesIO

    from PIL import Image

    k, _, r, _ = projections.shape
    scale = max(1, math.ceil(TILE / r))
    gap = 2
    side = r * scale
    canvas = np.ones((2 * side + gap, k * side + (k - 1) * gap, 3), dtype=np.float32)
    for j in range(k):
        for row, tile in enumerate((projections[j], patches[j])):
            rgb = tile_pixels(tile, stretch=row == 0).expand(3, -1, -1)  # grey -> RGB; RGB unchanged
            rgb = torch.where(tile[:1].isnan().expand(3, -1, -1), torch.tensor(_OUTSIDE).view(3, 1, 1), rgb)
            rgb = rgb.repeat_interleave(scale, 1).repeat_interleave(scale, 2).permute(1, 2, 0).numpy()
            y, x = row * (side + gap), j * (side + gap)
            canvas[y:y + side, x:x + side] = rgb
    buffer = BytesIO()
    Image.fromarray((canvas * 255).round().astype(np.uint8)).save(buffer, format="PNG", compress_level=3)
    return buffer.getvalue()


# ----------------------------------------------------------------------------- the site

_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#222;background:#f6f6f4}
header{background:#222;color:#eee;padding:10px 18px}header a{color:#9cf;margin-right:12px}
header h1{font-size:18px;margin:0 0 4px}main{padding:14px 18px}
.grid{display:flex;flex-wrap:wrap;gap:12px}
.map{background:#fff;border:1px solid #ddd;border-radius:6px;padding:6px 8px;width:var(--w)}
.map:target{outline:3px solid #e4572e}.map.dead{opacity:.55}
.map h2{font-size:13px;margin:0 0 4px;display:flex;justify-content:space-between}
.map h2 a{color:#222;text-decoration:none}.map h2 span{font-weight:normal;color:#666}
.map img{width:100%;image-rendering:pixelated;display:block}
.labels{display:flex;font-size:9.5px;line-height:1.2;color:#444}
.labels div{flex:1;text-align:center;overflow:hidden;white-space:nowrap;text-overflow:ellipsis}
.labels b{display:block;font-weight:600;color:#222}
table{border-collapse:collapse;background:#fff}td,th{border:1px solid #ddd;padding:4px 10px;text-align:right}
th{background:#eee}td:first-child,th:first-child{text-align:left}
dl{display:grid;grid-template-columns:max-content auto;gap:4px 16px}dt{font-weight:600}dd{margin:0}
"""


def _page(title: str, nav: str, body: str) -> str:
    return (f"<!doctype html>\n<html lang=en><head><meta charset=utf-8><title>{html.escape(title)}</title>"
            f"<meta name=viewport content='width=device-width'><style>{_STYLE}</style></head>\n<body>"
            f"<header><h1>{html.escape(title)}</h1>{nav}</header>\n<main>{body}</main></body></html>\n")


def _write_site(out: Path, tables: dict[str, TopK], labels: torch.Tensor, classes: list[str],
                preprocess: Preprocess, indices: torch.Tensor, about: dict, k: int) -> None:
    """index.html, one LAYER.html per layer (an element id="MAP" per map), atlas.json."""
    layers = list(tables)
    nav = "<a href='index.html'>index</a>" + "".join(
        f"<a href='{html.escape(n)}.html'>{html.escape(n)}</a>" for n in layers)

    def class_of(image: int) -> str:
        label = int(labels[image])
        return classes[label] if 0 <= label < len(classes) else str(label)

    record = {"about": about, "images": len(indices), "k": k, "classes": classes, "layers": {}}
    purity = class_purity(tables, labels)
    rows = []
    for name, t in tables.items():
        width = k * 40
        cards, entries = [], []
        for c in range(t.values.shape[0]):
            top = [j for j in range(k) if t.images[c, j] >= 0]
            fires = bool(t.values[c, 0] > 0)
            items = [{"image": int(t.images[c, j]), "class": class_of(int(t.images[c, j])),
                      "value": float(t.values[c, j]), "y": int(t.ys[c, j]), "x": int(t.xs[c, j]),
                      "box": t.boxes[c, j].tolist()} for j in top]
            entries.append({"map": c, "png": f"{name}/{c}.png", "top": items})
            names = [e["class"] for e in items]
            common = max(set(names), key=names.count) if names else ""
            share = f"{names.count(common)}/{len(names)} {common}" if fires else "never fires"
            cells = "".join(
                f"<div title='image {e['image']} ({html.escape(e['class'])}): {e['value']:.4g} at "
                f"({e['y']}, {e['x']})'><b>{e['value']:.3g}</b>{html.escape(e['class'])}</div>" for e in items)
            cells += "<div></div>" * (k - len(items))
            src = html.escape(f"{name}/{c}.png")
            cards.append(f"<div class='map{'' if fires else ' dead'}' id='{c}'><h2><a href='#{c}'>map {c}</a>"
                         f"<span>{html.escape(share)}</span></h2><a href='{src}'><img src='{src}' "
                         f"alt='{html.escape(name)} map {c}' loading=lazy></a><div class=labels>{cells}</div></div>")
        record["layers"][name] = {"maps": entries}
        alive = int((t.values[:, 0] > 0).sum())
        r = t.boxes[:, :, 2] - t.boxes[:, :, 0] + 1
        intro = (f"<p>{len(cards)} feature maps of {html.escape(name)}, {alive} fire on some image. Each: its top "
                 f"{k} activations over {len(indices)} images, one per image, best first; row 1 projected to "
                 f"pixels by the deconvnet (Sec. 2.1, each stretched to its own range), row 2 the input patch "
                 f"under the receptive field (Fig. 2). Labels: activation, class of the image. Address of map M: "
                 f"<code>{html.escape(name)}.html#M</code>. Jump to map <input type=number min=0 "
                 f"max={len(cards) - 1} style='width:5em' onchange=\"location.hash=this.value\"></p>")
        body = f"{intro}<div class=grid style='--w:{width}px'>{''.join(cards)}</div>"
        atomic_write_text(out / f"{name}.html", _page(f"{name}: top {k} of every feature map", nav, body))
        p = purity.get(name)
        rows.append(f"<tr><td><a href='{html.escape(name)}.html'>{html.escape(name)}</a></td><td>{len(cards)}</td>"
                    f"<td>{alive}</td><td>{int(r.max())} px</td><td>{'' if p is None else f'{p:.3f}'}</td></tr>")
    facts = "".join(f"<dt>{html.escape(str(key))}</dt><dd>{html.escape(str(value))}</dd>" for key, value in
                    {**about, "images": f"{len(indices)} (indices {int(indices[0])}..{int(indices[-1])})",
                     "input": f"{preprocess.input_size} px, {preprocess.channels} channel(s), center crop",
                     "k": f"{k} per map, from {k} different images"}.items())
    table = ("<table><tr><th>layer</th><th>maps</th><th>fire</th><th>largest patch</th>"
             "<th>class purity</th></tr>" + "".join(rows) + "</table>")
    body = (f"<p>Fig. 2 of Zeiler &amp; Fergus (2014) for every feature map: the top {k} activations of each map "
            f"over the data, projected to pixels by the deconvnet, beside the input patches. "
            f"{sum(t.values.shape[0] for t in tables.values())} maps in {len(layers)} layers. Class purity: the "
            f"mean share of a firing map's top images that carry its most common class.</p>{table}<dl>{facts}</dl>"
            f"<p>Data: <a href='atlas.json'>atlas.json</a> (every map's entries).</p>")
    atomic_write_json(out / "atlas.json", record)
    atomic_write_text(out / "index.html", _page("Feature atlas", nav, body))
