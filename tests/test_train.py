"""Training: outputs of a run, checkpoints, bit-identical resume after SIGKILL, DDP == one process."""
import dataclasses
import importlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from deconvnet import load_checkpoint
from deconvnet.checkpoint import read_checkpoint, save_checkpoint
from deconvnet.errors import UserError
from deconvnet.train import TrainConfig, train

# A tiny run on the first 256 Fashion-MNIST images: 8 steps of 32 per epoch.
TINY = ["--model", "zfnet-small", "--data", "fashion-mnist", "--limit", "256", "--batch-size", "32"]


def cli(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deconvnet.cli", *args], capture_output=True, text=True, **kw)


def weights(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def test_run_writes_config_metrics_snapshots_and_final(tmp_path):
    # lr 0.02, not the small recipe's 0.08: at 0.08 the first 24 steps of 256 images are chaotic, and
    # whether they lower the loss depended on the CPU's rounding; at 0.02 the loss falls by ~0.09 on
    # fp32 and bf16 alike (seeds 0-2), far beyond any rounding difference
    metrics = train(TrainConfig(limit=256, batch_size=32, epochs=3, snapshots=[1, 3], lr=0.02), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["recipe"] == "small" and config["val"] == "fashion-mnist:test" and config["epochs"] == 3
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2, 3]
    assert set(lines[0]) == {"epoch", "lr", "train_loss", "val_loss", "val_top1", "val_top5", "seconds",
                             "train_images_per_s"}
    assert {k: metrics[k] for k in lines[-1]} == lines[-1]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["epoch-1.pt", "epoch-3.pt", "last.pt"]
    model, info = load_checkpoint(tmp_path / "final.pt")
    assert not model.training and info.classes[9] == "Ankle boot" and info.epoch == 3
    assert info.accuracy["top1"] == metrics["val_top1"] and info.accuracy["n"] == 256
    assert info.accuracy["top1_10crop"] == metrics["val_top1_10crop"] and 0 < metrics["val_top1_10crop"] <= 1
    assert info.mean.shape == (1, 28, 28) and 0.2 < info.mean.mean().item() < 0.4
    assert lines[-1]["train_loss"] < lines[0]["train_loss"]


def test_paper_recipe_defaults(tmp_path):
    cfg = TrainConfig(model="zfnet").resolved()
    assert (cfg.lr, cfg.momentum, cfg.batch_size, cfg.schedule, cfg.init, cfg.renorm) == \
        (1e-2, 0.9, 128, "plateau", "paper", True)
    assert cfg.snapshots == [1, 2, 5, 10, 20, 30, 40, 64, 70]
    small = TrainConfig(model="zfnet-small", epochs=6).resolved()
    assert small.recipe == "small" and small.snapshots == [1, 2, 5, 6] and small.dropout == 0.0
    assert cfg.dropout == 0.5
    default = TrainConfig().resolved()  # the demo's 92% budget (README)
    assert (default.epochs, default.lr, default.weight_decay, default.dropout) == (30, 0.08, 1e-4, 0.0)


def test_a_run_of_four_steps_trains(tmp_path):
    """OneCycleLR divides by zero when 25% of the run is exactly one step; the trainer guards it."""
    metrics = train(TrainConfig(limit=64, batch_size=16, epochs=1, final_ten_crop=False), tmp_path)
    assert metrics["epoch"] == 1 and metrics["train_loss"] > 0


def test_precision_auto_is_bf16_only_where_native():
    native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert TrainConfig(device="cpu").resolved().precision == ("bf16" if native else "fp32")
    assert TrainConfig(device="cpu", precision="fp32").resolved().precision == "fp32"
    with pytest.raises(UserError, match="unknown precision"):
        TrainConfig(precision="fp8").resolved()


def test_bf16_and_fp32_steps_agree_to_bf16_precision(tmp_path):
    """bf16 autocast computes convs/matmuls in bf16 (8-bit mantissa) but keeps fp32 weights: the loss
    after a few steps differs from fp32 by about bf16's resolution, not more."""
    runs = {}
    for precision in ("fp32", "bf16"):
        runs[precision] = train(TrainConfig(limit=256, batch_size=32, epochs=1, precision=precision,
                                            final_ten_crop=False), tmp_path / precision)
    assert runs["bf16"]["train_loss"] == pytest.approx(runs["fp32"]["train_loss"], rel=0.02)
    assert "val_top1_10crop" not in runs["fp32"]
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["precision"] == "bf16"


def test_resume_after_sigkill_is_bit_identical(tmp_path):
    args = [*TINY, "--epochs", "2", "--checkpoint-every", "3", "--lr", "0.02"]
    whole = tmp_path / "whole"
    assert cli("train", *args, "--out", str(whole)).returncode == 0

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "deconvnet.cli", "train", *args, "--out", str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = killed / "checkpoints" / "last.pt"
    deadline = time.time() + 120
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "final.pt").exists(), "the run finished before it could be killed"
    state = read_checkpoint(last)["training_state"]  # readable: the save is atomic
    assert (state["epoch"], state["step"]) < (3, 0)

    resumed = cli("train", *args, "--out", str(killed), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    a, b = weights(whole / "final.pt"), weights(killed / "final.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    opt_a = read_checkpoint(whole / "checkpoints" / "last.pt")["training_state"]["optimizer"]["state"]
    opt_b = read_checkpoint(last)["training_state"]["optimizer"]["state"]
    assert all(torch.equal(opt_a[k]["momentum_buffer"], opt_b[k]["momentum_buffer"]) for k in opt_a)
    assert (whole / "metrics.jsonl").read_text().count("\n") == (killed / "metrics.jsonl").read_text().count("\n")


def test_interrupted_save_leaves_previous_checkpoint_readable(tmp_path, monkeypatch):
    train(TrainConfig(limit=64, batch_size=32, epochs=1), tmp_path)
    model, info = load_checkpoint(tmp_path / "final.pt")
    before = (tmp_path / "final.pt").read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", crash)  # dies after writing the temp file, before the rename
    with pytest.raises(OSError):
        save_checkpoint(tmp_path / "final.pt", model, info)
    assert (tmp_path / "final.pt").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_existing_run_and_changed_arguments_are_user_errors(tmp_path):
    train(TrainConfig(limit=64, batch_size=32, epochs=1), tmp_path)
    with pytest.raises(UserError, match="already holds a run"):
        train(TrainConfig(limit=64, batch_size=32, epochs=1), tmp_path)
    with pytest.raises(UserError, match="arguments differ"):
        train(TrainConfig(limit=64, batch_size=32, epochs=1, lr=0.5), tmp_path, resume=True)
    with pytest.raises(UserError, match="no checkpoint to resume"):
        train(TrainConfig(limit=64, epochs=1), tmp_path / "new", resume=True)


def test_ddp_two_processes_match_one(tmp_path):
    """Same global batch of 32 split over 2 gloo processes; dropout 0 so the only difference is
    the order in which gradients are summed."""
    args = [*TINY, "--epochs", "1", "--dropout", "0", "--precision", "fp32"]
    single = cli("train", *args, "--out", str(tmp_path / "one"))
    assert single.returncode == 0, single.stderr
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    double = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
         "-m", "deconvnet.cli", "train", *args, "--out", str(tmp_path / "two")],
        capture_output=True, text=True, env=env)
    assert double.returncode == 0, double.stderr
    a, b = weights(tmp_path / "one" / "final.pt"), weights(tmp_path / "two" / "final.pt")
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=5e-5), k  # float summation order; a wrong
        # gradient average (a sum over processes, or one shard only) moves the weights far more
    one = json.loads((tmp_path / "one" / "metrics.jsonl").read_text())
    two = json.loads((tmp_path / "two" / "metrics.jsonl").read_text())
    assert one["val_top1"] == pytest.approx(two["val_top1"], abs=1 / 256)
    assert one["train_loss"] == pytest.approx(two["train_loss"], rel=1e-4)


# ----------------------------------------------------------------------------- time budget

def test_plan_fits_training_evaluation_and_ten_crop_in_the_budget():
    from deconvnet.train import MARGIN, plan_epochs

    # 468 steps of 128 at 2,000 images/s = 29.95 s, 10k evaluated at 5,000/s = 2 s; 10 crops = 20 s
    plan = plan_epochs(600, 10, 468, 128, 10_000, 2000, 5000, ceiling=30, ten_crop=True)
    left = 600 * (1 - MARGIN) - 10 - 20
    epoch = 468 * 0.064 + 2
    assert plan["ten_crop"] and plan["steps"] == 17 * 468 + int((left - 17 * epoch - 2) / 0.064)  # + a cut 18th
    assert plan["epochs"] == 18 and 600 * (1 - MARGIN) - 1 < plan["estimated_seconds"] <= 600 * (1 - MARGIN)
    fast = plan_epochs(600, 10, 468, 128, 10_000, 20_000, 50_000, ceiling=30, ten_crop=True)
    assert (fast["epochs"], fast["steps"]) == (30, 30 * 468)
    slow = plan_epochs(600, 10, 468, 128, 10_000, 2000, 1000, ceiling=30, ten_crop=True)  # 10 crops: 100 s > 60
    assert not slow["ten_crop"] and slow["estimated_seconds"] <= 600 * (1 - MARGIN)
    short = plan_epochs(60, 10, 468, 128, 10_000, 1000, 1000, ceiling=30, ten_crop=False)  # part of one epoch
    assert (short["epochs"], short["steps"]) == (1, int((60 * (1 - MARGIN) - 10 - 10) / 0.128))
    assert plan_epochs(20, 10, 468, 128, 10_000, 1000, 1000, ceiling=30, ten_crop=False)["steps"] == 0


def _fake_speed(monkeypatch, epoch_seconds=10.0):
    """Pretend an epoch of 256 images takes 9 s to train and 1 s to evaluate (the plan must not depend on
    this test machine's load)."""
    t = importlib.import_module("deconvnet.train")

    calls = []

    def measure(cfg, *args, **kw):
        calls.append(cfg)
        return 256 / (epoch_seconds - 1), 256.0, 1
    monkeypatch.setattr(t, "measure_speed", measure)
    monkeypatch.setattr(t, "_replan", lambda cfg, *args: cfg)  # the real epochs are faster than pretended
    return calls


def test_time_budget_sizes_the_run_and_records_its_plan(tmp_path, monkeypatch):
    calls = _fake_speed(monkeypatch)
    # 1 min: (58.2 s - start-up) / 10 s = 5 epochs and a cut 6th; 10 crops (10 s) exceed a tenth of the budget
    metrics = train(TrainConfig(limit=256, batch_size=32, time_budget=1), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert len(calls) == 1 and 3 * 8 <= config["plan"]["steps"] < 6 * 8  # start-up varies with the load
    assert config["epochs"] == metrics["epoch"] == -(-config["plan"]["steps"] // 8)
    assert config["plan"]["train_images_per_s"] == round(256 / 9, 1)
    assert config["plan"]["threads"] == 1 and config["final_ten_crop"] is False
    assert config["augment"] == config["plan"]["augment"] == "none"  # a short run: the center crop alone
    assert "val_top1_10crop" not in metrics
    last = config["epochs"]
    snapshots = sorted({e for e in (1, 2, 5) if e <= last} | {last})  # the paper's that fit, and the last
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == \
        [f"epoch-{e}.pt" for e in snapshots] + ["last.pt"]
    _, info = load_checkpoint(tmp_path / "final.pt")
    assert info.train_config["plan"] == config["plan"]


def test_augmentation_is_the_recipe_s_or_under_a_budget_the_plan_s(tmp_path, monkeypatch):
    from deconvnet.train import SHORT_RUN_EPOCHS, choose_augment, sub_crops

    draws = torch.arange(10)
    assert sub_crops("ten-crop", draws).tolist() == list(range(10))
    assert sub_crops("flip", draws).tolist() == [4] * 5 + [9] * 5  # the center crop, flipped half the time
    assert sub_crops("none", draws).tolist() == [4] * 10
    assert choose_augment(SHORT_RUN_EPOCHS) == "ten-crop" and choose_augment(SHORT_RUN_EPOCHS - 0.5) == "none"
    assert TrainConfig().resolved().augment == TrainConfig(model="zfnet").resolved().augment == "ten-crop"
    assert TrainConfig(time_budget=1).resolved().augment is None  # left to the plan
    assert TrainConfig(model="zfnet", time_budget=1).resolved().augment == "ten-crop"  # the paper's recipe keeps it
    with pytest.raises(UserError, match="unknown augmentation"):
        TrainConfig(augment="mixup").resolved()
    _fake_speed(monkeypatch)
    train(TrainConfig(limit=256, batch_size=32, time_budget=1, augment="ten-crop"), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["augment"] == config["plan"]["augment"] == "ten-crop"  # asked for: kept


def test_a_budget_run_on_two_threads_at_under_half_its_pace_goes_on_with_one(tmp_path, monkeypatch):
    t = importlib.import_module("deconvnet.train")
    monkeypatch.setattr(t, "measure_speed", lambda *args, **kw: (1e6, 1e6, 2))  # a pace no real step keeps
    monkeypatch.setattr(t, "PACE_STEPS", 4)
    threads = torch.get_num_threads()
    train(TrainConfig(limit=256, batch_size=32, time_budget=1, epochs=2, final_ten_crop=False), tmp_path)
    plan = json.loads((tmp_path / "config.json").read_text())["plan"]
    assert plan["threads"] == 1 and plan["threads_dropped"]["epoch"] == 1 and plan["threads_dropped"]["step"] == 4
    assert torch.get_num_threads() == threads  # the caller's setting is restored


def test_resumed_budget_run_keeps_its_plan(tmp_path, monkeypatch):
    calls = _fake_speed(monkeypatch)
    t = importlib.import_module("deconvnet.train")
    real_evaluate, evaluations = t.evaluate, []

    def dies_in_epoch_3(*args, **kw):
        evaluations.append(1)
        if len(evaluations) == 3:
            raise KeyboardInterrupt
        return real_evaluate(*args, **kw)
    monkeypatch.setattr(t, "evaluate", dies_in_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(limit=256, batch_size=32, time_budget=1), tmp_path)
    before = (tmp_path / "config.json").read_text()
    monkeypatch.setattr(t, "evaluate", real_evaluate)
    metrics = train(TrainConfig(limit=256, batch_size=32, time_budget=1), tmp_path, resume=True)
    epochs = json.loads(before)["epochs"]
    assert len(calls) == 1 and metrics["epoch"] == epochs  # no second measurement, the same plan
    assert (tmp_path / "config.json").read_text() == before
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == epochs
    with pytest.raises(UserError, match="arguments differ"):
        train(TrainConfig(limit=256, batch_size=32, time_budget=2), tmp_path, resume=True)


def test_a_run_slower_than_planned_ends_sooner_with_its_schedule_annealed():
    from torch import nn

    from deconvnet.train import _replan, make_optimizer, make_scheduler

    cfg = TrainConfig(limit=256, batch_size=32, time_budget=1, epochs=5, final_ten_crop=False,
                      plan={"eval_images_per_s": 256.0, "steps": 40, "ceiling": 5}).resolved()
    optimizer = make_optimizer(cfg, nn.Linear(2, 2))
    scheduler = make_scheduler(cfg, optimizer, 8, 40)
    for _ in range(16):
        optimizer.step()
        scheduler.step()
    # after epoch 2 of 8 steps, 45 s spent, 10 s an epoch (1 s of it evaluating, 9/8 s a step): 14.4 s
    # left = one more epoch and 3 steps of a fourth, evaluated
    cut = _replan(cfg, 2, 10.0, 256, time.time() - 45, scheduler, 8)
    assert (cut.epochs, cut.plan["steps"]) == (4, 27) and cut.snapshots == [1, 2, 4]
    assert cut.plan["replanned"][0]["steps"] == 27 and cut.plan["epochs"] == 4
    for _ in range(11):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] < 0.02 * cfg.lr  # annealed by the end of the shorter run
    assert _replan(cut, 2, 3.0, 256, time.time() - 45, scheduler, 8) is cut  # in its second half: unchanged
    fast = dataclasses.replace(cfg, plan={"eval_images_per_s": 256.0, "steps": 40, "ceiling": 8})
    grown = _replan(fast, 2, 5.0, 256, time.time() - 10, scheduler, 8)  # 48 s left at 5 s an epoch
    assert (grown.epochs, grown.plan["steps"]) == (8, 64)  # up to the ceiling


def test_time_budget_errors_are_one_line(tmp_path):
    r = cli("train", *TINY, "--time-budget", "0", "--out", str(tmp_path / "a"))
    assert r.returncode == 2 and "--time-budget must be a positive" in r.stderr and len(r.stderr.splitlines()) == 1
    r = cli("train", *TINY, "--time-budget", "0.001", "--out", str(tmp_path / "b"))
    assert r.returncode == 2 and "is too short" in r.stderr and len(r.stderr.splitlines()) == 1
