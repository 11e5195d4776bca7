"""Figures, their statistics, and the markdown report (bench/RESULTS.md)."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Series:
    """Repeated measurements of one quantity (one value per repetition)."""

    unit: str
    values: list[float] = field(default_factory=list)

    def add(self, value: float) -> None:
        self.values.append(value)

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    def text(self, digits: int | None = None) -> str:
        """`median [min-max] unit`."""
        if not self.values:
            return "—"
        fmt = _formatter(self.median, digits)
        if len(self.values) == 1:
            return f"{fmt(self.median)} {self.unit}"
        low, high = min(self.values), max(self.values)
        return f"{fmt(self.median)} [{fmt(low)}-{fmt(high)}] {self.unit}"


def _formatter(value: float, digits: int | None) -> Callable[[float], str]:
    if digits is None:
        digits = 0 if abs(value) >= 100 else 1 if abs(value) >= 10 else 2 if abs(value) >= 1 else 3
    return lambda v: f"{v:,.{digits}f}"


def ratios(results: Series, ceilings: Series, *, inverse: bool = False) -> Series:
    """Per-repetition ratios of paired measurements (result/ceiling, or ceiling/result)."""
    pairs = zip(results.values, ceilings.values, strict=False)
    values = [(c / r if inverse else r / c) for r, c in pairs if r and c]
    return Series("x", values)


@dataclass
class Figure:
    """One row of the summary table, plus what a reader needs to trust or redo it."""

    title: str
    target: str
    result: Series | None = None
    ceiling: Series | None = None
    ceiling_label: str = ""
    ratio: Series | None = None
    passed: bool | None = None
    commands: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    tables: list[str] = field(default_factory=list)
    profile: list[str] = field(default_factory=list)
    error: str | None = None
    skipped: str | None = None

    @property
    def verdict(self) -> str:
        if self.error:
            return "**ERROR**"
        if self.skipped:
            return f"skipped ({self.skipped})"
        if self.passed is None:
            return "—"
        return "pass" if self.passed else "**miss**"


def summary_table(figures: list[Figure]) -> list[str]:
    lines = [
        "| figure | result (median [min-max]) | ceiling, same run | ratio | target | verdict |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for fig in figures:
        ceiling = f"{fig.ceiling_label}: {fig.ceiling.text()}" if fig.ceiling else fig.ceiling_label
        lines.append(
            f"| {fig.title} | {fig.result.text() if fig.result else '—'} | {ceiling or '—'} "
            f"| {fig.ratio.text(2) if fig.ratio else '—'} | {fig.target} | {fig.verdict} |"
        )
    return lines


def details(figures: list[Figure]) -> list[str]:
    lines: list[str] = []
    for fig in figures:
        if not (fig.error or fig.notes or fig.tables or fig.commands or fig.profile):
            continue
        lines += ["", f"### {fig.title}", ""]
        if fig.error:
            lines += ["**ERROR** (the benchmark crashed):", "", "```", fig.error.strip(), "```", ""]
        lines += [f"- {note}" for note in fig.notes]
        if fig.tables:
            lines += ["", *fig.tables]
        if fig.commands:
            lines += ["", "Commands:", "", "```", *dict.fromkeys(fig.commands), "```"]
        if fig.profile:
            lines += ["", *fig.profile]
    return lines
