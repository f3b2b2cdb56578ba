"""Feature evolution (Fig. 4): snapshots, the stable epoch, and the command."""
import json

import numpy as np
import pytest
import torch

from deconvnet.checkpoint import CheckpointInfo, save_checkpoint
from deconvnet.cli import main
from deconvnet.data import open_source, preprocess_for
from deconvnet.errors import UserError
from deconvnet.evolution import evolution, evolution_findings, load_snapshots, snapshot_paths, stable_from
from deconvnet.models import build_model


def test_stable_from_hand_cases():
    epochs = [1, 2, 5, 10]
    assert stable_from(epochs, np.array([3, 3, 3, 3]), np.array([0.95, 0.99, 0.97])) == 1
    assert stable_from(epochs, np.array([7, 3, 3, 3]), np.array([0.2, 0.99, 0.97])) == 2
    assert stable_from(epochs, np.array([3, 3, 3, 3]), np.array([0.95, 0.5, 0.97])) == 5  # projection changed
    assert stable_from(epochs, np.array([3, 3, 3, 4]), np.array([0.95, 0.99, 0.97])) == 10  # never settles


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
    result = evolution(snapshots, info.preprocess, open_source("digits", 28, 1), range(60), maps=2)
    assert result.epochs == [1, 2, 3] and list(result.layers) == [1, 2, 3, 4, 5]
    for layer in result.layers.values():
        assert layer.images.shape == (2, 3) and layer.correlation.shape == (2, 2)
        assert (layer.images[:, 1] == layer.images[:, 2]).all()
        assert layer.correlation[:, 1] == pytest.approx([1.0, 1.0])
        assert all(e <= 2 for e in layer.stable_epoch)
    assert evolution_findings(result)[0].claim.startswith("lower layers converge")


def test_evolution_command(tmp_path):
    run = _run(tmp_path / "run", [1, 2])
    out = tmp_path / "out"
    assert main(["evolution", "--run", str(run), "--limit", "40", "--maps", "2", "--out", str(out)]) == 0
    body = json.loads((out / "evolution.json").read_text())
    assert body["epochs"] == [1, 2] and set(body["layers"]) == {f"layer{n}" for n in range(1, 6)}
    assert all((out / f"evolution-layer{n}.png").exists() for n in range(1, 6)) and (out / "evolution.png").exists()
