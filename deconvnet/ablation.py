"""Ablation (Sec. 5.1, Table 3): variants of a model, each trained from scratch with the same budget.

A variant is a set of :class:`~deconvnet.models.ModelConfig` changes handed to the one trainer
(``TrainConfig.model_changes``), never a copy of the model code. The table gives train and test
top-1 and test top-5 error like Table 3. Runs live in ``OUT/<variant>/``: a finished one is reused,
an interrupted one resumed.

Budgets: the demo's ``--limit 10000 --epochs 2 --lr 0.02`` (timed in README); at the small recipe's
peak rate of 0.08 such short runs leave some variants stuck at chance. The widened variants cost
2-3x the baseline. Each variant is judged on the center crop (no final 10-crop evaluation).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from .checkpoint import load_checkpoint
from .data import open_source
from .errors import UserError
from .models import ModelConfig, model_config
from .runner import cache_key, cached, progress
from .train import TrainConfig, split_indices, evaluate, train
from .figures import finish, new_figure
from .findings import Finding
from .findings import to_json as to_findings_json

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# Table 3's rows, in the paper's words, for a model of the ZFNet family.
LABELS = {
    "baseline": "Our model (as per Fig. 3)",
    "no-3-4": "Removed layers 3,4",
    "no-7": "Removed layer 7",
    "no-6-7": "Removed layers 6,7",
    "no-3-4-6-7": "Removed layers 3,4,6,7",
    "fc-half": "Adjust layers 6,7: half width",
    "fc-double": "Adjust layers 6,7: double width",
    "conv-wider": "Adjust layers 3,4,5: 4/3, 8/3, 2x maps",
    "conv-wider+fc-double": "Adjust layers 3,4,5 and layers 6,7 (both wider)",
}
# Table 3 widens conv3, conv4, conv5 from 384, 384, 256 to 512, 1024, 512 maps.
CONV_WIDER = {"conv3": 4 / 3, "conv4": 8 / 3, "conv5": 2.0}


def variant_changes(base: ModelConfig) -> dict[str, dict]:
    """The ``model_changes`` of every Table 3 variant of ``base``, as JSON-ready dicts."""
    convs = {name: dataclasses.asdict(conv) for name, conv in base.convs.items()}
    w6, w7 = base.fc
    without_34 = {k: v for k, v in convs.items() if k not in ("conv3", "conv4")}
    wider = {k: {**v, "out": round(v["out"] * CONV_WIDER.get(k, 1.0))} for k, v in convs.items()}
    return {
        "baseline": {},
        "no-3-4": {"convs": without_34},
        "no-7": {"fc": [w6, 0]},
        "no-6-7": {"fc": [0, 0]},
        "no-3-4-6-7": {"convs": without_34, "fc": [0, 0]},
        "fc-half": {"fc": [w6 // 2, w7 // 2]},
        "fc-double": {"fc": [w6 * 2, w7 * 2]},
        "conv-wider": {"convs": wider},
        "conv-wider+fc-double": {"convs": wider, "fc": [w6 * 2, w7 * 2]},
    }


@dataclass
class AblationResult:
    """Errors (in %) of each variant: ``rows[variant] = {"train_top1", "test_top1", "test_top5", "params"}``."""

    model: str
    data: str
    epochs: int
    limit: int | None
    rows: dict[str, dict] = field(default_factory=dict)

    def table(self) -> str:
        """Table 3 as text: one line per variant."""
        lines = [f"{'variant':<50} {'train top-1':>11} {'test top-1':>10} {'test top-5':>10} {'params':>10}"]
        for name, r in self.rows.items():
            lines.append(f"{LABELS[name]:<50} {r['train_top1']:>11.1f} {r['test_top1']:>10.1f} "
                         f"{r['test_top5']:>10.1f} {r['params']:>10,}")
        return "\n".join(lines)


def _run_variant(cfg: TrainConfig, run: Path) -> None:
    """Train ``cfg`` into ``run`` unless it is finished there; resume it if it was interrupted."""
    if (run / "final.pt").exists():
        saved = json.loads((run / "config.json").read_text())
        if saved != dataclasses.asdict(cfg.resolved()):
            raise UserError(f"{run} holds a finished run with other settings; remove it or choose another --out")
        return
    train(cfg, run, resume=(run / "checkpoints" / "last.pt").exists())


def _errors(cfg: TrainConfig, run: Path) -> dict:
    """Train and test error of a finished run, through the runner's cache (``run/errors.json``, keyed by
    the run's settings, its final.pt and this module's source)."""
    def compute() -> dict:
        model, info = load_checkpoint(run / "final.pt")
        source = open_source(cfg.data, info.preprocess.stored_size, info.preprocess.channels)
        _, train_idx, _ = split_indices(cfg.resolved(), source)
        on_train = evaluate(model, source, info.preprocess, train_idx)
        last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
        return {"train_top1": 100 * (1 - on_train["top1"]), "test_top1": 100 * (1 - last["val_top1"]),
                "test_top5": 100 * (1 - last["val_top5"]), "params": sum(p.numel() for p in model.parameters())}

    key = cache_key(_errors, dataclasses.asdict(cfg.resolved()), [run / "final.pt", run / "metrics.jsonl"])
    return cached(run / "errors.json", key, compute)[0]


def ablate(base: TrainConfig, out: str | Path, variants: list[str] | None = None) -> AblationResult:
    """Train every Table 3 variant of ``base`` (same data, budget and seed) into ``out/<variant>``.

    Finished variants are reused, interrupted ones resumed. Returns their errors.
    """
    out = Path(out)
    names = list(LABELS) if variants is None else variants
    unknown = [v for v in names if v not in LABELS]
    if unknown:
        raise UserError(f"unknown variant(s) {unknown}; choose from {', '.join(LABELS)}")
    base = base.resolved()
    changes = variant_changes(model_config(base.model))
    result = AblationResult(base.model, base.data, base.epochs, base.limit)
    for name in progress(names, desc="ablation", unit="variant"):
        cfg = dataclasses.replace(base, model_changes=changes[name], final_ten_crop=False)  # Table 3: center crop
        _run_variant(cfg, out / name)
        result.rows[name] = _errors(cfg, out / name)
    return result


def ablation_findings(result: AblationResult) -> list[Finding]:
    """Table 3's claims, checked against our numbers (test top-1 error)."""
    rows = result.rows
    test = {k: r["test_top1"] for k, r in rows.items()}
    out = []
    if {"baseline", "no-3-4", "no-6-7", "no-3-4-6-7"} <= rows.keys():
        pair = max(test["no-3-4"], test["no-6-7"]) - test["baseline"]
        both = test["no-3-4-6-7"] - test["baseline"]
        extra = {k: round(test[k] - test["baseline"], 2) for k in ("no-3-4", "no-6-7", "no-3-4-6-7")}
        out.append(Finding(
            "depth matters: removing layers 3,4,6,7 is far worse than removing either pair "
            "(held if its extra error is at least twice the worse pair's)",
            "top-1 error +7.0 (3,4), +4.3 (6,7), +30.8 (3,4,6,7) over AlexNet's 40.5", extra,
            bool(both > 0 and both >= 2 * max(pair, 0)),
            "Extra test top-1 error over the baseline: " + ", ".join(f"{k} {v:+.1f}" for k, v in extra.items())
            + " (paper: +7.0, +4.3, +30.8)."))
    if {"baseline", "fc-half", "fc-double"} <= rows.keys():
        deltas = {k: round(test[k] - test["baseline"], 2) for k in ("fc-half", "fc-double")}
        out.append(Finding(
            "the size of fc6/fc7 matters little (held if both stay within 2 points of the baseline)",
            "+1.8 (2048 units) and +0.4 (8192 units) over our model's 38.4", deltas,
            all(abs(d) <= 2.0 for d in deltas.values()),
            f"Half and double the fc6/fc7 width change the test error by {deltas['fc-half']:+.1f} and "
            f"{deltas['fc-double']:+.1f} points."))
    if {"baseline", "conv-wider"} <= rows.keys():
        delta = round(test["conv-wider"] - test["baseline"], 2)
        out.append(Finding("wider conv3-5 lower the test error", "-0.9 (37.5 vs 38.4)", delta, delta < 0,
                           f"Wider conv3-5 change the test error by {delta:+.1f} points (paper: -0.9)."))
    if {"conv-wider", "conv-wider+fc-double"} <= rows.keys():
        a, b = rows["conv-wider"], rows["conv-wider+fc-double"]
        gap_a, gap_b = a["test_top1"] - a["train_top1"], b["test_top1"] - b["train_top1"]
        out.append(Finding(
            "widening conv3-5 and fc6/fc7 together overfits: lower train error, higher test error "
            "than widening conv3-5 alone",
            "train 10.0 vs 18.8, test 38.3 vs 37.5",
            {"train": [round(b["train_top1"], 2), round(a["train_top1"], 2)],
             "test": [round(b["test_top1"], 2), round(a["test_top1"], 2)],
             "gap": [round(gap_b, 2), round(gap_a, 2)]},
            b["train_top1"] < a["train_top1"] and b["test_top1"] > a["test_top1"],
            f"Widening both vs conv3-5 alone: train error {b['train_top1']:.1f} vs {a['train_top1']:.1f}, "
            f"test error {b['test_top1']:.1f} vs {a['test_top1']:.1f}."))
    return out


def ablation_to_json(result: AblationResult) -> dict:
    """The table and its findings, ready for ``json.dump``."""
    return {"analysis": "ablation (Table 3)", "model": result.model, "data": result.data,
            "epochs": result.epochs, "limit": result.limit, "error_unit": "%",
            "rows": {k: {"label": LABELS[k], **{m: (round(v, 2) if isinstance(v, float) else v) for m, v in r.items()}}
                     for k, r in result.rows.items()},
            "findings": to_findings_json(ablation_findings(result))}


def draw_ablation(result: AblationResult, path=None) -> Figure:
    """Train and test top-1 error of every variant as grouped bars (Table 3 as a figure)."""
    names = list(result.rows)
    fig, ax = new_figure(figsize=(max(6, 1.1 * len(names)), 4.5))
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], [result.rows[n]["train_top1"] for n in names], 0.4, label="train top-1")
    ax.bar([x + 0.2 for x in xs], [result.rows[n]["test_top1"] for n in names], 0.4, label="test top-1")
    ax.set_xticks(list(xs), [LABELS[n] for n in names], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("error (%)")
    budget = f"{result.epochs} epoch(s)" + (f", first {result.limit} images" if result.limit else "")
    ax.set_title(f"Ablation of {result.model} on {result.data} ({budget}), cf. Table 3")
    ax.legend()
    return finish(fig, path)
