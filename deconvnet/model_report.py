"""``deconvnet report``: the paper's per-image and per-dataset sections for the user's own model and data.

Fig. 2 (top-9 activations projected), Fig. 5 (invariance), Fig. 7 (occlusion) and, given a target
data set, Table 7 (per-layer linear probes) for any model under study, as one self-contained HTML
page. Each section is one command of :mod:`deconvnet.commands` run as a cached step, as ``reproduce``
runs the paper: a rerun redoes only the steps whose options, input files (weights, model file) or
source changed.
"""
from __future__ import annotations

import html
import platform
import sys
import time
from pathlib import Path

from . import commands
from .commands import command_line
from .errors import UserError
from .report import STYLE, section_html, summary_html
from .runner import Step, atomic_write_text, run_step
from .sections import BY_STEP

STEPS = ("fig2", "fig5", "fig7", "table7")  # the sections of the paper that run on any model and data


def plan(model: dict, inputs: list[str], data: str, images: int, limit: int | None, target: str | None,
         maps: int = 9) -> list[Step]:
    """The steps for one model and data set; ``model`` holds the model options (absolute paths),
    ``inputs`` the files whose content keys the steps (weights, model file, class names)."""
    options = {"fig2": dict(data=data, limit=limit, maps=maps),
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
    if images < 1:
        raise UserError(f"--images must be at least 1, got {images}")
    root = Path(out).resolve()
    root.mkdir(parents=True, exist_ok=True)
    steps = plan(model, [str(Path(f).resolve()) for f in inputs], data, images, limit, target)
    records, started = {}, time.time()
    for i, step in enumerate(steps, 1):
        records[step.name] = run_step(step, root, f"[{i}/{len(steps)}]")
    index = write_page(root, steps, records, description, data, target)
    print(f"report: {index}  ({time.time() - started:.0f} s in all)", flush=True)
    return index


def write_page(root: Path, steps: list[Step], records: dict, description: dict, data: str, target: str | None) -> Path:
    """One HTML page, figures embedded, written atomically."""
    import json

    import torch

    from . import __version__

    body = [section_html(root, BY_STEP[step.name], step.command) for step in steps]
    if not target:
        body.append('<section id="table7"><h2>Table 7: Features of each layer</h2><p>Give a labelled target '
                    "data set (<code>--target folder:PATH</code>, one folder per class) for per-layer linear probes."
                    "</p></section>")
    rows = "".join(f"<tr><td>{html.escape(name)}</td><td>{r['seconds']:.0f} s</td><td>{html.escape(r['finished'])}</td></tr>"
                   for name, r in records.items())
    model = html.escape(json.dumps(description, indent=1))
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>deconvnet report: {html.escape(description['model'])}</title>
{STYLE}</head><body>
<h1>{html.escape(description['model'])} on {html.escape(data)}</h1>
<p>The analyses of Zeiler &amp; Fergus (ECCV 2014) run by <code>deconvnet report</code> on your model and images:
top activations projected to pixels (Fig. 2), invariance (Fig. 5), occlusion sensitivity (Fig. 7) and, with a
target data set, per-layer features (Table 7). Layers: {html.escape(', '.join(description['stages']))}.</p>
{summary_html(root, [BY_STEP[step.name] for step in steps])}
{''.join(body)}
<section id="run"><h2>Run</h2>
<p>Command: <code>{html.escape(' '.join(sys.argv))}</code></p>
<table><tr><th>step</th><th>wall-clock</th><th>finished</th></tr>{rows}</table>
<p>Model:</p><pre>{model}</pre>
<p>Versions: deconvnet {__version__}, Python {platform.python_version()}, torch {torch.__version__}, {html.escape(platform.platform())}</p>
</section></body></html>
"""
    index = root / "index.html"
    atomic_write_text(index, page)
    return index
