"""Architecture selection (Fig. 6): filter numbers on hand-made filters, and the comparison of runs."""
import json
import math

import numpy as np
import pytest
import torch

from deconvnet.architecture import (accuracy_difference, aliased_energy, aliased_shares, architecture_findings,
                                    architecture_to_json, band_energy, draw_architecture, filter_metrics, architecture_run)
from deconvnet.checkpoint import CheckpointInfo, load_checkpoint, save_checkpoint
from deconvnet.cli import main
from deconvnet.data import open_source, preprocess_for
from deconvnet.models import build_model
from deconvnet.probe import activations
from deconvnet.subject import Subject, model_layers
from deconvnet.stats import HELD, INCONCLUSIVE, VERDICTS, t_quantile


def _filters(*rms_values: float) -> torch.Tensor:
    """3x3 filters of the given RMS, each a different random pattern."""
    w = torch.randn(len(rms_values), 1, 3, 3, generator=torch.Generator().manual_seed(0))
    w = w / w.pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt()
    return w * torch.tensor(rms_values).view(-1, 1, 1, 1)


def test_a_dead_filter_counts_dead():
    assert filter_metrics(_filters(1, 1, 1, 0))["dead"] == 0.25
    assert filter_metrics(_filters(1, 1, 1, 0.05))["dead"] == 0.25  # below 10% of the median
    assert filter_metrics(_filters(1, 0.8, 1.2, 0.5))["dead"] == 0.0


def test_dominant_filters_give_the_top_tenths_mean_over_the_median():
    m = filter_metrics(_filters(1, 1, 1, 1, 10))
    assert m["dominance"] == pytest.approx((10 + 1) / 2 / 1, rel=1e-5)  # 5 filters: the strongest 2 (at least 2)
    many = filter_metrics(_filters(*([1.0] * 17), 4, 6, 8))  # 20 filters: the strongest 2 of them, over the median 1
    assert many["dominance"] == pytest.approx((6 + 8) / 2, rel=1e-5)
    assert filter_metrics(_filters(2, 2, 2))["dominance"] == pytest.approx(1.0, rel=1e-5)
    assert m["rms"].tolist() == pytest.approx([1, 1, 1, 1, 10], rel=1e-5)


def test_frequency_bands_of_pure_filters():
    flat = torch.ones(1, 1, 3, 3)
    checker = torch.tensor([[1.0, -1, 1], [-1, 1, -1], [1, -1, 1]]).view(1, 1, 3, 3)
    x = torch.arange(12.0)
    wave = torch.cos(2 * torch.pi * 0.25 * x).view(1, 1, 1, 12).expand(1, 1, 12, 12)  # 0.25 cycles/pixel
    bands = torch.cat([band_energy(flat), band_energy(checker), band_energy(wave)])
    assert bands.sum(1).tolist() == pytest.approx([1, 1, 1], abs=1e-5)
    assert bands.argmax(1).tolist() == [0, 2, 1]  # low, high, mid
    assert bands[1, 2] > 0.8  # the checkerboard is almost all high frequency
    rgb = torch.cat([checker] * 3, 1)  # energy is summed over channels: same fractions
    assert band_energy(rgb)[0].tolist() == pytest.approx(bands[1].tolist(), abs=1e-5)


def test_aliased_energy_of_a_strided_filter():
    checker = torch.tensor([[1.0, -1, 1], [-1, 1, -1], [1, -1, 1]]).view(1, 1, 3, 3)
    flat = torch.ones(1, 1, 5, 5)
    assert aliased_energy(checker, 1) == 0.0  # sampling every pixel folds nothing back
    assert aliased_energy(checker, 2) > 0.9  # all its energy is above 0.25 cycles/pixel
    assert aliased_energy(flat, 2) < 0.2  # a 5x5 box: only its side lobes
    assert aliased_energy(flat, 4) > aliased_energy(flat, 2) > 0  # a larger stride folds back more
    shares = aliased_shares(torch.cat([checker, torch.zeros(1, 1, 3, 3)]), 2)
    assert shares[0] > 0.9 and shares[1].isnan()  # per filter; an all-zero filter has no spectrum


def _info(model, renorm: bool) -> CheckpointInfo:
    pre = preprocess_for(28, 1)
    return CheckpointInfo(model.config, [str(i) for i in range(10)], pre, {"top1": 0.5, "top5": 0.9, "n": 10000},
                          train_config={"renorm": renorm})


def test_compare_runs_and_findings(tmp_path):
    torch.manual_seed(0)
    source = open_source("digits", 28, 1)
    runs = []
    for name, renorm in (("zfnet-small", True), ("alexnet-small", True), ("zfnet-small", False)):
        model = build_model(name, 10).eval()
        with torch.no_grad():  # a filter that can never fire: no weights, negative bias
            model.conv1.weight[0] = 0
            model.conv1.bias[0] = -1
        subject = Subject(model, preprocess_for(28, 1), [str(i) for i in range(10)], name, [], {}, info=_info(model, renorm))
        subject.stages, subject.layer_numbers = model_layers(model, subject.calls)
        runs.append(architecture_run(subject, source, range(64), maps=4))
    assert [r.label for r in runs] == ["zfnet-small", "alexnet-small", "zfnet-small (no renorm)"]
    for r in runs:
        assert r.filters.shape[0] == len(r.rms) and len(r.maps) == 4
        assert r.metrics["silent"] == pytest.approx(1 / len(r.rms))  # the planted one (random filters fire)
        assert r.metrics["dead"] == pytest.approx(1 / len(r.rms))  # and its RMS is 0
        assert r.projections.shape[0] == 4 and 0 <= r.layer2_high <= 1
        assert sum(r.metrics["bands"].values()) == pytest.approx(1, abs=1e-4)
        assert len(r.per_filter["dead_or_silent"]) == len(r.rms) and sum(r.per_filter["dead_or_silent"]) == 1
        assert len(r.layer2_high_maps) == 4 and r.layer2_high == pytest.approx(sum(r.layer2_high_maps) / 4)
    claims = architecture_findings(runs)
    assert runs[0].aliasing == 0.0 and runs[1].aliasing > 0  # conv1 stride 1 vs 2
    assert len(claims) == 7 and all(c.verdict in VERDICTS and c.reading and c.quantity and c.if_not_held for c in claims)
    assert [c.unit for c in claims] == ["filters"] * 4 + ["maps", "seeds (Table 3's baseline) and 10000 test images",
                                                          "filters"]
    assert [c.n for c in claims[:5]] == [64, 64, 62, 62, 8]  # the planted all-zero filters have no spectrum
    assert all(c.interval is not None for c in claims[:5])
    assert claims[0].estimate == 0.0 and claims[0].verdict == INCONCLUSIVE  # one planted dead filter in each
    assert claims[3].verdict == HELD  # stride 2 aliases, stride 1 cannot: every filter's share is 0 in ZFNet's
    accuracy = claims[5]
    assert accuracy.estimate == 0.0 and accuracy.interval is None and accuracy.verdict == INCONCLUSIVE  # no seed noise
    assert architecture_findings(runs, [0.5, 0.52, 0.49])[5].interval is not None

    def dominance(run):  # the strongest tenth's mean / median RMS of the layer-1 filters, from the weights
        rms = np.sort(run.filters.double().pow(2).mean((1, 2, 3)).sqrt().numpy())
        return float(rms[-max(2, math.ceil(len(rms) / 10)):].mean() / np.median(rms))
    renorm = claims[-1]  # without minus with renormalisation, over both runs' filters
    assert renorm.estimate == pytest.approx(dominance(runs[2]) - dominance(runs[0]), rel=1e-5)
    assert renorm.n == len(runs[0].rms) + len(runs[2].rms) and renorm.unit == "filters"
    json.dumps(architecture_to_json(runs), allow_nan=False)
    draw_architecture(runs, tmp_path / "architecture.png")


def test_accuracy_difference_against_seed_and_test_noise():
    a, b = {"top1": 0.90, "n": 10000}, {"top1": 0.88, "n": 10000}
    binomial = (0.9 * 0.1 + 0.88 * 0.12) / 10000
    d, (low, high) = accuracy_difference(a, b, [0.90, 0.91, 0.89])  # seed sd 0.01
    half = t_quantile(2) * (2 * 0.01 ** 2 + binomial) ** 0.5
    assert d == pytest.approx(0.02) and (low, high) == pytest.approx((0.02 - half, 0.02 + half))
    assert low < 0  # 2 points within the noise of three seeds
    _, quiet = accuracy_difference(a, b, [0.90, 0.9001, 0.8999])  # seeds agree: the test images' spread decides
    assert quiet[0] > 0
    assert accuracy_difference(a, b, None)[1] is None


def test_compare_command(tmp_path):
    paths = []
    for name in ("zfnet-small", "alexnet-small"):
        model = build_model(name, 10)
        paths.append(tmp_path / f"{name}.pt")
        save_checkpoint(paths[-1], model, _info(model, True))
    out = tmp_path / "compare"
    assert main(["architecture", "--runs", ",".join(map(str, paths)), "--data", "digits", "--limit", "50",
                 "--maps", "3", "--out", str(out)]) == 0
    body = json.loads((out / "architecture.json").read_text())
    assert [r["label"] for r in body["runs"]] == ["zfnet-small", "alexnet-small"] and len(body["findings"]) == 6
    for run, path in zip(body["runs"], paths):  # the filter numbers from the saved weights, computed here
        model = torch.load(path, weights_only=True)["state_dict"]
        rms = model["conv1.weight"].double().pow(2).mean((1, 2, 3)).sqrt().numpy()
        assert run["filter_rms"] == pytest.approx(rms.tolist(), rel=1e-6)
        top = np.sort(rms)[-max(2, math.ceil(len(rms) / 10)):]
        assert run["dominance"] == pytest.approx(top.mean() / np.median(rms), rel=1e-6)
        assert run["dead"] == float(np.mean(rms < 0.1 * np.median(rms)))
        assert run["accuracy"] == {"top1": 0.5, "top5": 0.9, "n": 10000}
    net, info = load_checkpoint(paths[0])
    with torch.no_grad():  # silent: layer-1 maps that are 0 on all 50 images
        layer1 = activations(net, info.preprocess.eval(open_source("digits", 28, 1).get(range(50))), ["norm1"])["norm1"]
    assert body["runs"][0]["silent"] == float((layer1.amax((0, 2, 3)) <= 0).double().mean())
    assert body["runs"][0]["aliasing"] == 0.0 and body["runs"][1]["aliasing"] > 0  # conv1 stride 1 vs 2
    assert body["findings"][5]["interval"] is None and body["seed_noise"] is None
    noise = tmp_path / "ablation.json"
    noise.write_text(json.dumps({"seed_noise": {"test_top1": [10.0, 11.0, 9.5]}}))
    assert main(["architecture", "--runs", ",".join(map(str, paths)), "--data", "digits", "--limit", "50",
                 "--maps", "3", "--seed-noise", str(noise), "--out", str(out)]) == 0
    body = json.loads((out / "architecture.json").read_text())
    assert body["seed_noise"] == pytest.approx([0.9, 0.89, 0.905]) and body["findings"][5]["interval"] is not None
    noise.write_text("{}")
    assert main(["architecture", "--runs", str(paths[0]), "--seed-noise", str(noise), "--out", str(out)]) == 2
