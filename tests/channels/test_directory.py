"""The directory channel: hard link on the storage's file system, copy elsewhere."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from firehosed.channels.directory import DirectoryChannel, DirectoryConfig
from firehosed.errors import DeliveryError
from tests.channels.batches import make_batch

DATA = b'{"type":"pd","signal_id":{"$oid":"a1"}}\n' * 100


@pytest.fixture
def other_file_system() -> Iterator[Path]:
    """A directory on a file system other than the tests' (tmpfs), or a skip."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tempfile.gettempdir()).st_dev:
        pytest.skip("no second file system (/dev/shm) on this machine")
    with tempfile.TemporaryDirectory(dir=shm) as path:
        yield Path(path)


async def test_same_file_system_links_the_batch_file(tmp_path: Path) -> None:
    batch = make_batch(tmp_path, "2026/f.ndjson", DATA)
    channel = DirectoryChannel("local", DirectoryConfig(path=str(tmp_path / "out")))
    await channel.put(batch)
    target = tmp_path / "out" / "2026" / "f.ndjson"
    assert target.read_bytes() == DATA
    assert target.samefile(batch.path)  # no byte copied
    assert not list(target.parent.glob(".*.part"))


async def test_another_file_system_gets_a_copy(tmp_path: Path, other_file_system: Path) -> None:
    batch = make_batch(tmp_path, "f.ndjson", DATA)
    channel = DirectoryChannel("local", DirectoryConfig(path=str(other_file_system)))
    await channel.put(batch)
    target = other_file_system / "f.ndjson"
    assert target.read_bytes() == DATA
    assert not target.samefile(batch.path)
    batch.path.unlink()  # the batch goes once delivered: the copy stays whole
    assert target.read_bytes() == DATA


async def test_a_stale_part_linked_to_the_batch_is_not_written_through(tmp_path: Path) -> None:
    # An earlier attempt left the part as a link to the batch; this attempt copies: it
    # must not open that link for writing, or it would truncate the batch itself.
    out = tmp_path / "out"
    out.mkdir()
    batch = make_batch(tmp_path, "f.ndjson", DATA)
    os.link(batch.path, out / ".f.ndjson.part")
    channel = DirectoryChannel("local", DirectoryConfig(path=str(out)))
    channel.links = False
    await channel.put(batch)
    assert batch.path.read_bytes() == DATA
    assert (out / "f.ndjson").read_bytes() == DATA
    assert not list(out.glob(".*.part"))


async def test_a_retry_after_the_rename_leaves_no_part(tmp_path: Path) -> None:
    # A crash after the rename but before the batch was forgotten: the retry links the
    # same file onto itself, which rename(2) leaves as it is.
    batch = make_batch(tmp_path, "f.ndjson", DATA)
    channel = DirectoryChannel("local", DirectoryConfig(path=str(tmp_path / "out")))
    await channel.put(batch)
    await channel.put(batch)
    assert (tmp_path / "out" / "f.ndjson").read_bytes() == DATA
    assert not list((tmp_path / "out").glob(".*.part"))


async def test_an_unwritable_root_is_a_delivery_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    batch = make_batch(tmp_path, "f.ndjson", DATA)
    channel = DirectoryChannel("local", DirectoryConfig(path=str(blocker / "sub")))
    with pytest.raises(DeliveryError, match="file"):
        await channel.put(batch)


def files_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


@pytest.mark.parametrize(
    "name",
    ["../escaped.ndjson", "acme/../../escaped.ndjson", "/tmp/escaped.ndjson", "a\nb.ndjson"],
)
async def test_a_name_leading_out_of_the_root_is_refused_for_good(
    tmp_path: Path, name: str
) -> None:
    # Config validation keeps such names out; a manifest cut under an older config, or a
    # bug elsewhere, must still not write outside the root. Retrying cannot fix it.
    out = tmp_path / "root" / "out"
    batch = make_batch(tmp_path, name, DATA)
    channel = DirectoryChannel("local", DirectoryConfig(path=str(out)))
    with pytest.raises(DeliveryError, match="outside the channel's root") as raised:
        await channel.put(batch)
    assert raised.value.retryable is False
    assert files_under(tmp_path) == [batch.path]


async def test_a_symlink_inside_the_root_does_not_lead_out(tmp_path: Path) -> None:
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (out / "acme").symlink_to(elsewhere)
    batch = make_batch(tmp_path, "acme/f.ndjson", DATA)
    channel = DirectoryChannel("local", DirectoryConfig(path=str(out)))
    with pytest.raises(DeliveryError, match="outside") as raised:
        await channel.put(batch)
    assert raised.value.retryable is False
    assert files_under(elsewhere) == []
