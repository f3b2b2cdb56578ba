"""Training with the paper's recipe (Sec. 3), resumable to the bit, data-parallel under torchrun.

Paper recipe (``recipe="paper"``, the default for ``zfnet`` and ``alexnet``): SGD, batch 128,
lr 1e-2, momentum 0.9, dropout 0.5 in fc6/fc7, weights N(0, 1e-2) and biases 0, lr divided by 10
when the validation error plateaus, and every conv filter renormalised to RMS <= 0.1 after each step.
The small models default to ``recipe="small"``, tuned to reach 92% on Fashion-MNIST within ten
minutes on 2 CPU cores with native bf16 (see README): He init, a one-cycle schedule, Nesterov momentum,
weight decay, no dropout, 30 epochs. Where the hardware computes bf16 natively the convs run under bf16 autocast
(``precision="auto"``), 1.5-1.9x faster on this project's CPU; weights, optimizer and evaluation stay fp32.
With ``time_budget`` (minutes) the trainer measures its own speed for a few seconds and sizes the run
(epochs, and the one-cycle schedule with them) to end within the budget, evaluation included; a
small-recipe run planned for fewer than 20 epochs trains on the center crop alone (the paper's 10
sub-crops leave so short a run under-fitted: 0.92 vs 0.90 in 10 epochs, see ``choose_augment``).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Annotated
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ._analysis import callable_module
from .checkpoint import CheckpointInfo, read_checkpoint, save_checkpoint
from .data import Preprocess, Source, batches, mean_image, open_source, preprocess_for
from .errors import UserError
from .options import Flag, Positive
from .models import MODELS, build_model, model_config, renormalise_filters
from .runner import all_sum, atomic_write_json, atomic_write_text, device_of, distributed, progress, world

PAPER_SNAPSHOTS = (1, 2, 5, 10, 20, 30, 40, 64)  # the epochs of Fig. 4

RECIPES = {
    "paper": dict(lr=1e-2, momentum=0.9, nesterov=False, weight_decay=0.0, schedule="plateau",
                  init="paper", dropout=0.5, label_smoothing=0.0, epochs=70, augment="ten-crop"),
    "small": dict(lr=0.08, momentum=0.9, nesterov=True, weight_decay=1e-4, schedule="onecycle",
                  init="kaiming", dropout=0.0, label_smoothing=0.0, epochs=30, augment="ten-crop"),
}
AUGMENTS = ("ten-crop", "flip", "none")


@dataclass
class TrainConfig:
    """One training run; written to RUN_DIR/config.json. ``None`` fields take the recipe's value. The
    documented fields are the options of ``deconvnet train``.

    Args:
        model: zfnet, alexnet, zfnet-small or alexnet-small
        data: fashion-mnist, a class subset such as fashion-mnist[0,1,4,5,9], digits or folder:PATH
        val: validation data (default: fashion-mnist:test, or 10% held out)
        recipe: 'paper' = Sec. 3 exactly (default for zfnet/alexnet); 'small' = tuned for 28 px
        epochs: epochs (default: the recipe's, 30 small / 70 paper); with --time-budget, the most it may run
        time_budget: measure this machine's speed, then train as many epochs as end within MINUTES
            (evaluation included; at most --epochs)
        batch_size: mini-batch size
        lr: peak learning rate (default: the recipe's)
        dropout: dropout in fc6/fc7 (default 0.5)
        label_smoothing: label smoothing of the loss
        renorm: --no-renorm turns off the RMS renormalisation of the conv filters (Fig. 6a)
        seed: seed of the initialisation and the batches
        limit: use only the first N images (quick runs)
        snapshots: epochs to keep checkpoints of (default: 1,2,5,10,20,30,40,64 and the last)
        checkpoint_every: steps between resumable checkpoints
        workers: data loading processes (folder data)
        device: auto (CUDA when available), cpu, cuda or cuda:N
        precision: auto: bf16 autocast where the CPU/GPU computes bf16 natively (~2x faster), else fp32
        final_ten_crop: --no-ten-crop skips the final 10-crop evaluation (Sec. 3); the center-crop accuracy
            is still measured
    """

    model: str = "zfnet-small"
    data: str = "fashion-mnist"
    val: str | None = None  # default: the :test split of fashion-mnist, else 10% held out
    recipe: Annotated[str | None, Flag(choices=tuple(RECIPES))] = None  # default by model size
    epochs: Positive | None = None
    batch_size: Positive = 128
    lr: float | None = None
    momentum: float | None = None
    nesterov: bool | None = None
    weight_decay: float | None = None
    schedule: str | None = None  # "plateau" (paper) or "onecycle"
    init: str | None = None
    dropout: float | None = None
    label_smoothing: float | None = None
    augment: str | None = None  # "ten-crop" (Sec. 3), "flip" or "none"; small recipe under a budget: the plan's
    renorm: bool = True
    renorm_radius: float = 0.1
    seed: int = 0
    limit: Positive | None = None
    snapshots: list[int] | None = None
    checkpoint_every: int = 200  # steps between mid-epoch checkpoints (for --resume)
    plateau_patience: int = 2
    workers: int = 0
    device: str = "auto"  # "auto" (cuda when available), "cpu", "cuda", "cuda:1", ...
    precision: Annotated[str, Flag(choices=("auto", "bf16", "fp32"))] = "auto"
    final_ten_crop: Annotated[bool, Flag(name="--no-ten-crop")] = True  # end with the 10-crop evaluation (Sec. 3)
    model_changes: dict = field(default_factory=dict)  # ModelConfig overrides (ablation variants)
    time_budget: Annotated[float | None, Flag(metavar="MINUTES")] = None  # minutes for the whole run
    plan: dict | None = None  # the budget's plan, filled by the trainer: measured speed, epochs chosen

    def resolved(self) -> "TrainConfig":
        """Fill every ``None`` from the recipe, so config.json states what actually ran."""
        if self.model not in MODELS:
            raise UserError(f"unknown model {self.model!r}; choose from {', '.join(MODELS)}")
        recipe = self.recipe or ("small" if self.model.endswith("-small") else "paper")
        if recipe not in RECIPES:
            raise UserError(f"unknown recipe {recipe!r}; choose from {', '.join(RECIPES)}")
        defaults = dict(RECIPES[recipe])
        if self.time_budget is not None and recipe == "small":  # the plan chooses it from the epochs that fit
            defaults.pop("augment")
        filled = {k: (v if getattr(self, k) is None else getattr(self, k)) for k, v in defaults.items()}
        cfg = dataclasses.replace(self, recipe=recipe, **filled)
        if cfg.schedule not in ("plateau", "onecycle"):
            raise UserError(f"unknown schedule {cfg.schedule!r}; use plateau or onecycle")
        if cfg.epochs < 1 or cfg.batch_size < 1:
            raise UserError("--epochs and --batch-size must be positive")
        if cfg.val is None and cfg.data in ("fashion-mnist", "fashion-mnist:train"):
            cfg.val = "fashion-mnist:test"
        if cfg.lr <= 0 or cfg.weight_decay < 0 or not 0 <= cfg.momentum < 1:
            raise UserError("--lr must be positive, weight decay >= 0 and momentum in [0, 1)")
        if cfg.augment is not None and cfg.augment not in AUGMENTS:
            raise UserError(f"unknown augmentation {cfg.augment!r}; choose from {', '.join(AUGMENTS)}")
        if not 0 <= cfg.label_smoothing < 1:
            raise UserError(f"--label-smoothing must be in [0, 1), got {cfg.label_smoothing}")
        if cfg.checkpoint_every < 0:
            raise UserError("--checkpoint-every must be >= 0 (0: only at epoch ends)")
        if cfg.time_budget is not None and not (math.isfinite(cfg.time_budget) and cfg.time_budget > 0):
            raise UserError(f"--time-budget must be a positive number of minutes, got {cfg.time_budget}")
        if cfg.snapshots is not None and any(not 1 <= e <= cfg.epochs for e in cfg.snapshots):
            raise UserError(f"--snapshots must be epochs between 1 and {cfg.epochs}, got {cfg.snapshots}")
        cfg.device = str(device_of(cfg.device))  # auto -> cuda or cpu; a one-line error for a GPU not here
        if cfg.precision == "auto":
            cfg.precision = "bf16" if _native_bf16(cfg.device) else "fp32"
        if cfg.precision not in ("bf16", "fp32"):
            raise UserError(f"unknown precision {cfg.precision!r}; use auto, bf16 or fp32")
        if cfg.snapshots is None:
            cfg.snapshots = sorted({e for e in PAPER_SNAPSHOTS if e <= cfg.epochs} | {cfg.epochs})
        return cfg

    def with_epochs(self, epochs: int) -> "TrainConfig":
        """The same run cut to ``epochs``: snapshots beyond it dropped, the last epoch kept."""
        snapshots = sorted({e for e in self.snapshots if e <= epochs} | {epochs})
        return dataclasses.replace(self, epochs=epochs, snapshots=snapshots)


def _native_bf16(device: str) -> bool:
    """True where bf16 matmuls/convs run natively (AVX512-BF16/AMX CPUs, Ampere+ GPUs)."""
    if device.startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device != "cpu":
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(model: nn.Module, source: Source, preprocess: Preprocess, indices: torch.Tensor | None = None,
             batch_size: int = 500, ten_crop: bool = False, workers: int | None = 0) -> dict:
    """Top-1/top-5 accuracy and mean loss: center crop, or the softmax averaged over the 10 crops.

    Under torchrun each process evaluates its share and the sums are all-reduced. Folder images are
    decoded in ``workers`` processes (None: :func:`deconvnet.data.default_workers`).
    """
    model.eval()
    device = next(model.parameters()).device
    rank, procs = world()
    indices = torch.arange(len(source)) if indices is None else torch.as_tensor(indices)
    mine = indices[rank::procs]
    correct1 = correct5 = loss = 0.0
    k = min(5, len(source.classes))
    bar = progress(total=len(mine), desc="evaluate", unit="img")
    for raw, labels in batches(source, mine, batch_size, workers, pin=device.type == "cuda"):
        bar.update(len(raw))
        x, y = raw.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        if ten_crop:
            crops = preprocess.ten_crops(x)
            probs = torch.stack([F.softmax(model(c), 1) for c in crops]).mean(0)
        else:
            probs = F.softmax(model(preprocess.eval(x)), 1)
        loss += F.nll_loss(probs.clamp_min(1e-12).log(), y, reduction="sum").item()
        top = probs.topk(k, 1).indices
        correct1 += (top[:, 0] == y).sum().item()
        correct5 += (top == y[:, None]).any(1).sum().item()
    bar.close()
    correct1, correct5, loss = all_sum([correct1, correct5, loss])
    n = len(indices)
    return {"top1": correct1 / n, "top5": correct5 / n, "loss": loss / n, "n": n}


# ----------------------------------------------------------------------------- training

def split_indices(cfg: TrainConfig, train_source: Source) -> tuple[Source, torch.Tensor, torch.Tensor]:
    """(val source, train indices, val indices) honouring --val and --limit."""
    n = len(train_source)
    if cfg.limit is not None:
        if cfg.limit < 1:
            raise UserError("--limit must be positive")
        n = min(n, cfg.limit)
    if cfg.val is not None:
        val = open_source(cfg.val, train_source.size, train_source.channels)
        m = len(val) if cfg.limit is None else min(len(val), cfg.limit)
        return val, torch.arange(n), torch.arange(m)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed))
    held = max(1, n // 10)
    return train_source, perm[held:].sort().values, perm[:held].sort().values


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[torch.Tensor]:
    """The global batches of one epoch: a permutation seeded by (seed, epoch), last partial dropped."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    steps = max(1, n // batch_size)
    return [perm[s * batch_size:(s + 1) * batch_size] for s in range(steps)]


def make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                           weight_decay=cfg.weight_decay)


def make_scheduler(cfg: TrainConfig, optimizer, steps_per_epoch: int, total_steps: int | None = None):
    if cfg.schedule == "onecycle":
        # At least 8 steps: OneCycleLR divides by zero when its warm-up phase is under one step (a tiny
        # --limit); such a run then simply stops before the schedule's end.
        total = cfg.epochs * steps_per_epoch if total_steps is None else total_steps
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=max(8, total), pct_start=0.25)
    return torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=0.1, patience=cfg.plateau_patience)


def sgd_step(cfg: TrainConfig, net: nn.Module, optimizer, scheduler, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One step of the recipe: loss (bf16 autocast per ``cfg.precision``), SGD, one-cycle lr, RMS renorm."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
        loss = F.cross_entropy(net(x), y, label_smoothing=cfg.label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if cfg.schedule == "onecycle":
        scheduler.step()
    if cfg.renorm:
        renormalise_filters(getattr(net, "module", net), cfg.renorm_radius)
    return loss.detach()


def sub_crops(augment: str, draws: torch.Tensor) -> torch.Tensor:
    """The sub-crop (0..9, as ``Preprocess.crop``) each image of a batch trains on, from ``draws`` uniform
    in 0..9: any of the 10 ("ten-crop", Sec. 3), the center crop flipped or not ("flip"), or the center crop
    ("none"). The draws are the same whatever the choice, and so are the run's other random numbers."""
    if augment == "flip":
        return torch.where(draws >= 5, 9, 4)
    if augment == "none":
        return torch.full_like(draws, 4)
    return draws


# ----------------------------------------------------------------------------- time budget

SHORT_RUN_EPOCHS = 20  # a budgeted run planned for fewer epochs trains on the center crop alone (README)


def choose_augment(epochs: float) -> str:
    """The augmentation for a run of ``epochs``: the paper's 10 sub-crops pay off in a long run (30
    epochs: 0.9200), but a short one still under-fits with them. zfnet-small on Fashion-MNIST, 10 epochs
    (bf16, seed 0): 10 sub-crops 0.9025 (fp32, 9.6 epochs), flips of the center crop 0.9152, the center
    crop alone 0.9197; so a run of fewer than ``SHORT_RUN_EPOCHS`` trains on the center crop."""
    return "ten-crop" if epochs >= SHORT_RUN_EPOCHS else "none"


MARGIN = 0.03  # of a time budget, kept free for what the plan cannot see (start-up, checkpoint writes)


def plan_epochs(budget_s: float, spent_s: float, steps_per_epoch: int, batch_size: int, val_images: int,
                train_rate: float, eval_rate: float, ceiling: int, ten_crop: bool) -> dict:
    """How many training steps fit in what is left of ``budget_s`` seconds, and whether the 10-crop
    evaluation does; the last epoch may be cut short (a slow machine does not lose most of an epoch).

    A step costs ``batch_size`` images at ``train_rate`` (images/s); every epoch, the cut one too, ends
    with one evaluation of ``val_images`` at ``eval_rate``; the final 10-crop evaluation costs ten and is
    dropped when that is more than a tenth of the budget. At most ``ceiling`` epochs.
    """
    ten_s = 10 * val_images / eval_rate
    ten_crop = ten_crop and ten_s <= 0.1 * budget_s
    left = budget_s * (1 - MARGIN) - spent_s - (ten_s if ten_crop else 0.0)
    steps = _steps_that_fit(left, steps_per_epoch, batch_size / train_rate, val_images / eval_rate)
    steps = min(steps, ceiling * steps_per_epoch)
    epochs = math.ceil(steps / steps_per_epoch)
    estimate = spent_s + steps * batch_size / train_rate + epochs * val_images / eval_rate
    return {"budget_minutes": round(budget_s / 60, 3), "train_images_per_s": round(train_rate, 1),
            "eval_images_per_s": round(eval_rate, 1), "steps": steps, "epochs": epochs, "ten_crop": ten_crop,
            "estimated_seconds": round(estimate + (ten_s if ten_crop else 0.0), 1)}


def _steps_that_fit(left_s: float, steps_per_epoch: int, step_s: float, eval_s: float) -> int:
    """Training steps, in whole epochs and a last cut one, each with its evaluation, within ``left_s``."""
    epoch_s = steps_per_epoch * step_s + eval_s
    whole = max(0, math.floor(left_s / epoch_s))
    part = max(0, min(steps_per_epoch - 1, math.floor((left_s - whole * epoch_s - eval_s) / step_s)))
    return whole * steps_per_epoch + part


def measure_speed(cfg: TrainConfig, model: nn.Module, source: Source, preprocess: Preprocess,
                  train_idx: torch.Tensor, val_source: Source, val_idx: torch.Tensor,
                  seconds: float = 4.0) -> tuple[float, float, int]:
    """(training images/s, evaluation images/s, threads) of this run's own steps, timed for a few seconds
    on a copy of the model, so the run itself is the same as without the measurement.

    On a CPU it also times one thread against the default and keeps the faster: on a machine shared
    with other jobs, two threads that wait for each other at every operation can be several times
    slower than one.
    """
    rank, procs = world()
    rng = torch.get_rng_state()
    probe = copy.deepcopy(model)
    optimizer = make_optimizer(cfg, probe)
    plain = dataclasses.replace(cfg, schedule="plateau")  # no lr schedule to step
    draw = torch.Generator().manual_seed(cfg.seed + 2)
    device = next(probe.parameters()).device
    probe.train()

    def step() -> None:
        batch = train_idx[torch.randint(0, len(train_idx), (cfg.batch_size,), generator=draw)][rank::procs]
        which = torch.randint(0, 10, (len(batch),), generator=draw)
        x = preprocess.train(source.get(batch).to(device), which.to(device))
        sgd_step(plain, probe, optimizer, None, x.contiguous(memory_format=torch.channels_last),
                 source.labels[batch].to(device))

    def rate(limit: float) -> float:
        step()  # the first step at a thread count builds oneDNN's kernels
        steps, started = 0, time.perf_counter()
        while steps < 3 or (time.perf_counter() - started < limit and steps < 1000):
            step()
            steps += 1
        return steps * cfg.batch_size / (time.perf_counter() - started)

    threads = torch.get_num_threads()
    candidates = [threads, 1] if device.type == "cpu" and procs == 1 and threads > 1 else [threads]
    step()
    rates = {}
    for t in candidates:
        torch.set_num_threads(t)
        rates[t] = rate(seconds / len(candidates))
    best = max(rates, key=rates.get)
    torch.set_num_threads(best)
    n = min(len(val_idx), 1000)
    evaluate(probe, val_source, preprocess, val_idx[:min(n, 100)])  # warm-up
    started = time.perf_counter()
    evaluate(probe, val_source, preprocess, val_idx[:n])
    eval_rate = n / (time.perf_counter() - started)
    torch.set_rng_state(rng)
    train_rate, eval_rate = all_sum([rates[best], eval_rate])  # every process plans the same
    return train_rate / procs, eval_rate / procs, best


def resize_schedule(scheduler, total_steps: int, step: int) -> None:
    """Move the end of a one-cycle schedule to ``total_steps`` (the run was re-planned after ``step``
    steps): the annealing phase ends there, and a warm-up still under way ends at a quarter of it."""
    phases = scheduler._schedule_phases
    scheduler.total_steps = max(total_steps, step + 1)
    phases[-1]["end_step"] = float(scheduler.total_steps - 1)
    if step < phases[0]["end_step"]:
        phases[0]["end_step"] = max(float(step + 1), 0.25 * scheduler.total_steps - 1)


def calibrate(cfg: TrainConfig, seconds: float = 4.0) -> dict:
    """This machine's speed for ``cfg``'s model and data: training and evaluation images/s, threads.

    What ``reproduce`` sizes every step of the demo from; the same measurement a budgeted run makes.
    """
    cfg = cfg.resolved()
    model, preprocess, source, val_source, train_idx, val_idx = _setup(cfg)
    threads = torch.get_num_threads()
    train_rate, eval_rate, best = measure_speed(cfg, model, source, preprocess, train_idx, val_source, val_idx,
                                                seconds)
    torch.set_num_threads(threads)
    return {"model": cfg.model, "data": cfg.data, "train_images_per_s": round(train_rate, 1),
            "eval_images_per_s": round(eval_rate, 1), "threads": best, "precision": cfg.precision,
            "device": cfg.device, "cpu": _cpu_name()}


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} x {os.cpu_count()}"
    except OSError:
        pass
    import platform
    return f"{platform.processor() or platform.machine()} x {os.cpu_count()}"


REPLAN_MARGIN = 0.01  # a run re-plans only when it would eat into all but this much of its budget
PACE_STEPS = 25  # a budgeted run on several threads checks its pace every this many steps


def _replan(cfg: TrainConfig, epoch: int, epoch_s: float, val_images: int, clock: float, scheduler,
            steps_per_epoch: int) -> TrainConfig:
    """After ``epoch`` (which took ``epoch_s``, evaluation included): the run re-sized to the steps that
    fit at that pace, or unchanged. It is cut whenever it would overrun; it grows (up to the plan's
    ceiling) only in its first half, so the annealing phase is not stretched late.
    """
    _, procs = world()
    spent = all_sum([time.time() - clock])[0] / procs
    eval_s = val_images / cfg.plan["eval_images_per_s"]
    ten_s = 10 * eval_s if cfg.final_ten_crop else 0.0
    step_s = max(epoch_s - eval_s, 0.5 * epoch_s) / steps_per_epoch
    budget = cfg.time_budget * 60
    done = epoch * steps_per_epoch
    fit = done + _steps_that_fit(budget * (1 - REPLAN_MARGIN) - spent - ten_s, steps_per_epoch, step_s, eval_s)
    grow = done + _steps_that_fit(budget * (1 - MARGIN) - spent - ten_s, steps_per_epoch, step_s, eval_s)
    planned = cfg.plan["steps"]
    if fit < planned - steps_per_epoch // 20:  # over by more than a twentieth of an epoch (no jitter)
        steps, why = fit, "slower"
    elif 2 * done <= planned and min(grow, cfg.plan["ceiling"] * steps_per_epoch) > planned + steps_per_epoch // 4:
        steps, why = min(grow, cfg.plan["ceiling"] * steps_per_epoch), "faster"
    else:
        return cfg
    epochs = max(epoch, math.ceil(steps / steps_per_epoch))
    steps = max(steps, done)
    if world()[0] == 0:
        print(f"time budget: epoch {epoch} took {epoch_s:.0f} s, {why} than planned; the run ends after "
              f"{steps / steps_per_epoch:.2f} epochs instead of {planned / steps_per_epoch:.2f}", flush=True)
    if cfg.schedule == "onecycle":
        resize_schedule(scheduler, max(8, steps), done)
    replans = [*cfg.plan.get("replanned", []), {"after_epoch": epoch, "epoch_seconds": round(epoch_s, 1),
                                                "steps": steps, "epochs": epochs}]
    return dataclasses.replace(cfg.with_epochs(epochs), plan={**cfg.plan, "steps": steps, "epochs": epochs,
                                                               "replanned": replans})


def train(cfg: TrainConfig, out: str | Path, resume: bool = False) -> dict:
    """Train per ``cfg`` into RUN_DIR ``out``; returns the final validation metrics.

    Writes ``config.json``, ``metrics.jsonl`` (one line per epoch), ``checkpoints/epoch-K.pt`` at the
    snapshot epochs, ``checkpoints/last.pt`` (resumable state, every ``checkpoint_every`` steps and at
    each epoch end) and ``final.pt``. With ``resume`` it continues from ``last.pt`` and ends bit-identical
    to an uninterrupted run. With ``cfg.time_budget`` the run measures its speed first and trains as
    many epochs as fit (at most ``cfg.epochs``; config.json records the plan; a resumed run keeps it).
    """
    clock = time.time()
    out = Path(out)
    threads = torch.get_num_threads()
    try:
        with distributed():
            return _train(cfg.resolved(), out, resume, clock)
    finally:
        torch.set_num_threads(threads)  # a budgeted run may have chosen fewer for itself


def _same_run(saved: TrainConfig, cfg: TrainConfig) -> bool:
    """Whether ``cfg`` asks for the run ``saved`` records; under a time budget the plan may differ."""
    a, b = dataclasses.asdict(saved), dataclasses.asdict(cfg)
    if cfg.time_budget is not None:
        for k in ("epochs", "snapshots", "plan", "final_ten_crop", "augment"):
            a.pop(k), b.pop(k)
    return a == b


def _setup(cfg: TrainConfig):
    """A run's seeded model (on its device, channels-last), preprocessing with the training set's mean
    image, data and split: ``(model, preprocess, source, val_source, train_idx, val_idx)``."""
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    probe_config = model_config(cfg.model)
    channels = probe_config.in_channels
    preprocess = preprocess_for(probe_config.input_size, channels)
    source = open_source(cfg.data, preprocess.stored_size, channels)
    val_source, train_idx, val_idx = split_indices(cfg, source)
    changes = dict(cfg.model_changes)
    changes["init"] = cfg.init
    if cfg.dropout is not None:
        changes["dropout"] = cfg.dropout
    try:
        model = build_model(cfg.model, num_classes=len(source.classes), in_channels=channels, **changes)
    except (TypeError, ValueError) as e:
        raise UserError(f"bad model settings: {e}") from None
    preprocess.mean = mean_image(source, preprocess, train_idx)
    preprocess.mean = preprocess.mean.to(cfg.device)
    model.to(torch.device(cfg.device), memory_format=torch.channels_last)  # faster convs and pools on CPU
    return model, preprocess, source, val_source, train_idx, val_idx


@dataclass
class Budget:
    """A run's clock against its ``--time-budget`` (``minutes``; None without one): the seconds spent,
    carried across a resumption (``last.pt`` records them), and how many epochs of the Sec. 3 recipe
    fit in the rest (:func:`plan_epochs`; :func:`_replan` re-sizes the run after each epoch)."""

    minutes: float | None
    clock: float  # time.time() at the start, moved back by the seconds an interrupted run had spent

    def elapsed(self) -> float:
        """Seconds spent by this process (what ``last.pt`` records)."""
        return time.time() - self.clock

    def spent(self) -> float:
        """Seconds spent, the mean over the processes: every process plans the same."""
        return all_sum([self.elapsed()])[0] / world()[1]

    def fits(self, seconds: float) -> bool:
        """Whether ``seconds`` more still end within the budget."""
        return self.spent() + seconds <= self.minutes * 60

    def plan(self, cfg: TrainConfig, model: nn.Module, preprocess: Preprocess, source: Source,
             val_source: Source, train_idx: torch.Tensor, val_idx: torch.Tensor,
             steps_per_epoch: int) -> TrainConfig:
        """A new budgeted run sized to the budget: this machine's speed measured, then as many steps
        as fit (:func:`plan_epochs`, at most ``cfg.epochs``), recorded in ``cfg.plan``."""
        *rates, threads = measure_speed(cfg, model, source, preprocess, train_idx, val_source, val_idx)
        plan = plan_epochs(self.minutes * 60, self.spent(), steps_per_epoch, cfg.batch_size, len(val_idx), *rates,
                           ceiling=cfg.epochs, ten_crop=cfg.final_ten_crop)
        if plan["steps"] < 1:
            raise UserError(f"--time-budget {cfg.time_budget:g} min is too short: one epoch of {len(train_idx)} "
                            f"images takes about {steps_per_epoch * cfg.batch_size / rates[0]:.0f} s here "
                            f"({rates[0]:.0f} images/s measured); give more minutes or a smaller --limit")
        plan.update(precision=cfg.precision, device=cfg.device, threads=threads, ceiling=cfg.epochs,
                    augment=cfg.augment or choose_augment(plan["steps"] / steps_per_epoch))
        cfg = dataclasses.replace(cfg.with_epochs(plan["epochs"]), final_ten_crop=plan["ten_crop"],
                                  augment=plan["augment"], plan=plan)
        if world()[0] == 0:
            print(f"time budget {cfg.time_budget:g} min: measured {plan['train_images_per_s']:,.0f} training and "
                  f"{plan['eval_images_per_s']:,.0f} evaluation images/s ({cfg.precision}, "
                  f"{plan['threads']} thread{'s' if plan['threads'] > 1 else ''}) -> "
                  f"{plan['steps'] / steps_per_epoch:.2f} epochs ({plan['steps']} steps), {cfg.augment} augmentation, "
                  f"{'with' if cfg.final_ten_crop else 'without'} the final 10-crop evaluation "
                  f"(estimated {plan['estimated_seconds'] / 60:.1f} min)", flush=True)
        return cfg


@dataclass
class _Run:
    """One run's model, data, optimizer and progress: what the steps of :func:`_train` share."""

    cfg: TrainConfig
    out: Path
    budget: Budget
    model: nn.Module
    net: nn.Module  # the model, or its DistributedDataParallel wrapper under torchrun
    preprocess: Preprocess
    source: Source
    val_source: Source
    train_idx: torch.Tensor
    val_idx: torch.Tensor
    info: CheckpointInfo
    steps_per_epoch: int
    optimizer: torch.optim.Optimizer
    scheduler: object
    augment: torch.Generator  # crop choice for the whole global batch
    metrics: list[dict] = field(default_factory=list)  # one line of metrics.jsonl per epoch
    epoch: int = 1  # the next step to run: ``step`` of ``epoch``
    step: int = 0
    total_loss: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.float64))  # this epoch's

    @property
    def device(self) -> torch.device:
        return torch.device(self.cfg.device)

    @property
    def last_path(self) -> Path:
        return self.out / "checkpoints" / "last.pt"

    def steps_in(self, epoch: int) -> int:
        """Steps of ``epoch``: a budgeted run's last epoch may be cut short."""
        if self.cfg.plan and epoch == self.cfg.epochs:
            return self.cfg.plan["steps"] - (epoch - 1) * self.steps_per_epoch
        return self.steps_per_epoch

    def paced(self) -> bool:
        """Whether the run checks its pace: several threads chosen by the budget's measurement, on one CPU process."""
        return bool(self.cfg.plan) and self.cfg.plan.get("threads", 1) > 1 and self.cfg.device == "cpu" \
            and world()[1] == 1

    def set_config(self, cfg: TrainConfig) -> None:
        """A re-planned ``cfg``, recorded in the checkpoints and (rank 0) config.json."""
        self.cfg = cfg
        self.info.train_config = dataclasses.asdict(cfg)
        if world()[0] == 0:
            atomic_write_json(self.out / "config.json", self.info.train_config)

    def save_state(self) -> None:
        """``last.pt`` (rank 0): the weights and everything a resumption continues bit-identically from."""
        if world()[0] == 0:
            extra = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                     "augment_rng": self.augment.get_state(), "torch_rng": torch.get_rng_state(),
                     "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None,
                     "metrics": self.metrics, "epoch": self.epoch, "step": self.step,
                     "loss_sum": self.total_loss.item(), "budget_spent": self.budget.elapsed()}
            save_checkpoint(self.last_path, self.model, self.info, extra)


@dataclass
class _Epoch:
    """What the end of an epoch needs of its training part."""

    batches: int  # steps in the epoch
    first_step: int  # the first one run by this process (a resumed epoch starts past 0)
    started: float  # time.time() at its start
    train_seconds: float


def _train(cfg: TrainConfig, out: Path, resume: bool, clock: float) -> dict:
    """The run of :func:`train`: restored or started, its epochs, then its end."""
    _, procs = world()
    if cfg.batch_size % procs:
        raise UserError(f"--batch-size {cfg.batch_size} must be divisible by the {procs} processes")
    cfg, payload, clock = _read_resume(cfg, out, resume, clock)
    run = _start(cfg, out, Budget(cfg.time_budget, clock), payload)
    while run.epoch <= run.cfg.epochs:
        epoch = _train_epoch(run)
        _end_epoch(run, epoch)
    return _finish(run)


def _read_resume(cfg: TrainConfig, out: Path, resume: bool, clock: float) -> tuple[TrainConfig, dict | None, float]:
    """``(cfg, payload, clock)``: with ``resume``, the interrupted run's config (a budgeted run keeps
    its plan), its ``last.pt`` (None when it holds no training state) and its start moved back by the
    seconds it had spent; else ``cfg`` after checking that ``out`` holds no run."""
    last_path = out / "checkpoints" / "last.pt"
    if not resume:
        if (out / "final.pt").exists() or last_path.exists():
            raise UserError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
        return cfg, None, clock
    if not last_path.is_file():
        raise UserError(f"--resume: no checkpoint to resume from at {last_path}")
    payload = read_checkpoint(last_path)
    state = payload.get("training_state")
    saved = TrainConfig(**payload["train_config"])
    if not _same_run(saved, cfg):
        raise UserError(f"--resume: the arguments differ from the interrupted run's {out / 'config.json'}")
    if not state:
        return saved, None, clock
    return saved, payload, clock - state.get("budget_spent", 0.0)


def _start(cfg: TrainConfig, out: Path, budget: Budget, payload: dict | None) -> _Run:
    """The run's seeded model, data, optimizer and schedule (a new budgeted run sized first), restored
    from ``payload`` or, new, with its config.json written."""
    rank, procs = world()
    model, preprocess, source, val_source, train_idx, val_idx = _setup(cfg)
    steps_per_epoch = len(epoch_batches(len(train_idx), cfg.batch_size, cfg.seed, 1))
    if cfg.time_budget is not None and cfg.plan is None:  # a new budgeted run: measure, then size it
        cfg = budget.plan(cfg, model, preprocess, source, val_source, train_idx, val_idx, steps_per_epoch)
    if cfg.plan and cfg.plan.get("threads") and cfg.device == "cpu" and procs == 1:
        torch.set_num_threads(cfg.plan["threads"])  # as measured and planned (a resumed run too)
    net = nn.parallel.DistributedDataParallel(model) if procs > 1 else model
    optimizer = make_optimizer(cfg, model)
    run = _Run(cfg=cfg, out=out, budget=budget, model=model, net=net, preprocess=preprocess, source=source,
               val_source=val_source, train_idx=train_idx, val_idx=val_idx,
               info=CheckpointInfo(model.config, source.classes, preprocess, train_config=dataclasses.asdict(cfg)),
               steps_per_epoch=steps_per_epoch, optimizer=optimizer,
               scheduler=make_scheduler(cfg, optimizer, steps_per_epoch, cfg.plan["steps"] if cfg.plan else None),
               augment=torch.Generator().manual_seed(cfg.seed + 1))
    if payload is not None:
        _restore(run, payload)
    elif rank == 0:
        atomic_write_json(out / "config.json", dataclasses.asdict(cfg))
    if rank == 0:
        print(f"{'resuming' if payload is not None else 'training'} {cfg.model} on {cfg.data} ({len(train_idx)} "
              f"images): {cfg.epochs} epochs, {cfg.recipe} recipe, {cfg.precision} on {cfg.device}"
              + (f" x {procs} processes" if procs > 1 else ""), flush=True)
    return run


def _restore(run: _Run, payload: dict) -> None:
    """``run`` where ``last.pt``'s ``payload`` left it: weights, optimizer, schedule, every RNG, the
    metrics so far, the next step and the loss summed over its epoch's earlier steps."""
    state = payload["training_state"]
    run.model.load_state_dict(payload["state_dict"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.augment.set_state(state["augment_rng"])
    torch.set_rng_state(state["torch_rng"])
    if state.get("cuda_rng") is not None:
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    run.metrics, run.epoch, run.step = state["metrics"], state["epoch"], state["step"]
    if run.step:
        run.total_loss += state["loss_sum"]
    run.preprocess.mean = payload["mean"].to(run.device)
    run.info.accuracy, run.info.epoch = payload.get("accuracy") or {}, payload.get("epoch")


def _train_epoch(run: _Run) -> _Epoch:
    """The SGD steps of ``run.epoch`` from ``run.step`` (Sec. 3: a random sub-crop of each image per
    ``cfg.augment``), with ``last.pt`` every ``checkpoint_every`` steps."""
    rank, procs = world()
    cfg, epoch = run.cfg, run.epoch
    started = time.time()
    mark = time.perf_counter()
    run.net.train()
    batches = epoch_batches(len(run.train_idx), cfg.batch_size, cfg.seed, epoch)[:run.steps_in(epoch)]
    first_step = run.step
    if not first_step:  # else a resumed epoch: the loss of its earlier steps is restored
        run.total_loss = torch.zeros((), dtype=torch.float64)
    bar = progress(total=len(batches), initial=first_step, desc=f"epoch {epoch}/{cfg.epochs}", unit="step",
                   disable=None if rank == 0 else True)
    for s in range(first_step, len(batches)):
        which = sub_crops(cfg.augment, torch.randint(0, 10, (len(batches[s]),), generator=run.augment))
        idx = run.train_idx[batches[s]][rank::procs]
        x = run.preprocess.train(run.source.get(idx).to(run.device), which[rank::procs].to(run.device))
        x = x.contiguous(memory_format=torch.channels_last)
        loss = sgd_step(run.cfg, run.net, run.optimizer, run.scheduler, x, run.source.labels[idx].to(run.device))
        run.total_loss = run.total_loss.to(loss.device) + loss.double()  # on the model's device: no sync per step
        bar.update(1)
        if s % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if run.paced() and (s + 1 - first_step) % PACE_STEPS == 0:
            pace = PACE_STEPS * cfg.batch_size / (time.perf_counter() - mark)
            mark = time.perf_counter()
            _keep_pace(run, pace, s + 1)
        if cfg.checkpoint_every and (s + 1) % cfg.checkpoint_every == 0 and s + 1 < len(batches):
            run.step = s + 1
            run.save_state()
    bar.close()
    return _Epoch(len(batches), first_step, started, time.time() - started)


def _keep_pace(run: _Run, pace: float, step: int) -> None:
    """After ``step``: at under half the measured pace, another job took a core, and two threads that
    wait for each other at every operation then run several times slower than one (README "Threads");
    the run goes on with one."""
    planned = run.cfg.plan["train_images_per_s"]
    if pace >= 0.5 * planned:
        return
    torch.set_num_threads(1)
    run.set_config(dataclasses.replace(run.cfg, plan={**run.cfg.plan, "threads": 1, "threads_dropped": {
        "epoch": run.epoch, "step": step, "images_per_s": round(pace, 1)}}))
    print(f"time budget: {pace:,.0f} images/s, under half the {planned:,.0f} measured; going on with one thread",
          flush=True)


def _end_epoch(run: _Run, epoch: _Epoch) -> None:
    """After an epoch's steps: the validation (Sec. 3: the lr divided by 10 on a plateau), a line of
    metrics.jsonl, a budgeted run re-planned, the snapshot of a Fig. 4 epoch and ``last.pt`` at the
    start of the next epoch."""
    rank, procs = world()
    cfg = run.cfg
    images = (epoch.batches - epoch.first_step) * cfg.batch_size
    train_loss = all_sum([run.total_loss.item() / epoch.batches])[0] / procs
    val = evaluate(run.model, run.val_source, run.preprocess, run.val_idx)
    lr = run.optimizer.param_groups[0]["lr"]
    if cfg.schedule == "plateau":
        run.scheduler.step(1.0 - val["top1"])
    run.metrics.append({"epoch": run.epoch, "lr": lr, "train_loss": train_loss, "val_loss": val["loss"],
                        "val_top1": val["top1"], "val_top5": val["top5"],
                        "seconds": round(time.time() - epoch.started, 2),
                        "train_images_per_s": round(images / epoch.train_seconds, 1)})
    if rank == 0:
        atomic_write_text(run.out / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in run.metrics))
        print(f"epoch {run.epoch}: train loss {train_loss:.4f}  val top-1 {val['top1']:.4f}  "
              f"top-5 {val['top5']:.4f}  ({run.metrics[-1]['seconds']:.0f} s)", flush=True)
    if cfg.time_budget is not None and run.epoch < cfg.epochs:  # slower than planned (load)? end sooner
        epoch_s = run.metrics[-1]["seconds"] * epoch.batches / (epoch.batches - epoch.first_step)
        run.set_config(_replan(cfg, run.epoch, epoch_s, len(run.val_idx), run.budget.clock, run.scheduler,
                               run.steps_per_epoch))
    run.info.epoch = run.epoch
    run.info.accuracy = {"top1": val["top1"], "top5": val["top5"], "data": run.val_source.name, "n": val["n"]}
    if rank == 0 and run.epoch in run.cfg.snapshots:
        save_checkpoint(run.out / "checkpoints" / f"epoch-{run.epoch}.pt", run.model, run.info)
    run.epoch, run.step = run.epoch + 1, 0
    run.save_state()


def _finish(run: _Run) -> dict:
    """The paper's 10-crop evaluation (Sec. 3; under a budget only if it still fits), ``final.pt``, and
    the last epoch's metrics."""
    rank, procs = world()
    val_images = len(run.val_idx)
    if run.metrics and run.cfg.final_ten_crop and run.cfg.time_budget is not None:  # only if it still fits
        ten_s = 10 * val_images / run.cfg.plan["eval_images_per_s"]
        if not run.budget.fits(ten_s):
            if rank == 0:
                print(f"time budget: no time left for the 10-crop evaluation (about {ten_s:.0f} s); skipped",
                      flush=True)
            run.cfg = dataclasses.replace(run.cfg, final_ten_crop=False)
    if run.metrics and run.cfg.final_ten_crop:  # softmax averaged over 10 sub-crops
        ten = evaluate(run.model, run.val_source, run.preprocess, run.val_idx, ten_crop=True)
        run.info.accuracy.update(top1_10crop=ten["top1"], top5_10crop=ten["top5"])
    run.preprocess.mean = run.preprocess.mean.cpu()
    if rank == 0:
        save_checkpoint(run.out / "final.pt", run.model, run.info)
        classes = len(run.info.classes)
        if run.metrics and classes > 1 and run.metrics[-1]["val_top1"] <= 1.2 / classes:
            print(f"deconvnet: warning: {run.out} ended at chance accuracy ({100 * run.metrics[-1]['val_top1']:.1f}% "
                  f"top-1 over {classes} classes): the run diverged or did not learn; try a lower --lr",
                  file=sys.stderr, flush=True)
        if "top1_10crop" in run.info.accuracy:
            print(f"final: val top-1 {run.info.accuracy['top1']:.4f} (center crop), "
                  f"{run.info.accuracy['top1_10crop']:.4f} (10 crops)", flush=True)
    if procs > 1:
        dist.barrier()
    if not run.metrics:
        return {}
    return {**run.metrics[-1], **({"val_top1_10crop": run.info.accuracy["top1_10crop"]}
                                  if run.cfg.final_ten_crop else {})}


callable_module(__name__, train)
