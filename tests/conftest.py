"""Shared fixtures: a real firehosed process per test."""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.daemon import Daemon
from tests.servers.nats import nats_cluster, own_nats_cluster

# The JetStream cluster fixtures, for every module: one session-wide cluster, not one
# per module that imports the fixture.
__all__ = ["nats_cluster", "own_nats_cluster"]


@pytest.fixture(autouse=True)
def collect_garbage_after_each_test() -> Iterator[None]:
    """Collect after every test, so an unclosed socket or transport warns (an error here)
    in the test that left it, not in whichever test the collector happens to run in.

    Without it, a leak fails whichever later test the collector runs in: that is how an
    alert mail's TLS socket, left half-closed after a refused login, first showed up (in
    test_bad_input and test_close_is_bounded), until collecting here named its test.
    """
    yield
    gc.collect()


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
