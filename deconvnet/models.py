"""ZFNet (Zeiler & Fergus 2014, Fig. 3), its AlexNet baseline, and 28 px versions of both.

Every model is one flat ``nn.Sequential`` of named modules, so a layer is addressed by name:
``conv1 relu1 pool1 norm1 conv2 relu2 pool2 norm2 conv3 relu3 conv4 relu4 conv5 relu5 pool5
flatten fc6 relu6 drop6 fc7 relu7 drop7 fc8``. A variant (small vs paper size, an ablation of
Table 3) is a :class:`ModelConfig` handed to :func:`build`, never a copied class.
"""
from __future__ import annotations

import dataclasses
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

CONV_NAMES = ("conv1", "conv2", "conv3", "conv4", "conv5")
POOLED = {"conv1": "pool1", "conv2": "pool2", "conv5": "pool5"}  # max-pool after these (Fig. 3)
NORMED = {"conv1": "norm1", "conv2": "norm2"}  # contrast normalisation across maps after the pool


@dataclass(frozen=True)
class Conv:
    """One conv layer: ``out`` filters of ``kernel`` x ``kernel``, ``stride``, ``padding``."""

    out: int
    kernel: int
    stride: int = 1
    padding: int = 0


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a model; stored in every checkpoint.

    ``convs`` maps conv1..conv5 to a :class:`Conv`; a layer left out is removed (Table 3).
    ``fc`` holds the widths of fc6 and fc7; a width of 0 removes that layer.
    """

    name: str
    in_channels: int
    num_classes: int
    input_size: int
    convs: dict[str, Conv]
    fc: tuple[int, int] = (4096, 4096)
    pool: tuple[int, int] = (3, 2)  # max-pool kernel, stride (overlapping, Sec. 3)
    ceil_mode: bool = True
    lrn: tuple[int, float, float, float] = (5, 1e-4, 0.75, 2.0)  # size, alpha, beta, k (Krizhevsky)
    dropout: float = 0.5
    init: str = "paper"  # "paper": weights N(0, 1e-2), biases 0 (Sec. 3); "kaiming"; "default": PyTorch's

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["fc"] = list(self.fc)
        d["pool"] = list(self.pool)
        d["lrn"] = list(self.lrn)
        return d

    @staticmethod
    def from_dict(d: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(ModelConfig)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        d = dict(d)
        d["convs"] = {k: Conv(**v) for k, v in d["convs"].items()}
        for key in ("fc", "pool", "lrn"):
            if key in d:
                d[key] = tuple(d[key])
        return ModelConfig(**d)


def _zfnet(num_classes: int, in_channels: int) -> ModelConfig:
    # Fig. 3: 224 -> conv1 110 -> pool 55 -> conv2 26 -> pool 13 -> conv3-5 13 -> pool 6.
    convs = {
        "conv1": Conv(96, 7, 2, 1),
        "conv2": Conv(256, 5, 2, 0),
        "conv3": Conv(384, 3, 1, 1),
        "conv4": Conv(384, 3, 1, 1),
        "conv5": Conv(256, 3, 1, 1),
    }
    return ModelConfig("zfnet", in_channels, num_classes, 224, convs)


def _alexnet(num_classes: int, in_channels: int) -> ModelConfig:
    # Krizhevsky et al. 2012 with dense layers 3-5 (Sec. 4.1): 224 -> 55 -> 27 -> 27 -> 13 -> 13 -> 6.
    convs = {
        "conv1": Conv(96, 11, 4, 2),
        "conv2": Conv(256, 5, 1, 2),
        "conv3": Conv(384, 3, 1, 1),
        "conv4": Conv(384, 3, 1, 1),
        "conv5": Conv(256, 3, 1, 1),
    }
    return ModelConfig("alexnet", in_channels, num_classes, 224, convs, ceil_mode=False)


# The 28 px versions keep the contrast of Sec. 4.1 in layer 1: ZFNet's smaller kernel and stride
# (3x3/1 vs AlexNet's 5x5/2, as 7x7/2 vs 11x11/4 at full size), so Fig. 6 shows at this scale.
def _zfnet_small(num_classes: int, in_channels: int) -> ModelConfig:
    # 28 -> conv1 28 -> pool 14 -> conv2 14 -> pool 7 -> conv3-5 7 -> pool 3
    convs = {
        "conv1": Conv(32, 3, 1, 1),
        "conv2": Conv(64, 3, 1, 1),
        "conv3": Conv(96, 3, 1, 1),
        "conv4": Conv(96, 3, 1, 1),
        "conv5": Conv(64, 3, 1, 1),
    }
    return ModelConfig("zfnet-small", in_channels, num_classes, 28, convs, fc=(256, 256), init="kaiming")


def _alexnet_small(num_classes: int, in_channels: int) -> ModelConfig:
    # 28 -> conv1 14 -> pool 7 -> conv2 7 -> pool 3 -> conv3-5 3 -> pool 1
    convs = {
        "conv1": Conv(32, 5, 2, 2),
        "conv2": Conv(64, 3, 1, 1),
        "conv3": Conv(96, 3, 1, 1),
        "conv4": Conv(96, 3, 1, 1),
        "conv5": Conv(64, 3, 1, 1),
    }
    return ModelConfig("alexnet-small", in_channels, num_classes, 28, convs, fc=(256, 256), init="kaiming")


MODELS = {"zfnet": _zfnet, "alexnet": _alexnet, "zfnet-small": _zfnet_small, "alexnet-small": _alexnet_small}
DEFAULT_CHANNELS = {"zfnet": 3, "alexnet": 3, "zfnet-small": 1, "alexnet-small": 1}


def model_config(name: str, num_classes: int = 1000, in_channels: int | None = None, **changes) -> ModelConfig:
    """The config of a registered model, with optional field ``changes`` (e.g. an ablation)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    channels = DEFAULT_CHANNELS[name] if in_channels is None else in_channels
    if "convs" in changes:  # accept plain dicts, as read back from a JSON config
        changes["convs"] = {k: v if isinstance(v, Conv) else Conv(**v) for k, v in changes["convs"].items()}
    if "fc" in changes:
        changes["fc"] = tuple(changes["fc"])
    return dataclasses.replace(MODELS[name](num_classes, channels), **changes)


class LocalResponseNorm(nn.LocalResponseNorm):
    """Contrast normalisation across feature maps (Krizhevsky et al. 2012; "norm1", "norm2").

    Same values as ``nn.LocalResponseNorm``; the sum over the window of neighbouring maps is a 1x1
    convolution with a band matrix, several times faster on CPU than the built-in average pooling.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = torch.arange(x.shape[1], device=x.device)
        offset = c[None, :] - c[:, None]  # window of map i: maps i - size//2 .. i + (size-1)//2
        band = ((offset >= -(self.size // 2)) & (offset <= (self.size - 1) // 2)).to(x.dtype)
        window = F.conv2d(x * x, band[:, :, None, None])
        return x / (window * (self.alpha / self.size) + self.k).pow(self.beta)


class ConvNet(nn.Sequential):
    """A ZFNet-family network as a flat sequence of named layers; ``self.config`` rebuilds it."""

    def __init__(self, config: ModelConfig):
        c = config
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        channels = c.in_channels
        for name in CONV_NAMES:
            if name not in c.convs:
                continue
            spec = c.convs[name]
            i = name[-1]
            layers[name] = nn.Conv2d(channels, spec.out, spec.kernel, spec.stride, spec.padding)
            layers[f"relu{i}"] = nn.ReLU()
            if name in POOLED:
                layers[POOLED[name]] = nn.MaxPool2d(c.pool[0], c.pool[1], ceil_mode=c.ceil_mode)
            if name in NORMED:
                size, alpha, beta, k = c.lrn
                layers[NORMED[name]] = LocalResponseNorm(int(size), alpha, beta, k)
            channels = spec.out
        with torch.no_grad():
            probe = nn.Sequential(layers)(torch.zeros(1, c.in_channels, c.input_size, c.input_size))
        if probe.shape[-1] < 1:
            raise ValueError(f"{c.name}: input {c.input_size} px is too small for its layers")
        layers["flatten"] = nn.Flatten()
        features = probe[0].numel()
        for name, width, i in (("fc6", c.fc[0], 6), ("fc7", c.fc[1], 7)):
            if width == 0:
                continue
            layers[name] = nn.Linear(features, width)
            layers[f"relu{i}"] = nn.ReLU()
            layers[f"drop{i}"] = nn.Dropout(c.dropout)
            features = width
        layers["fc8"] = nn.Linear(features, c.num_classes)
        super().__init__(layers)
        self.config = config
        if c.init == "paper":
            for m in self.modules():
                if isinstance(m, (nn.Conv2d, nn.Linear)):
                    nn.init.normal_(m.weight, 0.0, 1e-2)
                    nn.init.zeros_(m.bias)
        elif c.init == "kaiming":  # He et al. 2015: keeps the signal's scale through 8 ReLU layers
            for m in self.modules():
                if isinstance(m, (nn.Conv2d, nn.Linear)):
                    nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                    nn.init.zeros_(m.bias)
        elif c.init != "default":
            raise ValueError(f"unknown init {c.init!r}; use 'paper', 'kaiming' or 'default'")


def build_model(name: str | ModelConfig, num_classes: int = 1000, in_channels: int | None = None, **changes) -> ConvNet:
    """Build ``zfnet``, ``alexnet``, ``zfnet-small`` or ``alexnet-small`` (or any :class:`ModelConfig`).

    ``changes`` override config fields, e.g. ``fc=(2048, 2048)`` or ``init="paper"``.
    """
    config = name if isinstance(name, ModelConfig) else model_config(name, num_classes, in_channels, **changes)
    return ConvNet(config)


@torch.no_grad()
def renormalise_filters(model: nn.Module, radius: float = 0.1) -> None:
    """Rescale every conv filter whose RMS exceeds ``radius`` back to it (Sec. 3, Fig. 6a)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            w = m.weight
            rms = w.pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt()
            w.mul_(torch.clamp(radius / rms, max=1.0))
