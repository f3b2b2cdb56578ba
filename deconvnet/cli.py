"""The ``deconvnet`` command: argv parsed into a call of :mod:`deconvnet.commands`.

The parser is built from the command functions themselves (:mod:`deconvnet.options`): each option is
a parameter, its help the parameter's line in the docstring. User mistakes print one line
``deconvnet: error: ...`` and exit with status 2.
"""
from __future__ import annotations

import argparse
import sys

from .errors import UserError

# The commands, in the order ``deconvnet --help`` lists them (each a function of deconvnet.commands).
COMMANDS = ("train", "evaluate", "topk", "atlas", "project", "occlusion", "invariance", "correspondence", "evolution",
            "architecture", "ablation", "transfer", "layer_features", "sanity", "inspect", "report", "serve",
            "reproduce")
# Earlier names of commands, still accepted with a deprecation line.
ALIASES = {"occlude": "occlusion", "correspond": "correspondence", "compare": "architecture",
           "layers": "layer-features", "ablate": "ablation"}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse prints usage + error by default)
        raise UserError(f"{self.prog}: {message}")


def _typed(parse):
    """``parse`` with its ValueError turned into argparse's one-line error."""
    def convert(text: str):
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    convert.__name__ = getattr(parse, "__name__", "value")
    return convert


def add_options(p: argparse.ArgumentParser, function) -> None:
    """One argument per option of ``function`` (:func:`deconvnet.options.options_of`); the options of
    the model under study go in their own group."""
    from .options import MODEL_OPTIONS, options_of, parser_for

    group = None
    for o in options_of(function):
        target = p
        if o.name in MODEL_OPTIONS:
            group = group or p.add_argument_group("model under study")
            target = group
        text = o.help + ("" if o.required or o.default in (None, False, True, ()) or "default" in o.help
                         else f" (default {','.join(map(str, o.default)) if isinstance(o.default, (list, tuple)) else o.default})")
        kwargs = {"dest": o.name, "help": text.replace("%", "%%")}
        if o.switch:
            kwargs["action"] = "store_false" if o.default is True else "store_true"
        else:
            parse = parser_for(o)
            if parse is not None:
                kwargs["type"] = _typed(parse)
            if o.spec.choices:
                kwargs["choices"] = list(o.spec.choices)
            if o.spec.metavar:
                kwargs["metavar"] = o.spec.metavar
            if o.spec.files:
                kwargs["nargs"] = "+"
            if o.spec.repeat:
                kwargs["action"] = "append"
            if o.required:
                kwargs["required"] = True
            else:
                kwargs["default"] = list(o.default) if isinstance(o.default, tuple) else o.default
        target.add_argument(o.flag, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    from . import commands
    from .options import summary

    parser = _Parser(prog="deconvnet", description="Visualise and understand convnets (Zeiler & Fergus 2014).")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    old_names = {new: [old for old, n in ALIASES.items() if n == new] for new in ALIASES.values()}
    for name in COMMANDS:
        function = getattr(commands, name)
        command = name.replace("_", "-")
        p = sub.add_parser(command, help=summary(function), description=summary(function) + ".",
                           aliases=old_names.get(command, []))
        add_options(p, function)
        p.set_defaults(func=function)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv and argv[0] in ALIASES:
            print(f"deconvnet: `{argv[0]}` is now `{ALIASES[argv[0]]}`; the old name will be removed in the next "
                  "release", file=sys.stderr)
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
