"""The one report pipeline of ``deconvnet reproduce`` (the paper on our trained models) and ``deconvnet
report`` (the sections a user's model supports): :func:`build` runs the steps (cached, resumable) and
writes one page, the summary of findings first, then one section per entry of
:data:`deconvnet.sections.SECTIONS` in the paper's order, each rendered from its step's figures and
findings, then the run's details.

Self-contained (figures are embedded as data URIs), so ``index.html`` opens from disk with no server,
and written atomically.
"""
from __future__ import annotations

import base64
import html
import json
import platform
from pathlib import Path
from typing import Callable

from .checkpoint import read_checkpoint
from .findings import interval_text
from .runner import Step, atomic_write_text, run_step
from .sections import Section

STYLE = """<style>
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
h2 { border-bottom: 2px solid #ddd; padding-bottom: .2em; margin-top: 2em; }
figure { margin: 1em 0; } img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #777; font-size: .8em; }
table { border-collapse: collapse; margin: 1em 0; font-size: .9em; }
td, th { border: 1px solid #ccc; padding: .3em .6em; vertical-align: top; }
td.held { background: #e6f4e6; } td.not { background: #fbe9e7; } td.none { background: #f3f3f3; }
.paper { color: #555; } .note { color: #7a3b2e; } .reading { font-size: 1.05em; } pre { background: #f6f6f6; padding: .6em; overflow-x: auto; }
</style>"""  # shared by the report of `deconvnet report`


def _value(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        return ", ".join(f"{k}: {_value(x)}" for k, x in v.items())
    if isinstance(v, list):
        return ", ".join(_value(x) for x in v)
    return str(v)


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(path.stem)}">' \
           f"<figcaption>{html.escape(path.name)}</figcaption></figure>"


VERDICT_CLASS = {"held": "held", "not held": "not", "inconclusive": "none"}  # CSS class of each verdict


def _verdict_cell(finding: dict) -> str:
    return f"<td class={VERDICT_CLASS[finding['verdict']]}>{html.escape(finding['verdict'])}</td>"


def _measured(finding: dict) -> str:
    """The compared quantity, its estimate and 95% interval, n: one cell's text."""
    if finding.get("estimate") is None:
        return "not measured"
    text = interval_text(finding)
    quantity = finding.get("quantity") or ""
    threshold = finding.get("threshold") or 0
    claim = f" (held when above {threshold:g})" if threshold else ""
    return f"{quantity}{claim}: {text}" if quantity else text


def findings_html(findings: list[dict]) -> str:
    """A section's findings as written by its analysis: the readings, then one row per claim with the
    paper's numbers, ours, the compared quantity with its 95% interval and n, and the verdict."""
    if not findings:
        return ""
    readings = " ".join(f["reading"] for f in findings if f.get("reading"))
    notes = " ".join(f["if_not_held"] for f in findings if f["verdict"] == "not held" and f.get("if_not_held"))
    rows = "".join(
        f"<tr><td>{html.escape(f['claim'])}</td><td>{html.escape(_value(f['paper']))}</td>"
        f"<td>{html.escape(_value(f['ours']))}</td><td>{html.escape(_measured(f))}</td>{_verdict_cell(f)}</tr>"
        for f in findings)
    return (f"<p class=reading>{html.escape(readings)}</p>" if readings else "") + \
        ("<table><tr><th>paper's claim</th><th>paper</th><th>ours</th><th>compared quantity: estimate "
         "[95% interval], n</th><th>verdict</th></tr>"
         f"{rows}</table>") + (f"<p class=note><b>Not held:</b> {html.escape(notes)}</p>" if notes else "")


def summary_html(root: Path, sections: list[Section]) -> str:
    """The table the report leads with: every finding of every section run (claim, paper, ours with
    its interval, n, verdict), each linking to its section, and the counts of each verdict."""
    rows, counts = [], {v: 0 for v in VERDICT_CLASS}
    for section in sections:
        if not section.result or not (root / section.step / section.result).is_file():
            continue
        for f in json.loads((root / section.step / section.result).read_text())["findings"]:
            counts[f["verdict"]] += 1
            ours = "not measured" if f.get("estimate") is None else interval_text(f).split(", n = ")[0]
            n = f"{f.get('n', 0)} {f.get('unit', '')}".strip()
            rows.append(f'<tr><td><a href="#{section.anchor}">{html.escape(section.label)}</a></td>'
                        f"<td>{html.escape(f['claim'])}</td><td>{html.escape(_value(f['paper']))}</td>"
                        f"<td>{html.escape(f.get('quantity') or '')}: {html.escape(ours)}</td>"
                        f"<td>{html.escape(n)}</td>{_verdict_cell(f)}</tr>")
    if not rows:
        return ""
    tally = ", ".join(f"{counts[v]} {v}" for v in VERDICT_CLASS)
    return (f'<section id="summary"><h2>Summary: {len(rows)} claims, {tally}</h2>'
            "<p>Each verdict is decided by the 95% interval of the compared quantity over what varies (images, "
            "pairs, maps, folds or seeds): <i>held</i> when the whole interval lies on the claim's side, <i>not held"
            "</i> when it lies wholly on the other side, <i>inconclusive</i> when it contains the threshold. "
            f"Each interval is at 95% on its own, not jointly: of {len(rows)} claims tested at once, about "
            f"{0.05 * len(rows):.0f} could be decided by chance alone if none of the effects were real, so read a "
            "single verdict whose interval barely clears its threshold with that in mind.</p>"
            "<table><tr><th>section</th><th>claim</th><th>paper</th><th>ours [95% interval]</th><th>n</th>"
            f"<th>verdict</th></tr>{''.join(rows)}</table></section>")


def section_html(root: Path, section: Section, command: str | None = None) -> str:
    """One section: the paper's claim, then our figures and findings from ``root/<step>`` (or, for data
    not available here, how to run it). ``command``: the step's command line, shown when given."""
    parts = [f'<section id="{section.anchor}"><h2>{html.escape(section.label)}: {html.escape(section.title)}</h2>',
             f"<p class=paper><b>Paper:</b> {html.escape(section.paper)}</p>"]
    if command:
        parts.append(f"<p>Command: <code>{html.escape(command)}</code></p>")
    if section.offline:
        text, commands = section.offline
        parts.append(f"<p>{html.escape(text)}</p><pre>{html.escape(commands)}</pre>")
    elif section.command == "train":
        parts.append(_train_section(root / section.step))
    else:
        result = json.loads((root / section.step / section.result).read_text())
        parts.extend(_img(p) for p in sorted((root / section.step).glob("*.png")))
        parts.append(findings_html(result["findings"]))
    return "".join(parts) + "</section>"


def _train_section(run: Path) -> str:
    config = json.loads((run / "config.json").read_text())
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    last = lines[-1]
    accuracy = read_checkpoint(run / "final.pt").get("accuracy") or {}
    ten = (f" With the paper's 10-crop evaluation (Sec. 3) it reaches {100 * accuracy['top1_10crop']:.2f}% top-1."
           if "top1_10crop" in accuracy else "")
    rows = "".join(f"<tr><td>{m['epoch']}</td><td>{m['lr']:.4g}</td><td>{m['train_loss']:.4f}</td>"
                   f"<td>{m['val_loss']:.4f}</td><td>{m['val_top1']:.4f}</td><td>{m['val_top5']:.4f}</td>"
                   f"<td>{m['seconds']:.0f}</td></tr>" for m in lines)
    return (f"<p class=reading>{html.escape(config['model'])} trained {config['epochs']} epochs on "
            f"{html.escape(config['data'])} ({html.escape(config['recipe'])} recipe) reaches "
            f"{100 * last['val_top1']:.2f}% top-1 / {100 * last['val_top5']:.2f}% top-5 on {html.escape(config['val'] or 'held-out data')}, "
            f"i.e. {100 * (1 - last['val_top1']):.2f}% top-1 error against the paper's 38.4% on the far harder ImageNet. "
            f"{ten} Architecture and recipe follow Sec. 3 at 28 px (see README for where the small recipe departs).</p>"
            "<table><tr><th>epoch</th><th>lr</th><th>train loss</th><th>val loss</th><th>val top-1</th>"
            f"<th>val top-5</th><th>s</th></tr>{rows}</table>")


def build(root: Path, steps: list[Step], sections: list[Section], heading: str, intro: str,
          details: Callable[[], str], estimates: dict | None = None) -> Path:
    """Run ``steps`` in order (cached: a rerun redoes only what changed or did not finish; ``estimates``:
    seconds per step, for the progress line) and write ``root/index.html`` from their outputs
    (``details()``: the run section's details, read once the steps are done)."""
    records = {}
    for i, step in enumerate(steps, 1):
        records[step.name] = run_step(step, root, f"[{i}/{len(steps)}]", (estimates or {}).get(step.name))
    return write_report(root, sections, records, heading, intro, details())


def write_report(root: Path, sections: list[Section], records: dict, heading: str, intro: str, details: str) -> Path:
    """Write ``root/index.html`` atomically: ``heading``, ``intro`` (HTML), the summary table, the
    ``sections`` (from the steps' outputs in ``root``), and the run (``details`` HTML, each step's command
    line and time, the versions); returns its path."""
    import sys

    import numpy
    import torch

    from . import __version__

    body = [section_html(root, s, records[s.step]['command'] if s.step in records else None) for s in sections]
    rows = "".join(f"<tr><td>{html.escape(name)}</td><td><code>{html.escape(r['command'])}</code></td>"
                   f"<td>{r['seconds']:.0f} s</td><td>{html.escape(r['finished'])}</td></tr>"
                   for name, r in records.items())
    versions = (f"deconvnet {__version__}, Python {platform.python_version()}, torch {torch.__version__}, "
                f"numpy {numpy.__version__}, {platform.platform()}")
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>deconvnet: {html.escape(heading)}</title>
{STYLE}</head><body>
<h1>{html.escape(heading)}</h1>
{intro}
{summary_html(root, sections)}
{''.join(body)}
<section id="run"><h2>Run</h2>
<p>Command: <code>{html.escape(' '.join(['deconvnet', *sys.argv[1:]]))}</code></p>
{details}
<table><tr><th>step</th><th>command</th><th>wall-clock</th><th>finished</th></tr>{rows}</table>
<p>Versions: {html.escape(versions)}</p>
</section></body></html>
"""
    index = root / "index.html"
    atomic_write_text(index, page)
    return index
