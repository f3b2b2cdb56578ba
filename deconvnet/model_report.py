"""``deconvnet report``: the paper's per-image and per-dataset sections for the user's own model and data.

Fig. 2 (top-9 activations projected), Fig. 5 (invariance), Fig. 7 (occlusion) and, given a target
data set, Table 7 (per-layer linear probes) for any model under study: the same pipeline as
``reproduce`` (:func:`deconvnet.report.build`) over the sections a user's model supports. Each
section is one command of :mod:`deconvnet.commands` run as a cached step: a rerun redoes only the
steps whose options, input files (weights, model file) or source changed.
"""
from __future__ import annotations

import dataclasses
import html
import json
from pathlib import Path

from . import commands
from .commands import command_line
from .errors import UserError
from .report import build
from .runner import Step
from .sections import BY_STEP

STEPS = ("fig2", "sanity", "fig5", "fig7", "table7")  # the sections of the paper that run on any model and data


def plan(model: dict, inputs: list[str], data: str, images: int, limit: int | None, target: str | None,
         maps: int = 9) -> list[Step]:
    """The steps for one model and data set; ``model`` holds the model options (absolute paths),
    ``inputs`` the files whose content keys the steps (weights, model file, class names)."""
    options = {"fig2": dict(data=data, limit=limit, maps=maps),
               "sanity": dict(data=data, count=min(images, 10)),
               "fig5": dict(data=data, count=images),
               "fig7": dict(data=data, count=images, draw=min(images, 3)),
               "table7": dict(target=target, per_class=[5, 10], folds=3)}
    steps = []
    for name in STEPS:
        if name == "table7" and not target:
            continue
        command = BY_STEP[name].command
        call = {**model, **{k: v for k, v in options[name].items() if v is not None}}
        steps.append(Step(name, getattr(commands, command), call, inputs,
                          command_line(command, {**call, "out": name})))
    return steps


def model_report(out: str | Path, model: dict, inputs: list[str], data: str, description: dict,
                 images: int = 30, limit: int | None = None, target: str | None = None) -> Path:
    """Run the steps (cached) and write ``out/index.html``; returns its path."""
    import time

    if images < 1:
        raise UserError(f"--images must be at least 1, got {images}")
    root = Path(out).resolve()
    root.mkdir(parents=True, exist_ok=True)
    steps = plan(model, [str(Path(f).resolve()) for f in inputs], data, images, limit, target)
    sections = [BY_STEP[name] for name in STEPS if name != "table7"]
    table7 = BY_STEP["table7"]
    sections.append(table7 if target else dataclasses.replace(table7, offline=(
        "Give a labelled target data set (one folder per class) for per-layer linear probes:",
        "deconvnet report ... --target folder:PATH")))
    intro = (f"<p>The analyses of Zeiler &amp; Fergus (ECCV 2014) run by <code>deconvnet report</code> on your "
             "model and images: top activations projected to pixels (Fig. 2), how far those projections can be "
             "trusted (sanity checks), invariance (Fig. 5), occlusion "
             "sensitivity (Fig. 7) and, with a target data set, per-layer features (Table 7). Layers: "
             f"{html.escape(', '.join(description['stages']))}.</p>")
    details = f"<p>Model:</p><pre>{html.escape(json.dumps(description, indent=1))}</pre>"
    started = time.time()
    index = build(root, steps, sections, f"{description['model']} on {data}", intro, lambda: details)
    print(f"report: {index}  ({time.time() - started:.0f} s in all)", flush=True)
    return index
