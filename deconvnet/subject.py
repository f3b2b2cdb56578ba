"""The model under study: the network, how to turn a user's image into its input (and back into pixels
to draw), its class names and the layers an analysis uses by default.

Every analysis, command, the viewer and the report take one. It is made from a *model spec*:

- a checkpoint written by ``deconvnet train`` (a ``.pt`` file or a run directory): it carries
  everything, the paper's mean-image preprocessing (Sec. 3) included;
- ``torchvision:NAME``: any constructor in ``torchvision.models``, built with ``weights=None``; its
  number of classes follows the weights file (or the class-name file), and constructor arguments go
  after a ``?``: ``torchvision:resnet18?num_classes=2``, ``torchvision:googlenet?aux_logits=false``;
- ``package.module:CALLABLE`` or ``path/to/file.py:CALLABLE``: a function or class returning an
  ``nn.Module``;

plus, for the last two, a weights file (a state_dict, or a dict holding one under ``state_dict`` or
``model``; ``module.`` prefixes from DataParallel are stripped), a class-name file and the
preprocessing (``imagenet``: short side 256, center crop 224, per-channel mean/std).
"""
from __future__ import annotations

import difflib
import importlib
import importlib.util
import json
import math
import sys
from dataclasses import dataclass, field
from typing import Callable
from pathlib import Path

import torch
from torch import nn

from .checkpoint import CheckpointInfo, load_checkpoint
from .data import Preprocess, Source, load_image, open_source
from .errors import UserError
from .features import feature_layers
from .models import CONV_NAMES, ConvNet
from .geometry import layer_calls
from .probe import LayerCall, input_channels

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PREPROCESSING = ("imagenet", "unit")
_DROPOUT = (nn.Dropout, nn.Dropout2d, nn.Dropout1d, nn.AlphaDropout, nn.Identity, nn.Flatten)


@dataclass
class Subject:
    """The model under study (see the module docstring).

    ``stages``: the spatial layers shown by default, bottom to top (``conv1`` .. ``conv5`` for our
    models; for others the output of each resolution stage, e.g. ResNet's ``relu``, ``layer1`` ..
    ``layer4``). ``layer_numbers``: the paper's "layer n" (1..7) for the analyses that name layers by
    number (Fig. 5, Table 1, Table 7): ours as in Fig. 3; for others the stages numbered from 1 and
    the penultimate layer as 7. ``info``: the checkpoint's record, for our checkpoints only.
    """

    model: nn.Module
    preprocess: Preprocess
    classes: list[str]
    spec: str
    stages: list[str]
    layer_numbers: dict[int, str]
    weights: str | None = None
    info: CheckpointInfo | None = None
    other_activations: str = "error"  # projections through ReLU6/SiLU/GELU/...: refuse, or as the gradient
    aliases: dict[str, int] = field(default_factory=dict)  # other names of classes (ImageNet's WordNet ids)
    _calls: list[LayerCall] | None = field(default=None, repr=False)  # the traced calls, once
    _said: set = field(default_factory=set, repr=False)  # default layer choices already said on stderr

    @property
    def name(self) -> str:
        """A short name for titles: the architecture of our checkpoints, else the spec."""
        return self.info.config.name if self.info else self.spec

    @property
    def penultimate(self) -> str | None:
        return self.layer_numbers.get(7)

    def prepare(self, raw: torch.Tensor) -> torch.Tensor:
        """uint8 images (N, C, S, S) at the stored size -> the model's input (center crop)."""
        return self.preprocess.eval(raw)

    def pictures(self, raw: torch.Tensor) -> torch.Tensor:
        """uint8 images at the stored size -> float (N, C, H, W) in [0, 1], cropped like the model's
        input: the user's own pixels, to draw under an overlay."""
        from ._analysis import picture

        return picture(self.preprocess, raw)

    def open_data(self, spec: str) -> Source:
        """A data spec (``folder:PATH``, ``fashion-mnist:test``, ...) at this model's stored size."""
        return open_source(spec, self.preprocess.stored_size, self.preprocess.channels)

    def load_images(self, paths: list[str]) -> torch.Tensor:
        """PNG/JPEG files -> uint8 (N, C, S, S) at the stored size, or a one-line error naming the file."""
        raw = []
        for path in paths:
            if not Path(path).is_file():
                raise UserError(f"image not found: {path}")
            try:
                raw.append(load_image(path, self.preprocess.stored_size, self.preprocess.channels))
            except Exception as e:  # noqa: BLE001 - any decode failure is the user's file
                raise UserError(f"cannot read image {path}: {e}") from None
        return torch.stack(raw)

    def class_index(self, labels: list[str]) -> list[int | None]:
        """Data labels (class names of a data source, or ImageNet's WordNet ids given in the class
        file) -> this model's class indices, None where unknown."""
        index = {**self.aliases, **{name: i for i, name in enumerate(self.classes)}}
        return [index.get(name) for name in labels]

    def files(self) -> list[str]:
        """The files the model is made from (our checkpoint; or its weights and model file): caches of
        results on this model are keyed by their content."""
        if self.info is not None:
            return [self.spec]
        where = self.spec.rpartition(":")[0]
        return [f for f in (self.weights, where if where.endswith(".py") else None) if f]

    def describe(self) -> dict:
        """Provenance for JSON outputs and pages."""
        return {"model": self.spec, "weights": self.weights, "name": self.name,
                "input": [self.preprocess.channels, self.preprocess.input_size, self.preprocess.input_size],
                "preprocess": self.preprocess.to_dict(), "classes": len(self.classes),
                "stages": self.stages, "layer_numbers": {str(k): v for k, v in self.layer_numbers.items()}}

    def calls(self) -> list[LayerCall]:
        """Every layer a command accepts, in the order the forward pass produces them, at the input size:
        read from the model's traced graph (:func:`geometry.layer_calls`), the one the geometry uses."""
        if self._calls is None:
            self._calls = layer_calls(self.model, self.preprocess.input_size, self.preprocess.channels)
        return self._calls

    def example(self) -> torch.Tensor:
        """One all-zeros input at the model's input size (the mean image after preprocessing), on the
        model's device."""
        size = self.preprocess.input_size
        return torch.zeros(1, self.preprocess.channels, size, size, device=self.device)

    @property
    def device(self) -> torch.device:
        """Where the model runs (its parameters' device)."""
        from .runner import model_device

        return model_device(self.model)

    @property
    def output(self) -> str:
        """The layer whose output is the class scores: the last call of the forward pass."""
        return self.calls()[-1].name

    def layers(self, given: list[str] | str | None = None, numbers: list[int] | None = None) -> list[str]:
        """The layers an analysis runs on: ``given``, or this model's defaults (:func:`model_layers`):
        its stages, or the paper's layers ``numbers`` (1..7, Fig. 3) where it has them (a model that is
        not ours stands in its top stage for a missing layer <= 5). For models that are not ours the
        choice is said on stderr, once per choice."""
        if given:
            return [given] if isinstance(given, str) else list(given)
        if numbers is None:
            chosen = list(self.stages)
        else:
            chosen = [self.layer_numbers.get(n) or (self.stages[-1] if n <= 5 and self.stages and self.info is None
                                                    else None) for n in numbers]
            if None in chosen:
                raise UserError(f"this model has no default for layer(s) {numbers}; name them "
                                "(deconvnet inspect lists them)")
        if not chosen:
            raise UserError("found no default layers in this model; name them (deconvnet inspect lists them)")
        if self.info is None and tuple(chosen) not in self._said:
            self._said.add(tuple(chosen))
            print(f"deconvnet: layers chosen for {self.spec}: {', '.join(chosen)} "
                  "(name others with --layer/--layers, or layers= in Python; `deconvnet inspect` lists all)",
                  file=sys.stderr)
        return chosen

    def feature_grid(self) -> int:
        """The spatial size every layer's maps are pooled to for linear probes (Sec. 5.2, Table 7): the
        smallest map among the numbered layers (ZFNet's pool5, 6x6 at 224 px), so that no layer has
        more positions than the top one."""
        shapes = {c.name: c.shape for c in self.calls()}
        sizes = [shapes[name][-1] for name in self.layer_numbers.values() if len(shapes.get(name, ())) == 3]
        if not sizes:
            raise UserError(f"{self.spec} has no spatial layer among its numbered layers")
        return min(sizes)

    def images(self, images) -> torch.Tensor:
        """What a Python caller gives as images -> uint8 (N, C, S, S) at the stored size: image file
        paths (one or a list), or a uint8 tensor (N, C, H, W) or (C, H, W) at any size (resized so
        the short side is S, then center-cropped, as image files are)."""
        if isinstance(images, (str, Path)):
            images = [images]
        if isinstance(images, (list, tuple)) and all(isinstance(p, (str, Path)) for p in images):
            return self.load_images([str(p) for p in images])
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() not in (3, 4):
            raise UserError("images: give file paths or a uint8 tensor (N, C, H, W) or (C, H, W) of pixels 0..255")
        raw = images[None] if images.dim() == 3 else images
        size, channels = self.preprocess.stored_size, self.preprocess.channels
        if raw.shape[1] != channels:
            raise UserError(f"images have {raw.shape[1]} channels; the model takes {channels}")
        h, w = raw.shape[-2:]
        if (h, w) != (size, size):
            scale = size / min(h, w)
            nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
            x = torch.nn.functional.interpolate(raw.float(), size=(nh, nw), mode="bilinear", align_corners=False)
            top, left = (nh - size) // 2, (nw - size) // 2
            raw = x[..., top:top + size, left:left + size].round().clamp(0, 255).to(torch.uint8)
        return raw.contiguous()

    def inputs(self, images) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
        """What a Python caller gives as images -> ``(images, to_input)``: pixels (files or a uint8
        tensor, :meth:`images`) with this model's preprocessing; or a float tensor (N, C, H, W) /
        (C, H, W), taken as the model's input as it is (already preprocessed, e.g. by the caller's
        own transforms) with the identity."""
        if isinstance(images, torch.Tensor) and images.is_floating_point():
            x = images[None] if images.dim() == 3 else images
            if x.dim() != 4:
                raise UserError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
            return x.detach(), lambda v: v
        return self.images(images), self.prepare

    @torch.no_grad()
    def predict(self, images: torch.Tensor, to_input=None, batch_size: int = 64) -> list[int]:
        """The model's class for each image (uint8 pixels through ``to_input``, default the
        preprocessing's center crop)."""
        from ._analysis import eval_mode

        to_input = to_input or self.prepare
        with eval_mode(self.model):
            return [int(v) for start in range(0, len(images), batch_size)
                    for v in self.model(to_input(images[start:start + batch_size]).to(self.device)).argmax(1).cpu()]


# ----------------------------------------------------------------------------- loading

def load_subject(spec: str, weights: str | None = None, classes: str | None = None,
                 preprocess: str | None = None, input_size: int | None = None,
                 mean: list[float] | None = None, std: list[float] | None = None,
                 other_activations: str = "error", device: str = "auto") -> Subject:
    """The model under study from a model spec (see the module docstring); one-line :class:`UserError`
    for every user mistake: unknown names, modules that do not import, weights that do not fit, a class
    list of the wrong length, a model that cannot take the input size.

    ``other_activations``: how projections (Sec. 2.1) pass activations the paper has no rule for
    (ReLU6, SiLU, GELU, Hardswish, ...): ``"error"`` refuses, naming the first one on the path;
    ``"gradient"`` lets them act as they do for back-propagation.

    ``device``: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``; the model is moved
    there and every analysis runs it there (inputs moved to it, results returned on the CPU).
    """
    from .runner import device_of

    from .deconvnet import OTHER_ACTIVATIONS

    if other_activations not in OTHER_ACTIVATIONS:
        raise UserError(f"unknown --other-activations {other_activations!r}; use {' or '.join(OTHER_ACTIVATIONS)}")
    where = device_of(device)  # a one-line error before anything loads
    subject = _load(spec, weights, classes, preprocess, input_size, mean, std)
    subject.other_activations = other_activations
    subject.model.to(where)
    return subject


def _load(spec, weights, classes, preprocess, input_size, mean, std) -> Subject:
    path = Path(spec)
    if path.exists() or (path.suffix in (".pt", ".pth", ".ckpt") and ":" not in spec):
        try:  # a checkpoint of ours, or a one-line error saying why it is not one (read once)
            subject = from_checkpoint(path / "final.pt" if path.is_dir() else path)
        except UserError as e:
            if not path.is_file():
                raise
            raise UserError(f"{e}; for a weights file give the architecture with --model torchvision:NAME or "
                            f"module:CALLABLE and the file with --weights") from None
        if weights or classes or preprocess or input_size or mean or std:
            raise UserError(f"{spec} is a deconvnet checkpoint: it carries its weights, classes and "
                            "preprocessing; --weights/--classes/--preprocess/--input-size/--mean/--std do not apply")
        return subject
    state = _state_dict(weights) if weights else None  # read once: it may also give the class count
    model = _build(spec, state, classes)
    if weights:
        load_weights(model, weights, state)
    model.eval()
    subject = Subject(model, _preprocess(model, preprocess, input_size, mean, std), [], spec, [], {}, weights=weights)
    outputs = _outputs(subject)
    every = read_class_names(classes, outputs) if classes else [[str(i)] for i in range(outputs)]
    subject.classes = [names[-1] for names in every]
    subject.aliases = {name: i for i, names in enumerate(every) for name in names[:-1]}
    subject.stages, subject.layer_numbers = model_layers(model, subject.calls)
    return subject


def from_checkpoint(path: str | Path) -> Subject:
    """Our checkpoint as the model under study: conv1..conv5 and the paper's layer numbers (Fig. 3)."""
    model, info = load_checkpoint(path)
    subject = Subject(model, info.preprocess, list(info.classes), str(path), [], {}, info=info)
    subject.stages, subject.layer_numbers = model_layers(model, subject.calls)
    return subject


def as_subject(model: Subject | nn.Module, preprocess: str | None = None, input_size: int | None = None,
               classes: list[str] | None = None, other_activations: str = "error", like=None) -> Subject:
    """The model under study for a Python call: a :class:`Subject` as it is; a plain ``nn.Module``
    wrapped as ``load_subject`` wraps a ``torchvision:NAME`` spec, put in eval mode: ``imagenet``
    preprocessing at 224 px unless told otherwise (short side 256, center crop 224, ImageNet
    mean/std; ``unit``: [0, 1] pixels), classes named ``0..K-1`` unless ``classes`` are given. Our
    own ``ConvNet`` without its checkpoint gets the paper's preprocessing with a zero mean image.
    ``like``: the images the caller will give; a float tensor is the model's input as it is
    (:meth:`Subject.inputs`), so its size is the input size and the preprocessing the identity."""
    from .data import preprocess_for

    if isinstance(model, Subject):
        return model
    if not isinstance(model, nn.Module):
        raise UserError(f"expected a Subject or a torch.nn.Module, got {type(model).__name__}")
    model.eval()
    if isinstance(like, torch.Tensor) and like.is_floating_point() and like.dim() in (3, 4):
        channels, size = like.shape[-3], like.shape[-1]
        pre = Preprocess(size, size, channels, torch.zeros(channels, 1, 1), scale=255.0)  # x -> x
    elif isinstance(model, ConvNet) and preprocess is None:
        pre = preprocess_for(model.config.input_size, model.config.in_channels)
    else:
        pre = _preprocess(model, preprocess, input_size, None, None)
    subject = Subject(model, pre, [], type(model).__name__, [], {}, other_activations=other_activations)
    outputs = _outputs(subject)
    if classes is not None and len(classes) != outputs:
        raise UserError(f"{len(classes)} class names for a model with {outputs} outputs")
    subject.classes = list(classes) if classes is not None else [str(i) for i in range(outputs)]
    subject.stages, subject.layer_numbers = model_layers(model, subject.calls)
    return subject


def _build(spec: str, state: dict | None = None, classes: str | None = None) -> nn.Module:
    """``torchvision:NAME``, ``package.module:CALLABLE`` or ``file.py:CALLABLE`` -> the built module."""
    if ":" not in spec:
        raise UserError(f"unknown model spec {spec!r}; give a deconvnet checkpoint (.pt or run directory), "
                        "torchvision:NAME, package.module:CALLABLE or path/to/file.py:CALLABLE")
    where, _, attr = spec.rpartition(":")
    if where == "torchvision":
        return _torchvision(attr, state, classes)
    if not where or not attr:
        raise UserError(f"model spec {spec!r}: give MODULE:CALLABLE, e.g. mypackage.nets:build or nets.py:Net")
    if where.endswith(".py") or "/" in where or "\\" in where:
        module = _import_file(where)
    else:
        try:
            module = importlib.import_module(where)
        except Exception as e:  # noqa: BLE001 - the user's module: say why it does not import
            raise UserError(f"cannot import {where!r} (from --model {spec}): {type(e).__name__}: {e}") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UserError(f"{where} has no attribute {attr!r} (from --model {spec})")
        obj = getattr(obj, part)
    if isinstance(obj, nn.Module):
        return obj
    if not callable(obj):
        raise UserError(f"{spec}: {attr} is not callable; give a function or class returning an nn.Module")
    try:
        model = obj()
    except Exception as e:  # noqa: BLE001 - the user's callable failed
        raise UserError(f"{spec}: calling {attr}() failed: {type(e).__name__}: {e}") from None
    if not isinstance(model, nn.Module):
        raise UserError(f"{spec}: {attr}() returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _import_file(path: str):
    file = Path(path)
    if not file.is_file():
        raise UserError(f"model file not found: {path}")
    name = f"deconvnet_user_{abs(hash(str(file.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(file.resolve().parent))  # so the file can import its neighbours
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - the user's file: say why it does not run
        raise UserError(f"cannot import {path}: {type(e).__name__}: {e}") from None
    finally:
        sys.path.pop(0)
    return module


def import_torchvision():
    """``torchvision``, or a one-line error saying how to install it (it is not a dependency)."""
    try:
        import torchvision
    except ModuleNotFoundError:
        raise UserError(f"torchvision: specs need torchvision, which is not installed: "
                        f"pip install torchvision (the release matching torch {torch.__version__.split('+')[0]})") from None
    except Exception as e:  # noqa: BLE001 - installed but broken (e.g. built for another torch)
        raise UserError(f"torchvision is installed but does not import ({type(e).__name__}: {e}); install "
                        f"the release matching torch {torch.__version__.split('+')[0]}") from None
    return torchvision


def _torchvision(name: str, state: dict | None = None, classes: str | None = None) -> nn.Module:
    """``torchvision:NAME`` or ``torchvision:NAME?ARG=VALUE&...`` (constructor arguments, e.g.
    ``resnet18?num_classes=2``, ``googlenet?aux_logits=false&init_weights=true``), built with
    ``weights=None``. Without ``num_classes`` it follows the weights file's classifier (a model
    fine-tuned on 2 classes) or else the class-name file's length."""
    name, _, query = name.partition("?")
    tv = import_torchvision()
    available = tv.models.list_models(module=tv.models)
    if name not in available:
        close = difflib.get_close_matches(name, available, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see torchvision.models.list_models()"
        raise UserError(f"torchvision has no model {name!r}{hint}")
    arguments = {}
    for pair in filter(None, query.split("&")):
        key, eq, text = pair.partition("=")
        if not eq or not key.isidentifier():
            raise UserError(f"torchvision:{name}?{query}: give constructor arguments as NAME=VALUE joined by &")
        arguments[key] = _literal(text)
    if "num_classes" not in arguments:
        count = _classifier_rows(state) if state else None
        if count is None and classes:
            count = len(read_class_names(classes))
        if count is not None and count != 1000:
            arguments["num_classes"] = count
    try:
        return tv.models.get_model(name, weights=None, **arguments)
    except (TypeError, ValueError) as e:
        raise UserError(f"torchvision:{name} does not take {sorted(arguments)} ({type(e).__name__}: {e})") from None


def _literal(text: str):
    """A constructor argument's value: a number, true/false/none, or else the text itself."""
    lowered = text.lower()
    if lowered in ("true", "false", "none"):
        return {"true": True, "false": False, "none": None}[lowered]
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _classifier_rows(state: dict) -> int | None:
    """The number of outputs of the last 2-D weight of a state_dict (its classifier)."""
    matrices = [v for k, v in state.items() if k.endswith("weight") and v.dim() == 2]
    return int(matrices[-1].shape[0]) if matrices else None


# ----------------------------------------------------------------------------- weights, classes

def load_weights(model: nn.Module, path: str, state: dict | None = None) -> None:
    """Load a weights file into ``model``: a state_dict, or a dict holding one under ``state_dict`` or
    ``model``; ``module.`` (DataParallel) and ``_orig_mod.`` (torch.compile) prefixes stripped. A
    one-line error names the first missing, unexpected and mis-shaped keys and their counts. ``state``:
    the file's state_dict when already read (:func:`_state_dict`)."""
    state = _state_dict(path) if state is None else state
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shaped = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and state[k].shape != own[k].shape]
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped (file vs model)", shaped)):
        if keys:
            problems.append(f"{len(keys)} {label}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}")
    if problems:
        raise UserError(f"{path} does not fit the model: " + "; ".join(problems))
    model.load_state_dict(state)


def _state_dict(path: str) -> dict:
    """The state_dict in a weights file, prefixes stripped (see :func:`load_weights`)."""
    if not Path(path).is_file():
        raise UserError(f"weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling problem
        raise UserError(f"{path} is not a readable PyTorch weights file ({type(e).__name__}: {e})") from None
    if isinstance(state, nn.Module):
        state = state.state_dict()
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} holds no state_dict (a dict of tensors, or one under 'state_dict' or 'model')")
    for prefix in ("module.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def read_classes(path: str, outputs: int | None = None) -> list[str]:
    """Class names from a file: one per line, a JSON list, or ImageNet's ``{"0": ["n01440764",
    "tench"], ...}`` index; checked against the model's number of ``outputs`` when given."""
    return [names[-1] for names in read_class_names(path, outputs)]


def read_class_names(path: str, outputs: int | None = None) -> list[list[str]]:
    """Every name of each class in a class file, the display name last: ImageNet's index gives
    ``["n01440764", "tench"]`` (a folder named by the WordNet id then maps to its class)."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"classes file not found: {path}")
    text = file.read_text(encoding="utf-8", errors="replace")
    names: list[list[str]]
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, list):
        names = [[str(v)] for v in data]
    elif isinstance(data, dict):
        try:
            items = sorted(data.items(), key=lambda kv: int(kv[0]))
        except ValueError:
            raise UserError(f"{path}: a JSON object of classes needs keys 0..K-1") from None
        if [int(k) for k, _ in items] != list(range(len(items))):
            raise UserError(f"{path}: the class indices are not 0..{len(items) - 1}")
        names = [[str(n) for n in v] if isinstance(v, list) and v else [str(v)] for _, v in items]
    else:
        names = [[line.strip()] for line in text.splitlines() if line.strip()]
    if not names:
        raise UserError(f"{path} holds no class names")
    if outputs is not None and len(names) != outputs:
        raise UserError(f"{path} has {len(names)} class names but the model has {outputs} outputs")
    return names


# ----------------------------------------------------------------------------- preprocessing

def _preprocess(model: nn.Module, kind: str | None, input_size: int | None,
                mean: list[float] | None, std: list[float] | None) -> Preprocess:
    """``imagenet`` (default): short side ``input_size * 256 / 224``, center crop ``input_size`` (224),
    then per channel ``(x - mean) / std`` on [0, 1] pixels. ``unit``: [0, 1] pixels, resized and cropped
    to the input size, no normalisation. ``mean``/``std`` override the preset's."""
    kind = kind or "imagenet"
    if kind not in PREPROCESSING:
        raise UserError(f"unknown --preprocess {kind!r}; use {' or '.join(PREPROCESSING)}")
    channels = input_channels(model)
    size = input_size or 224
    if size < 8:
        raise UserError(f"--input-size {size} is too small")
    if kind == "imagenet":
        stored = round(size * 256 / 224)
        m = list(mean) if mean is not None else list(IMAGENET_MEAN)
        s = list(std) if std is not None else list(IMAGENET_STD)
    else:
        stored = size
        m = list(mean) if mean is not None else [0.0]
        s = list(std) if std is not None else [1.0]
    if channels == 1 and mean is None and len(m) == 3:  # grey model: the mean of the RGB statistics
        m, s = [sum(m) / 3], [sum(s) / 3]
    for label, values in (("--mean", m), ("--std", s)):
        if len(values) not in (1, channels):
            raise UserError(f"{label} needs 1 or {channels} values (the model takes {channels} channels), got {len(values)}")
    if any(v <= 0 for v in s):
        raise UserError(f"--std values must be positive, got {s}")
    mean_t = torch.tensor(m, dtype=torch.float32).expand(channels).reshape(channels, 1, 1).clone()
    std_t = torch.tensor(s, dtype=torch.float32).expand(channels).reshape(channels, 1, 1).clone()
    return Preprocess(size, stored, channels, mean_t, scale=1.0, pad=0, std=std_t)


def logits_of(output):
    """The class scores in a model's output: the tensor itself; a dict's ``logits`` (or its only
    tensor); an object's ``logits`` attribute (Hugging Face's ``ImageClassifierOutput``); a tuple's
    first tensor (torchvision's GoogLeNet/Inception outputs in training mode). None if none is found."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict):
        if isinstance(output.get("logits"), torch.Tensor):
            return output["logits"]
        tensors = [v for v in output.values() if isinstance(v, torch.Tensor)]
        return tensors[0] if len(tensors) == 1 else None
    if isinstance(getattr(output, "logits", None), torch.Tensor):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return None


def read_logits(model: nn.Module) -> None:
    """The one place a model's output other than a tensor is read: a forward hook on the model that
    returns :func:`logits_of` its output, so every analysis sees the class scores (N, K). Added once,
    and only to models whose output is not already a tensor."""
    if getattr(model, "_deconvnet_reads_logits", False):
        return

    def hook(_module, _inputs, output):
        scores = logits_of(output)
        return output if scores is None else scores

    model.register_forward_hook(hook)
    model._deconvnet_reads_logits = True


def _outputs(subject: Subject) -> int:
    """The number of class scores the model gives for one input; a one-line error if it cannot run.
    A model whose output is a dict, an object with ``logits`` or a tuple is read by :func:`read_logits`."""
    pre, spec = subject.preprocess, subject.spec
    try:
        with torch.no_grad():
            out = subject.model(subject.example())
            if not isinstance(out, torch.Tensor) and logits_of(out) is not None:
                read_logits(subject.model)
                out = subject.model(subject.example())
    except Exception as e:  # noqa: BLE001 - the model cannot take this input
        raise UserError(f"{spec} cannot take a {pre.channels}x{pre.input_size}x{pre.input_size} input "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                        "set --input-size (and the channels via the model)") from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 1:
        raise UserError(f"{spec} returns {type(out).__name__} of shape {tuple(getattr(out, 'shape', ()))}; "
                        "the tools need a classifier returning class scores (N, K)")
    return int(out.shape[1])


# ----------------------------------------------------------------------------- default layers

def model_layers(model: nn.Module, calls) -> tuple[list[str], dict[int, str]]:
    """The one rule for the layers every analysis uses by default: ``(stages, layer numbers)``.

    Our ZFNet-family models (Fig. 3): ``conv1`` .. ``conv5`` and the paper's layers 1..7 (the output
    of the last module of each layer's block, :data:`features.LAYER_BLOCKS`). Any other model: the
    stages and penultimate layer found from its traced calls (:func:`default_layers`); ``calls`` is
    a function returning them, called only for such models.
    """
    if isinstance(model, ConvNet):
        modules = dict(model.named_modules())
        return [name for name in CONV_NAMES if name in modules], feature_layers(model)
    return default_layers(calls())


def default_layers(calls: list[LayerCall]) -> tuple[list[str], dict[int, str]]:
    """Sensible default layers for a model that is not ours: ``(stages, layer numbers)``.

    The stages are the calls at the shallowest depth of the module tree where the forward pass runs
    through more than one spatial resolution (ResNet: its top-level modules; VGG, DenseNet,
    MobileNet: the children of ``features``); of each run of calls at one resolution, the last (the
    output of that stage). The penultimate layer is the last call before the classifier whose
    output size (or channel count, before global pooling) is the classifier's input size.
    """
    spatial = [c for c in calls if len(c.shape) == 3 and c.shape[1] > 1
               and not isinstance(c.module, _DROPOUT + (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d))]
    stages: list[str] = []
    for depth in range(1, 1 + max((c.name.count(".") + 1 for c in spatial), default=0)):
        level = [c for c in spatial if c.name.count(".") + 1 == depth]
        if len({c.shape[1:] for c in level}) >= 2:
            for i, c in enumerate(level):
                if i + 1 == len(level) or level[i + 1].shape[1:] != c.shape[1:]:
                    stages.append(c.name)
            break
    if not stages and spatial:  # one resolution throughout: the last spatial layer
        stages = [spatial[-1].name]
    numbers = {i + 1: name for i, name in enumerate(stages[:6])}
    penultimate = _penultimate(calls)
    if penultimate:
        numbers[7] = penultimate
    return stages, numbers


def _penultimate(calls: list[LayerCall]) -> str | None:
    leaves = [c for c in calls if not list(c.module.children())]
    if not leaves or not isinstance(leaves[-1].module, nn.Linear):
        return None
    width = leaves[-1].module.in_features
    last = calls.index(leaves[-1])
    for c in reversed(calls[:last]):
        if isinstance(c.module, _DROPOUT):
            continue
        if math.prod(c.shape) == width or (len(c.shape) == 3 and c.shape[0] == width):
            return c.name
    return None
