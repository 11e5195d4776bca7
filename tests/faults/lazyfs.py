"""A FUSE file system that forgets, when the power goes, every write not yet synced (the
way Jepsen's LazyFS does): kill -9 keeps the page cache, this does not.

    python -m tests.faults.lazyfs MOUNT BACKING [--names lazy|eager]

It runs in the foreground, prints `ready` once mounted, and takes commands on stdin, one
per line:

    sync   make everything durable (what `sync`, or the kernel's writeback, does); `synced`
    cut    lose power: exit at once, between two operations (an fsync is all or nothing).
           The backing store is the disk after the cut; detach the dead mount with
           `fusermount3 -u -z MOUNT` and mount a new process on the same BACKING.

At EOF on stdin (the test is gone) it unmounts itself.

What survives a cut (the model):

- A file's content and size as of its last fsync or fdatasync, through any of its names or
  handles. Writes and truncates (also O_TRUNC) since then are lost, all of them: a torn
  write is not modelled.
- A directory's entries (create, mkdir, link, unlink, rmdir, rename) as of its last fsync
  (FUSE fsyncdir), which makes all its entries durable at once. A rename is two entry
  changes: the new name is durable with the destination's fsync, the old name's removal
  with the source's; in between, both names survive (within one directory it is atomic).
- A rename never syncs the renamed file's content. ext4's auto_da_alloc would flush it on
  a rename over an existing file; POSIX does not, so the pessimistic choice: writing
  `tmp`, renaming it over `path` and syncing the directory, without syncing `tmp`, leaves
  an empty `path`.
- A new directory's entries count once it is durable itself: fsync(new dir) and then a cut
  before fsync(its parent) loses the whole subtree.
- `--names eager`: every entry change is durable at once, only content is lazy (LazyFS's
  own model, and ext4's in practice): a new or renamed name survives even when its
  content did not.
- Not modelled: modes, owners and times (kept in memory), symlinks, devices, xattrs. A
  directory moves only within its parent (EXDEV otherwise).

Backing store layout (invariants, true between any two operations):

- BACKING/inodes/N: one file per regular file, holding exactly its synced bytes.
- BACKING/tree/: exactly the durable namespace: the directories durably reachable from
  the root, each with the entries of its last fsync; a file entry is a hard link to its
  inodes/N. At mount, inodes with no name in tree/ (link count 1) are deleted.
"""

from __future__ import annotations

import argparse
import errno
import os
import resource
import shutil
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

import mfusepy as fuse

PAGE = 4096
Op = TypeVar("Op", bound=Callable[..., Any])


def failure(code: int) -> fuse.FuseOSError:
    return fuse.FuseOSError(code)


class File:
    """A regular file: synced bytes in its inode file, unsynced ones in dirty pages.

    Invariants: floor <= synced_size and floor <= size; the live content is the inode
    file's bytes below `floor`, overlaid by `pages` (whole pages, zero past `size`), zero
    elsewhere below `size`.
    """

    def __init__(self, ino: int, store: Path, mode: int) -> None:
        self.ino, self.store, self.mode = ino, store, mode
        self.fd = os.open(store, os.O_RDWR)
        self.synced_size = self.size = self.floor = os.fstat(self.fd).st_size
        self.pages: dict[int, bytearray] = {}
        self.names = 0  # entries naming it in live directories
        self.refs = 0  # entries naming it in directories' durable (last synced) entries
        self.opens = 0
        self.mtime = time.time_ns()

    def _stored(self, start: int, end: int) -> bytearray:
        """The synced bytes of [start, end), zero from `floor` on."""
        out = bytearray(end - start)
        valid = min(end, self.floor)
        if valid > start:
            got = os.pread(self.fd, valid - start, start)
            out[: len(got)] = got
        return out

    def read(self, size: int, offset: int) -> bytes:
        end = min(offset + size, self.size)
        if end <= offset:
            return b""
        out = self._stored(offset, end)
        for index in range(offset // PAGE, (end - 1) // PAGE + 1):
            page = self.pages.get(index)
            if page is not None:
                lo, hi = max(offset, index * PAGE), min(end, (index + 1) * PAGE)
                out[lo - offset : hi - offset] = page[lo - index * PAGE : hi - index * PAGE]
        return bytes(out)

    def write(self, data: bytes, offset: int) -> int:
        view, at = memoryview(data), offset
        while view:
            index, skip = divmod(at, PAGE)
            page = self.pages.get(index)
            if page is None:
                page = self.pages[index] = self._stored(index * PAGE, (index + 1) * PAGE)
            n = min(PAGE - skip, len(view))
            page[skip : skip + n] = view[:n]
            view, at = view[n:], at + n
        self.size = max(self.size, offset + len(data))
        self.mtime = time.time_ns()
        return len(data)

    def truncate(self, length: int) -> None:
        if length < self.size:
            self.floor = min(self.floor, length)
            first_gone = -(-length // PAGE)
            for index in [i for i in self.pages if i >= first_gone]:
                del self.pages[index]
            page = self.pages.get(length // PAGE)
            if page is not None:
                page[length % PAGE :] = bytes(PAGE - length % PAGE)
        self.size = length
        self.mtime = time.time_ns()

    def sync(self) -> None:
        """fsync/fdatasync: the live content and size become the inode file's."""
        if self.floor < self.synced_size:
            os.ftruncate(self.fd, self.floor)
        for index, page in sorted(self.pages.items()):
            os.pwrite(self.fd, page[: self.size - index * PAGE], index * PAGE)
        os.ftruncate(self.fd, self.size)
        self.pages.clear()
        self.synced_size = self.floor = self.size

    def attrs(self) -> dict[str, int]:
        return {"st_mode": stat.S_IFREG | self.mode, "st_size": self.size, "st_nlink": self.names}


class Dir:
    """A directory: its live entries, and those of its last fsync (`durable`).

    `where` is its path under tree/ while it is durably reachable from the root (then
    that path holds exactly `durable`), else None.
    """

    def __init__(self, ino: int, mode: int, where: Path | None = None) -> None:
        self.ino, self.mode, self.where = ino, mode, where
        self.live: dict[str, File | Dir] = {}
        self.durable: dict[str, File | Dir] = {}
        self.mtime = time.time_ns()

    def attrs(self) -> dict[str, int]:
        subdirs = sum(isinstance(n, Dir) for n in self.live.values())
        return {"st_mode": stat.S_IFDIR | self.mode, "st_size": 4096, "st_nlink": 2 + subdirs}


Node = File | Dir


def locked(op: Op) -> Op:
    """Run a FUSE operation under the file system's mutex, so a cut falls between two."""

    @wraps(op)
    def run(self: LazyFS, *args: Any) -> Any:
        with self.mutex:
            return op(self, *args)

    return run  # type: ignore[return-value]


class LazyFS(fuse.Operations):  # type: ignore[misc]
    """The operations; `sync_all` and `mutex` are for the command thread.

    (No attribute may be named after a FUSE operation: `self.lock` once answered every
    fcntl lock with EINVAL.)
    """

    use_ns = True
    flag_nopath = flag_nullpath_ok = True  # handle-based operations get no path

    def __init__(self, backing: Path, eager: bool) -> None:
        self.mutex = threading.Lock()
        self.eager = eager
        self.inodes, self.tree = backing / "inodes", backing / "tree"
        self.inodes.mkdir(parents=True, exist_ok=True)
        self.tree.mkdir(exist_ok=True)
        self.handles: dict[int, Node] = {}
        self.appending: set[int] = set()  # handles opened with O_APPEND
        self.counter = 1  # for inode numbers, inode file names and handles
        stores = self._collect()
        self.root = self._load(self.tree, stores, {})

    # -- mount: the backing store as the disk after a cut ----------------------------

    def _collect(self) -> dict[int, Path]:
        """Delete inode files no name reaches; the others by their backing inode."""
        stores = {}
        for path in self.inodes.iterdir():
            self.counter = max(self.counter, int(path.name) + 1)
            st = path.stat()
            if st.st_nlink == 1:
                path.unlink()
            else:
                stores[st.st_ino] = path
        return stores

    def _load(self, where: Path, stores: dict[int, Path], files: dict[int, File]) -> Dir:
        st = where.stat()
        node = Dir(self._next(), stat.S_IMODE(st.st_mode), where)
        for entry in os.scandir(where):
            child: Node
            if entry.is_dir(follow_symlinks=False):
                child = self._load(Path(entry.path), stores, files)
            else:
                ino = entry.stat().st_ino
                if ino not in files:
                    files[ino] = File(self._next(), stores[ino], 0o644)
                child = files[ino]
                child.names += 1
                child.refs += 1
            node.live[entry.name] = node.durable[entry.name] = child
        return node

    def _next(self) -> int:
        self.counter += 1
        return self.counter

    # -- durability -------------------------------------------------------------------

    def _sync_dir(self, d: Dir) -> None:
        """fsyncdir: the live entries become the durable ones (and tree/'s, if reachable)."""
        old, d.durable = d.durable, dict(d.live)
        gone = [(name, n) for name, n in old.items() if d.durable.get(name) is not n]
        new = [(name, n) for name, n in d.durable.items() if old.get(name) is not n]
        for name, node in gone:
            if d.where is not None:
                self._unstore(d.where / name, node)
            if isinstance(node, File):
                node.refs -= 1
                self._forget_maybe(node)
        for name, node in new:
            if isinstance(node, File):
                node.refs += 1
            if d.where is not None:
                self._store(d.where / name, node)

    def _store(self, path: Path, node: Node) -> None:
        if isinstance(node, File):
            os.link(node.store, path)
            return
        os.mkdir(path)
        node.where = path
        for name, child in node.durable.items():
            self._store(path / name, child)

    def _unstore(self, path: Path, node: Node) -> None:
        if isinstance(node, File):
            path.unlink()
            return
        shutil.rmtree(path)
        for d in self._walk(node, "durable"):
            d.where = None

    def _walk(self, d: Dir, entries: str) -> Iterator[Dir]:
        yield d
        for child in getattr(d, entries).values():
            if isinstance(child, Dir):
                yield from self._walk(child, entries)

    def _changed(self, *dirs: Dir) -> None:
        if self.eager:
            for d in dirs:
                self._sync_dir(d)

    def _forget_maybe(self, f: File) -> None:
        """Delete a file nothing reaches any more: no live name, handle or durable entry."""
        if f.names == 0 and f.opens == 0 and f.refs == 0 and f.fd >= 0:
            os.close(f.fd)
            f.fd = -1  # forgotten once: the number may soon be another file's
            f.store.unlink()

    def sync_all(self) -> None:
        """What `sync` does: every file's content, then every directory, root first."""
        dirs = list(self._walk(self.root, "live"))
        files = {id(n): n for d in dirs for n in d.live.values() if isinstance(n, File)}
        files.update({id(n): n for n in self.handles.values() if isinstance(n, File)})
        for f in files.values():
            f.sync()
        for d in dirs:
            self._sync_dir(d)

    # -- lookup -------------------------------------------------------------------------

    def _node(self, path: str | None, fh: int | None = None) -> Node:
        if fh is not None:
            return self.handles[fh]
        if path is None:  # fchmod, futimens: mfusepy drops their handle (not needed here)
            raise failure(errno.EBADF)
        node: Node = self.root
        for name in path.strip("/").split("/"):
            if not name:
                continue
            if not isinstance(node, Dir):
                raise failure(errno.ENOTDIR)
            found = node.live.get(name)
            if found is None:
                raise failure(errno.ENOENT)
            node = found
        return node

    def _parent(self, path: str) -> tuple[Dir, str]:
        head, _, name = path.rpartition("/")
        parent = self._node(head or "/")
        if not isinstance(parent, Dir):
            raise failure(errno.ENOTDIR)
        return parent, name

    def _file(self, path: str | None, fh: int | None) -> File:
        node = self._node(path, fh)
        if not isinstance(node, File):
            raise failure(errno.EISDIR)
        return node

    def _handle(self, node: Node, flags: int = 0) -> int:
        fh = self._next()
        self.handles[fh] = node
        if flags & os.O_APPEND:
            self.appending.add(fh)
        if isinstance(node, File):
            node.opens += 1
        return fh

    # -- operations -----------------------------------------------------------------------

    @locked
    def getattr(self, path: str | None, fh: int | None = None) -> dict[str, int]:
        node = self._node(path, fh)
        times = {f"st_{t}time": node.mtime for t in "amc"}
        return {**node.attrs(), **times, "st_uid": os.getuid(), "st_gid": os.getgid()}

    @locked
    def opendir(self, path: str) -> int:
        return self._handle(self._node(path))

    @locked
    def readdir(self, path: str | None, fh: int) -> list[str]:
        node = self._node(path, fh)
        assert isinstance(node, Dir)
        return [".", "..", *node.live]

    @locked
    def releasedir(self, path: str | None, fh: int) -> int:
        del self.handles[fh]
        return 0

    @locked
    def fsyncdir(self, path: str | None, datasync: int, fh: int) -> int:
        node = self._node(path, fh)
        assert isinstance(node, Dir)
        self._sync_dir(node)
        return 0

    @locked
    def mkdir(self, path: str, mode: int) -> int:
        parent, name = self._parent(path)
        if name in parent.live:
            raise failure(errno.EEXIST)
        parent.live[name] = Dir(self._next(), stat.S_IMODE(mode))
        self._changed(parent)
        return 0

    @locked
    def rmdir(self, path: str) -> int:
        parent, name = self._parent(path)
        node = self._node(path)
        if not isinstance(node, Dir):
            raise failure(errno.ENOTDIR)
        if node.live:
            raise failure(errno.ENOTEMPTY)
        del parent.live[name]
        self._changed(parent)
        return 0

    @locked
    def create(self, path: str, mode: int, flags: int) -> int:
        parent, name = self._parent(path)
        node = parent.live.get(name)
        if node is None:
            number = self._next()
            os.close(os.open(self.inodes / str(number), os.O_CREAT | os.O_EXCL, 0o600))
            node = File(number, self.inodes / str(number), stat.S_IMODE(mode))
            node.names = 1
            parent.live[name] = node
            self._changed(parent)
        elif flags & os.O_EXCL:
            raise failure(errno.EEXIST)
        return self._open(node, flags)

    @locked
    def open(self, path: str, flags: int) -> int:
        return self._open(self._node(path), flags)

    def _open(self, node: Node, flags: int) -> int:
        if not isinstance(node, File):
            raise failure(errno.EISDIR)
        if flags & os.O_TRUNC:
            node.truncate(0)
        return self._handle(node, flags)

    @locked
    def read(self, path: str | None, size: int, offset: int, fh: int) -> bytes:
        return self._file(path, fh).read(size, offset)

    @locked
    def write(self, path: str | None, data: bytes, offset: int, fh: int) -> int:
        node = self._file(path, fh)
        return node.write(data, node.size if fh in self.appending else offset)

    @locked
    def truncate(self, path: str | None, length: int, fh: int | None = None) -> int:
        self._file(path, fh).truncate(length)
        return 0

    @locked
    def fsync(self, path: str | None, datasync: int, fh: int) -> int:
        self._file(path, fh).sync()
        return 0

    @locked
    def release(self, path: str | None, fh: int) -> int:
        node = self.handles.pop(fh)
        self.appending.discard(fh)
        assert isinstance(node, File)
        node.opens -= 1
        self._forget_maybe(node)
        return 0

    @locked
    def unlink(self, path: str) -> int:
        parent, name = self._parent(path)
        node = self._node(path)
        if not isinstance(node, File):
            raise failure(errno.EISDIR)
        del parent.live[name]
        node.names -= 1
        self._changed(parent)
        self._forget_maybe(node)
        return 0

    @locked
    def link(self, target: str, source: str) -> int:
        """A new name `target` for the existing file `source`."""
        node = self._file(source, None)
        parent, name = self._parent(target)
        if name in parent.live:
            raise failure(errno.EEXIST)
        parent.live[name] = node
        node.names += 1
        self._changed(parent)
        return 0

    @locked
    def rename(self, old: str, new: str) -> int:
        src, old_name = self._parent(old)
        dst, new_name = self._parent(new)
        node = self._node(old)
        replaced = dst.live.get(new_name)
        if replaced is node:  # POSIX: two links to one file: nothing happens
            return 0
        if isinstance(node, Dir) and src is not dst:
            raise failure(errno.EXDEV)
        if replaced is not None:
            self._check_replace(node, replaced)
        del src.live[old_name]
        dst.live[new_name] = node
        if isinstance(replaced, File):
            replaced.names -= 1
        self._changed(src, dst)
        if isinstance(replaced, File):
            self._forget_maybe(replaced)
        return 0

    def _check_replace(self, node: Node, replaced: Node) -> None:
        if isinstance(replaced, Dir):
            if not isinstance(node, Dir):
                raise failure(errno.EISDIR)
            if replaced.live:
                raise failure(errno.ENOTEMPTY)
        elif isinstance(node, Dir):
            raise failure(errno.ENOTDIR)

    @locked
    def chmod(self, path: str | None, mode: int) -> int:
        self._node(path).mode = stat.S_IMODE(mode)
        return 0

    def chown(self, path: str | None, uid: int, gid: int) -> int:
        return 0

    @locked
    def utimens(self, path: str | None, times: tuple[int, int] | None = None) -> int:
        self._node(path).mtime = times[1] if times else time.time_ns()
        return 0

    def statfs(self, path: str) -> dict[str, int]:
        st = os.statvfs(self.inodes)
        return {key: getattr(st, key) for key in dir(st) if key.startswith("f_")}

    def init(self, path: str) -> None:
        print("ready", flush=True)


class Fuse(fuse.FUSE):  # type: ignore[misc]
    """mfusepy's FUSE, passing an ftruncate's handle on (with nopath there is no path)."""

    def truncate_fuse_3(self, path: bytes | None, length: int, fip: Any) -> int:
        fh = fip.contents.fh if fip else None
        name = None if path is None else path.decode(self.encoding, self.errors)
        result: int = self.operations.truncate(name, length, fh)
        return result


def serve_commands(fs: LazyFS, mount: str) -> None:
    """The command thread: `sync` and `cut` from stdin; unmount at EOF."""
    for line in sys.stdin:
        command = line.strip()
        if command == "cut":
            fs.mutex.acquire()  # never released: no operation runs after the cut
            os._exit(0)
        if command == "sync":
            with fs.mutex:
                fs.sync_all()
            print("synced", flush=True)
    subprocess.run(["fusermount3", "-u", "-z", mount], check=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mount")
    parser.add_argument("backing", type=Path)
    parser.add_argument("--names", choices=["lazy", "eager"], default="lazy")
    args = parser.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # one fd per live file
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    fs = LazyFS(args.backing, eager=args.names == "eager")
    threading.Thread(target=serve_commands, args=(fs, args.mount), daemon=True).start()
    Fuse(fs, args.mount, foreground=True, nothreads=True, hard_remove=True, fsname="lazyfs")


if __name__ == "__main__":
    main()
