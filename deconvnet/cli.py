"""The ``deconvnet`` command: a thin layer over the functions a notebook user calls.

User mistakes print one line ``deconvnet: error: ...`` and exit with status 2.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from .errors import UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse prints usage + error by default)
        raise UserError(f"{self.prog}: {message}")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def cmd_train(args) -> None:
    from .train import TrainConfig, train

    cfg = TrainConfig(model=args.model, data=args.data, val=args.val, recipe=args.recipe, epochs=args.epochs,
                      batch_size=args.batch_size, lr=args.lr, seed=args.seed, limit=args.limit,
                      snapshots=args.snapshots, renorm=not args.no_renorm, dropout=args.dropout,
                      checkpoint_every=args.checkpoint_every, workers=args.workers,
                      label_smoothing=args.label_smoothing, device=args.device, precision=args.precision,
                      final_ten_crop=not args.no_ten_crop, time_budget=args.time_budget)
    final = train(cfg, args.out, resume=args.resume)
    print(json.dumps({"run": str(args.out), **final}))


def cmd_evaluate(args) -> None:
    from .train import evaluate

    import torch

    subject = _subject(args)
    source = subject.open_data(args.data)
    to_model = _data_labels(subject, source, args.data)
    unknown = [name for name, i in zip(source.classes, to_model) if i is None]
    if unknown:
        raise UserError(f"{len(unknown)} of {args.data}'s {len(source.classes)} classes are not the model's "
                        f"(e.g. {unknown[0]!r}); give --classes FILE naming its outputs (folder names or "
                        "ImageNet's index with WordNet ids)")
    source.labels = torch.tensor(to_model)[source.labels]  # the data's labels as the model's class indices
    source.classes = subject.classes
    indices = None if args.limit is None else list(range(min(args.limit, len(source))))
    result = evaluate(subject.model, source, subject.preprocess, indices, ten_crop=args.ten_crop)
    print(json.dumps({"top1": result["top1"], "top5": result["top5"], "n": result["n"]}))


def _check_classes(data_classes: list[str], model_classes: list[str], spec: str) -> None:
    if list(data_classes) != list(model_classes):
        raise UserError(f"{spec} has classes {data_classes[:5]}... but the checkpoint was trained on "
                        f"{model_classes[:5]}...")


def _float_list(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = [math.nan]
    if not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated finite numbers, got {text!r}")
    return values


def _name_list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _named_box(text: str) -> tuple[str, list[int]]:
    name, _, box = text.partition("=")
    values = _int_list(box)
    if not name or len(values) != 4:
        raise argparse.ArgumentTypeError(f"expected NAME=TOP,LEFT,BOTTOM,RIGHT, got {text!r}")
    return name, values


def _class_index(text: str, classes: list[str]) -> int:
    """A class given by name or number."""
    if text in classes:
        return classes.index(text)
    if text.isdigit() and int(text) < len(classes):
        return int(text)
    raise UserError(f"unknown class {text!r}; this checkpoint has: {', '.join(classes)}")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    """The model under study: ``--model SPEC`` (or ``--checkpoint``) and, for models not trained by
    ``deconvnet train``, its weights, class names and preprocessing (see :mod:`deconvnet.subject`)."""
    g = p.add_argument_group("model under study")
    g.add_argument("--model", dest="model_spec", metavar="SPEC", default=None,
                   help="a deconvnet checkpoint (.pt or run directory), torchvision:NAME, "
                        "package.module:CALLABLE or path/to/file.py:CALLABLE")
    g.add_argument("--checkpoint", default=None, metavar="CKPT", help="a deconvnet checkpoint (same as --model CKPT)")
    g.add_argument("--weights", default=None, metavar="FILE",
                   help="state_dict file (or a dict holding one under state_dict/model); module. prefixes stripped")
    g.add_argument("--classes", default=None, metavar="FILE",
                   help="class names: one per line, a JSON list, or ImageNet's {\"0\": [\"n01440764\", \"tench\"]} index")
    g.add_argument("--preprocess", default=None, choices=["imagenet", "unit"],
                   help="imagenet (default): short side 256, center crop 224, ImageNet mean/std; "
                        "unit: [0, 1] pixels at the input size")
    g.add_argument("--input-size", type=_positive_int, default=None, help="the model's input size (default 224)")
    g.add_argument("--mean", type=_float_list, default=None, help="per-channel mean on [0, 1] pixels, e.g. 0.5,0.5,0.5")
    g.add_argument("--std", type=_float_list, default=None, help="per-channel std on [0, 1] pixels")
    g.add_argument("--other-activations", choices=["error", "gradient"], default="error",
                   help="projections through ReLU6/SiLU/GELU/Hardswish/...: error (default; the paper has no rule "
                        "for them) or gradient (they act as in back-propagation)")


def _subject(args):
    """The model under study named by ``--model``/``--checkpoint`` and its options."""
    from .subject import load_subject

    spec, checkpoint = getattr(args, "model_spec", None), getattr(args, "checkpoint", None)
    if spec and checkpoint:
        raise UserError("give --model SPEC or --checkpoint CKPT, not both")
    if not spec and not checkpoint:
        raise UserError("give the model: --model SPEC (a checkpoint, torchvision:NAME or module:CALLABLE)")
    return load_subject(spec or checkpoint, weights=args.weights, classes=args.classes,
                        preprocess=args.preprocess, input_size=args.input_size, mean=args.mean, std=args.std,
                        other_activations=args.other_activations)


def _default_layers(subject, given: list[str] | None, numbers: list[int] | None = None) -> list[str]:
    """``given``, or the model's defaults: its stages, or the paper's layers ``numbers`` (Fig. 3) where the
    model has them. For models that are not ours, the choice is said on stderr."""
    if given:
        return given
    if numbers is None:
        chosen = list(subject.stages)
    else:
        chosen = [subject.layer_numbers.get(n) or (subject.stages[-1] if n <= 5 and subject.stages else None)
                  for n in numbers]
        if None in chosen:
            raise UserError(f"this model has no default for layer(s) {numbers}; name them (deconvnet inspect lists them)")
    if not chosen:
        raise UserError("found no default layers in this model; name them (deconvnet inspect lists them)")
    if subject.info is None:
        print(f"deconvnet: layers chosen for {subject.spec}: {', '.join(chosen)} "
              f"(override with --layer/--layers; `deconvnet inspect` lists all)", file=sys.stderr)
    return chosen


def _add_topk_args(p: argparse.ArgumentParser) -> None:
    """The model and the dataset pass of ``topk`` and ``atlas`` (Fig. 2)."""
    _add_model_args(p)
    p.add_argument("--data", required=True, help="data spec, e.g. fashion-mnist:test or folder:PATH")
    p.add_argument("--layers", type=_name_list, default=None,
                   help="comma-separated layers (default: conv1..conv5, or the model's stages; see inspect)")
    p.add_argument("--k", type=_positive_int, default=9, help="activations kept per feature map (default 9, Fig. 2)")
    p.add_argument("--limit", type=_positive_int, default=None, help="use only the first N images")


def _add_image_args(p: argparse.ArgumentParser, count: int) -> None:
    """The model and the image selection of the per-image commands (see :func:`_select_images`)."""
    _add_model_args(p)
    p.add_argument("--image", nargs="+", metavar="PATH", default=None, help="PNG/JPEG image file(s)")
    p.add_argument("--data", default=None, help="data spec to take images from, e.g. fashion-mnist:test")
    p.add_argument("--index", type=_int_list, default=None,
                   help=f"comma-separated image indices in --data (default: the first {count})")
    p.add_argument("--out", required=True, help="output directory (PNG + JSON)")


def _select_images(args, subject, count: int = 1, label: int | None = None):
    """The images named by ``--image PATH...`` or ``--data SPEC --index I,J``, at the model's stored
    size: ``(raw uint8 (N, C, S, S), labels, names)``. Labels are the model's class indices, None for
    image files and for data classes the model does not have. Without ``--index``, the first ``count``
    images of ``--data`` (of model class ``label`` when given)."""
    if args.image and args.data:
        raise UserError("give either --image or --data, not both")
    if args.image:
        if args.index is not None:
            raise UserError("--index selects images in --data; it does not apply to --image")
        raw = subject.load_images(args.image)
        return raw, [None] * len(raw), [Path(path).stem for path in args.image]
    if not args.data:
        raise UserError("give --image PATH or --data SPEC (with --index I)")
    source = subject.open_data(args.data)
    to_model = _data_labels(subject, source, args.data)
    if args.index is not None:
        indices = args.index
    else:
        pool = range(len(source)) if label is None else [i for i, y in enumerate(source.labels.tolist())
                                                            if to_model[y] == label]
        indices = list(pool[:count])
    bad = [i for i in indices if not 0 <= i < len(source)]
    if bad or not indices:
        raise UserError(f"--index {bad or indices} is outside {args.data}'s {len(source)} images")
    return source.get(indices), [to_model[y] for y in source.labels[indices].tolist()], [str(i) for i in indices]


def _data_labels(subject, source, spec: str) -> list[int | None]:
    """For each class of ``source``, the model's class index (by name), None where the model lacks it.
    Our checkpoints must be given data with their own classes."""
    if subject.info is not None:
        _check_classes(source.classes, subject.classes, spec)
    return subject.class_index(source.classes)


def _run_record(args) -> dict:
    """The command's arguments, written beside its outputs."""
    return {k: v for k, v in vars(args).items() if k != "func"}


def _write_findings(args, out: Path, name: str, body: dict, table: str | None = None, **summary) -> None:
    """Write ``out/name`` (the command's arguments + ``body``), print ``table`` and a one-line JSON summary."""
    from .runner import atomic_write_json

    atomic_write_json(out / name, {"args": _run_record(args), **body})
    if table is not None:
        print(table)
    print(json.dumps({"out": str(out), **summary, "findings": body["findings"]}))


def cmd_occlude(args) -> None:
    from ._analysis import foreground
    from .findings import to_json
    from .occlusion import draw_occlusion, occlusion, occlusion_findings, occlusion_to_json
    from .runner import atomic_write_json

    subject = _subject(args)
    layer = args.layer or _default_layers(subject, None)[-1]
    raw, labels, names = _select_images(args, subject)
    pictures, out = subject.pictures(raw), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for x, label, name, pic in zip(subject.prepare(raw), labels, names, pictures):
        target = _class_index(args.target, subject.classes) if args.target is not None else label
        result = occlusion(subject.model, x, target, size=args.size, stride=args.stride, layer=layer,
                           other_activations=subject.other_activations)
        draw_occlusion(result, out / f"occlusion-{name}.png", pic, subject.classes)
        results.append(result)
    # object masks by threshold hold for Fashion-MNIST's black backgrounds, not for photos
    objects = list(foreground(pictures)) if subject.info is not None else []
    findings = to_json(occlusion_findings(results, objects))
    atomic_write_json(out / "occlusion.json", {
        "args": _run_record(args), "model": subject.describe(), "findings": findings,
        "images": [{"name": n, "true_label": l, **occlusion_to_json(r, subject.classes)}
                   for n, l, r in zip(names, labels, results)]})
    print(json.dumps({"out": str(out), "findings": [{k: v for k, v in f.items() if k != "ours"} for f in findings]}))


def cmd_invariance(args) -> None:
    import torch

    from .findings import to_json
    from .invariance import default_amounts, draw_invariance, invariance, invariance_findings, invariance_to_json
    from .runner import atomic_write_json

    subject = _subject(args)
    layers = _default_layers(subject, args.layers, [1, 7])
    raw, labels, names = _select_images(args, subject, count=5)
    if None in labels:  # files or unknown classes: the true label is the model's answer on the untransformed image
        with torch.no_grad():
            predicted = subject.model(subject.prepare(raw)).argmax(1).tolist()
        labels = [p if y is None else y for y, p in zip(labels, predicted)]
    amounts = default_amounts(subject.preprocess.input_size)
    for kind, values in (("translation", args.translations), ("scale", args.scales), ("rotation", args.rotations)):
        if values is not None:
            amounts[kind] = values
    result = invariance(subject.model, raw, labels, subject.preprocess, layers=layers, amounts=amounts)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    draw_invariance(result, out / "invariance.png", subject.classes)
    findings = to_json(invariance_findings(result))
    atomic_write_json(out / "invariance.json", {"args": _run_record(args), "model": subject.describe(),
                                                "images": names, "findings": findings,
                                                **invariance_to_json(result, subject.classes)})
    print(json.dumps({"out": str(out), "findings": findings}))


def _parts(args, class_name: str | None, n: int, frames: list) -> dict:
    """Part boxes per image from ``--parts FILE``, ``--part NAME=T,L,B,R`` or the class's preset."""
    from .correspondence import FASHION_PARTS, relative_box

    if args.parts and args.part:
        raise UserError("give --parts FILE or --part NAME=T,L,B,R, not both")
    if args.parts:
        try:
            spec = json.loads(Path(args.parts).read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read parts from {args.parts}: {e}") from None
    elif args.part:
        spec = dict(args.part)
    elif class_name in FASHION_PARTS:
        return {name: [relative_box(f, rel) for f in frames] for name, rel in FASHION_PARTS[class_name].items()}
    else:
        raise UserError(f"no preset parts for {class_name!r} (presets: {', '.join(FASHION_PARTS)}); "
                        "give --parts FILE or --part NAME=T,L,B,R")
    parts = {}
    for name, boxes in spec.items():  # one box for every image, or one per image
        boxes = [boxes] * n if boxes and isinstance(boxes[0], int) else boxes
        if len(boxes) != n or any(len(b) != 4 for b in boxes):
            raise UserError(f"part {name!r}: give one box [top, left, bottom, right] or one per image ({n})")
        parts[name] = [tuple(int(v) for v in b) for b in boxes]
    return parts


def cmd_correspond(args) -> None:
    from ._analysis import foreground
    from .correspondence import (correspondence, correspondence_findings, correspondence_to_json,
                                 draw_correspondence, object_box)
    from .findings import to_json
    from .runner import atomic_write_json

    subject = _subject(args)
    layers = _default_layers(subject, args.layers, [5, 7])
    label = _class_index(args.class_name, subject.classes) if args.class_name else None
    raw, labels, names = _select_images(args, subject, count=args.count, label=label)
    pictures = subject.pictures(raw)
    if subject.info is not None:  # objects on Fashion-MNIST's black background
        frames = [object_box(m) for m in foreground(pictures)]
    else:  # photos: the random control boxes go anywhere in the image
        frames = [(0, 0, pictures.shape[2] - 1, pictures.shape[3] - 1)] * len(raw)
    parts = _parts(args, args.class_name, len(raw), frames)
    result = correspondence(subject.model, subject.prepare(raw), parts, objects=frames, layers=layers,
                            repeats=args.repeats, seed=args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    draw_correspondence(result, pictures, out / "correspondence.png")
    findings = to_json(correspondence_findings(result))
    body = correspondence_to_json(result)
    atomic_write_json(out / "correspondence.json", {"args": _run_record(args), "model": subject.describe(),
                                                    "images": names, "labels": labels,
                                                    "objects": [list(f) for f in frames], "findings": findings,
                                                    **body})
    print(json.dumps({"out": str(out), "table": body["table"], "findings": findings}))


def cmd_topk(args) -> None:
    import torch.distributed as dist

    from .runner import atomic_write_json, init_distributed, world
    from .findings import to_json
    from .topk import choose_maps, draw_gallery, gallery, top_k, topk_findings, topk_to_json

    subject = _subject(args)
    model, pre = subject.model, subject.preprocess
    layers = _default_layers(subject, args.layers)
    source = subject.open_data(args.data)
    n = len(source) if args.limit is None else min(args.limit, len(source))
    started = init_distributed()
    try:
        tables = top_k(model, source, pre, layers, k=args.k, indices=list(range(n)))
        rank = world()[0]
    finally:
        if started:
            dist.destroy_process_group()
    if rank != 0:  # every process holds the merged tables; one draws them
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    chosen = {}
    for name, table in tables.items():
        chosen[name] = choose_maps(table, args.maps, args.seed)
        draw_gallery(gallery(model, source, pre, name, table, chosen[name], subject.other_activations),
                     out / f"gallery-{name}.png",
                     f"{name}: top {args.k} of {n} images of {args.data}, projected (left) and input patches (right)")
    findings = topk_findings(tables, source.labels)
    atomic_write_json(out / "topk.json", {"args": _run_record(args), "model": subject.describe(), "images": n, "k": args.k,
                                          "findings": to_json(findings), "layers": topk_to_json(tables, chosen)})
    print(json.dumps({"out": str(out), "images": n, "gallery_maps": chosen, "class_purity": findings[0].ours}))


def cmd_atlas(args) -> None:
    import torch.distributed as dist

    from .atlas import build_atlas
    from .runner import init_distributed, world

    subject = _subject(args)
    layers = _default_layers(subject, args.layers)
    source = subject.open_data(args.data)
    n = len(source) if args.limit is None else min(args.limit, len(source))
    about = {"model": subject.spec, "architecture": subject.name, "data": f"{args.data}, first {n} of {len(source)} images"}
    if subject.weights:
        about["weights"] = subject.weights
    if subject.info is not None and subject.info.accuracy:
        acc = subject.info.accuracy
        about["accuracy"] = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in acc.items())
    started = init_distributed()
    try:
        summary = build_atlas(subject.model, source, subject.preprocess, layers, args.out, k=args.k,
                              indices=list(range(n)), about=about, other_activations=subject.other_activations)
        rank = world()[0]
    finally:
        if started:
            dist.destroy_process_group()
    if rank == 0:
        print(json.dumps({**summary, "index": str(Path(args.out) / "index.html")}))


def cmd_project(args) -> None:
    from ._analysis import strongest_units
    from .deconvnet import Deconvnet, draw_projection
    from .geometry import unit_box
    from .probe import activations
    from .runner import atomic_write_json

    subject = _subject(args)
    model = subject.model
    raw, _, names = _select_images(args, subject)
    if len(raw) != 1:
        raise UserError("project takes one image: one --image PATH or one --index I")
    if args.unit is not None and len(args.unit) != 3:
        raise UserError(f"--unit is channel,y,x; got {args.unit}")
    x = subject.prepare(raw)
    a = activations(model, x, args.layer)[args.layer][0].detach()
    if a.dim() != 3:
        raise UserError(f"layer {args.layer!r} has no feature maps (output shape {tuple(a.shape)})")
    unit = tuple(args.unit) if args.unit is not None else strongest_units(a)[0]
    projection = Deconvnet(model, subject.other_activations).project(x, args.layer, [unit], rule=args.rule)[0]
    value = float(a[unit])
    box = unit_box(model, args.layer, unit[1], unit[2], subject.preprocess.input_size)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    draw_projection(subject.pictures(raw)[0], projection, box, args.out,
                    f"image {names[0]}: {args.layer} unit {unit} = {value:.3g}, rule {args.rule}")
    record = {"out": str(args.out), "layer": args.layer, "unit": list(unit), "value": value, "box": list(box)}
    atomic_write_json(Path(args.out).with_suffix(".json"), {"args": _run_record(args), "model": subject.describe(),
                                                            **record})
    print(json.dumps(record))


def _checkpoint_path(run: str) -> Path:
    """A run directory (its final.pt) or a checkpoint file."""
    path = Path(run)
    return path / "final.pt" if path.is_dir() else path


def cmd_ablate(args) -> None:
    from .ablation import ablate, plot, to_json
    from .train import TrainConfig

    base = TrainConfig(model=args.model, data=args.data, epochs=args.epochs, limit=args.limit, seed=args.seed,
                       batch_size=args.batch_size, lr=args.lr)
    result = ablate(base, args.out, args.variants)
    out = Path(args.out)
    plot(result, out / "ablation.png")
    _write_findings(args, out, "ablation.json", to_json(result), result.table())


def cmd_compare(args) -> None:
    from .architecture import plot, summarise, to_json
    from .checkpoint import load_checkpoint
    from .data import open_source

    summaries = []
    for run in args.runs:
        model, info = load_checkpoint(_checkpoint_path(run))
        spec = args.data or info.accuracy.get("data") or "fashion-mnist:test"
        source = open_source(spec, info.preprocess.stored_size, info.preprocess.channels)
        indices = list(range(min(args.limit, len(source))))
        summaries.append(summarise(model, info, source, indices, maps=args.maps, seed=args.seed))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot(summaries, out / "architecture.png")
    _write_findings(args, out, "architecture.json", to_json(summaries))


def _add_target_args(p: argparse.ArgumentParser, per_class: str) -> None:
    """The transfer protocol's arguments (Sec. 5.2), shared by ``transfer`` and ``layers``."""
    _add_model_args(p)
    p.add_argument("--target", default="digits", help="target data: digits or folder:PATH (e.g. Caltech-101)")
    p.add_argument("--per-class", type=_int_list, default=_int_list(per_class),
                   help=f"training images per class (default {per_class})")
    p.add_argument("--folds", type=int, default=5, help="random train/test folds (default 5)")
    p.add_argument("--pretrain-data", default=None,
                   help="data searched for target images it also holds (default: the checkpoint's training data)")
    p.add_argument("--seed", type=int, default=0)


def _target_and_overlaps(args, subject):
    """The target set at the model's size, and its images found in the pretraining data (Sec. 5.2).
    A model that is not ours is checked against ``--pretrain-data`` only when it is given."""
    from .transfer import find_overlaps

    target = subject.open_data(args.target)
    info = subject.info
    spec = args.pretrain_data or (info.train_config.get("data") if info else None)
    if not spec and info is None:
        print("deconvnet: no --pretrain-data given, so no target image is checked against the model's "
              "training data (Sec. 5.2)", file=sys.stderr)
        return target, [], None
    if not spec:
        raise UserError("the checkpoint does not say what it was trained on; give --pretrain-data SPEC")
    reference = subject.open_data(spec)
    limit = None if args.pretrain_data or info is None else info.train_config.get("limit")
    overlaps, nearest = find_overlaps(target, reference, limit)
    return target, overlaps, nearest


def cmd_transfer(args) -> None:
    from .transfer import plot, to_json, transfer

    subject = _subject(args)
    if subject.info is None:
        raise UserError("transfer compares with the same architecture trained from scratch, which needs a "
                        "deconvnet checkpoint; for your model, `deconvnet layers --model ... --target SPEC` "
                        "gives Table 7's per-layer linear probes")
    model, info = subject.model, subject.info
    target, overlaps, nearest = _target_and_overlaps(args, subject)
    result = transfer(model, info, target, args.per_class, args.folds, scratch_steps=args.scratch_steps,
                      overlaps=overlaps, nearest=nearest, seed=args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot(result, out / "transfer.png")
    _write_findings(args, out, "transfer.json", to_json(result), result.table(), overlaps_removed=len(overlaps))


def cmd_layers(args) -> None:
    from .layer_features import layer_analysis, plot, to_json

    subject = _subject(args)
    target, overlaps, _ = _target_and_overlaps(args, subject)
    layers = grid = None
    if subject.info is None:  # the stages and the penultimate layer stand for layers 1..7
        _default_layers(subject, None, sorted(subject.layer_numbers))
        layers = dict(subject.layer_numbers)
        shapes = {c.name: c.shape for c in subject.calls()}
        grid = min(shapes[name][-1] for name in layers.values() if len(shapes[name]) == 3)
    result = layer_analysis(subject.model, subject.preprocess, target, args.per_class, args.folds,
                            exclude=[o.target_index for o in overlaps], seed=args.seed, layers=layers, grid=grid)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot(result, out / "layers.png")
    _write_findings(args, out, "layers.json", to_json(result), result.table())


def cmd_evolution(args) -> None:
    from .data import open_source
    from .evolution import evolution, load_snapshots, plot_layer, plot_summary, to_json

    snapshots, info = load_snapshots(args.run)
    spec = args.data or info.train_config.get("data") or "fashion-mnist"
    source = open_source(spec, info.preprocess.stored_size, info.preprocess.channels)
    indices = list(range(min(args.limit, len(source))))
    result = evolution(snapshots, info.preprocess, source, indices, maps=args.maps, seed=args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for n in result.layers:
        plot_layer(result, n, out / f"evolution-layer{n}.png")
    plot_summary(result, out / "evolution.png")
    _write_findings(args, out, "evolution.json", {"data": spec, **to_json(result)}, epochs=result.epochs)


def cmd_inspect(args) -> None:
    from . import geometry

    subject = _subject(args)
    calls = subject.calls()
    size = (subject.preprocess.input_size, subject.preprocess.input_size)
    rows = []
    for c in calls:
        field = geometry.layer_field(subject.model, c.name, size) if len(c.shape) == 3 else None
        rows.append({"name": c.name, "type": c.type, "shape": list(c.shape),
                     "field": list(field) if field else None,
                     "default": c.name in subject.stages or c.name == subject.penultimate})
    if args.json:
        print(json.dumps({"model": subject.describe(), "layers": rows}, indent=1))
        return
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


def _field_text(field) -> str:
    """(size, stride) with per-axis values shown once when square."""
    size, stride = field
    size = size if isinstance(size, int) else ("x".join(map(str, size)) if len(set(size)) > 1 else size[0])
    stride = stride if isinstance(stride, int) else ("x".join(map(str, stride)) if len(set(stride)) > 1 else stride[0])
    return f"{size} px, stride {stride}"


def _model_argv(args) -> list[str]:
    """The model options of ``args`` as argv, with file paths made absolute (for cached steps)."""
    def absolute(value: str) -> str:
        if ":" in value and not Path(value).exists():  # torchvision:NAME, module:CALLABLE, file.py:CALLABLE
            where, _, attr = value.rpartition(":")
            return f"{Path(where).resolve()}:{attr}" if where.endswith(".py") else value
        return str(Path(value).resolve())

    argv = []
    for flag, dest, is_path in (("--model", "model_spec", True), ("--checkpoint", "checkpoint", True),
                                ("--weights", "weights", True), ("--classes", "classes", True),
                                ("--preprocess", "preprocess", False), ("--input-size", "input_size", False)):
        value = getattr(args, dest)
        if value is not None:
            argv += [flag, absolute(value) if is_path else str(value)]
    if args.other_activations != "error":
        argv += ["--other-activations", args.other_activations]
    for flag, dest in (("--mean", "mean"), ("--std", "std")):
        if getattr(args, dest) is not None:
            argv += [flag, ",".join(str(v) for v in getattr(args, dest))]
    return argv


def cmd_report(args) -> None:
    from .model_report import model_report

    subject = _subject(args)  # fails fast on a bad spec, before any step runs
    images = min(args.images, len(subject.open_data(args.data)))
    inputs = subject.files() + ([args.classes] if args.classes else [])
    model_report(args.out, _model_argv(args), inputs, args.data, subject.describe(), images=images,
                 limit=args.limit, target=args.target)


def cmd_serve(args) -> None:
    try:
        import uvicorn  # noqa: F401 - checked here so that a missing extra is a one-line error, exit 2

        from .serve import serve
    except ImportError as e:
        raise UserError(f"serve needs the 'serve' extra ({e.name} is missing): pip install -e '.[serve]'") from None
    subject = _subject(args)
    serve(subject, args.data, host=args.host, port=args.port, limit=args.limit,
          layers=_default_layers(subject, args.layers), atlas=args.atlas)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="deconvnet", description="Visualise and understand convnets (Zeiler & Fergus 2014).")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("train", help="train a model with the paper's recipe (Sec. 3)")
    p.add_argument("--model", default="zfnet-small", help="zfnet, alexnet, zfnet-small or alexnet-small")
    p.add_argument("--data", default="fashion-mnist", help="fashion-mnist, digits or folder:PATH")
    p.add_argument("--val", default=None, help="validation data (default: fashion-mnist:test, or 10%% held out)")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--recipe", choices=["paper", "small"], default=None,
                   help="'paper' = Sec. 3 exactly (default for zfnet/alexnet); 'small' = tuned for 28 px")
    p.add_argument("--epochs", type=_positive_int, default=None,
                   help="epochs (default: the recipe's, 30 small / 70 paper); with --time-budget, the most it may run")
    p.add_argument("--time-budget", type=float, default=None, metavar="MINUTES",
                   help="measure this machine's speed, then train as many epochs as end within MINUTES "
                        "(evaluation included; at most --epochs)")
    p.add_argument("--batch-size", type=_positive_int, default=128)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--dropout", type=float, default=None, help="dropout in fc6/fc7 (default 0.5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=_positive_int, default=None, help="use only the first N images (quick runs)")
    p.add_argument("--snapshots", type=_int_list, default=None,
                   help="epochs to keep checkpoints of (default: 1,2,5,10,20,30,40,64 and the last)")
    p.add_argument("--no-renorm", action="store_true", help="turn off the RMS renormalisation (Fig. 6a)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--checkpoint-every", type=int, default=200, help="steps between resumable checkpoints")
    p.add_argument("--workers", type=int, default=0, help="data loading processes (folder data)")
    p.add_argument("--no-ten-crop", action="store_true",
                   help="skip the final 10-crop evaluation (Sec. 3); the center-crop accuracy is still measured")
    p.add_argument("--label-smoothing", type=float, default=None, help="label smoothing of the loss")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="auto: bf16 autocast where the CPU/GPU computes bf16 natively (~2x faster), else fp32")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="top-1/top-5 accuracy of a model on labelled data, as JSON")
    _add_model_args(p)
    p.add_argument("--data", required=True)
    p.add_argument("--limit", type=_positive_int, default=None)
    p.add_argument("--ten-crop", action="store_true", help="average the softmax over the 10 crops (Sec. 3)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("occlude", help="occlusion sensitivity of one or more images (Fig. 7)")
    _add_image_args(p, 1)
    p.add_argument("--target", default=None, help="class to map p() of (name or number; default: the label)")
    p.add_argument("--size", type=int, default=None, help="square side in pixels (default 35/224 of the image)")
    p.add_argument("--stride", type=int, default=None, help="square step in pixels (default 14/224 of the image)")
    p.add_argument("--layer", default=None,
                   help="layer whose strongest feature map is followed (b, c); default conv5 or the model's top stage")
    p.set_defaults(func=cmd_occlude)

    p = sub.add_parser("invariance", help="feature and output changes under translation, scale, rotation (Fig. 5)")
    _add_image_args(p, 5)
    p.add_argument("--layers", type=_name_list, default=None, help="low,high layer (default: layers 1 and 7)")
    p.add_argument("--translations", type=_float_list, default=None,
                   help="vertical shifts in pixels, e.g. --translations=-4,0,4")
    p.add_argument("--scales", type=_float_list, default=None, help="scale factors")
    p.add_argument("--rotations", type=_float_list, default=None, help="rotations in degrees")
    p.set_defaults(func=cmd_invariance)

    p = sub.add_parser("correspond", help="part correspondence: sign changes when masking parts (Table 1)")
    _add_image_args(p, 5)
    p.add_argument("--class", dest="class_name", default=None,
                   help="take the first --count images of this class from --data (e.g. Sneaker)")
    p.add_argument("--count", type=_positive_int, default=5, help="number of images (default 5)")
    p.add_argument("--parts", default=None, help='JSON file: {"part": [top, left, bottom, right] or one per image}')
    p.add_argument("--part", type=_named_box, action="append", default=None, metavar="NAME=T,L,B,R",
                   help="a part's box in every image (repeatable)")
    p.add_argument("--layers", type=_name_list, default=None, help="layers (default: layers 5 and 7)")
    p.add_argument("--repeats", type=_positive_int, default=5, help="random draws per part size for the control")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_correspond)

    p = sub.add_parser("topk", help="top-k activations per feature map over a dataset and the Fig. 2 gallery")
    _add_topk_args(p)
    p.add_argument("--maps", type=_positive_int, default=9, help="feature maps drawn per layer, chosen at random")
    p.add_argument("--seed", type=int, default=0, help="seed of the random choice of maps")
    p.add_argument("--out", required=True, help="output directory (gallery-LAYER.png + topk.json)")
    p.set_defaults(func=cmd_topk)

    p = sub.add_parser("atlas", help="Fig. 2 for every feature map: a static site, LAYER.html#MAP per map")
    _add_topk_args(p)
    p.add_argument("--out", required=True, help="output directory (index.html, LAYER.html, LAYER/MAP.png); "
                                                "a rerun resumes or reuses it")
    p.set_defaults(func=cmd_atlas)

    p = sub.add_parser("project", help="project one activation to pixels with the deconvnet (Sec. 2.1)")
    _add_model_args(p)
    p.add_argument("--image", nargs=1, metavar="PATH", default=None, help="a PNG/JPEG image")
    p.add_argument("--data", default=None, help="data spec to take the image from, with --index")
    p.add_argument("--index", type=_int_list, default=None, help="image index in --data (default 0)")
    p.add_argument("--layer", required=True, help="layer name, e.g. conv5 or layer3.1.relu_1 (see inspect)")
    p.add_argument("--unit", type=_int_list, default=None,
                   help="channel,y,x in the layer's output (default: the layer's strongest activation)")
    p.add_argument("--rule", choices=["deconvnet", "guided", "gradient"], default="deconvnet")
    p.add_argument("--out", required=True, help="output PNG (a JSON with the value and box goes beside it)")
    p.set_defaults(func=cmd_project)

    p = sub.add_parser("ablate", help="train Table 3's variants (removed / resized layers) and compare errors")
    p.add_argument("--model", default="zfnet-small", help="the model the variants change")
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--epochs", type=_positive_int, default=None, help="epochs per variant (default: the recipe's)")
    p.add_argument("--limit", type=_positive_int, default=None, help="use only the first N images (demo: 20000)")
    p.add_argument("--batch-size", type=_positive_int, default=128)
    p.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default: the recipe's; short budgets need less, demo 0.02)")
    p.add_argument("--variants", type=_name_list, default=None, help="a subset of the variants (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="directory: one run per variant, ablation.png + ablation.json")
    p.set_defaults(func=cmd_ablate)

    p = sub.add_parser("compare", help="layer-1 filters and layer-2 projections of several runs (Fig. 6)")
    p.add_argument("--runs", type=_name_list, required=True, help="run directories or checkpoints, comma-separated")
    p.add_argument("--data", default=None, help="images for the layer-2 projections (default: each run's test data)")
    p.add_argument("--limit", type=_positive_int, default=1000, help="search the first N images for the strongest activations")
    p.add_argument("--maps", type=_positive_int, default=16, help="layer-2 maps projected, chosen at random")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output directory (architecture.png + architecture.json)")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("transfer", help="fixed pretrained layers 1-7 + a new softmax vs training from scratch "
                                        "(Tables 4/5, Fig. 9)")
    _add_target_args(p, "1,2,3,5,10,15,30")
    p.add_argument("--scratch-steps", type=_positive_int, default=300,
                   help="SGD steps of each from-scratch training (default 300; demo 100)")
    p.add_argument("--out", required=True, help="output directory (transfer.png + transfer.json)")
    p.set_defaults(func=cmd_transfer)

    p = sub.add_parser("layers", help="a linear SVM and a softmax on each layer's features (Table 7)")
    _add_target_args(p, "15,30")
    p.add_argument("--out", required=True, help="output directory (layers.png + layers.json)")
    p.set_defaults(func=cmd_layers)

    p = sub.add_parser("evolution", help="strongest activations projected at each training snapshot (Fig. 4)")
    p.add_argument("--run", required=True, help="training run directory with checkpoints/epoch-K.pt")
    p.add_argument("--data", default=None, help="images searched (default: the run's training data)")
    p.add_argument("--limit", type=_positive_int, default=2000, help="search the first N images (default 2000)")
    p.add_argument("--maps", type=_positive_int, default=5, help="feature maps per layer, chosen at random")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output directory (evolution-layerN.png, evolution.png/json)")
    p.set_defaults(func=cmd_evolution)

    p = sub.add_parser("inspect", help="list every layer a command accepts: type, output shape, receptive field")
    _add_model_args(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("report", help="Fig. 2, 5, 7 (and Table 7 with --target) for your model as one HTML page")
    _add_model_args(p)
    p.add_argument("--data", required=True, help="your images: folder:PATH (one folder per class) or another data spec")
    p.add_argument("--target", default=None, help="labelled data for Table 7's per-layer probes (folder:PATH)")
    p.add_argument("--images", type=_positive_int, default=5, help="images for Fig. 5 (and up to 3 for Fig. 7)")
    p.add_argument("--limit", type=_positive_int, default=None, help="Fig. 2 over the first N images only")
    p.add_argument("--out", required=True, help="output directory (index.html + one folder per step, cached)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("serve", help="the interactive viewer: a local web app over a model and a data set")
    _add_model_args(p)
    p.add_argument("--data", default=None, help="data set shown (default: the checkpoint's validation data)")
    p.add_argument("--layers", type=_name_list, default=None, help="layers shown (default: conv1..conv5 or the model's stages)")
    p.add_argument("--atlas", default=None, metavar="DIR",
                   help="a `deconvnet atlas` site of this model: each feature map links to its page there")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--limit", type=_positive_int, default=5000, help="top-k over the first N images (default 5000)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("reproduce", help="run the whole paper (cached steps) and write DIR/index.html")
    p.add_argument("--out", default="report", help="output directory (default: report/)")
    p.add_argument("--quick", action="store_true", help="tiny settings for every step (a few minutes)")
    p.add_argument("--full", action="store_true", help="the longer fixed budgets (about 1.5 hours on 2 CPU cores)")
    p.add_argument("--data", default="fashion-mnist", help="training data (default fashion-mnist)")
    p.add_argument("--model", default="zfnet-small", help="model trained and analysed (default zfnet-small)")
    p.add_argument("--time-budget", type=float, default=None, metavar="MINUTES",
                   help="end within MINUTES (default 20): every step is sized from one measurement of "
                        "this machine's speed, cached in DIR/calibration.json")
    p.set_defaults(func=cmd_reproduce)
    return parser


def cmd_reproduce(args) -> None:
    from .reproduce import reproduce

    if args.quick and args.full:
        raise UserError("--quick and --full exclude each other")
    reproduce(args.out, quick=args.quick, data=args.data, model=args.model, full=args.full,
              minutes=args.time_budget)


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        args.func(args)
    except UserError as e:
        msg = str(e)
        print(msg if msg.startswith("deconvnet") else f"deconvnet: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("deconvnet: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
