"""Build a Batch over a real file, as the delivery worker hands them to channels."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

from firehosed.channels.base import Batch


def make_batch(directory: Path, name: str, data: bytes, **fields: Any) -> Batch:
    """A batch named `name` holding `data` (written to a file in `directory`)."""
    path = directory / f"batch-{hashlib.sha256(data).hexdigest()[:12]}"
    path.write_bytes(data)
    batch = Batch(
        id="b-1",
        firehose="acme_files",
        account="acme",
        name=name,
        path=path,
        size=len(data),
        records=1,
        content_type="application/json",
        content_encoding=None,
    )
    return dataclasses.replace(batch, **fields)
