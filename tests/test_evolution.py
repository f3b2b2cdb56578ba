"""Feature evolution (Fig. 4): snapshots, the stable epoch, linear CKA, the findings, and the command."""
import json

import numpy as np
import pytest
import torch

from deconvnet.checkpoint import CheckpointInfo, load_checkpoint, save_checkpoint
from deconvnet.cli import main
from deconvnet.data import open_source, preprocess_for
from deconvnet.errors import UserError
from deconvnet.evolution import (Evolution, LayerEvolution, centred_gram, cka_from_grams, projection_evolution,
                                 evolution_findings, gram_cka, linear_cka, load_snapshots, settled_from,
                                 snapshot_paths, stable_from)
from deconvnet.models import build_model
from deconvnet.probe import activations
from deconvnet.stats import HELD, INCONCLUSIVE, NOT_HELD


def test_stable_from_hand_cases():
    epochs = [1, 2, 5, 10]
    assert stable_from(epochs, np.array([3, 3, 3, 3]), np.array([0.95, 0.99, 0.97])) == 1
    assert stable_from(epochs, np.array([7, 3, 3, 3]), np.array([0.2, 0.99, 0.97])) == 2
    assert stable_from(epochs, np.array([3, 3, 3, 3]), np.array([0.95, 0.5, 0.97])) == 5  # projection changed
    assert stable_from(epochs, np.array([3, 3, 3, 4]), np.array([0.95, 0.99, 0.97])) == 10  # never settles


def test_settled_from_hand_cases():
    epochs = [1, 2, 5, 10]
    assert settled_from(epochs, [True, True, True, False]) == 1  # the last (the reference) is not read
    assert settled_from(epochs, [True, False, True, True]) == 5
    assert settled_from(epochs, [False, False, False, True]) == 10


def _direct_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA (Kornblith et al. 2019) written out in feature space: ||Y'X||_F^2 / (||X'X||_F ||Y'Y||_F), columns centred."""
    x, y = x - x.mean(0), y - y.mean(0)
    return np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))


def test_linear_cka_is_the_formula_and_its_invariances():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 12)) + 2.0
    y = np.tanh(x[:, :6] @ rng.normal(size=(6, 9))) + 0.5 * rng.normal(size=(40, 9))
    assert linear_cka(x, y) == pytest.approx(_direct_cka(x, y), rel=1e-10)
    assert 0.2 < linear_cka(x, y) < 0.95  # a real test: neither end of the range
    rotation, _ = np.linalg.qr(rng.normal(size=(12, 12)))
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, 3.7 * x) == pytest.approx(1.0, abs=1e-12)  # isotropic scaling
    assert linear_cka(x, x @ rotation) == pytest.approx(1.0, abs=1e-12)  # orthogonal transform
    assert linear_cka(x @ rotation, 0.2 * y) == pytest.approx(linear_cka(x, y), rel=1e-10)
    stretched = x * np.linspace(0.1, 3, 12)  # anisotropic scaling changes the representation
    assert linear_cka(x, stretched) < 0.99


def test_weighted_cka_is_the_cka_of_the_resample():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(30, 5)), rng.normal(size=(30, 8))
    y[:, :5] += x
    pick = rng.integers(0, 30, 30)
    weights = np.bincount(pick, minlength=30)
    assert gram_cka(centred_gram(x), centred_gram(y), weights) == pytest.approx(_direct_cka(x[pick], y[pick]), rel=1e-9)


def _grams(speeds: dict[int, float], epochs: list[int], n: int = 60, seed: int = 0) -> dict[int, list[np.ndarray]]:
    """Layer n's representation at epoch e: its final one plus noise that decays as exp(-speed * e)."""
    rng = np.random.default_rng(seed)
    out = {}
    for layer, speed in speeds.items():
        final = rng.normal(size=(n, 20))
        out[layer] = [centred_gram(final + 3 * np.exp(-speed * e) * rng.normal(size=(n, 20))) for e in epochs[:-1]]
        out[layer].append(centred_gram(final))
    return out


def test_cka_findings_on_constructed_runs():
    epochs = [1, 2, 3, 4, 6, 8, 10]
    fast_low = cka_from_grams(epochs, _grams({1: 2.0, 2: 1.5, 3: 0.8, 4: 0.5, 5: 0.4}, epochs), resamples=50)
    assert fast_low.cka[1][-1] == pytest.approx(1.0) and fast_low.band[5].shape == (len(epochs), 2)
    assert fast_low.settled[1][0] < fast_low.settled[5][0]
    assert (fast_low.band[5][:-1, 0] < fast_low.band[5][:-1, 1]).all()  # probe images vary: bands have width
    result = Evolution(epochs, {}, fast_low)
    finding = evolution_findings(result)[-1]
    assert finding.verdict == HELD and finding.n == 60 and finding.interval[0] > 0 and "CKA" in finding.claim
    fast_high = cka_from_grams(epochs, _grams({1: 0.4, 2: 0.5, 3: 0.8, 4: 1.5, 5: 2.0}, epochs), resamples=50)
    assert evolution_findings(Evolution(epochs, {}, fast_high))[-1].verdict == NOT_HELD
    same = cka_from_grams(epochs, _grams({n: 1.0 for n in range(1, 6)}, epochs), resamples=50)
    assert evolution_findings(Evolution(epochs, {}, same))[-1].verdict != HELD


def test_cka_bands_are_the_percentiles_of_linear_cka_on_resampled_images():
    """Every resample at once equals linear CKA recomputed on each resample's duplicated rows."""
    from deconvnet.stats import SEED

    rng = np.random.default_rng(5)
    n, epochs = 40, [1, 2, 5]
    final = rng.normal(size=(n, 6))
    features = [final + rng.normal(size=(n, 6)) * s for s in (2.0, 0.5)] + [final]
    result = cka_from_grams(epochs, {1: [centred_gram(f) for f in features]}, resamples=30)
    draws = np.random.default_rng(SEED)  # the bootstrap's resamples: the same seed, the same draws
    picks = [draws.integers(0, n, n) for _ in range(30)]
    for s in range(2):
        by_hand = [linear_cka(features[s][p], final[p]) for p in picks]
        assert result.band[1][s] == pytest.approx(np.percentile(by_hand, [2.5, 97.5]), rel=1e-9)
        assert result.cka[1][s] == pytest.approx(linear_cka(features[s], final), rel=1e-12)


def _layer(stable: list[int]) -> LayerEvolution:
    m = len(stable)
    return LayerEvolution("x", list(range(m)), np.zeros((m, 2)), np.zeros((m, 2)), torch.zeros(m, 2, 1, 1, 1),
                          np.ones((m, 1)), stable)


def test_visual_findings_on_constructed_maps():
    def verdict_of(low: list[int], high: list[int]) -> str:
        layers = {1: _layer(low), 2: _layer(low), 3: _layer([5]), 4: _layer(high), 5: _layer(high)}
        finding = evolution_findings(Evolution([1, 30], layers))[0]
        assert finding.n == 4 * len(low) and finding.unit == "maps" and finding.if_not_held
        return finding.verdict

    assert verdict_of([1, 2, 1, 2, 3], [20, 25, 30, 25, 20]) == HELD
    assert verdict_of([20, 25, 30, 25, 20], [1, 2, 1, 2, 3]) == NOT_HELD
    assert verdict_of([1, 30, 1, 30, 2], [2, 30, 1, 30, 1]) == INCONCLUSIVE


def _run(tmp_path, weights: list[int]):
    """A run directory whose snapshot k holds a zfnet-small with random weights seeded ``weights[k-1]``."""
    for epoch, seed in enumerate(weights, 1):
        torch.manual_seed(seed)
        model = build_model("zfnet-small", 10)
        info = CheckpointInfo(model.config, [str(i) for i in range(10)], preprocess_for(28, 1), epoch=epoch,
                              train_config={"data": "digits"})
        save_checkpoint(tmp_path / "checkpoints" / f"epoch-{epoch}.pt", model, info)
    return tmp_path


def test_needs_two_snapshots(tmp_path):
    with pytest.raises(UserError, match="at least 2"):
        snapshot_paths(_run(tmp_path, [0]))


def test_unchanged_weights_are_stable(tmp_path):
    run = _run(tmp_path, [1, 2, 2])  # epochs 2 and 3 are the same model
    snapshots, info = load_snapshots(run)
    assert [e for e, _ in snapshots] == [1, 2, 3] and info.epoch == 3
    result = projection_evolution(snapshots, info.preprocess, open_source("digits", 28, 1), range(60), maps=2)
    assert result.epochs == [1, 2, 3] and list(result.layers) == [1, 2, 3, 4, 5]
    for layer in result.layers.values():
        assert layer.images.shape == (2, 3) and layer.correlation.shape == (2, 2)
        assert (layer.images[:, 1] == layer.images[:, 2]).all()
        assert layer.correlation[:, 1] == pytest.approx([1.0, 1.0])
        assert all(e <= 2 for e in layer.stable_epoch)
    [finding] = evolution_findings(result)  # no CKA measured here
    low = [e for n in (1, 2) for e in result.layers[n].stable_epoch]
    high = [e for n in (4, 5) for e in result.layers[n].stable_epoch]
    assert finding.n == len(low) + len(high) == 8 and finding.unit == "maps"
    assert finding.estimate == pytest.approx(np.mean(high) - np.mean(low))
    assert finding.ours == {f"layer{n}": round(float(np.mean(layer.stable_epoch)), 2) for n, layer in result.layers.items()}


def test_evolution_command(tmp_path):
    run = _run(tmp_path / "run", [1, 2])
    out = tmp_path / "out"
    assert main(["evolution", "--run", str(run), "--limit", "40", "--maps", "2", "--probe", "60", "--out", str(out)]) == 0
    body = json.loads((out / "evolution.json").read_text())
    assert body["epochs"] == [1, 2] and set(body["layers"]) == {f"layer{n}" for n in range(1, 6)}
    assert body["probe_data"] == "digits" and [f["unit"] for f in body["findings"]] == ["maps", "probe images"]
    # the numbers by a direct forward pass of both snapshots: each map's strongest activation over the
    # first 40 images, and each layer's linear CKA (Gram form, centred) on the first 60 with the last snapshot
    models = [load_checkpoint(run / "checkpoints" / f"epoch-{e}.pt") for e in (1, 2)]
    source = open_source("digits", 28, 1)
    preprocess = models[-1][1].preprocess
    modules = [body["layers"][f"layer{n}"]["module"] for n in range(1, 6)]
    with torch.no_grad():
        searched = [activations(m, preprocess.eval(source.get(range(40))), modules) for m, _ in models]
        probed = [activations(m, preprocess.eval(source.get(range(60))), modules) for m, _ in models]
    for n, module in enumerate(modules, 1):
        layer = body["layers"][f"layer{n}"]
        assert len(layer["maps"]) == 2
        for entry in layer["maps"]:
            peaks = [a[module][:, entry["map"]].flatten(1).amax(1) for a in searched]  # per image, per snapshot
            assert entry["values"] == pytest.approx([float(p.max()) for p in peaks], abs=2e-4)
            assert [float(p[i]) for p, i in zip(peaks, entry["images"])] == pytest.approx(entry["values"], abs=2e-4)
        grams = []
        for a in probed:
            x = a[module].flatten(1).double()
            k = x @ x.T
            grams.append(k - k.mean(0) - k.mean(1, keepdim=True) + k.mean())
        cka = float((grams[0] * grams[1]).sum() / (grams[0].norm() * grams[1].norm()))
        cka_layer = body["cka"]["layers"][f"layer{n}"]
        assert cka_layer["cka"] == pytest.approx([cka, 1.0], abs=2e-4) and cka_layer["settled"] in (1, 2)
