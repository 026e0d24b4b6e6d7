"""Deterministic fault injection: fail at a named point, so tests never depend on timing luck.

Set ``EVL_CACHE_FAULT`` to ``POINT[@MATCH]=ACTION`` (several separated by ``;``). The code calls
`fault_point(POINT, key)` at each named point; when ``POINT`` matches and ``MATCH`` is absent or
equals ``str(key)``, the ACTION runs:

- ``raise``: raise `InjectedFault` (an ordinary exception: the caller's error handling runs);
- ``kill``: ``os._exit(137)`` at once, like ``kill -9`` (no cleanup, no flush, no finally);
- ``hang``: sleep (in short steps, so a thread running it can be abandoned) for an hour.

Named points (where they sit is documented in docs/design.md, "Faults"):
``decode`` (key: the video's manifest key, inside the decode work), ``after_shard_write`` (key: the
shard index, in the driver after a shard's files are durable and before its videos are marked),
``mark_before_status`` (key: the shard index, in the table flush after the error/metadata columns
and before the status column), ``shard_write`` (key: the shard index, in the writer before any
file of the shard is written). The variable is read at each call, so Ray workers started with the
driver's environment see it too.
"""

from __future__ import annotations

import os
import time

ENV = "EVL_CACHE_FAULT"


class InjectedFault(RuntimeError):
    """Raised by a ``raise`` fault."""


def _rules() -> list[tuple[str, str | None, str]]:
    spec = os.environ.get(ENV, "")
    rules = []
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        target, _, action = part.partition("=")
        point, _, match = target.partition("@")
        rules.append((point, match or None, action or "raise"))
    return rules


def fault_point(point: str, key: object = None) -> None:
    """Run the configured fault for ``point`` (and ``key``), if any; a no-op otherwise."""
    if ENV not in os.environ:
        return
    for name, match, action in _rules():
        if name != point or (match is not None and match != str(key)):
            continue
        if action == "kill":
            os._exit(137)
        if action == "hang":
            deadline = time.monotonic() + 3600
            while time.monotonic() < deadline:
                time.sleep(0.05)
            return
        raise InjectedFault(f"injected fault at {point} ({key})")
