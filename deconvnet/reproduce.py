"""``deconvnet reproduce``: the whole paper on the embedded data, one cached step at a time.

Every step is one ``deconvnet`` command (the same a user would type), run in this process. Its
outputs go to ``DIR/<step>/`` with a ``step.json`` holding the key of its inputs (the command and
the SHA-256 of the checkpoints it reads); a rerun skips every step whose key is unchanged, and an
interrupted training step resumes from its last checkpoint. ``DIR/index.html`` is the report.
"""
from __future__ import annotations

import ast
import hashlib
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError
from .runner import atomic_write_json, file_sha256

# Budgets: "quick" is what the tests run end to end (about a minute); "default" is `make demo`, sized
# at run time from one measured calibration to end within --time-budget minutes (20 by default); "full"
# the longer schedules behind --full.
BUDGETS = {
    "quick": dict(train=["--limit", "1000", "--epochs", "2", "--snapshots", "1,2"],
                  topk=["--limit", "500", "--maps", "4"],
                  evolution=["--limit", "300", "--maps", "3"],
                  arch_train=["--limit", "1000", "--epochs", "1", "--no-ten-crop"],
                  compare=["--limit", "300", "--maps", "8"],
                  occlude=["--index", "0,1"],
                  invariance=["--index", "0,1,2"],
                  correspond=["--repeats", "2"],
                  ablate=["--limit", "500", "--epochs", "1"],
                  transfer=["--per-class", "1,5", "--folds", "2", "--scratch-steps", "30"],
                  layers=["--per-class", "5", "--folds", "2"]),
    "default": dict(train=["--snapshots", "1,2,3,4,5,6,8,10,12,15,20,25,30"],  # + --time-budget (sized)
                    topk=["--maps", "9"],
                    evolution=["--limit", "2000", "--maps", "5"],
                    arch_train=["--epochs", "3", "--no-ten-crop"],  # + --time-budget (sized)
                    compare=["--limit", "1000", "--maps", "16"],
                    occlude=["--index", "0,1,2,3,4", "--size", "8", "--stride", "2"],
                    invariance=[],
                    correspond=[],
                    ablate=["--epochs", "3", "--lr", "0.02"],  # + --limit (sized)
                    transfer=[],  # + --scratch-steps (sized)
                    layers=[]),
    "full": dict(train=["--epochs", "60", "--snapshots", "1,2,3,4,5,6,8,10,12,15,20,25,30,40,50,60"],
                 topk=["--maps", "16"],
                 evolution=["--limit", "10000", "--maps", "8"],
                 arch_train=["--epochs", "12", "--no-ten-crop"],
                 compare=["--limit", "5000", "--maps", "16"],
                 occlude=["--index", "0,1,2,3,4", "--size", "8", "--stride", "2"],
                 invariance=[],
                 correspond=["--repeats", "10"],
                 ablate=["--epochs", "12"],
                 transfer=[],
                 layers=[]),
}

DEMO_MINUTES = 20.0  # `make demo`, set-up excluded
# The reference: what each step of the default budget took on this project's 2-core AMD EPYC (bf16),
# in seconds, at its measured speed of REFERENCE training and evaluation images/s (zfnet-small); the
# analyses' figures were corrected by a demo measured at a third of that speed (BENCHMARKS.md).
REFERENCE = {"train_images_per_s": 4100.0, "eval_images_per_s": 3500.0}
ANALYSES = {"fig2": 6, "fig4": 8, "fig5": 1, "fig6": 1, "fig7": 1, "table1": 1, "table7": 20}  # ~ evaluation
SCALED = {"table3": 250, "tables4-5": 110}  # ~ training speed (the Fig. 6 runs and training are budgeted)
ABLATE_LIMIT, SCRATCH_STEPS, FIG6_EPOCHS, TRAIN_EPOCHS = 20000, 300, 3, 30
OVERHEAD = 20  # seconds: start-up of 13 commands, the calibration, the report
START = 8  # seconds of a budgeted training run before its first epoch: data, mean image, its own measurement


def size_demo(speed: dict, minutes: float = DEMO_MINUTES, data_images: int = 60000, val_images: int = 10000) -> dict:
    """Every step's size and estimated seconds for a ``minutes`` demo at the measured ``speed``.

    The analyses keep their sizes (they take seconds); the Fig. 6 runs, the ablation and transfer's
    from-scratch baseline keep theirs where the machine is fast enough and shrink together where it is
    not; the main training gets the rest as its --time-budget (at most 30 epochs).
    """
    f = speed["train_images_per_s"] / REFERENCE["train_images_per_s"]
    g = speed["eval_images_per_s"] / REFERENCE["eval_images_per_s"]
    total = minutes * 60
    estimates = {name: s / g for name, s in ANALYSES.items()}
    epoch = data_images / speed["train_images_per_s"] + val_images / speed["eval_images_per_s"]
    fig6 = {name: START + FIG6_EPOCHS * epoch * (0.4 if name == "fig6-alexnet" else 1.0)  # alexnet-small's
            for name in ("fig6-zfnet", "fig6-alexnet", "fig6-norenorm")}  # strided conv1: ~0.4x the work
    left = total - OVERHEAD - sum(estimates.values())
    wanted = sum(fig6.values()) + (SCALED["table3"] + SCALED["tables4-5"]) / f
    share = max(0.0, min(1.0, 0.45 * left / wanted))  # the main training keeps at least 55% of what is left
    sizes = {}
    for name, whole in fig6.items():
        least = START + 2 * val_images / speed["eval_images_per_s"] + 10  # a few steps and their evaluation
        budget = max(least, whole * share / 0.9)  # room for the trainer's margin: a run that fits is not cut
        sizes[name] = round(budget / 60, 2)
        estimates[name] = min(whole, budget)
    sizes["table3"] = max(1000, int(ABLATE_LIMIT * share) // 1000 * 1000)
    estimates["table3"] = SCALED["table3"] / f * sizes["table3"] / ABLATE_LIMIT
    sizes["tables4-5"] = max(30, int(SCRATCH_STEPS * share) // 10 * 10)
    estimates["tables4-5"] = SCALED["tables4-5"] / f * sizes["tables4-5"] / SCRATCH_STEPS
    train = max(0.4 * left, total - OVERHEAD - sum(estimates.values()))  # a very slow machine overruns
    sizes["train"] = round(train / 60, 2)
    whole = START + TRAIN_EPOCHS * epoch + 10 * val_images / speed["eval_images_per_s"]
    estimates["train"] = min(whole, train * 0.98)
    return {"minutes": minutes, "speed": speed, "sizes": sizes,
            "estimates": {k: round(v) for k, v in estimates.items()}}


@dataclass
class Step:
    """One section of the paper: the command that makes it and the files its result depends on."""

    name: str  # directory under DIR
    argv: list[str]
    inputs: list[str] = field(default_factory=list)  # paths relative to DIR whose content keys the cache


def plan(data: str, model: str, budget: str, sizes: dict | None = None) -> list[Step]:
    """The steps of the paper, in the order they must run (training first); ``sizes`` from :func:`size_demo`."""
    b = {k: list(v) for k, v in BUDGETS[budget].items()}
    arch = {}
    if sizes:
        b["train"] += ["--time-budget", f"{sizes['train']:g}"]
        arch = {n: ["--time-budget", f"{sizes[n]:g}"] for n in ("fig6-zfnet", "fig6-alexnet", "fig6-norenorm")}
        b["ablate"] += ["--limit", str(sizes["table3"])]
        b["transfer"] += ["--scratch-steps", str(sizes["tables4-5"])]
    ckpt = "train/final.pt"
    arch_model = "alexnet-small" if model.endswith("-small") else "alexnet"
    test = f"{data}:test" if data == "fashion-mnist" else data
    parts = ["--class", "Sneaker"] if data == "fashion-mnist" else []  # aligned, with preset parts
    return [
        Step("train", ["train", "--model", model, "--data", data, *b["train"], "--out", "train"]),
        Step("fig2", ["topk", "--checkpoint", ckpt, "--data", test, *b["topk"], "--out", "fig2"], [ckpt]),
        Step("fig4", ["evolution", "--run", "train", *b["evolution"], "--out", "fig4"], [ckpt]),
        Step("fig5", ["invariance", "--checkpoint", ckpt, "--data", test, *b["invariance"], "--out", "fig5"], [ckpt]),
        Step("fig6-zfnet", ["train", "--model", model, "--data", data, *b["arch_train"],
                            *arch.get("fig6-zfnet", []), "--out", "fig6-zfnet"]),
        Step("fig6-alexnet", ["train", "--model", arch_model, "--data", data, *b["arch_train"],
                              *arch.get("fig6-alexnet", []), "--out", "fig6-alexnet"]),
        Step("fig6-norenorm", ["train", "--model", model, "--data", data, *b["arch_train"], "--no-renorm",
                               *arch.get("fig6-norenorm", []), "--out", "fig6-norenorm"]),
        Step("fig6", ["compare", "--runs", "fig6-zfnet,fig6-alexnet,fig6-norenorm", *b["compare"], "--out", "fig6"],
             ["fig6-zfnet/final.pt", "fig6-alexnet/final.pt", "fig6-norenorm/final.pt"]),
        Step("fig7", ["occlude", "--checkpoint", ckpt, "--data", test, *b["occlude"], "--out", "fig7"], [ckpt]),
        Step("table1", ["correspond", "--checkpoint", ckpt, "--data", test, *parts, *b["correspond"],
                        "--out", "table1"], [ckpt]),
        Step("table3", ["ablate", "--model", model, "--data", data, *b["ablate"], "--out", "table3"]),
        Step("tables4-5", ["transfer", "--checkpoint", ckpt, *b["transfer"], "--out", "tables4-5"], [ckpt]),
        Step("table7", ["layers", "--checkpoint", ckpt, *b["layers"], "--out", "table7"], [ckpt]),
    ]


# The module that does each command's work: a step's key holds the source of that module and of every
# package module it imports, so a code edit redoes exactly the steps that can see it (an edit to
# occlusion.py redoes Fig. 7 and keeps the training).
# The analyses also load their model through the model under study (subject.py).
COMMAND_MODULES = {"train": ["train"], "ablate": ["ablation"], "evolution": ["evolution"],
                   "compare": ["architecture"], "topk": ["topk", "subject"], "invariance": ["invariance", "subject"],
                   "occlude": ["occlusion", "subject"], "correspond": ["correspondence", "subject"],
                   "transfer": ["transfer", "subject"], "layers": ["layer_features", "subject"]}
PACKAGE = Path(__file__).parent


def _imports(module: str) -> set[str]:
    """The package modules ``module`` imports (``from .x import``, at any depth of the file), by name."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:  # from . import x
                found.update(alias.name for alias in node.names)
    return {m for m in found if (PACKAGE / f"{m}.py").is_file()}


def source_key(command: str) -> str:
    """SHA-256 over the source of the command's module and everything it imports from the package."""
    todo, seen = list(COMMAND_MODULES.get(command, ["cli"])), set()
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(_imports(module) - seen)
    digest = hashlib.sha256()
    for module in sorted(seen):
        digest.update(module.encode() + b"\0" + (PACKAGE / f"{module}.py").read_bytes())
    return digest.hexdigest()


def step_key(step: Step, root: Path) -> str:
    """The cache key: the command, the content of every input file and the source it runs."""
    inputs = {p: file_sha256(root / p) for p in step.inputs}
    text = json.dumps({"argv": step.argv, "inputs": inputs, "source": source_key(step.argv[0])}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _fmt(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


def run_step(step: Step, root: Path, budget: str, position: str, estimate: float | None = None) -> dict:
    """Run one step unless its outputs for the same key are already there; returns its record."""
    from .cli import main

    out = root / step.name
    marker = out / "step.json"
    key = step_key(step, root)
    if marker.is_file():
        record = json.loads(marker.read_text())
        if record.get("key") == key:
            print(f"{position} {step.name:<14} cached ({_fmt(record['seconds'])} when it ran)", flush=True)
            return record
    print(f"{position} {step.name:<14} running" + (f", estimated {_fmt(estimate)}" if estimate else ""), flush=True)
    argv = _absolute(step.argv, root)
    started_marker = out / "started.json"  # the key of the run that was interrupted here, if any
    same_run = started_marker.is_file() and json.loads(started_marker.read_text()).get("key") == key
    if same_run and step.argv[0] == "train" and (out / "checkpoints" / "last.pt").exists():
        argv.append("--resume")  # an interrupted training run continues where it stopped
    elif out.exists() and not (same_run and step.argv[0] == "ablate"):  # ablate resumes its variants itself
        shutil.rmtree(out)  # outputs of another command (a changed budget) or of an unfinished analysis
    atomic_write_json(started_marker, {"key": key})
    started = time.time()
    code = main(argv)
    if code != 0:
        raise UserError(f"step {step.name} failed: deconvnet {' '.join(argv)}")
    record = {"key": key, "command": "deconvnet " + " ".join(step.argv), "seconds": round(time.time() - started, 1),
              "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    atomic_write_json(marker, record)
    started_marker.unlink()
    print(f"{position} {step.name:<14} done in {_fmt(record['seconds'])}", flush=True)
    return record


def _absolute(argv: list[str], root: Path) -> list[str]:
    """The step's command with its --out/--checkpoint/--run/--runs paths under ``root``."""
    out = list(argv)
    for i in range(1, len(out)):
        if out[i - 1] in ("--out", "--checkpoint", "--run"):
            out[i] = str(root / out[i])
        elif out[i - 1] == "--runs":
            out[i] = ",".join(str(root / r) for r in out[i].split(","))
    return out


def calibration(root: Path, model: str, data: str) -> dict:
    """This machine's measured speed, cached in ``root/calibration.json`` so a rerun plans the same steps."""
    from .train import TrainConfig, calibrate

    path = root / "calibration.json"
    if path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("model") == model and cached.get("data") == data:
            return cached
    speed = calibrate(TrainConfig(model=model, data=data))
    atomic_write_json(path, speed)
    return speed


def reproduce(out: str | Path = "report", quick: bool = False, data: str = "fashion-mnist",
              model: str = "zfnet-small", full: bool = False, minutes: float | None = None) -> Path:
    """Run every step (cached) and write ``out/index.html``; returns its path.

    The default budget measures this machine's training speed once (cached in ``out/calibration.json``)
    and sizes every step so the whole run ends within ``minutes`` (default 20).
    """
    from .report import write_report

    from .models import MODELS

    if model not in MODELS:
        raise UserError(f"unknown model {model!r}; choose from {', '.join(MODELS)}")
    budget = "quick" if quick else "full" if full else "default"
    if minutes is not None and (budget != "default" or not (math.isfinite(minutes) and minutes > 0)):
        raise UserError("--time-budget must be a positive number of minutes, and goes without --quick/--full")
    root = Path(out).resolve()
    root.mkdir(parents=True, exist_ok=True)
    started = time.time()
    demo = None
    if budget == "default":
        speed = calibration(root, model, data)
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
    steps = plan(data, model, budget, demo["sizes"] if demo else None)
    records = {}
    for i, step in enumerate(steps, 1):
        estimate = demo["estimates"].get(step.name) if demo else None
        records[step.name] = run_step(step, root, budget, f"[{i}/{len(steps)}]", estimate)
    index = write_report(root, steps, records, budget=budget, argv=sys.argv)
    print(f"report: {index}  ({_fmt(time.time() - started)} in all)", flush=True)
    return index
