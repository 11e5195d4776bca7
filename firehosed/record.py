"""The record as staged in a firehose's queue: envelope facts plus the raw bytes."""

from __future__ import annotations

import msgspec


class Record(msgspec.Struct, array_like=True, gc=False):
    """One signal queued for one firehose.

    `raw` is the JSON object exactly as received, unless the daemon had to change it
    (catch-up copies and later signals of an identified session get the person set).
    Times are unix seconds: `time` is the signal's event time, `received` when we got it.
    """

    type: str
    id: str
    session: str | None
    person: str | None
    time: float
    received: float
    raw: bytes


encoder = msgspec.msgpack.Encoder()
decoder = msgspec.msgpack.Decoder(Record)
_buffer = bytearray()


def encode(record: Record) -> bytes:
    """The record's msgpack bytes, allocated at their exact size.

    `Encoder.encode` returns bytes with spare capacity (about half a record here),
    which catch-up rings would keep for a day; encoding into a reused buffer and
    copying out does not.
    """
    encoder.encode_into(record, _buffer)
    return bytes(_buffer)
