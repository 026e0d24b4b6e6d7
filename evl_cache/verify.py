"""`evl-cache verify`: prove every done (video, view) chunk of a store is present, full and intact.

For each shard holding done videos it reads the shard index once (crc32c-checked), then every done
video's chunk of every tensor array, checking length and the chunk's own crc32c (``--quick`` checks
the index entries and lengths only, without reading the data). ``--repair`` marks the bad videos
pending, so rerunning the same extract command recomputes exactly those.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from evl_cache.store import DONE, PENDING, StoreDataError, open_store, shards_of


@dataclass
class VerifyReport:
    store: str
    checked_videos: int
    checked_chunks: int
    bytes_read: int
    seconds: float
    bad: list[tuple[int, str, str]] = field(default_factory=list)  # (video index, path, reason)
    repaired: bool = False

    def lines(self) -> list[str]:
        head = (f"verify {self.store}: {self.checked_videos} done videos, {self.checked_chunks} chunks, "
                f"{self.bytes_read / 2**20:.1f} MiB read in {self.seconds:.1f} s: ")
        if not self.bad:
            return [head + "all intact"]
        out = [head + f"{len(self.bad)} bad video(s)"]
        out += [f"  bad #{i} {path}: {reason}" for i, path, reason in self.bad[:50]]
        if len(self.bad) > 50:
            out.append(f"  ... and {len(self.bad) - 50} more")
        out.append(f"marked {len(self.bad)} video(s) pending: rerun the extract command to recompute them" if self.repaired
                   else f"run `evl-cache verify {self.store} --repair`, then rerun the extract command")
        return out


def verify_store(path: str, repair: bool = False, quick: bool = False, progress: Any = None) -> VerifyReport:
    """Check every done video's chunks; with ``repair`` mark the bad ones pending."""
    store = open_store(path, mode="r+" if repair else "r")
    started = time.perf_counter()
    done = store.done_indices()
    paths = store.paths()
    bad: dict[int, str] = {}
    chunks = nbytes = 0
    for shard, videos in shards_of(done, store.shard_size).items():
        for name in store.tensor_names():
            reader = store.reader(name)
            try:
                index = reader.shard_index(shard)
            except StoreDataError as err:
                for i in videos:
                    bad.setdefault(i, str(err))
                continue
            for i in videos:
                for view in range(store.num_views):
                    chunks += 1
                    try:
                        if quick:
                            _check_entry(reader, index, i, view)
                        else:
                            reader.read(i, view)
                            nbytes += reader.payload_bytes
                    except StoreDataError as err:
                        bad.setdefault(i, str(err))
        if progress is not None:
            progress(len(videos))
    report = VerifyReport(path, len(done), chunks, nbytes, time.perf_counter() - started,
                          [(i, paths[i], bad[i]) for i in sorted(bad)])
    if repair and bad:
        store.mark({i: {"status": PENDING, "error": f"verify: {reason}"} for i, reason in bad.items()})
        report.repaired = True
    return report


def _check_entry(reader: Any, index: np.ndarray, video: int, view: int) -> None:
    """Index-only check: the chunk is listed and, when uncompressed, has the full length."""
    offset, nbytes = (int(v) for v in index[video % reader.shard_shape[0], view])
    if offset == 2**64 - 1:
        raise StoreDataError(f"video {video} view {view} has no '{reader.name}' chunk in {reader.shard_file(video // reader.shard_shape[0])}")
    if reader.compressor is None and nbytes != reader.payload_bytes + 4:
        raise StoreDataError(f"video {video} view {view}: '{reader.name}' chunk has {nbytes} bytes, expected {reader.payload_bytes + 4}")

