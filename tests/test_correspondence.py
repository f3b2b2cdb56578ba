"""Correspondence (Table 1): Delta on a hand-made fixture, the random control, the CLI."""
from __future__ import annotations

import json
import math
from collections import OrderedDict

import pytest
import torch
from torch import nn

from deconvnet import UserError
from deconvnet.cli import main
from deconvnet.correspondence import (FASHION_PARTS, Correspondence, correspondence, correspondence_findings,
                                      correspondence_to_json, image_bootstrap, object_box, pair_matrix, random_boxes,
                                      relative_box)

# Three 1x2x2 images; the model's features are the pixels themselves ("pixels") and their doubles.
IMAGES = torch.tensor([[[[1.0, -2.0], [3.0, 4.0]]],
                       [[[5.0, 6.0], [7.0, -8.0]]],
                       [[[-1.0, -3.0], [2.0, 2.0]]]])
MODEL = nn.Sequential(OrderedDict(pixels=nn.Flatten(), doubled=nn.Linear(4, 4, bias=False))).eval()
MODEL.doubled.weight.data = 2 * torch.eye(4)


def test_delta_on_a_hand_made_fixture():
    # Masking the top row (fill 0): eps_i = the top row's pixels, 0 below, so sign(eps) is
    # [+ - 0 0], [+ + 0 0], [- - 0 0]: H = 1/4, 1/4 and 2/4 for pairs (0,1), (0,2), (1,2).
    top_row = [(0, 0, 0, 1)] * 3
    result = correspondence(MODEL, IMAGES, {"top": top_row}, layers=["pixels", "doubled"], repeats=2)
    for layer in ("pixels", "doubled"):
        assert result.hamming["top"][layer].tolist() == [0.25, 0.25, 0.5]
        assert result.delta("top", layer) == pytest.approx(2 * (0.25 + 0.25 + 0.5))  # ordered pairs i != j
    row = correspondence_to_json(result)["table"]["top"]["pixels"]
    assert row["mean"] == pytest.approx(1 / 3) and row["std"] == pytest.approx(math.sqrt(1 / 72))
    assert row["pairs"] == 3


def test_random_control_boxes():
    generator = torch.Generator().manual_seed(0)
    like = [(0, 0, 1, 2)] * 50  # 2 x 3 boxes
    frames = [(2, 3, 6, 9)] * 50
    boxes = random_boxes(like, frames, (10, 10), generator)
    assert all(b - t == 1 and r - l == 2 for t, l, b, r in boxes)
    assert all(2 <= t and b <= 6 and 3 <= l and r <= 9 for t, l, b, r in boxes)
    assert {t for t, _, _, _ in boxes} == {2, 3, 4, 5} and {l for _, l, _, _ in boxes} == {3, 4, 5, 6, 7}
    assert random_boxes([(0, 0, 4, 4)], [(8, 8, 9, 9)], (10, 10), generator) == [(5, 5, 9, 9)]  # pushed inside


def test_random_draws_follow_the_seed():
    images = torch.randn(4, 1, 12, 12)
    model = nn.Sequential(OrderedDict(conv=nn.Conv2d(1, 3, 3), flat=nn.Flatten())).eval()
    parts = {"corner": [(0, 0, 2, 2)] * 4}
    a = correspondence(model, images, parts, layers=["conv", "flat"], repeats=3, seed=1)
    b = correspondence(model, images, parts, layers=["conv", "flat"], repeats=3, seed=1)
    c = correspondence(model, images, parts, layers=["conv", "flat"], repeats=3, seed=2)
    assert len(a.boxes["random"]) == 3 and len(a.hamming["random"]["conv"]) == 3 * 6
    assert a.boxes["random"] == b.boxes["random"] != c.boxes["random"]
    assert torch.equal(a.hamming["random"]["flat"], b.hamming["random"]["flat"])
    (finding,) = correspondence_findings(a)
    mean = {k: float(v["conv"].mean()) for k, v in a.hamming.items()}
    assert finding.estimate == pytest.approx(mean["random"] - mean["corner"]) and finding.n == 4
    assert finding.interval[0] <= finding.estimate <= finding.interval[1]
    assert finding.ours["mean_hamming"]["corner"]["conv"] == pytest.approx(mean["corner"])


def table(part: torch.Tensor, random: torch.Tensor, draws: int = 2) -> Correspondence:
    """A Table 1 of ``len(part)`` images whose pair distances (n, n) are ``part`` for the part and
    ``random`` for every random draw, at both layers."""
    n = len(part)
    i, j = torch.triu_indices(n, n, offset=1)
    sets = {"toe": {layer: part[i, j] for layer in ("l5", "l7")},
            "random": {layer: random[i, j].repeat(draws) for layer in ("l5", "l7")}}
    boxes = {"toe": [[(0, 0, 1, 1)] * n], "random": [[(0, 0, 1, 1)] * n] * draws}
    return Correspondence(["l5", "l7"], boxes, sets, 0)


def test_pairs_as_a_matrix_and_draws_averaged():
    n = 4
    h = torch.arange(6, dtype=torch.float)  # pairs (0,1) (0,2) (0,3) (1,2) (1,3) (2,3)
    m = pair_matrix(torch.cat([h, h + 2]), n)  # two draws: per pair 1 more than h
    assert m[0, 1] == m[1, 0] == 1 and m[2, 3] == m[3, 2] == 6 and m[0, 0] == 0


def test_table1_verdict_over_images():
    """Random minus part, images resampled: held when every image's part is tighter, inconclusive when
    half the images go each way, not held when the part is looser everywhere."""
    n = 30
    noise = (torch.rand(n, n, generator=torch.Generator().manual_seed(0)) - 0.5) * 0.02
    noise = noise + noise.T  # symmetric, mean 0
    tight = correspondence_findings(table(0.05 + noise, torch.full((n, n), 0.10)))[0]
    assert tight.verdict == "held" and tight.n == 30 and tight.unit == "images" and tight.interval[0] > 0
    assert tight.ours["part_verdicts"] == {"toe": "held"}
    assert set(tight.ours["random_minus_part"]) == {"l5", "l7"} and "In l7:" in tight.reading
    side = torch.tensor([1.0] * 15 + [-1.0] * 15)  # images 0-14 tighter than random, 15-29 looser
    split = correspondence_findings(table(0.10 - 0.05 * (side[:, None] + side[None, :]) / 2 + noise,
                                          torch.full((n, n), 0.10)))[0]
    assert split.verdict == "inconclusive" and split.interval[0] < 0 < split.interval[1]
    loose = correspondence_findings(table(0.15 + noise, torch.full((n, n), 0.10)))[0]
    assert loose.verdict == "not held" and loose.interval[1] < 0


def test_one_image_cannot_carry_table1():
    """The pairs share images: a difference carried by the pairs of one image is not evidence, as
    resampling images (not pairs) leaves that image out of a third of the resamples."""
    n = 30
    d = torch.zeros(n, n, dtype=torch.float64)
    d[0, 1:] = d[1:, 0] = 1.0  # only pairs with image 0 differ
    estimate, (low, high) = image_bootstrap(d.numpy())
    assert estimate == pytest.approx(2 / n) and low == 0.0 < high
    (f,) = correspondence_findings(table(0.10 - d.float() * 0.05, torch.full((n, n), 0.10)))
    assert f.verdict == "inconclusive"


def test_boxes_from_the_object():
    mask = torch.zeros(28, 28, dtype=torch.bool)
    mask[8:21, 0:28] = True  # a sneaker's silhouette: rows 8..20
    assert object_box(mask) == (8, 0, 20, 27)
    assert object_box(torch.zeros(5, 5, dtype=torch.bool)) == (0, 0, 4, 4)
    toe = relative_box((8, 0, 20, 27), FASHION_PARTS["Sneaker"]["toe"])  # rows 0.4..1 of 13, cols 0..0.3 of 28
    assert toe == (8 + 5, 0, 20, 7)


def test_bad_boxes_are_user_errors():
    with pytest.raises(UserError, match="not inside"):
        correspondence(MODEL, IMAGES, {"x": [(0, 0, 2, 2)] * 3}, layers=["pixels"])
    with pytest.raises(UserError, match="names the control"):
        correspondence(MODEL, IMAGES, {"random": [(0, 0, 1, 1)] * 3}, layers=["pixels"])
    with pytest.raises(UserError, match="2 boxes for 3 images"):
        correspondence(MODEL, IMAGES, {"x": [(0, 0, 1, 1)] * 2}, layers=["pixels"])


def test_cli_correspond(tiny_checkpoint, tmp_path):
    assert main(["correspondence", "--checkpoint", str(tiny_checkpoint), "--data", "fashion-mnist:test",
                 "--class", "Sneaker", "--count", "3", "--repeats", "2", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "correspondence.json").read_text())
    assert (tmp_path / "correspondence.png").stat().st_size > 0
    assert record["labels"] == [7, 7, 7] and record["layers"] == ["pool5", "relu7"]
    assert set(record["table"]) == {"toe", "heel", "laces", "random"}
    assert record["table"]["random"]["pool5"]["pairs"] == 3 * 2 * 3  # 3 part sizes x 2 draws x 3 pairs
    (finding,) = record["findings"]
    assert finding["n"] == 3 and finding["unit"] == "images" and len(finding["interval"]) == 2
    assert set(finding["ours"]["part_verdicts"]) == {"toe", "heel", "laces"}
    assert 0 <= record["table"]["toe"]["relu7"]["mean"] <= 1
    parts = tmp_path / "parts.json"
    parts.write_text(json.dumps({"top": [0, 0, 5, 27], "middle": [[10, 0, 15, 27]] * 3}))
    assert main(["correspondence", "--checkpoint", str(tiny_checkpoint), "--data", "fashion-mnist:test",
                 "--index", "0,1,2", "--parts", str(parts), "--out", str(tmp_path / "b")]) == 0
    record = json.loads((tmp_path / "b" / "correspondence.json").read_text())
    assert record["boxes"]["top"] == [[[0, 0, 5, 27]] * 3]
    assert main(["correspondence", "--checkpoint", str(tiny_checkpoint), "--data", "fashion-mnist:test",
                 "--index", "0,1", "--part", "top=0,0,5,27", "--out", str(tmp_path / "c")]) == 0
    assert json.loads((tmp_path / "c" / "correspondence.json").read_text())["boxes"]["top"] == [[[0, 0, 5, 27]] * 2]
    for bad in (["--index", "0,1"], ["--index", "0,1", "--part", "top=0,0,5"]):  # no parts; a 3-number box
        assert main(["correspondence", "--checkpoint", str(tiny_checkpoint), "--data", "fashion-mnist:test", *bad,
                     "--out", str(tmp_path / "d")]) == 2
