"""`[accounts.X.fields]`, apart from config.py: the process that reads import files
(imports/child.py) gets it with its job, and this module is all it needs of the config.

Importing config.py would bring its cron, time-zone and TOML modules and every section's
Struct into that process, about 3 MiB of the memory each file's reading costs.
"""

from __future__ import annotations

import msgspec


class Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Base of every config table (config.py's too): unknown keys are errors."""


class FieldsConfig(Section):
    """`[accounts.X.fields]`: dotted paths into the posted JSON."""

    type: str = "type"
    id: str = "signal_id.$oid"
    session: str = "did"
    person: str = "pid"
    time: str = "evdt.$date"
