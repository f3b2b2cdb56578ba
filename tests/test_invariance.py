"""Invariance (Fig. 5): distances and probabilities against direct computation and hand-made cases."""
from __future__ import annotations

import json

import pytest
import torch

from deconvnet import UserError, build_model
from deconvnet.cli import main
from deconvnet.data import preprocess_for
from deconvnet.invariance import Invariance, invariance, invariance_findings, transform
from deconvnet.probe import activations
from deconvnet.subject import Subject, model_layers


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = build_model("zfnet-small", 10).eval()
    pre = preprocess_for(28, 1, mean=torch.rand(1, 28, 28) * 0.3)
    raw = (torch.rand(3, 1, 28, 28) * 255).to(torch.uint8)
    subject = Subject(model, pre, [str(i) for i in range(10)], "zfnet-small", [], {})
    subject.stages, subject.layer_numbers = model_layers(model, subject.calls)
    return subject, pre, raw, torch.tensor([1, 4, 7])


def test_transforms_by_hand():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    down = transform(x, "translation", 1)
    assert down[0, 0, 0].tolist() == [0, 0, 0, 0] and torch.equal(down[0, 0, 1:], x[0, 0, :3])
    assert torch.equal(transform(x, "translation", -2)[0, 0], torch.cat([x[0, 0, 2:], torch.zeros(2, 4)]))
    assert torch.equal(transform(x, "translation", 4), torch.zeros_like(x))
    torch.testing.assert_close(transform(x, "rotation", 90), torch.rot90(x, -1, (2, 3)))  # clockwise on screen
    assert torch.equal(transform(x, "scale", 1.0), x)
    assert torch.equal(transform(x, "rotation", 0.0), x)
    with pytest.raises(UserError, match="unknown transform"):
        transform(x, "shear", 0.1)


def test_zero_transform_is_zero_distance_and_clean_probability(setup):
    model, pre, raw, labels = setup
    amounts = {"translation": [-1.0, 0.0, 2.0], "scale": [1.0, 1.2], "rotation": [0.0, 30.0]}
    result = invariance(model, raw, labels, amounts=amounts)
    assert result.layers == ["norm1", "relu7"]
    for kind, at in (("translation", 1), ("scale", 0), ("rotation", 0)):
        for layer in result.layers:
            assert result.distance[kind][layer][:, at].abs().max() <= 1e-6 * result.norm[layer].max()
            assert (result.distance[kind][layer][:, at + 1] > 0).all()
        torch.testing.assert_close(result.probability[kind][:, at], result.clean_probability)


def test_distances_and_probability_equal_direct_computation(setup):
    model, pre, raw, labels = setup
    result = invariance(model, raw, labels, layers=["conv2", "fc6"],
                        amounts={"translation": [3.0], "scale": [0.8], "rotation": [45.0]})
    with torch.no_grad():
        clean = activations(model.model, pre.eval(raw), ["conv2", "fc6", "fc8"])
        for kind, amount in (("translation", 3.0), ("scale", 0.8), ("rotation", 45.0)):
            moved = activations(model.model, pre.eval(transform(raw, kind, amount)), ["conv2", "fc6", "fc8"])
            for layer in ("conv2", "fc6"):
                expected = (moved[layer] - clean[layer]).flatten(1).norm(dim=1)
                torch.testing.assert_close(result.distance[kind][layer][:, 0], expected, rtol=1e-5, atol=1e-5)
            p = torch.softmax(moved["fc8"], 1)[torch.arange(3), labels]
            torch.testing.assert_close(result.probability[kind][:, 0], p, rtol=1e-5, atol=1e-6)


def curves(n: int, rotation_drop, translation_drop=0.15):
    """``n`` images; shifts -2..2. Layer "a" jumps to 0.5 of its norm at 1 px, "b" grows linearly to 0.4.
    p(true) falls by ``translation_drop`` over the translation sweep (mean), 0.1 under scale and by
    ``rotation_drop[i]`` at 90 degrees for image i."""
    d_a = torch.tensor([[5.0, 5.0, 0.0, 5.0, 5.0]] * n)  # norm 10: relative 0.5, share of largest 1.0
    d_b = torch.tensor([[4.0, 2.0, 0.0, 2.0, 4.0]] * n)  # norm 10: relative 0.2, share 0.5
    t = translation_drop
    p_t = torch.tensor([[1 - 4 * t / 3, 1 - 2 * t / 3, 1.0, 1 - 2 * t / 3, 1 - 4 * t / 3]] * n)
    return Invariance(
        layers=["a", "b"], labels=torch.zeros(n, dtype=torch.long),
        amounts={"translation": [-2.0, -1.0, 0.0, 1.0, 2.0], "scale": [1.0, 1.5], "rotation": [0.0, 90.0]},
        distance={"translation": {"a": d_a, "b": d_b}, "scale": {}, "rotation": {}},
        probability={"translation": p_t, "scale": torch.tensor([[1.0, 0.9]] * n),
                     "rotation": torch.stack([torch.ones(n), 1 - torch.as_tensor(rotation_drop)], 1)},
        clean_probability=torch.ones(n), norm={"a": torch.full((n,), 10.0), "b": torch.full((n,), 10.0)})


def test_findings_from_hand_made_curves():
    small, stable = invariance_findings(curves(2, [0.8, 0.8]))
    assert small.ours["shift_px"] == 1.0 and small.n == 2
    assert small.estimate == pytest.approx(0.3) and small.interval is None  # two equal values: no spread measured
    assert small.verdict == "inconclusive"
    assert small.ours["relative_distance"] == pytest.approx({"a": 0.5, "b": 0.2})
    assert small.ours["share_of_largest_distance"] == pytest.approx({"a": 1.0, "b": 0.5})
    assert "by 50.0% of their norm and b's by 20.0%" in small.reading
    assert stable.ours["mean_drop_of_p_true"] == pytest.approx({"translation": 0.15, "scale": 0.1, "rotation": 0.8})
    assert "0.15 under translation, 0.10 under scaling and 0.80 under rotation" in stable.reading
    assert stable.estimate == pytest.approx(0.8 - 0.15)


def test_findings_are_paired_over_images():
    """Per image, rotation's drop minus the larger of translation's and scale's: held when every image
    shows it, inconclusive when the images split evenly, not held when none does."""
    n = 30
    jitter = torch.linspace(-0.05, 0.05, n)
    shifted = curves(n, 0.8 + jitter)
    small, stable = invariance_findings(shifted)
    assert small.verdict == "held" and small.n == n  # relative distance 0.5 vs 0.2, share 1.0 vs 0.5: no spread
    assert stable.verdict == "held" and stable.n == n and stable.interval[0] > 0
    assert stable.estimate == pytest.approx(0.65)
    split = invariance_findings(curves(n, torch.tensor([0.45, -0.15] * (n // 2)) + jitter))[1]
    assert split.verdict == "inconclusive" and split.interval[0] < 0 < split.interval[1]
    none = invariance_findings(curves(n, 0.05 + jitter))[1]
    assert none.verdict == "not held" and none.interval[1] < 0


def test_cli_invariance(tiny_checkpoint, tmp_path):
    assert main(["invariance", "--checkpoint", str(tiny_checkpoint), "--data", "fashion-mnist:test", "--index", "0,1",
                 "--translations=-2,0,2", "--scales", "0.9,1,1.1", "--rotations", "0,90",
                 "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "invariance.json").read_text())
    assert (tmp_path / "invariance.png").stat().st_size > 0
    assert record["labels"] == [9, 2] and record["layers"] == ["norm1", "relu7"]
    sweep = record["sweeps"]["translation"]
    assert sweep["amounts"] == [-2.0, 0.0, 2.0] and max(d[1] for d in sweep["distance"]["norm1"]) <= 1e-6
    assert sweep["p_true"][0][1] == pytest.approx(record["p_true_untransformed"][0])
    assert [f["claim"].split(" ")[0] for f in record["findings"]] == ["a", "p(true)"]
    assert all(f["verdict"] in ("held", "not held", "inconclusive") and f["n"] == 2 and f["unit"] == "images"
               for f in record["findings"])
    assert main(["invariance", "--checkpoint", str(tiny_checkpoint), "--data", "fashion-mnist:test", "--count", "3",
                 "--translations=-1,0,1", "--scales", "1", "--rotations", "0,90", "--out", str(tmp_path / "n")]) == 0
    record = json.loads((tmp_path / "n" / "invariance.json").read_text())
    assert record["images"] == ["0", "1", "2"] and all(f["n"] == 3 for f in record["findings"])
    assert main(["invariance", "--checkpoint", str(tiny_checkpoint), "--data", "fashion-mnist:test", "--count", "3",
                 "--index", "0", "--out", str(tmp_path / "m")]) == 2
    assert main(["invariance", "--checkpoint", str(tiny_checkpoint), "--data", "fashion-mnist:test",
                 "--layers", "nope,relu7", "--out", str(tmp_path)]) == 2
