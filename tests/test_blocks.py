"""A request's records as one Block frame in the local queue: commit, cut, recovery.

A cut limited by `max_records` or `max_bytes` can end inside a block: its position is
then (segment, offset, skip), and the next cut, or recovery after a crash, goes on from
the record after the skip. Blocks and single Record frames (catch-up replays, segments
written by older versions) may lie side by side; positions written before blocks
existed are (segment, offset). All on real files under tmp_path.
"""

from __future__ import annotations

import asyncio
import io
import struct
from array import array
from collections.abc import Callable, Sequence
from pathlib import Path

import msgspec
import pyarrow.parquet as pq
import pytest

from firehosed import formats, metrics
from firehosed.fileio import Data, Pieces
from firehosed.queue.base import CutRules, Encoded, Manifest, Position
from firehosed.queue.frames import HEADER, frame, frame_block
from firehosed.queue.local import LocalBackend, LocalQueue
from firehosed.queue.store import SegmentStore
from firehosed.record import Block, Record, Rows, encode

COLUMNS = ("types", "ids", "sessions", "persons", "times", "raws")
RECEIVED = 2000.0  # when a test's blocks were received, unless it says otherwise
EVERYTHING = 1 << 40  # a limit no test reaches


def raw(n: int, pad: int = 0) -> bytes:
    """Record n's JSON (`pad` bytes more of it for large records)."""
    if pad:
        return b'{"type":"pd","n":%d,"pad":"%s"}' % (n, b"x" * pad)
    return b'{"type":"pd","n":%d}' % n


def block(numbers: Sequence[int], received: float = RECEIVED, pad: int = 0) -> Block:
    """The records `numbers` as one request's Block (ids "id<n>", varied envelopes)."""
    return Block(
        received,
        ["pd"] * len(numbers),
        [f"id{n}" for n in numbers],
        [f"s{n}" for n in numbers],
        [None if n % 2 else f"p{n}" for n in numbers],
        [n + 0.5 for n in numbers],
        [raw(n, pad) for n in numbers],
    )


def single(n: int) -> Record:
    """Record n alone, as a catch-up replay (or an older version) stages it."""
    return Record("pd", f"id{n}", f"s{n}", None, n + 0.5, 1000.0 + n, raw(n))


def framed(item: Block | int) -> bytes | bytearray:
    """A Block's frame, or record n's single Record frame."""
    return frame_block(item) if isinstance(item, Block) else frame(encode(single(item)))


def count(item: Block | int) -> int:
    return len(item.ids) if isinstance(item, Block) else 1


def open_queue(root: Path, segment_size: int = 1 << 20) -> SegmentStore:
    queue = SegmentStore(root / "queues" / "fh", "fh", segment_size, sync=True)
    queue.open()
    return queue


def commit(queue: SegmentStore, *items: Block | int) -> Position:
    """Append blocks and single records (ints) and commit them as one group commit."""
    for item in items:
        queue.append(framed(item), count(item))
    pending = queue.take_pending()
    end = queue.write(pending, True)
    queue.settle(pending, end)
    return end


def persist(
    queue: SegmentStore, rows: Rows, end: Position, frame_bytes: int, data: Data = b"abc"
) -> Manifest:
    """Fix what a read returned as the next file batch, as the worker does."""
    manifest = queue.new_manifest(
        name=f"b{queue.state.next_batch}",
        records=len(rows),
        size=len(data),
        opened=0.0,
        cut=0.0,
        end=end,
        content_type="x",
    )
    queue.add_batch(manifest, queue.persist_batch(manifest, data), frame_bytes)
    return manifest


def cut(
    queue: SegmentStore, limit_bytes: int = EVERYTHING, limit_records: int = EVERYTHING
) -> tuple[Rows, Position, int]:
    """Read up to the limits and persist what was read as a batch: (rows, end, frame bytes)."""
    rows, end, frame_bytes = queue.read(limit_bytes, limit_records)
    if rows:
        persist(queue, rows, end, frame_bytes)
    return rows, end, frame_bytes


def cut_all(queue: SegmentStore, limit_bytes: int, limit_records: int) -> list[list[int]]:
    """Cut batches until nothing is staged; the record numbers of each batch."""
    batches: list[list[int]] = []
    while True:
        rows, _, _ = cut(queue, limit_bytes, limit_records)
        if not rows:
            return batches
        batches.append(ns(rows))
        assert len(batches) < 10_000, "the cuts make no progress"


def ns(rows: Rows) -> list[int]:
    """The record numbers of rows read back."""
    return [int(i[2:]) for i in rows.ids]


def segment(queue: SegmentStore, number: int = 1) -> Path:
    return queue.segments_dir / f"{number}.seg"


def quarantined() -> float:
    value: float = metrics.records_quarantined.labels("fh")._value.get()
    return value


# -- commit and read back --------------------------------------------------------------


def test_a_block_survives_reopen_with_its_columns_in_order(tmp_path: Path) -> None:
    queue = open_queue(tmp_path)
    written = block(range(25), received=1234.5)
    end = commit(queue, written)
    assert end == (1, len(frame_block(written)), 0)
    queue.close()
    again = open_queue(tmp_path)
    assert again.staged_records == 25
    assert again.staged_bytes == len(frame_block(written))
    rows, end, frame_bytes = again.read(EVERYTHING, EVERYTHING)
    assert rows.ids == written.ids and rows.raws == written.raws
    assert rows.received == [1234.5] * 25
    assert (rows.types, rows.sessions, rows.persons, rows.times) == (
        written.types,
        written.sessions,
        written.persons,
        written.times,
    )
    assert rows[7] == Record("pd", "id7", "s7", None, 7.5, 1234.5, raw(7))
    assert end == (1, len(frame_block(written)), 0) and frame_bytes == end[1]


def test_a_block_head_keeps_every_value_its_packing_could_confuse(tmp_path: Path) -> None:
    """A head joins each column's values by newlines, a None written empty: a value
    holding a newline, an empty string beside None, non-ASCII, a column all None all
    come back as they went in, after a reopen too (recovery notes the ids)."""
    queue = open_queue(tmp_path)
    written = Block(
        RECEIVED,
        ["pd", "pd", "t", "pd"],
        ["id\n0", "id1", "id2", "idé3"],
        ["", None, "s\r\n2", "s3"],
        [None, None, None, None],
        [0.5, 1.25, 2.0, 3.0],
        [raw(n) for n in range(4)],
    )
    commit(queue, written)
    queue.close()
    again = open_queue(tmp_path)
    assert [i for i, _ in again.take_recovered()] == written.ids
    rows, _, _ = again.read(EVERYTHING, EVERYTHING)
    got = zip(*(getattr(rows, c) for c in COLUMNS), strict=True)
    assert list(got) == list(zip(*(getattr(written, c) for c in COLUMNS), strict=True))
    assert rows[1] == Record("pd", "id1", None, None, 1.25, RECEIVED, raw(1))


def test_an_empty_block_holds_no_record_and_does_not_stop_a_read(tmp_path: Path) -> None:
    queue = open_queue(tmp_path)
    commit(queue, block([0, 1]), block([]), block([2]))
    queue.close()
    again = open_queue(tmp_path)
    assert again.staged_records == 3
    assert cut_all(again, EVERYTHING, 2) == [[0, 1], [2]]
    assert again.staged_records == 0 and again.staged_bytes == 0


# -- cuts ending inside a block ----------------------------------------------------------


def test_a_record_limit_inside_a_block_ends_the_cut_there_and_the_next_goes_on(
    tmp_path: Path,
) -> None:
    queue = open_queue(tmp_path)
    whole = len(frame_block(block(range(10))))
    commit(queue, block(range(10)))
    assert queue.staged_bytes == whole

    first, end, frame_bytes = cut(queue, limit_records=4)
    assert ns(first) == [0, 1, 2, 3]
    assert end == (1, 0, 4) and queue.state.cursor == (1, 0, 4)
    assert frame_bytes == 0  # the block is counted by the cut that takes its last record
    assert queue.staged_records == 6 and queue.staged_bytes == whole

    second, end, frame_bytes = cut(queue, limit_records=4)
    assert ns(second) == [4, 5, 6, 7]
    assert end == (1, 0, 8) and frame_bytes == 0

    third, end, frame_bytes = cut(queue, limit_records=4)
    assert ns(third) == [8, 9]
    assert end == (1, whole, 0) and frame_bytes == whole
    assert queue.staged_records == 0 and queue.staged_bytes == 0
    assert [b.records for b in queue.batches] == [4, 4, 2]
    assert [b.end for b in queue.batches] == [(1, 0, 4), (1, 0, 8), (1, whole, 0)]
    assert not queue.read(EVERYTHING, EVERYTHING)[0]


def test_a_limit_at_a_blocks_last_record_ends_past_the_block(tmp_path: Path) -> None:
    """Not (segment, offset, len(block)): the next cut starts at the next frame."""
    queue = open_queue(tmp_path)
    first = len(frame_block(block(range(5))))
    commit(queue, block(range(5)), block(range(5, 10)))
    rows, end, frame_bytes = cut(queue, limit_records=5)
    assert ns(rows) == [0, 1, 2, 3, 4]
    assert end == (1, first, 0) and frame_bytes == first
    rows, end, _ = cut(queue, limit_records=3)
    assert ns(rows) == [5, 6, 7] and end == (1, first, 3)
    rows, end, frame_bytes = cut(queue, limit_records=2)  # exactly the rest of it
    assert ns(rows) == [8, 9] and end == (1, segment(queue).stat().st_size, 0)
    assert frame_bytes == segment(queue).stat().st_size - first
    assert queue.staged_bytes == 0


def test_a_byte_limit_inside_a_block_makes_the_record_reaching_it_the_last(
    tmp_path: Path,
) -> None:
    queue = open_queue(tmp_path)
    commit(queue, block(range(10)))
    size = len(raw(0))  # every record here has the same size
    rows, end, _ = cut(queue, limit_bytes=2 * size + 1)  # the third record reaches it
    assert ns(rows) == [0, 1, 2] and end == (1, 0, 3)
    rows, end, _ = cut(queue, limit_bytes=2 * size)  # the second reaches it exactly
    assert ns(rows) == [3, 4] and end == (1, 0, 5)
    rows, end, _ = cut(queue, limit_bytes=1)  # the first record alone
    assert ns(rows) == [5] and end == (1, 0, 6)
    assert cut_all(queue, 3 * size, EVERYTHING) == [[6, 7, 8], [9]]
    assert queue.staged_records == 0 and queue.staged_bytes == 0


LAYOUTS: dict[str, list[list[Block | int]]] = {
    # One list per group commit; ints are single Record frames.
    "blocks": [[block(range(0, 7)), block(range(7, 12))], [block(range(12, 23))]],
    "mixed": [
        [0, block(range(1, 5)), 5, 6, block(range(7, 10))],
        [block(range(10, 13)), 13, block(range(14, 20)), block([20]), 21, 22],
    ],
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize(
    ("limit_bytes", "limit_records"),
    [
        (EVERYTHING, 1),
        (EVERYTHING, 3),
        (EVERYTHING, 4),
        (EVERYTHING, 7),
        (1, EVERYTHING),
        (40, EVERYTHING),  # two records of n < 10 are 38 bytes: the third reaches it
        (57, EVERYTHING),  # three such records exactly
        (100, 4),
        (60, 3),
    ],
)
def test_blocks_are_cut_exactly_as_the_same_records_in_single_frames(
    tmp_path: Path, layout: str, limit_bytes: int, limit_records: int
) -> None:
    """Whatever the framing, the same limits cut the same batches, each record once."""
    groups = LAYOUTS[layout]
    blocks = open_queue(tmp_path / "blocks")
    singles = open_queue(tmp_path / "singles")
    for group in groups:
        commit(blocks, *group)
        commit(singles, *[n for item in group for n in numbers_in(item)])
    expected = cut_all(singles, limit_bytes, limit_records)
    assert [n for batch in expected for n in batch] == list(range(23))
    assert cut_all(blocks, limit_bytes, limit_records) == expected
    assert blocks.staged_records == 0 and blocks.staged_bytes == 0
    assert blocks.queued_records() == 23


def numbers_in(item: Block | int) -> list[int]:
    return [int(i[2:]) for i in item.ids] if isinstance(item, Block) else [item]


# -- mixed frames -------------------------------------------------------------------------


def test_single_records_and_blocks_interleave_in_order(tmp_path: Path) -> None:
    queue = open_queue(tmp_path)
    commit(queue, 0, block(range(1, 5), received=10.0), 5)
    commit(queue, block(range(6, 9), received=20.0), 9, block(range(10, 15), received=30.0))
    queue.close()
    again = open_queue(tmp_path)
    assert again.staged_records == 15
    rows, _, _ = again.read(EVERYTHING, EVERYTHING)
    assert ns(rows) == list(range(15))
    assert rows.raws == [raw(n) for n in range(15)]
    assert rows.received == [1000.0] + [10.0] * 4 + [1005.0] + [20.0] * 3 + [1009.0] + [30.0] * 5
    assert rows[0] == single(0) and rows[5] == single(5)
    # Cuts of 3 across the boundaries: into the first block, out of it past a single
    # record, across the commit boundary, into the last block.
    assert cut_all(again, EVERYTHING, 3) == [
        [0, 1, 2],
        [3, 4, 5],
        [6, 7, 8],
        [9, 10, 11],
        [12, 13, 14],
    ]
    assert again.staged_records == 0 and again.staged_bytes == 0


def test_a_cut_ending_on_a_single_record_before_a_block_starts_it_whole(tmp_path: Path) -> None:
    queue = open_queue(tmp_path)
    commit(queue, 0, 1, block(range(2, 6)))
    rows, end, frame_bytes = cut(queue, limit_records=2)
    assert ns(rows) == [0, 1]
    assert end == (1, 2 * len(framed(0)), 0) and frame_bytes == 2 * len(framed(0))
    rows, _, _ = cut(queue)
    assert ns(rows) == [2, 3, 4, 5]


# -- recovery ------------------------------------------------------------------------------


def test_after_a_crash_mid_block_recovery_goes_on_from_the_skip(tmp_path: Path) -> None:
    queue = open_queue(tmp_path)
    commit(queue, 0, block(range(1, 11), received=RECEIVED))
    first, end, _ = cut(queue, limit_records=5)
    assert ns(first) == [0, 1, 2, 3, 4]
    assert end == (1, len(framed(0)), 4)
    live = (queue.staged_records, queue.staged_bytes)
    queue.close()  # a crash: no further cut, state.json never written

    again = open_queue(tmp_path)
    assert again.state.cursor == (1, len(framed(0)), 4)
    assert again.staged_records == 6  # the block's records after the skip
    assert (again.staged_records, again.staged_bytes) == live  # as accounted before
    assert again.take_recovered() == [(f"id{n}", RECEIVED) for n in range(5, 11)]
    assert [(b.name, b.records, b.end) for b in again.batches] == [("b1", 5, end)]
    rows, _, frame_bytes = cut(again)
    assert ns(rows) == list(range(5, 11))  # nothing read twice, nothing missing
    assert frame_bytes == len(framed(block(range(1, 11))))
    assert again.staged_records == 0 and again.staged_bytes == 0
    assert again.queued_records() == 11


def test_recovery_after_two_cuts_into_the_same_block(tmp_path: Path) -> None:
    queue = open_queue(tmp_path)
    commit(queue, block(range(10)))
    commit(queue, block(range(10, 12), received=RECEIVED + 1))
    assert ns(cut(queue, limit_records=3)[0]) == [0, 1, 2]
    assert ns(cut(queue, limit_records=3)[0]) == [3, 4, 5]
    queue.close()
    again = open_queue(tmp_path)
    assert again.state.cursor == (1, 0, 6)
    assert again.staged_records == 6
    assert again.take_recovered() == [(f"id{n}", RECEIVED) for n in range(6, 10)] + [
        ("id10", RECEIVED + 1),
        ("id11", RECEIVED + 1),
    ]
    assert cut_all(again, EVERYTHING, 3) == [[6, 7, 8], [9, 10, 11]]
    assert [b.records for b in again.batches] == [3, 3, 3, 3]


def test_a_torn_cut_batch_mid_block_leaves_its_records_staged(tmp_path: Path) -> None:
    """A crash after a cut's data but before its manifest: the cursor never moved."""
    queue = open_queue(tmp_path)
    commit(queue, block(range(8)))
    assert ns(cut(queue, limit_records=3)[0]) == [0, 1, 2]
    rows, end, _ = queue.read(EVERYTHING, 2)  # read, then the crash
    assert ns(rows) == [3, 4] and end == (1, 0, 5)
    (queue.batches_dir / "2.data").write_bytes(b"partial")
    queue.close()
    again = open_queue(tmp_path)
    assert again.staged_records == 5 and again.state.cursor == (1, 0, 3)
    assert ns(cut(again)[0]) == [3, 4, 5, 6, 7]


@pytest.mark.parametrize("keep", [1, HEADER.size - 1, HEADER.size, HEADER.size + 1, -1, "half"])
def test_a_torn_block_at_the_tail_is_cut_off_whole(tmp_path: Path, keep: int | str) -> None:
    """Its commit never returned: none of its records was acknowledged."""
    queue = open_queue(tmp_path)
    commit(queue, 0, block(range(1, 6)))
    commit(queue, block(range(6, 20)))
    queue.close()
    path = segment(queue)
    whole = path.read_bytes()
    last = len(framed(block(range(6, 20))))
    kept = last // 2 if keep == "half" else int(keep) % last
    path.write_bytes(whole[: len(whole) - last + kept])
    before = quarantined()
    again = open_queue(tmp_path)
    assert path.stat().st_size == len(whole) - last
    assert again.staged_records == 6
    rows, end, _ = again.read(EVERYTHING, EVERYTHING)
    assert ns(rows) == [0, 1, 2, 3, 4, 5] and end == (1, len(whole) - last, 0)
    assert quarantined() == before
    assert not (tmp_path / "quarantine").exists()
    commit(again, block([20, 21]))  # appends go on after the last good frame
    assert ns(cut(again)[0]) == [0, 1, 2, 3, 4, 5, 20, 21]


def test_a_corrupt_block_is_quarantined_and_the_frames_around_it_kept(tmp_path: Path) -> None:
    queue = open_queue(tmp_path)
    commit(queue, block(range(5)), 5)
    commit(queue, block(range(6, 12)), block(range(12, 15)))
    queue.close()
    path = segment(queue)
    data = bytearray(path.read_bytes())
    start = len(framed(block(range(5)))) + len(framed(5))
    bad = framed(block(range(6, 12)))
    assert data[start : start + len(bad)] == bad
    data[start + HEADER.size + 20] ^= 0x01  # inside the second block's payload
    path.write_bytes(bytes(data))
    before = quarantined()
    again = open_queue(tmp_path)
    assert again.staged_records == 9
    rows, _, _ = again.read(EVERYTHING, EVERYTHING)
    assert ns(rows) == [0, 1, 2, 3, 4, 5, 12, 13, 14]
    assert rows.raws == [raw(n) for n in [0, 1, 2, 3, 4, 5, 12, 13, 14]]
    saved = list((tmp_path / "quarantine" / "fh").iterdir())
    assert len(saved) == 1 and saved[0].read_bytes() == bytes(data[start : start + len(bad)])
    assert quarantined() == before + 1  # (a frame: a corrupt block's count is unknown)
    assert path.stat().st_size == len(data) - len(bad)
    assert cut_all(again, EVERYTHING, 4) == [[0, 1, 2, 3], [4, 5, 12, 13], [14]]


def test_a_corrupt_block_right_after_the_skip_position_is_quarantined(tmp_path: Path) -> None:
    """The cursor is inside block A; block B after it is corrupt: A's rest is kept."""
    queue = open_queue(tmp_path)
    commit(queue, block(range(6)), block(range(6, 10)), block(range(10, 13)))
    assert ns(cut(queue, limit_records=2)[0]) == [0, 1]
    queue.close()
    path = segment(queue)
    data = bytearray(path.read_bytes())
    start = len(framed(block(range(6))))
    data[start + HEADER.size + 5] ^= 0x10
    path.write_bytes(bytes(data))
    again = open_queue(tmp_path)
    assert again.staged_records == 4 + 3
    assert again.take_recovered() == [(f"id{n}", RECEIVED) for n in [2, 3, 4, 5, 10, 11, 12]]
    assert ns(cut(again)[0]) == [2, 3, 4, 5, 10, 11, 12]
    assert len(list((tmp_path / "quarantine" / "fh").iterdir())) == 1


# -- a block larger than a read chunk ------------------------------------------------------

BIG = range(2, 3002)  # 3000 records of about 500 bytes: some 1.5 MiB in one frame


def big_block() -> Block:
    return block(BIG, pad=480)


def test_a_large_block_is_cut_part_way_and_then_the_rest(tmp_path: Path) -> None:
    queue = open_queue(tmp_path)
    big = big_block()
    commit(queue, 0, 1, big)  # the segment rotates after this commit
    commit(queue, 3002)
    assert len(queue.segments) == 2
    offset = 2 * len(framed(0))

    rows, end, frame_bytes = cut(queue, limit_records=1000)
    assert ns(rows) == list(range(1000)) and end == (1, offset, 998) and frame_bytes == offset
    rows, end, frame_bytes = cut(queue, limit_bytes=600 * 500)  # a byte limit in it
    taken = len(rows)
    assert 500 < taken < 700 and frame_bytes == 0
    assert ns(rows) == list(range(1000, 1000 + taken))
    assert sum(map(len, rows.raws[:-1])) < 600 * 500 <= sum(map(len, rows.raws))
    assert end == (1, offset, 998 + taken)
    rows, end, frame_bytes = cut(queue)  # the rest of it, and a record in the next segment
    assert ns(rows) == list(range(1000 + taken, 3003))
    assert rows.raws[-2] == raw(3001, pad=480) and rows.raws[-1] == raw(3002)
    assert end == (2, len(framed(3002)), 0)
    assert frame_bytes == len(frame_block(big)) + len(framed(3002))
    assert queue.staged_records == 0 and queue.staged_bytes == 0
    assert queue.segments == [2]  # the first segment is wholly cut: freed


def test_a_crash_with_the_cursor_inside_a_large_block(tmp_path: Path) -> None:
    queue = open_queue(tmp_path)
    commit(queue, 0, 1, big_block())
    assert ns(cut(queue, limit_records=2500)[0]) == list(range(2500))
    queue.close()
    again = open_queue(tmp_path)
    assert again.staged_records == 502
    assert [i for i, _ in again.take_recovered()] == [f"id{n}" for n in range(2500, 3002)]
    assert cut_all(again, EVERYTHING, 200) == [
        list(range(start, min(start + 200, 3002))) for start in range(2500, 3002, 200)
    ]
    assert again.staged_records == 0 and again.staged_bytes == 0


def test_one_record_of_rows_is_read_from_its_part_without_building_columns(
    tmp_path: Path,
) -> None:
    """A cut's first record (its batch's opening time, the file's name) is read from its
    part: asking for it must not copy every record's bytes into a column."""
    queue = open_queue(tmp_path)
    commit(queue, 0, block(range(1, 5), received=10.0), 5)
    commit(queue, block(range(6, 9), received=20.0), 9, block(range(10, 15), received=30.0))
    rows, _, _ = cut(queue)
    records = [rows[index] for index in range(15)]
    assert rows._cache == {}  # no column was built
    assert records == list(rows)
    assert [rows[-index] for index in range(1, 16)] == records[::-1]
    assert rows[1] == Record("pd", "id1", "s1", None, 1.5, 10.0, raw(1))
    for index in (15, -16):
        with pytest.raises(IndexError):
            rows[index]
    mixed = rows[2:7]  # plain lists, then the blocks and records of the cut
    mixed.extend(rows)
    assert [mixed[index] for index in range(len(mixed))] == list(mixed)


def test_rows_read_from_a_mapped_segment_outlive_the_segment(tmp_path: Path) -> None:
    """A cut's blocks are views of the segment's mapping: deleting the segment once
    the cut is persisted (a delivered batch frees it) must not change or fault them."""
    queue = open_queue(tmp_path, segment_size=1024)  # rotates every block or two
    for start in range(0, 200, 20):
        commit(queue, block(range(start, start + 20)))
    assert len(queue.segments) > 5
    rows, _, _ = cut(queue)
    assert queue.segments == [queue.segments[-1]]  # all but the one being written freed
    assert not segment(queue, 1).exists()
    assert ns(rows) == list(range(200)) and rows.raws == [raw(n) for n in range(200)]
    assert rows.text() == b"".join(raw(n) + b"\n" for n in range(200))


def test_an_ndjson_batch_of_plain_blocks_is_written_from_the_mapped_pieces(
    tmp_path: Path,
) -> None:
    queue = open_queue(tmp_path)
    plain = [block(range(0, 10)), block(range(10, 25), pad=30)]
    for item in plain:
        item.plain = True
    commit(queue, plain[0], 25, plain[1])
    rows, end, _ = queue.read(EVERYTHING, EVERYTHING)
    data = formats.encode_batch("ndjson", rows, None, "none")
    assert isinstance(data, Pieces) and len(data.pieces) == 3  # two views, one record
    expected = b"".join(r + b"\n" for r in [*plain[0].raws, raw(25), *plain[1].raws])
    assert bytes(data) == expected == formats.encode("ndjson", rows, None, "none")
    manifest = persist(queue, rows, end, 0, data)
    assert queue.batch_path(manifest).read_bytes() == expected

    # Not plain (a record may hold a newline), gzip, or a mapping: one buffer, as before.
    commit(queue, block(range(26, 30)))
    rows, _, _ = queue.read(EVERYTHING, EVERYTHING)
    assert isinstance(formats.encode_batch("ndjson", rows, None, "none"), bytes)
    assert isinstance(formats.encode_batch("ndjson", rows[:0], None, "gzip"), bytes)


def legacy_frame(item: Block) -> bytes:
    """A block framed as versions before the joined layout wrote it: b"B" and the
    Block's msgpack (its raws a list)."""
    return frame(b"B" + msgspec.msgpack.encode(item))


def joined_frame(item: Block) -> bytes:
    """A block framed as versions before packed heads wrote it: b"J", its columns a
    msgpack array of lists."""
    columns = msgspec.msgpack.encode(
        [item.types, item.ids, item.sessions, item.persons, item.times]
    )
    sizes = array("I", map(len, item.raws)).tobytes()
    head = msgspec.msgpack.encode([item.received, item.plain, sizes, msgspec.Raw(columns)])
    records = b"".join(raw + b"\n" for raw in item.raws)
    return frame(b"J" + struct.pack("<I", len(head)) + head + b"\n" + records)


@pytest.mark.parametrize("older_frame", [legacy_frame, joined_frame], ids=["B", "J"])
def test_blocks_of_older_layouts_are_read_and_cut_beside_new_ones(
    tmp_path: Path, older_frame: Callable[[Block], bytes]
) -> None:
    older = [block(range(10)), block(range(10, 30), pad=40), block(range(30, 31))]
    queue = older_queue(tmp_path, b"".join(map(older_frame, older)))
    assert queue.staged_records == 31
    assert [i for i, _ in queue.take_recovered()] == [f"id{n}" for n in range(31)]
    commit(queue, block(range(31, 40)), 40)
    rows, end, _ = cut(queue, limit_records=15)  # ends inside the second older block
    assert end[2] == 5
    expected = [
        b
        for item in [*older, block(range(31, 40))]
        for b in zip(*(getattr(item, c) for c in COLUMNS), strict=True)
    ]
    got = zip(*(getattr(rows, c) for c in COLUMNS), strict=True)
    assert list(got) == expected[:15] and rows.received == [RECEIVED] * 15
    assert rows.text() == b"".join(r + b"\n" for r in rows.raws)
    queue.close()

    again = open_queue(tmp_path)  # recovery goes on from the skip inside the older block
    assert again.staged_records == 26
    rest, _, _ = cut(again, limit_records=EVERYTHING)
    assert ns(rest) == list(range(15, 41))
    assert list(zip(*(getattr(rest, c) for c in COLUMNS), strict=True))[:25] == expected[15:]
    # A columnar file reads the older heads' columns as it reads packed ones.
    table = pq.read_table(io.BytesIO(formats.encode("parquet", rest, None, "zstd")))
    assert table.column("person").to_pylist() == rest.persons
    assert table.column("id").to_pylist() == [f"id{n}" for n in range(15, 41)]
    again.close()


# -- positions written before blocks -------------------------------------------------------


def old_queue(root: Path, records: int) -> Path:
    """A queue directory of per-record frames as an older version left it; its root."""
    return segment_of(root, b"".join(framed(n) for n in range(records)))


def segment_of(root: Path, frames: bytes) -> Path:
    """A queue directory whose one segment holds `frames`; its root."""
    queue = root / "queues" / "fh"
    (queue / "segments").mkdir(parents=True)
    (queue / "batches").mkdir()
    (queue / "segments" / "1.seg").write_bytes(frames)
    return queue


def older_queue(root: Path, frames: bytes) -> SegmentStore:
    """The queue of one segment of `frames` (an older version's), opened."""
    segment_of(root, frames)
    return open_queue(root)


def old_manifest(no: int, end: int) -> bytes:
    return msgspec.json.encode(
        {
            "no": no,
            "id": f"msg_{no}",
            "name": f"b{no}",
            "records": 3,
            "size": 3,
            "opened": 0.0,
            "cut": 0.0,
            "end": [1, end],
            "content_type": "x",
            "content_encoding": None,
            "keys": [],
            "base": f"b{no}",
            "suffix": 0,
        }
    )


def test_an_older_queue_with_two_element_positions_opens_and_cuts(tmp_path: Path) -> None:
    each = len(framed(0))
    root = old_queue(tmp_path, 10)
    state = {"cursor": [1, 3 * each], "next_batch": 2, "last_name": "b1", "name_suffix": 0}
    (root / "state.json").write_bytes(msgspec.json.encode(state))
    (root / "batches" / "1.done").write_bytes(old_manifest(1, 3 * each))
    (root / "batches" / "2.json").write_bytes(old_manifest(2, 6 * each))
    (root / "batches" / "2.data").write_bytes(b"abc")

    queue = open_queue(tmp_path)
    assert queue.state.cursor == (1, 6 * each, 0)
    assert [(b.no, b.end) for b in queue.batches] == [(2, (1, 6 * each, 0))]
    assert queue.staged_records == 4 and queue.state.next_batch == 3
    rows, _, _ = queue.read(EVERYTHING, EVERYTHING)
    assert ns(rows) == [6, 7, 8, 9]
    commit(queue, block(range(10, 15)))
    assert cut_all(queue, EVERYTHING, 3) == [[6, 7, 8], [9, 10, 11], [12, 13, 14]]
    written = msgspec.json.decode((root / "batches" / "4.json").read_bytes())
    assert written["end"] == [1, 10 * each, 2]  # new manifests hold three elements
    queue.close()

    again = open_queue(tmp_path)
    assert again.staged_records == 0 and again.state.next_batch == 6
    assert [b.no for b in again.batches] == [2, 3, 4, 5]


def test_an_older_state_json_alone_gives_the_cursor(tmp_path: Path) -> None:
    each = len(framed(0))
    root = old_queue(tmp_path, 6)
    state = {"cursor": [1, 2 * each], "next_batch": 4, "last_name": "b3", "name_suffix": 1}
    (root / "state.json").write_bytes(msgspec.json.encode(state))
    queue = open_queue(tmp_path)
    assert queue.state.cursor == (1, 2 * each, 0) and queue.staged_records == 4
    assert [i for i, _ in queue.take_recovered()] == ["id2", "id3", "id4", "id5"]
    commit(queue, block(range(6, 9)))
    assert cut_all(queue, EVERYTHING, 5) == [[2, 3, 4, 5, 6], [7, 8]]
    assert queue.batches[0].no == 4


# -- a stream batch cut with its group commit, after a cut that ended mid-block ----------


class RoundBatch:
    """A RoundCutter making a group commit's records (and any committed before them
    not yet cut) one stream batch."""

    def __init__(self, queue: SegmentStore) -> None:
        self.queue = queue
        self.made: tuple[Manifest, int] | None = None

    def cut_round(self, records: Rows, end: Position, frame_bytes: int) -> Manifest:
        manifest = self.queue.new_manifest(
            name=f"r{self.queue.state.next_batch}",
            records=len(records),
            size=len(records),
            opened=0.0,
            cut=0.0,
            end=end,
            content_type="x",
            data=msgspec.json.encode(ns(records)),
        )
        self.made = (manifest, frame_bytes)
        return manifest


def test_a_round_cut_takes_the_rest_of_a_block_a_cut_ended_inside(tmp_path: Path) -> None:
    queue = open_queue(tmp_path)
    commit(queue, block(range(5)))
    assert ns(cut(queue, limit_records=3)[0]) == [0, 1, 2]
    cursor = queue.state.cursor
    assert cursor == (1, 0, 3)
    cutter = RoundBatch(queue)
    queue.append(framed(block([5])), 1)
    pending = queue.take_pending()
    end = queue.write(pending, True, cutter)
    queue.settle(pending, end)
    assert cutter.made is not None
    held, frame_bytes = cutter.made
    queue.add_batch(held, 0, frame_bytes)
    assert held.data == b"[3,4,5]" and held.start == cursor
    assert frame_bytes == len(framed(block(range(5)))) + len(framed(block([5])))
    assert queue.staged_records == 0 and queue.staged_bytes == 0 and queue.uncut == 0
    queue.close()

    again = open_queue(tmp_path)
    assert [(b.no, b.id, b.data, b.start) for b in again.batches] == [
        (1, queue.batches[0].id, None, None),
        (2, held.id, b"[3,4,5]", cursor),
    ]
    assert again.staged_records == 0 and again.held == cursor
    commit(again, 6)
    assert ns(cut(again)[0]) == [6]


# -- through LocalQueue ------------------------------------------------------------------------

STREAM_OF_3 = CutRules(stream=True, max_records=3, max_bytes=1 << 20, interval=0.0)


def ndjson(records: Rows) -> Encoded:
    data = b"".join(r + b"\n" for r in records.raws)
    return Encoded(data, f"b-{records.ids[0]}", "p/", ".ndjson", "application/x-ndjson", None)


def batch_numbers(batch: Manifest) -> list[int]:
    assert batch.data is not None
    return [msgspec.json.decode(line)["n"] for line in batch.data.splitlines()]


SIZES = [1, 2, 5, 1, 3, 7, 2, 10, 1]  # records per request


async def open_local(root: Path) -> tuple[LocalBackend, LocalQueue, asyncio.Task[None]]:
    backend = LocalBackend(root, 1 << 16, "fsync")
    task = asyncio.create_task(backend.run())
    queue = await backend.open_queue("fh")
    queue.configure(STREAM_OF_3, ndjson)
    return backend, queue, task


async def stop_local(queue: LocalQueue, task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    queue.close()


async def test_a_stream_queue_cuts_blocks_into_batches_of_at_most_max_records(
    tmp_path: Path,
) -> None:
    _, queue, task = await open_local(tmp_path)
    first = 0
    for size in SIZES:
        await queue.append(frame_block(block(range(first, first + size))), size).wait()
        first += size
    got: list[list[int]] = []
    while (batch := await queue.next_batch(flush=True)) is not None:
        assert batch.records <= 3 and batch.records == len(batch_numbers(batch))
        got.append(batch_numbers(batch))
        await queue.done(batch)
    assert [n for numbers in got for n in numbers] == list(range(first))
    assert all(len(numbers) == 3 for numbers in got[:-1])
    assert queue.figures(0.0).records == 0 and queue.figures(0.0).bytes == 0
    await stop_local(queue, task)


async def test_a_stream_consumer_taking_batches_as_blocks_come_gets_each_record_once(
    tmp_path: Path,
) -> None:
    """Blocks commit while a consumer waits: some are cut by their group commit, others
    (too many records for one batch) by cuts that end inside them."""
    backend, queue, task = await open_local(tmp_path)
    total = sum(SIZES)
    got: list[list[int]] = []
    batches: list[Manifest] = []

    async def consume() -> None:
        while sum(map(len, got)) < total:
            batch = await queue.next_batch()
            assert batch is not None
            batches.append(batch)
            got.append(batch_numbers(batch))
            await queue.done(batch)

    consumer = asyncio.create_task(consume())
    first = 0
    for size in SIZES:
        await queue.append(frame_block(block(range(first, first + size))), size).wait()
        first += size
        await asyncio.sleep(0.01)
    await asyncio.wait_for(consumer, 10)
    assert all(1 <= len(numbers) <= 3 for numbers in got)
    assert [n for numbers in got for n in numbers] == list(range(total))
    assert any(b.start is not None for b in batches)  # cut by a group commit
    assert any(b.end[2] for b in batches)  # ended inside a block
    assert queue.figures(0.0).records == 0
    await backend.flush()  # the done mark of a batch cut with its group commit
    await stop_local(queue, task)

    _, queue, task = await open_local(tmp_path)  # nothing comes back after a restart
    assert await queue.next_batch(flush=True) is None
    await stop_local(queue, task)
