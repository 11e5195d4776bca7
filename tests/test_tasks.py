"""raise_if_cancelled: a loop that goes on after an error ends when its task is
cancelled, even where the cancellation was lost on the way (Python 3.11's wait_for)."""

from __future__ import annotations

import asyncio
import contextlib

from firehosed.tasks import raise_if_cancelled


async def looping(check: bool, stop: asyncio.Event) -> None:
    """Round after round until `stop`; each cancellation reaching it is lost, as in a
    wait_for that loses one."""
    while not stop.is_set():
        if check:
            raise_if_cancelled()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(0.01)


async def test_a_loop_whose_cancellation_was_lost_ends_at_its_next_round() -> None:
    stop = asyncio.Event()
    checked = asyncio.create_task(looping(True, stop))
    unchecked = asyncio.create_task(looping(False, stop))
    await asyncio.sleep(0.05)
    checked.cancel()
    unchecked.cancel()
    try:
        done, _ = await asyncio.wait([checked, unchecked], timeout=1)
        assert done == {checked} and checked.cancelled()  # the other runs on
    finally:
        stop.set()
        await asyncio.wait([unchecked], timeout=1)
