"""The deconvnet (Sec. 2.1) against hand-computed fixtures and an independent numpy reference."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deconvnet import Deconvnet, UserError, build_model
from deconvnet.deconvnet import _project_crops, _Request
from deconvnet.probe import activations, layer_names

RULES = ("deconvnet", "guided", "gradient")


# ----------------------------------------------------------------------------- numpy reference
# Straightforward loops over positions, written from the paper's description, sharing no code with
# the package: forward records every layer's input and every pool's switches; the way down unpools
# (adding each value at its switch), rectifies per rule and filters with the transposed filters.

def _out_size(n: int, k: int, s: int, p: int, ceil: bool) -> int:
    span = n + 2 * p - k
    out = (-(-span // s) if ceil else span // s) + 1
    if ceil and (out - 1) * s >= n + p:  # the last window must start inside the image or left padding
        out -= 1
    return out


def _spec(module: nn.Module):
    if isinstance(module, nn.Conv2d):
        return ("conv", module.weight.detach().double().numpy(), module.bias.detach().double().numpy(),
                module.stride[0], module.padding[0])
    if isinstance(module, nn.ReLU):
        return ("relu",)
    if isinstance(module, nn.MaxPool2d):
        stride = module.stride if isinstance(module.stride, int) else module.stride[0]
        return ("pool", module.kernel_size, stride, module.padding, module.ceil_mode)
    if isinstance(module, nn.LocalResponseNorm):
        return ("lrn", module.size, module.alpha, module.beta, module.k)
    assert isinstance(module, (nn.Dropout, nn.Identity)), module
    return ("identity",)


def _forward(spec, a: np.ndarray):
    """One layer on (C, H, W); returns (output, switches or None)."""
    kind = spec[0]
    if kind == "conv":
        _, w, b, s, p = spec
        o, _, k, _ = w.shape
        ap = np.pad(a, ((0, 0), (p, p), (p, p)))
        oh, ow = _out_size(a.shape[1], k, s, p, False), _out_size(a.shape[2], k, s, p, False)
        out = np.empty((o, oh, ow))
        flat = w.reshape(o, -1)
        for y in range(oh):
            for x in range(ow):
                out[:, y, x] = (flat * ap[:, y * s:y * s + k, x * s:x * s + k].reshape(-1)).sum(1) + b
        return out, None
    if kind == "relu":
        return np.maximum(a, 0), None
    if kind == "pool":
        _, k, s, p, ceil = spec
        c, h, w = a.shape
        oh, ow = _out_size(h, k, s, p, ceil), _out_size(w, k, s, p, ceil)
        out = np.empty((c, oh, ow))
        switches = np.empty((c, oh, ow, 2), dtype=int)
        for y in range(oh):
            for x in range(ow):
                top, left = max(y * s - p, 0), max(x * s - p, 0)
                bottom, right = min(y * s - p + k, h), min(x * s - p + k, w)
                window = a[:, top:bottom, left:right].reshape(c, -1)
                first = window.argmax(axis=1)  # the first maximum in raster order
                out[:, y, x] = window[np.arange(c), first]
                switches[:, y, x, 0] = top + first // (right - left)
                switches[:, y, x, 1] = left + first % (right - left)
        return out, switches
    if kind == "lrn":
        _, size, alpha, beta, kk = spec
        c = a.shape[0]
        out = np.empty_like(a)
        for ch in range(c):
            lo, hi = max(ch - size // 2, 0), min(ch + (size - 1) // 2, c - 1)
            out[ch] = a[ch] / (kk + alpha / size * (a[lo:hi + 1] ** 2).sum(0)) ** beta
        return out, None
    return a, None


def _backward(spec, g: np.ndarray, a: np.ndarray, switches, rule: str) -> np.ndarray:
    """The signal at a layer's input from the signal ``g`` at its output; ``a`` is the forward input."""
    kind = spec[0]
    if kind == "conv":  # transposed filtering: each output spreads its signal over its window
        _, w, _, s, p = spec
        o, ci, k, _ = w.shape
        h, wd = a.shape[1:]
        down = np.zeros((ci, h + 2 * p + k, wd + 2 * p + k))
        for y in range(g.shape[1]):
            for x in range(g.shape[2]):
                down[:, y * s:y * s + k, x * s:x * s + k] += (g[:, y, x, None, None, None] * w).sum(0)
        return down[:, p:p + h, p:p + wd]
    if kind == "relu":
        if rule == "deconvnet":
            return np.maximum(g, 0)
        gated = g * (a > 0)
        return np.maximum(gated, 0) if rule == "guided" else gated
    if kind == "pool":  # unpool: each value goes back to its switch; overlapping windows add
        down = np.zeros_like(a)
        channels = np.arange(g.shape[0])
        for y in range(g.shape[1]):
            for x in range(g.shape[2]):
                down[channels, switches[:, y, x, 0], switches[:, y, x, 1]] += g[:, y, x]
        return down
    return g  # contrast norm is skipped on the way down (Sec. 2.1); identity layers


def reference(specs: list, image: np.ndarray, unit: tuple, rule: str) -> np.ndarray:
    """Projection of ``unit`` at the output of the last spec, for one (C, H, W) image."""
    inputs, switches = [], []
    a = image.astype(np.float64)
    for spec in specs:
        inputs.append(a)
        a, sw = _forward(spec, a)
        switches.append(sw)
    g = np.zeros_like(a)
    g[unit] = a[unit]  # the activation itself, all others zero
    for spec, a_in, sw in zip(reversed(specs), reversed(inputs), reversed(switches)):
        g = _backward(spec, g, a_in, sw, rule)
    return g


def specs_to(model: nn.Module, layer: str) -> list:
    modules = dict(model.named_modules())
    names = layer_names(model)
    return [_spec(modules[n]) for n in names[:names.index(layer) + 1]]


def strongest(model: nn.Module, images: torch.Tensor, layer: str, seed: int = 0,
              at: dict[int, tuple[int, int]] | None = None) -> list[tuple]:
    """One unit per image: the strongest position of a random map that fires somewhere, or, for the
    images in ``at``, the strongest map at the firing position nearest to the given one (a corner)."""
    a = activations(model, images, layer)[layer]
    g = torch.Generator().manual_seed(seed)
    units = []
    for i in range(len(images)):
        if at and i in at:
            ys, xs = (a[i].amax(0) > 0).nonzero(as_tuple=True)
            j = int(((ys - at[i][0]).abs() + (xs - at[i][1]).abs()).argmin())
            y, x = int(ys[j]), int(xs[j])
            units.append((int(a[i, :, y, x].argmax()), y, x))
            continue
        alive = (a[i].flatten(1).amax(1) > 0).nonzero().flatten()
        c = int(alive[torch.randint(len(alive), (1,), generator=g)])
        y, x = divmod(int(a[i, c].flatten().argmax()), a.shape[3])
        units.append((c, y, x))
    return units


def assert_close(ours: torch.Tensor, ref: np.ndarray, rtol: float = 1e-5) -> None:
    """Agreement relative to the largest magnitude of the reference."""
    ref = torch.from_numpy(ref)
    scale = ref.abs().max().item()
    assert scale > 0
    assert (ours.double() - ref).abs().max().item() <= rtol * scale


# ----------------------------------------------------------------------------- hand-computed fixtures

def test_filtering_uses_the_transposed_filter_and_switch():
    # 3x3 image 0..8; 2x2 filter [[1, 2], [3, 4]] -> 27 37 / 57 67; ReLU; 2x2 pool -> 67, switch (1, 1).
    # Down: 67 back at (1, 1), rectified, then filtered with the transposed filter: 67 * W under (1, 1).
    conv = nn.Conv2d(1, 1, 2, bias=False)
    conv.weight.data = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    model = nn.Sequential(conv, nn.ReLU(), nn.MaxPool2d(2)).eval()
    x = torch.arange(9.0).view(1, 1, 3, 3)
    out = Deconvnet(model).project(x, "2", [(0, 0, 0)])
    assert out[0, 0].tolist() == [[0, 0, 0], [0, 67, 134], [0, 201, 268]]


def test_overlapping_pools_add_at_a_shared_switch():
    # One bright pixel at the centre of 5x5: all four 3x3/2 windows pick it. A 2x2 all-ones conv on
    # the 2x2 pooled map gives 4; down: 4 to each pooled unit, all four unpool onto (2, 2): 16.
    conv = nn.Conv2d(1, 1, 2, bias=False)
    conv.weight.data.fill_(1.0)
    model = nn.Sequential(nn.MaxPool2d(3, 2), conv).eval()
    x = torch.zeros(1, 1, 5, 5)
    x[0, 0, 2, 2] = 1.0
    out = Deconvnet(model).project(x, "1", [(0, 0, 0)])
    expected = torch.zeros(5, 5)
    expected[2, 2] = 16.0
    assert torch.equal(out[0, 0], expected)


def _two_layer_1d() -> nn.Module:
    # x -> conv1 (1x1: a = x, b = 2x) -> ReLU -> conv2 (1x3 over a, b; bias -1)
    conv1 = nn.Conv2d(1, 2, 1, bias=False)
    conv1.weight.data = torch.tensor([1.0, 2.0]).view(2, 1, 1, 1)
    conv2 = nn.Conv2d(2, 1, (1, 3))
    conv2.weight.data = torch.tensor([[1.0, 5.0, 3.0], [0.0, 1.0, -1.0]]).view(1, 2, 1, 3)
    conv2.bias.data = torch.tensor([-1.0])
    return nn.Sequential(conv1, nn.ReLU(), conv2).eval()


@pytest.mark.parametrize("rule, expected", [
    # x = [1, -1, 2]: a' = [1, 0, 2], b' = [2, 0, 4]; out = 1 + 6 - 4 - 1 = 2 (the seed).
    # Down through conv2: a' gets 2 * [1, 5, 3] = [2, 10, 6], b' gets 2 * [0, 1, -1] = [0, 2, -2].
    ("deconvnet", [2.0, 14.0, 6.0]),  # rectify the signal: a [2, 10, 6], b [0, 2, 0] -> a + 2b
    ("guided", [2.0, 0.0, 6.0]),      # gate by a, b > 0 ([1, 0, 1]), then rectify: a [2, 0, 6], b 0
    ("gradient", [2.0, 0.0, 2.0]),    # gate only: a [2, 0, 6], b [0, 0, -2] -> [2, 0, 6 - 4]
])
def test_relu_rules_by_hand(rule, expected):
    x = torch.tensor([1.0, -1.0, 2.0]).view(1, 1, 1, 3)
    out = Deconvnet(_two_layer_1d()).project(x, "2", [(0, 0, 0)], rule=rule)
    assert out.flatten().tolist() == expected


def test_seed_is_the_activation_and_biases_stay_out():
    # Same net, bias -1 -> +3: the seed becomes 6, the way down is the same, so everything scales by 3.
    model = _two_layer_1d()
    model[2].bias.data = torch.tensor([3.0])
    x = torch.tensor([1.0, -1.0, 2.0]).view(1, 1, 1, 3)
    out = Deconvnet(model).project(x, "2", [(0, 0, 0)])
    assert out.flatten().tolist() == [6.0, 42.0, 18.0]


# ----------------------------------------------------------------------------- against the reference

def _small_net() -> nn.Module:
    """Strided and padded convs, overlapping 3x3/2 pools with and without ceil mode, LRN."""
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, stride=2, padding=1), nn.ReLU(),
        nn.MaxPool2d(3, 2, ceil_mode=True), nn.LocalResponseNorm(3),
        nn.Conv2d(4, 5, 3, padding=1), nn.ReLU(inplace=True),
        nn.MaxPool2d(3, 2, padding=1),
        nn.Conv2d(5, 3, 2), nn.ReLU(),
    ).double().eval()


@pytest.mark.parametrize("rule", RULES)
def test_small_net_matches_reference_at_every_layer(rule):
    torch.manual_seed(0)
    model = _small_net()
    images = torch.randn(3, 2, 23, 23, dtype=torch.float64)
    dn = Deconvnet(model)
    for layer in layer_names(model):
        units = strongest(model, images, layer, at={1: (0, 0)})  # a corner: its field runs into padding
        out = dn.project(images, layer, units, rule=rule)
        for i, unit in enumerate(units):
            assert_close(out[i], reference(specs_to(model, layer), images[i].numpy(), unit, rule))


@pytest.mark.parametrize("name, size, layers", [
    ("zfnet-small", 28, ["conv1", "pool1", "norm2", "conv4", "pool5"]),
    ("zfnet", 224, ["conv1", "pool5"]),
])
def test_our_models_match_reference(name, size, layers):
    torch.manual_seed(1)
    model = build_model(name, 10).double().eval()
    images = torch.randn(2, model.config.in_channels, size, size, dtype=torch.float64)
    dn = Deconvnet(model)
    for layer in layers:
        units = strongest(model, images, layer)
        for rule in RULES if name == "zfnet-small" else ("deconvnet",):
            out = dn.project(images, layer, units, rule=rule)
            for i, unit in enumerate(units):
                assert_close(out[i], reference(specs_to(model, layer), images[i].numpy(), unit, rule))


class TorchvisionStyleAlexNet(nn.Module):
    """torchvision's AlexNet layout (features / avgpool / classifier, in-place ReLUs), narrower."""

    def __init__(self, widths=(16, 24, 32, 24, 24), num_classes: int = 5):
        super().__init__()
        a, b, c, d, e = widths
        self.features = nn.Sequential(
            nn.Conv2d(3, a, kernel_size=11, stride=4, padding=2), nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(a, b, kernel_size=5, padding=2), nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(b, c, kernel_size=3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(c, d, kernel_size=3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(d, e, kernel_size=3, padding=1), nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            nn.Dropout(0.5), nn.Linear(e * 36, 64), nn.ReLU(inplace=True),
            nn.Dropout(0.5), nn.Linear(64, 64), nn.ReLU(inplace=True), nn.Linear(64, num_classes),
        )

    def forward(self, x):
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


@pytest.mark.parametrize("layer", ["features.0", "features.1", "features.5", "features.10", "features.12"])
def test_torchvision_style_alexnet_matches_reference(layer):
    torch.manual_seed(2)
    model = TorchvisionStyleAlexNet().double().eval()
    images = torch.randn(2, 3, 224, 224, dtype=torch.float64)
    units = strongest(model, images, layer)
    for rule in ("deconvnet", "guided"):
        out = Deconvnet(model).project(images, layer, units, rule=rule)
        for i, unit in enumerate(units):
            assert_close(out[i], reference(specs_to(model, layer), images[i].numpy(), unit, rule))


def test_fully_connected_unit_is_the_scaled_gradient():
    torch.manual_seed(3)
    model = TorchvisionStyleAlexNet().eval()
    x = torch.randn(1, 3, 224, 224)
    out = Deconvnet(model).project(x, "classifier.4", [(7,)], rule="gradient")
    xg = x.clone().requires_grad_(True)
    hidden = model.classifier[:5](torch.flatten(model.avgpool(model.features(xg)), 1))
    (grad,) = torch.autograd.grad(hidden[0, 7], xg)
    assert torch.allclose(out, hidden[0, 7].detach() * grad, rtol=1e-4, atol=1e-6 * grad.abs().max().item())


# ----------------------------------------------------------------------------- cone and crops

def record_runs(monkeypatch) -> tuple[list, object]:
    """Record the input shape of every pass through the model; returns (shapes, the original pass)."""
    shapes, run = [], _Request.run

    def recorded(self, x, *args, **kwargs):
        shapes.append(tuple(x.shape))
        return run(self, x, *args, **kwargs)

    monkeypatch.setattr(_Request, "run", recorded)
    return shapes, run


@pytest.mark.parametrize("rule", RULES)
def test_cone_equals_the_full_image_with_padding_and_ceil_mode_pools(rule, monkeypatch):
    torch.manual_seed(6)
    model = _small_net()  # padded strided conv, ceil-mode pool, LRN, padded pool, in-place ReLU
    images = torch.randn(4, 2, 47, 47, dtype=torch.float64)  # every field smaller than the image
    dn = Deconvnet(model)
    shapes, run = record_runs(monkeypatch)
    for layer in layer_names(model):
        last = activations(model, images[:1], layer)[layer].shape[-1] - 1
        units = strongest(model, images, layer, at={0: (0, 0), 1: (last, last), 2: (0, last)})  # corners
        shapes.clear()
        projection = dn.projection(images, layer, units, rule=rule)
        out = projection.values
        assert projection.method == "cone" and shapes == []  # no pass through the model itself
        full = run(_Request(model, layer, (rule,)), images, units)[0]
        assert (out - full).abs().max() <= 1e-12 * full.abs().max(), layer


def test_cone_and_crops_on_zfnet_equal_the_full_image(monkeypatch):
    torch.manual_seed(4)
    model = build_model("zfnet", 10).eval()
    images = torch.randn(3, 3, 224, 224)
    dn = Deconvnet(model)
    shapes, run = record_runs(monkeypatch)
    for layer, crop, last in (("conv1", 8, 109), ("conv3", 96, 12), ("conv5", 160, 12)):
        units = strongest(model, images, layer, at={0: (0, 0), 2: (5, last)})  # a corner, the right border
        full = run(_Request(model, layer), images, units)[0]
        projection = dn.projection(images, layer, units)
        out = projection.values
        assert projection.method == "cone"
        assert (out - full).abs().max() <= 1e-5 * full.abs().max()
        shapes.clear()
        out = _project_crops(_Request(model, layer), images, units)[0]  # the fallback where the cone does not apply
        assert shapes == [(3, 3, crop, crop)]  # one batch of equal crops; ZFNet fields 7, 75, 139 px
        assert (out - full).abs().max() <= 1e-5 * full.abs().max()


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.skip = nn.Conv2d(1, 4, 1, stride=2)
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.conv2(self.pool(self.relu1(self.conv1(x))) + self.skip(x))


def test_a_branching_model_runs_its_cone_or_crops_equal_to_the_full_image(monkeypatch):
    torch.manual_seed(5)
    model = _Residual().eval()
    images = torch.randn(2, 1, 16, 16)
    units = [(1, 3, 4), (2, 7, 0)]
    shapes, run = record_runs(monkeypatch)
    dn = Deconvnet(model)
    full = run(_Request(model, "conv2"), images, units)[0]
    projection = dn.projection(images, "conv2", units)
    out = projection.values  # the skip reads a part of the input's box
    assert projection.method == "cone" and torch.allclose(out, full, atol=1e-6)
    shapes.clear()
    out = _project_crops(_Request(model, "conv2"), images, units)[0]
    # conv2's field: 3 pooled positions (6 px of conv1's map) under conv1's 3x3: 8 px, the skip's 5 px
    # (1x1 at stride 2) inside it; crops start at even pixels, one more for the odd start: 10 px
    assert shapes == [(2, 1, 10, 10)]
    assert torch.allclose(out, full, atol=1e-6)


class _Gated(nn.Module):
    """A map scaled by its own mean (squeeze-excitation without the excitation): a 1x1 map broadcast
    over a larger one, which the cone does not replay; and an avg-pool whose ceil mode hides its padding."""

    def __init__(self, ceil: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.pool = nn.AvgPool2d(2, ceil_mode=ceil)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.ceil = ceil

    def forward(self, x):
        y = self.pool(torch.relu(self.conv1(x)))
        return self.conv2(y if self.ceil else y * F.adaptive_avg_pool2d(y, 1))


@pytest.mark.parametrize("ceil, method", [(True, "crop: the cone holds avg_pool2d (pool)"),
                                          (False, "full image: mul broadcasts one map over another")])
def test_where_the_cone_does_not_apply_crops_or_the_full_image_run(ceil, method, monkeypatch):
    torch.manual_seed(7)
    model = _Gated(ceil).eval()
    images = torch.randn(2, 1, 15, 15)
    units = [(1, 0, 0), (3, 4, 6)]
    shapes, run = record_runs(monkeypatch)
    dn = Deconvnet(model)
    projection = dn.projection(images, "conv2", units)
    out = projection.values
    assert projection.method.startswith(method)
    full = run(_Request(model, "conv2"), images, units)[0]
    assert (out - full).abs().max() <= 1e-6 * full.abs().max()
    assert shapes[0][2:] == ((9, 9) if ceil else (15, 15))  # a crop (the 8 px field, aligned), or the image


@pytest.mark.parametrize("model, layer, size, method, passes", [(_small_net, "7", 47, "cone", 0),
                                                                (lambda: _Gated(True), "conv2", 15, "crop", 1),
                                                                (lambda: _Gated(False), "conv2", 15, "full image", 1)])
def test_several_rules_share_one_forward_pass_and_equal_each_rule_alone(model, layer, size, method, passes,
                                                                        monkeypatch):
    torch.manual_seed(8)
    model = model().double().eval()
    channels = next(m for m in model.modules() if isinstance(m, nn.Conv2d)).in_channels
    images = torch.randn(3, channels, size, size, dtype=torch.float64)
    units = strongest(model, images, layer, at={0: (0, 0), 1: (2, 3)})
    shapes, _ = record_runs(monkeypatch)
    together = Deconvnet(model).projections(images, layer, units, RULES)
    assert list(together) == list(RULES) and len(shapes) == passes  # one pass through the model for all rules
    for rule in RULES:
        alone = Deconvnet(model).projection(images, layer, units, rule)
        assert together[rule].method.startswith(method) and together[rule].method == alone.method
        assert torch.equal(together[rule].values, alone.values), rule
    assert not torch.equal(together["deconvnet"].values, together["gradient"].values)  # the rules do differ here
    with pytest.raises(UserError, match="unknown rule 'smooth'"):
        Deconvnet(model).projections(images, layer, units, ("gradient", "smooth"))


# ----------------------------------------------------------------------------- errors and hooks

class _FunctionalRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 2, 3)
        self.conv2 = nn.Conv2d(2, 2, 3)

    def forward(self, x):
        return self.conv2(torch.relu(self.conv1(x)))


def _no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
               and not m._backward_pre_hooks for m in model.modules())


def test_functional_relu_gets_the_rule_like_a_module():
    model = _FunctionalRelu().eval()
    as_module = nn.Sequential(model.conv1, nn.ReLU(), model.conv2).eval()
    x = torch.randn(1, 1, 8, 8)
    for rule in RULES:
        out = Deconvnet(model).project(x, "conv2", [(0, 1, 1)], rule=rule)
        assert _no_hooks(model) and out.abs().sum() > 0
        assert torch.equal(out, Deconvnet(as_module).project(x, "2", [(0, 1, 1)], rule=rule))


def test_hooks_are_removed_after_success_and_after_errors():
    model = build_model("zfnet-small", 10).eval()
    x = torch.randn(2, 1, 28, 28)
    dn = Deconvnet(model)
    dn.project(x, "conv3", [(0, 1, 1), (2, 3, 3)], rule="guided")
    assert _no_hooks(model)
    with pytest.raises(UserError, match="outside"):
        dn.project(x, "conv3", [(500, 1, 1), (0, 0, 0)])  # raised mid-pass, channel out of range
    assert _no_hooks(model)

    def boom(*_):
        raise RuntimeError("forced")
    model = build_model("zfnet-small", 10).eval()  # not traced yet: the trace fails, then the pass itself
    handle = model.conv2.register_forward_hook(boom)
    with pytest.raises(RuntimeError, match="forced"):
        Deconvnet(model).project(x, "conv3", [(0, 1, 1), (2, 3, 3)])
    handle.remove()
    assert _no_hooks(model)


@pytest.mark.parametrize("kwargs, message", [
    (dict(layer="conv9", units=[(0, 0, 0)]), "unknown layer"),
    (dict(layer="conv2", units=[(0, 0, 0), (0, 0, 0)]), "2 units for 1 images"),
    (dict(layer="conv2", units=[(0, 14, 0)]), r"\(0, 14, 0\) is outside conv2's output of shape \(\d+, 14, 14\)"),
    (dict(layer="conv2", units=[(0, 0, 0)], rule="lucky"), "unknown rule"),
])
def test_bad_requests_are_user_errors(kwargs, message):
    model = build_model("zfnet-small", 10).eval()
    with pytest.raises(UserError, match=message):
        Deconvnet(model).project(torch.zeros(1, 1, 28, 28), **kwargs)


def test_training_mode_is_refused():
    model = build_model("zfnet-small", 10)
    with pytest.raises(UserError, match="eval"):
        Deconvnet(model).project(torch.zeros(1, 1, 28, 28), "conv1", [(0, 0, 0)])
