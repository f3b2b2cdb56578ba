"""The probe: one name per call of a module (as torchvision's feature extraction names them)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from deconvnet import UserError
from deconvnet.geometry import layer_calls
from deconvnet.probe import activations, find_module
from tv import import_torchvision


class Twice(nn.Module):
    """One ReLU module called twice, and a module whose own name looks like a second call."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.relu = nn.ReLU()
        self.relu_1 = nn.Identity()
        self.block = nn.Sequential(nn.Conv2d(2, 2, 1), nn.ReLU(inplace=True))

    def forward(self, x):
        x = self.relu(self.conv(x))
        x = self.block(x * 2)
        return self.relu_1(self.relu(x - 1))


def test_calls_are_named_in_forward_order_with_containers():
    model = Twice().eval()
    calls = layer_calls(model, (5, 5))
    assert [c.name for c in calls] == ["conv", "relu", "block.0", "block.1", "block", "relu_1", "relu_1"]
    assert calls[0].type == "Conv2d" and calls[0].shape == (2, 5, 5)
    assert calls[-2].module is model.relu and calls[-1].module is model.relu_1
    assert all(not m._forward_hooks for m in model.modules())


def test_activations_of_a_later_call_and_a_real_module_named_like_one():
    model = Twice().eval()
    x = torch.randn(2, 1, 5, 5)
    a = activations(model, x, ["relu", "relu_1", "block"])
    first = torch.relu(model.conv(x))
    second = torch.relu(model.block(first * 2) - 1)
    torch.testing.assert_close(a["relu"], first)
    torch.testing.assert_close(a["block"], model.block(first * 2))
    torch.testing.assert_close(a["relu_1"], second)  # the module ``relu_1`` (identity) wins
    assert find_module(model, "relu_1") is model.relu_1


def test_unknown_names_are_one_line_errors():
    model = Twice().eval()
    for name in ("relu_7", "conv_1", "nope", "relu_01"):
        with pytest.raises(UserError, match="unknown layer|did not run") as info:
            activations(model, torch.randn(1, 1, 5, 5), name)
        assert "\n" not in str(info.value)
    with pytest.raises(UserError, match="deconvnet inspect"):
        find_module(model, "nope")


def test_torchvision_resnet_relu_calls():
    tv = import_torchvision()
    model = tv.models.resnet18(num_classes=5).eval()
    x = torch.randn(1, 3, 64, 64)
    names = [c.name for c in layer_calls(model, (64, 64))]
    assert names.index("layer3.1.relu") < names.index("layer3.1.bn2") < names.index("layer3.1.relu_1")
    assert "layer3.1.relu_2" not in names and "layer3.1" in names and "fc" == names[-1]
    block = model.layer3[1]
    a = activations(model, x, ["layer3.0", "layer3.1.relu", "layer3.1.relu_1"])
    inner = torch.relu(block.bn1(block.conv1(a["layer3.0"])))
    torch.testing.assert_close(a["layer3.1.relu"], inner)
    torch.testing.assert_close(a["layer3.1.relu_1"], torch.relu(block.bn2(block.conv2(inner)) + a["layer3.0"]))
