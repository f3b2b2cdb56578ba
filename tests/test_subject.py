"""The model under study (issue "Your model, your data"): model specs, weights, class files,
ImageNet preprocessing, default layers and the one-line errors, on torchvision's own classes and on
a model from a ``file.py:CALLABLE`` spec."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from deconvnet.cli import main
from deconvnet.errors import UserError
from deconvnet.subject import load_subject, read_classes
from tv import import_torchvision

MODEL_FILE = '''
import torch
from torch import nn


class Tiny(nn.Module):
    """A small user model: functional ReLU, a residual addition, BatchNorm and global pooling."""

    def __init__(self, classes=4):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Conv2d(8, 16, 3, padding=1)
        self.avg = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        x = self.relu(self.bn(self.stem(x)))
        x = self.relu(x + self.block(x))
        x = torch.relu(self.head(self.pool(x)))
        return self.fc(self.avg(x).flatten(1))


def build():
    return Tiny()


def not_a_model():
    return 42
'''


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """A folder of small JPEGs in two class folders (the user's photos) and a PNG."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (root / cls).mkdir()
        for i in range(3):
            pixels = rng.integers(0, 255, (50, 70, 3), dtype=np.uint8)
            pixels[10:30, 20:45] = 255 if cls == "cat" else 0  # something for the filters to find
            Image.fromarray(pixels).save(root / cls / f"{i}.jpg")
    return root


@pytest.fixture(scope="module")
def user_model(tmp_path_factory):
    """``nets.py:build`` and a .pth of its weights saved from a DataParallel-style wrapper."""
    root = tmp_path_factory.mktemp("user")
    (root / "nets.py").write_text(MODEL_FILE)
    torch.manual_seed(0)
    namespace = {}
    exec(compile(MODEL_FILE, "nets.py", "exec"), namespace)
    model = namespace["build"]()
    with torch.no_grad():  # BatchNorm statistics that are not the identity
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    state = {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}
    torch.save(state, root / "tiny.pth")
    return root, model.eval()


def test_file_spec_loads_weights_and_runs_like_the_original(user_model):
    root, reference = user_model
    subject = load_subject(f"{root}/nets.py:build", weights=str(root / "tiny.pth"), input_size=32)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(subject.model(x), reference(x))
    assert not subject.model.training
    assert subject.classes == ["0", "1", "2", "3"]
    assert subject.stages == ["relu_1", "head"]  # the last call at each resolution (16 and 8 px)
    assert subject.penultimate == "avg"  # (16, 1, 1): the fc's 16 inputs


def test_imagenet_preprocessing_matches_a_pil_reference(photos):
    import_torchvision()
    subject = load_subject("torchvision:resnet18")
    pre = subject.preprocess
    assert (pre.input_size, pre.stored_size) == (224, 256)
    path = photos / "cat" / "0.jpg"
    x = subject.prepare(subject.load_images([str(path)]))[0]
    # reference: short side 256 (bilinear), center crop 224, [0, 1], per-channel (x - mean) / std
    img = Image.open(path).convert("RGB")
    w, h = img.size
    img = img.resize((round(w * 256 / h), 256), Image.BILINEAR)
    left = (img.size[0] - 256) // 2 + 16
    img = img.crop((left, 16, left + 224, 240))
    ref = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)
    ref = (ref - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    assert torch.allclose(x, ref, atol=1e-5)


def test_default_layers_of_torchvision_models():
    import_torchvision()
    r18 = load_subject("torchvision:resnet18", input_size=64)
    assert r18.stages == ["relu", "layer1", "layer2", "layer3", "layer4"]
    assert r18.penultimate == "avgpool"
    vgg = load_subject("torchvision:vgg11", input_size=64)
    assert vgg.stages[0] == "features.1" and vgg.penultimate == "classifier.4"
    dense = load_subject("torchvision:densenet121", input_size=64)
    assert dense.stages[1:4] == ["features.denseblock1", "features.denseblock2", "features.denseblock3"]


def test_weights_that_do_not_fit_name_the_keys(tmp_path):
    tv = import_torchvision()
    state = tv.models.resnet18(weights=None).state_dict()
    del state["fc.bias"]
    state["conv1.weight"] = torch.zeros(64, 3, 5, 5)
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(UserError) as e:
        load_subject("torchvision:resnet18", weights=str(tmp_path / "bad.pth"), input_size=64)
    message = str(e.value)
    assert "1 missing: fc.bias" in message and "1 unexpected: extra.weight" in message
    assert "conv1.weight (64, 3, 5, 5) vs (64, 3, 7, 7)" in message and "\n" not in message


def test_class_files(tmp_path):
    (tmp_path / "lines.txt").write_text("cat\ndog\n\nbird\n")
    (tmp_path / "list.json").write_text(json.dumps(["cat", "dog", "bird"]))
    (tmp_path / "index.json").write_text(json.dumps({"1": ["n2", "dog"], "0": ["n1", "cat"], "2": ["n3", "bird"]}))
    for name in ("lines.txt", "list.json", "index.json"):
        assert read_classes(str(tmp_path / name), 3) == ["cat", "dog", "bird"]
    with pytest.raises(UserError, match="3 class names but the model has 4 outputs"):
        read_classes(str(tmp_path / "lines.txt"), 4)


@pytest.mark.parametrize("spec, message", [
    ("torchvision:resnet19", "torchvision has no model 'resnet19'; did you mean resnet18"),
    ("no_such_package.nets:build", "cannot import 'no_such_package.nets'"),
    ("{root}/nets.py:not_a_model", "returned int, not a torch.nn.Module"),
    ("{root}/nets.py:missing", "has no attribute 'missing'"),
    ("{root}/absent.py:build", "model file not found"),
    ("resnet18", "unknown model spec"),
])
def test_bad_specs_are_one_line_errors(spec, message, user_model, capsys):
    import_torchvision()
    root, _ = user_model
    code = main(["inspect", "--model", spec.format(root=root)])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1


def test_cli_refusals_exit_2(user_model, photos, tmp_path, capsys):
    root, _ = user_model
    spec = f"{root}/nets.py:build"
    (tmp_path / "classes.txt").write_text("a\nb\nc\n")
    cases = [
        (["inspect", "--model", spec, "--classes", str(tmp_path / "classes.txt")], "3 class names but the model has 4"),
        (["inspect", "--model", spec, "--input-size", "2"], "too small"),
        (["inspect", "--model", spec, "--mean", "0.5,0.5"], "--mean needs 1 or 3 values"),
        (["project", "--model", spec, "--image", str(photos / "cat" / "0.jpg"), "--layer", "nope",
          "--out", str(tmp_path / "p.png")], "unknown layer 'nope'"),
        (["project", "--model", spec, "--image", str(tmp_path / "none.jpg"), "--layer", "head",
          "--out", str(tmp_path / "p.png")], "image not found"),
        (["topk", "--model", spec, "--checkpoint", "x.pt", "--data", f"folder:{photos}", "--out", str(tmp_path)],
         "not both"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "p.png").exists()


def test_file_model_end_to_end(user_model, photos, tmp_path, capsys):
    """inspect, project, topk, occlude on ``nets.py:build`` + its .pth over a folder of JPEGs."""
    root, reference = user_model
    model = ["--model", f"{root}/nets.py:build", "--weights", str(root / "tiny.pth"), "--input-size", "32"]
    assert main(["inspect", *model, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    names = [row["name"] for row in listed["layers"]]
    assert names.index("relu") < names.index("block.0") < names.index("relu_1") < names.index("head")
    shapes = {row["name"]: row["shape"] for row in listed["layers"]}
    assert shapes["relu_1"] == [8, 16, 16] and shapes["head"] == [16, 8, 8] and shapes["fc"] == [4]

    image = photos / "dog" / "1.jpg"
    assert main(["project", *model, "--image", str(image), "--layer", "head", "--out", str(tmp_path / "p.png")]) == 0
    record = json.loads((tmp_path / "p.json").read_text())
    subject = load_subject(f"{root}/nets.py:build", weights=str(root / "tiny.pth"), input_size=32)
    x = subject.prepare(subject.load_images([str(image)]))
    with torch.no_grad():  # independent reference: the head conv's output by hand
        a = reference.relu(reference.bn(reference.stem(x)))
        a = reference.relu(a + reference.block(a))
        head = reference.head(reference.pool(a))[0]
    c, y, xx = record["unit"]
    assert record["value"] == pytest.approx(float(head[c, y, xx]), rel=1e-5)
    assert float(head[c, y, xx]) == pytest.approx(float(head.max()), rel=1e-6)
    assert (tmp_path / "p.png").stat().st_size > 1000

    out = tmp_path / "topk"
    assert main(["topk", *model, "--data", f"folder:{photos}", "--k", "2", "--maps", "2", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "layers chosen for" in err
    saved = json.loads((out / "topk.json").read_text())
    assert saved["images"] == 6 and saved["model"]["weights"] == str(root / "tiny.pth")
    assert sorted(p.name for p in out.glob("gallery-*.png")) == sorted(f"gallery-{s}.png" for s in subject.stages)

    out = tmp_path / "occlude"
    assert main(["occlusion", *model, "--data", f"folder:{photos}", "--index", "0", "--size", "8", "--stride", "8",
                 "--out", str(out)]) == 0
    saved = json.loads((out / "occlusion.json").read_text())
    assert saved["images"][0]["layer"] == subject.stages[-1]
    assert (out / "occlusion-0.png").is_file()


@pytest.mark.parametrize("name", ["alexnet", "vgg11", "resnet18", "densenet121", "mobilenet_v2"])
def test_torchvision_models_through_the_cli(name, photos, tmp_path, capsys):
    """inspect and occlude through the CLI on torchvision's own classes (seeded random weights, no
    weights file: the loading of one is tested above); the occlusion's numbers against the same model
    run here on the occluded images."""
    import_torchvision()
    model = ["--model", f"torchvision:{name}", "--input-size", "64"]
    assert main(["inspect", *model]) == 0
    table = capsys.readouterr().out
    assert "input 3x64x64, 1000 classes" in table
    image = photos / "cat" / "1.jpg"
    torch.manual_seed(0)  # the weights the command builds
    assert main(["occlusion", *model, "--image", str(image), "--size", "16", "--stride", "16",
                 "--out", str(tmp_path / "occ")]) == 0
    saved = json.loads((tmp_path / "occ" / "occlusion.json").read_text())["images"][0]
    # squares of 16 from the top-left corner in steps of 16 until all 64 pixels are covered: 4 x 4
    assert saved["grid"] == [4, 4] and saved["positions"] == [[t, l] for t in range(0, 64, 16) for l in range(0, 64, 16)]
    torch.manual_seed(0)
    subject = load_subject(f"torchvision:{name}", input_size=64)  # the same weights, built here
    x = subject.prepare(subject.load_images([str(image)]))[0]
    with torch.no_grad():
        clean = torch.softmax(subject.model(x[None])[0], 0)
        covered = x.repeat(3, 1, 1, 1)  # squares 0, 5 and 15, filled with 0 (the mean after normalisation)
        for i, (t, l) in enumerate([(0, 0), (16, 16), (48, 48)]):
            covered[i, :, t:t + 16, l:l + 16] = 0
        probs = torch.softmax(subject.model(covered), 1)
    target = saved["target"]  # the prediction; MobileNetV2's random logits are ~1e-9, near-ties for argmax
    assert saved["unoccluded"]["label"] == target and float(clean[target]) == pytest.approx(float(clean.max()), rel=1e-5)
    assert saved["unoccluded"]["probability"] == pytest.approx(float(clean[target]), rel=1e-4)
    p = torch.tensor(saved["probability"]).flatten()
    assert p[[0, 5, 15]].tolist() == pytest.approx(probs[:, target].tolist(), rel=1e-3, abs=1e-6)


def test_report_for_a_user_model_is_cached_per_step(user_model, photos, tmp_path, capsys):
    root, _ = user_model
    argv = ["report", "--model", f"{root}/nets.py:build", "--weights", str(root / "tiny.pth"), "--input-size", "32",
            "--data", f"folder:{photos}", "--images", "2", "--out", str(tmp_path / "r")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "fig2" in out and "fig7" in out and "cached" not in out
    page = (tmp_path / "r" / "index.html").read_text()
    for section in ('id="fig2"', 'id="fig5"', 'id="fig7"', 'id="table7"'):
        assert section in page
    assert page.count("<img src=\"data:image/png;base64,") >= 4
    assert main(argv) == 0
    assert capsys.readouterr().out.count("cached") == 4  # nothing changed: every step reused


@pytest.mark.parametrize("name", ["alexnet", "vgg11", "resnet18", "densenet121", "mobilenet_v2"])
def test_serve_api_on_torchvision_models(name, photos, tmp_path):
    """The viewer's API on torchvision's classes: top-9 of a map, one image's analysis. MobileNetV2's
    ReLU6 has no deconvnet rule: the page says so for those rules and for panel (c), and shows the rest."""
    pytest.importorskip("starlette")
    from deconvnet.serve import Viewer

    import_torchvision()
    subject = load_subject(f"torchvision:{name}", input_size=64)
    viewer = Viewer(subject, f"folder:{photos}", 6)
    viewer.topk.thread.join()
    assert viewer.topk.state["state"] == "done", viewer.topk.state
    info = viewer.describe()
    assert [layer["name"] for layer in info["layers"]] == subject.stages
    calls = {c.name: c.shape for c in subject.calls()}
    assert [layer["maps"] for layer in info["layers"]] == [calls[n][0] for n in subject.stages]
    result = viewer.dataset_image(0)
    assert len(result["probabilities"]) == 1000
    assert [layer["layer"] for layer in result["layers"]] == subject.stages
    projections = result["layers"][-1]["features"][0]["projections"]
    assert projections["gradient"].startswith("data:image/png")
    if name == "mobilenet_v2":
        assert projections["deconvnet"] is None
        assert "ReLU6" in result["layers"][-1]["features"][0]["errors"]["deconvnet"]
        assert result["occlusion"]["projection"] is None and "ReLU6" in result["occlusion"]["projection_missing"]
        with pytest.raises(UserError, match="ReLU6"):
            viewer.feature(subject.stages[1], 0)
        subject.other_activations = "gradient"  # the documented option: ReLU6 acts as for the gradient
    else:
        assert projections["deconvnet"].startswith("data:image/png") and result["occlusion"]["projection"]
    shown = viewer.feature(subject.stages[1], 3)
    assert len(shown["entries"]) == 6 and all(e["projection"].startswith("data:image/png") for e in shown["entries"])


def test_evaluate_a_user_model_on_folders_named_by_wordnet_id(user_model, photos, tmp_path, capsys):
    """ImageNet's val layout: folders named by WordNet id, mapped to the model's classes through the index."""
    root, reference = user_model
    data = tmp_path / "val"
    for wnid, cls in (("n001", "cat"), ("n003", "dog")):
        (data / wnid).mkdir(parents=True)
        for f in (photos / cls).iterdir():
            (data / wnid / f.name).write_bytes(f.read_bytes())
    index = {"0": ["n000", "zero"], "1": ["n001", "cat"], "2": ["n002", "two"], "3": ["n003", "dog"]}
    (tmp_path / "index.json").write_text(json.dumps(index))
    model = ["--model", f"{root}/nets.py:build", "--weights", str(root / "tiny.pth"), "--input-size", "32",
             "--classes", str(tmp_path / "index.json")]
    assert main(["evaluate", *model, "--data", f"folder:{data}", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    subject = load_subject(f"{root}/nets.py:build", weights=str(root / "tiny.pth"), input_size=32,
                           classes=str(tmp_path / "index.json"))
    from deconvnet.data import open_source
    source = open_source(f"folder:{data}", subject.preprocess.stored_size, 3)
    with torch.no_grad():
        predicted = reference(subject.prepare(source.get(range(len(source))))).argmax(1)
    truth = torch.tensor([1, 3])[source.labels]
    assert result["n"] == 6 and result["top1"] == pytest.approx(float((predicted == truth).float().mean()))
    (data / "n009").mkdir()
    (data / "n009" / "x.jpg").write_bytes((photos / "cat" / "0.jpg").read_bytes())
    assert main(["evaluate", *model, "--data", f"folder:{data}"]) == 2
    assert "1 of folder" in capsys.readouterr().err
