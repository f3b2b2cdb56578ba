"""CLI: user mistakes give one line on stderr and exit status 2; evaluate prints JSON."""
import json

import pytest

from deconvnet.cli import main
from deconvnet.train import TrainConfig, train


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("argv, message", [
    (["train", "--model", "resnet", "--out", "x"], "unknown model 'resnet'"),
    (["train", "--data", "folder:/no/such/dir", "--out", "x"], "/no/such/dir is not a directory"),
    (["train", "--data", "mnist", "--out", "x"], "unknown data spec 'mnist'"),
    (["train", "--data", "fashion-mnist[3,3]", "--out", "x"], "bad class subset in 'fashion-mnist[3,3]'"),
    (["train", "--snapshots", "1,x", "--out", "x"], "expected comma-separated integers"),
    (["train", "--epochs", "0", "--out", "x"], "expected a positive integer, got 0"),
    (["reproduce", "--model", "resnet", "--out", "x"], "unknown model 'resnet'"),
    (["evaluate", "--checkpoint", "c.pt", "--data", "digits", "--limit", "0"], "expected a positive integer"),
    (["invariance", "--checkpoint", "c.pt", "--rotations", "1e400", "--out", "x"], "finite numbers"),
    (["occlude", "--checkpoint", "c.pt", "--data", "fashion-mnist:test", "--index", "0", "--count", "2", "--out", "x"],
     "--count takes the first N images of --data"),
    (["invariance", "--checkpoint", "c.pt", "--image", "a.png", "--count", "2", "--out", "x"],
     "it goes without --index and --image"),
    (["occlude", "--checkpoint", "c.pt", "--data", "fashion-mnist:test", "--draw", "-1", "--out", "x"],
     "--draw must be 0 or more images"),
    (["train"], "the following arguments are required: --out"),
    (["evaluate", "--checkpoint", "/no/such.pt", "--data", "digits"], "checkpoint not found"),
    (["frobnicate"], "invalid choice"),
    (["train", "--precision", "fp8", "--out", "x"], "invalid choice: 'fp8'"),
    (["train", "--label-smoothing", "2", "--out", "x"], "--label-smoothing must be in [0, 1)"),
    (["train", "--lr", "-1", "--out", "x"], "--lr must be positive"),
    (["train", "--device", "tpu", "--out", "x"], "unknown device 'tpu'"),
    (["train", "--epochs", "3", "--snapshots", "0,9", "--out", "x"], "--snapshots must be epochs between 1 and 3"),
])
def test_user_mistakes_are_one_line_exit_2(capsys, tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_wrong_checkpoint_file(capsys, tmp_path):
    (tmp_path / "notes.pt").write_text("hello")
    code, _, err = run(capsys, "evaluate", "--checkpoint", str(tmp_path / "notes.pt"), "--data", "digits")
    assert code == 2 and "is not a readable PyTorch checkpoint" in err
    import torch
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    code, _, err = run(capsys, "evaluate", "--checkpoint", str(tmp_path / "other.pt"), "--data", "digits")
    assert code == 2 and "is not a deconvnet checkpoint" in err


def test_evaluate_prints_json_and_checks_classes(capsys, tmp_path):
    train(TrainConfig(data="digits", limit=200, batch_size=50, epochs=1), tmp_path)
    capsys.readouterr()
    code, out, _ = run(capsys, "evaluate", "--checkpoint", str(tmp_path / "final.pt"), "--data", "digits",
                       "--limit", "100")
    result = json.loads(out)
    assert code == 0 and result["n"] == 100 and 0 <= result["top1"] <= result["top5"] <= 1
    code, out, _ = run(capsys, "evaluate", "--checkpoint", str(tmp_path / "final.pt"), "--data", "digits",
                       "--limit", "100", "--ten-crop")
    assert code == 0 and json.loads(out)["n"] == 100
    code, _, err = run(capsys, "evaluate", "--checkpoint", str(tmp_path / "final.pt"), "--data", "fashion-mnist:test")
    assert code == 2 and "classes" in err


def test_cuda_device_without_cuda_is_a_user_error(capsys, tmp_path):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, _, err = run(capsys, "train", "--device", "cuda", "--limit", "64", "--out", str(tmp_path / "r"))
    assert code == 2 and "sees no CUDA device" in err and err.count("\n") == 1
