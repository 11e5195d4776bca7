"""Drive `tests.faults.lazyfs` from a test: mount, sync, cut the power, mount again."""

from __future__ import annotations

import importlib.util
import os
import select
import shutil
import subprocess
import sys
from pathlib import Path
from typing import IO

import pytest

REPO = Path(__file__).resolve().parents[2]


def require_fuse() -> None:
    """Skip (locally) or fail (in CI) when a FUSE file system cannot be mounted here."""
    reason = None
    if not os.path.exists("/dev/fuse"):
        reason = "no /dev/fuse on this machine"
    elif shutil.which("fusermount3") is None:
        reason = "fusermount3 not installed: apt-get install fuse3"
    elif importlib.util.find_spec("mfusepy") is None:
        reason = "mfusepy not installed: pip install -e '.[test]'"
    if reason is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


class LazyMount:
    """A lazyfs process serving `mount` from `backing` (its log appended to `log`)."""

    def __init__(self, mount: Path, backing: Path, log: Path, names: str = "lazy") -> None:
        self.mount, self.backing, self.log, self.names = mount, backing, log, names
        self.proc: subprocess.Popen[str] | None = None
        self.cuts = 0
        mount.mkdir(parents=True, exist_ok=True)
        backing.mkdir(parents=True, exist_ok=True)

    def start(self) -> LazyMount:
        """Mount (a new process on the same backing store); return once it serves."""
        command = ["tests.faults.lazyfs", str(self.mount), str(self.backing), "--names", self.names]
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", *command],
                cwd=REPO,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
            )
        self._expect("ready", timeout=20)
        return self

    def _expect(self, answer: str, timeout: float) -> None:
        assert self.proc is not None
        stdout: IO[str] | None = self.proc.stdout
        assert stdout is not None
        readable, _, _ = select.select([stdout], [], [], timeout)
        line = stdout.readline().strip() if readable else "(no answer)"
        if line != answer:
            raise AssertionError(f"lazyfs said {line!r}, not {answer!r}:\n{self.log_text()}")

    def _send(self, command: str) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def sync(self) -> None:
        """Make everything durable, as `sync` would."""
        self._send("sync")
        self._expect("synced", timeout=60)

    def cut(self) -> None:
        """Lose power: everything not synced is gone; the mount is detached."""
        assert self.proc is not None
        self._send("cut")
        self._reap(self.proc.wait(10))
        self._detach()
        self.cuts += 1

    def _reap(self, status: int) -> None:
        """The process has exited: close its pipes and forget it."""
        assert self.proc is not None
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None and not pipe.closed:
                pipe.close()
        self.proc = None
        if status != 0:
            raise AssertionError(f"lazyfs exited {status}:\n{self.log_text()}")

    def _detach(self) -> None:
        subprocess.run(
            ["fusermount3", "-u", "-z", str(self.mount)], capture_output=True, check=False
        )

    def close(self) -> None:
        """Unmount cleanly (whatever was not synced is lost all the same)."""
        if self.proc is not None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()  # at EOF it unmounts itself, then exits
            try:
                self._reap(self.proc.wait(20))
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self._reap(self.proc.wait(10))
        self._detach()  # (a mount whose process died is no `ismount`: detach regardless)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""
