"""Deterministic fault injection: fail at a named point, so tests never depend on timing luck.

Set ``EVL_CACHE_FAULT`` to ``POINT[@MATCH]=ACTION`` (several separated by ``;``). The code calls
`fault_point(POINT, key)` at each named point; when ``POINT`` matches and ``MATCH`` is absent or
equals ``str(key)``, the ACTION runs:

- ``raise``: raise `InjectedFault` (an ordinary exception: the caller's error handling runs);
- ``kill``: ``os._exit(137)`` at once, like ``kill -9`` (no cleanup, no flush, no finally);
- ``hang``: sleep (in short steps, so a thread running it can be abandoned) for an hour;
- ``kill-raylet``: in a Ray worker, ``kill -9`` the raylet that started this process (its parent),
  then exit like ``kill``: the whole Ray node dies mid-run, as when a machine is lost. Outside a
  Ray worker (the parent is not a raylet) it raises `InjectedFault` instead of killing a stranger.

``MATCH`` may also be ``#N``: the N-th call of ``POINT`` under this process's parent, counted in
a file in the folder ``EVL_CACHE_FAULT_DIR`` (default: the temp dir). While that folder does not
exist the rule is off and nothing is counted, so a test can arm a fault in processes that are
already running (a Ray node started earlier) by creating the folder. For Ray workers the parent
is the node's raylet, so ``embed@#2=kill-raylet`` in one node's environment kills that node when
its backbone actor starts its second batch after arming.

Named points (where they sit is documented in docs/design.md, "Faults"):
``decode`` (key: the video's manifest key, inside the decode work), ``after_shard_write`` (key: the
shard index, in the driver after a shard's files are durable and before its videos are marked),
``mark_before_status`` (key: the shard index, in the table flush after the error/metadata columns
and before the status column), ``shard_write`` (key: the shard index, in the writer before any
file of the shard is written), ``embed`` (key: the Ray node id, in a backbone actor before each
batch), ``derive_shard`` (key: the shard index, in `evl-cache derive-emb` after a shard's ``emb``
is written and before the store's attributes name ``emb``). The variable is read at each call, so
Ray workers started with the driver's environment see it too.
"""

from __future__ import annotations

import os
import signal
import tempfile
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


def _nth_call(point: str) -> int:
    """Count this call of ``point`` under the parent process (a Ray node's raylet) and return the
    count, or 0 while the counting folder does not exist (the rule is not armed).

    One byte appended per call (O_APPEND, so concurrent workers never lose a count)."""
    folder = os.environ.get("EVL_CACHE_FAULT_DIR") or tempfile.gettempdir()
    if not os.path.isdir(folder):
        return 0
    path = os.path.join(folder, f"evl_cache_fault.{os.getppid()}.{point}")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, b".")
    finally:
        os.close(fd)
    return os.path.getsize(path)


def _kill_raylet(point: str, key: object) -> None:
    parent = os.getppid()
    try:
        with open(f"/proc/{parent}/comm") as fh:
            name = fh.read().strip()
    except OSError:
        name = ""
    if name != "raylet":
        raise InjectedFault(f"injected fault at {point} ({key}): kill-raylet outside a Ray worker (parent is '{name}')")
    os.kill(parent, signal.SIGKILL)
    os._exit(137)


def fault_point(point: str, key: object = None) -> None:
    """Run the configured fault for ``point`` (and ``key``), if any; a no-op otherwise."""
    if ENV not in os.environ:
        return
    count = None
    for name, match, action in _rules():
        if name != point:
            continue
        if match is not None and match.startswith("#"):
            count = _nth_call(point) if count is None else count  # one count per call, whatever the rules
            if count != int(match[1:]):
                continue
        elif match is not None and match != str(key):
            continue
        if action == "kill":
            os._exit(137)
        if action == "kill-raylet":
            _kill_raylet(point, key)
        if action == "hang":
            deadline = time.monotonic() + 3600
            while time.monotonic() < deadline:
                time.sleep(0.05)
            return
        raise InjectedFault(f"injected fault at {point} ({key})")
