"""Sustained load against a real daemon: threads posting unique ids, remembering the 202s."""

from __future__ import annotations

import threading
import time

from tests.daemon import Daemon, signal_record


class Load:
    """Threads posting small batches of unique ids; remembers which ids got a 202.

    Given several daemons (processes sharing a cluster), thread i posts to daemon i mod n.
    """

    def __init__(
        self, daemon: Daemon | list[Daemon], threads: int = 4, per_request: int = 5
    ) -> None:
        self.daemons = daemon if isinstance(daemon, list) else [daemon]
        self.per_request = per_request
        self.acked: set[str] = set()
        self.failures: list[str] = []
        self.next_id = 0
        self.lock = threading.Lock()
        self.running = True
        self.threads = [
            threading.Thread(target=self._post, args=(self.daemons[i % len(self.daemons)],))
            for i in range(threads)
        ]

    def _ids(self) -> list[int]:
        with self.lock:
            start = self.next_id
            self.next_id += self.per_request
        return list(range(start, start + self.per_request))

    def _post(self, daemon: Daemon) -> None:
        while self.running:
            ids = self._ids()
            body = [signal_record(n, session=f"s{n % 7}") for n in ids]
            try:
                response = daemon.post(body)
            except Exception as exc:  # refused or reset while the daemon is down
                self.failures.append(type(exc).__name__)
                time.sleep(0.01)
                continue
            if response.status_code == 202:
                with self.lock:
                    self.acked.update(f"{n:024x}" for n in ids)
            else:
                self.failures.append(str(response.status_code))

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.running = False
        for thread in self.threads:
            thread.join(30)
