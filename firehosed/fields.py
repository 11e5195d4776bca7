"""`[accounts.X.fields]`, apart from config.py: the process that reads import files
(imports/child.py) gets it with its job, and this module is all it needs of the config.

Importing config.py would bring its cron, time-zone and TOML modules and every section's
Struct into that process, about 3 MiB of the memory each file's reading costs.
"""

from __future__ import annotations

import msgspec


class FieldsConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """`[accounts.X.fields]`: dotted paths into the posted JSON (as config.py's sections:
    unknown keys are errors)."""

    type: str = "type"
    id: str = "signal_id.$oid"
    session: str = "did"
    person: str = "pid"
    time: str = "evdt.$date"
