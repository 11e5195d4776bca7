"""Benchmark payloads: realistic cart-abandon signals, and the full msgspec Struct of one.

A payload is built from a *template*: signal JSON with two markers per record,
`@OID@` (filled with a 24-hex-digit id, unique per record) and `@SID@` (the session
suffix: five consecutive records share a session). The same template drives wrk
(`bench/post.lua` fills it per request in Lua) and the Python load (`Template.render`), so
every request carries distinct ids and the daemon's dedupe never short-cuts the work.

Ids: `prefix` (16 hex digits, unique per run and load thread) + an 8-hex-digit counter;
sessions: `prefix` + 8 hex digits of counter // 5. Fixed widths keep every record of a
template kind the same length (the upload benchmark sizes its file from that).
Anonymous records (no `pid`) live in `anon-` sessions and identified ones in `sess-`
sessions, so an anonymous session is never identified later (catch-up buffering is
measured, catch-up replay is not).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator

import msgspec

OID = "@OID@"
SID = "@SID@"
SIGNALS_PER_SESSION = 5
_MARKERS = re.compile(f"({re.escape(OID)}|{re.escape(SID)})")


# -- the full Struct of a signal (the decode ceilings) --------------------------------


class Oid(msgspec.Struct, gc=False):
    oid: str = msgspec.field(name="$oid")


class Date(msgspec.Struct, gc=False):
    date: str = msgspec.field(name="$date")


class Product(msgspec.Struct, gc=False):
    prid: str
    n: str
    up: str
    uv: float
    qty: int
    u: str
    img: str
    cat: str | None = None


class Cart(msgspec.Struct, gc=False):
    curr: str
    qty: int
    p: list[Product]
    cp: str
    cv: float
    sbr: str | None = None
    dont_check_marketing_pressure: bool = False


class Signal(msgspec.Struct, gc=False):
    """Every field of a benchmark signal, decoded (what a handler that used it would do)."""

    signal_id: Oid
    type: str
    evdt: Date
    did: str | None = None
    pid: str | None = None
    id_: Oid | None = msgspec.field(default=None, name="_id")
    cart: Cart | None = None
    u: str | None = None
    dt: Date | None = None


# -- payloads ---------------------------------------------------------------------------


def _product(prid: str, name: str, price: float, category: str) -> dict[str, object]:
    return {
        "prid": prid,
        "n": name,
        "up": f"${price:.2f}",
        "uv": price,
        "qty": 1,
        "u": f"http://shop.example/{prid}.html",
        "img": f"http://img.example/{prid}.jpg",
        "cat": category,
    }


def cart_abandon(*, anonymous: bool, kind: str = "b") -> dict[str, object]:
    """One cart-abandon signal (~830 bytes compact), with OID/SID markers for its id and
    session: nested cart of two products, ids as `{"$oid"}`, times as `{"$date"}`."""
    record: dict[str, object] = {
        "signal_id": {"$oid": OID},
        "_id": {"$oid": "5ca4b38d32b4954a000003ee"},
        "type": kind,
        "did": ("anon-" if anonymous else "sess-") + SID,
    }
    if not anonymous:
        record["pid"] = "person-" + SID
    record["cart"] = {
        "sbr": "abandon-flow-2",
        "dont_check_marketing_pressure": True,
        "curr": "GBP",
        "qty": 2,
        "p": [
            _product("canon-powershot-a630", "Shiny Camera", 139.99, "cameras"),
            _product("universal-camera-charger", "Universal Camera Charger", 19.0, "power"),
        ],
        "cp": "£158.99",
        "cv": 158.99,
    }
    record["u"] = "http://shop.example/basket.html"
    record["dt"] = {"$date": "2026-11-23T10:00:01.458Z"}
    record["evdt"] = {"$date": "2026-11-23T10:00:01.458Z"}
    return record


def is_anonymous(index: int, share: float) -> bool:
    """Spread `share` anonymous records evenly over a batch (record `index` is one or not)."""
    return int((index + 1) * share) > int(index * share)


def template_text(count: int, anonymous_share: float = 0.0) -> str:
    """`count` signals as NDJSON (or one JSON object when `count` is 1), with markers."""
    kinds = ("b", "b", "c", "b")
    lines = [
        msgspec.json.encode(
            cart_abandon(anonymous=is_anonymous(i, anonymous_share), kind=kinds[i % len(kinds)])
        ).decode()
        for i in range(count)
    ]
    return lines[0] if count == 1 else "\n".join(lines) + "\n"


def new_prefix() -> str:
    """16 hex digits unique to this process and moment: no two runs share an id."""
    return os.urandom(8).hex()


class Template:
    """A template split at its markers, rendered to bodies with fresh ids."""

    def __init__(self, text: str) -> None:
        parts = _MARKERS.split(text)
        self.pieces = [p.encode() for p in parts[0::2]]
        self.slots = parts[1::2]
        self.records = self.slots.count(OID)

    def render(self, prefix: str, counter: int) -> tuple[bytes, int]:
        """The body with ids `counter`, `counter+1`…; and the next free counter."""
        out = [self.pieces[0]]
        current = counter
        for slot, piece in zip(self.slots, self.pieces[1:], strict=True):
            if slot == OID:
                current = counter
                out.append(f"{prefix}{counter:08x}".encode())
                counter += 1
            else:
                out.append(f"{prefix}{current // SIGNALS_PER_SESSION:08x}".encode())
            out.append(piece)
        return b"".join(out), counter

    def bodies(self, prefix: str, counter: int = 0) -> Iterator[bytes]:
        """Endless bodies with consecutive ids."""
        while True:
            body, counter = self.render(prefix, counter)
            yield body


def record_ids(body: bytes) -> list[str]:
    """The `signal_id.$oid` of each record of a rendered body (JSON object or NDJSON)."""
    return [m.decode() for m in re.findall(rb'"signal_id":\{"\$oid":"([0-9a-f]{24})"\}', body)]


signal_decoder = msgspec.json.Decoder(Signal)
