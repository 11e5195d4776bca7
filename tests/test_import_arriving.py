"""A file read while its fetch still writes it (imports/arriving.py, reader.py).

The reader, in a thread or in a process of its own, gives the rows of the bytes on disk
before the file is whole, goes on as more arrive, and ends at the file's full size with
every row the whole file gives. A fetch that stops short ends the reading after the
rows of the bytes on disk: a row the stop cut in two is never read as a row.

A real file, written in order on cue by the test, as a fetch writes it.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import signal
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from firehosed.config import parse
from firehosed.daemon import Daemon as InProcess
from firehosed.fields import FieldsConfig
from firehosed.imports import importer
from firehosed.imports.arriving import Abandoned, Arrival
from firehosed.imports.child import Chunk, Job
from firehosed.imports.reader import Reader
from firehosed.imports.rows import FileError
from tests.daemon import BASE_CONFIG, TOKEN, Daemon, delivered_records, free_port, wait_until
from tests.faults.proxy import FaultProxy, until
from tests.servers.moto import moto_server
from tests.test_delivery_s3 import s3_client
from tests.test_imports import (
    COLUMNS,
    delivered_ids,
    finished_run,
    imports_config,
    reader_pids,
    running,
    write_csv,
)

__all__ = ["moto_server"]

ROWS = 5000
CHUNK = 100


def job(path: Path, size: int, after: int = 0) -> Job:
    columns = {
        "type": "event",
        "id": "event_id",
        "person": "customer_id",
        "session": "session_id",
        "time": "timestamp",
    }
    return Job(path, "csv", after, CHUNK, "users", columns, FieldsConfig(), "f@1", size)


def whole_file(tmp_path: Path) -> tuple[bytes, set[str]]:
    valid, _ = write_csv(tmp_path / "whole.csv", ROWS, bad_every=97)
    return (tmp_path / "whole.csv").read_bytes(), valid


def rows_in(data: bytes) -> int:
    """The complete data rows in `data` (after the header): its CRLF-ended lines."""
    return data.count(b"\r\n") - 1


async def take(reader: Reader, rows: int) -> list[Chunk]:
    """Chunks from `reader` until they hold at least `rows` rows."""
    chunks: list[Chunk] = []
    async with asyncio.timeout(30):
        while sum(len(c.numbers) + len(c.errors) for c in chunks) < rows:
            chunks.append(await reader.next())
    return chunks


def numbers(chunks: list[Chunk]) -> list[int]:
    return sorted(
        [*(n for c in chunks for n in c.numbers), *(e.row for c in chunks for e in c.errors)]
    )


def ids(chunks: list[Chunk]) -> set[str]:
    return {id_ for chunk in chunks for id_ in chunk.signals.ids}


@pytest.fixture(params=["thread", "process"])
def in_process(request: pytest.FixtureRequest) -> bool:
    return bool(request.param == "process")


async def test_rows_are_read_as_their_bytes_arrive_and_all_of_them_once_whole(
    tmp_path: Path, in_process: bool
) -> None:
    data, valid = whole_file(tmp_path)
    path = tmp_path / "arriving.csv"
    cut = len(data) * 2 // 5 + 7  # mid-row
    arrival = Arrival()
    with path.open("wb") as out:
        out.write(data[:cut])
        out.flush()
        reader = Reader(job(path, len(data)), arrival)
        if in_process:
            await reader.spawn()
            assert reader.child is not None
        try:
            # Rows of the first two fifths, read while the rest is not on disk.
            early = await take(reader, rows_in(data[:cut]) - 2 * CHUNK)
            assert numbers(early) == list(range(1, len(numbers(early)) + 1))
            out.write(data[cut:])
            out.flush()
            chunks = early
            async with asyncio.timeout(30):
                while not chunks[-1].ended:
                    chunks.append(await reader.next())
        finally:
            await reader.close()
    assert numbers(chunks) == list(range(1, ROWS + 1)), "every row once, in order"
    assert ids(chunks) == valid


async def test_a_fetch_stopped_short_ends_the_reading_after_the_rows_on_disk(
    tmp_path: Path, in_process: bool
) -> None:
    data, _ = whole_file(tmp_path)
    path = tmp_path / "arriving.csv"
    cut = len(data) // 2 + 11  # mid-row: that row must not be read as a row
    path.write_bytes(data[:cut])
    arrival = Arrival()
    reader = Reader(job(path, len(data)), arrival)
    if in_process:
        await reader.spawn()
    chunks: list[Chunk] = []
    try:
        chunks = await take(reader, CHUNK)
        arrival.stop()
        with pytest.raises(Abandoned, match="its fetch stopped at byte"):
            async with asyncio.timeout(30):
                while True:
                    chunks.append(await reader.next())
    finally:
        await reader.close()
    read = numbers(chunks)
    assert read == list(range(1, len(read) + 1))
    assert len(read) <= rows_in(data[:cut]), "no row past the bytes on disk, none cut short"
    assert len(read) >= CHUNK


async def test_a_resumed_reading_goes_on_after_the_rows_settled(
    tmp_path: Path, in_process: bool
) -> None:
    data, _ = whole_file(tmp_path)
    path = tmp_path / "arriving.csv"
    path.write_bytes(data)
    reader = Reader(job(path, len(data), after=1234), Arrival())
    if in_process:
        await reader.spawn()
    try:
        chunks = await take(reader, ROWS - 1234)
        chunks.append(await reader.next())
    finally:
        await reader.close()
    assert numbers(chunks) == list(range(1235, ROWS + 1))
    assert chunks[-1].ended


# -- a daemon importing from S3 (moto) through a proxy that slows and cuts the fetch ----

LARGE = 160_000  # rows: about 9.4 MB, read by a process of its own (PROCESS_FROM)
RATE = 2_000_000  # bytes a second through the slowed proxy: the fetch takes about 5 s
MIDWAY = 20_000  # rows read before the test acts, the file still arriving


def s3_task(bucket: str, endpoint: str, pattern: str = "users-*.csv") -> str:
    return f"""
[channels.remote]
type = "s3"
bucket = "{bucket}"
prefix = "in/"
endpoint_url = "{endpoint}"
addressing_style = "path"
access_key_id = "testing"
secret_access_key = "testing"

[imports.users]
account = "acme"
source = "remote"
pattern = "{pattern}"
once = true
""" + COLUMNS.format(task="users")


def put_file(moto_server: str, bucket: str, path: Path, data: bytes | None = None) -> None:
    s3 = s3_client(moto_server)
    try:
        if bucket not in {b["Name"] for b in s3.list_buckets()["Buckets"]}:
            s3.create_bucket(Bucket=bucket)
        body = path.read_bytes() if data is None else data
        s3.put_object(Bucket=bucket, Key=f"in/{path.name}", Body=body)
    finally:
        s3.close()


@asynccontextmanager
async def slowed_s3(
    tmp_path: Path, moto_server: str, rows: int
) -> AsyncIterator[tuple[Daemon, FaultProxy, set[str], str]]:
    """A daemon importing a CSV of `rows` rows from S3 through a proxy slowed to RATE,
    started and reading the file as it arrives: (it, the proxy, the valid ids, the
    bucket)."""
    source = tmp_path / "users-1.csv"
    valid, _ = write_csv(source, rows, bad_every=1000)
    bucket = f"arriving-{uuid.uuid4().hex[:12]}"
    put_file(moto_server, bucket, source)
    url = urlsplit(moto_server)
    async with FaultProxy(url.hostname or "127.0.0.1", url.port or 80) as proxy:
        await proxy.slow(RATE)
        daemon = Daemon(
            tmp_path, imports_config(tmp_path, s3_task(bucket, f"http://{proxy.address}"))
        )
        try:
            await asyncio.to_thread(daemon.start)
            run = await asyncio.to_thread(
                wait_until, partial(read_while_fetching, daemon), 60, 0.01
            )
            assert proxy.bytes["down"] < source.stat().st_size, "read before it was whole"
            assert run["processing"]["status"] == "processing"
            yield daemon, proxy, valid, bucket
        finally:
            daemon.close()


def read_while_fetching(daemon: Daemon) -> dict[str, Any] | None:
    """The run, once MIDWAY of its rows were read while its fetch still goes on."""
    runs = daemon.status()["imports"]["users"]["runs"]
    if (
        runs
        and runs[0]["fetch"]["status"] == "fetching"
        and runs[0]["processing"]["rows"] >= MIDWAY
    ):
        return runs[0]  # type: ignore[no-any-return]
    return None


async def every_row_once(daemon: Daemon, valid: set[str], rows: int = LARGE) -> dict[str, Any]:
    """The run, processed with every row counted once; every valid row delivered once."""
    run = await asyncio.to_thread(finished_run, daemon, "users", 120)
    assert run["fetch"]["status"] == "fetched"
    assert run["processing"]["status"] == "processed"
    assert run["processing"]["rows"] == rows
    ids = await asyncio.to_thread(delivered_ids, daemon, len(valid), 120)
    assert ids == Counter(valid), "every valid row once: none lost, none doubled"
    return run


async def test_kill_9_while_an_s3_file_arrives_costs_no_row(
    tmp_path: Path, moto_server: str
) -> None:
    """The fetch held, the reading process waits for the file's next bytes; the daemon
    killed then, it ends too (its stdin closes), and the restart loses no row."""
    async with slowed_s3(tmp_path, moto_server, LARGE) as (daemon, proxy, valid, _):
        (pid,) = reader_pids(daemon)
        await proxy.hang()
        await asyncio.to_thread(wait_until, partial(waiting, pid), 30)
        await asyncio.to_thread(daemon.kill)
        assert await asyncio.to_thread(wait_until, lambda: not running(pid), 30)
        await proxy.pass_()
        await asyncio.to_thread(daemon.start)
        await every_row_once(daemon, valid)


def waiting(pid: int, looks: int = 10) -> bool:
    """Whether process `pid` sleeps at each of `looks` looks 50 ms apart: the reader,
    having read all the bytes on disk, waits for more."""
    for _ in range(looks):
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] != "S":
            return False
        time.sleep(0.05)
    return True


async def test_a_fetch_cut_part_way_is_made_again_and_read_on_after_its_rows(
    tmp_path: Path, moto_server: str
) -> None:
    async with slowed_s3(tmp_path, moto_server, LARGE) as (daemon, proxy, valid, _):
        await proxy.down()
        await asyncio.to_thread(wait_until, lambda: daemon.events("import.fetch_failed"), 60)
        await proxy.pass_()
        run = await every_row_once(daemon, valid)
        # The rows read before the cut were all settled: none was sent twice.
        assert run["processing"]["imported"] == len(valid)
        assert run["processing"]["duplicates"] == 0
        assert len(daemon.events("import.fetch_failed")) == 1
        assert not daemon.events("import.reader_lost")


async def test_a_file_replaced_while_the_daemon_was_down_is_read_whole_in_its_new_version(
    tmp_path: Path, moto_server: str
) -> None:
    """The rows read of the old version stay imported (once); the new version's rows,
    with ids of their own, all arrive once."""
    async with slowed_s3(tmp_path, moto_server, LARGE) as (daemon, proxy, old, bucket):
        await asyncio.to_thread(daemon.kill)
        replaced = tmp_path / "replaced" / "users-1.csv"
        new, _ = write_csv(replaced, 30_000, bad_every=1000, first_id=LARGE)
        put_file(moto_server, bucket, replaced)
        await proxy.pass_()
        await asyncio.to_thread(daemon.start)
        run = await asyncio.to_thread(finished_run, daemon, "users", 120)
        assert run["processing"]["status"] == "processed"
        (replaced_midway,) = daemon.events("import.file_replaced_midway")
        kept = replaced_midway["rows"]
        assert 0 < kept < LARGE  # (the status shows MIDWAY: the save may lag it a chunk)
        assert run["processing"]["rows"] == kept + 30_000
        ids = await asyncio.to_thread(delivered_ids, daemon, len(new) + 1, 120)
        assert max(ids.values()) == 1, "no row twice"
        assert new <= set(ids), "every row of the new version"
        assert set(ids) - new <= old
        assert len(set(ids) - new) >= kept * 0.99  # the old rows settled, less bad ones


async def test_the_rows_read_before_a_fetch_failed_for_good_are_not_read_again_by_the_next_run(
    tmp_path: Path, moto_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run whose fetch fails three times part-way keeps the rows it read (its
    processing fails with its fetch); the next run takes the same version of the file
    and reads on after them. The daemon runs in this process, its pauses between
    attempts cut short, and the next run is started at once."""
    monkeypatch.setattr(importer, "RETRY_FIRST", 0.02)
    source = tmp_path / "users-1.csv"
    valid, _ = write_csv(source, LARGE, bad_every=1000)
    bucket = f"arriving-{uuid.uuid4().hex[:12]}"
    put_file(moto_server, bucket, source)
    url = urlsplit(moto_server)
    text = BASE_CONFIG.format(port=free_port(), dir=tmp_path, token=TOKEN)
    text += f'\n[admin]\nlisten = "127.0.0.1:{free_port()}"\n'
    thresholds = gc.get_threshold()
    async with FaultProxy(url.hostname or "127.0.0.1", url.port or 80) as proxy:
        await proxy.slow(RATE)
        daemon = InProcess(
            parse(text + imports_config(tmp_path, s3_task(bucket, f"http://{proxy.address}")))
        )
        await daemon.start()
        try:
            await until(lambda: (run := _latest(daemon)) and run["processing"]["rows"] >= MIDWAY)
            await proxy.down()
            async with asyncio.timeout(60):
                await asyncio.gather(*daemon.importer._loops.values())  # the run ends
            first = _latest(daemon)
            assert first is not None
            assert first["fetch"]["status"] == "failed"
            assert first["processing"]["status"] == "failed"
            assert first["processing"]["error"].startswith("its fetch failed: ")
            kept = first["processing"]["rows"]
            assert 0 < kept < LARGE  # (the status shows MIDWAY: the save may lag it a chunk)
            await proxy.pass_()
            async with asyncio.timeout(120):
                await daemon.importer._pull("users", time.time(), "once")
            second = _latest(daemon)
            assert second is not None and second["run"] != first["run"]
            assert second["processing"]["status"] == "processed"
            assert second["processing"]["rows"] == LARGE - kept
            ids = await _delivered(tmp_path / "export", len(valid))
            assert ids == Counter(valid), "every valid row once: none lost, none doubled"
        finally:
            await daemon.stop()
            gc.unfreeze()  # this test process goes on: give it its collector back
            gc.set_threshold(*thresholds)


def _latest(daemon: InProcess) -> dict[str, Any] | None:
    runs = daemon.status()["imports"]["users"]["runs"]
    return runs[0] if runs else None  # type: ignore[no-any-return]


async def _delivered(export: Path, expected: int) -> Counter[str]:
    """How often each id was delivered to the directory `export`, once `expected`
    distinct ids were (and a moment more, for a double in the next batch)."""

    def ids() -> Counter[str]:
        files = [p for p in export.glob("**/*.ndjson") if not p.name.startswith(".")]
        return Counter(r["signal_id"]["$oid"] for r in delivered_records(files))

    await until(lambda: len(ids()) >= expected, within=120)
    await asyncio.sleep(0.3)
    return ids()


async def test_an_s3_file_failing_as_it_arrives_fails_its_run_and_is_not_taken_again(
    tmp_path: Path, moto_server: str
) -> None:
    """A file read as it arrives that cannot be read (a header naming a column twice),
    found so while its fetch goes on, is fetched whole all the same, and its task's
    ledger holds it, as it holds one that failed once fetched: the next run does not
    take it again. The other file is imported."""
    bucket = f"arriving-{uuid.uuid4().hex[:12]}"
    valid, _ = write_csv(tmp_path / "users-1.csv", 3000, bad_every=1000)
    put_file(moto_server, bucket, tmp_path / "users-1.csv")
    write_csv(tmp_path / "users-2.csv", 30_000, bad_every=1000, first_id=10_000)
    twice = (tmp_path / "users-2.csv").read_bytes().replace(b"sku", b"event", 1)
    put_file(moto_server, bucket, tmp_path / "users-2.csv", twice)
    url = urlsplit(moto_server)
    async with FaultProxy(url.hostname or "127.0.0.1", url.port or 80) as proxy:
        await proxy.slow(len(twice) // 2)  # its fetch takes two seconds
        config = s3_task(bucket, f"http://{proxy.address}")
        daemon = Daemon(tmp_path, imports_config(tmp_path, config))
        try:
            await asyncio.to_thread(daemon.start)
            run = await asyncio.to_thread(finished_run, daemon, "users")
            assert run["fetch"]["status"] == "fetched"
            assert run["processing"]["status"] == "failed"
            assert run["processing"]["error"].startswith("users-2.csv: ")
            assert "event" in run["processing"]["error"]
            ids = await asyncio.to_thread(delivered_ids, daemon, len(valid))
            assert set(ids) == valid
        finally:
            daemon.close()
    ledger = tmp_path / "var" / "imports" / "users" / "ledger.ndjson"
    taken = {json.loads(line)["name"] for line in ledger.read_text().splitlines()}
    assert taken == {"users-1.csv", "users-2.csv"}


def _writes(pid: int) -> int:
    """The write system calls process `pid` has made (/proc/PID/io)."""
    io = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
    return int(io["syscw"])


def _write_stdout(pid: int, data: bytes) -> None:
    """Write `data` into process `pid`'s stdout, a pipe the daemon reads."""
    with Path(f"/proc/{pid}/fd/1").open("ab") as pipe:
        pipe.write(data)


async def test_bytes_on_the_childs_pipe_it_did_not_send_end_it_and_a_thread_reads_on(
    tmp_path: Path,
) -> None:
    """What arrives on the child's pipe but is no frame of its (another process writing
    to it, as a debugger attached mid-write once did) is never taken as rows: the daemon
    ends the child and reads the file in a thread from the last whole chunk; every row
    comes once. Before, the decode error ended the task's loop with its run unfinished."""
    data, _ = whole_file(tmp_path)
    reader = Reader(job(tmp_path / "whole.csv", len(data))._replace(arriving=None))
    try:
        await reader.spawn()
        child = reader.child
        assert child is not None
        os.kill(child.pid, signal.SIGSTOP)
        wait_until(lambda: Path(f"/proc/{child.pid}/stat").read_text().split()[2] == "T")
        assert _writes(child.pid) == 0, "the child wrote before it was stopped"
        _write_stdout(child.pid, (16).to_bytes(8, "little") + b"\xc1" * 16)  # never msgpack
        os.kill(child.pid, signal.SIGCONT)
        chunks = await take(reader, rows_in(data))
        assert reader.child is None, "the child that sent the bytes still reads"
        assert child.returncode is not None
    finally:
        await reader.close()
    assert numbers(chunks) == list(range(1, rows_in(data) + 1))


async def test_a_child_that_crashes_fails_its_file_with_the_error_and_no_loop_ends(
    tmp_path: Path,
) -> None:
    """A bug in the child's reading (here: a format `check` refuses, reached on cue)
    fails the file with the error's last line, as a file that cannot be read fails; it
    was a RuntimeError that ended the task's loop and left its run processing."""
    data, _ = whole_file(tmp_path)
    reader = Reader(job(tmp_path / "whole.csv", len(data))._replace(arriving=None, format="x"))
    try:
        await reader.spawn()
        with pytest.raises(FileError, match=r"reading failed \(a bug.*ValueError: unknown"):
            await reader.next()
    finally:
        await reader.close()
