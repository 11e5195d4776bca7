"""Deployments on a JetStream cluster: firehosed processes with the same config (their
own storage dirs, one export directory), for the scale-out tests and faults."""

from __future__ import annotations

import itertools
import json
from collections import Counter
from pathlib import Path

from tests.daemon import Daemon
from tests.servers.nats import NatsCluster

_prefixes = itertools.count()

BASE = """
[server]
listen = "127.0.0.1:{{port}}"
drain_timeout = "10s"

[storage]
backend = "jetstream"
dir = "{{dir}}/var"

[jetstream]
servers = {servers}
prefix = "{prefix}"
partitions = 4
lease_ttl = "2s"

[accounts.acme]
tokens = ["{{token}}"]

[channels.local]
type = "directory"
path = "{export}"

[firehoses.all]
account = "acme"
channel = "local"
format = "ndjson"
minutes_between_files = 0.01
catch_up = true
include_anonymous = true
"""

# A second firehose given the same records in the same format (so the same bytes).
COPY = """
[channels.copy]
type = "directory"
path = "{export}"

[firehoses.copy]
account = "acme"
channel = "copy"
format = "ndjson"
minutes_between_files = 0.01
catch_up = true
include_anonymous = true
"""


class Deployment:
    """Daemons of one deployment: the same config, one export directory."""

    def __init__(self, root: Path, cluster: NatsCluster, *, copy: bool = False) -> None:
        """With `copy`, a second firehose ("copy") delivers the same records into
        `root/export-copy`."""
        self.root = root
        self.export = root / "export"
        self.exports = [self.export]
        self.base = BASE.format(
            servers=json.dumps(cluster.urls), prefix=f"t{next(_prefixes)}", export=self.export
        )
        if copy:
            self.exports.append(root / "export-copy")
            self.base += COPY.format(export=self.exports[-1])
        self.daemons: list[Daemon] = []

    def daemon(self, name: str, extra: str = "") -> Daemon:
        root = self.root / name
        root.mkdir()
        made = Daemon(root, extra, base=self.base)
        self.daemons.append(made)
        return made

    def delivered(self, export: Path | None = None) -> list[dict[str, object]]:
        """The records delivered into `export` (the first firehose's by default)."""
        records = []
        for path in sorted((export or self.export).rglob("*.ndjson")):
            records += [json.loads(line) for line in path.read_text().splitlines()]
        return records

    def delivered_ids(self, export: Path | None = None) -> Counter[str]:
        """How many files each id was delivered in, into `export` (as `delivered`)."""
        records = self.delivered(export)
        return Counter(str(r["signal_id"]["$oid"]) for r in records)  # type: ignore[index]

    def close(self) -> None:
        for daemon in self.daemons:
            daemon.close()
