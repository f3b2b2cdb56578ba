"""Models: the paper's Fig. 3 sizes, named layers, initialisation and the RMS renormalisation."""
import pytest
import torch
from torch import nn

from deconvnet import build_model
from deconvnet.errors import UserError
from deconvnet.models import MODELS, ModelConfig, model_config, renormalise_filters
from deconvnet.probe import activations, find_module

NAMES = ["conv1", "relu1", "pool1", "norm1", "conv2", "relu2", "pool2", "norm2", "conv3", "relu3", "conv4",
         "relu4", "conv5", "relu5", "pool5", "flatten", "fc6", "relu6", "drop6", "fc7", "relu7", "drop7", "fc8"]


def test_zfnet_sizes_match_fig3():
    model = build_model("zfnet", num_classes=1000)
    acts = activations(model, torch.zeros(1, 3, 224, 224), ["conv1", "pool1", "conv2", "pool2", "conv3",
                                                            "conv4", "conv5", "pool5", "fc6", "fc8"])
    sizes = {k: tuple(v.shape[1:]) for k, v in acts.items()}
    assert sizes == {"conv1": (96, 110, 110), "pool1": (96, 55, 55), "conv2": (256, 26, 26),
                     "pool2": (256, 13, 13), "conv3": (384, 13, 13), "conv4": (384, 13, 13),
                     "conv5": (256, 13, 13), "pool5": (256, 6, 6), "fc6": (4096,), "fc8": (1000,)}
    assert model.conv1.kernel_size == (7, 7) and model.conv1.stride == (2, 2)


def test_alexnet_layout():
    model = build_model("alexnet", num_classes=10)
    assert model.conv1.kernel_size == (11, 11) and model.conv1.stride == (4, 4)
    acts = activations(model, torch.zeros(1, 3, 224, 224), ["conv1", "pool5"])
    assert acts["conv1"].shape[1:] == (96, 55, 55) and acts["pool5"].shape[1:] == (256, 6, 6)


@pytest.mark.parametrize("name", list(MODELS))
def test_every_model_has_named_layers_and_finite_output(name):
    model = build_model(name, num_classes=7).eval()
    assert [n for n, _ in model.named_children()] == NAMES
    assert all(isinstance(getattr(model, f"relu{i}"), nn.ReLU) for i in (1, 2, 3, 4, 5, 6, 7))
    c = model.config
    out = model(torch.randn(2, c.in_channels, c.input_size, c.input_size))
    assert out.shape == (2, 7) and torch.isfinite(out).all()


def test_small_zfnet_keeps_the_layer1_contrast_to_alexnet():
    z, a = model_config("zfnet-small", 10), model_config("alexnet-small", 10)
    assert z.convs["conv1"].kernel < a.convs["conv1"].kernel
    assert z.convs["conv1"].stride < a.convs["conv1"].stride
    assert z.in_channels == a.in_channels == 1 and z.input_size == a.input_size == 28


def test_paper_init_is_normal_001_with_zero_bias():
    torch.manual_seed(0)
    model = build_model("zfnet", num_classes=10, init="paper")
    w = model.conv3.weight
    assert abs(w.std().item() - 0.01) < 5e-4 and abs(w.mean().item()) < 5e-4
    assert torch.count_nonzero(model.fc6.bias) == 0


def test_ablation_variant_removes_layers():
    model = build_model("zfnet-small", 10, convs={k: v for k, v in model_config("zfnet-small").convs.items()
                                                  if k not in ("conv3", "conv4")}, fc=(0, 64))
    names = [n for n, _ in model.named_children()]
    assert "conv3" not in names and "conv4" not in names and "fc6" not in names
    assert model.fc7.out_features == 64 and model(torch.zeros(1, 1, 28, 28)).shape == (1, 10)


def test_config_roundtrip_and_unknown_keys():
    c = model_config("zfnet-small", 10, fc=(64, 32))
    assert ModelConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="unknown model config keys"):
        ModelConfig.from_dict({**c.to_dict(), "bogus": 1})
    with pytest.raises(ValueError, match="unknown model"):
        build_model("vgg16")


def test_renormalisation_caps_filter_rms_at_radius():
    conv = nn.Conv2d(1, 3, 2)
    with torch.no_grad():
        conv.weight[0] = 1.0     # RMS 1 -> rescaled to 0.1
        conv.weight[1] = 0.05    # RMS 0.05 -> untouched
        conv.weight[2] = torch.tensor([[0.3, -0.3], [0.3, -0.3]])  # RMS 0.3 -> 0.1, shape kept
    renormalise_filters(nn.Sequential(conv), radius=0.1)
    rms = conv.weight.pow(2).mean(dim=(1, 2, 3)).sqrt()
    assert torch.allclose(rms, torch.tensor([0.1, 0.05, 0.1]))
    assert torch.allclose(conv.weight[2], torch.tensor([[[0.1, -0.1], [0.1, -0.1]]]))


def test_unknown_layer_is_a_user_error():
    with pytest.raises(UserError, match="unknown layer 'conv9'"):
        find_module(build_model("zfnet-small", 10), "conv9")


def test_fast_local_response_norm_equals_torch():
    from deconvnet.models import LocalResponseNorm
    x = torch.randn(3, 7, 5, 4) * 10
    for size in (2, 3, 5):
        ours, ref = LocalResponseNorm(size, 1e-2, 0.75, 2.0), nn.LocalResponseNorm(size, 1e-2, 0.75, 2.0)
        assert torch.allclose(ours(x), ref(x), rtol=1e-5, atol=1e-6)
