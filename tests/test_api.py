"""The Python API: every analysis takes the model under study (a Subject or a plain nn.Module), each
analysis module is callable as its analysis and keeps its other names, one layer rule, and
torchvision specs with constructor arguments and a class count read from the weights."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import deconvnet
from deconvnet import UserError
from deconvnet.cli import main
from deconvnet.occlusion import occlude_image
from deconvnet.subject import as_subject, load_subject
from tv import import_torchvision, torchvision_model


def test_analysis_modules_are_callable_and_keep_their_names():
    for name in ("topk", "evolution", "invariance", "architecture", "occlusion", "correspondence", "ablation",
                 "transfer", "layer_features"):
        module = getattr(deconvnet, name)
        assert callable(module) and module.__name__ == f"deconvnet.{name}"
        assert getattr(module, name).__module__ == f"deconvnet.{name}"  # the analysis function itself
    for draw in ("draw_occlusion", "draw_invariance", "draw_correspondence", "draw_evolution", "draw_architecture",
                 "draw_ablation", "draw_transfer", "draw_layer_features", "draw_gallery"):
        module = {"draw_gallery": "topk"}.get(draw, draw.removeprefix("draw_"))
        assert callable(getattr(getattr(deconvnet, module), draw))


def test_occlusion_of_a_torchvision_resnet_with_no_layer_given():
    model = torchvision_model("resnet18", num_classes=5)
    images = torch.randint(0, 256, (2, 3, 40, 50), dtype=torch.uint8)  # resized and center-cropped
    assert deconvnet.occlusion(model, images[:1], size=112, stride=112)[0].layer == "layer4"  # 224 px by default
    subject = as_subject(model, input_size=64)
    results = deconvnet.occlusion(subject, images, size=16, stride=16)
    assert subject.stages[-1] == "layer4" and [r.layer for r in results] == ["layer4", "layer4"]
    # the same numbers as the per-image function on the subject's own preprocessing of those pixels
    x = subject.prepare(subject.images(images))
    direct = occlude_image(model, x[1], size=16, stride=16, layer="layer4")
    torch.testing.assert_close(results[1].probability, direct.probability)
    assert results[1].target == int(model(x[1:2]).argmax())


def test_an_occlusion_result_carries_its_picture_and_class_names(tmp_path):
    model = torchvision_model("resnet18", num_classes=3)
    images = torch.randint(0, 256, (1, 3, 40, 50), dtype=torch.uint8)
    subject = as_subject(model, input_size=64, classes=["cat", "dog", "fox"])
    result = deconvnet.occlusion(subject, images, size=16, stride=16)[0]
    assert torch.equal(result.picture, subject.pictures(subject.images(images))[0])  # the pixels, not the input
    assert result.classes == ["cat", "dog", "fox"]
    figure = deconvnet.occlusion.draw_occlusion(result, tmp_path / "fig7.png")
    assert (tmp_path / "fig7.png").stat().st_size > 0
    assert figure.axes[0].get_title().endswith(f"class followed: {result.classes[result.target]}")
    assert np.array_equal(figure.axes[0].images[0].get_array(), result.picture.permute(1, 2, 0).numpy())  # as it is
    data = deconvnet.occlusion.occlusion_to_json(result)
    assert data["target_name"] == result.classes[result.target]
    x = subject.prepare(subject.images(images))  # the model's input as it is: nothing to show but the input
    assert deconvnet.occlusion(subject, x, size=16, stride=16)[0].picture is None


def test_float_inputs_are_the_models_input_as_they_are():
    model = torchvision_model("resnet18", num_classes=5)
    x = torch.randn(2, 3, 64, 64)
    result = deconvnet.invariance(model, x, amounts={"translation": [0.0, 4.0]})
    with torch.no_grad():
        predicted = model(x).argmax(1)
    assert result.labels.tolist() == predicted.tolist()  # labels default to the model's answers
    assert result.layers == [as_subject(model, like=x).layer_numbers[1], as_subject(model, like=x).penultimate]
    assert float(result.distance["translation"][result.layers[0]][:, 0].abs().max()) == 0.0


def test_one_layer_rule_for_ours_and_others():
    ours = as_subject(deconvnet.build_model("zfnet-small", 10))
    assert ours.stages == ["conv1", "conv2", "conv3", "conv4", "conv5"]
    assert ours.layers(None, [1, 5, 7]) == ["norm1", "pool5", "relu7"] and ours.output == "fc8"
    resnet = as_subject(torchvision_model("resnet18"))
    assert resnet.layers(None, [7]) == ["flatten"] or resnet.layers(None, [7]) == ["avgpool"]
    assert resnet.layers("layer2.0") == ["layer2.0"] and resnet.output == "fc"


def test_transfer_on_a_torchvision_model(tmp_path):
    model = torchvision_model("resnet18", num_classes=3)
    torch.save(model.state_dict(), tmp_path / "r18.pth")
    assert main(["transfer", "--model", "torchvision:resnet18", "--weights", str(tmp_path / "r18.pth"),
                 "--input-size", "16", "--target", "digits", "--per-class", "2", "--folds", "2",
                 "--scratch-steps", "2", "--out", str(tmp_path / "t")]) == 0
    body = json.loads((tmp_path / "t" / "transfer.json").read_text())
    assert body["features"] == as_subject(model, input_size=16).penultimate
    for row in body["table"].values():
        folds = row["2_per_class"]["folds"]
        assert len(folds) == 2 and all(0 <= a <= 100 for a in folds)
        assert row["2_per_class"]["mean"] == pytest.approx(sum(folds) / 2, abs=0.01)


def test_fresh_copy_resets_weights_and_resizes_the_head():
    from deconvnet.transfer import fresh_copy

    model = torchvision_model("resnet18", num_classes=7)
    fresh = fresh_copy(model, 4, seed=0)
    assert fresh.fc.out_features == 4 and model.fc.out_features == 7
    assert not torch.equal(fresh.conv1.weight, model.conv1.weight)
    torch.testing.assert_close(fresh_copy(model, 4, seed=0).conv1.weight, fresh.conv1.weight)


def test_torchvision_spec_arguments_and_classes_from_the_weights(tmp_path):
    import_torchvision()
    fine_tuned = torchvision_model("resnet18", num_classes=2)
    torch.save(fine_tuned.state_dict(), tmp_path / "r18.pth")
    subject = load_subject("torchvision:resnet18", weights=str(tmp_path / "r18.pth"), input_size=64)
    assert len(subject.classes) == 2
    torch.testing.assert_close(subject.model.fc.weight, fine_tuned.fc.weight)
    (tmp_path / "names.txt").write_text("cat\ndog\nbird\n")
    assert load_subject("torchvision:resnet18", classes=str(tmp_path / "names.txt"), input_size=64).classes == [
        "cat", "dog", "bird"]
    assert load_subject("torchvision:resnet18?num_classes=4", input_size=64).model.fc.out_features == 4
    with pytest.raises(UserError, match="does not take"):
        load_subject("torchvision:resnet18?colour=blue")
    with pytest.raises(UserError, match="NAME=VALUE"):
        load_subject("torchvision:resnet18?num_classes")


def test_images_from_files_and_bad_inputs(tmp_path):
    subject = as_subject(deconvnet.build_model("zfnet-small", 10))
    Image.fromarray(np.full((40, 30), 200, dtype=np.uint8)).save(tmp_path / "a.png")
    raw = subject.images(str(tmp_path / "a.png"))
    assert raw.shape == (1, 1, 28, 28) and int(raw.max()) == 200
    with pytest.raises(UserError, match="uint8"):
        subject.images(torch.zeros(1, 1, 28, 28, dtype=torch.int64))
    with pytest.raises(UserError, match="channels"):
        subject.images(torch.zeros(1, 3, 28, 28, dtype=torch.uint8))
    with pytest.raises(UserError, match="targets for"):
        deconvnet.occlusion(subject, torch.zeros(2, 1, 28, 28, dtype=torch.uint8), targets=[1])


def test_project_matches_the_deconvnet_on_each_images_strongest_unit():
    from deconvnet.deconvnet import Deconvnet
    from deconvnet.probe import activations

    model = deconvnet.build_model("zfnet-small", 10).eval()
    images = torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8)
    got = deconvnet.project(model, images, "conv3", rule="guided")
    subject = as_subject(model)
    x = subject.prepare(images)
    with torch.no_grad():
        maps = activations(model, x, "conv3")["conv3"]
    units = [(int(m.flatten(1).amax(1).argmax()), *divmod(int(m[int(m.flatten(1).amax(1).argmax())].argmax()), m.shape[-1]))
             for m in maps]
    torch.testing.assert_close(got, Deconvnet(model).project(x, "conv3", units, "guided"))
    assert deconvnet.project(model, images).shape == (2, 1, 28, 28)  # the top stage, conv5
