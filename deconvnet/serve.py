"""The interactive viewer (``deconvnet serve``): a local web app over a model under study and a data set.

In the browser a person picks a layer and a feature map and sees its top-9 activations over the data
set projected to pixels beside the input patches (Fig. 2); or picks a data set image, or uploads a
PNG/JPEG, and sees the prediction, the strongest feature maps of every conv layer projected by the
three rules (deconvnet, guided, gradient) and the occlusion maps of Fig. 7. A Starlette app served
by uvicorn; the front end is plain HTML/JS/CSS under ``deconvnet/static`` (no build step). Images
travel as base64 PNG data URLs inside the JSON answers.

Concurrency: requests share one model behind a lock (a projection attaches hooks to it). The top-k
pass runs once per (model, weights, data, limit, layers) in a background thread on its own copy of the model;
its tables are kept in memory and in the runner's cache, shared with ``deconvnet topk``. Uploads are read into memory only,
never past the size limit, and decoded with Pillow; nothing the user sends names a file.
"""
from __future__ import annotations

import base64
import contextlib
import copy
import io
import threading
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from torch import nn

from ._analysis import strongest_units
from .data import Source, load_image
from .deconvnet import RULES, Deconvnet, contrast_stretch
from .errors import UserError
from .figures import heatmap_pixels, label_colors
from .geometry import unit_box
from .occlusion import occlude_image
from .probe import activations
from .subject import Subject
from .topk import TopK, cached_topk, gallery, load_topk, tile_pixels

STATIC = Path(__file__).parent / "static"
MAX_UPLOAD = 10 * 1024 * 1024  # bytes
MAX_PIXELS = 40_000_000  # an upload's decoded size, checked before decoding (decompression bombs)
K = 9  # top activations per feature map (Fig. 2)
STRONGEST = 4  # feature maps shown per layer for one image
MAX_THUMBNAILS = 100  # data set images per page of the picker


# ----------------------------------------------------------------------------- images as PNG data URLs

def _png(image: np.ndarray) -> str:
    """uint8 (H, W) or (H, W, 3) -> a ``data:image/png;base64,...`` URL."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _pixels(image: torch.Tensor) -> np.ndarray:
    """(C, H, W) float in [0, 1] -> uint8 (H, W) for one channel, (H, W, 3) for three."""
    x = (image.clamp(0, 1) * 255).round().to(torch.uint8)
    return x[0].numpy() if x.shape[0] == 1 else x.permute(1, 2, 0).numpy()


def _rgb(image: torch.Tensor) -> np.ndarray:
    """(C, H, W) in [0, 1] -> uint8 (H, W, 3), grey repeated."""
    pixels = _pixels(image)
    return np.repeat(pixels[..., None], 3, 2) if pixels.ndim == 2 else pixels


def _outlined(image: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """A copy of uint8 (H, W, 3) ``image`` with the inclusive ``box`` (top, left, bottom, right) drawn in red."""
    out = image.copy()
    top, left, bottom, right = box
    red = np.array([230, 30, 30], dtype=np.uint8)
    out[top, left:right + 1] = out[bottom, left:right + 1] = red
    out[top:bottom + 1, left] = out[top:bottom + 1, right] = red
    return out


# ----------------------------------------------------------------------------- uploads

def decode_upload(data: bytes, size: int, channels: int) -> torch.Tensor:
    """Bytes of a PNG or JPEG -> uint8 (C, S, S) as :func:`data.load_image` prepares files, or a
    :class:`UserError` saying why they are not one."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            kind, (width, height) = img.format, img.size
        if kind not in ("PNG", "JPEG"):
            raise UserError(f"only PNG and JPEG images are accepted, this is {kind}")
        if width * height > MAX_PIXELS:
            raise UserError(f"the image is {width}x{height} pixels; at most {MAX_PIXELS // 1_000_000} megapixels")
        return load_image(io.BytesIO(data), size, channels)
    except UnidentifiedImageError:
        raise UserError("the upload is not a PNG or JPEG image") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"the image cannot be decoded (truncated or corrupt?): {e}") from None


async def read_upload(request: Request) -> bytes:
    """The request body, kept in memory up to ``MAX_UPLOAD`` bytes; HTTP 413 beyond it.

    A body over the limit is read to its end but not kept, so the client gets the 413 answer
    rather than a connection reset in the middle of sending.
    """
    data, size = bytearray(), 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= MAX_UPLOAD:
            data += chunk
    if size > MAX_UPLOAD:
        raise HTTPException(413, f"the upload is {size / 2**20:.1f} MB; the limit is {MAX_UPLOAD / 2**20:.0f} MB")
    if not data:
        raise UserError("the upload is empty; send the image file as the request body")
    return bytes(data)


# ----------------------------------------------------------------------------- the analyses

def analyse(subject: Subject, raw: torch.Tensor, layers: list[str] | None = None, target: int | None = None,
            lock=None) -> dict:
    """One image, uint8 (C, S, S), under ``subject``: the prediction, the ``STRONGEST`` feature maps of
    each of ``layers`` (default: the subject's stages) with their peaks projected by every rule (Sec. 2.1), and the occlusion maps of
    Fig. 7 for ``target`` (default: the predicted class) following the top layer's strongest map. The
    answer of ``/api/images/{index}`` and ``/api/upload``, images as PNG data URLs.

    ``lock``, when given, is held while the model runs: projections attach hooks to its modules.
    """
    model, layers = subject.model, list(layers or subject.stages)
    x = subject.prepare(raw[None])  # (1, C, H, W)
    shown = _rgb(subject.pictures(raw[None])[0])
    with lock or contextlib.nullcontext():
        output = subject.output  # the class scores (its first use traces the model)
        with torch.no_grad():
            acts = {name: a.cpu() for name, a in activations(model, x, layers + [output]).items()}
        probabilities = torch.softmax(acts[output][0], 0)
        projected = {name: _project_strongest(subject, name, x, acts[name][0]) for name in layers}
        target = int(probabilities.argmax()) if target is None else target
        occluded = occlude_image(model, x[0], target, layer=layers[-1], other_activations=subject.other_activations)
    top = probabilities.argsort(descending=True)[:5].tolist()
    return {
        "picture": _png(shown),
        "prediction": [{"class": c, "name": subject.classes[c], "probability": float(probabilities[c])} for c in top],
        "probabilities": probabilities.tolist(),
        "layers": [_features(model, name, acts[name][0], *projected[name], shown) for name in layers],
        "occlusion": _occlusion(subject.classes, occluded, shown),
    }


def _project_strongest(subject: Subject, layer: str, x: torch.Tensor, maps: torch.Tensor) -> tuple[list, dict]:
    """The ``STRONGEST`` maps of ``layer`` (C, h, w) by peak activation: their peak units
    ``(c, y, x)`` and, per rule, the peaks projected from input ``x`` (1, C, H, W)."""
    units = strongest_units(maps, STRONGEST)
    batch = x.expand(len(units), -1, -1, -1)
    deconvnet = Deconvnet(subject.model, subject.other_activations)
    try:  # every rule from one forward pass
        return units, {rule: p.values for rule, p in deconvnet.projections(batch, layer, units, RULES).items()}
    except UserError:  # e.g. an activation some rule has no definition for: each rule alone, the error in the page
        pass
    projections = {}
    for rule in RULES:
        try:
            projections[rule] = deconvnet.project(batch, layer, units, rule)
        except UserError as e:
            projections[rule] = str(e)
    return units, projections


def _features(model: nn.Module, layer: str, maps: torch.Tensor, units: list, projections: dict,
              shown: np.ndarray) -> dict:
    """One layer's strongest maps as PNGs: activation map, receptive field on the input, projections."""
    size = shown.shape[0]
    features = []
    for i, (c, y, x) in enumerate(units):
        box = unit_box(model, layer, y, x, size)
        activation = maps[c].clamp(min=0)
        features.append({
            "feature": c, "value": float(maps[c, y, x]), "unit": [c, y, x], "box": list(box),
            "activation": _png(_pixels(activation[None] / activation.max().clamp_min(1e-12))),
            "input": _png(_outlined(shown, box)),
            "projections": {rule: _png(_pixels(contrast_stretch(p[i:i + 1])[0])) if not isinstance(p, str)
                            else None for rule, p in projections.items()},
            "errors": {rule: p for rule, p in projections.items() if isinstance(p, str)},
        })
    return {"layer": layer, "maps": maps.shape[0], "features": features}


def _occlusion(classes: list[str], result, shown: np.ndarray) -> dict:
    """Fig. 7's panels as PNGs: (a) the square where p(target) is lowest, (b) activity, (c) projection
    with its receptive field, (d) p(target), (e) most probable label, with the numbers behind them."""
    covered = shown.copy()
    t, l = result.positions[int(result.probability.argmin())]
    covered[t:t + result.size, l:l + result.size] = 128
    labels = result.label.unique().tolist()  # coloured as in the figure (draw_occlusion)
    palette = (label_colors(len(labels)) * 255).round().astype(np.uint8)
    codes = palette[result.label.clone().apply_(labels.index).numpy()]
    projection = None if result.projection is None else _rgb(contrast_stretch(result.projection[None])[0])
    return {
        "layer": result.layer, "feature": result.feature, "target": result.target,
        "target_name": classes[result.target], "size": result.size, "stride": result.stride,
        "grid": list(result.activity.shape),
        "unoccluded": {"activity": result.clean_activity, "probability": result.clean_probability,
                       "label": classes[result.clean_label]},
        "covered": _png(covered),
        "activity": _png(heatmap_pixels(result.activity, float(result.activity.min()), float(result.activity.max()))),
        "projection": None if projection is None else _png(_outlined(projection, result.receptive_field)),
        "projection_missing": result.projection_missing,
        "probability": _png(heatmap_pixels(result.probability, 0.0, 1.0)),
        "label": _png(codes),
        "legend": [{"class": k, "name": classes[k], "color": "#%02x%02x%02x" % tuple(palette[i])}
                   for i, k in enumerate(labels)],
        "activity_range": [float(result.activity.min()), float(result.activity.max())],
    }


def top_activations(subject: Subject, source: Source, layer: str, table: TopK, feature: int) -> dict:
    """Fig. 2 for map ``feature`` of ``layer``: its top-``K`` activations over ``source`` (``table``)
    projected to pixels, beside the input patches; the answer of ``/api/topk/{layer}/{feature}``."""
    result = gallery(subject.model, source, subject.preprocess, layer, table, [feature], subject.other_activations)
    entries = []
    for j in range(K):
        image = int(table.images[feature, j])
        if image < 0:
            continue
        entries.append({
            "image": image, "label": source.classes[int(source.labels[image])],
            "value": float(table.values[feature, j]),
            "unit": [feature, int(table.ys[feature, j]), int(table.xs[feature, j])],
            "box": table.boxes[feature, j].tolist(),
            "projection": _png(_pixels(tile_pixels(result.projections[0, j], stretch=True))),
            "patch": _png(_pixels(tile_pixels(result.patches[0, j], stretch=False)))})
    return {"layer": layer, "feature": feature, "entries": entries}


# ----------------------------------------------------------------------------- the top-k pass

class _Counted(Source):
    """A source that counts the images read from it: the progress of the top-k pass."""

    def __init__(self, source: Source):
        self.source, self.read = source, 0
        self.name, self.classes, self.labels = source.name, source.classes, source.labels
        self.channels, self.size = source.channels, source.size

    def get(self, indices) -> torch.Tensor:
        images = self.source.get(indices)
        self.read += len(images)
        return images


class TopKJob:
    """The top-``K`` table of every layer over the first ``n`` images of ``source``, computed once in a
    background thread on a copy of the model, through the runner's cache: the tables ``deconvnet topk``
    wrote for the same model, data and layers (all images, its default, or the same ``n``) are read."""

    def __init__(self, model: nn.Module, source: Source, preprocess, layers: list[str], n: int):
        self.source, self.total = _Counted(source), n
        self.tables: dict[str, TopK] | None = None
        self.error: str | None = None
        self._args = (copy.deepcopy(model), preprocess, layers)
        self.thread = threading.Thread(target=self._run, name="deconvnet-topk", daemon=True)

    @property
    def state(self) -> dict:
        state = "done" if self.tables is not None else "error" if self.error else "running"
        done = self.total if state == "done" else min(self.source.read, self.total)
        return {"state": state, "done": done, "total": self.total, "error": self.error}

    def _run(self) -> None:
        model, preprocess, layers = self._args
        try:
            tables = load_topk(model, self.source, preprocess, layers, K)  # `deconvnet topk`'s default: all images
            if tables is not None:
                self.total = len(self.source)
            else:
                tables = cached_topk(model, self.source, preprocess, layers, K, range(self.total))[0]
            self.tables = tables
        except Exception as e:  # noqa: BLE001 - shown to the user in the page
            self.error = f"{type(e).__name__}: {e}"


# ----------------------------------------------------------------------------- the viewer

class Viewer:
    """What the app serves: the model under study, a data set, the top-k job, the cache of Fig. 2
    galleries, and the routing of each request to its analysis (:func:`analyse`, :func:`top_activations`).

    Every use of ``model`` holds ``lock``: projections attach hooks to its modules, so two requests
    must not run it at once.
    """

    def __init__(self, subject: Subject, data: str | None, limit: int,
                 layers: list[str] | None = None, atlas: str | Path | None = None):
        if limit < 1:
            raise UserError(f"--limit must be at least 1, got {limit}")
        self.atlas = Path(atlas) if atlas else None  # a `deconvnet atlas` site, served under /atlas/
        if self.atlas and not (self.atlas / "index.html").is_file():
            raise UserError(f"--atlas {atlas}: no atlas there (index.html missing); make one with `deconvnet atlas`")
        self.subject, self.model = subject, subject.model
        self.data = data or (subject.info.accuracy.get("data") if subject.info else None)
        if not self.data:
            raise UserError("give --data SPEC (folder:PATH, ...): the data set whose top activations are shown")
        pre = self.preprocess = subject.preprocess
        self.source = subject.open_data(self.data)
        self.layers = list(layers or subject.stages)
        if not self.layers:
            raise UserError("the model has no spatial layers to show; name them with --layers")
        shapes = {c.name: c.shape for c in subject.calls()}
        unknown = [name for name in self.layers if name not in shapes]
        if unknown:
            raise UserError(f"unknown layer(s) {unknown}; `deconvnet inspect` lists this model's layers")
        flat = [name for name in self.layers if len(shapes[name]) != 3]
        if flat:
            raise UserError(f"layer(s) {flat} have no feature maps; the viewer shows spatial layers")
        self.maps = {name: shapes[name][0] for name in self.layers}
        self.to_model = subject.class_index(self.source.classes)  # data label -> model class (None: not one)
        self.lock = threading.Lock()
        self._galleries: dict[tuple[str, int], dict] = {}
        self.topk = TopKJob(self.model, self.source, pre, self.layers, min(limit, len(self.source)))
        self.topk.thread.start()

    def describe(self) -> dict:
        """What the page needs to draw its controls."""
        subject = self.subject
        return {
            "checkpoint": Path(subject.spec if subject.info else subject.weights or "random weights").name,
            "model": subject.name,
            "classes": subject.classes,
            "data": self.data, "data_images": len(self.source), "topk_images": self.topk.total, "k": K,
            "layers": [{"name": name, "maps": self.maps[name]} for name in self.layers],
            "rules": list(RULES), "max_upload": MAX_UPLOAD,
            "atlas": "/atlas/" if self.atlas else None,  # each map at /atlas/LAYER.html#MAP
        }

    def thumbnails(self, offset: int, count: int) -> dict:
        """Data set images ``offset .. offset + count`` with their labels, for the picker."""
        offset, count = max(0, offset), max(1, min(count, MAX_THUMBNAILS))
        indices = list(range(offset, min(offset + count, len(self.source))))
        raw = self.source.get(indices) if indices else None
        return {"total": len(self.source), "offset": offset, "images": [
            {"index": i, "label": self.source.classes[int(self.source.labels[i])], "png": _png(_pixels(raw[j] / 255))}
            for j, i in enumerate(indices)]}

    def feature(self, layer: str, feature: int) -> dict:
        """Fig. 2 for one feature map: its top-``K`` activations projected, beside the input patches."""
        tables = self.topk.tables
        if tables is None:
            raise HTTPException(409, "the top-k pass is still running" if not self.topk.error else self.topk.error)
        if layer not in tables:
            raise UserError(f"unknown layer {layer!r}; use one of {', '.join(self.layers)}")
        table = tables[layer]
        if not 0 <= feature < table.values.shape[0]:
            raise UserError(f"{layer} has feature maps 0..{table.values.shape[0] - 1}, not {feature}")
        with self.lock:  # also keeps two requests for one map from computing it twice
            if (layer, feature) not in self._galleries:
                self._galleries[layer, feature] = top_activations(self.subject, self.source, layer, table, feature)
            return self._galleries[layer, feature]

    def dataset_image(self, index: int) -> dict:
        """:func:`analyse` of data set image ``index``; occlusion follows its true class when the
        data set's classes are the model's."""
        if not 0 <= index < len(self.source):
            raise UserError(f"image {index} is outside {self.data}'s {len(self.source)} images")
        label = int(self.source.labels[index])
        result = analyse(self.subject, self.source.get([index])[0], self.layers, self.to_model[label], self.lock)
        return {"image": {"index": index, "label": self.source.classes[label]}, **result}

    def randomisation(self, index: int, layer: str) -> dict:
        """The sanity checks of data set image ``index``'s strongest unit of ``layer``
        (:func:`deconvnet.sanity.sanity`): its randomisation strip (rows: rules; columns: the trained
        projection, then each layer re-initialised from ``layer`` down) and each rule's rank correlation
        with the trained projection once every layer below is re-initialised."""
        from .sanity import draw_sanity, sanity, sanity_to_json

        if not 0 <= index < len(self.source):
            raise UserError(f"image {index} is outside {self.data}'s {len(self.source)} images")
        if layer not in self.layers:
            raise UserError(f"unknown layer {layer!r}; use one of {', '.join(self.layers)}")
        with self.lock:
            result = sanity(self.subject, self.source.get([index]), layers=[layer], steps=2)
        buffer = io.BytesIO()
        draw_sanity(result, layer=layer).savefig(buffer, format="png", dpi=80)
        spearman = sanity_to_json(result)["per_layer"][layer]["cascade"]["spearman"]
        return {"layer": layer, "image": index,
                "strip": "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode(),
                "all_randomised": {rule: steps[-1][0][0] for rule, steps in spearman.items()}}

    def upload(self, data: bytes) -> dict:
        """:func:`analyse` of an uploaded PNG/JPEG, prepared as the model's data are."""
        raw = decode_upload(data, self.preprocess.stored_size, self.preprocess.channels)
        return {"image": {"upload": True}, **analyse(self.subject, raw, self.layers, None, self.lock)}


# ----------------------------------------------------------------------------- the app

def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def create_app(viewer: Viewer) -> Starlette:
    """The Starlette app over ``viewer``: the page, its static files and the JSON API.

    ``GET /api/info``, ``GET /api/topk`` (progress), ``GET /api/topk/{layer}/{feature}`` (Fig. 2),
    ``GET /api/images?offset=&count=`` (thumbnails), ``GET /api/images/{index}`` and
    ``POST /api/upload`` (the image file as the body; one image's analysis),
    ``GET /api/sanity/{index}/{layer}`` (the randomisation strip of the image's strongest unit). Errors are
    ``{"error": message}`` with status 400 (bad input), 409 (top-k not ready) or 413 (too large).
    """
    def threaded(method):  # the model work runs in the thread pool, off the event loop
        async def endpoint(request: Request) -> JSONResponse:
            return JSONResponse(await run_in_threadpool(method, **request.path_params))
        return endpoint

    async def index(_request: Request) -> FileResponse:
        return FileResponse(STATIC / "index.html")

    async def images(request: Request) -> JSONResponse:
        try:
            offset, count = int(request.query_params.get("offset", 0)), int(request.query_params.get("count", 24))
        except ValueError:
            raise UserError("offset and count must be integers") from None
        return JSONResponse(await run_in_threadpool(viewer.thumbnails, offset, count))

    async def upload(request: Request) -> JSONResponse:
        data = await read_upload(request)
        return JSONResponse(await run_in_threadpool(viewer.upload, data))

    async def status(_request: Request) -> JSONResponse:
        return JSONResponse(viewer.topk.state)

    async def user_error(_request: Request, e: UserError) -> JSONResponse:
        return _error(400, str(e))

    async def http_error(_request: Request, e: HTTPException) -> JSONResponse:
        return _error(e.status_code, str(e.detail))

    async def server_error(_request: Request, e: Exception) -> JSONResponse:
        return _error(500, f"{type(e).__name__}: {e}")

    routes = [
        Route("/", index),
        Route("/api/info", threaded(viewer.describe)),
        Route("/api/topk", status),
        Route("/api/topk/{layer}/{feature:int}", threaded(viewer.feature)),
        Route("/api/images", images),
        Route("/api/images/{index:int}", threaded(viewer.dataset_image)),
        Route("/api/sanity/{index:int}/{layer}", threaded(viewer.randomisation)),
        Route("/api/upload", upload, methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC)),
    ]
    if viewer.atlas:
        routes.append(Mount("/atlas", StaticFiles(directory=viewer.atlas, html=True)))
    return Starlette(routes=routes, exception_handlers={UserError: user_error, HTTPException: http_error,
                                                        Exception: server_error})


def serve(subject: Subject, data: str | None = None, host: str = "127.0.0.1", port: int = 8000,
          limit: int = 5000, layers: list[str] | None = None, atlas: str | Path | None = None) -> None:
    """Run the viewer until interrupted; the top-k pass over ``limit`` images starts at once. With
    ``atlas`` (a ``deconvnet atlas`` site) each feature map links to its page there."""
    import uvicorn

    viewer = Viewer(subject, data, limit, layers, atlas)
    print(f"deconvnet serve: http://{host}:{port}/  ({subject.name} on {viewer.data}; "
          f"top-k over {viewer.topk.total} images runs in the background)", flush=True)
    uvicorn.run(create_app(viewer), host=host, port=port, log_level="warning")
