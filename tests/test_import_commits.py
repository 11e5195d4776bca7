"""How an import shares the group commit with live requests: at most COMMITTING pieces
of import rows are being committed at once, of all runs together, so a POST's round
(and the round before it) holds few import rows.

The daemon runs in this process, so that the receiver it hands the import's pieces to
can be watched: the real receiver, queues and disk, with a counter around `accept`.
"""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path

from firehosed.config import parse
from firehosed.daemon import Daemon
from firehosed.imports.importer import CHUNK, COMMITTING, IN_FLIGHT, PIECE
from tests.daemon import BASE_CONFIG, TOKEN, free_port
from tests.test_imports import COLUMNS, imports_config, write_csv

ROWS = 6 * CHUNK  # each run has IN_FLIGHT chunks of CHUNK // PIECE pieces to commit at once

TASKS = "".join(
    f"""
[imports.{name}]
account = "acme"
source = "inbox"
pattern = "{name}-*.csv"
once = true
"""
    + COLUMNS.format(task=name)
    for name in ("first", "second")
)


async def test_import_pieces_committing_at_once_are_bounded_across_runs(tmp_path: Path) -> None:
    assert IN_FLIGHT * (CHUNK // PIECE) > COMMITTING  # else the bound would hold anyway
    valid = set()
    for name, first_id in (("first", 0), ("second", ROWS)):
        ids, _ = write_csv(tmp_path / "inbox" / f"{name}-1.csv", ROWS, first_id=first_id)
        valid |= ids
    text = BASE_CONFIG.format(port=free_port(), dir=tmp_path, token=TOKEN)
    text += f'\n[admin]\nlisten = "127.0.0.1:{free_port()}"\n'
    daemon = Daemon(parse(text + imports_config(tmp_path, TASKS)))
    receiver = daemon.receiver
    accept = receiver.accept
    committing, most, pieces = 0, 0, 0

    async def counted(account, records):  # type: ignore[no-untyped-def]
        nonlocal committing, most, pieces
        committing += 1
        most, pieces = max(most, committing), pieces + 1
        try:
            return await accept(account, records)
        finally:
            committing -= 1

    receiver.accept = counted  # type: ignore[method-assign]
    thresholds = gc.get_threshold()
    await daemon.start()  # (which freezes what it built and sets the collector's pace)
    try:
        async with asyncio.timeout(60):  # a once task's loop ends with its run
            await asyncio.gather(*daemon.importer._loops.values())
        runs = [daemon.status()["imports"][name]["runs"][0] for name in ("first", "second")]
        # (and a run that ended leaves nothing of its saves behind in its task's store)
        assert [daemon.importer.stores[name]._errors_written for name in ("first", "second")] == [
            {},
            {},
        ]
    finally:
        await daemon.stop()
        gc.unfreeze()  # this test process goes on: give it its collector back
        gc.set_threshold(*thresholds)
    assert [run["processing"]["status"] for run in runs] == ["processed", "processed"]
    assert sum(run["processing"]["imported"] for run in runs) == len(valid)
    assert pieces >= 2 * ROWS // PIECE  # every piece went through the counter
    assert most == COMMITTING
