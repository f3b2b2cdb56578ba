"""Sanity checks for projections (Adebayo et al. 2018): the randomised projections against a plain
autograd reference, every deletion point against a forward pass of its image, and the limiting cases
(a linear model, weights that randomisation does not change)."""
from __future__ import annotations

import copy
import json
from collections import OrderedDict

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from torch import nn

from deconvnet import UserError
from deconvnet.data import Preprocess
from deconvnet.findings import to_json
from deconvnet.probe import activations
from deconvnet.sanity import draw_deletion, draw_sanity, sanity, sanity_findings, sanity_to_json
from deconvnet.stats import VERDICTS
from deconvnet.subject import Subject, default_layers
from tv import no_hooks, torchvision_model

RULES = ("deconvnet", "guided", "gradient")


def tiny(seed: int = 0) -> nn.Module:
    """conv-bn-relu-pool, conv-relu-pool, conv-relu, global pool, linear; 32 px."""
    torch.manual_seed(seed)
    return nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(3, 8, 5, 1, 2)), ("bn1", nn.BatchNorm2d(8)), ("relu1", nn.ReLU()),
        ("pool1", nn.MaxPool2d(2)), ("conv2", nn.Conv2d(8, 12, 3, 1, 1)), ("relu2", nn.ReLU()),
        ("pool2", nn.MaxPool2d(2)), ("conv3", nn.Conv2d(12, 16, 3, 1, 1)), ("relu3", nn.ReLU()),
        ("gap", nn.AdaptiveAvgPool2d(1)), ("flat", nn.Flatten()), ("fc", nn.Linear(16, 5))])).eval()


def linear(seed: int = 0) -> nn.Module:
    """Convolutions and a linear layer only: no ReLU, no pooling; 28 px."""
    torch.manual_seed(seed)
    return nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(3, 6, 5, 1, 2)), ("conv2", nn.Conv2d(6, 8, 3, 2, 1)), ("conv3", nn.Conv2d(8, 8, 3, 1, 1)),
        ("flat", nn.Flatten()), ("fc", nn.Linear(8 * 14 * 14, 4))])).eval()


def subject_of(model: nn.Module, size: int, stages: list[str] | None = None) -> Subject:
    pre = Preprocess(size, size, 3, torch.tensor([0.5, 0.4, 0.3]).reshape(3, 1, 1), std=torch.full((3, 1, 1), 0.25))
    subject = Subject(model, pre, [], type(model).__name__, [], {})
    subject.stages = default_layers(subject.calls())[0] if stages is None else stages
    return subject


def raw_images(n: int, size: int, seed: int = 1) -> torch.Tensor:
    """Smooth random pictures (blobs, so projections and edges have structure)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size // 4, size // 4, generator=g)
    x = nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return (x * 255).round().to(torch.uint8)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on two shared cores, two threads wait on each other (seconds per test)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def tiny_run():
    model = tiny()
    subject = subject_of(model, 32, ["conv1", "conv2", "conv3"])
    raw = raw_images(3, 32)
    result = sanity(subject, raw, layers=["conv2", "conv3"], steps=4, seed=100)
    return model, subject, raw, result


def reference_projection(model: nn.Module, x: torch.Tensor, layer: str, unit, rule: str) -> torch.Tensor:
    """Plain autograd with backward hooks on the ReLU modules, sharing no code with the package:
    ``deconvnet`` rectifies the signal coming down, ``guided`` gates it by the forward pass and
    rectifies, ``gradient`` leaves it. The seed is the unit's own value."""
    names = [n for n, _ in model.named_children()]
    upto = nn.Sequential(OrderedDict((n, m) for n, m in list(model.named_children())[:names.index(layer) + 1]))
    handles = []
    for m in upto.modules():
        if isinstance(m, nn.ReLU) and rule != "gradient":
            if rule == "deconvnet":
                hook = lambda _m, grad_in, grad_out: (grad_out[0].clamp(min=0),)  # noqa: E731
            else:
                hook = lambda _m, grad_in, grad_out: (grad_in[0].clamp(min=0),)  # noqa: E731
            handles.append(m.register_full_backward_hook(hook))
    leaf = x[None].clone().requires_grad_(True)
    out = upto(leaf)
    seed = torch.zeros_like(out)
    seed[(0, *unit)] = out.detach()[(0, *unit)]
    out.backward(seed)
    for h in handles:
        h.remove()
    return leaf.grad[0]


def in_field(p: torch.Tensor, box) -> np.ndarray:
    top, left, bottom, right = box
    return p[:, top:bottom + 1, left:right + 1].abs().sum(0).double().numpy()


def test_randomised_projections_equal_plain_autograd_on_reinitialised_copies(tiny_run):
    model, subject, raw, result = tiny_run
    x = subject.prepare(raw)
    r = result.per_layer["conv3"]
    assert r.randomised == [["conv3"], ["conv2"], ["conv1", "bn1"]]  # from the layer down, bn with its conv
    order = ["conv1", "bn1", "conv2", "conv3"]  # forward order of the parametrised modules
    for rule in RULES:
        for n in range(len(raw)):
            unit, box = r.units[n][0], r.boxes[n][0]
            original = reference_projection(model, x[n], "conv3", unit, rule)
            assert torch.allclose(r.projections[rule][n, 0], original, atol=1e-5 * float(original.abs().max()))
            for step in range(len(r.randomised)):
                copied = copy.deepcopy(model)
                modules = dict(copied.named_modules())
                for names in r.randomised[:step + 1]:
                    for name in names:
                        torch.manual_seed(100 + order.index(name))
                        modules[name].reset_parameters()
                projected = reference_projection(copied, x[n], "conv3", unit, rule)
                expected = spearmanr(in_field(original, box).ravel(), in_field(projected, box).ravel())[0]
                assert r.spearman[rule][step, n, 0] == pytest.approx(expected, abs=1e-4)
                if n == 0:
                    shown = torch.as_tensor(in_field(projected, box)).float()
                    assert torch.allclose(r.shown[rule][step + 1], shown, atol=1e-5 * float(shown.max()))
    assert no_hooks(model)


def by_hand(x: torch.Tensor, ranking: torch.Tensor, count: int, kind: str) -> torch.Tensor:
    """Deletion: the first ``count`` positions of ``ranking`` set to 0 (the mean pixel after
    preprocessing) in every channel; insertion: the all-0 image with those positions from ``x``."""
    chosen = ranking[:count]
    if kind == "deletion":
        flat = x.clone().flatten(1)
        flat[:, chosen] = 0.0
    else:
        flat = torch.zeros_like(x).flatten(1)
        flat[:, chosen] = x.flatten(1)[:, chosen]
    return flat.reshape(x.shape)[None]


def test_deletion_points_equal_direct_forward_passes(tiny_run):
    model, subject, raw, result = tiny_run
    x = subject.prepare(raw)
    pixels = x.shape[2] * x.shape[3]
    counts = (result.fractions * pixels).round().long().tolist()
    assert counts[0] == 0 and counts[-1] == pixels and len(counts) == result.steps + 1
    with torch.no_grad():
        predicted = model(x).argmax(1)
        for layer in result.layers:
            r = result.per_layer[layer]
            for order in [*result.rules, "random"]:
                for n in range(len(raw)):
                    for u, (c, y, xx) in enumerate(r.units[n]):
                        if order == "random":  # insertion: the random deletion order reversed
                            ranking = {"deletion": result.random_order[n], "insertion": result.random_order[n].flip(0)}
                        else:
                            magnitude = r.projections[order][n, u].abs().sum(0).flatten()
                            ranking = dict.fromkeys(("deletion", "insertion"),
                                                    magnitude.argsort(descending=True, stable=True))
                        for kind in ("deletion", "insertion"):
                            for k, count in enumerate(counts):
                                image = by_hand(x[n], ranking[kind], count, kind)
                                value = float(activations(model, image, [layer])[layer][0, c, y, xx])
                                p = float(torch.softmax(model(image), 1)[0, predicted[n]])
                                got = float(getattr(r, kind)[order][n, u, k]) * float(r.clean_activation[n, u])
                                assert got == pytest.approx(value, rel=1e-4, abs=1e-5), (layer, order, n, kind, k)
                                got = float(getattr(r, f"{kind}_probability")[order][n, u, k])
                                assert got == pytest.approx(p, abs=1e-5), (layer, order, n, kind, k)
    assert torch.equal(result.predicted, predicted)


def test_linear_model_rules_agree_and_full_randomisation_decorrelates():
    model = linear()
    subject = subject_of(model, 28, ["conv1", "conv2", "conv3"])
    result = sanity(subject, raw_images(6, 28), layers=["conv3"], units_per_image=3, steps=2, seed=100)
    r = result.per_layer["conv3"]
    for rule in ("guided", "gradient"):  # no ReLU: the rules are the same map
        assert torch.allclose(r.projections[rule], r.projections["deconvnet"], atol=1e-6)
        assert torch.allclose(r.spearman[rule], r.spearman["deconvnet"], equal_nan=True)
    assert r.randomised == [["conv3"], ["conv2"], ["conv1"]]
    signed = r.signed["deconvnet"][-1].flatten()
    assert len(signed) == 18 and abs(float(signed.mean())) < 0.15  # every layer random: no rank agreement
    assert float(r.spearman["deconvnet"][-1].mean()) < float(r.spearman["deconvnet"][0].mean()) + 1e-9


def test_weights_that_randomisation_reproduces_keep_correlation_one():
    model = tiny(seed=3)
    for i, name in enumerate(["conv1", "bn1", "conv2", "conv3", "fc"]):  # the documented scheme: seed + i
        torch.manual_seed(7 + i)
        dict(model.named_modules())[name].reset_parameters()
    subject = subject_of(model, 32, ["conv1", "conv2", "conv3"])
    result = sanity(subject, raw_images(2, 32), layers=["conv3", "fc"], steps=2, seed=7)
    assert result.per_layer["fc"].randomised[0] == ["fc"] and len(result.per_layer["fc"].randomised) == 4
    for layer in result.layers:
        r = result.per_layer[layer]
        for rule in RULES:
            for key in ("spearman", "ssim", "signed"):
                values = getattr(r, key)[rule]
                assert torch.allclose(values, torch.ones_like(values), atol=1e-9), (layer, rule, key)


def test_resnet18_runs_with_default_layers():
    model = torchvision_model("resnet18", 10)
    subject = subject_of(model, 64)
    result = sanity(subject, raw_images(2, 64), rules=("deconvnet",), steps=2)
    assert result.layers == [subject.stages[len(subject.stages) // 2], subject.stages[-1]] == ["layer2", "layer4"]
    top = result.per_layer["layer4"]
    assert len(top.randomised) == 20 and top.randomised[0] == ["layer4.1.conv2", "layer4.1.bn2"]
    assert len(result.per_layer["layer2"].randomised) == 10
    assert top.spearman["deconvnet"].shape == (20, 2, 1) and top.deletion["random"].shape == (2, 1, 3)
    assert torch.isfinite(top.spearman["deconvnet"]).all()
    assert no_hooks(model)


def test_findings_carry_intervals_and_verdicts(tiny_run, tmp_path):
    *_, result = tiny_run
    findings = sanity_findings(result)
    assert len(findings) == 3 * len(result.rules) * len(result.layers)
    for f in findings:
        assert f.verdict in VERDICTS and f.n == 3 and f.unit == "images"
        assert f.interval is not None and f.interval[0] <= f.estimate <= f.interval[1]
        assert "what the unit learned (Sec. 2.1)" in f.claim and "assumed, not tested" in f.paper
    cascade = [f for f in findings if "randomisation" in f.claim]
    assert cascade and all(f.threshold == pytest.approx(1 - result.threshold) for f in cascade)
    json.dumps(to_json(findings))
    data = json.loads(json.dumps(sanity_to_json(result)))
    assert data["layers"] == ["conv2", "conv3"] and len(data["per_layer"]["conv3"]["cascade"]["spearman"]["guided"]) == 3
    draw_sanity(result, tmp_path / "sanity.png")
    draw_deletion(result, tmp_path / "deletion.png")
    assert (tmp_path / "sanity.png").stat().st_size > 0 and (tmp_path / "deletion.png").stat().st_size > 0
    # an image a test cannot use is counted and said, never dropped silently
    r = copy.deepcopy(result)
    r.per_layer["conv3"].other_images["guided"][1] = float("nan")  # the unit did not fire on the next image
    specific = next(f for f in sanity_findings(r) if "guided projections of conv3 are specific" in f.claim)
    assert specific.n == 2 and specific.ours["images"] == 3 and specific.ours["left_out"] == 1
    assert "1 of 3 images left out" in specific.reading


def test_bad_input_is_one_line_user_error(tiny_run):
    _, subject, raw, _ = tiny_run
    for kwargs, words in [({"layers": ["conv9"]}, "unknown layer"), ({"rules": ("lrp",)}, "unknown rule"),
                          ({"steps": 1}, "steps"), ({"units_per_image": 0}, "units_per_image")]:
        with pytest.raises(UserError, match=words) as e:
            sanity(subject, raw, **kwargs)
        assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="uint8"):
        sanity(subject, raw.float())
    assert subject.images(raw[:, :, :16, :16]).shape == raw.shape  # other sizes are resized, as files are


def test_the_measures_equal_scipy_and_scikit_image_pair_by_pair():
    from skimage.metrics import structural_similarity

    from deconvnet.sanity import _similarity, rank_correlation, ssim

    g = torch.Generator().manual_seed(11)
    a = torch.randn(4, 30, 40, generator=g).relu().round(decimals=1)  # many ties: zeros and repeated values
    b = (a + 0.5 * torch.randn(4, 30, 40, generator=g)).relu().round(decimals=1)
    got = rank_correlation(a, b)
    for i in range(4):
        assert float(got[i]) == pytest.approx(spearmanr(a[i].ravel(), b[i].ravel())[0], abs=1e-12)
    assert torch.isnan(rank_correlation(torch.ones(1, 9), torch.randn(1, 9))).all()  # a constant map
    x = torch.rand(3, 25, 33, generator=g, dtype=torch.float64)
    y = (x + 0.3 * torch.rand(3, 25, 33, generator=g, dtype=torch.float64)).clamp(0, 1)
    got = ssim(x, y)
    for i in range(3):
        expected = structural_similarity(x[i].numpy(), y[i].numpy(), gaussian_weights=True, sigma=1.5,
                                         use_sample_covariance=False, data_range=1.0)
        assert float(got[i]) == pytest.approx(expected, abs=1e-12)
    # several boxes of different shapes in one call; an all-zero projection has no SSIM
    original, other = torch.randn(3, 2, 20, 20, generator=g), torch.randn(3, 2, 20, 20, generator=g)
    other[2] = 0
    boxes = [(0, 0, 19, 19), (3, 4, 15, 17), (0, 0, 19, 19)]
    got = _similarity(original, other, boxes)
    for i, (top, left, bottom, right) in enumerate(boxes[:2]):
        p, q = (m[i, :, top:bottom + 1, left:right + 1].double() for m in (original, other))
        pa, qa = p.abs().sum(0), q.abs().sum(0)
        expected = structural_similarity((pa / pa.max()).numpy(), (qa / qa.max()).numpy(), gaussian_weights=True,
                                         sigma=1.5, use_sample_covariance=False, data_range=1.0)
        assert float(got[i, 0]) == pytest.approx(spearmanr(pa.ravel(), qa.ravel())[0], abs=1e-12)
        assert float(got[i, 1]) == pytest.approx(expected, abs=1e-12)
        assert float(got[i, 2]) == pytest.approx(spearmanr(p.sum(0).ravel(), q.sum(0).ravel())[0], abs=1e-12)
    assert torch.isnan(got[2]).all()  # constant maps: no rank correlation, no SSIM
