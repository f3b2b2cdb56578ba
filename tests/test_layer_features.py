"""Per-layer features (Table 7): which module is layer n, feature sizes, classifiers, the table."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from deconvnet.checkpoint import load_checkpoint
from deconvnet.cli import main
from deconvnet.data import open_source
from deconvnet.errors import UserError
from deconvnet.features import Split, feature_layers, fit_linear, pooled_features, per_class_folds
from deconvnet.subject import as_subject, from_checkpoint
from deconvnet.layer_features import (LayerFeatures, draw_layer_features, layer_features, layer_features_findings,
                                      layer_features_to_json)
from deconvnet.models import build_model
from deconvnet.probe import activations


def test_layer_n_is_the_last_module_of_its_block():
    full = build_model("zfnet-small", 10)
    assert feature_layers(full) == {1: "norm1", 2: "norm2", 3: "relu3", 4: "relu4", 5: "pool5", 6: "relu6",
                                    7: "relu7"}
    ablated = build_model("zfnet-small", 10, convs={k: v for k, v in full.config.convs.items()
                                                    if k not in ("conv3", "conv4")}, fc=(0, 0))
    assert feature_layers(ablated) == {1: "norm1", 2: "norm2", 5: "pool5"}


def test_feature_grid_is_the_top_conv_output_size():
    assert as_subject(build_model("zfnet-small", 10)).feature_grid() == 3  # pool5: 7 -> 3
    assert as_subject(build_model("alexnet-small", 10)).feature_grid() == 1  # pool5: 3 -> 1
    assert as_subject(build_model("zfnet", 10, fc=(8, 8))).feature_grid() == 6  # Fig. 3: pool5 is 6x6


def test_per_layer_feature_dims(tiny_checkpoint):
    model, info = load_checkpoint(tiny_checkpoint)
    source = open_source("digits", 28, 1)
    layers = feature_layers(model)
    feats = pooled_features(model, info.preprocess, source, range(7), list(layers.values()), as_subject(model).feature_grid())
    c = {k: v.out for k, v in model.config.convs.items()}
    w6, w7 = model.config.fc
    expected = {"norm1": c["conv1"] * 9, "norm2": c["conv2"] * 9, "relu3": c["conv3"] * 9,  # 14, 7 -> 3x3
                "relu4": c["conv4"] * 9, "pool5": c["conv5"] * 9, "relu6": w6, "relu7": w7}
    assert {name: f.shape for name, f in feats.items()} == {name: (7, d) for name, d in expected.items()}
    assert all(f.dtype == np.float32 and np.isfinite(f).all() for f in feats.values())
    assert not model.training


@pytest.mark.parametrize("kind", ["svm", "softmax"])
def test_linear_classifiers_separate_separable_features(kind):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 20)
    features = rng.normal(size=(60, 5)) * 0.1 + np.eye(3, 5)[labels] * 3
    split = Split(np.arange(0, 60, 2), np.arange(1, 60, 2))
    assert fit_linear(kind, features, labels, split) == 1.0
    with pytest.raises(ValueError):
        fit_linear("tree", features, labels, split)


def test_layer_table_on_a_tiny_checkpoint(tiny_checkpoint, tmp_path):
    model, info = load_checkpoint(tiny_checkpoint)
    result = layer_features(from_checkpoint(tiny_checkpoint), open_source("digits", 28, 1), per_class=(2,), folds=2,
                            exclude=[0, 1])
    assert set(result.scores) == {(k, 2, n) for k in ("svm", "softmax") for n in range(1, 8)}
    assert all(len(v) == 2 and all(0 <= a <= 1 for a in v) for v in result.scores.values())
    body = layer_features_to_json(result)
    assert body["table"]["svm (1)"]["dim"] == model.config.convs["conv1"].out * 9
    assert body["excluded_overlaps"] == [0, 1]
    assert [f["claim"].split(":")[0] for f in body["findings"]] == ["SVM, 2/class"] * 2 + ["softmax, 2/class"]
    for f in body["findings"]:  # each paired by fold: 2 folds, a t interval
        assert f["n"] == 2 and f["unit"] == "folds" and f["interval"][0] <= f["estimate"] <= f["interval"][1]
    top_minus_first = 100 * (np.array(result.scores[("svm", 2, 7)]) - np.array(result.scores[("svm", 2, 1)]))
    assert body["findings"][0]["estimate"] == pytest.approx(top_minus_first.mean())
    draw_layer_features(result, tmp_path / "layers.png")
    assert "softmax (7)" in result.table()


def _linear_accuracy(kind: str, feats: np.ndarray, labels: np.ndarray, split: Split) -> float:
    """Table 7's number for one fold, computed here: the features standardised on the training images,
    a linear SVM or a multinomial logistic regression, the mean over classes of the per-class accuracy."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    scaler = StandardScaler().fit(feats[split.train])
    clf = LinearSVC(C=1.0, max_iter=5000, random_state=0) if kind == "svm" else \
        LogisticRegression(C=1.0, max_iter=1000, random_state=0)
    clf.fit(scaler.transform(feats[split.train]), labels[split.train])
    y, predicted = labels[split.test], clf.predict(scaler.transform(feats[split.test]))
    return float(np.mean([np.mean(predicted[y == c] == c) for c in np.unique(y)]))


def test_layers_command(tiny_checkpoint, tmp_path):
    out = tmp_path / "layers"
    assert main(["layer-features", "--checkpoint", str(tiny_checkpoint), "--per-class", "3", "--folds", "1",
                 "--out", str(out)]) == 0
    body = json.loads((out / "layers.json").read_text())
    assert len(body["table"]) == 14 and body["excluded_overlaps"] == []
    # layer 1 (norm1, 14x14 max-pooled to pool5's 3x3) and layer 7 (relu7) by a direct forward pass
    model, info = load_checkpoint(tiny_checkpoint)
    source = open_source("digits", 28, 1)
    labels = source.labels.numpy()
    with torch.no_grad():
        acts = [activations(model, info.preprocess.eval(source.get(range(s, min(s + 256, len(source))))),
                            ["norm1", "relu7"]) for s in range(0, len(source), 256)]
    feats = {"norm1": np.concatenate([F.adaptive_max_pool2d(a["norm1"], 3).flatten(1).numpy() for a in acts]),
             "relu7": np.concatenate([a["relu7"].numpy() for a in acts])}
    [split] = per_class_folds(labels, 3, 1, 50, 0)  # the command's default seed 0
    for row, kind, layer in (("svm (1)", "svm", "norm1"), ("softmax (7)", "softmax", "relu7")):
        cell = body["table"][row]
        assert cell["module"] == layer and cell["dim"] == feats[layer].shape[1]
        assert cell["3_per_class"]["folds"] == [round(100 * _linear_accuracy(kind, feats[layer], labels, split), 2)]


@pytest.mark.parametrize("n_train, folds", [(0, 5), (-3, 5), (1, 0)])
def test_per_class_folds_rejects_empty_protocols(n_train, folds):
    with pytest.raises(UserError, match="at least 1 training image per class, 1 fold"):
        per_class_folds(np.repeat(np.arange(3), 10), n_train, folds)


def test_layer_verdicts_on_constructed_fold_scores():
    """Top minus layer 1, top minus the best lower layer (SVM), top minus layer 5 (softmax), paired by fold."""
    wobble = np.array([0.01, -0.01, 0.02, 0.0, -0.02])
    svm = {1: 0.4, 2: 0.5, 3: 0.6, 4: 0.65, 5: 0.8, 6: 0.75, 7: 0.7}  # rises, then falls after layer 5
    softmax = {1: 0.4, 2: 0.5, 3: 0.6, 4: 0.65, 5: 0.7, 6: 0.7, 7: 0.7}  # flat from layer 5 on: a tie
    jitter = np.array([0.004, -0.004, 0.002, -0.002, 0.0])  # mean 0: the top layer's own fold noise
    scores = {(kind, 30, layer): list(acc[layer] + (wobble if kind == "svm" or layer == 7 else wobble[::-1])
                                      + (jitter if layer == 7 else 0))
              for kind, acc in (("svm", svm), ("softmax", softmax)) for layer in range(1, 8)}
    result = LayerFeatures("fashion-mnist[2,3,6,7,8]:test", {n: f"l{n}" for n in range(1, 8)}, [30], 5,
                         {n: 1 for n in range(1, 8)}, scores, pretrain_data="fashion-mnist[0,1,4,5,9]")
    rise, best, soft = layer_features_findings(result)
    assert rise.verdict == "held" and rise.estimate == pytest.approx(30.0) and rise.n == 5
    assert best.verdict == "not held" and "layer 5 here" in best.claim and best.estimate == pytest.approx(-10.0)
    assert soft.verdict == "inconclusive" and soft.interval[0] < 0 < soft.interval[1]
    assert "disjoint classes" in rise.reading
