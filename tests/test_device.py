"""Devices and data at scale: every method follows the model's device and gives the CPU's numbers
(the CUDA copies run wherever CUDA exists), folder data decoded by workers gives the same tables,
and models whose output is a dict, an object with ``logits`` or a tuple are read through one place."""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import deconvnet
from deconvnet.checkpoint import load_checkpoint
from deconvnet.cli import main
from deconvnet.data import open_source
from deconvnet.deconvnet import Deconvnet
from deconvnet.occlusion import occlude_image
from deconvnet.subject import as_subject, load_subject
from deconvnet.topk import topk_pass
from deconvnet.train import evaluate
from tv import import_torchvision

DEVICES = [pytest.param("cpu"),
           pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                          reason="no CUDA on this machine: the GPU copy of the test"))]


@pytest.fixture(scope="module")
def checkpoint_model(tiny_checkpoint):
    return load_checkpoint(tiny_checkpoint)


@pytest.mark.parametrize("device", DEVICES)
def test_topk_projection_occlusion_and_evaluation_on_the_device_equal_the_cpus(checkpoint_model, device):
    model, info = checkpoint_model
    source = open_source("fashion-mnist:test", info.preprocess.stored_size, info.preprocess.channels)
    layers = ["conv2", "conv5"]
    on_cpu = topk_pass(model, source, info.preprocess, layers, k=3, indices=range(64))
    x = info.preprocess.eval(source.get(range(4)))
    units = [(1, 2, 2), (3, 1, 1), (0, 3, 3), (2, 0, 4)]
    projections = Deconvnet(model).project(x, "conv3", units, "deconvnet")
    occluded = occlude_image(model, x[0], size=8, stride=4, layer="conv5")
    accuracy = evaluate(model, source, info.preprocess, torch.arange(64))
    moved = model.to(device)
    try:
        here = topk_pass(moved, source, info.preprocess, layers, k=3, indices=range(64))
        for name in layers:
            assert torch.equal(here[name].images, on_cpu[name].images)
            torch.testing.assert_close(here[name].values, on_cpu[name].values, rtol=1e-4, atol=1e-5)
        got = Deconvnet(moved).project(x, "conv3", units, "deconvnet")
        assert got.device.type == "cpu"  # results come back where the images were
        torch.testing.assert_close(got, projections, rtol=1e-4, atol=1e-5 * float(projections.abs().max()))
        again = occlude_image(moved, x[0], size=8, stride=4, layer="conv5")
        assert again.probability.device.type == "cpu"
        torch.testing.assert_close(again.probability, occluded.probability, rtol=1e-4, atol=1e-5)
        assert evaluate(moved, source, info.preprocess, torch.arange(64))["top1"] == accuracy["top1"]
    finally:
        model.to("cpu")


@pytest.mark.parametrize("device", DEVICES)
def test_a_subject_on_the_device_runs_every_per_image_analysis(tiny_checkpoint, device):
    subject = load_subject(str(tiny_checkpoint), device=device)
    assert subject.device.type == device
    raw = subject.open_data("fashion-mnist:test").get(range(3))
    assert [r.probability.device.type for r in deconvnet.occlusion(subject, raw, size=8, stride=8)] == ["cpu"] * 3
    assert deconvnet.invariance(subject, raw, amounts={"rotation": [0.0, 30.0]}).probability["rotation"].shape == (3, 2)
    result = deconvnet.sanity(subject, raw[:2], layers=["conv5"], rules=("deconvnet",), steps=2)
    assert result.per_layer["conv5"].spearman["deconvnet"].device.type == "cpu"
    x = subject.prepare(raw).to(device)  # float inputs already on the device: Fig. 5's grids follow them
    moved = deconvnet.invariance(subject, x, amounts={"rotation": [0.0, 30.0], "scale": [1.0, 1.2]})
    assert moved.probability["rotation"].device.type == "cpu" and moved.probability["scale"].shape == (3, 2)
    run = deconvnet.architecture.architecture_run(subject, subject.open_data("fashion-mnist:test"), list(range(8)), maps=2)
    assert run.filters.device.type == "cpu" and len(run.per_filter["dead_or_silent"]) == len(run.filters)


@pytest.mark.parametrize("device", DEVICES)
def test_training_runs_on_the_device(tmp_path, device):
    from deconvnet.train import TrainConfig, train

    metrics = train(TrainConfig(model="zfnet-small", data="fashion-mnist", limit=64, batch_size=32, epochs=1,
                                device=device), tmp_path / "run")
    assert metrics["train_loss"] > 0 and (tmp_path / "run" / "final.pt").exists()
    assert next(load_checkpoint(tmp_path / "run" / "final.pt")[0].parameters()).device.type == "cpu"


def test_topk_with_workers_equals_topk_in_the_main_process(tmp_path, tiny_checkpoint):
    folder = tmp_path / "data"
    source = open_source("fashion-mnist:test")
    for i in range(40):
        (folder / source.classes[int(source.labels[i])].replace("/", "-")).mkdir(parents=True, exist_ok=True)
        Image.fromarray(source.get([i])[0, 0].numpy()).save(folder / source.classes[int(source.labels[i])].replace(
            "/", "-") / f"{i}.png")
    import_torchvision()
    subject = load_subject("torchvision:resnet18?num_classes=3", input_size=32, preprocess="unit")
    data = subject.open_data(f"folder:{folder}")
    zero = topk_pass(subject.model, data, subject.preprocess, subject.stages, k=4, batch_size=8, workers=0)
    two = topk_pass(subject.model, data, subject.preprocess, subject.stages, k=4, batch_size=8, workers=2)
    for name in subject.stages:
        assert torch.equal(zero[name].images, two[name].images) and torch.equal(zero[name].values, two[name].values)
    for workers in ("0", "2"):
        assert main(["topk", "--checkpoint", str(tiny_checkpoint), "--data", f"folder:{folder}", "--workers", workers,
                     "--batch-size", "16", "--maps", "2", "--out", str(tmp_path / workers)]) == 0
    tables = [json.loads((tmp_path / w / "topk.json").read_text())["layers"] for w in ("0", "2")]
    assert tables[0] == tables[1]


# ----------------------------------------------------------------------------- outputs other than a tensor

@dataclass
class ClassifierOutput:  # the shape of Hugging Face's ImageClassifierOutput
    logits: torch.Tensor
    hidden_states: tuple | None = None


class Net(nn.Module):
    """A small convnet whose forward returns its scores as ``kind`` says: a dict, an object with
    ``logits``, or a tuple (as GoogLeNet in training mode)."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.pool, self.head = nn.AdaptiveAvgPool2d(1), nn.Linear(8, 4)

    def forward(self, x):
        scores = self.head(self.pool(self.features(x)).flatten(1))
        if self.kind == "dict":
            return {"logits": scores, "pooled": None}
        if self.kind == "object":
            return ClassifierOutput(scores)
        return scores, scores.detach() * 0


@pytest.mark.parametrize("kind", ["dict", "object", "tuple"])
def test_dict_logits_and_tuple_outputs_through_occlusion_invariance_and_topk(kind, tmp_path):
    torch.manual_seed(0)
    model = Net(kind).eval()
    plain = Net("tensor").eval()
    plain.load_state_dict(model.state_dict())
    plain.forward = lambda x: plain.head(plain.pool(plain.features(x)).flatten(1))  # the scores as a tensor
    subject = as_subject(model, preprocess="unit", input_size=32)
    reference = as_subject(plain, preprocess="unit", input_size=32)
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        expected = torch.softmax(plain(reference.prepare(images)), 1)
    got = deconvnet.occlusion(subject, images, size=8, stride=8)
    assert [r.target for r in got] == expected.argmax(1).tolist()
    assert [r.clean_probability for r in got] == pytest.approx(expected.max(1).values.tolist(), rel=1e-5)
    torch.testing.assert_close(got[1].probability, deconvnet.occlusion(reference, images[1:2], size=8, stride=8)[0].probability)
    result = deconvnet.invariance(subject, images, amounts={"translation": [0.0, 3.0]})
    torch.testing.assert_close(result.clean_probability, expected.max(1).values)
    folder = tmp_path / "photos" / "a"
    folder.mkdir(parents=True)
    for i, image in enumerate(images):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i}.png")
    tables = deconvnet.topk(subject, f"folder:{tmp_path / 'photos'}", k=2)
    again = deconvnet.topk(reference, f"folder:{tmp_path / 'photos'}", k=2)
    assert list(tables) == subject.stages
    for name in tables:
        assert torch.equal(tables[name].images, again[name].images)
    assert np.isfinite(tables[subject.stages[-1]].values.numpy()).all()
