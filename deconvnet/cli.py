"""The ``deconvnet`` command: a thin layer over the functions a notebook user calls.

User mistakes print one line ``deconvnet: error: ...`` and exit with status 2.
"""
from __future__ import annotations

import argparse
import json
import sys

from .errors import UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse prints usage + error by default)
        raise UserError(f"{self.prog}: {message}")


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
                      checkpoint_every=args.checkpoint_every, workers=args.workers)
    final = train(cfg, args.out, resume=args.resume)
    print(json.dumps({"run": str(args.out), **final}))


def cmd_evaluate(args) -> None:
    from .checkpoint import load_checkpoint
    from .data import open_source
    from .train import evaluate

    model, info = load_checkpoint(args.checkpoint)
    source = open_source(args.data, info.preprocess.stored_size, info.preprocess.channels)
    _check_classes(source.classes, info.classes, args.data)
    indices = None if args.limit is None else list(range(min(args.limit, len(source))))
    result = evaluate(model, source, info.preprocess, indices, ten_crop=args.ten_crop)
    print(json.dumps({"top1": result["top1"], "top5": result["top5"], "n": result["n"]}))


def _check_classes(data_classes: list[str], model_classes: list[str], spec: str) -> None:
    if list(data_classes) != list(model_classes):
        raise UserError(f"{spec} has classes {data_classes[:5]}... but the checkpoint was trained on "
                        f"{model_classes[:5]}...")


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
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--dropout", type=float, default=None, help="dropout in fc6/fc7 (default 0.5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="use only the first N images (quick runs)")
    p.add_argument("--snapshots", type=_int_list, default=None,
                   help="epochs to keep checkpoints of (default: 1,2,5,10,20,30,40,64 and the last)")
    p.add_argument("--no-renorm", action="store_true", help="turn off the RMS renormalisation (Fig. 6a)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--checkpoint-every", type=int, default=200, help="steps between resumable checkpoints")
    p.add_argument("--workers", type=int, default=0, help="data loading processes (folder data)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="top-1/top-5 accuracy of a checkpoint, as JSON")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--ten-crop", action="store_true", help="average the softmax over the 10 crops (Sec. 3)")
    p.set_defaults(func=cmd_evaluate)
    return parser


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
