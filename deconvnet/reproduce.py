"""``deconvnet reproduce``: the whole paper on the embedded data, one cached step at a time.

Every step is one ``deconvnet`` command (the same a user would type), run in this process. Its
outputs go to ``DIR/<step>/`` with a ``step.json`` holding the key of its inputs (the command and
the SHA-256 of the checkpoints it reads); a rerun skips every step whose key is unchanged, and an
interrupted training step resumes from its last checkpoint. ``DIR/index.html`` is the report.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError
from .runner import atomic_write_json

# Budgets: "quick" is what the tests run end to end (minutes); "default" is `make demo`
# (<= 30 minutes with set-up on 2 CPU cores); "full" the longer schedules behind --full.
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
    "default": dict(train=["--snapshots", "1,2,3,4,5,6,8,10,12,15,20,25,30"],  # the defaults + Fig. 4 epochs
                    topk=["--maps", "9"],
                    evolution=["--limit", "2000", "--maps", "5"],
                    arch_train=["--epochs", "3", "--no-ten-crop"],
                    compare=["--limit", "1000", "--maps", "16"],
                    occlude=["--index", "0,1,2,3,4", "--size", "8", "--stride", "2"],
                    invariance=[],
                    correspond=[],
                    ablate=["--limit", "20000", "--epochs", "3", "--lr", "0.02"],
                    transfer=[],
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

ESTIMATES = {  # seconds on 2 CPU cores (measured, `make demo` on this project's 2-core machine)
    "quick": {},
    "default": {"train": 500, "fig2": 5, "fig4": 12, "fig6-zfnet": 50, "fig6-alexnet": 20, "fig6-norenorm": 50,
                "table3": 250, "tables4-5": 110, "table7": 25},
    "full": {},
}


@dataclass
class Step:
    """One section of the paper: the command that makes it and the files its result depends on."""

    name: str  # directory under DIR
    argv: list[str]
    inputs: list[str] = field(default_factory=list)  # paths relative to DIR whose content keys the cache


def plan(data: str, model: str, budget: str) -> list[Step]:
    """The steps of the paper, in the order they must run (training first)."""
    b = BUDGETS[budget]
    ckpt = "train/final.pt"
    arch_model = "alexnet-small" if model.endswith("-small") else "alexnet"
    test = f"{data}:test" if data == "fashion-mnist" else data
    parts = ["--class", "Sneaker"] if data == "fashion-mnist" else []  # aligned, with preset parts
    return [
        Step("train", ["train", "--model", model, "--data", data, *b["train"], "--out", "train"]),
        Step("fig2", ["topk", "--checkpoint", ckpt, "--data", test, *b["topk"], "--out", "fig2"], [ckpt]),
        Step("fig4", ["evolution", "--run", "train", *b["evolution"], "--out", "fig4"], [ckpt]),
        Step("fig5", ["invariance", "--checkpoint", ckpt, "--data", test, *b["invariance"], "--out", "fig5"], [ckpt]),
        Step("fig6-zfnet", ["train", "--model", model, "--data", data, *b["arch_train"], "--out", "fig6-zfnet"]),
        Step("fig6-alexnet", ["train", "--model", arch_model, "--data", data, *b["arch_train"],
                              "--out", "fig6-alexnet"]),
        Step("fig6-norenorm", ["train", "--model", model, "--data", data, *b["arch_train"], "--no-renorm",
                               "--out", "fig6-norenorm"]),
        Step("fig6", ["compare", "--runs", "fig6-zfnet,fig6-alexnet,fig6-norenorm", *b["compare"], "--out", "fig6"],
             ["fig6-zfnet/final.pt", "fig6-alexnet/final.pt", "fig6-norenorm/final.pt"]),
        Step("fig7", ["occlude", "--checkpoint", ckpt, "--data", test, *b["occlude"], "--out", "fig7"], [ckpt]),
        Step("table1", ["correspond", "--checkpoint", ckpt, "--data", test, *parts, *b["correspond"],
                        "--out", "table1"], [ckpt]),
        Step("table3", ["ablate", "--model", model, "--data", data, *b["ablate"], "--out", "table3"]),
        Step("tables4-5", ["transfer", "--checkpoint", ckpt, *b["transfer"], "--out", "tables4-5"], [ckpt]),
        Step("table7", ["layers", "--checkpoint", ckpt, *b["layers"], "--out", "table7"], [ckpt]),
    ]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def step_key(step: Step, root: Path) -> str:
    """The cache key: the command and the content of every input file."""
    from . import __version__

    inputs = {p: _sha256(root / p) for p in step.inputs}
    text = json.dumps({"argv": step.argv, "inputs": inputs, "version": __version__}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _fmt(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


def run_step(step: Step, root: Path, budget: str, position: str) -> dict:
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
    estimate = ESTIMATES.get(budget, {}).get(step.name)
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


def reproduce(out: str | Path = "report", quick: bool = False, data: str = "fashion-mnist",
              model: str = "zfnet-small", full: bool = False) -> Path:
    """Run every step (cached) and write ``out/index.html``; returns its path."""
    from .report import write_report

    from .models import MODELS

    if model not in MODELS:
        raise UserError(f"unknown model {model!r}; choose from {', '.join(MODELS)}")
    root = Path(out).resolve()
    root.mkdir(parents=True, exist_ok=True)
    budget = "quick" if quick else "full" if full else "default"
    steps = plan(data, model, budget)
    records = {}
    started = time.time()
    for i, step in enumerate(steps, 1):
        records[step.name] = run_step(step, root, budget, f"[{i}/{len(steps)}]")
    index = write_report(root, steps, records, budget=budget, argv=sys.argv)
    print(f"report: {index}  ({_fmt(time.time() - started)} in all)", flush=True)
    return index
