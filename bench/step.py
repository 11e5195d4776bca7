"""One `bench.decompose` step against the firehosed on PYTHONPATH, for A/B runs:

    PYTHONPATH=<tree> .venv/bin/python -m bench.step "firehose, fsync"

prints the step's signals/s and the daemon's CPU µs per signal (full settings).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from bench.decompose import STEPS, _step
from bench.settings import full
from bench.throughput import SINGLE, template_for

if __name__ == "__main__":
    step = sys.argv[1] if len(sys.argv) > 1 else "firehose, fsync"
    if step not in STEPS:
        sys.exit(f"unknown step {step!r}: one of {', '.join(STEPS)}")
    with tempfile.TemporaryDirectory(prefix="firehosed-step-") as work:
        settings = full(Path(work), profile=False)
        rate, cost = _step(step, settings, template_for(SINGLE, settings.work))
        print(f"{step}: {rate:,.0f} signals/s, {cost:.1f} µs/signal")
