"""Geometry: receptive fields of ZFNet (Fig. 3), the region an input change reaches, and the layers
the geometry refuses (graphs with branches: tests/test_dag.py)."""
import pytest
import torch
from torch import nn

from deconvnet import UserError, build_model
from deconvnet.geometry import graph_of, layer_field, reach, unit_box


@pytest.fixture(scope="module")
def zfnet():
    return build_model("zfnet", 10)


@pytest.mark.parametrize("layer, size, stride", [("conv1", 7, 2), ("conv2", 27, 8), ("conv3", 75, 16),
                                                 ("conv4", 107, 16), ("conv5", 139, 16), ("pool5", 171, 32)])
def test_zfnet_receptive_fields(zfnet, layer, size, stride):
    # conv1 7x7/2: 7; pool1 3x3/2: 7 + 2*2 = 11; conv2 5x5/2 at stride 4: 11 + 4*4 = 27; pool2 3x3/2
    # at 8: 27 + 8*2 = 43; conv3-5 3x3 at 16: 75, 107, 139; pool5 3x3/2 at 16: 171.
    assert layer_field(zfnet, layer, 224) == ((size, size), (stride, stride))
    top, left, bottom, right = unit_box(zfnet, layer, 3, 3, 224, clip=False)
    assert bottom - top + 1 == right - left + 1 == size
    top, left, bottom, right = unit_box(zfnet, layer, 0, 0, 224)
    assert top == left == 0 and bottom < size


def test_reach_is_the_forward_direction_of_the_field(zfnet):
    graph = graph_of(zfnet, 224)
    conv5 = graph.node(zfnet, "conv5")
    rows, cols = reach(graph, (100, 120), (0, 10))[conv5.index]
    for y in range(conv5.shape[2]):
        top, _, bottom, _ = unit_box(zfnet, "conv5", y, 0, 224)
        assert (rows[0] <= y <= rows[1]) == (top <= 120 and bottom >= 100)
    assert cols[0] == 0


def test_dilated_pooling_and_unknown_layers():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.MaxPool2d(3, 2, dilation=2), nn.Flatten(), nn.Linear(2 * 5 * 5, 3))
    assert unit_box(model, "1", 1, 1, 16) == (2, 2, 8, 8)  # pool rows 2, 4, 6 of conv rows 2..6 + 3x3
    assert layer_field(model, "3", 16) is None
    with pytest.raises(UserError, match="no spatial units"):
        unit_box(model, "3", 0, 0, 16)
    with pytest.raises(UserError, match="unknown layer"):
        unit_box(model, "nope", 0, 0, 16)
    with pytest.raises(UserError, match="outside"):
        unit_box(model, "1", 9, 0, 16)
    assert all(not m._forward_hooks for m in model.modules())
    assert torch.is_tensor(model(torch.zeros(1, 1, 16, 16)))
