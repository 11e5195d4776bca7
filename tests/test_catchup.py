"""Catch-up rings in memory: ring bound, identification, TTL, eviction under max_memory."""

from __future__ import annotations

import gc
import tracemalloc

from firehosed import metrics
from firehosed.catchup import CatchUp
from firehosed.config import CatchUpConfig
from firehosed.units import Duration, Size


def rings(**limits: object) -> CatchUp:
    return CatchUp(CatchUpConfig(**limits))  # type: ignore[arg-type]


def test_ring_keeps_the_latest_and_identification_hands_it_back_once() -> None:
    catch_up = rings(signals_per_session=3)
    for n in range(5):
        catch_up.buffer("acme", "s1", b"r%d" % n, now=100.0 + n)
    assert catch_up.identify("acme", "s1", "p1", now=110.0) == (b"r2", b"r3", b"r4")
    assert catch_up.identify("acme", "s1", "p1", now=111.0) is None
    assert catch_up.person_of("acme", "s1", now=112.0) == "p1"
    assert catch_up.person_of("other", "s1", now=112.0) is None


def test_sessions_expire_after_ttl() -> None:
    catch_up = rings(session_ttl=Duration(60.0))
    catch_up.identify("acme", "old", "p1", now=0.0)
    catch_up.buffer("acme", "new", b"x", now=50.0)
    assert catch_up.person_of("acme", "old", now=61.0) is None
    catch_up.buffer("acme", "newer", b"y", now=70.0)  # a touch runs expiry
    assert len(catch_up) == 2


def test_max_memory_evicts_least_recently_seen_sessions_and_counts_them() -> None:
    catch_up = rings(max_memory=Size(20_000))
    before = metrics.catchup_evictions._value.get()
    for n in range(100):
        catch_up.buffer("acme", f"s{n}", b"x" * 500, now=float(n))
    assert catch_up.memory <= 20_000
    assert 0 < len(catch_up) < 100
    assert catch_up.identify("acme", "s99", "p", now=200.0) == (b"x" * 500,)  # newest kept
    assert catch_up.identify("acme", "s0", "p", now=200.0) == ()  # oldest was evicted
    assert metrics.catchup_evictions._value.get() > before


def test_sessions_are_invisible_to_the_cyclic_garbage_collector() -> None:
    """A million live sessions must not make every full collection walk them all."""
    catch_up = rings(max_memory=Size(1 << 30))
    gc.collect()
    before = len(gc.get_objects())
    for n in range(10_000):
        if n % 2:
            catch_up.identify("acme", f"s{n}", "p", now=1.0)
        else:
            catch_up.buffer("acme", f"s{n}", b"r", now=1.0)
    gc.collect()  # also untracks the rings (tuples of bytes)
    assert len(catch_up) == 10_000
    assert len(gc.get_objects()) - before < 100


def test_sessions_are_charged_their_key_and_person_strings() -> None:
    short, long = rings(), rings()
    short.identify("acme", "s", "p", now=1.0)
    long.identify("acme", "s" * 1001, "p" * 2001, now=1.0)
    assert long.memory - short.memory >= 3000
    short.buffer("acme", "t", b"r", now=2.0)
    long.buffer("acme", "t" * 1001, b"r", now=2.0)
    assert long.memory - short.memory >= 4000
    # a new person replaces the old one's charge; expiry gives every byte back
    before = long.memory
    long.identify("acme", "s" * 1001, "q" * 5001, now=3.0)
    assert long.memory - before == 3000
    long.buffer("acme", "later", b"r", now=1e9)  # all the others expired
    assert long.memory == _alone("later", b"r")


def _alone(session: str, record: bytes) -> int:
    """What one fresh session holding one record is charged."""
    catch_up = rings()
    catch_up.buffer("acme", session, record, now=0.0)
    return catch_up.memory


SESSIONS = 40_000
LIMIT = 4 << 20


def test_memory_tracks_real_allocation_and_eviction_keeps_it_under_max_memory() -> None:
    """Sessions with 200-byte keys and persons (identified) or 300-byte records
    (anonymous): `memory` stays within max_memory, and within 20% of what tracemalloc
    sees the rings, keys, persons and dict really hold (the dict's table grows in steps:
    real memory may pass max_memory by a few percent between them)."""
    catch_up = rings(max_memory=Size(LIMIT))
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        over = 0
        for n in range(SESSIONS):
            session = f"{n:0>200}"
            if n % 2:
                catch_up.identify("acme", session, f"person-{n:0>193}", now=float(n))
            else:
                catch_up.buffer("acme", session, f"{n:0>300}".encode(), now=float(n))
            over += catch_up.memory > LIMIT
        used = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert len(catch_up) < SESSIONS, "nothing was evicted"
    assert over == 0, f"memory exceeded max_memory after {over} calls"
    assert used <= LIMIT * 1.1, f"{used} bytes really held for max_memory {LIMIT}"
    assert 0.85 <= catch_up.memory / used <= 1.2, (catch_up.memory, used)
