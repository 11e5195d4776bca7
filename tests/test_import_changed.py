"""A file that changes at its source between a run's listing and its fetch is taken as it
is now (listed again, fetched again), not as the bytes of one version under the name of
another: the ledger then holds what was imported, so no later run imports it twice.

The daemon runs in this process, so that the directory's listing can be followed at
once by a change to the file, on cue: the real channel, receiver, queues and disk.
"""

from __future__ import annotations

import asyncio
import gc
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from firehosed.channels.directory import DirectoryChannel
from firehosed.config import parse
from firehosed.daemon import Daemon
from firehosed.imports.runs import Ledger
from tests.daemon import BASE_CONFIG, TOKEN, free_port
from tests.test_imports import COLUMNS, imports_config, write_csv

TASK = """
[imports.users]
account = "acme"
source = "inbox"
pattern = "users-*.csv"
once = true
""" + COLUMNS.format(task="users")


async def test_a_file_changed_after_its_listing_is_imported_as_it_is_now(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "inbox" / "users-1.csv"
    write_csv(path, 100, bad_every=1000)
    valid, _ = write_csv(tmp_path / "later.csv", 150, bad_every=1000)  # the same 100, and 50

    def change(listing: int, when: str) -> None:
        if (listing, when) == (1, "after"):  # the file grows right after the listing
            (tmp_path / "later.csv").replace(path)

    run, ledger, listings = await _import(tmp_path, monkeypatch, change)

    assert listings == 2  # listed again once the fetch found the change
    assert run["fetch"]["status"] == "fetched"
    assert run["processing"]["status"] == "processed"
    assert run["processing"]["imported"] == len(valid) == 150
    now = path.stat()
    assert ("users-1.csv", now.st_size, str(now.st_mtime_ns)) in ledger


async def test_a_file_changed_then_removed_is_an_error_of_its_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "inbox" / "users-1.csv"
    write_csv(path, 100, bad_every=1000)
    listed = path.stat()

    def change(listing: int, when: str) -> None:
        if (listing, when) == (1, "after"):  # grown right after the listing
            with path.open("a") as out:
                out.write("more\r\n")
        elif (listing, when) == (2, "before"):  # and gone before the next
            path.unlink()

    run, ledger, listings = await _import(tmp_path, monkeypatch, change)

    _removed_in_its_run(run, listings, "users-1.csv", imported=0)
    assert ("users-1.csv", listed.st_size, str(listed.st_mtime_ns)) not in ledger


async def test_a_file_gone_after_its_listing_leaves_the_others_imported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file removed between the listing and its fetch, with no change seen first, is
    an error of the run once it is listed again; the other files are imported by the
    same run, not left for its next slot by a failed fetch."""
    gone = tmp_path / "inbox" / "users-1.csv"
    write_csv(gone, 100, bad_every=1000)
    valid, _ = write_csv(tmp_path / "inbox" / "users-2.csv", 80, bad_every=1000, first_id=100)

    def change(listing: int, when: str) -> None:
        if (listing, when) == (1, "after"):
            gone.unlink()

    run, ledger, listings = await _import(tmp_path, monkeypatch, change)

    _removed_in_its_run(run, listings, "users-1.csv", imported=len(valid))
    assert len(valid) == 80
    kept = (tmp_path / "inbox" / "users-2.csv").stat()
    assert ("users-2.csv", kept.st_size, str(kept.st_mtime_ns)) in ledger
    taken = [json.loads(line)["name"] for line in ledger.path.read_text().splitlines()]
    assert taken == ["users-2.csv"]


def _removed_in_its_run(run: dict[str, Any], listings: int, name: str, imported: int) -> None:
    """`run` listed its source twice, fetched, and failed its processing on `name` gone
    at the source, having imported `imported` rows of its other files."""
    assert listings == 2
    assert run["fetch"]["status"] == "fetched"
    assert run["processing"]["status"] == "failed"
    assert f"{name}: removed at the source after it was listed" in run["processing"]["error"]
    assert run["processing"]["imported"] == imported


async def _import(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    change: Callable[[int, str], None],
) -> tuple[dict[str, Any], Ledger, int]:
    """Run the once task, `change(n, "before")` and `change(n, "after")` called around
    the source's nth listing; the run, the ledger, and how many listings there were."""
    text = BASE_CONFIG.format(port=free_port(), dir=tmp_path, token=TOKEN)
    text += f'\n[admin]\nlisten = "127.0.0.1:{free_port()}"\n'
    daemon = Daemon(parse(text + imports_config(tmp_path, TASK)))
    list_files = DirectoryChannel.list_files
    listings = 0

    async def listed_then_changed(*args: Any, **kwargs: Any) -> Any:
        nonlocal listings
        listings += 1
        change(listings, "before")
        found = await list_files(*args, **kwargs)
        change(listings, "after")
        return found

    monkeypatch.setattr(DirectoryChannel, "list_files", listed_then_changed)
    thresholds = gc.get_threshold()
    await daemon.start()
    try:
        async with asyncio.timeout(60):  # a once task's loop ends with its run
            await asyncio.gather(*daemon.importer._loops.values())
        run = daemon.status()["imports"]["users"]["runs"][0]
        ledger = daemon.importer.stores["users"].ledger
    finally:
        await daemon.stop()
        gc.unfreeze()  # this test process goes on: give it its collector back
        gc.set_threshold(*thresholds)
    return run, ledger, listings
