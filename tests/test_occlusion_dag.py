"""Incremental occlusion on torchvision's architectures: residual additions, concatenations,
BatchNorm, adaptive pools, chains split over containers; every cell equals a direct forward pass of
the occluded image; panel (c) is an extra that may be missing, with the reason."""
from __future__ import annotations

import pytest
import torch

from deconvnet import UserError
from deconvnet.occlusion import occlude_image, occlusion_to_json
from tv import no_hooks, torchvision_model


@torch.no_grad()
def assert_cells_equal_direct(model, image, result, cells):
    for cell in cells:
        t, l = result.positions[cell]
        x = image.clone()
        x[:, t:t + result.size, l:l + result.size] = 0
        p = torch.softmax(model(x[None])[0], 0)
        assert abs(float(result.probability.flatten()[cell]) - float(p[result.target])) <= 1e-5, cell
        assert int(result.label.flatten()[cell]) == int(p.argmax())


@pytest.mark.parametrize("name, size, layer", [
    ("resnet18", 64, "layer2.0.relu_1"),
    ("densenet121", 48, "features.denseblock2"),
    ("googlenet", 64, "inception3b"),
    ("vgg11", 64, "features.10"),
    ("alexnet", 96, "features.8"),
])
def test_incremental_and_exact(name, size, layer):
    model = torchvision_model(name)
    image = torch.randn(3, size, size)
    with torch.no_grad():
        logits = model(image[None])
    result = occlude_image(model, image, size=size // 4, stride=size // 4, layer=layer)
    assert result.method == "incremental" and 0 < result.recomputed < 1
    assert result.projection is not None and result.projection_missing is None
    assert_cells_equal_direct(model, image, result, [0, 5, len(result.positions) - 1])
    assert no_hooks(model)
    with torch.no_grad():
        assert torch.equal(model(image[None]), logits)


def test_mobilenet_relu6_leaves_panel_c_out_with_the_reason_or_treats_it_as_the_gradient():
    model = torchvision_model("mobilenet_v2")
    image = torch.randn(3, 64, 64)
    result = occlude_image(model, image, size=16, stride=16, layer="features.4")
    assert result.method == "incremental" and result.projection is None
    assert "ReLU6" in result.projection_missing and "features.4" in result.projection_missing
    assert occlusion_to_json(result)["projection_missing"] == result.projection_missing
    assert_cells_equal_direct(model, image, result, [0, 7, 15])
    gradient = occlude_image(model, image, size=16, stride=16, layer="features.4", other_activations="gradient")
    assert gradient.projection is not None and gradient.projection.abs().sum() > 0
    torch.testing.assert_close(gradient.probability, result.probability)
    assert no_hooks(model)


def test_errors_leave_no_hooks_and_the_logits_unchanged():
    model = torchvision_model("resnet18")
    image = torch.randn(3, 64, 64)
    with torch.no_grad():
        logits = model(image[None])
    for layer, message in (("fc", "no feature maps"), ("layer9", "unknown layer"), ("layer1.0.relu_7", "did not run")):
        with pytest.raises(UserError, match=message):
            occlude_image(model, image, size=16, stride=16, layer=layer)
        assert no_hooks(model)
    with torch.no_grad():
        assert torch.equal(model(image[None]), logits)


def test_every_cell_exact_where_convs_pad_whole_axes_themselves(monkeypatch):
    """A conv whose window spans one axis's whole output pads that axis itself and reads a pasted
    region along the other: every one of the 49 cells equals its direct forward pass."""
    import sys
    module = sys.modules["deconvnet.occlusion"]  # the package's ``occlusion`` attribute is the function

    paddings = []
    conv2d = module.F.conv2d

    def spy(x, weight, bias=None, stride=1, padding=0, *rest):
        paddings.append(tuple(padding) if isinstance(padding, tuple) else (padding, padding))
        return conv2d(x, weight, bias, stride, padding, *rest)

    model = torchvision_model("resnet18")
    image = torch.randn(3, 96, 96)
    monkeypatch.setattr(module.F, "conv2d", spy)
    result = occlude_image(model, image, size=24, stride=12, layer="layer3")
    monkeypatch.undo()
    assert result.method == "incremental" and len(result.positions) == 49
    assert {(1, 0), (0, 1), (1, 1), (0, 0)} <= set(paddings)  # native on rows, on columns, on both, on none
    assert_cells_equal_direct(model, image, result, range(49))
    assert no_hooks(model)
