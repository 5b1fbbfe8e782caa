"""Records written by older harnesses, filled in so every committed file still reads the same way.

The schema (version 1) only ever grew: later harnesses added keys, never
renamed or removed one. What an older record lacks is filled in with what it
meant when it was written:

- ``workload.measure``: records from before steady windows counted requests;
- a measured level's ``trials``: the earliest baselines kept only the
  level's ``metrics``, which was then its one trial.

A record of another schema version is refused by the loaders
(``records.store``, ``gate.baseline``), not guessed at.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any


def normalise(data: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``data`` with what older harnesses left out filled in."""
    out = copy.deepcopy(dict(data))
    workload = out.get("workload")
    if isinstance(workload, dict):
        workload.setdefault("measure", "count")
    for level in out.get("levels") or []:
        if isinstance(level, dict) and not level.get("trials") and isinstance(level.get("metrics"), Mapping):
            level["trials"] = [copy.deepcopy(level["metrics"])]
    return out
