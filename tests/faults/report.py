"""Figures the fault suite reports: printed, and appended to $FIREHOSED_FAULTS_REPORT."""

from __future__ import annotations

import os


def report(scenario: str, **figures: object) -> None:
    """One line per scenario run: `scenario: key=value …`."""
    line = f"{scenario}: " + " ".join(f"{k}={v}" for k, v in figures.items())
    print(line)
    path = os.environ.get("FIREHOSED_FAULTS_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


def full() -> bool:
    """Whether the full (long) forms run: `tests/faults/run --full`."""
    return os.environ.get("FIREHOSED_FAULTS_FULL") == "1"
