"""CLI: user mistakes give one line on stderr and exit status 2; evaluate prints JSON."""
import json

import pytest

import torch

from deconvnet.checkpoint import load_checkpoint
from deconvnet.cli import main
from deconvnet.data import open_source


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
    (["occlusion", "--checkpoint", "c.pt", "--data", "fashion-mnist:test", "--index", "0", "--count", "2", "--out", "x"],
     "--count takes the first N images of --data"),
    (["invariance", "--checkpoint", "c.pt", "--image", "a.png", "--count", "2", "--out", "x"],
     "it goes without --index and --image"),
    (["occlusion", "--checkpoint", "c.pt", "--data", "fashion-mnist:test", "--draw", "-1", "--out", "x"],
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


def test_evaluate_prints_json_and_checks_classes(capsys, tiny_checkpoint):
    code, out, _ = run(capsys, "evaluate", "--checkpoint", str(tiny_checkpoint), "--data", "fashion-mnist:test",
                       "--limit", "100", "--json")
    result = json.loads(out)
    model, info = load_checkpoint(tiny_checkpoint)  # the same 100 images, counted here
    source = open_source("fashion-mnist:test", info.preprocess.stored_size, info.preprocess.channels)
    with torch.no_grad():
        logits = model(info.preprocess.eval(source.get(list(range(100)))))
    labels = source.labels[:100]
    top5 = logits.topk(5, 1).indices
    assert code == 0 and result["n"] == 100
    assert result["top1"] == (logits.argmax(1) == labels).sum().item() / 100
    assert result["top5"] == (top5 == labels[:, None]).any(1).sum().item() / 100
    code, out, _ = run(capsys, "evaluate", "--checkpoint", str(tiny_checkpoint), "--data", "fashion-mnist:test",
                       "--limit", "100", "--ten-crop", "--json")
    with torch.no_grad():  # the softmax averaged over the 10 crops (Sec. 3)
        ten = torch.stack([torch.softmax(model(c), 1) for c in info.preprocess.ten_crops(source.get(list(range(100))))])
    assert code == 0 and json.loads(out)["n"] == 100
    assert json.loads(out)["top1"] == (ten.mean(0).argmax(1) == labels).sum().item() / 100
    code, _, err = run(capsys, "evaluate", "--checkpoint", str(tiny_checkpoint), "--data", "digits")
    assert code == 2 and "classes" in err


def test_cuda_device_without_cuda_is_a_user_error(capsys, tmp_path):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, _, err = run(capsys, "train", "--device", "cuda", "--limit", "64", "--out", str(tmp_path / "r"))
    assert code == 2 and "sees no CUDA device" in err and err.count("\n") == 1


def test_a_fixed_gpu_under_torchrun_is_a_user_error(monkeypatch):
    from deconvnet.errors import UserError
    from deconvnet.runner import device_of

    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun sets: rank 1 of 2, on the GPU of its local rank
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(UserError, match="each process takes the GPU of its local rank") as e:
        device_of("cuda:0")
    assert "\n" not in str(e.value)
    assert device_of("cpu").type == "cpu"


def test_old_command_names_still_work_with_a_deprecation_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["occlude", "--help"])
    assert exit_.value.code == 0
    captured = capsys.readouterr()
    assert "`occlude` is now `occlusion`" in captured.err and "--layer" in captured.out
    assert main(["compare", "--runs", "/no/such/run", "--out", "x"]) == 2
    assert "`compare` is now `architecture`" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["topk", "occlusion", "sanity", "report", "evaluate"])
def test_every_analysis_takes_device_and_cuda_without_cuda_is_one_line(capsys, tmp_path, tiny_checkpoint, command):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, _, err = run(capsys, command, "--checkpoint", str(tiny_checkpoint), "--data", "fashion-mnist:test",
                       "--device", "cuda:0", *([] if command == "evaluate" else ["--out", str(tmp_path / "x")]))
    assert code == 2 and "sees no CUDA device" in err and err.count("\n") == 1


def test_device_cpu_runs_through_the_device_aware_path(capsys, tmp_path, tiny_checkpoint):
    code, out, _ = run(capsys, "occlusion", "--checkpoint", str(tiny_checkpoint), "--data", "fashion-mnist:test",
                       "--count", "2", "--size", "8", "--stride", "8", "--device", "cpu", "--out", str(tmp_path / "o"),
                       "--json")
    assert code == 0 and json.loads(out.splitlines()[-1])["out"] == str(tmp_path / "o")
