"""The atlas (Fig. 2 for every map, as a static site): complete pages, no broken image, reuse, resume."""
import json
import os
import socket
import subprocess
import sys
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from PIL import Image

from deconvnet import load_checkpoint
from deconvnet import atlas as atlas_module
from deconvnet.atlas import build_atlas
from deconvnet.cli import main
from deconvnet.data import open_source


class _Site(HTMLParser):
    """The ids of the map cards, every <img src> and every <a href> of a page."""

    def __init__(self):
        super().__init__()
        self.maps, self.images, self.links = [], [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "div" and "map" in (attrs.get("class") or "").split():
            self.maps.append(attrs["id"])
        if tag == "img":
            self.images.append(attrs["src"])
        if tag == "a":
            self.links.append(attrs["href"])


def _parse(path) -> _Site:
    site = _Site()
    site.feed(path.read_text())
    return site


def _pngs(out) -> dict:
    return {p.relative_to(out).as_posix(): (p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("*/*.png")}


def test_cli_atlas_site_complete_rerun_reuses_and_partial_finishes(tmp_path, tiny_checkpoint, capsys):
    out = tmp_path / "atlas"
    args = ["atlas", "--checkpoint", str(tiny_checkpoint), "--data", "fashion-mnist:test", "--limit", "24",
            "--layers", "conv1,conv2", "--k", "4", "--out", str(out), "--json"]
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["maps"] == {"conv1": 32, "conv2": 64} and first["projected"] == 96 and first["reused"] == 0

    model, _ = load_checkpoint(tiny_checkpoint)
    index = _parse(out / "index.html")
    assert {"conv1.html", "conv2.html", "atlas.json"} <= set(index.links)
    record = json.loads((out / "atlas.json").read_text())
    labels = open_source("fashion-mnist:test").labels
    for layer, count in (("conv1", model.conv1.out_channels), ("conv2", model.conv2.out_channels)):
        page = _parse(out / f"{layer}.html")
        assert page.maps == [str(c) for c in range(count)]  # every map at LAYER.html#MAP
        assert {f"#{c}" for c in range(count)} <= set(page.links)
        assert len(page.images) == count
        for src in page.images:
            assert (out / src).is_file(), src
        maps = record["layers"][layer]["maps"]
        assert [m["map"] for m in maps] == list(range(count))
        for m in maps[:5]:
            values = [e["value"] for e in m["top"]]
            assert len(values) == 4 and values == sorted(values, reverse=True)
            assert len({e["image"] for e in m["top"]}) == 4  # k different images (Fig. 2)
            assert all(e["class"] == record["classes"][int(labels[e["image"]])] for e in m["top"])
        with Image.open(out / maps[0]["png"]) as png:  # 2 rows (projections, patches) of 4 tiles
            assert png.mode == "RGB" and png.size[0] > 1.5 * png.size[1]

    before = _pngs(out)
    assert main(args) == 0  # a finished atlas: nothing projected again
    again = json.loads(capsys.readouterr().out)
    assert again["projected"] == 0 and again["reused"] == 96 and again["topk_reused"]
    assert _pngs(out) == before

    manifest = json.loads((out / "manifest.json").read_text())  # as if killed before these were done
    manifest["done"]["conv2"] = [c for c in manifest["done"]["conv2"] if c not in (3, 40)]
    (out / "manifest.json").write_text(json.dumps(manifest))
    (out / "conv1" / "7.png").unlink()
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["projected"] == 3
    after = _pngs(out)
    redone = {"conv2/3.png", "conv2/40.png", "conv1/7.png"}
    assert {p for p in after if after[p][0] != before[p][0]} == redone
    assert all(after[p][1] == before[p][1] for p in after)  # the same pictures


def test_interrupted_atlas_resumes_where_it_stopped(tmp_path, tiny_checkpoint, monkeypatch):
    model, info = load_checkpoint(tiny_checkpoint)
    source = open_source("fashion-mnist:test")
    real, calls = atlas_module.gallery, []

    def killed_at_second_chunk(*args):
        calls.append(args[3])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(atlas_module, "gallery", killed_at_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        build_atlas(model, source, info.preprocess, ["conv1", "conv2"], tmp_path, k=3, indices=range(16))
    assert calls == ["conv1", "conv2"]  # one chunk per layer at 28 px: conv1 finished, then killed
    assert not (tmp_path / "index.html").exists()
    monkeypatch.setattr(atlas_module, "gallery", real)
    summary = build_atlas(model, source, info.preprocess, ["conv1", "conv2"], tmp_path, k=3, indices=range(16))
    assert summary["topk_reused"] and summary["reused"] == 32 and summary["projected"] == 64
    assert _parse(tmp_path / "conv2.html").maps == [str(c) for c in range(64)]
    assert not list(tmp_path.glob(".manifest-rank*"))
    other = build_atlas(model, source, info.preprocess, ["conv1"], tmp_path, k=2, indices=range(16))
    assert not other["topk_reused"] and other["projected"] == 32  # other inputs: nothing reused


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_atlas_under_torchrun_writes_the_same_site(tmp_path, tiny_checkpoint):
    args = ["atlas", "--checkpoint", str(tiny_checkpoint), "--data", "fashion-mnist:test", "--limit", "12",
            "--layers", "conv1,conv2", "--k", "2"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
         "-m", "deconvnet.cli", *args, "--out", str(tmp_path / "two")], capture_output=True, text=True, env=env)
    assert two.returncode == 0, two.stderr
    one, other = tmp_path / "one", tmp_path / "two"
    files = sorted(p.relative_to(one).as_posix() for p in one.rglob("*") if p.is_file() and p.suffix != ".pt")
    assert files == sorted(p.relative_to(other).as_posix() for p in other.rglob("*") if p.is_file() and p.suffix != ".pt")
    assert len([f for f in files if f.endswith(".png")]) == 32 + 64
    for name in files:
        if name.endswith(".png"):
            a, b = (torch.from_numpy(np.asarray(Image.open(d / name), dtype=np.float32)) for d in (one, other))
            assert (a - b).abs().max() <= 1, name  # projections equal up to float rounding of the values
        elif name.endswith(".html"):  # same cards, images and links (values may differ in the last digit)
            a, b = _parse(one / name), _parse(other / name)
            assert (a.maps, a.images, a.links) == (b.maps, b.images, b.links), name
    for layer in ("conv1", "conv2"):
        a, b = (json.loads((d / "atlas.json").read_text())["layers"][layer]["maps"] for d in (one, other))
        assert [[(e["image"], e["y"], e["x"], e["box"]) for e in m["top"]] for m in a] == \
               [[(e["image"], e["y"], e["x"], e["box"]) for e in m["top"]] for m in b]
        assert torch.allclose(torch.tensor([[e["value"] for e in m["top"]] for m in a]),
                              torch.tensor([[e["value"] for e in m["top"]] for m in b]), rtol=1e-5)
    assert json.loads((one / "manifest.json").read_text())["done"] == \
           json.loads((other / "manifest.json").read_text())["done"]


def test_atlas_reads_the_tables_deconvnet_topk_wrote(tmp_path, tiny_checkpoint, capsys):
    """one cache. The top-k pass `deconvnet topk` made for the same model, data and layers is
    the atlas's: its first run passes no image through the model for the tables."""
    data = ["--checkpoint", str(tiny_checkpoint), "--data", "fashion-mnist:test", "--layers", "conv1,conv2",
            "--k", "3", "--limit", "40"]
    assert main(["topk", *data, "--maps", "1", "--out", str(tmp_path / "fig2")]) == 0
    capsys.readouterr()
    assert main(["atlas", *data, "--out", str(tmp_path / "atlas"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["topk_reused"] and summary["projected"] == 96  # conv1's 32 maps and conv2's 64
    written = json.loads((tmp_path / "fig2" / "topk.json").read_text())["layers"]["conv2"]["maps"]
    drawn = json.loads((tmp_path / "atlas" / "atlas.json").read_text())["layers"]["conv2"]["maps"]
    assert [[e["image"] for e in m["top"]] for m in drawn] == [[e["image"] for e in m["top"]] for m in written]
