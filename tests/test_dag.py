"""Projections, receptive fields and hooks on torchvision's own architectures (random weights, small
inputs): branches, concatenations, reused and functional ReLUs, BatchNorm, ReLU6.

References share no code with the package: a unit's box is the support of its input gradient in a
copy of the model with positive weights and averaging pools (every path open, nothing cancels);
a projection is plain autograd with every ReLU call swapped for the rule.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deconvnet import Deconvnet, UserError
from deconvnet.deconvnet import _project_crops, _Request
from deconvnet.geometry import layer_field, unit_box
from deconvnet.probe import apply_at
from tv import no_hooks, torchvision_model


# ----------------------------------------------------------------------------- receptive fields

def open_copy(model: nn.Module) -> nn.Module:
    """Positive weights, BatchNorm an identity-like positive scale, max-pools averaging: the input
    gradient of a unit is then positive exactly on the pixels some path connects it to."""
    m = copy.deepcopy(model).eval()
    for module in list(m.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.MaxPool2d):
                setattr(module, name, nn.AvgPool2d(child.kernel_size, child.stride, child.padding,
                                                   ceil_mode=child.ceil_mode))
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(p.abs() + 0.01)
        for b in m.modules():
            if isinstance(b, nn.BatchNorm2d):
                b.running_mean.zero_()
                b.running_var.fill_(1.0)
    return m


def gradient_boxes(model: nn.Module, layer: str, units: list[tuple[int, int]], size: int, channels: int = 3) -> list:
    """Per unit (y, x): the box of the pixels where its input gradient is non-zero (one image each)."""
    x_in = torch.ones(len(units), channels, size, size, requires_grad=True)
    with torch.enable_grad():
        out = apply_at(model, x_in, layer, lambda _n, o: o)[layer]
        picked = torch.stack([out[i, :, y, x].sum() for i, (y, x) in enumerate(units)])
        (grad,) = torch.autograd.grad(picked.sum(), x_in)
    boxes = []
    for g in grad:
        rows, cols = g.sum((0, 2)).nonzero().flatten(), g.sum((0, 1)).nonzero().flatten()
        boxes.append((int(rows[0]), int(cols[0]), int(rows[-1]), int(cols[-1])))
    return boxes


@pytest.mark.parametrize("name, size, layers", [
    ("resnet18", 112, ["maxpool", "layer1.0.relu", "layer1", "layer2.0.relu_1", "layer2", "layer3.1.conv1"]),
    ("resnet50", 96, ["layer1.2", "layer2.1.relu_2", "layer3.0.downsample"]),
    ("densenet121", 96, ["features.denseblock1", "features.transition1.pool", "features.denseblock2.denselayer3"]),
])
def test_boxes_equal_the_gradient_support(name, size, layers):
    model = torchvision_model(name)
    reference = open_copy(model)
    for layer in layers:
        h, w = apply_at(model, torch.zeros(1, 3, size, size), layer, lambda _n, o: o.shape[2:])[layer]
        units = [(0, 0), (h // 2, w // 3), (h - 1, w - 1), (1, w - 2)]
        expected = gradient_boxes(reference, layer, units, size)
        assert [unit_box(model, layer, y, x, size) for y, x in units] == expected, layer
    assert no_hooks(model)


def test_resnet18_boxes_at_224_from_the_issue():
    model = torchvision_model("resnet18")
    assert unit_box(model, "layer2", 10, 10, 224) == (31, 31, 129, 129)  # both paths of the block
    assert unit_box(model, "layer3", 5, 5, 224) == (0, 0, 185, 185)
    assert layer_field(model, "layer1", 224) == ((43, 43), (4, 4))  # 7 + 2 * 2 (pool) + 4 * 2 * 4
    assert layer_field(model, "fc", 224) is None


def test_non_square_kernels_and_asymmetric_fields():
    model = nn.Sequential(nn.Conv2d(3, 4, (1, 7), padding=(0, 3)), nn.ReLU(),
                          nn.Conv2d(4, 4, (3, 2), stride=(2, 1), dilation=(1, 2)), nn.MaxPool2d((2, 3), stride=(2, 1))).eval()
    reference = open_copy(model)
    units = [(0, 0), (2, 5), (3, 9)]
    assert [unit_box(model, "3", y, x, 20) for y, x in units] == gradient_boxes(reference, "3", units, 20)


class Reshaping(nn.Module):
    """A pixel shuffle the geometry does not reason about: the box is measured, with a warning."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.shuffle = nn.PixelShuffle(2)
        self.head = nn.Conv2d(2, 2, 3)

    def forward(self, x):
        return self.head(self.shuffle(torch.relu(self.conv(x))))


def test_an_unknown_op_is_measured_with_a_gradient_and_said():
    torch.manual_seed(0)
    model = Reshaping().eval()
    with pytest.warns(UserWarning, match="pixel_shuffle.*measured"):
        box = unit_box(model, "head", 10, 10, 16)
    assert box == (4, 4, 7, 7)  # rows 10..12 of the shuffled map are conv rows 5..6, each 3x3: 4..7
    assert layer_field(model, "head", 16) is None


# ----------------------------------------------------------------------------- projections

class _RuleReLU(torch.autograd.Function):
    """A ReLU whose backward is the rule: the reference's own, written from Sec. 2.1."""

    rule = "deconvnet"

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g.clamp(min=0) if _RuleReLU.rule == "deconvnet" else (g * (x > 0)).clamp(min=0)


def reference_projection(model, image, layer, unit, rule, monkeypatch) -> torch.Tensor:
    """Plain autograd on the full image with every ReLU call (module or functional) the rule."""
    _RuleReLU.rule = rule
    with monkeypatch.context() as m:
        m.setattr(F, "relu", lambda x, inplace=False: _RuleReLU.apply(x))
        m.setattr(torch, "relu", lambda x: _RuleReLU.apply(x))
        x = image[None].clone().requires_grad_(True)
        with torch.enable_grad():
            out = apply_at(model, x, layer, lambda _n, o: o)[layer]
            seed = torch.zeros_like(out)
            seed[(0, *unit)] = out.detach()[(0, *unit)]
            (grad,) = torch.autograd.grad(out, x, seed)
    return grad[0]


@pytest.mark.parametrize("name, size, layer", [
    ("resnet18", 112, "layer2.1.relu"),  # a ReLU module called twice per block; the 1st call of block 2.1
    ("googlenet", 96, "inception3a"),  # F.relu(inplace=True) in every conv, four concatenated branches
    ("densenet121", 64, "features.denseblock1"),  # concatenations, BatchNorm, ReLU modules
    ("vgg11", 64, "features.12"),
])
def test_projections_equal_autograd_with_every_relu_the_rule(name, size, layer, monkeypatch):
    model = torchvision_model(name).double()
    torch.manual_seed(1)
    image = torch.randn(3, size, size, dtype=torch.float64)
    a = apply_at(model, image[None], layer, lambda _n, o: o.detach())[layer][0]
    y, x = a.shape[1] // 2, a.shape[2] // 3
    unit = (int(a[:, y, x].argmax()), y, x)
    with torch.no_grad():
        logits = model(image[None])
    for rule in ("deconvnet", "guided"):
        ours = Deconvnet(model).project(image[None], layer, [unit], rule=rule)[0]
        expected = reference_projection(model, image, layer, unit, rule, monkeypatch)
        assert expected.abs().max() > 0
        assert (ours - expected).abs().max() <= 1e-9 * expected.abs().max(), rule
    assert no_hooks(model)
    with torch.no_grad():
        assert torch.equal(model(image[None]), logits)


def test_cone_and_crops_on_a_resnet_equal_the_full_image(monkeypatch):
    model = torchvision_model("resnet18")
    torch.manual_seed(2)
    images = torch.randn(3, 3, 112, 112)
    units = [(5, 0, 0), (9, 13, 27), (3, 27, 27)]  # layer1 is 28x28: a corner, the middle, the far corner
    shapes, run = [], _Request.run

    def recorded(self, x, *args, **kwargs):
        shapes.append(tuple(x.shape))
        return run(self, x, *args, **kwargs)

    monkeypatch.setattr(_Request, "run", recorded)
    dn = Deconvnet(model)
    full = run(_Request(model, "layer1"), images, units)[0]
    projection = dn.projection(images, "layer1", units)  # residual additions (in place), BatchNorm, in-place ReLUs
    out = projection.values
    assert projection.method == "cone" and shapes == []
    assert (out - full).abs().max() <= 1e-5 * full.abs().max()
    out = _project_crops(_Request(model, "layer1"), images, units)[0]  # the fallback
    assert shapes == [(3, 3, 48, 48)]  # the 43 px field from a multiple of 4: 48 px of 112
    assert (out - full).abs().max() <= 1e-5 * full.abs().max()


def test_an_unknown_op_in_the_cone_runs_the_full_image(monkeypatch):
    torch.manual_seed(3)
    model = Reshaping().eval()
    image = torch.randn(3, 16, 16)
    dn = Deconvnet(model)
    projection = dn.projection(image[None], "head", [(1, 10, 10)])
    ours = projection.values
    assert projection.method == "full image: the cone holds pixel_shuffle (shuffle), which the geometry does not follow"
    assert torch.allclose(ours[0], reference_projection(model, image, "head", (1, 10, 10), "deconvnet", monkeypatch))


def test_relu6_is_a_named_error_or_acts_as_the_gradient():
    model = torchvision_model("mobilenet_v2")
    image = torch.randn(1, 3, 64, 64)
    with pytest.raises(UserError, match=r"ReLU6.*'features\.3\.conv\.1\.2'.*other_activations='gradient'"):
        Deconvnet(model).project(image, "features.3", [(0, 4, 4)])
    assert no_hooks(model)
    ours = Deconvnet(model, other_activations="gradient").project(image, "features.3", [(0, 4, 4)])
    assert torch.equal(ours, Deconvnet(model).project(image, "features.3", [(0, 4, 4)], rule="gradient"))
    assert no_hooks(model)
