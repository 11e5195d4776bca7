"""Catch-up rings in memory: ring bound, identification, TTL, eviction under max_memory."""

from __future__ import annotations

import gc

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
