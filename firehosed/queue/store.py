"""The local backend's files for one firehose: append-only segments, a cursor, and cut
batches (`LocalQueue` in local.py decides when to cut; this module keeps them on disk).

Layout under `storage.dir/queues/<firehose>/`:

    segments/<n>.seg      framed records (see frames.py), and marks; appended by group
                          commit
    batches/<n>.data      a cut batch's file bytes, exactly as delivered
    batches/<n>.json      its manifest (name, id, records, source end); written last.
                          A stream batch (webhook, queues) has no .data: its few bytes
                          are inside its manifest, so fixing it costs one file and one
                          journal commit instead of three, on its latency path
    batches/<n>.done      the manifest of the newest delivered batch (a tombstone)
    state.json            cursor (first record not yet in a batch) and naming state

A stream that keeps up has no batch files at all: the group commit that makes a
request's records durable also cuts them into a batch, and writes its manifest (bytes
included) as a *cut mark* in the segment right after them, under the same sync. Such a
batch is *held* in its segment; once delivered, a *done mark* goes with the next group
commit. A held batch gets a .json file only when a cut's manifest would move the cursor
on disk past it (`fix_held`).

The cursor and naming state are the newest of state.json, the manifests and the
tombstone: state.json is written only when a batch leaves without a tombstone
(dead-lettered) or comes back (replay), and its cursor never passes a held batch.
Recovery reads the segments from that cursor on: a cut mark closes the records before
it into its batch, a done mark ends the batches up to its number.

Invariants: a record is acknowledged only after its segment bytes are synced (in
`fsync` durability); a batch's .data is synced before its manifest is renamed into
place (a stream batch's manifest is written in place and synced: only the newest
manifest can be torn, and recovery discards it, its records not yet delivered; a cut
mark is synced with its records, and a torn one leaves them staged), and the cursor
moves past its records only after that; a segment is deleted only when the cursor is
past its end and it holds no held batch; a new file or directory is used only once the
directory holding its name is synced (fileio.py). Recovery therefore never loses a record and
never re-batches one that a manifest already holds.
"""

from __future__ import annotations

import mmap
import os
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from io import FileIO
from itertools import repeat
from pathlib import Path
from typing import Protocol

import msgspec
import structlog

from firehosed import metrics
from firehosed.faults import crash_point, fail_point
from firehosed.fileio import Data, fsync_dir, make_dirs, write_chunks, write_durably, write_synced
from firehosed.queue.base import Manifest, Naming, Position, position, unique_name
from firehosed.queue.frames import HEADER, Framed, Unsealed, frame, scan
from firehosed.record import BLOCKS, Joined, Rows, decoder

log = structlog.get_logger(__name__)

# A segment frame whose payload starts with one of these is a mark, not a record (a
# record's msgpack array never starts with a bare small integer): a stream batch cut
# with the group commit that made its records durable, or such a batch delivered.
# Records recovered at open that were received this close (seconds) to the newest one
# are handed to dedupe (`recovered_ids`): a client's or an import's retry of a request
# whose answer a crash cut off is then a duplicate, not a second copy.
RECOVERED_WINDOW = 10.0
RECOVERED_MAX = 1_000_000  # at most this many (a full dedupe's count)
CUT_MARK = 0x43  # b"C" + the batch's msgpack Manifest
DONE_MARK = 0x44  # b"D" + the batch's msgpack number


class RoundCutter(Protocol):
    """Cuts a stream batch in a group commit: that commit's records, and any committed
    before them not yet in a batch."""

    def cut_round(self, records: Rows, end: Position, frame_bytes: int) -> Manifest:
        """The batch of `records`, which end at `end` (commit thread)."""


class State(msgspec.Struct, kw_only=True):
    """What `state.json` holds."""

    cursor: Position = (0, 0, 0)
    next_batch: int = 1
    last_name: str = ""
    name_suffix: int = 0
    last_named: float = 0.0

    def __post_init__(self) -> None:
        self.cursor = position(self.cursor)


@dataclass(slots=True)
class Pending:
    """Frames appended since the last group commit, in order: small ones (single
    records, marks) joined in bytearrays of their own, blocks as they came."""

    chunks: list[bytearray | Unsealed] = field(default_factory=list)
    size: int = 0  # bytes in `chunks`
    records: int = 0
    framed: int = 0  # the records' bytes (the rest is marks)

    def add(self, framed: Framed) -> None:
        chunks = self.chunks
        if isinstance(framed, Unsealed):
            chunks.append(framed)
        elif chunks and isinstance(chunks[-1], bytearray):
            chunks[-1] += framed
        else:
            chunks.append(bytearray(framed))
        self.size += len(framed)

    def sealed(self) -> list[bytes | bytearray]:
        """The chunks to write, every block's header in place (committer thread)."""
        return [c.sealed() if isinstance(c, Unsealed) else c for c in self.chunks]


class SegmentStore:
    """One firehose's records and batches on disk, and their accounting (the local
    backend's `LocalQueue` is its only user)."""

    def __init__(self, root: Path, firehose: str, segment_size: int, sync: bool) -> None:
        self.firehose = firehose
        self.root = root
        self.segment_size = segment_size
        self.sync = sync
        self.segments_dir = root / "segments"
        self.batches_dir = root / "batches"
        self.state = State()
        self._saved = self.state  # what state.json holds
        self._state_lock = threading.Lock()
        self._segments_lock = threading.Lock()  # a cut and a delivery may both free some
        # The number of the newest delivered batch's tombstone (`N.done`), if any.
        self._newest_tombstone: int | None = None
        self.segments: list[int] = []
        self.pending = Pending()
        self.committed: Position = (0, 0, 0)
        self.staged_records = 0
        self.staged_bytes = 0
        # Committed records not yet in a batch: what a cut can take now.
        self.uncut = 0
        self.staged_since: float | None = None
        self.batches: deque[Manifest] = deque()
        self.batch_bytes = 0  # sum of the sizes of `batches` (read per request)
        self.disk_bytes = 0
        # Good ends of segments abandoned after a failed write or sync (bytes past are junk).
        self.sealed: dict[int, int] = {}
        # Where the oldest batch held in a segment starts: segments from there on are
        # kept, and state.json's cursor never passes it (recovery reads its mark).
        self.held: Position | None = None
        # (id, received) of the undelivered records found at open in the last two
        # segments, newest last; handed once to dedupe (`take_recovered`).
        self.recovered: deque[tuple[str, float]] = deque(maxlen=RECOVERED_MAX)
        self._fd: int | None = None

    # -- recovery -------------------------------------------------------------------

    def open(self) -> None:
        """Create or recover the queue from disk (blocking: run in a thread)."""
        for d in (self.segments_dir, self.batches_dir):
            make_dirs(d, self.sync)
        state_path = self.root / "state.json"
        if state_path.exists():
            self.state = msgspec.json.decode(state_path.read_bytes(), type=State)
        self._saved = self.state
        self._recover_batches()
        self.segments = sorted(int(p.stem) for p in self.segments_dir.glob("*.seg"))
        self._recover_segments()
        self._open_segment(self.segments[-1] if self.segments else 1)
        self.disk_bytes -= self._delete_consumed_segments()
        self.uncut = self.staged_records

    def _recover_batches(self) -> None:
        for tmp in self.batches_dir.glob("*.tmp"):
            tmp.unlink()
        manifests = sorted(self.batches_dir.glob("*.json"), key=lambda p: int(p.stem))
        kept = {p.stem for p in manifests}
        for data in self.batches_dir.glob("*.data"):
            if data.stem not in kept:  # cut interrupted before its manifest, or delivered
                data.unlink()
        tombstones = sorted(self.batches_dir.glob("*.done"), key=lambda p: int(p.stem))
        for old in tombstones[:-1]:  # the newest carries the state of all of them
            old.unlink()
        if tombstones:
            self._take_state(msgspec.json.decode(tombstones[-1].read_bytes(), type=Manifest))
            self._newest_tombstone = int(tombstones[-1].stem)
        for path in manifests:
            try:
                manifest = msgspec.json.decode(path.read_bytes(), type=Manifest)
            except msgspec.DecodeError:
                if path != manifests[-1]:
                    raise
                # A stream batch's manifest is written in place: cut short by a crash
                # before its sync, it was never attempted; its records are cut again.
                log.warning("queue.torn_batch", firehose=self.firehose, batch=path.name)
                path.unlink()
                continue
            self.batches.append(manifest)
            self.batch_bytes += manifest.size
            self.disk_bytes += manifest.size
            self._take_state(manifest)

    def _take_state(self, manifest: Manifest) -> None:
        """The cursor and naming state after `manifest`, if newer than what we have."""
        if manifest.no >= self.state.next_batch:  # newer than state.json
            self.state = State(
                cursor=max(self.state.cursor, manifest.end),
                next_batch=manifest.no + 1,
                last_name=manifest.base,
                name_suffix=manifest.suffix,
                last_named=manifest.named,
            )

    def _recover_segments(self) -> None:
        """Verify every frame past the cursor; truncate a torn tail, quarantine corruption.

        Marks past the cursor give back the batches held in segments: a cut mark closes
        the records since the last one into its batch, a done mark says the batches up to
        its number have left.
        """
        found = _Found({b.no for b in self.batches}, self._newest_tombstone or 0, self.state.cursor)
        for number in self.segments:
            path = self.segments_dir / f"{number}.seg"
            if number < self.state.cursor[0]:
                self.disk_bytes += path.stat().st_size
                continue
            data = path.read_bytes()
            start, skip = self.state.cursor[1:] if number == self.state.cursor[0] else (0, 0)
            dropped: list[tuple[int, int]] = []  # torn or corrupt spans, cut out below
            removed = 0  # their bytes so far: a position in the file as rewritten
            bad = 0
            recent = number >= self.segments[-1] - 1  # older segments: older records
            for span in scan(data, start):
                payload = span.payload
                if payload is None:
                    dropped.append((span.start, span.end))
                    removed += span.end - span.start
                    if span.end == len(data) and number == self.segments[-1]:
                        log.warning(
                            "queue.torn_tail", firehose=self.firehose, bytes=span.end - span.start
                        )
                    else:
                        bad += 1
                        self._quarantine(number, data[span.start : span.end])
                elif payload[0] in _MARKS:
                    if payload[0] == CUT_MARK:
                        self._recover_cut(found, payload, (number, span.start - removed, 0))
                    found.passed(payload, (number, span.end - removed, 0))
                else:
                    self._count_staged(payload, recent, skip if span.start == start else 0)
            size = len(data) - removed
            if dropped:
                write_durably(path, _without(data, dropped), self.sync)
            if bad:
                metrics.records_quarantined.labels(self.firehose).inc(bad)
            self.disk_bytes += size
            self.committed = (number, size, 0)
        for manifest in found.held:  # (their bytes on disk are the segments')
            self.batches.append(manifest)
            self.batch_bytes += manifest.size
        self.hold()

    def take_recovered(self) -> list[tuple[str, float]]:
        """The recovered records' (id, received) for dedupe, once: those received
        within RECOVERED_WINDOW of the newest."""
        recovered, self.recovered = self.recovered, deque(maxlen=RECOVERED_MAX)
        newest = max((received for _, received in recovered), default=0.0)
        return [r for r in recovered if r[1] >= newest - RECOVERED_WINDOW]

    def _recover_cut(self, found: _Found, payload: memoryview, at: Position) -> None:
        """A cut mark at `at`: every record before it is in a batch (a group commit's
        cut takes all the committed records not yet cut, see `_cut_round`)."""
        manifest = msgspec.msgpack.decode(payload[1:], type=Manifest)
        self.staged_records = self.staged_bytes = 0
        self.staged_since = None
        state = self.state
        if manifest.no >= state.next_batch:
            state = State(
                next_batch=manifest.no + 1,
                last_name=manifest.base,
                name_suffix=manifest.suffix,
                last_named=manifest.named,
            )
        # past the mark (`at` is where it starts): the records before it are its batch's
        self.state = msgspec.structs.replace(
            state, cursor=(at[0], at[1] + HEADER.size + len(payload), 0)
        )
        found.cut(manifest, at)

    def _count_staged(self, payload: memoryview, recent: bool, skip: int) -> None:
        """Records past the cursor (undelivered; a block's after its first `skip`):
        counted; noted for dedupe if `recent`."""
        self.staged_bytes += HEADER.size + len(payload)
        if payload[0] in BLOCKS:
            block = Joined.read(payload, data=False)
            ids, received = block.column("ids")[skip:], block.received
        elif recent or self.staged_records == 0:
            record = decoder.decode(payload)
            ids, received = [record.id], record.received
        else:  # an older single record: only counted (recovery reads whole queues)
            self.staged_records += 1
            return
        if recent:
            self.recovered.extend(zip(ids, repeat(received)))
        if self.staged_records == 0 and ids:
            self.staged_since = received
        self.staged_records += len(ids)

    def _quarantine(self, segment: int, data: bytes) -> None:
        target = self.root.parent.parent / "quarantine" / self.firehose
        make_dirs(target, self.sync)
        path = target / f"{segment}-{time.time_ns()}.bin"
        write_durably(path, data, self.sync)
        log.error(
            "queue.corrupt_record", firehose=self.firehose, segment=segment, saved_to=str(path)
        )

    # -- appending (event loop) and group commit (committer thread) ---------------

    def append(self, framed: Framed, records: int) -> bool:
        """Stage `records` framed records (durable after the next group commit).

        True when this made the queue dirty, i.e. the committer must be told.
        """
        pending = self.pending
        pending.add(framed)
        pending.framed += len(framed)
        if self.staged_records == 0:
            self.staged_since = time.time()
        dirty = pending.records == 0
        pending.records += records
        self.staged_records += records
        self.staged_bytes += len(framed)
        return dirty

    def take_pending(self) -> Pending:
        """Hand the pending bytes to the committer (event loop side)."""
        pending, self.pending = self.pending, Pending()
        return pending

    def write(self, pending: Pending, sync: bool, cutter: RoundCutter | None = None) -> Position:
        """Append `pending` to the current segment and sync it; return its end (thread).

        With `cutter`, the records also become a stream batch, whose manifest is written
        as a mark right after them and synced with them: the cut costs no sync of its own.
        Only the committer calls this, one call at a time.
        """
        assert self._fd is not None
        number = self.segments[-1]
        before = os.lseek(self._fd, 0, os.SEEK_END)
        manifest = None
        if cutter is not None:
            manifest = self._cut_round(cutter, pending, (number, before + pending.size, 0))
        if manifest is not None:
            pending.add(frame(bytes([CUT_MARK]) + msgspec.msgpack.encode(manifest)))
        try:
            fail_point("queue.commit_bug")
            write_chunks(self._fd, pending.sealed())
            if sync:
                fail_point("queue.fsync")
                os.fdatasync(self._fd)
        except Exception:  # the disk (OSError) or a bug: nothing more goes to this file
            self._abandon_segment(number, before)
            raise
        end = before + pending.size
        if manifest is not None:
            self.state = msgspec.structs.replace(
                self.state, cursor=(number, end, 0), next_batch=manifest.no + 1
            )
        if end >= self.segment_size:
            try:
                self._open_segment(number + 1)
            except OSError as exc:  # the records are durable: go on in this segment
                log.error("queue.rotate_failed", firehose=self.firehose, error=str(exc))
        return (number, end, 0)

    def _cut_round(self, cutter: RoundCutter, pending: Pending, end: Position) -> Manifest | None:
        """The batch of the committed records not yet cut, if any, and `pending`'s."""
        records, frame_bytes = _records(pending.chunks)
        if self.uncut:  # a stream catching up after a cut or a pause
            earlier, _, framed = self.read(1 << 62, 1 << 62)
            earlier.extend(records)
            records, frame_bytes = earlier, framed + frame_bytes
        try:
            manifest = cutter.cut_round(records, end, frame_bytes)
        except Exception:  # a bug must not stop the group commit: the records wait for a cut
            log.exception("queue.round_cut_failed", firehose=self.firehose)
            return None
        manifest.start = self.state.cursor
        return manifest

    def mark_done(self, manifest: Manifest) -> None:
        """Record that a batch held in a segment left the queue, with the next group
        commit (event loop). Until then a crash sends it again, under the same id."""
        self.pending.add(frame(bytes([DONE_MARK]) + msgspec.msgpack.encode(manifest.no)))

    def settle(self, pending: Pending, end: Position | None) -> None:
        """Account for a group commit's `pending` bytes (event loop side): written and
        synced up to `end`, or failed (None: forgotten, their requests answered 503)."""
        if end is None:
            self.staged_records -= pending.records
            self.staged_bytes -= pending.framed
            return
        self.committed = end
        self.uncut += pending.records
        self.disk_bytes += pending.size

    def _abandon_segment(self, number: int, size: int) -> None:
        """After a failed write or sync, cut the segment back and move to a new one.

        After a failed fsync the page cache can no longer be trusted for that file, so
        nothing is appended to it again; reads stop at `size` (the last good end).
        """
        assert self._fd is not None
        self.sealed[number] = size
        try:
            os.ftruncate(self._fd, size)
        except OSError:
            log.exception("queue.truncate_failed", firehose=self.firehose)
        try:
            self._open_segment(number + 1)
        except OSError:  # no room even for a new file: keep the truncated one
            log.exception("queue.rotate_failed", firehose=self.firehose)
            self.sealed.pop(number)

    def _open_segment(self, number: int) -> None:
        """Make segment `number` the one appended to, once its name is durable (the old
        fd closes only on success: a record is never appended to a file that a power cut
        could take back)."""
        path = self.segments_dir / f"{number}.seg"
        created = not path.exists()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        if created and self.sync:
            try:
                fail_point("queue.rotate")
                fsync_dir(self.segments_dir)
            except OSError:
                os.close(fd)
                path.unlink(missing_ok=True)
                raise
        if self._fd is not None:
            os.close(self._fd)
        self._fd = fd
        if created:
            self.segments.append(number)

    # -- cutting batches (worker) -------------------------------------------------

    def read(self, limit_bytes: int, limit_records: int) -> tuple[Rows, Position, int]:
        """Committed records from the cursor, up to the limits: records, end, frame bytes
        (of the frames read to their end: a block cut part-way is counted by the cut
        that takes its last record).

        Runs in a thread; reads only what the committer has made durable.
        """
        batch = _Reading(limit_bytes, limit_records)
        at: Position = self.state.cursor
        end = self.committed
        for number in list(self.segments):
            if number < at[0] or (number, 0, 0) > end:
                continue
            start, skip = at[1:] if number == at[0] else (0, 0)
            stop = end[1] if number == end[0] else self.sealed.get(number)
            with open(self.segments_dir / f"{number}.seg", "rb", buffering=0) as f:
                offset, skip = batch.take(f, start, skip, stop)
            at = (number, offset, skip)
            if batch.full():
                break
        return batch.records, at, batch.framed

    def persist_batch(self, manifest: Manifest, data: Data) -> int:
        """Write a cut batch durably and move the cursor past it; return bytes freed (thread).

        A file batch: three syncs (data, manifest, directory). A stream batch (its bytes
        in `manifest.data`): its manifest alone, written in place, one file sync and a
        directory sync, which the file system mostly commits as one. state.json is not
        written here: the manifest, and the tombstone it becomes once delivered, carry
        the cursor and naming state for recovery.
        """
        manifest_path = self.batches_dir / f"{manifest.no}.json"
        if manifest.data is not None:
            write_synced(manifest_path, msgspec.json.encode(manifest), self.sync)
            if self.sync:
                fsync_dir(self.batches_dir)
        else:
            write_synced(self.batch_path(manifest), data, self.sync)
            write_durably(manifest_path, msgspec.json.encode(manifest), self.sync)
        self.state = msgspec.structs.replace(
            self.state, cursor=manifest.end, next_batch=manifest.no + 1
        )
        return self.delete_consumed_segments()

    def _save_state(self) -> None:
        """Persist state.json if it lags the in-memory state (before a manifest goes
        without a tombstone).

        May run while a cut (another thread) moves the state on: read it once, so what
        is written is what is recorded as saved; and one writer of state.json at a time
        (a removal runs beside a dead-lettering or a replay).
        """
        with self._state_lock:
            state = self.state
            if state != self._saved:
                self._write_state(state)

    def _write_state(self, state: State) -> None:
        written = state
        if self.held is not None and self.held < state.cursor:
            # Recovery finds a batch held in a segment by reading on from the cursor.
            written = msgspec.structs.replace(state, cursor=self.held)
        write_durably(self.root / "state.json", msgspec.json.encode(written), self.sync)
        self._saved = state

    def fix_held(self) -> list[Manifest]:
        """Give every batch held in a segment a manifest file of its own (thread), before
        a cut's manifest moves the cursor on disk past it; the batches, for `fixed`.
        """
        held = [b for b in list(self.batches) if b.start is not None]
        for manifest in held:
            fixed = msgspec.structs.replace(manifest, start=None)
            write_synced(
                self.batches_dir / f"{manifest.no}.json", msgspec.json.encode(fixed), self.sync
            )
        if held and self.sync:
            fsync_dir(self.batches_dir)
        return held

    def add_batch(self, manifest: Manifest, freed: int, frame_bytes: int) -> None:
        """Account for a persisted batch (event loop side)."""
        self.batches.append(manifest)
        self.batch_bytes += manifest.size
        # (a batch held in a segment: its bytes on disk are the segment's, counted there)
        self.disk_bytes += (manifest.size if manifest.start is None else 0) - freed
        self.staged_records -= manifest.records
        self.uncut -= manifest.records
        self.staged_bytes -= frame_bytes
        self.staged_since = time.time() if self.staged_records > 0 else None
        if self.held is None:
            self.held = manifest.start

    def consumed_segments(self) -> bool:
        """Whether a segment can go (event loop side): one wholly behind the cursor,
        holding no held batch. A cut frees them; a stream whose group commits cut its
        batches frees them as it delivers."""
        first, limit = self.segments[0], self.state.cursor[0]
        if self.held is not None:
            limit = min(limit, self.held[0])
        return len(self.segments) > 1 and first < limit

    def delete_consumed_segments(self) -> int:
        """Delete segments wholly behind the cursor and before any held batch (thread);
        the bytes freed."""
        with self._segments_lock:
            return self._delete_consumed_segments()

    def _delete_consumed_segments(self) -> int:
        """Delete segments wholly behind the cursor (never the one being written)."""
        freed = 0
        while len(self.segments) > 1 and (self.held is None or self.segments[0] < self.held[0]):
            path = self.segments_dir / f"{self.segments[0]}.seg"
            size = path.stat().st_size
            if (self.segments[0], size, 0) > self.state.cursor:
                break
            freed += size
            path.unlink()
            crash_point("queue.mid_segment_delete")
            self.segments.pop(0)
        return freed

    def batch_path(self, manifest: Manifest) -> Path:
        """The local file holding a batch's bytes (for a stream batch, once `write_data`
        has put them there)."""
        return self.batches_dir / f"{manifest.no}.data"

    def write_data(self, manifest: Manifest, path: Path | None = None) -> None:
        """Write a stream batch's bytes out to a file, atomically (thread): for a channel
        that reads files (the firehose's channel changed) or the dead-letter store. A
        file that exists holds the whole batch."""
        assert manifest.data is not None
        write_durably(path or self.batch_path(manifest), manifest.data, self.sync)

    def unique_name(self, base: str, opened: float) -> str:
        """The unique part of the next batch's name (see `base.unique_name`); the state
        keeps the naming after it."""
        state = self.state
        last = Naming(state.last_name, state.name_suffix, state.last_named)
        unique, after = unique_name(base, opened, last)
        state.last_name, state.name_suffix, state.last_named = after.base, after.suffix, after.named
        return unique

    def new_manifest(self, **fields: object) -> Manifest:
        """A manifest numbered after the last one, with a fresh stable id."""
        return Manifest(no=self.state.next_batch, id=f"msg_{uuid.uuid4().hex}", **fields)  # type: ignore[arg-type]

    # -- delivery (worker) --------------------------------------------------------

    def remove_batch(self, manifest: Manifest) -> None:
        """Forget a delivered batch (thread): its manifest becomes the tombstone `N.done`.

        One rename and one directory sync. The tombstone carries the cursor and naming
        state as the manifest did, so state.json need not be written first; the data
        and older tombstones go after the sync (recovery removes any left over).
        """
        os.replace(self.batches_dir / f"{manifest.no}.json", self._tombstone(manifest.no))
        if self.sync:
            fsync_dir(self.batches_dir)
        self.batch_path(manifest).unlink(missing_ok=True)
        if self._newest_tombstone is not None and self._newest_tombstone < manifest.no:
            self._tombstone(self._newest_tombstone).unlink(missing_ok=True)
        self._newest_tombstone = manifest.no

    def _tombstone(self, number: int) -> Path:
        return self.batches_dir / f"{number}.done"

    def move_batch(self, manifest: Manifest, target: Path) -> None:
        """Move a batch's files to `target` (the dead-letter store) durably (thread).

        There a batch is always a .data file and its manifest: a stream batch's bytes
        are written out first (a crash in between leaves it in both places: sent twice
        at most, never lost).
        """
        self._save_state()
        make_dirs(target, self.sync)
        if manifest.data is not None:
            self.write_data(manifest, target / f"{manifest.no}.data")
            bare = msgspec.structs.replace(manifest, data=None, start=None)
            write_durably(target / f"{manifest.no}.json", msgspec.json.encode(bare), self.sync)
            # (a batch held in a segment has no manifest file: the worker marks it done)
            (self.batches_dir / f"{manifest.no}.json").unlink(missing_ok=True)
        else:
            os.replace(self.batch_path(manifest), target / f"{manifest.no}.data")
            os.replace(self.batches_dir / f"{manifest.no}.json", target / f"{manifest.no}.json")
        if self.sync:
            fsync_dir(target)
            fsync_dir(self.batches_dir)

    def adopt(self, source: Path) -> Manifest:
        """Take a dead-lettered batch (manifest at `source`) back as the newest batch (thread).

        Crash-safe order: link the data in, write the new manifest, then remove the dead
        copy. A crash in between leaves the batch in the dead store (the orphan link is
        removed at recovery) or in both places (a second replay rewrites the same file).
        """
        old = msgspec.json.decode(source.read_bytes(), type=Manifest)
        # It carries today's naming state, not its own: recovery must not roll names back.
        new = msgspec.structs.replace(
            old,
            no=self.state.next_batch,
            cut=time.time(),
            base=self.state.last_name,
            suffix=self.state.name_suffix,
            named=self.state.last_named,
        )
        data = self.batch_path(new)
        data.unlink(missing_ok=True)
        os.link(source.with_suffix(".data"), data)
        write_durably(self.batches_dir / f"{new.no}.json", msgspec.json.encode(new), self.sync)
        with self._state_lock:
            self.state = msgspec.structs.replace(self.state, next_batch=new.no + 1)
            self._write_state(self.state)
        source.with_suffix(".data").unlink()
        source.unlink()
        return new

    def add_adopted(self, manifest: Manifest) -> None:
        """Account for a batch taken back from the dead-letter store (event loop side)."""
        self.batches.append(manifest)
        self.batch_bytes += manifest.size
        self.disk_bytes += manifest.size

    def drop_batch(self, manifest: Manifest) -> None:
        """Account for a batch delivered or dead-lettered (event loop side)."""
        self.batches.remove(manifest)
        self.batch_bytes -= manifest.size
        if manifest.start is None:
            self.disk_bytes -= manifest.size
        else:
            self.hold()

    def fixed(self, manifests: list[Manifest]) -> None:
        """Account for batches that `fix_held` gave files (event loop side)."""
        for manifest in manifests:
            manifest.start = None
            self.disk_bytes += manifest.size
        self.hold()

    def hold(self) -> None:
        """Recompute `held` from the batches (event loop side)."""
        self.held = next((b.start for b in self.batches if b.start is not None), None)

    def close(self) -> None:
        """Close the open segment file."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    # -- figures -------------------------------------------------------------------

    def queued_records(self) -> int:
        """Records not yet delivered: staged plus in cut batches."""
        return self.staged_records + sum(b.records for b in self.batches)

    def queued_bytes(self) -> int:
        """Bytes not yet delivered: staged frames plus cut batch files."""
        return self.staged_bytes + self.batch_bytes

    def oldest_age(self, now: float) -> float:
        """Seconds since the oldest undelivered record was staged (0 when empty)."""
        if self.batches:
            return max(0.0, now - self.batches[0].opened)
        return max(0.0, now - self.staged_since) if self.staged_since else 0.0


_MARKS = (CUT_MARK, DONE_MARK)


class _Found:
    """What recovery has read of the batches held in segments so far."""

    def __init__(self, files: set[int], gone: int, start: Position) -> None:
        self.files = files  # numbers of batches with a manifest file (these stand)
        self.gone = gone  # every batch numbered up to this has left the queue
        self.boundary = start  # where the records of the next held batch begin
        self.held: list[Manifest] = []

    def cut(self, manifest: Manifest, at: Position) -> None:
        if manifest.no not in self.files and manifest.no > self.gone:
            manifest.start, manifest.end = self.boundary, at
            self.held.append(manifest)

    def passed(self, payload: memoryview, after: Position) -> None:
        """After any mark: the boundary moves past it; a done mark ends batches."""
        self.boundary = after
        if payload[0] == DONE_MARK:
            self.gone = max(self.gone, msgspec.msgpack.decode(payload[1:], type=int))
            self.held = [b for b in self.held if b.no > self.gone]


def _without(data: bytes, spans: list[tuple[int, int]]) -> bytes:
    """`data` with the (ordered, disjoint) `spans` cut out."""
    kept, at = [], 0
    for start, end in spans:
        kept.append(data[at:start])
        at = end
    kept.append(data[at:])
    return b"".join(kept)


def _records(chunks: list[bytearray | Unsealed]) -> tuple[Rows, int]:
    """The records of a group commit's frames (marks skipped), and their framed size."""
    records, framed = Rows(), 0
    for chunk in chunks:
        if isinstance(chunk, Unsealed):
            with chunk.payload() as view:
                block = Joined.read(view)
            records.add_block(block, 0, len(block))
            framed += len(chunk)
            continue
        for start, end, payload in scan(chunk):
            if payload is None or payload[0] in _MARKS:
                continue
            if payload[0] in BLOCKS:
                block = Joined.read(payload)
                records.add_block(block, 0, len(block))
            else:
                records.append(decoder.decode(payload))
            framed += end - start
    return records, framed


class _Reading:
    """Records read for one cut, up to its limits, a segment at a time.

    A segment is mapped, not read: its pages are the page cache's, touched only as far
    as the cut goes, and a block's records are taken from the mapping without a copy
    (the mapping lives as long as rows that hold them). A block is taken part-way when a
    limit falls inside it: the cut then ends at that block with the number of its
    records taken (the next cut's `skip`).
    """

    def __init__(self, limit_bytes: int, limit_records: int) -> None:
        self.limit_bytes, self.limit_records = limit_bytes, limit_records
        self.records = Rows()
        self.size = self.framed = 0

    def full(self) -> bool:
        return self.size >= self.limit_bytes or len(self.records) >= self.limit_records

    def take(self, f: FileIO, offset: int, skip: int, stop: int | None) -> tuple[int, int]:
        """Read frames from `offset` (past `skip` records of the block there) until the
        limits, `stop` or the end; the (offset, skip) reached. Bytes past the last
        intact frame before the end (a torn tail, quarantined at recovery) are passed."""
        size = os.fstat(f.fileno()).st_size
        size = size if stop is None else min(stop, size)
        if size <= offset or self.full():
            return offset, skip
        mapped = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ)
        data = memoryview(mapped)
        records, decode = self.records, decoder.decode  # per record: keep lookups out
        for start, end, payload in scan(data, offset):
            offset = end
            if payload is None or payload[0] in _MARKS:
                continue  # corrupt bytes (quarantined at recovery), or a mark
            if payload[0] in BLOCKS:
                taken = self._block(Joined.read(payload), skip)
                if taken:
                    return start, taken  # the limits fell inside the block there
                skip = 0
            else:
                record = decode(payload)
                records.append(record)
                self.size += len(record.raw)
            self.framed += end - start
            if self.full():
                break
        return offset, skip

    def _block(self, block: Joined, skip: int) -> int:
        """Take `block`'s records from `skip` on, up to the limits: 0 when all were
        taken, else how many of the block's records are now in this or earlier cuts."""
        count = len(block)
        stop = min(count, skip + self.limit_records - len(self.records))
        room = self.limit_bytes - self.size
        if block.size(skip, stop) >= room:  # the record that reaches the limit is the last
            stop = skip + block.fitting(skip, room)
        self.records.add_block(block, skip, stop)
        self.size += block.size(skip, stop)
        return 0 if stop == count else stop
