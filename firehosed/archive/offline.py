"""`firehosed archive --day` with the daemon stopped: build and deliver one day on disk.

The command holds the storage lock the daemon takes (replay.py), so no daemon starts
while it runs. It refuses while the firehose's queue still holds records: they were
received but not yet spilled, may belong to the day, and only the daemon spills them
(it does so on start, then builds every ended day itself). A delivery is one attempt,
bounded by the firehose's `delivery_timeout`; when it fails, the built zip and the
day's spills stay, and the daemon delivers the same bytes under the same name at its
next start (or run the command again).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import date
from pathlib import Path
from typing import Any

from firehosed import replay
from firehosed.archive.archiver import Archiver
from firehosed.channels import open_channel
from firehosed.channels.base import Batch
from firehosed.config import Config
from firehosed.errors import DeliveryError
from firehosed.mapping import Mapping


async def archive_day(
    cfg: Config, name: str, day: date, *, force: bool
) -> AsyncIterator[dict[str, Any]]:
    """The steps of building and delivering `day` (the admin API's progress lines); a
    step that cannot be taken reports its error and ends. Hold the storage lock."""
    firehose = cfg.all_firehoses().get(name)
    if firehose is None:
        yield {"error": f"no firehose {name!r} in {cfg.path}"}
        return
    if firehose.format != "zip-csv":
        yield {"error": f"firehose {name} is not a daily archive (format zip-csv)"}
        return
    storage = Path(cfg.storage.dir)
    sync = cfg.storage.durability == "fsync"
    unspilled = await asyncio.to_thread(replay.queued_offline, cfg, name)
    if unspilled:
        yield {
            "error": f"{unspilled:,} records are queued, not yet spilled into their days: "
            "start the daemon (it spills them, then builds every ended day)"
        }
        return
    mapping = Mapping(cfg.mappings[firehose.mapping]) if firehose.mapping else None
    fields = cfg.accounts[firehose.account].fields
    archive = Archiver(name, firehose, fields, mapping, storage / "archive" / name, sync=sync)
    yield {"step": "building", "day": day.isoformat()}
    try:
        offer = await archive.by_hand(day, force=force)
    except ValueError as exc:
        yield {"error": str(exc)}
        return
    yield {"step": "delivering", "name": offer.name, "records": offer.records, "bytes": offer.size}
    channel = open_channel(firehose.channel, cfg.channels[firehose.channel])
    batch = Batch(
        id=offer.id,
        firehose=name,
        account=firehose.account,
        name=offer.name,
        path=await archive.local_file(offer, write=False),
        size=offer.size,
        records=offer.records,
        content_type=offer.content_type,
        content_encoding=None,
    )
    try:
        async with asyncio.timeout(firehose.delivery_timeout):
            await channel.put(batch)
    except (DeliveryError, TimeoutError) as exc:
        error = str(exc) or f"timed out after {firehose.delivery_timeout:g}s"
        yield {"error": f"{error} (kept: the daemon delivers it at its next start)"}
        return
    finally:
        await channel.close()
    await archive.done(offer)
    yield {"step": "delivered", "name": offer.name}
