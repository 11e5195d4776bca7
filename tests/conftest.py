"""Shared fixtures: a real firehosed process per test."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.daemon import Daemon


@pytest.fixture
def make_daemon(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """Build (not start) daemons in this test's temp dir; all are killed at teardown."""
    made: list[Daemon] = []

    def make(extra_config: str = "", **kwargs: object) -> Daemon:
        root = tmp_path / f"d{len(made)}"
        root.mkdir()
        daemon = Daemon(root, extra_config, **kwargs)  # type: ignore[arg-type]
        made.append(daemon)
        return daemon

    yield make
    for daemon in made:
        daemon.close()
