"""The ``deconvnet`` command: argv parsed into a call of :mod:`deconvnet.commands` (each option's
name is the function's parameter).

User mistakes print one line ``deconvnet: error: ...`` and exit with status 2.
"""
from __future__ import annotations

import argparse
import math
import sys

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


def _add_target_args(p: argparse.ArgumentParser, per_class: str) -> None:
    """The transfer protocol's arguments (Sec. 5.2), shared by ``transfer`` and ``layers``."""
    _add_model_args(p)
    p.add_argument("--target", default="digits",
                   help="target data: digits, a class subset such as fashion-mnist[2,3,6,7,8]:test (the classes "
                        "B of a model pretrained on fashion-mnist[0,1,4,5,9]), or folder:PATH (e.g. Caltech-101)")
    p.add_argument("--per-class", type=_int_list, default=_int_list(per_class),
                   help=f"training images per class (default {per_class})")
    p.add_argument("--folds", type=int, default=5, help="random train/test folds (default 5)")
    p.add_argument("--pretrain-data", default=None,
                   help="data searched for target images it also holds (default: the checkpoint's training data)")
    p.add_argument("--seed", type=int, default=0)


def cmd_report(out: str, data: str, target: str | None = None, images: int = 30, limit: int | None = None,
               **model) -> None:
    from .commands import absolute_model_options, subject_of
    from .model_report import model_report

    subject = subject_of(model)  # fails fast on a bad spec, before any step runs
    images = min(images, len(subject.open_data(data)))
    inputs = subject.files() + ([model["classes"]] if model.get("classes") else [])
    model_report(out, absolute_model_options(model), inputs, data, subject.describe(), images=images, limit=limit,
                 target=target)


def build_parser() -> argparse.ArgumentParser:
    from . import commands

    parser = _Parser(prog="deconvnet", description="Visualise and understand convnets (Zeiler & Fergus 2014).")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("train", help="train a model with the paper's recipe (Sec. 3)")
    p.add_argument("--model", default="zfnet-small", help="zfnet, alexnet, zfnet-small or alexnet-small")
    p.add_argument("--data", default="fashion-mnist",
                   help="fashion-mnist, a class subset such as fashion-mnist[0,1,4,5,9], digits or folder:PATH")
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
    p.set_defaults(func=commands.train)

    p = sub.add_parser("evaluate", help="top-1/top-5 accuracy of a model on labelled data, as JSON")
    _add_model_args(p)
    p.add_argument("--data", required=True)
    p.add_argument("--limit", type=_positive_int, default=None)
    p.add_argument("--ten-crop", action="store_true", help="average the softmax over the 10 crops (Sec. 3)")
    p.set_defaults(func=commands.evaluate)

    p = sub.add_parser("occlude", help="occlusion sensitivity of one or more images (Fig. 7)")
    _add_image_args(p, 1)
    p.add_argument("--count", type=_positive_int, default=None,
                   help="take the first N images of --data (instead of --index); the findings are over all")
    p.add_argument("--draw", type=int, default=None, metavar="K",
                   help="draw the panels (occlusion-NAME.png) of the first K images only (default: all)")
    p.add_argument("--target", default=None, help="class to map p() of (name or number; default: the label)")
    p.add_argument("--size", type=int, default=None, help="square side in pixels (default 35/224 of the image)")
    p.add_argument("--stride", type=int, default=None, help="square step in pixels (default 14/224 of the image)")
    p.add_argument("--layer", default=None,
                   help="layer whose strongest feature map is followed (b, c); default conv5 or the model's top stage")
    p.set_defaults(func=commands.occlude)

    p = sub.add_parser("invariance", help="feature and output changes under translation, scale, rotation (Fig. 5)")
    _add_image_args(p, 5)
    p.add_argument("--count", type=_positive_int, default=None,
                   help="take the first N images of --data (default 5, instead of --index)")
    p.add_argument("--layers", type=_name_list, default=None, help="low,high layer (default: layers 1 and 7)")
    p.add_argument("--translations", type=_float_list, default=None,
                   help="vertical shifts in pixels, e.g. --translations=-4,0,4")
    p.add_argument("--scales", type=_float_list, default=None, help="scale factors")
    p.add_argument("--rotations", type=_float_list, default=None, help="rotations in degrees")
    p.set_defaults(func=commands.invariance)

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
    p.set_defaults(func=commands.correspond)

    p = sub.add_parser("topk", help="top-k activations per feature map over a dataset and the Fig. 2 gallery")
    _add_topk_args(p)
    p.add_argument("--maps", type=_positive_int, default=9, help="feature maps drawn per layer, chosen at random")
    p.add_argument("--seed", type=int, default=0, help="seed of the random choice of maps")
    p.add_argument("--out", required=True, help="output directory (gallery-LAYER.png + topk.json)")
    p.set_defaults(func=commands.topk)

    p = sub.add_parser("atlas", help="Fig. 2 for every feature map: a static site, LAYER.html#MAP per map")
    _add_topk_args(p)
    p.add_argument("--out", required=True, help="output directory (index.html, LAYER.html, LAYER/MAP.png); "
                                                "a rerun resumes or reuses it")
    p.set_defaults(func=commands.atlas)

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
    p.set_defaults(func=commands.project)

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
    p.add_argument("--baseline-seeds", type=_int_list, default=None,
                   help="train the baseline again with these seeds (e.g. 1,2) to measure the seed noise the "
                        "variants' differences are judged against")
    p.add_argument("--out", required=True, help="directory: one run per variant, ablation.png + ablation.json")
    p.set_defaults(func=commands.ablate)

    p = sub.add_parser("compare", help="layer-1 filters and layer-2 projections of several runs (Fig. 6)")
    p.add_argument("--runs", type=_name_list, required=True, help="run directories or checkpoints, comma-separated")
    p.add_argument("--data", default=None, help="images for the layer-2 projections (default: each run's test data)")
    p.add_argument("--limit", type=_positive_int, default=1000, help="search the first N images for the strongest activations")
    p.add_argument("--maps", type=_positive_int, default=16, help="layer-2 maps projected, chosen at random")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seed-noise", default=None, metavar="ABLATION_JSON",
                   help="ablation.json of `deconvnet ablate --baseline-seeds`: the seed spread the accuracy "
                        "difference is judged against")
    p.add_argument("--out", required=True, help="output directory (architecture.png + architecture.json)")
    p.set_defaults(func=commands.compare)

    p = sub.add_parser("transfer", help="fixed pretrained layers 1-7 + a new softmax vs training from scratch "
                                        "(Tables 4/5, Fig. 9)")
    _add_target_args(p, "1,2,3,5,10,15,30")
    p.add_argument("--scratch-steps", type=_positive_int, default=300,
                   help="SGD steps of each from-scratch training (default 300; demo 100)")
    p.add_argument("--out", required=True, help="output directory (transfer.png + transfer.json)")
    p.set_defaults(func=commands.transfer)

    p = sub.add_parser("layers", help="a linear SVM and a softmax on each layer's features (Table 7)")
    _add_target_args(p, "15,30")
    p.add_argument("--out", required=True, help="output directory (layers.png + layers.json)")
    p.set_defaults(func=commands.layers)

    p = sub.add_parser("evolution", help="strongest activations projected at each training snapshot (Fig. 4)")
    p.add_argument("--run", required=True, help="training run directory with checkpoints/epoch-K.pt")
    p.add_argument("--data", default=None, help="images searched (default: the run's training data)")
    p.add_argument("--limit", type=_positive_int, default=2000, help="search the first N images (default 2000)")
    p.add_argument("--maps", type=_positive_int, default=5, help="feature maps per layer, chosen at random")
    p.add_argument("--probe", type=_positive_int, default=500,
                   help="images of the run's validation data on which each layer's CKA is measured (default 500)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output directory (evolution-layerN.png, evolution.png/json, "
                                                "evolution-cka.png)")
    p.set_defaults(func=commands.evolution)

    p = sub.add_parser("inspect", help="list every layer a command accepts: type, output shape, receptive field")
    _add_model_args(p)
    p.add_argument("--json", dest="json_output", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=commands.inspect)

    p = sub.add_parser("report", help="Fig. 2, 5, 7 (and Table 7 with --target) for your model as one HTML page")
    _add_model_args(p)
    p.add_argument("--data", required=True, help="your images: folder:PATH (one folder per class) or another data spec")
    p.add_argument("--target", default=None, help="labelled data for Table 7's per-layer probes (folder:PATH)")
    p.add_argument("--images", type=_positive_int, default=30,
                   help="images for the statistics of Fig. 5 and Fig. 7 (panels drawn for up to 3)")
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
    p.set_defaults(func=commands.serve)

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




def cmd_reproduce(out: str, quick: bool, full: bool, data: str, model: str, time_budget: float | None) -> None:
    from .reproduce import reproduce

    if quick and full:
        raise UserError("--quick and --full exclude each other")
    reproduce(out, quick=quick, data=data, model=model, full=full, minutes=time_budget)


def main(argv: list[str] | None = None) -> int:
    try:
        options = vars(build_parser().parse_args(argv))
        options.pop("command")
        options.pop("func")(**options)
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
