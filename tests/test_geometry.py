"""Geometry: receptive fields of ZFNet (Fig. 3) and the layers the arithmetic refuses."""
import pytest
from torch import nn

from deconvnet import UserError, build_model
from deconvnet.geometry import receptive_field, steps_to


@pytest.fixture(scope="module")
def zfnet():
    return build_model("zfnet", 10)


@pytest.mark.parametrize("layer, size", [("conv1", 7), ("conv2", 27), ("conv3", 75), ("conv4", 107),
                                         ("conv5", 139), ("pool5", 171)])
def test_zfnet_receptive_fields(zfnet, layer, size):
    # conv1 7x7/2: 7; pool1 3x3/2: 7 + 2*2 = 11; conv2 5x5/2 at stride 4: 11 + 4*4 = 27; pool2 3x3/2
    # at 8: 27 + 8*2 = 43; conv3-5 3x3 at 16: 75, 107, 139; pool5 3x3/2 at 16: 171.
    top, left, bottom, right = receptive_field(steps_to(zfnet, layer), 3, 3)
    assert bottom - top + 1 == right - left + 1 == size


def test_dilated_pooling_is_refused():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.MaxPool2d(3, 2, dilation=2))
    with pytest.raises(UserError, match="dilated pooling"):
        steps_to(model, "1")
