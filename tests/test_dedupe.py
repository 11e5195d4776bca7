"""Dedupe memory: window, count limit, forget, and expiry at a steady churn."""

from __future__ import annotations

from firehosed.dedupe import Dedupe


def test_window_limit_and_forget() -> None:
    dedupe = Dedupe(window=10.0, limit=3)
    assert not dedupe.seen("a", 0.0)
    assert dedupe.seen("a", 1.0)
    dedupe.forget("a")
    assert not dedupe.seen("a", 2.0)  # a request that failed may be retried
    for record_id in "bcd":
        dedupe.seen(record_id, 3.0)
    assert len(dedupe) == 3 and not dedupe.seen("a", 4.0)  # "a" was the oldest: dropped
    dedupe.expire(13.5)  # c, d (at 3.0) are past the window; "a" (at 4.0) is not
    assert len(dedupe) == 1 and dedupe.seen("a", 13.6)


def test_steady_churn_keeps_exactly_the_window() -> None:
    dedupe = Dedupe(window=100.0, limit=1_000_000)
    for n in range(200_000):  # one id per 1 ms; each expire drops the id of 100 s before
        now = n / 1000
        dedupe.expire(now)
        assert not dedupe.seen(f"id{n}", now)
    assert len(dedupe) == 100_001
