"""A finding: one claim of the paper checked against our numbers, written by the analysis that owns
the numbers and rendered as it is by the CLI, the report and the viewer.

Every finding says how sure it is (:mod:`deconvnet.stats`): the compared quantity, its estimate and
95% interval over what varies, the sample size ``n`` (and what it counts), and the verdict the
interval decides: held, not held or inconclusive. A claim that cannot be measured is inconclusive,
with ``n`` = 0, no interval and the reason in ``reading``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from .stats import HELD, INCONCLUSIVE, LEVEL, NOT_HELD, VERDICTS


@dataclass
class Finding:
    """``claim``: the paper's claim in words; ``paper``: the paper's numbers; ``ours``: our numbers (JSON
    types); ``quantity``: what the interval is of (e.g. "p(background) - p(object), mean over images"),
    with the claim held when it lies above ``threshold``; ``estimate`` and ``interval``: its value and
    95% interval; ``n`` and ``unit``: how many of what the interval varies over (images, pairs, maps,
    seeds); ``verdict``: held / not held / inconclusive, decided by the interval; ``reading``: one or two
    sentences from the numbers (or why the claim could not be measured); ``if_not_held``: one sentence,
    written with the set-up and not after seeing the result, on whether a "not held" here would be a
    property of the scale (28 px, 0.4 M parameters, minutes of training) or of the set-up."""

    claim: str
    paper: str
    ours: Any
    verdict: str
    reading: str = ""
    quantity: str = ""
    estimate: float | None = None
    interval: tuple[float, float] | None = None
    n: int = 0
    unit: str = ""
    threshold: float = 0.0
    if_not_held: str = ""

    def _repr_html_(self) -> str:
        """A notebook shows a finding as the report's row: claim, paper, ours with its interval, n, verdict."""
        from .report import findings_html

        return findings_html([self.to_json()])

    def __post_init__(self):
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, got {self.verdict!r}")
        if self.interval is not None:
            self.interval = (float(self.interval[0]), float(self.interval[1]))
        if self.estimate is not None:
            self.estimate = float(self.estimate)

    @property
    def held(self) -> bool | None:
        """True when held, False when not held, None when inconclusive."""
        return {HELD: True, NOT_HELD: False}.get(self.verdict)

    def to_json(self) -> dict:
        out = asdict(self)
        out["interval"] = list(self.interval) if self.interval is not None else None
        out["level"] = LEVEL
        return out


def to_json(findings: list[Finding]) -> list[dict]:
    """A list of findings as plain JSON types."""
    return [f.to_json() for f in findings]


def brief(findings: list[dict]) -> list[dict]:
    """The findings as a command's summary line shows them: claim, verdict, estimate, interval, n."""
    keys = ("claim", "verdict", "quantity", "estimate", "interval", "n", "unit")
    return [{k: f.get(k) for k in keys} for f in findings]


def tally(findings: list[dict]) -> str:
    """``"3 findings: 1 held, 2 inconclusive"``: the verdicts of a command's findings, for its one line."""
    counts: dict[str, int] = {}
    for f in findings:
        counts[f["verdict"]] = counts.get(f["verdict"], 0) + 1
    parts = ", ".join(f"{n} {verdict}" for verdict, n in counts.items())
    return f"{len(findings)} finding{'s' if len(findings) != 1 else ''}" + (f": {parts}" if parts else "")


def pct(v: float) -> str:
    """A fraction as a percentage with one decimal, for readings."""
    return f"{100 * v:.1f}%"


def interval_text(f: dict | Finding, digits: int = 3) -> str:
    """``0.012 [0.004, 0.020], n = 200 images`` (or why there is no interval), for summaries and pages."""
    d = f.to_json() if isinstance(f, Finding) else f
    if d.get("estimate") is None:
        return "not measured"
    est = f"{d['estimate']:.{digits}g}"
    if d.get("interval") is None:
        return f"{est} (no interval: n = {d.get('n', 0)} {d.get('unit', '')})".replace("  ", " ")
    low, high = d["interval"]
    return f"{est} [{low:.{digits}g}, {high:.{digits}g}], n = {d['n']} {d.get('unit', '')}".rstrip()


def unmeasured(claim: str, paper: str, why: str, ours: Any = None) -> Finding:
    """A claim that cannot be measured here: inconclusive, n = 0, ``why`` as the reading."""
    return Finding(claim, paper, ours, INCONCLUSIVE, why)
