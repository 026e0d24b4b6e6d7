"""How complete a cache store is, and the rule that stage 2 uses only finished stores by default.

A store's per-video status is pending (not extracted yet), done or failed (extraction recorded the
video as unusable, e.g. unreadable). Training or evaluating on a store with pending videos silently
measures a different data set than the manifest, so train and eval refuse it unless the user says
`--allow-partial`. Failed videos are a final outcome, not partial work: they are skipped and counted.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from evl_cache.errors import UserError
from evl_cache.store import DONE, FAILED, PENDING


def video_counts(store: Any) -> dict[str, int]:
    """{"total", "done", "failed", "pending"} from the store's per-video status (no directory walk)."""
    status = np.asarray(store.status())
    return {"total": int(status.size), "done": int((status == DONE).sum()),
            "failed": int((status == FAILED).sum()), "pending": int((status == PENDING).sum())}


def counts_text(counts: dict[str, int]) -> str:
    """'980 done, 12 failed, 8 pending' for one-line summaries."""
    return f"{counts['done']} done, {counts['failed']} failed, {counts['pending']} pending"


def require_complete(counts: dict[str, int], where: str, allow_partial: bool, flag: str = "--allow-partial") -> None:
    """Refuse a store with pending videos unless ``allow_partial``; ``flag`` names how to allow it."""
    if counts["pending"] and not allow_partial:
        raise UserError(
            f"store {where} is partly extracted: {counts['pending']} of {counts['total']} videos are still pending; "
            f"finish it by rerunning the same `evl-cache extract` command (it resumes), "
            f"or pass {flag} to use its {counts['done']} done videos"
        )


def store_line(what: str, where: str, counts: dict[str, int]) -> str:
    """The line train prints at start: what it reads and how much of it is usable."""
    skipped = f"; {counts['failed']} failed videos are skipped" if counts["failed"] else ""
    partial = f"; {counts['pending']} pending videos are left out (--allow-partial)" if counts["pending"] else ""
    return f"{what} {where}: {counts['total']} videos, {counts_text(counts)}{skipped}{partial}"
