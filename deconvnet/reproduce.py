"""``deconvnet reproduce``: the whole paper on the embedded data, one cached step at a time.

Every step calls one function of :mod:`deconvnet.commands` (what a ``deconvnet`` command does; the
equivalent command line is recorded) through the runner's cache: its outputs go to ``DIR/<step>/``
with a ``step.json`` holding the key of its options, the SHA-256 of the checkpoints it reads and the
source it runs; a rerun skips every step whose key is unchanged (a code edit redoes the steps that can
see it), and an interrupted training step resumes from its last checkpoint. ``DIR/index.html`` is the
report, one section per entry of :data:`deconvnet.sections.SECTIONS`.
"""
from __future__ import annotations

import html
import json
import math
import time
from pathlib import Path

from . import commands
from .commands import command_line
from .data import SPLIT_A, SPLIT_B, subset_spec
from .errors import UserError
from .report import build
from .runner import Step, atomic_write_json, device_of, format_seconds
from .sections import SECTIONS

# Budgets, as options of each step's command: "quick" is what the tests run end to end (about a minute);
# "default" is `make demo`, sized at run time from one measured calibration to end within --time-budget
# minutes (20 by default); "full" the longer schedules behind --full. "fig6-runs": the three trainings of Fig. 6.
BUDGETS = {
    "quick": {"train": dict(limit=1000, epochs=2, snapshots=[1, 2]),
              "fig2": dict(limit=500, maps=4),
              "sanity": dict(count=4, steps=4),
              "fig4": dict(limit=300, maps=3, probe=200),
              "fig5": dict(count=10),
              "fig6-runs": dict(limit=1000, epochs=1, final_ten_crop=False),
              "fig6": dict(limit=300, maps=8),
              "fig7": dict(count=10, draw=2),
              "table1": dict(count=10, repeats=2),
              "table3": dict(limit=500, epochs=1, baseline_seeds=[1, 2]),
              "pretrain-a": dict(limit=1000, epochs=1, final_ten_crop=False),
              "tables4-5": dict(per_class=[1, 5], folds=2, scratch_steps=30),
              "tables4-5-digits": dict(per_class=[1, 5], folds=2, scratch_steps=30),
              "table7": dict(per_class=[5], folds=2),
              "table7-digits": dict(per_class=[5], folds=2)},
    "default": {"train": dict(snapshots=[1, 2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 25, 30]),  # + time_budget (sized)
                "fig2": dict(maps=9),
                "sanity": dict(count=30),
                "fig4": dict(limit=2000, maps=5, probe=500),
                "fig5": dict(count=200),  # the findings over 200 test images, 5 drawn
                "fig6-runs": dict(epochs=3, final_ten_crop=False),  # + time_budget (sized)
                "fig6": dict(limit=1000, maps=16),
                "fig7": dict(count=200, draw=5, size=8, stride=2),  # statistics over 200, panels of 5
                "table1": dict(count=30),  # 30 sneakers: 435 pairs
                "table3": dict(epochs=3, lr=0.02, baseline_seeds=[1, 2]),  # + limit (sized)
                # a quarter of the main run's time on half its images: at the small recipe's peak lr (0.08)
                # the short one-cycle ramp diverged in one demo (chance accuracy from epoch 2), so 0.02
                "pretrain-a": dict(final_ten_crop=False, lr=0.02),  # + time_budget (sized)
                "tables4-5": {},  # + scratch_steps (sized)
                "tables4-5-digits": dict(per_class=[1, 5, 15]),  # + scratch_steps (sized)
                "table7": {},
                "table7-digits": dict(folds=5)},
    "full": {"train": dict(epochs=60, snapshots=[1, 2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 25, 30, 40, 50, 60]),
             "fig2": dict(maps=16),
             "sanity": dict(count=100),
             "fig4": dict(limit=10000, maps=8, probe=1000),
             "fig5": dict(count=1000),
             "fig6-runs": dict(epochs=12, final_ten_crop=False),
             "fig6": dict(limit=5000, maps=16),
             "fig7": dict(count=1000, draw=5, size=8, stride=2),
             "table1": dict(count=100, repeats=10),
             "table3": dict(epochs=12, baseline_seeds=[1, 2]),
             "pretrain-a": dict(epochs=30, final_ten_crop=False, lr=0.02),
             "tables4-5": {},
             "tables4-5-digits": {},
             "table7": {},
             "table7-digits": {}},
}

DEMO_MINUTES = 20.0  # `make demo`, set-up excluded
# The reference: what each step of the default budget took on this project's 2-core AMD EPYC (bf16),
# in seconds, at its measured speed of REFERENCE training and evaluation images/s (zfnet-small); the
# analyses' figures were corrected by two demos measured at a fifth of that speed and by one at 0.7x (the
# steps' own times on this machine, scaled).
REFERENCE = {"train_images_per_s": 4100.0, "eval_images_per_s": 3500.0}
ANALYSES = {"fig2": 7, "sanity": 12, "fig4": 25, "fig5": 10, "fig6": 2, "fig7": 13, "table1": 2, "table7": 8,
            "table7-digits": 39}  # ~ evaluation
SCALED = {"table3": 330, "tables4-5": 99, "tables4-5-digits": 47}  # ~ training speed (the Fig. 6 runs and training are budgeted)
ABLATE_LIMIT, SCRATCH_STEPS, FIG6_EPOCHS, TRAIN_EPOCHS = 20000, 300, 3, 30
OVERHEAD = 26  # seconds: start-up of 17 commands, the calibration, the report
PRETRAIN_SHARE = 0.25  # of the time left for training, for the pretraining on classes A (Tables 4/5, 7)
START = 8  # seconds of a budgeted training run before its first epoch: data, mean image, its own measurement
SLOW_EVAL = 0.5  # below half the reference evaluation speed the analyses shrink with it ...
SHRUNK = {"sanity": {"count": 8}, "fig4": {"limit": 500, "probe": 200}, "fig5": {"count": 40},  # ... these
          "fig7": {"count": 40}, "table7-digits": {"folds": 2}}  # options of theirs, each to at least this


def size_demo(speed: dict, minutes: float = DEMO_MINUTES, data_images: int = 60000, val_images: int = 10000) -> dict:
    """Every step's size and estimated seconds for a ``minutes`` demo at the measured ``speed``.

    The analyses keep their sizes (they take seconds) down to half the reference evaluation speed and
    shrink with it below (their image counts scaled by ``sizes["analyses"]``); the Fig. 6 runs, the ablation and transfer's
    from-scratch baseline keep theirs where the machine is fast enough and shrink together where it is
    not; the main training gets the rest as its --time-budget (at most 30 epochs), less the share
    PRETRAIN_SHARE of it that pretrains on classes A for Tables 4/5 and 7 (on half the images an epoch
    takes half the time, so the two models see about as many epochs).
    """
    f = speed["train_images_per_s"] / REFERENCE["train_images_per_s"]
    g = speed["eval_images_per_s"] / REFERENCE["eval_images_per_s"]
    total = minutes * 60
    shrink = min(1.0, g / SLOW_EVAL)  # a slow machine looks at fewer images in the analyses
    estimates = {name: s / g * (shrink if name in SHRUNK else 1.0) for name, s in ANALYSES.items()}
    epoch = data_images / speed["train_images_per_s"] + val_images / speed["eval_images_per_s"]
    fig6 = {name: START + FIG6_EPOCHS * epoch * (0.4 if name == "fig6-alexnet" else 1.0)  # alexnet-small's
            for name in ("fig6-zfnet", "fig6-alexnet", "fig6-norenorm")}  # strided conv1: ~0.4x the work
    left = total - OVERHEAD - sum(estimates.values())
    wanted = sum(fig6.values()) + (SCALED["table3"] + SCALED["tables4-5"] + SCALED["tables4-5-digits"]) / f
    share = max(0.0, min(1.0, 0.45 * left / wanted))  # the main training keeps at least 55% of what is left
    sizes = {"analyses": round(shrink, 3)}
    for name, whole in fig6.items():
        least = START + 2 * val_images / speed["eval_images_per_s"] + 10  # a few steps and their evaluation
        budget = max(least, whole * share / 0.9)  # room for the trainer's margin: a run that fits is not cut
        sizes[name] = round(budget / 60, 2)
        estimates[name] = min(whole, budget)
    sizes["table3"] = max(1000, int(ABLATE_LIMIT * share) // 1000 * 1000)
    estimates["table3"] = SCALED["table3"] / f * sizes["table3"] / ABLATE_LIMIT
    sizes["tables4-5"] = max(30, int(SCRATCH_STEPS * share) // 10 * 10)
    for name in ("tables4-5", "tables4-5-digits"):  # both transfers train their baselines this long
        estimates[name] = SCALED[name] / f * sizes["tables4-5"] / SCRATCH_STEPS
    rest = max(0.4 * left, total - OVERHEAD - sum(estimates.values()))  # a very slow machine overruns
    pretrain, train = PRETRAIN_SHARE * rest, (1 - PRETRAIN_SHARE) * rest
    sizes["pretrain-a"] = round(pretrain / 60, 2)
    estimates["pretrain-a"] = min(START + TRAIN_EPOCHS * epoch / 2, pretrain * 0.98)
    sizes["train"] = round(train / 60, 2)
    whole = START + TRAIN_EPOCHS * epoch + 10 * val_images / speed["eval_images_per_s"]
    estimates["train"] = min(whole, train * 0.98)
    return {"minutes": minutes, "speed": speed, "sizes": sizes,
            "estimates": {k: round(v) for k, v in estimates.items()}}


FIG6_RUNS = ("fig6-zfnet", "fig6-alexnet", "fig6-norenorm")
PATHS = ("checkpoint", "run", "runs", "seed_noise")  # options that name files of the report directory
# What continues an interrupted step in its directory (others start afresh): the trainer from its last
# checkpoint, the ablation from its finished and interrupted variants.
RESUME = {"train": lambda out: {"resume": (out / "checkpoints" / "last.pt").exists()}, "ablation": lambda out: {}}


def _step(name: str, command: str, options: dict, inputs: list[str] = ()) -> Step:
    function = getattr(commands, command)
    return Step(name, function, options, list(inputs), command_line(command, {**options, "out": name}),
                paths=PATHS, resume=RESUME.get(command))


def plan(data: str, model: str, budget: str, sizes: dict | None = None, device: str = "auto") -> list[Step]:
    """The steps of the paper, in the order they must run: the trainings first, then one step per section
    of :data:`deconvnet.sections.SECTIONS` in paper order, but Table 3 before Fig. 6 (which reads its seed
    noise); ``sizes`` from :func:`size_demo`; ``device`` given to every step (where it is not ``auto``)."""
    b = {k: dict(v) for k, v in BUDGETS[budget].items()}
    runs = {name: dict(b["fig6-runs"]) for name in FIG6_RUNS}
    if sizes:
        b["train"]["time_budget"] = sizes["train"]
        for name in FIG6_RUNS:
            runs[name]["time_budget"] = sizes[name]
        b["table3"]["limit"] = sizes["table3"]
        b["tables4-5"]["scratch_steps"] = b["tables4-5-digits"]["scratch_steps"] = sizes["tables4-5"]
        b["pretrain-a"]["time_budget"] = sizes["pretrain-a"]
        for name, options in SHRUNK.items():  # a slow machine: fewer images in the analyses
            for option, least in options.items():
                if option in b[name] and sizes.get("analyses", 1.0) < 1.0:
                    b[name][option] = max(least, int(b[name][option] * sizes["analyses"]))
    ckpt = "train/final.pt"
    # Tables 4/5 and 7 transfer from classes A of Fashion-MNIST to its disjoint classes B (the analogue of
    # ImageNet -> Caltech-101, data.SPLIT_A/SPLIT_B), pretrained by the step pretrain-a whatever --data is;
    # their -digits steps transfer the main model to 8x8 digits, a far-domain control.
    pretrained, target_b = "pretrain-a/final.pt", subset_spec(SPLIT_B, "test")
    test = f"{data}:test" if data == "fashion-mnist" else data
    arch_model = "alexnet-small" if model.endswith("-small") else "alexnet"
    common = {  # what each step is given besides its budget
        "train": dict(model=model, data=data), "fig2": dict(checkpoint=ckpt, data=test), "fig4": dict(run="train"),
        "sanity": dict(checkpoint=ckpt, data=test),
        "fig5": dict(checkpoint=ckpt, data=test), "fig6": dict(runs=list(FIG6_RUNS), seed_noise="table3/ablation.json"),
        "fig7": dict(checkpoint=ckpt, data=test),
        "table1": dict(checkpoint=ckpt, data=test, **({"class_name": "Sneaker"} if data == "fashion-mnist" else {})),
        "table3": dict(model=model, data=data),
        "tables4-5": dict(checkpoint=pretrained, target=target_b), "table7": dict(checkpoint=pretrained, target=target_b),
        "tables4-5-digits": dict(checkpoint=ckpt, target="digits"), "table7-digits": dict(checkpoint=ckpt, target="digits")}
    inputs = {"fig2": [ckpt], "sanity": [ckpt], "fig4": [ckpt], "fig5": [ckpt], "fig7": [ckpt], "table1": [ckpt], "tables4-5": [pretrained],
              "table7": [pretrained], "tables4-5-digits": [ckpt], "table7-digits": [ckpt], "fig6": [f"{name}/final.pt" for name in FIG6_RUNS] + ["table3/ablation.json"]}
    steps = [_step("train", "train", {**common["train"], **b["train"]})]
    steps += [_step("fig6-zfnet", "train", dict(model=model, data=data, **runs["fig6-zfnet"])),
              _step("fig6-alexnet", "train", dict(model=arch_model, data=data, **runs["fig6-alexnet"])),
              _step("fig6-norenorm", "train", dict(model=model, data=data, renorm=False, **runs["fig6-norenorm"]))]
    steps.append(_step("pretrain-a", "train", dict(model=model, data=subset_spec(SPLIT_A), val=subset_spec(SPLIT_A, "test"),
                                                   **b["pretrain-a"])))
    for section in SECTIONS:
        if section.step and section.step != "train":
            steps.append(_step(section.step, section.command, {**common[section.step], **b[section.step]},
                               inputs.get(section.step, [])))
    names = [s.name for s in steps]  # Fig. 6 judges its accuracy against Table 3's seed noise: the ablation first
    steps.insert(names.index("fig6"), steps.pop(names.index("table3")))
    if device != "auto":
        for step in steps:
            step.options["device"] = device
            step.command = command_line(step.function.__name__, {**step.options, "out": step.name})
    return steps


def calibration(root: Path, model: str, data: str, device: str = "auto") -> dict:
    """This machine's measured speed on ``device`` (where the steps will run), cached in
    ``root/calibration.json`` so a rerun plans the same steps."""
    from .train import TrainConfig, calibrate

    path = root / "calibration.json"
    if path.is_file():
        cached = json.loads(path.read_text())
        if (cached.get("model"), cached.get("data"), cached.get("device")) == (model, data, str(device_of(device))):
            return cached
    speed = calibrate(TrainConfig(model=model, data=data, device=device))
    atomic_write_json(path, speed)
    return speed


def reproduce(out: str | Path = "report", quick: bool = False, data: str = "fashion-mnist",
              model: str = "zfnet-small", full: bool = False, minutes: float | None = None,
              device: str = "auto") -> Path:
    """Run every step (cached) and write ``out/index.html``; returns its path.

    The default budget measures this machine's training speed once (cached in ``out/calibration.json``)
    and sizes every step so the whole run ends within ``minutes`` (default 20).
    """
    from .models import MODELS

    if model not in MODELS:
        raise UserError(f"unknown model {model!r}; choose from {', '.join(MODELS)}")
    budget = "quick" if quick else "full" if full else "default"
    if minutes is not None and (budget != "default" or not (math.isfinite(minutes) and minutes > 0)):
        raise UserError("--time-budget must be a positive number of minutes, and goes without --quick/--full")
    device_of(device)  # a one-line error for a device this machine lacks, before any step runs
    root = Path(out).resolve()
    root.mkdir(parents=True, exist_ok=True)
    started = time.time()
    demo = None
    if budget == "default":
        speed = calibration(root, model, data, device)
        demo = size_demo(speed, DEMO_MINUTES if minutes is None else minutes)
        import torch

        torch.set_num_threads(speed["threads"])  # the steps run in this process, at the measured speed
        print(f"this machine: {speed['train_images_per_s']:,.0f} training and {speed['eval_images_per_s']:,.0f} "
              f"evaluation images/s ({model}, {speed['precision']}, {speed['threads']} thread"
              f"{'s' if speed['threads'] > 1 else ''}); steps sized to end within {demo['minutes']:g} min",
              flush=True)
        atomic_write_json(root / "budget.json", demo)
    elif (root / "budget.json").is_file():
        (root / "budget.json").unlink()  # the report states the budget of this run, not an earlier one
    steps = plan(data, model, budget, demo["sizes"] if demo else None, device)
    intro = (f"<p>Zeiler &amp; Fergus (ECCV 2014), run by <code>deconvnet reproduce</code> ({html.escape(budget)} "
             "budget) on the embedded data. Each section shows our figure, our numbers beside the paper's, and "
             "whether its claim held at this scale, with its 95% interval and sample size.</p>")
    index = build(root, steps, SECTIONS, "Visualizing and Understanding Convolutional Networks, reproduced", intro,
                  lambda: _details(root), demo["estimates"] if demo else None)
    print(f"report: {index}  ({format_seconds(time.time() - started)} in all)", flush=True)
    return index


def _details(root: Path) -> str:
    """The run section's details: how the steps were sized, and the main model's training config."""
    sizing = ""
    if (root / "budget.json").is_file():  # the default budget: sized from this machine's speed
        demo = json.loads((root / "budget.json").read_text())
        speed = demo["speed"]
        sizing = (f"<p>Budget: {demo['minutes']:g} minutes in all. This machine ({html.escape(speed.get('cpu', '?'))}) "
                  f"measured {speed['train_images_per_s']:,.0f} training and {speed['eval_images_per_s']:,.0f} "
                  f"evaluation images/s ({html.escape(speed['precision'])}, {speed['threads']} thread(s)); every "
                  f"step was sized from that (the --time-budget, --limit and --scratch-steps below), so a faster "
                  f"or slower machine trains longer or shorter and its numbers differ.</p>")
    config = (root / "train" / "config.json").read_text()
    return f"{sizing}<p>Training config (seed included):</p><pre>{html.escape(config)}</pre>"
