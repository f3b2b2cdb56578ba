"""What each ``deconvnet`` command does, as a function of plain keyword arguments.

The options of every command are declared here once, as these functions' parameters (name, type,
default) and the ``Args:`` of their docstrings (:mod:`deconvnet.options`): the CLI's parser is built
from them, ``reproduce`` and ``report`` call them directly as cached steps, and
:func:`command_line` writes the equivalent command for their provenance. Every analysis command
writes its figure(s) and one JSON (its arguments, the model under study, the findings and the
numbers) into ``out`` and prints a one-line JSON summary. ``**model`` stands for the options naming
the model under study (:func:`deconvnet.options.model_options`: ``model_spec`` or ``checkpoint``,
``weights``, ...); ``train``'s ``**config`` for the documented fields of :class:`TrainConfig`.
"""
from __future__ import annotations

import json
import shlex
import sys
import types
from pathlib import Path
from typing import Annotated

from .deconvnet import RULES
from .errors import UserError
from .findings import brief, interval_text, tally
from .options import MODEL_OPTIONS, Files, Flag, Json, Out, Positive, named_box, options_of, words
from .runner import atomic_write_json
from .train import TrainConfig


def command_line(command: str, options: dict) -> str:
    """The ``deconvnet`` command line that makes the same call as ``command(**options)``."""
    by_name = {o.name: o for o in options_of(globals()[command])}
    line = ["deconvnet", command.replace("_", "-")]
    for name, value in options.items():
        line += [shlex.quote(w) for w in words(by_name[name], value)]  # a class subset's brackets are a shell pattern
    return " ".join(line)


def subject_of(model: dict):
    """The model under study named by the model options (``model_spec`` or ``checkpoint``, ...)."""
    from .subject import load_subject

    unknown = set(model) - set(MODEL_OPTIONS)
    if unknown:
        raise TypeError(f"unknown option(s) {sorted(unknown)}")
    spec, checkpoint = model.get("model_spec"), model.get("checkpoint")
    if spec and checkpoint:
        raise UserError("give --model SPEC or --checkpoint CKPT, not both")
    if not spec and not checkpoint:
        raise UserError("give the model: --model SPEC (a checkpoint, torchvision:NAME or module:CALLABLE)")
    return load_subject(spec or checkpoint, weights=model.get("weights"), classes=model.get("classes"),
                        preprocess=model.get("preprocess"), input_size=model.get("input_size"),
                        mean=model.get("mean"), std=model.get("std"),
                        other_activations=model.get("other_activations") or "error",
                        device=model.get("device") or "auto")


def absolute_model_options(model: dict) -> dict:
    """The model options with their file paths made absolute (for steps run from another directory)."""
    def absolute(value: str) -> str:
        if ":" in value and not Path(value).exists():  # torchvision:NAME, module:CALLABLE, file.py:CALLABLE
            where, _, attr = value.rpartition(":")
            return f"{Path(where).resolve()}:{attr}" if where.endswith(".py") else value
        return str(Path(value).resolve())

    return {name: absolute(value) if name in ("model_spec", "checkpoint", "weights", "classes") and value else value
            for name, value in model.items() if value is not None}


def _class_index(text: str, classes: list[str]) -> int:
    """A class given by name or number."""
    if text in classes:
        return classes.index(text)
    if text.isdigit() and int(text) < len(classes):
        return int(text)
    raise UserError(f"unknown class {text!r}; this checkpoint has: {', '.join(classes)}")


def data_labels(subject, source, spec: str) -> list[int | None]:
    """For each class of ``source``, the model's class index (by name), None where the model lacks it.
    Our checkpoints must be given data with their own classes."""
    if subject.info is not None and list(source.classes) != list(subject.classes):
        raise UserError(f"{spec} has classes {source.classes[:5]}... but the checkpoint was trained on "
                        f"{subject.classes[:5]}...")
    return subject.class_index(source.classes)


def select_images(subject, image: list[str] | None, data: str | None, index: list[int] | None, count: int = 1,
                  label: int | None = None):
    """The images named by ``image`` (files) or ``data`` + ``index``, at the model's stored size:
    ``(raw uint8 (N, C, S, S), labels, names)``. Labels are the model's class indices, None for image
    files and for data classes the model does not have. Without ``index``, the first ``count`` images
    of ``data`` (of model class ``label`` when given)."""
    if image and data:
        raise UserError("give either --image or --data, not both")
    if image:
        if index is not None:
            raise UserError("--index selects images in --data; it does not apply to --image")
        raw = subject.load_images(image)
        return raw, [None] * len(raw), [Path(path).stem for path in image]
    if not data:
        raise UserError("give --image PATH or --data SPEC (with --index I)")
    source = subject.open_data(data)
    to_model = data_labels(subject, source, data)
    if index is not None:
        indices = index
    else:
        pool = range(len(source)) if label is None else [i for i, y in enumerate(source.labels.tolist())
                                                            if to_model[y] == label]
        indices = list(pool[:count])
    bad = [i for i in indices if not 0 <= i < len(source)]
    if bad or not indices:
        raise UserError(f"--index {bad or indices} is outside {data}'s {len(source)} images")
    return source.get(indices), [to_model[y] for y in source.labels[indices].tolist()], [str(i) for i in indices]


def _write_result(out: Path, name: str, options: dict, body: dict, text: str | None = None, json_output: bool = False,
                  **summary) -> None:
    """Write ``out/name`` (the call's options + ``body``) and say so: one line for a person (where the
    file is, the verdicts, the first finding) or, with ``json_output``, ``text`` (a table) and the
    summary as one JSON line for scripts."""
    atomic_write_json(out / name, {"args": options, **body})
    say(out / name, body["findings"], json_output, text=text, **summary)


def say(path: Path, findings: list[dict], json_output: bool, text: str | None = None, **summary) -> None:
    """A command's console output: one line, ``PATH: N findings: ...; first: CLAIM ESTIMATE [INTERVAL]
    VERDICT``; or, for scripts, ``text`` and one JSON line."""
    if json_output:
        if text is not None:
            print(text)
        print(json.dumps({"out": str(path.parent), **summary, "findings": brief(findings)}))
        return
    line = f"{path}: {tally(findings)}"
    if findings:
        first = findings[0]
        line += f"; first: {first['claim']}: {interval_text(first, 3).split(', n = ')[0]} ({first['verdict']})"
    print(line)


def _options(local: dict) -> dict:
    """A command's call as JSON-able options: its ``locals()`` after its imports (the functions and
    modules imported are left out), the model options flattened."""
    local = {k: v for k, v in local.items()
             if not callable(v) and not isinstance(v, types.ModuleType) and k != "json_output"}
    model = local.get("model")
    if not isinstance(model, dict):  # train and ablation: --model names an architecture
        return dict(local)
    return {**{k: v for k, v in local.items() if k != "model"}, **model}


# ----------------------------------------------------------------------------- training and evaluation

def train(out: Out, resume: bool = False, json_output: Json = False, **config) -> dict:
    """Train a model with the paper's recipe (Sec. 3) into a run directory.

    Args:
        out: run directory
        resume: continue an interrupted run in --out
    """
    from .train import train as run_training

    final = run_training(TrainConfig(**config), out, resume=resume)
    if json_output:
        print(json.dumps({"run": str(out), **final}))
    elif final:
        ten = f", {100 * final['val_top1_10crop']:.2f}% with 10 crops" if "val_top1_10crop" in final else ""
        print(f"{Path(out) / 'final.pt'}: epoch {final.get('epoch')}, val top-1 {100 * final['val_top1']:.2f}%{ten}")
    return final


train.CONFIG = TrainConfig  # train's other options: the documented fields of TrainConfig


def evaluate(data: str, limit: Positive | None = None, ten_crop: bool = False, workers: int | None = None,
             batch_size: Positive = 500, json_output: Json = False, **model) -> dict:
    """Top-1/top-5 accuracy of a model on labelled data, as JSON.

    Args:
        data: labelled data spec, e.g. fashion-mnist:test or folder:PATH
        limit: use only the first N images
        ten_crop: average the softmax over the 10 crops (Sec. 3)
    """
    import torch

    from .train import evaluate as run_evaluation

    subject = subject_of(model)
    source = subject.open_data(data)
    to_model = data_labels(subject, source, data)
    unknown = [name for name, i in zip(source.classes, to_model) if i is None]
    if unknown:
        raise UserError(f"{len(unknown)} of {data}'s {len(source.classes)} classes are not the model's "
                        f"(e.g. {unknown[0]!r}); give --classes FILE naming its outputs (folder names or "
                        "ImageNet's index with WordNet ids)")
    source.labels = torch.tensor(to_model)[source.labels]  # the data's labels as the model's class indices
    source.classes = subject.classes
    indices = None if limit is None else list(range(min(limit, len(source))))
    result = run_evaluation(subject.model, source, subject.preprocess, indices, batch_size=batch_size, ten_crop=ten_crop,
                            workers=workers)
    summary = {"top1": result["top1"], "top5": result["top5"], "n": result["n"]}
    print(json.dumps(summary) if json_output else
          f"top-1 {100 * summary['top1']:.2f}%, top-5 {100 * summary['top5']:.2f}% over {summary['n']} images of {data}")
    return summary


# ----------------------------------------------------------------------------- per-image analyses

def _image_count(image: list[str] | None, index: list[int] | None, count: int | None, default: int) -> int:
    """How many of the first images of --data a per-image command takes: ``count`` (``--count N``), which
    goes without --index and --image, or ``default``."""
    if count is None:
        return default
    if image or index is not None:
        raise UserError("--count takes the first N images of --data; it goes without --index and --image")
    if count < 1:
        raise UserError(f"--count must be a positive number of images, got {count}")
    return count


def occlusion(out: Out, image: Files = None, data: str | None = None, index: list[int] | None = None,
              count: Positive | None = None, draw: Annotated[int | None, Flag(metavar="K")] = None,
              target: str | None = None, size: int | None = None, stride: int | None = None,
              layer: str | None = None, json_output: Json = False, **model) -> list[dict]:
    """Occlusion sensitivity of one or more images (Fig. 7).

    Writes occlusion-NAME.png for the first ``draw`` images and occlusion.json with every image's maps
    and the findings over all of them.

    Args:
        out: output directory (PNG + JSON)
        image: PNG/JPEG image file(s)
        data: data spec to take images from, e.g. fashion-mnist:test or folder:PATH
        index: comma-separated image indices in --data (default: the first)
        count: take the first N images of --data (instead of --index); the findings are over all
        draw: draw the panels (occlusion-NAME.png) of the first K images only (default: all)
        target: class to map p() of (name or number; default: the label)
        size: square side in pixels (default 35/224 of the image)
        stride: square step in pixels (default 14/224 of the image)
        layer: layer whose strongest feature map is followed (b, c); default the model's top stage
    """
    from ._analysis import foreground
    from .findings import to_json
    from .occlusion import cover_statistics, draw_occlusion, occlusion as measure, occlusion_findings, occlusion_to_json

    options = _options(locals())
    if draw is not None and draw < 0:
        raise UserError(f"--draw must be 0 or more images, got {draw}")
    count = _image_count(image, index, count, 1)
    subject = subject_of(model)
    raw, labels, names = select_images(subject, image, data, index, count=count)
    followed = [_class_index(target, subject.classes) if target is not None else label for label in labels]
    results = measure(subject, raw, followed, size=size, stride=stride, layer=layer)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for i, (result, name) in enumerate(zip(results, names)):
        if draw is None or i < draw:
            draw_occlusion(result, out / f"occlusion-{name}.png")  # the result carries its picture and classes
    # object masks by threshold hold for Fashion-MNIST's black backgrounds, not for photos
    objects = [foreground(r.picture[None])[0] for r in results] if subject.info is not None else []
    findings = to_json(occlusion_findings(results, objects))
    covers = [cover_statistics(r, m) for r, m in zip(results, objects)] or [None] * len(results)
    _write_result(out, "occlusion.json", options, json_output=json_output, body={
        "model": subject.describe(), "findings": findings,
        "images": [{"name": n, "true_label": l, **occlusion_to_json(r), "cover": c}
                   for n, l, r, c in zip(names, labels, results, covers)]})
    return findings


def invariance(out: Out, image: Files = None, data: str | None = None, index: list[int] | None = None,
               count: Positive | None = None, layers: list[str] | None = None,
               translations: list[float] | None = None, scales: list[float] | None = None,
               rotations: list[float] | None = None, json_output: Json = False, **model) -> list[dict]:
    """Feature and output changes under translation, scale and rotation (Fig. 5).

    Args:
        out: output directory (invariance.png + invariance.json)
        image: PNG/JPEG image file(s)
        data: data spec to take images from, e.g. fashion-mnist:test or folder:PATH
        index: comma-separated image indices in --data (default: the first 5)
        count: take the first N images of --data (default 5, instead of --index); the findings are over all
        layers: low,high layer (default: layers 1 and 7)
        translations: vertical shifts in pixels, e.g. --translations=-4,0,4
        scales: scale factors
        rotations: rotations in degrees
    """
    from .findings import to_json
    from .invariance import default_amounts, draw_invariance, invariance as measure, invariance_findings, invariance_to_json

    options = _options(locals())
    count = _image_count(image, index, count, 5)
    subject = subject_of(model)
    raw, labels, names = select_images(subject, image, data, index, count=count)
    amounts = default_amounts(subject.preprocess.input_size)
    for kind, values in (("translation", translations), ("scale", scales), ("rotation", rotations)):
        if values is not None:
            amounts[kind] = values
    result = measure(subject, raw, labels, layers=layers, amounts=amounts)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    draw_invariance(result, out / "invariance.png", subject.classes)
    findings = to_json(invariance_findings(result))
    _write_result(out, "invariance.json", options, json_output=json_output, body={"model": subject.describe(), "images": names, "findings": findings,
                                                    **invariance_to_json(result, subject.classes)})
    return findings


def _parts(parts: str | None, part: list | None, class_name: str | None, n: int, frames: list) -> dict:
    """Part boxes per image from a parts file, ``NAME=T,L,B,R`` boxes or the class's preset."""
    from .correspondence import FASHION_PARTS, relative_box

    if parts and part:
        raise UserError("give --parts FILE or --part NAME=T,L,B,R, not both")
    if parts:
        try:
            spec = json.loads(Path(parts).read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read parts from {parts}: {e}") from None
    elif part:
        spec = dict(part)
    elif class_name in FASHION_PARTS:
        return {name: [relative_box(f, rel) for f in frames] for name, rel in FASHION_PARTS[class_name].items()}
    else:
        raise UserError(f"no preset parts for {class_name!r} (presets: {', '.join(FASHION_PARTS)}); "
                        "give --parts FILE or --part NAME=T,L,B,R")
    boxes_of = {}
    for name, boxes in spec.items():  # one box for every image, or one per image
        boxes = [boxes] * n if boxes and isinstance(boxes[0], int) else boxes
        if len(boxes) != n or any(len(b) != 4 for b in boxes):
            raise UserError(f"part {name!r}: give one box [top, left, bottom, right] or one per image ({n})")
        boxes_of[name] = [tuple(int(v) for v in b) for b in boxes]
    return boxes_of


def correspondence(out: Out, image: Files = None, data: str | None = None, index: list[int] | None = None,
                   class_name: Annotated[str | None, Flag(name="--class")] = None, count: Positive = 5,
                   parts: str | None = None, part: Annotated[list | None, Flag(repeat=named_box, metavar="NAME=T,L,B,R")] = None,
                   layers: list[str] | None = None, repeats: Positive = 5, seed: int = 0, json_output: Json = False, **model) -> list[dict]:
    """Part correspondence: sign changes when masking parts (Table 1).

    Args:
        out: output directory (correspondence.png + correspondence.json)
        image: PNG/JPEG image file(s)
        data: data spec to take images from, e.g. fashion-mnist:test or folder:PATH
        index: comma-separated image indices in --data (default: the first 5)
        class_name: take the first --count images of this class from --data (e.g. Sneaker)
        count: number of images (default 5)
        parts: JSON file: {"part": [top, left, bottom, right] or one per image}
        part: a part's box in every image (repeatable)
        layers: layers (default: layers 5 and 7)
        repeats: random draws per part size for the control
        seed: seed of the random boxes
    """
    from ._analysis import foreground
    from .correspondence import (correspondence as measure, correspondence_findings, correspondence_to_json,
                                 draw_correspondence, object_box)
    from .findings import to_json

    options = _options(locals())
    subject = subject_of(model)
    label = _class_index(class_name, subject.classes) if class_name else None
    raw, labels, names = select_images(subject, image, data, index, count=count, label=label)
    pictures = subject.pictures(raw)
    if subject.info is not None:  # objects on Fashion-MNIST's black background
        frames = [object_box(m) for m in foreground(pictures)]
    else:  # photos: the random control boxes go anywhere in the image
        frames = [(0, 0, pictures.shape[2] - 1, pictures.shape[3] - 1)] * len(raw)
    boxes = _parts(parts, part, class_name, len(raw), frames)
    result = measure(subject, raw, boxes, objects=frames, layers=layers, repeats=repeats, seed=seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    draw_correspondence(result, pictures, out / "correspondence.png")
    findings = to_json(correspondence_findings(result))
    body = correspondence_to_json(result)
    _write_result(out, "correspondence.json", options, json_output=json_output, body={"model": subject.describe(), "images": names, "labels": labels,
                                                        "objects": [list(f) for f in frames], "findings": findings,
                                                        **body}, table=body["table"])
    return findings


def project(out: Annotated[str, Flag(metavar="PNG")], layer: str, image: Files = None, data: str | None = None,
            index: list[int] | None = None, unit: list[int] | None = None,
            rule: Annotated[str, Flag(choices=RULES)] = "deconvnet", json_output: Json = False, **model) -> dict:
    """Project one activation to pixels with the deconvnet (Sec. 2.1).

    Args:
        out: output PNG (a JSON with the value and box goes beside it)
        layer: layer name, e.g. conv5 or layer3.1.relu_1 (see inspect)
        image: a PNG/JPEG image
        data: data spec to take the image from, with --index
        index: image index in --data (default 0)
        unit: channel,y,x in the layer's output (default: the layer's strongest activation)
        rule: deconvnet (Sec. 2.1), guided (guided backprop) or gradient
    """
    from ._analysis import strongest_units
    from .deconvnet import Deconvnet, draw_projection
    from .geometry import unit_box
    from .probe import activations

    options = _options(locals())
    subject = subject_of(model)
    net = subject.model
    raw, _, names = select_images(subject, image, data, index)
    if len(raw) != 1:
        raise UserError("project takes one image: one --image PATH or one --index I")
    if unit is not None and len(unit) != 3:
        raise UserError(f"--unit is channel,y,x; got {unit}")
    x = subject.prepare(raw)
    a = activations(net, x, layer)[layer][0].detach().cpu()
    if a.dim() != 3:
        raise UserError(f"layer {layer!r} has no feature maps (output shape {tuple(a.shape)})")
    chosen = tuple(unit) if unit is not None else strongest_units(a)[0]
    projection = Deconvnet(net, subject.other_activations).project(x, layer, [chosen], rule=rule)[0]
    value = float(a[chosen])
    box = unit_box(net, layer, chosen[1], chosen[2], subject.preprocess.input_size)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    draw_projection(subject.pictures(raw)[0], projection, box, out,
                    f"image {names[0]}: {layer} unit {chosen} = {value:.3g}, rule {rule}")
    record = {"out": str(out), "layer": layer, "unit": list(chosen), "value": value, "box": list(box)}
    atomic_write_json(Path(out).with_suffix(".json"), {"args": options, "model": subject.describe(), **record})
    print(json.dumps(record) if json_output else f"{out}: {layer} unit {tuple(chosen)} = {value:.3g} ({rule})")
    return record


def sanity(out: Out, image: Files = None, data: str | None = None, index: list[int] | None = None,
           count: Positive | None = None, layers: list[str] | None = None,
           rules: Annotated[list[str] | None, Flag(metavar="RULES")] = None, steps: Positive = 10, seed: int = 0,
           json_output: Json = False, **model) -> list[dict]:
    """Can the projections be trusted? Randomisation, specificity and deletion tests of each rule.

    Cascading randomisation (Adebayo et al. 2018), specificity (Nie et al. 2018) and deletion/insertion
    of the pixels a projection ranks first, for the strongest units of each layer on each image.
    Writes sanity.png (the randomisation strip), sanity-deletion.png and sanity.json.

    Args:
        out: output directory (sanity.png, sanity-deletion.png, sanity.json)
        image: PNG/JPEG image file(s)
        data: data spec to take images from, e.g. fashion-mnist:test or folder:PATH
        index: comma-separated image indices in --data (default: the first 10)
        count: take the first N images of --data (default 10, instead of --index)
        layers: layers whose units are tested (default: a middle and the top stage)
        rules: comma-separated rules among deconvnet, guided, gradient (default: all three)
        steps: deletion and insertion steps
        seed: seed of the re-initialisation and the random pixel orders
    """
    from .deconvnet import RULES as ALL_RULES
    from .findings import to_json
    from .sanity import draw_deletion, draw_sanity, sanity as measure, sanity_findings, sanity_to_json

    options = _options(locals())
    count = _image_count(image, index, count, 10)
    unknown = sorted(set(rules or ()) - set(ALL_RULES))
    if unknown:
        raise UserError(f"unknown rule(s) {unknown}; use {', '.join(ALL_RULES)}")
    subject = subject_of(model)
    raw, _, names = select_images(subject, image, data, index, count=count)
    result = measure(subject, raw, layers=layers, rules=tuple(rules or ALL_RULES), steps=steps, seed=seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    draw_sanity(result, out / "sanity.png")
    draw_deletion(result, out / "sanity-deletion.png")
    findings = to_json(sanity_findings(result))
    _write_result(out, "sanity.json", options, json_output=json_output,
                  body={"model": subject.describe(), "images": names, "findings": findings, **sanity_to_json(result)})
    return findings


# ----------------------------------------------------------------------------- passes over a data set

def topk(out: Out, data: str, layers: list[str] | None = None, k: Positive = 9, limit: Positive | None = None,
         maps: Positive = 9, seed: int = 0, workers: int | None = None, batch_size: Positive = 256,
         json_output: Json = False, **model) -> list[dict]:
    """Top-k activations per feature map over a data set and the Fig. 2 gallery.

    Writes gallery-LAYER.png and topk.json. The tables go to the shared cache, where ``serve`` and
    ``atlas`` find them.

    Args:
        out: output directory (gallery-LAYER.png + topk.json)
        data: data spec, e.g. fashion-mnist:test or folder:PATH
        layers: comma-separated layers (default: conv1..conv5, or the model's stages; see inspect)
        k: activations kept per feature map (default 9, Fig. 2)
        limit: use only the first N images
        maps: feature maps drawn per layer, chosen at random
        seed: seed of the random choice of maps
    """
    from .findings import to_json
    from .runner import distributed, world
    from .topk import cached_topk, choose_maps, draw_gallery, gallery, topk_findings, topk_to_json

    options = _options(locals())
    subject = subject_of(model)
    net, pre = subject.model, subject.preprocess
    layers = subject.layers(layers)
    source = subject.open_data(data)
    n = len(source) if limit is None else min(limit, len(source))
    with distributed():
        tables = cached_topk(net, source, pre, layers, k=k, indices=list(range(n)), batch_size=batch_size,
                             workers=workers)[0]
        rank = world()[0]
    if rank != 0:  # every process holds the merged tables; one draws them
        return []
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    chosen = {}
    for name, table in tables.items():
        chosen[name] = choose_maps(table, maps, seed)
        draw_gallery(gallery(net, source, pre, name, table, chosen[name], subject.other_activations),
                     out / f"gallery-{name}.png",
                     f"{name}: top {k} of {n} images of {data}, projected (left) and input patches (right)")
    findings = topk_findings(tables, source.labels)
    atomic_write_json(out / "topk.json", {"args": options, "model": subject.describe(), "images": n, "k": k,
                                          "findings": to_json(findings), "layers": topk_to_json(tables, chosen)})
    say(out / "topk.json", to_json(findings), json_output, images=n, gallery_maps=chosen,
        class_purity=findings[0].ours["class_purity"])
    return to_json(findings)


def atlas(out: Out, data: str, layers: list[str] | None = None, k: Positive = 9, limit: Positive | None = None,
          workers: int | None = None, batch_size: Positive = 256, json_output: Json = False, **model) -> dict:
    """Fig. 2 for every feature map: a static site, LAYER.html#MAP per map (resumable).

    Args:
        out: output directory (index.html, LAYER.html, LAYER/MAP.png); a rerun resumes or reuses it
        data: data spec, e.g. fashion-mnist:test or folder:PATH
        layers: comma-separated layers (default: conv1..conv5, or the model's stages; see inspect)
        k: activations kept per feature map (default 9, Fig. 2)
        limit: use only the first N images
    """
    from .atlas import build_atlas
    from .runner import distributed, world

    subject = subject_of(model)
    layers = subject.layers(layers)
    source = subject.open_data(data)
    n = len(source) if limit is None else min(limit, len(source))
    about = {"model": subject.spec, "architecture": subject.name, "data": f"{data}, first {n} of {len(source)} images"}
    if subject.weights:
        about["weights"] = subject.weights
    if subject.info is not None and subject.info.accuracy:
        acc = subject.info.accuracy
        about["accuracy"] = ", ".join(f"{key} {v:.4f}" if isinstance(v, float) else f"{key} {v}" for key, v in acc.items())
    with distributed():
        summary = build_atlas(subject.model, source, subject.preprocess, layers, out, k=k, indices=list(range(n)),
                              about=about, other_activations=subject.other_activations, batch_size=batch_size,
                              workers=workers)
        rank = world()[0]
    if rank == 0:
        print(json.dumps({**summary, "index": str(Path(out) / "index.html")}) if json_output else
              f"{Path(out) / 'index.html'}: {sum(summary['maps'].values())} maps, {summary['projected']} projected "
              f"now, {summary['reused']} reused")
    return summary


def evolution(out: Out, run: str, data: str | None = None, limit: Positive = 2000, maps: Positive = 5,
              probe: Positive = 500, seed: int = 0, device: str = "auto", json_output: Json = False) -> list[dict]:
    """Strongest activations projected at each training snapshot, and each layer's CKA with the last (Fig. 4).

    Needs the training snapshots of a ``deconvnet train`` run (``--snapshots``); in Python,
    :func:`deconvnet.evolution` also takes a list of any models.

    Args:
        out: output directory (evolution-layerN.png, evolution.png/json, evolution-cka.png)
        run: training run directory with checkpoints/epoch-K.pt
        data: images searched (default: the run's training data)
        limit: search the first N images (default 2000)
        maps: feature maps per layer, chosen at random
        probe: images of the run's validation data on which each layer's CKA is measured (default 500)
        seed: seed of the random choice of maps
    """
    from .evolution import draw_evolution, draw_evolution_cka, draw_evolution_layer, evolution as measure, evolution_to_json

    options = _options(locals())
    # default data: the run's training data; probe: its validation data, images it did not train on
    result = measure(run, data, limit=limit, maps=maps, probe=probe, seed=seed, device=device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for n in result.layers:
        draw_evolution_layer(result, n, out / f"evolution-layer{n}.png")
    draw_evolution(result, out / "evolution.png")
    draw_evolution_cka(result, out / "evolution-cka.png")
    body = {"data": result.data, "probe_data": result.probe_data, **evolution_to_json(result)}
    _write_result(out, "evolution.json", options, json_output=json_output, body=body, epochs=result.epochs)
    return body["findings"]


def architecture(out: Out, runs: list[str], data: str | None = None, limit: Positive = 1000, maps: Positive = 16,
                 seed: int = 0, seed_noise: Annotated[str | None, Flag(metavar="ABLATION_JSON")] = None,
                 device: str = "auto", json_output: Json = False) -> list[dict]:
    """Layer-1 filters and layer-2 projections of several runs (Fig. 6).

    Args:
        out: output directory (architecture.png + architecture.json)
        runs: run directories or checkpoints, comma-separated
        data: images for the layer-2 projections (default: each run's test data)
        limit: search the first N images for the strongest activations
        maps: layer-2 maps projected, chosen at random
        seed: seed of the random choice of maps
        seed_noise: ablation.json of `deconvnet ablation --baseline-seeds`: the seed spread the accuracy
            difference is judged against
    """
    from .architecture import architecture as measure, architecture_to_json, draw_architecture

    options = _options(locals())
    noise = None
    if seed_noise is not None:
        try:
            errors = json.loads(Path(seed_noise).read_text())["seed_noise"]["test_top1"]
        except (OSError, ValueError, KeyError, TypeError):
            raise UserError(f"--seed-noise {seed_noise} is not an ablation.json with seed noise "
                            "(from deconvnet ablation --baseline-seeds)") from None
        noise = [1 - e / 100 for e in errors]  # test top-1 accuracies of the baseline's seeds
    summaries = measure(runs, data, limit=limit, maps=maps, seed=seed, device=device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    draw_architecture(summaries, out / "architecture.png")
    body = architecture_to_json(summaries, noise)
    _write_result(out, "architecture.json", options, json_output=json_output, body=body)
    return body["findings"]


def ablation(out: Out, model: str = "zfnet-small", data: str = "fashion-mnist", epochs: Positive | None = None,
             limit: Positive | None = None, batch_size: Positive = 128, lr: float | None = None,
             variants: list[str] | None = None, seed: int = 0, baseline_seeds: list[int] | None = None,
             device: str = "auto", json_output: Json = False) -> list[dict]:
    """Train Table 3's variants (removed / resized layers) and compare their errors.

    Each variant's difference is judged against the baseline's seed noise; a rerun resumes in ``out``.

    Args:
        out: directory: one run per variant, ablation.png + ablation.json
        model: the model the variants change
        data: training data
        epochs: epochs per variant (default: the recipe's)
        limit: use only the first N images (demo: 20000)
        batch_size: mini-batch size
        lr: peak learning rate (default: the recipe's; short budgets need less, demo 0.02)
        variants: a subset of the variants (default: all)
        seed: seed of every variant's run
        baseline_seeds: train the baseline again with these seeds (e.g. 1,2) to measure the seed noise the
            variants' differences are judged against
    """
    from .ablation import ablation as run_ablation, ablation_to_json, draw_ablation
    from .train import TrainConfig

    options = _options(locals())
    base = TrainConfig(model=model, data=data, epochs=epochs, limit=limit, seed=seed, batch_size=batch_size, lr=lr,
                       device=device)
    result = run_ablation(base, out, variants, baseline_seeds)
    out = Path(out)
    draw_ablation(result, out / "ablation.png")
    body = ablation_to_json(result)
    _write_result(out, "ablation.json", options, json_output=json_output, body=body, text=result.table())
    return body["findings"]


# ----------------------------------------------------------------------------- transfer (Sec. 5)

def _target_and_overlaps(subject, target: str, pretrain_data: str | None):
    """The target set at the model's size, its images found in the pretraining data (Sec. 5.2), their
    nearest correlations and the pretraining data's classes. A model that is not ours is checked
    against ``pretrain_data`` only when it is given."""
    from .transfer import find_overlaps

    target_source = subject.open_data(target)
    info = subject.info
    spec = pretrain_data or (info.train_config.get("data") if info else None)
    if not spec and info is None:
        print("deconvnet: no --pretrain-data given, so no target image is checked against the model's "
              "training data (Sec. 5.2)", file=sys.stderr)
        return target_source, [], [], []
    if not spec:
        raise UserError("the checkpoint does not say what it was trained on; give --pretrain-data SPEC")
    reference = subject.open_data(spec)
    limit = None if pretrain_data or info is None else info.train_config.get("limit")
    overlaps, nearest = find_overlaps(target_source, reference, limit)
    return target_source, overlaps, nearest, list(reference.classes)


def transfer(out: Out, target: str = "digits", per_class: list[int] = (1, 2, 3, 5, 10, 15, 30), folds: int = 5,
             pretrain_data: str | None = None, seed: int = 0, scratch_steps: Positive = 300, json_output: Json = False, **model) -> list[dict]:
    """Fixed pretrained layers 1-7 + a new softmax vs the same net trained from scratch (Tables 4/5, Fig. 9).

    The target data and its folds: the options of the transfer protocol (Sec. 5.2), shared with
    ``layer_features`` (:data:`deconvnet.options.SHARED_HELP`).

    Args:
        out: output directory (transfer.png + transfer.json)
        scratch_steps: SGD steps of each from-scratch training (default 300; demo 100)
    """
    from .transfer import draw_transfer, transfer as run_transfer, transfer_to_json

    options = _options(locals())
    subject = subject_of(model)
    target_source, overlaps, nearest, pretrain_classes = _target_and_overlaps(subject, target, pretrain_data)
    result = run_transfer(subject, target_source, list(per_class), folds, scratch_steps=scratch_steps,
                          overlaps=overlaps, nearest=nearest, seed=seed, pretrain_data=pretrain_data,
                          pretrain_classes=pretrain_classes)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    draw_transfer(result, out / "transfer.png")
    body = transfer_to_json(result)
    _write_result(out, "transfer.json", options, json_output=json_output, body=body, text=result.table(), overlaps_removed=len(overlaps))
    return body["findings"]


def layer_features(out: Out, target: str = "digits", per_class: list[int] = (15, 30), folds: int = 5,
                   pretrain_data: str | None = None, seed: int = 0, json_output: Json = False, **model) -> list[dict]:
    """A linear SVM and a softmax on each layer's features (Table 7).

    Args:
        out: output directory (layers.png + layers.json)
    """
    from .layer_features import draw_layer_features, layer_features as measure, layer_features_to_json

    options = _options(locals())
    subject = subject_of(model)
    target_source, overlaps, _, _ = _target_and_overlaps(subject, target, pretrain_data)
    trained_on = pretrain_data or ((subject.info.train_config or {}).get("data", "") if subject.info else "")
    result = measure(subject, target_source, list(per_class), folds, exclude=[o.target_index for o in overlaps],
                     seed=seed, pretrain_data=trained_on)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    draw_layer_features(result, out / "layers.png")
    body = layer_features_to_json(result)
    _write_result(out, "layers.json", options, json_output=json_output, body=body, text=result.table())
    return body["findings"]


# ----------------------------------------------------------------------------- the model itself

def inspect(json_output: Annotated[bool, Flag(name="--json")] = False, **model) -> list[dict]:
    """List every layer a command accepts: type, output shape, receptive field.

    Args:
        json_output: print JSON instead of a table
    """
    from . import geometry

    subject = subject_of(model)
    size = (subject.preprocess.input_size, subject.preprocess.input_size)
    rows = []
    for c in subject.calls():
        field = geometry.layer_field(subject.model, c.name, size) if len(c.shape) == 3 else None
        rows.append({"name": c.name, "type": c.type, "shape": list(c.shape),
                     "field": list(field) if field else None,
                     "default": c.name in subject.stages or c.name == subject.penultimate})
    if json_output:
        print(json.dumps({"model": subject.describe(), "layers": rows}, indent=1))
        return rows
    pre = subject.preprocess
    print(f"{subject.spec}: input {pre.channels}x{pre.input_size}x{pre.input_size}, {len(subject.classes)} classes, "
          f"{len(rows)} layers (* = default: {', '.join(subject.stages)}"
          f"{'; penultimate ' + subject.penultimate if subject.penultimate else ''})")
    width = max(len(r["name"]) for r in rows) + 2
    kind = max(len(r["type"]) for r in rows) + 2
    print(f"  {'layer':<{width}}{'type':<{kind}}{'output':<18}receptive field (size, stride)")
    for r in rows:
        field = "-" if r["field"] is None else _field_text(r["field"])
        shape = "x".join(str(v) for v in r["shape"])
        print(f"{'*' if r['default'] else ' '} {r['name']:<{width}}{r['type']:<{kind}}{shape:<18}{field}")
    return rows


def _field_text(field) -> str:
    """(size, stride) with per-axis values shown once when square."""
    size, stride = field
    size = size if isinstance(size, int) else ("x".join(map(str, size)) if len(set(size)) > 1 else size[0])
    stride = stride if isinstance(stride, int) else ("x".join(map(str, stride)) if len(set(stride)) > 1 else stride[0])
    return f"{size} px, stride {stride}"


def serve(data: str | None = None, layers: list[str] | None = None, atlas: Annotated[str | None, Flag(metavar="DIR")] = None,
          host: str = "127.0.0.1", port: int = 8000, limit: Positive = 5000, **model) -> None:
    """The interactive viewer: a local web app over a model and a data set, until interrupted.

    Args:
        data: data set shown (default: the checkpoint's validation data)
        layers: layers shown (default: conv1..conv5 or the model's stages)
        atlas: a `deconvnet atlas` site of this model: each feature map links to its page there
        host: address to bind (default 127.0.0.1, this machine only)
        port: port to serve on
        limit: top-k over the first N images (default 5000)
    """
    try:
        import uvicorn  # noqa: F401 - checked here so that a missing extra is a one-line error, exit 2

        from .serve import serve as run_viewer
    except ImportError as e:
        raise UserError(f"serve needs the 'serve' extra ({e.name} is missing): pip install -e '.[serve]'") from None
    subject = subject_of(model)
    run_viewer(subject, data, host=host, port=port, limit=limit, layers=subject.layers(layers), atlas=atlas)


# ----------------------------------------------------------------------------- reports

def report(out: Out, data: str, target: str | None = None, images: Positive = 30, limit: Positive | None = None,
           **model) -> None:
    """Fig. 2, 5, 7 (and Table 7 with --target) for your model as one HTML page.

    Args:
        out: output directory (index.html + one folder per step, cached)
        data: your images: folder:PATH (one folder per class) or another data spec
        target: labelled data for Table 7's per-layer probes (folder:PATH)
        images: images for the statistics of Fig. 5 and Fig. 7 (panels drawn for up to 3)
        limit: Fig. 2 over the first N images only
    """
    from .model_report import model_report

    subject = subject_of(model)  # fails fast on a bad spec, before any step runs
    images = min(images, len(subject.open_data(data)))
    inputs = subject.files() + ([model["classes"]] if model.get("classes") else [])
    described = subject.describe()
    del subject  # every step loads the model itself: not a second copy on the GPU meanwhile
    model_report(out, absolute_model_options(model), inputs, data, described, images=images, limit=limit,
                 target=target)


def reproduce(out: Out = "report", quick: bool = False, full: bool = False, data: str = "fashion-mnist",
              model: str = "zfnet-small", time_budget: Annotated[float | None, Flag(metavar="MINUTES")] = None,
              device: str = "auto") -> None:
    """Run the whole paper (cached steps) and write DIR/index.html.

    Args:
        out: output directory (default: report/)
        quick: tiny settings for every step (a few minutes)
        full: the longer fixed budgets (about 1.5 hours on 2 CPU cores)
        data: training data (default fashion-mnist)
        model: model trained and analysed (default zfnet-small)
        time_budget: end within MINUTES (default 20): every step is sized from one measurement of this
            machine's speed, cached in DIR/calibration.json
    """
    from .reproduce import reproduce as run_paper

    if quick and full:
        raise UserError("--quick and --full exclude each other")
    run_paper(out, quick=quick, data=data, model=model, full=full, minutes=time_budget, device=device)
