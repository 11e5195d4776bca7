"""The local backend's segment store on real files: framing, commit, cut, recovery.

(What every backend must do is in test_queue_contract.py; this is how the local one
keeps it on disk.)
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import msgspec
import pytest

from firehosed import metrics
from firehosed.errors import StorageError
from firehosed.queue.base import Manifest, Position
from firehosed.queue.commit import Committer
from firehosed.queue.frames import HEADER, frame, scan
from firehosed.queue.local import LocalQueue
from firehosed.queue.store import SegmentStore
from firehosed.record import Record, encoder


def record(n: int) -> bytes:
    """One framed record, as the router stages it."""
    raw = b'{"type":"pd","n":%d}' % n
    return frame(encoder.encode(Record("pd", f"id{n}", "s", None, 0.0, 1000.0 + n, raw)))


def open_queue(root: Path, segment_size: int = 1 << 20) -> SegmentStore:
    queue = SegmentStore(root / "queues" / "fh", "fh", segment_size, sync=True)
    queue.open()
    return queue


async def append(queue: SegmentStore, numbers: range) -> None:
    """Append and commit records as one group commit does (cut by the queue's test
    cutter, if `cutting` gave it one)."""
    for n in numbers:
        queue.append(record(n), 1)
    pending = queue.take_pending()
    cutter: EveryRound | None = getattr(queue, "cutter", None)
    end = await asyncio.to_thread(queue.write, pending, True, cutter)
    queue.settle(pending, end)
    if cutter is not None:
        cutter.round_done()


def segment_bytes(queue: SegmentStore) -> list[Path]:
    return sorted((queue.root / "segments").glob("*.seg"), key=lambda p: int(p.stem))


def test_scan_finds_frames_and_resyncs_after_corruption() -> None:
    frames = [frame(b"a" * 10), frame(b"b" * 20), frame(b"c" * 30)]
    data = bytearray(b"".join(frames))
    data[len(frames[0]) + HEADER.size + 3] ^= 0xFF  # flip a bit in the second payload
    spans = list(scan(bytes(data)))
    assert [s.payload for s in spans] == [b"a" * 10, None, b"c" * 30]
    assert spans[1].start == len(frames[0]) and spans[1].end == len(frames[0]) + len(frames[1])


def test_a_chunk_ending_inside_a_frame_is_cut_short_not_searched() -> None:
    """Reading a segment in chunks, a frame running past the chunk is read again with
    the next chunk; a frame whose length was damaged, in the whole file, is skipped to
    the next intact frame all the same."""
    frames = [frame(b"a" * 10), frame(b"b" * 200), frame(b"c" * 30)]
    data = b"".join(frames)
    cut = len(frames[0]) + 50
    spans = list(scan(data[:cut], more=True))
    assert [(s.start, s.end, s.payload) for s in spans] == [
        (0, len(frames[0]), b"a" * 10),
        (len(frames[0]), cut, None),
    ]
    damaged = bytearray(data)
    damaged[len(frames[0]) + 2 : len(frames[0]) + 6] = (1 << 20).to_bytes(4, "little")
    spans = list(scan(bytes(damaged)))
    assert [s.payload for s in spans] == [b"a" * 10, None, b"c" * 30]


async def test_records_survive_reopen_and_are_read_in_order(tmp_path: Path) -> None:
    queue = open_queue(tmp_path)
    await append(queue, range(100))
    queue.close()
    again = open_queue(tmp_path)
    assert again.staged_records == 100
    records, _, _ = again.read(1 << 30, 1 << 30)
    assert [r.id for r in records] == [f"id{n}" for n in range(100)]


async def test_segments_rotate_and_cut_batches_free_them(tmp_path: Path) -> None:
    queue = open_queue(tmp_path, segment_size=4096)
    for start in range(0, 400, 50):  # a group may overrun a segment; the next one rotates
        await append(queue, range(start, start + 50))
    assert len(segment_bytes(queue)) > 3
    records, end, framed = queue.read(1 << 30, 1 << 30)
    assert len(records) == 400
    manifest = queue.new_manifest(
        name="x.ndjson", records=400, size=3, opened=0.0, cut=0.0, end=end, content_type="x"
    )
    freed = queue.persist_batch(manifest, b"abc")
    queue.add_batch(manifest, freed, framed)
    assert len(segment_bytes(queue)) == 1
    assert queue.staged_records == 0 and queue.queued_records() == 400
    queue.close()
    again = open_queue(tmp_path, segment_size=4096)
    assert [b.name for b in again.batches] == ["x.ndjson"]
    assert again.staged_records == 0
    assert again.batch_path(again.batches[0]).read_bytes() == b"abc"


def cut(queue: SegmentStore, name: str, data: bytes = b"abc", *, stream: bool = False) -> None:
    """Cut every committed record into one batch named `name` (its bytes held in its
    manifest when `stream`, as the worker does for stream channels)."""
    records, end, framed = queue.read(1 << 30, 1 << 30)
    manifest = batch_of(queue, name, len(records), end, data, stream=stream, base=name)
    queue.add_batch(manifest, queue.persist_batch(manifest, data), framed)


def batch_of(
    queue: SegmentStore,
    name: str,
    records: int,
    end: Position,
    data: bytes,
    *,
    stream: bool,
    base: str = "",
) -> Manifest:
    """A manifest numbered after the queue's last batch (stream: its bytes inside)."""
    return queue.new_manifest(
        name=name,
        records=records,
        size=len(data),
        opened=0.0,
        cut=0.0,
        end=end,
        content_type="x",
        base=base,
        suffix=0,
        data=data if stream else None,
    )


async def cut_batches(queue: SegmentStore, count: int, size: int, *, stream: bool) -> None:
    """`count` batches of `size` fresh records each, appended and cut in turn (b0, b1…)."""
    for n in range(count):
        await append(queue, range(n * size, (n + 1) * size))
        cut(queue, f"b{n}", b"[]" if stream else b"abc", stream=stream)


def deliver_oldest(queue: SegmentStore) -> None:
    """Forget the oldest batch as the worker does once it is delivered."""
    manifest = queue.batches[0]
    queue.remove_batch(manifest)
    queue.drop_batch(manifest)


async def test_delivered_batches_leave_one_tombstone_that_carries_the_state(
    tmp_path: Path,
) -> None:
    queue = open_queue(tmp_path)
    for n in range(3):
        await append(queue, range(n * 10, n * 10 + 10))
        cut(queue, f"b{n}")
        deliver_oldest(queue)
    files = sorted(p.name for p in queue.batches_dir.iterdir())
    assert files == ["3.done"]  # no manifest, no data, one tombstone
    assert not (queue.root / "state.json").exists()  # never needed on the way
    queue.close()
    again = open_queue(tmp_path)
    assert again.staged_records == 0 and not again.batches  # nothing cut or sent again
    assert again.state.next_batch == 4 and again.state.last_name == "b2"
    await append(again, range(30, 35))
    records, _, _ = again.read(1 << 30, 1 << 30)
    assert [r.id for r in records] == [f"id{n}" for n in range(30, 35)]


async def test_recovery_clears_what_a_crash_left_of_a_delivered_batch(tmp_path: Path) -> None:
    queue = open_queue(tmp_path)
    await cut_batches(queue, 2, 10, stream=False)
    deliver_oldest(queue)
    # A crash after the second tombstone's sync, before its data and the older
    # tombstone were removed.
    (queue.batches_dir / "2.json").rename(queue.batches_dir / "2.done")
    queue.close()
    again = open_queue(tmp_path)
    assert sorted(p.name for p in again.batches_dir.iterdir()) == ["2.done"]
    assert not again.batches and again.staged_records == 0
    assert again.state.next_batch == 3


async def test_a_stream_batch_is_one_manifest_file_holding_its_bytes(tmp_path: Path) -> None:
    queue = open_queue(tmp_path)
    await append(queue, range(10))
    cut(queue, "s1", b"[1,2,3]", stream=True)
    assert sorted(p.name for p in queue.batches_dir.iterdir()) == ["1.json"]
    queue.close()
    again = open_queue(tmp_path)
    assert [(b.name, b.data) for b in again.batches] == [("s1", b"[1,2,3]")]
    assert again.staged_records == 0 and again.state.next_batch == 2
    deliver_oldest(again)
    assert sorted(p.name for p in again.batches_dir.iterdir()) == ["1.done"]


@pytest.mark.parametrize("keep", [0, 1, 40])
async def test_a_torn_stream_manifest_is_discarded_and_its_records_cut_again(
    tmp_path: Path, keep: int
) -> None:
    """A crash while the manifest was written in place, before its sync (`keep` bytes
    of it reached the disk): the batch was never attempted; nothing is lost."""
    queue = open_queue(tmp_path)
    await append(queue, range(5))
    cut(queue, "s1", b"[1]", stream=True)
    await append(queue, range(5, 10))
    cut(queue, "s2", b"[2]", stream=True)
    torn = queue.batches_dir / "2.json"
    torn.write_bytes(torn.read_bytes()[:keep])
    queue.close()
    again = open_queue(tmp_path)
    assert not torn.exists()
    assert [b.name for b in again.batches] == ["s1"]  # the older batch stands
    records, _, _ = again.read(1 << 30, 1 << 30)
    assert [r.id for r in records] == [f"id{n}" for n in range(5, 10)]
    assert again.state.next_batch == 2  # the number is used again


async def test_an_unreadable_older_manifest_is_an_error_not_a_silent_loss(
    tmp_path: Path,
) -> None:
    queue = open_queue(tmp_path)
    await cut_batches(queue, 2, 5, stream=True)
    (queue.batches_dir / "1.json").write_bytes(b'{"no": 1, "id"')
    queue.close()
    with pytest.raises(msgspec.DecodeError):
        open_queue(tmp_path)


async def test_a_dead_stream_batch_gets_a_data_file_and_comes_back_by_replay(
    tmp_path: Path,
) -> None:
    queue = open_queue(tmp_path)
    await append(queue, range(5))
    cut(queue, "s1", b"[1,2]", stream=True)
    dead = tmp_path / "dead" / "fh"
    manifest = queue.batches[0]
    queue.move_batch(manifest, dead)
    queue.drop_batch(manifest)
    assert sorted(p.name for p in dead.iterdir()) == ["1.data", "1.json"]
    assert (dead / "1.data").read_bytes() == b"[1,2]"
    assert not list(queue.batches_dir.glob("*.json"))
    back = queue.adopt(dead / "1.json")
    assert back.data is None and queue.batch_path(back).read_bytes() == b"[1,2]"


async def test_torn_tail_is_truncated_at_every_offset(tmp_path: Path) -> None:
    queue = open_queue(tmp_path)
    await append(queue, range(3))
    queue.close()
    path = segment_bytes(queue)[-1]
    whole = path.read_bytes()
    last = len(record(2))
    for cut in range(1, last):
        path.write_bytes(whole[: len(whole) - cut])
        again = open_queue(tmp_path)
        records, _, _ = again.read(1 << 30, 1 << 30)
        assert [r.id for r in records] == ["id0", "id1"], cut
        assert path.stat().st_size == len(whole) - last
        again.close()


async def test_flipped_bit_is_quarantined_and_counted(tmp_path: Path) -> None:
    queue = open_queue(tmp_path)
    await append(queue, range(5))
    queue.close()
    path = segment_bytes(queue)[-1]
    data = bytearray(path.read_bytes())
    second = len(record(0))
    data[second + HEADER.size + 5] ^= 0x01
    path.write_bytes(bytes(data))
    before = metrics.records_quarantined.labels("fh")._value.get()
    again = open_queue(tmp_path)
    records, _, _ = again.read(1 << 30, 1 << 30)
    assert [r.id for r in records] == ["id0", "id2", "id3", "id4"]
    assert metrics.records_quarantined.labels("fh")._value.get() == before + 1
    assert list((tmp_path / "quarantine" / "fh").iterdir())


async def test_interrupted_cut_leaves_records_staged(tmp_path: Path) -> None:
    """A crash after the batch data but before its manifest: the records are cut again."""
    queue = open_queue(tmp_path)
    await append(queue, range(10))
    (queue.batches_dir / "1.data").write_bytes(b"partial")
    queue.close()
    again = open_queue(tmp_path)
    assert not (again.batches_dir / "1.data").exists()
    assert again.staged_records == 10 and not again.batches


async def test_failed_write_answers_with_storage_error_and_rolls_back(tmp_path: Path) -> None:
    queue = open_queue(tmp_path)
    committer = Committer("fsync")
    task = asyncio.create_task(committer.run())
    commit = LocalQueue(queue, committer, tmp_path / "dead").append(record(1), 1)
    assert queue._fd is not None
    os.close(queue._fd)  # the next write fails with EBADF, like a dying disk
    queue._fd = os.open(os.devnull, os.O_RDONLY)
    with pytest.raises(StorageError):
        await commit.wait()
    assert queue.staged_records == 0
    task.cancel()


async def test_naming_survives_a_crash_before_state_is_saved(tmp_path: Path) -> None:
    """state.json lags the newest manifest; recovery takes cursor and names from it."""
    queue = open_queue(tmp_path)
    await append(queue, range(4))
    for n in (1, 2):
        records, end, framed = queue.read(1 << 30, 2)
        name = queue.unique_name("x-2026", 0.0)
        manifest = queue.new_manifest(
            name=name,
            base=queue.state.last_name,
            suffix=queue.state.name_suffix,
            named=queue.state.last_named,
            records=len(records),
            size=1,
            opened=0.0,
            cut=0.0,
            end=end,
            content_type="x",
        )
        queue.add_batch(manifest, queue.persist_batch(manifest, b"x"), framed)
        assert name == ("x-2026" if n == 1 else "x-2026-1")
    assert not (queue.root / "state.json").exists()  # never saved: no batch was delivered
    queue.close()
    again = open_queue(tmp_path)
    assert again.staged_records == 0 and len(again.batches) == 2
    assert again.unique_name("x-2026", 0.0) == "x-2026-2"


class EveryRound:
    """A RoundCutter that makes every group commit's records one stream batch, as the
    queue of a stream that keeps up does (its manifests numbered and named in turn)."""

    def __init__(self, queue: SegmentStore) -> None:
        self.queue = queue
        self.cut: tuple[Manifest, int] | None = None

    def cut_round(self, records: list[Record], end: Position, frame_bytes: int) -> Manifest:
        data = b"[" + b",".join(r.raw for r in records) + b"]"
        name = f"r{self.queue.state.next_batch}"
        manifest = batch_of(self.queue, name, len(records), end, data, stream=True)
        self.cut = (manifest, frame_bytes)
        return manifest

    def round_done(self) -> None:
        if self.cut is not None:
            self.queue.add_batch(self.cut[0], 0, self.cut[1])
        self.cut = None


def cutting(queue: SegmentStore) -> SegmentStore:
    queue.cutter = EveryRound(queue)
    return queue


def ns(records_or_batch: list[Record] | Manifest) -> list[int]:
    """The record numbers in records read back, or in a batch's JSON array."""
    if isinstance(records_or_batch, Manifest):
        assert records_or_batch.data is not None
        return [r["n"] for r in msgspec.json.decode(records_or_batch.data)]
    return [int(r.id[2:]) for r in records_or_batch]


async def test_a_batch_cut_with_its_commit_is_a_mark_in_the_segment(tmp_path: Path) -> None:
    """No batch file and no sync of its own; after a crash it is back, same id and bytes."""
    queue = cutting(open_queue(tmp_path))
    await append(queue, range(5))
    await append(queue, range(5, 8))
    first, second = queue.batches
    assert (ns(first), ns(second)) == ([0, 1, 2, 3, 4], [5, 6, 7])
    assert first.start == (0, 0, 0) and second.start is not None and second.start > first.end
    assert queue.staged_records == 0 and queue.uncut == 0
    assert not list(queue.batches_dir.iterdir())
    queue.close()
    again = open_queue(tmp_path)
    assert [(b.no, b.id, b.data) for b in again.batches] == [
        (first.no, first.id, first.data),
        (second.no, second.id, second.data),
    ]
    assert again.staged_records == 0 and again.uncut == 0
    assert again.state.next_batch == 3 and again.held == first.start
    await append(again, range(8, 10))  # no cutter now: these wait for a cut
    records, _, _ = again.read(1 << 30, 1 << 30)
    assert ns(records) == [8, 9]


async def test_a_done_mark_lets_a_delivered_batch_go_for_good(tmp_path: Path) -> None:
    queue = cutting(open_queue(tmp_path))
    for start in (0, 3, 6):
        await append(queue, range(start, start + 3))
    delivered = queue.batches[0]
    queue.mark_done(delivered)
    queue.drop_batch(delivered)
    assert queue.held == queue.batches[0].start
    queue.cutter = None
    await append(queue, range(9, 10))  # the next group commit writes the mark
    queue.close()
    again = open_queue(tmp_path)
    assert [ns(b) for b in again.batches] == [[3, 4, 5], [6, 7, 8]]
    assert again.staged_records == 1 and again.uncut == 1
    assert again.state.next_batch == 4


async def test_a_delivered_batch_whose_mark_was_not_written_is_sent_again(
    tmp_path: Path,
) -> None:
    """A crash before the next group commit: the batch comes back with the same id."""
    queue = cutting(open_queue(tmp_path))
    await append(queue, range(3))
    delivered = queue.batches[0]
    queue.mark_done(delivered)  # pending, never committed
    queue.close()
    again = open_queue(tmp_path)
    assert [b.id for b in again.batches] == [delivered.id]


@pytest.mark.parametrize("keep", [1, 30, -1])
async def test_a_torn_cut_mark_leaves_its_records_staged(tmp_path: Path, keep: int) -> None:
    """A crash in the middle of a round's write: the batch was never attempted, nor its
    records acknowledged; those that reached the disk whole are cut again."""
    queue = cutting(open_queue(tmp_path))
    await append(queue, range(4))
    queue.close()
    (segment,) = segment_bytes(queue)
    data = segment.read_bytes()
    mark = sum(len(record(n)) for n in range(4))  # the cut mark follows the records
    segment.write_bytes(data[: mark + keep] if keep >= 0 else data[:-1])
    again = open_queue(tmp_path)
    assert not again.batches and again.staged_records == 4 and again.uncut == 4
    records, _, _ = again.read(1 << 30, 1 << 30)
    assert ns(records) == [0, 1, 2, 3]
    assert again.state.next_batch == 1  # the number is used again


async def test_segments_holding_a_batch_stay_until_it_goes(tmp_path: Path) -> None:
    queue = cutting(open_queue(tmp_path, segment_size=4096))
    await append(queue, range(3))
    held = queue.batches[0]
    queue.cutter = None
    for start in range(3, 200, 50):
        await append(queue, range(start, start + 50))
    cut(queue, "later")  # moves the cursor past the whole of segment 1
    assert segment_bytes(queue)[0].name == "1.seg"
    queue.mark_done(held)
    queue.drop_batch(held)
    assert queue.held is None
    assert queue.delete_consumed_segments() > 0  # now it goes
    assert segment_bytes(queue)[0].name != "1.seg"


async def test_held_batches_get_files_before_a_cut_moves_the_cursor_past_them(
    tmp_path: Path,
) -> None:
    """`fix_held`, as the worker calls it before a cut: the cut's manifest puts the
    cursor on disk past the marks, and the batches are read back from their files."""
    queue = cutting(open_queue(tmp_path))
    await append(queue, range(3))
    await append(queue, range(3, 5))
    queue.cutter = None
    await append(queue, range(5, 9))
    queue.fixed(queue.fix_held())
    cut(queue, "later")
    assert sorted(p.name for p in queue.batches_dir.iterdir()) == [
        "1.json",
        "2.json",
        "3.data",
        "3.json",
    ]
    queue.close()
    again = open_queue(tmp_path)
    assert [(b.name, b.start) for b in again.batches] == [
        ("r1", None),
        ("r2", None),
        ("later", None),
    ]
    assert [ns(b) for b in list(again.batches)[:2]] == [[0, 1, 2], [3, 4]]
    assert again.staged_records == 0


async def test_state_json_never_passes_a_held_batch(tmp_path: Path) -> None:
    """Dead-lettering the oldest held batch saves state.json: the next held batch must
    still be found after a crash (the dead one may come back too: twice, never lost)."""
    queue = cutting(open_queue(tmp_path))
    await append(queue, range(3))
    await append(queue, range(3, 6))
    dead, kept = queue.batches
    queue.move_batch(dead, tmp_path / "dead" / "fh")
    queue.drop_batch(dead)
    assert (queue.root / "state.json").exists()
    queue.close()
    again = open_queue(tmp_path)
    assert kept.id in [b.id for b in again.batches]
    assert msgspec.json.decode((tmp_path / "dead" / "fh" / "1.data").read_bytes()) == [
        {"type": "pd", "n": n} for n in range(3)
    ]
    replayed = again.adopt(tmp_path / "dead" / "fh" / "1.json")
    assert replayed.start is None and replayed.no == 3
