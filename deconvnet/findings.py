"""A finding: one claim of the paper checked against our numbers, written by the analysis that owns
the numbers and rendered as it is by the CLI, the report and the viewer."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class Finding:
    """``claim``: the paper's claim in words (and how we test it); ``paper``: the paper's numbers;
    ``ours``: our numbers (JSON types); ``held``: whether it held at this scale (None: not measurable
    here, e.g. no image had both kinds of square); ``reading``: one or two sentences from the numbers."""

    claim: str
    paper: str
    ours: Any
    held: bool | None
    reading: str = ""

    def to_json(self) -> dict:
        return asdict(self)


def to_json(findings: list[Finding]) -> list[dict]:
    """A list of findings as plain JSON types."""
    return [f.to_json() for f in findings]


def pct(v: float) -> str:
    """A fraction as a percentage with one decimal, for readings."""
    return f"{100 * v:.1f}%"
