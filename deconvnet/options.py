"""The options of every command, declared once: as the parameters of the command functions of
:mod:`deconvnet.commands` (name, type, default) with their help in the function's docstring
(``Args:``). The CLI's parser, the equivalent command lines written into reports and the option
lists of the docs are all read from there.

A parameter's type says how it reads on the command line: ``str``, ``int``, ``float``, a ``bool``
switch (``--name`` when it defaults to False, ``--no-name`` when it defaults to True), and lists as
comma-separated values (``--layers conv1,conv2``). Where that is not enough, ``Annotated[type,
Flag(...)]`` adds a flag name, choices, a metavar, "one or more files" or a repeatable parsed value.
A function's ``**model`` stands for the options of :func:`model_options`, the model under study.
"""
from __future__ import annotations

import inspect
import math
import re
import types
import typing
from dataclasses import MISSING, dataclass, fields, is_dataclass
from typing import Annotated, Any, Callable

from .deconvnet import OTHER_ACTIVATIONS
from .subject import PREPROCESSING


@dataclass(frozen=True)
class Flag:
    """How an option reads on the command line where its type does not say it all."""

    name: str | None = None  # the flag where it is not --the-parameter-name
    choices: tuple = ()
    positive: bool = False
    metavar: str | None = None
    files: bool = False  # one or more values after the flag: --image a.png b.png
    repeat: Callable[[str], Any] | None = None  # repeatable, each value parsed by this function


Positive = Annotated[int, Flag(positive=True)]
Files = Annotated[list[str] | None, Flag(files=True, metavar="PATH")]
Out = Annotated[str, Flag(metavar="DIR")]
Json = Annotated[bool, Flag(name="--json")]

# Help for the options many commands share, where their docstrings do not say more.
SHARED_HELP = {"json_output": "print the result as JSON (for scripts) instead of one line",
               "workers": "processes decoding folder images for the pass over the data (default: one per core "
                          "but one, at most 8; 0: in the main process)",
               "batch_size": "images per forward pass",
               "device": "auto (CUDA when available), cpu, cuda or cuda:N: where the model runs",
               # the transfer protocol of Sec. 5.2 (transfer, layer-features)
               "target": "target data: digits, a class subset such as fashion-mnist[2,3,6,7,8]:test (the classes B "
                         "of a model pretrained on fashion-mnist[0,1,4,5,9]), or folder:PATH (e.g. Caltech-101)",
               "per_class": "training images per class",
               "folds": "random train/test folds",
               "pretrain_data": "data searched for target images it also holds (default: the checkpoint's "
                                "training data)"}


@dataclass
class Option:
    """One option of a command: its parameter ``name``, ``flag``, value ``kind`` (``str``, ``int``,
    ``float``, ``bool``, ``list[int]``, ...), ``default`` (``MISSING``: required) and ``help``."""

    name: str
    flag: str
    kind: Any
    default: Any
    help: str
    spec: Flag

    @property
    def required(self) -> bool:
        return self.default is MISSING

    @property
    def switch(self) -> bool:
        return self.kind is bool


def _unwrap(hint) -> tuple[Any, Flag]:
    """``Annotated[X | None, Flag]`` (or ``Annotated[X, Flag] | None``) -> ``(X, Flag)``."""
    spec = Flag()
    while True:
        origin = typing.get_origin(hint)
        if origin is Annotated:
            hint, *extras = typing.get_args(hint)
            spec = next((e for e in extras if isinstance(e, Flag)), spec)
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(hint) if a is not type(None)]
            if len(args) != 1:
                return hint, spec
            hint = args[0]
        else:
            return hint, spec


def docstring_args(obj) -> dict[str, str]:
    """The ``Args:`` section of ``obj``'s docstring: ``{name: help}``, continuation lines joined."""
    doc = inspect.getdoc(obj) or ""
    helps: dict[str, str] = {}
    inside, current, indent = False, None, None
    for line in doc.splitlines():
        if line.strip() == "Args:":
            inside = True
            continue
        if not inside:
            continue
        if line and not line.startswith(" "):
            break  # the next section
        if not line.strip():
            continue
        depth = len(line) - len(line.lstrip())
        match = re.match(r"\s*(\w+):\s*(.*)", line)
        if match and (indent is None or depth <= indent):
            indent, current = depth, match.group(1)
            helps[current] = match.group(2).strip()
        elif current:
            helps[current] += " " + line.strip()
    return helps


def summary(obj) -> str:
    """The first line of ``obj``'s docstring."""
    return (inspect.getdoc(obj) or "").split("\n", 1)[0].rstrip(".")


def options_of(function: Callable, flags: dict[str, str] | None = None) -> list[Option]:
    """Every option of a command function, in order; ``**model`` expands to :func:`model_options`,
    ``**config`` to the documented fields of the dataclass named in the function's ``CONFIG``."""
    hints = typing.get_type_hints(function, include_extras=True)
    helps = docstring_args(function)
    found: list[Option] = []
    for parameter in inspect.signature(function).parameters.values():
        if parameter.kind is parameter.VAR_KEYWORD:
            if parameter.name == "model":
                found += options_of(model_options)
            elif parameter.name == "config":
                found += dataclass_options(function.CONFIG)
            continue
        kind, spec = _unwrap(hints.get(parameter.name, str))
        default = MISSING if parameter.default is parameter.empty else parameter.default
        help = helps.get(parameter.name) or SHARED_HELP.get(parameter.name, "")
        found.append(_option(parameter.name, kind, spec, default, help))
    return found


def dataclass_options(cls) -> list[Option]:
    """The fields of a dataclass that its docstring documents (``Args:``), as options."""
    assert is_dataclass(cls)
    hints = typing.get_type_hints(cls, include_extras=True)
    helps = docstring_args(cls)
    found = []
    for f in fields(cls):
        if f.name not in helps:
            continue  # undocumented fields are internal
        kind, spec = _unwrap(hints[f.name])
        default = f.default if f.default is not MISSING else f.default_factory()
        found.append(_option(f.name, kind, spec, default, helps[f.name]))
    return found


def _option(name: str, kind, spec: Flag, default, help: str) -> Option:
    if spec.name:
        flag = spec.name
    elif kind is bool and default is True:
        flag = "--no-" + name.replace("_", "-")
    else:
        flag = "--" + name.replace("_", "-")
    return Option(name, flag, kind, default, help, spec)


def words(option: Option, value) -> list[str]:
    """The command-line words giving ``option`` the ``value`` ([] where it is the default or None)."""
    if value is None or (option.switch and value == option.default):
        return []
    if option.switch:
        return [option.flag]
    if isinstance(value, (list, tuple)):
        if option.spec.files:
            return [option.flag, *[str(v) for v in value]]
        if option.spec.repeat:
            return [w for v in value for w in (option.flag, _joined(v))]
        return [option.flag, ",".join(str(v) for v in value)]
    return [option.flag, str(value)]


def _joined(value) -> str:
    """A repeated value back as it was typed (``NAME=T,L,B,R``)."""
    if isinstance(value, (list, tuple)) and len(value) == 2 and isinstance(value[1], (list, tuple)):
        return f"{value[0]}=" + ",".join(str(v) for v in value[1])
    return str(value)


# ----------------------------------------------------------------------------- value parsers

def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise ValueError(f"expected a positive integer, got {value}")
    return value


def int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"expected comma-separated integers, got {text!r}") from None


def float_list(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = [math.nan]
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"expected comma-separated finite numbers, got {text!r}")
    return values


def name_list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def named_box(text: str) -> tuple[str, list[int]]:
    name, _, box = text.partition("=")
    values = int_list(box)
    if not name or len(values) != 4:
        raise ValueError(f"expected NAME=TOP,LEFT,BOTTOM,RIGHT, got {text!r}")
    return name, values


def parser_for(option: Option) -> Callable[[str], Any] | None:
    """The function turning one command-line word into the option's value."""
    if option.spec.repeat:
        return option.spec.repeat
    if option.spec.files:
        return str
    kind = option.kind
    origin = typing.get_origin(kind)
    if origin in (list, tuple):
        inner = (typing.get_args(kind) or (str,))[0]
        return {int: int_list, float: float_list}.get(inner, name_list)
    if kind is list:
        return name_list
    if kind is int:
        return positive_int if option.spec.positive else int
    if kind is float:
        return _finite
    return None  # str


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"expected a finite number, got {text!r}")
    return value


# ----------------------------------------------------------------------------- the model under study

def model_options(model_spec: Annotated[str | None, Flag(name="--model", metavar="SPEC")] = None,
                  checkpoint: Annotated[str | None, Flag(metavar="CKPT")] = None,
                  weights: Annotated[str | None, Flag(metavar="FILE")] = None,
                  classes: Annotated[str | None, Flag(metavar="FILE")] = None,
                  preprocess: Annotated[str | None, Flag(choices=PREPROCESSING)] = None,
                  input_size: Positive | None = None, mean: list[float] | None = None,
                  std: list[float] | None = None,
                  other_activations: Annotated[str, Flag(choices=OTHER_ACTIVATIONS)] = "error",
                  device: str = "auto") -> dict:
    """The model under study, the options of every command that analyses one (see
    :func:`deconvnet.subject.load_subject`).

    Args:
        model_spec: a deconvnet checkpoint (.pt or run directory), torchvision:NAME (with constructor
            arguments: torchvision:resnet18?num_classes=2), package.module:CALLABLE or path/to/file.py:CALLABLE
        checkpoint: a deconvnet checkpoint (same as --model CKPT)
        weights: state_dict file (or a dict holding one under state_dict/model); module. prefixes stripped
        classes: class names: one per line, a JSON list, or ImageNet's {"0": ["n01440764", "tench"]} index
        preprocess: imagenet (default): short side 256, center crop 224, ImageNet mean/std; unit: [0, 1]
            pixels at the input size
        input_size: the model's input size (default 224)
        mean: per-channel mean on [0, 1] pixels, e.g. 0.5,0.5,0.5
        std: per-channel std on [0, 1] pixels
        other_activations: projections through ReLU6/SiLU/GELU/Hardswish/...: error (default; the paper has
            no rule for them) or gradient (they act as in back-propagation)
    """
    return dict(locals())


MODEL_OPTIONS = tuple(inspect.signature(model_options).parameters)
