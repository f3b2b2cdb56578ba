"""Transfer (Tables 4/5, Fig. 9): fold sampling, overlap removal by normalised correlation, the protocol."""
import json

import numpy as np
import pytest
import torch

from deconvnet.checkpoint import load_checkpoint
from deconvnet.cli import main
from deconvnet.data import TensorSource, open_source
from deconvnet.errors import UserError
from deconvnet.features import mean_class_accuracy, per_class_folds
from deconvnet.probe import activations
from deconvnet.subject import from_checkpoint
from deconvnet.transfer import (Transfer, draw_transfer, find_overlaps, transfer, transfer_findings,
                                transfer_to_json)


def test_folds_give_n_per_class_disjoint_and_at_most_50_test():
    labels = np.repeat(np.arange(4), [60, 80, 12, 100])
    folds = per_class_folds(labels, 5, folds=5, seed=1)
    assert len(folds) == 5
    for split in folds:
        assert np.bincount(labels[split.train], minlength=4).tolist() == [5, 5, 5, 5]
        assert np.bincount(labels[split.test], minlength=4).tolist() == [50, 50, 7, 50]  # the rest, up to 50
        assert not set(split.train) & set(split.test)
    assert len({tuple(s.train) for s in folds}) == 5  # random folds differ
    again = per_class_folds(labels, 5, folds=5, seed=1)
    assert all((a.train == b.train).all() and (a.test == b.test).all() for a, b in zip(folds, again))


def test_folds_leave_out_excluded_images_and_refuse_small_classes():
    labels = np.repeat(np.arange(3), 20)
    exclude = [0, 1, 25, 59]
    for split in per_class_folds(labels, 3, folds=3, exclude=exclude):
        assert not set(exclude) & (set(split.train) | set(split.test))
        assert np.bincount(labels[split.test]).tolist() == [15, 16, 16]
    with pytest.raises(UserError, match="at least 20"):
        per_class_folds(labels, 19, exclude=[0])


def test_mean_class_accuracy_weights_classes_equally():
    y_true = [0] * 8 + [1] * 2
    y_pred = [0] * 8 + [0, 1]  # 100% and 50%
    assert mean_class_accuracy(y_true, y_pred) == pytest.approx(0.75)


def test_overlap_finds_a_planted_duplicate():
    g = torch.Generator().manual_seed(0)
    reference = TensorSource("ref", torch.randint(0, 256, (300, 1, 28, 28), generator=g, dtype=torch.uint8),
                             torch.zeros(300), ["a"], 28, 1)
    images = torch.randint(0, 256, (20, 1, 28, 28), generator=g, dtype=torch.uint8)
    images[7] = (reference.images[123].float() * 0.5 + 40).round().to(torch.uint8)  # darker copy: same image
    target = TensorSource("target", images, torch.zeros(20), ["a"], 28, 1)
    overlaps, nearest = find_overlaps(target, reference, batch_size=64)
    assert [(o.target_index, o.reference_index) for o in overlaps] == [(7, 123)]
    assert overlaps[0].correlation > 0.99
    assert nearest.shape == (20,) and np.delete(nearest, 7).max() < 0.5
    assert find_overlaps(target, reference, reference_limit=100)[0] == []  # the copy is beyond the limit


def _layer_outputs(subject, source, layer: str) -> np.ndarray:
    """``layer``'s outputs for every image of ``source`` by a direct forward pass (batches of 256)."""
    with torch.no_grad():
        return np.concatenate([activations(subject.model, subject.prepare(source.get(range(s, min(s + 256, len(source))))),
                                           [layer])[layer].flatten(1).numpy() for s in range(0, len(source), 256)])


def _pretrained_accuracy(feats: np.ndarray, labels: np.ndarray, split) -> float:
    """The protocol's "pretrained + softmax" number for one fold, computed here: the features
    standardised on the training images, a multinomial logistic regression, and the mean over classes
    of the per-class accuracy on the test images."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(feats[split.train])
    clf = LogisticRegression(C=1.0, max_iter=1000, random_state=0).fit(scaler.transform(feats[split.train]),
                                                                      labels[split.train])
    y, predicted = labels[split.test], clf.predict(scaler.transform(feats[split.test]))
    return float(np.mean([np.mean(predicted[y == c] == c) for c in np.unique(y)]))


def test_transfer_protocol_on_a_tiny_checkpoint(tiny_checkpoint, tmp_path):
    model, info = load_checkpoint(tiny_checkpoint)
    target = open_source("digits", 28, 1)
    result = transfer(from_checkpoint(tiny_checkpoint), target, per_class=(1, 3), folds=2, scratch_steps=3, seed=0)
    assert result.layer == "relu7"
    for scores in (result.pretrained, result.scratch):
        assert set(scores) == {1, 3} and all(len(v) == 2 and all(0 <= a <= 1 for a in v) for v in scores.values())
    assert np.mean(result.pretrained[3]) > 0.2  # fixed features + softmax beat chance (10%) on digits
    body = transfer_to_json(result)
    assert set(body["table"]) == {"pretrained + softmax", "from scratch"}
    assert body["pretrain_data"] == "fashion-mnist" and "far-domain control" in body["setting"]
    [finding] = body["findings"]
    feats, labels = _layer_outputs(from_checkpoint(tiny_checkpoint), target, "relu7"), target.labels.numpy()
    for n in (1, 3):  # every fold's number against the same protocol computed here
        expected = [_pretrained_accuracy(feats, labels, split) for split in per_class_folds(labels, n, 2, 50, 0)]
        assert result.pretrained[n] == pytest.approx(expected, abs=1e-12)
        cells = body["table"]["pretrained + softmax"][f"{n}_per_class"]
        assert cells["folds"] == [round(100 * a, 2) for a in expected]
        assert cells["mean"] == round(100 * float(np.mean(expected)), 2)
        assert body["table"]["from scratch"][f"{n}_per_class"]["folds"] == [round(100 * a, 2) for a in result.scratch[n]]
    assert finding["n"] == 2 and finding["unit"] == "folds" and finding["verdict"] in ("held", "not held", "inconclusive")
    low, high = finding["interval"]
    assert low <= finding["estimate"] <= high
    per_fold = [100 * np.mean([result.pretrained[n][f] - result.scratch[n][f] for n in (1, 3)]) for f in range(2)]
    assert finding["estimate"] == pytest.approx(np.mean(per_fold))
    draw_transfer(result, tmp_path / "transfer.png")
    assert "1/class" in result.table()


def test_transfer_command(tiny_checkpoint, tmp_path):
    out = tmp_path / "transfer"
    code = main(["transfer", "--checkpoint", str(tiny_checkpoint), "--target", "digits", "--per-class", "2",
                 "--folds", "1", "--scratch-steps", "2", "--out", str(out)])
    assert code == 0
    body = json.loads((out / "transfer.json").read_text())
    assert body["overlap"]["removed"] == []  # digits do not occur in Fashion-MNIST
    assert body["args"]["per_class"] == [2] and body["folds"] == 1 and body["features"] == "relu7"
    source = open_source("digits", 28, 1)
    labels = source.labels.numpy()
    [split] = per_class_folds(labels, 2, 1, 50, 0)  # the command's default seed 0
    expected = _pretrained_accuracy(_layer_outputs(from_checkpoint(tiny_checkpoint), source, "relu7"), labels, split)
    assert body["table"]["pretrained + softmax"]["2_per_class"]["folds"] == [round(100 * expected, 2)]
    [scratch] = body["table"]["from scratch"]["2_per_class"]["folds"]
    assert body["table"]["from scratch"]["2_per_class"]["mean"] == scratch and 0 <= scratch <= 100


def _result(pretrained, scratch, target="fashion-mnist[2,3,6,7,8]:test"):
    """A transfer result from per-fold scores: ``pretrained[n]`` and ``scratch[n]`` (5 folds each)."""
    return Transfer(target, ["Pullover", "Dress", "Shirt", "Sneaker", "Bag"], "relu7", sorted(pretrained), 5,
                          300, pretrained=pretrained, scratch=scratch, pretrain_data="fashion-mnist[0,1,4,5,9]",
                          pretrain_classes=["T-shirt/top", "Trouser", "Coat", "Sandal", "Ankle boot"])


def test_transfer_verdict_on_constructed_fold_scores():
    """Pretrained minus scratch, pooled over N <= 15 per fold: the t interval over 5 folds decides."""
    wobble = np.array([0.02, -0.01, 0.0, 0.01, -0.02])
    high = {n: list(0.8 + wobble) for n in (1, 5, 30)}
    low = {n: list(0.5 - wobble[::-1]) for n in (1, 5, 30)}
    [won] = transfer_findings(_result(high, low))
    assert won.verdict == "held" and won.estimate == pytest.approx(30.0) and won.n == 5
    assert won.interval[0] > 0 and "N = [1, 5] " in won.quantity  # N = 30 is not small
    assert "T-shirt/top" in won.reading and "Pullover" in won.reading  # the reading names A and B
    [lost] = transfer_findings(_result(low, high))
    assert lost.verdict == "not held" and lost.interval[1] < 0
    noisy = {n: list(0.6 + 5 * wobble) for n in (1, 5, 30)}
    [tie] = transfer_findings(_result(noisy, {n: list(0.6 + 5 * wobble[::-1]) for n in (1, 5, 30)}))
    assert tie.verdict == "inconclusive" and tie.interval[0] < 0 < tie.interval[1]
    assert won.ours["30_per_class"]["difference"] == pytest.approx(30.0)  # every N is shown with its interval
