"""Top-k per feature map over a dataset (Fig. 2): brute force, ties, torchrun sharding, the CLI."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from deconvnet import build_model, load_checkpoint
from deconvnet.cli import main
from deconvnet.data import TensorSource, open_source, preprocess_for
from deconvnet.geometry import unit_box
from deconvnet.probe import activations
from deconvnet.topk import TopK, choose_maps, gallery, topk_pass, topk_findings
from test_dag import Reshaping


def random_source(n: int, seed: int = 0) -> TensorSource:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 1, 28, 28), generator=g, dtype=torch.uint8)
    return TensorSource("random", images, torch.zeros(n), ["x"], 28, 1)


def test_streaming_top_k_equals_brute_force():
    torch.manual_seed(0)
    model = build_model("zfnet-small", 10).eval()
    source, pre = random_source(40), preprocess_for(28, 1)
    layers = ["conv1", "conv3", "pool5"]
    tables = topk_pass(model, source, pre, layers, k=5, batch_size=16)
    with torch.no_grad():  # the same batches, so the values are bit-identical
        acts = [activations(model, pre.eval(source.get(range(s, min(s + 16, 40)))), layers) for s in range(0, 40, 16)]
    for layer in layers:
        full = torch.cat([part[layer] for part in acts])  # (40, C, H, W)
        width, a = full.shape[3], full.flatten(2).numpy()
        maxima = a.max(2)
        first = (a == maxima[..., None]).argmax(2)  # the first maximum in raster order
        t = tables[layer]
        for c in range(a.shape[1]):
            best = sorted((-float(maxima[i, c]), i, int(first[i, c])) for i in range(40))[:5]
            assert t.images[c].tolist() == [i for _, i, _ in best]
            assert t.values[c].tolist() == [-v for v, _, _ in best]
            assert (t.ys[c] * width + t.xs[c]).tolist() == [w for _, _, w in best]
        assert t.boxes[3, 0].tolist() == list(unit_box(model, layer, int(t.ys[3, 0]), int(t.xs[3, 0]), 28))


def _ties() -> TensorSource:
    # Image 6 has one 250; images 1-5 each have two 200s, at (3, 4) and (10, 2); the rest are 0.
    images = torch.zeros(8, 1, 28, 28, dtype=torch.uint8)
    images[1:6, 0, 10, 2] = 200
    images[1:6, 0, 3, 4] = 200
    images[6, 0, 20, 20] = 250
    return TensorSource("ties", images, torch.zeros(8), ["x"], 28, 1)


def test_ties_break_by_image_index_then_raster_order():
    conv = nn.Conv2d(1, 1, 1)
    conv.weight.data.fill_(1.0)
    conv.bias.data.zero_()
    model = nn.Sequential(conv).eval()
    # Batches of 3 see the tied images in two different batches.
    t = topk_pass(model, _ties(), preprocess_for(28, 1), ["0"], k=4, batch_size=3)["0"]
    assert t.images[0].tolist() == [6, 1, 2, 3]
    assert torch.allclose(t.values[0], torch.tensor([250.0, 200.0, 200.0, 200.0]) / 255, rtol=1e-6, atol=0)
    assert t.ys[0].tolist() == [20, 3, 3, 3] and t.xs[0].tolist() == [20, 4, 4, 4]
    assert t.boxes[0].tolist() == [[20, 20, 20, 20]] + [[3, 4, 3, 4]] * 3


def test_fewer_images_than_k_leaves_empty_slots():
    model = build_model("zfnet-small", 10).eval()
    t = topk_pass(model, random_source(3), preprocess_for(28, 1), ["conv2"], k=5)["conv2"]
    assert t.images[:, :3].sort(1).values.tolist() == [[0, 1, 2]] * t.images.shape[0]
    assert (t.images[:, 3:] == -1).all() and torch.isinf(t.values[:, 3:]).all()


def test_class_purity_of_top_images():
    labels = torch.tensor([0, 0, 1, 2, 2, 2])
    zeros = torch.zeros(2, 3, dtype=torch.long)
    low = TopK(torch.tensor([[3.0, 2, 1], [0, -1, -2]]), torch.tensor([[0, 2, 3], [0, 1, 2]]), zeros, zeros)
    high = TopK(torch.tensor([[3.0, 2, 1], [5, 4, 0]]), torch.tensor([[0, 1, 2], [3, 4, 5]]), zeros, zeros)
    findings = topk_findings({"conv1": low, "conv5": high}, labels)
    # conv1: map 0 has labels 0, 1, 2 -> 1/3; map 1 does not fire. conv5: 2/3 and 3/3.
    assert findings[0].ours == {"class_purity": {"conv1": round(1 / 3, 3), "conv5": round((2 / 3 + 1) / 2, 3)},
                                "maps_that_fire": {"conv1": 1, "conv5": 2}}
    assert "33.3% of the time in conv1 and 83.3% in conv5" in findings[0].reading
    assert findings[0].n == 3 and findings[0].unit == "maps"  # conv1's map 1 does not fire: 1 + 2 maps
    assert findings[0].estimate == pytest.approx(0.5)


def purity_tables(low: list[int], high: list[int]) -> tuple[dict, torch.Tensor]:
    """Two layers of maps with k = 3 top images; map m of a layer is pure (its 3 images of one class)
    when its entry is 1, mixed (3 classes) when 0. Images 3c, 3c+1, 3c+2 carry class c."""
    labels = torch.arange(30) // 3
    pure, mixed = [0, 1, 2], [0, 3, 6]

    def layer(kinds: list[int]) -> TopK:
        images = torch.tensor([pure if k else mixed for k in kinds])
        values = torch.ones(len(kinds), 3)
        zeros = torch.zeros(len(kinds), 3, dtype=torch.long)
        return TopK(values, images, zeros, zeros)

    return {"conv1": layer(low), "conv5": layer(high)}, labels


def test_class_purity_over_every_map_two_groups():
    """Fig. 2: one purity per map, the layers' maps as two independent groups: held when the upper
    layer's maps are purer, inconclusive when both layers mix pure and mixed maps alike."""
    held = topk_findings(*purity_tables([0] * 20, [1] * 15 + [0] * 5))[0]
    assert held.verdict == "held" and held.n == 40 and held.interval[0] > 0
    assert held.estimate == pytest.approx(0.75 * (1 - 1 / 3))
    same = topk_findings(*purity_tables([1, 0] * 10, [0, 1] * 10))[0]
    assert same.verdict == "inconclusive" and same.interval[0] < 0 < same.interval[1]
    lower = topk_findings(*purity_tables([1] * 20, [0] * 20))[0]
    assert lower.verdict == "not held"
    dead = TopK(-torch.ones(2, 3), torch.zeros(2, 3, dtype=torch.long), *[torch.zeros(2, 3, dtype=torch.long)] * 2)
    tables, labels = purity_tables([1], [1])
    none = topk_findings({"conv1": dead, "conv5": tables["conv5"]}, labels)[0]
    assert none.verdict == "inconclusive" and none.n == 0 and "no map fired in conv1" in none.reading


def test_gallery_tiles_hold_the_receptive_field_patches():
    torch.manual_seed(1)
    model = build_model("zfnet-small", 10).eval()
    source, pre = random_source(20), preprocess_for(28, 1)
    table = topk_pass(model, source, pre, ["conv2"], k=3)["conv2"]
    maps = choose_maps(table, 2, seed=0)
    assert maps == choose_maps(table, 2, seed=0) and len(maps) == 2
    g = gallery(model, source, pre, "conv2", table, maps)
    field = 9  # conv1 3x3: 3 px; pool1 3x3/2: 3 + 2 = 5; conv2 3x3 at stride 2: 5 + 2 * 2 = 9
    assert g.projections.shape == g.patches.shape == (2, 3, 1, field, field)
    c, j = maps[1], 2
    top, left, bottom, right = table.boxes[c, j].tolist()
    unclipped = unit_box(model, "conv2", int(table.ys[c, j]), int(table.xs[c, j]), 28, clip=False)
    dy, dx = top - unclipped[0], left - unclipped[1]
    image = source.get([int(table.images[c, j])]).float() / 255
    tile = g.patches[1, j, 0, dy:dy + bottom - top + 1, dx:dx + right - left + 1]
    assert torch.equal(tile, image[0, 0, top:bottom + 1, left:right + 1])
    assert torch.isnan(g.patches[1, j, 0]).sum() == field * field - tile.numel()


def test_gallery_of_a_layer_whose_field_is_measured():
    torch.manual_seed(0)
    model = Reshaping().eval()  # a pixel shuffle: the geometry measures its field
    images = torch.randint(0, 256, (6, 3, 28, 28), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    source, pre = TensorSource("random", images, torch.zeros(6), ["x"], 28, 3), preprocess_for(28, 3)
    with pytest.warns(UserWarning, match="measured"):
        table = topk_pass(model, source, pre, ["head"], k=2)["head"]
        g = gallery(model, source, pre, "head", table, [0, 1], other_activations="gradient")
    sizes = [(b[2] - b[0] + 1, b[3] - b[1] + 1) for b in table.boxes[:2].flatten(0, 1).tolist()]
    side = max(max(h, w) for h, w in sizes)
    assert g.patches.shape == (2, 2, 3, side, side)
    top, left, bottom, right = table.boxes[0, 0].tolist()  # placed at the tile's corner
    image = source.get([int(table.images[0, 0])]).float() / 255
    assert torch.equal(g.patches[0, 0, 0, :bottom - top + 1, :right - left + 1],
                       image[0, 0, top:bottom + 1, left:right + 1])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_topk_one_process_and_torchrun_agree(tmp_path, tiny_checkpoint, capsys):
    folder = tmp_path / "data" / "things"  # ties across the two processes' shards
    folder.mkdir(parents=True)
    images = _ties().images
    fashion = open_source("fashion-mnist:test").get(range(12))
    for i, img in enumerate(torch.cat([images, fashion])):
        Image.fromarray(img[0].numpy()).save(folder / f"{i:02d}.png")
    args = ["topk", "--checkpoint", str(tiny_checkpoint), "--data", f"folder:{tmp_path / 'data'}",
            "--layers", "conv1,conv5", "--k", "4", "--maps", "2", "--json"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    printed = json.loads(capsys.readouterr().out)
    (finding,) = printed["findings"]
    assert finding["unit"] == "maps" and finding["n"] == sum(
        json.loads((tmp_path / "one" / "topk.json").read_text())["findings"][0]["ours"]["maps_that_fire"].values())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
         "-m", "deconvnet.cli", *args, "--out", str(tmp_path / "two")], capture_output=True, text=True, env=env)
    assert two.returncode == 0, two.stderr
    one = json.loads((tmp_path / "one" / "topk.json").read_text())
    other = json.loads((tmp_path / "two" / "topk.json").read_text())
    assert one["images"] == other["images"] == 20
    for layer in ("conv1", "conv5"):
        a, b = one["layers"][layer], other["layers"][layer]
        assert a["gallery_maps"] == b["gallery_maps"] == printed["gallery_maps"][layer]
        assert len(a["gallery_maps"]) == 2
        for ma, mb in zip(a["maps"], b["maps"]):
            assert [(e["image"], e["y"], e["x"], e["box"]) for e in ma["top"]] == \
                   [(e["image"], e["y"], e["x"], e["box"]) for e in mb["top"]]
            assert np.allclose([e["value"] for e in ma["top"]], [e["value"] for e in mb["top"]], rtol=1e-5)
        with Image.open(tmp_path / "one" / f"gallery-{layer}.png") as png:
            assert png.size[0] > 400 and png.size[1] > 200
    model, _ = load_checkpoint(tiny_checkpoint)
    assert len(one["layers"]["conv1"]["maps"]) == model.conv1.out_channels


def test_cli_project_writes_png_and_json(tmp_path, tiny_checkpoint, capsys):
    out = tmp_path / "unit.png"
    code = main(["project", "--checkpoint", str(tiny_checkpoint), "--data", "fashion-mnist:test", "--index", "7",
                 "--layer", "conv3", "--unit", "2,3,4", "--rule", "guided", "--out", str(out), "--json"])
    assert code == 0
    record = json.loads(capsys.readouterr().out)
    model, info = load_checkpoint(tiny_checkpoint)
    x = info.preprocess.eval(open_source("fashion-mnist:test").get([7]))
    with torch.no_grad():
        value = activations(model, x, "conv3")["conv3"][0, 2, 3, 4].item()
    assert record["value"] == value
    assert record["box"] == list(unit_box(model, "conv3", 3, 4, 28))
    assert json.loads(out.with_suffix(".json").read_text())["args"]["rule"] == "guided"
    with Image.open(out) as png:
        assert png.format == "PNG"
    assert main(["project", "--checkpoint", str(tiny_checkpoint), "--data", "fashion-mnist:test", "--index", "7",
                 "--layer", "conv3", "--out", str(out), "--json"]) == 0  # no --unit: the layer's strongest activation
    record = json.loads(capsys.readouterr().out)
    with torch.no_grad():
        a = activations(model, x, "conv3")["conv3"][0]
    assert record["value"] == a.max().item() == a[tuple(record["unit"])].item()
    assert main(["project", "--checkpoint", str(tiny_checkpoint), "--data", "fashion-mnist:test",
                 "--layer", "conv3", "--unit", "2,3", "--out", str(out)]) == 2
    assert "--unit is channel,y,x" in capsys.readouterr().err
