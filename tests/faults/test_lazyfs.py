"""The power-loss file system itself: what survives a cut, and that fsync, fdatasync and a
directory's fsync really reach it (a sync that never arrived would lose everything)."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from firehosed.fileio import fsync_path
from tests.faults.lazymount import LazyMount, require_fuse


def mounted(tmp_path: Path, names: str) -> Iterator[LazyMount]:
    require_fuse()
    fs = LazyMount(tmp_path / "mnt", tmp_path / "backing", tmp_path / "lazyfs.log", names)
    try:
        yield fs.start()
    finally:
        fs.close()


@pytest.fixture
def lazy(tmp_path: Path) -> Iterator[LazyMount]:
    yield from mounted(tmp_path, "lazy")


@pytest.fixture
def eager(tmp_path: Path) -> Iterator[LazyMount]:
    yield from mounted(tmp_path, "eager")


def power_cycle(fs: LazyMount) -> Path:
    fs.cut()
    fs.start()
    return fs.mount


def write(path: Path, data: bytes, sync: str | None = "fsync") -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        if sync == "fsync":
            os.fsync(fd)
        elif sync == "fdatasync":
            os.fdatasync(fd)
    finally:
        os.close(fd)


@pytest.mark.parametrize("sync", ["fsync", "fdatasync"])
def test_a_synced_write_survives(lazy: LazyMount, sync: str) -> None:
    write(lazy.mount / "f", b"durable", sync)
    fsync_path(lazy.mount)
    mount = power_cycle(lazy)
    assert (mount / "f").read_bytes() == b"durable"


def test_a_write_without_fsync_is_lost(lazy: LazyMount) -> None:
    write(lazy.mount / "f", b"first")
    fsync_path(lazy.mount)
    with open(lazy.mount / "f", "ab") as f:
        f.write(b" and more")
    assert (lazy.mount / "f").read_bytes() == b"first and more"  # read your writes
    mount = power_cycle(lazy)
    assert (mount / "f").read_bytes() == b"first"


def test_a_new_file_whose_directory_was_not_synced_disappears(lazy: LazyMount) -> None:
    write(lazy.mount / "f", b"synced content, unsynced name")
    mount = power_cycle(lazy)
    assert not (mount / "f").exists()


def test_a_rename_not_followed_by_a_directory_fsync_reverts(lazy: LazyMount) -> None:
    write(lazy.mount / "state", b"old")
    write(lazy.mount / "state.tmp", b"new")
    fsync_path(lazy.mount)
    os.replace(lazy.mount / "state.tmp", lazy.mount / "state")
    assert (lazy.mount / "state").read_bytes() == b"new"
    mount = power_cycle(lazy)
    assert (mount / "state").read_bytes() == b"old"
    assert (mount / "state.tmp").read_bytes() == b"new"


def test_a_rename_does_not_sync_the_content(lazy: LazyMount) -> None:
    """The pessimistic choice: write tmp, rename, fsync dir, without fsync tmp: empty."""
    write(lazy.mount / "state", b"old")
    write(lazy.mount / "state.tmp", b"new", sync=None)
    os.replace(lazy.mount / "state.tmp", lazy.mount / "state")
    fsync_path(lazy.mount)
    mount = power_cycle(lazy)
    assert (mount / "state").read_bytes() == b""
    assert not (mount / "state.tmp").exists()


def test_a_new_directory_needs_its_parent_synced(lazy: LazyMount) -> None:
    (lazy.mount / "d").mkdir()
    write(lazy.mount / "d" / "f", b"x")
    fsync_path(lazy.mount / "d")
    mount = power_cycle(lazy)
    assert not (mount / "d").exists()
    (mount / "d").mkdir()
    write(mount / "d" / "f", b"x")
    fsync_path(mount / "d")
    fsync_path(mount)
    mount = power_cycle(lazy)
    assert (mount / "d" / "f").read_bytes() == b"x"


def test_an_unlink_not_synced_comes_back_and_a_hard_link_shares_content(
    lazy: LazyMount,
) -> None:
    write(lazy.mount / "a", b"one")
    os.link(lazy.mount / "a", lazy.mount / "b")
    fsync_path(lazy.mount)
    (lazy.mount / "a").unlink()
    with open(lazy.mount / "b", "r+b") as f:
        f.write(b"two")
        f.flush()
        os.fsync(f.fileno())
    mount = power_cycle(lazy)
    assert (mount / "a").read_bytes() == (mount / "b").read_bytes() == b"two"


def test_eager_names_survive_without_their_content(eager: LazyMount) -> None:
    write(eager.mount / "f", b"never synced", sync=None)
    mount = power_cycle(eager)
    assert (mount / "f").read_bytes() == b""


def test_sync_makes_everything_durable(lazy: LazyMount) -> None:
    (lazy.mount / "d").mkdir()
    write(lazy.mount / "d" / "f", b"unsynced", sync=None)
    lazy.sync()
    mount = power_cycle(lazy)
    assert (mount / "d" / "f").read_bytes() == b"unsynced"


def test_random_writes_and_truncates_read_back_as_on_a_real_disk(
    lazy: LazyMount, tmp_path: Path
) -> None:
    """Live reads match a real file; after a cut, the content of the last fsync."""
    rng = random.Random(7)
    real, fake = tmp_path / "real", lazy.mount / "fake"
    real.write_bytes(b"")
    write(fake, b"")
    fsync_path(lazy.mount)
    synced = b""
    with open(real, "r+b") as r, open(fake, "r+b") as f:
        for step in range(400):
            action = rng.random()
            if action < 0.6:
                offset, data = rng.randrange(30_000), rng.randbytes(rng.randrange(1, 9000))
                for handle in (r, f):
                    handle.seek(offset)
                    handle.write(data)
                    handle.flush()
            elif action < 0.8:
                size = rng.randrange(30_000)
                for handle in (r, f):
                    handle.truncate(size)
            elif action < 0.9:
                os.fsync(f.fileno())
                synced = real.read_bytes()
            assert fake.read_bytes() == real.read_bytes(), f"step {step}"
    mount = power_cycle(lazy)
    assert (mount / "fake").read_bytes() == synced
