"""The cache store: a Zarr v3 group that is the contract between extraction and training.

Layout (docs/cache-format.md): the root attribute ``evl_cache`` holds the schema (backbone with its
resolved precision, blocks, frames, sampling, views, attention mode, dtype, classes, manifest
sha256, shard size); arrays sit flat under the root, so a store has no nested directories:

- the per-video table, written by the extraction driver only: ``paths`` (N,) str, ``labels`` (N,)
  int32, ``status`` (N,) uint8 (0 pending, 1 done, 2 failed), ``errors`` (N,) str and
  ``decode_meta`` (N, 2) float32 (frames in the file, fps);
- tensors, one array per kind with every cached block inside one chunk: ``feats`` (N, V, K, T, L, C)
  block outputs (CLS included), and ``attn`` (N, V, K, 2, T-1, P, P) adjacent-frame maps (attention
  ``maps``) or ``qk`` (N, V, K, 2, T, L, H, D) raw q and k (attention ``qk``); compact formats pack
  their codes, scales and top-k indices into the same array's chunks (`evl_cache.formats.StoreFormats`);
  optionally ``emb`` (N, V, T, E) float16, the per-frame CLIP image embeddings (attribute ``emb``).

Chunk = one (video, view); shard = S consecutive videos, one file per tensor array, written by
exactly one task, so writers never share a file. Chunk keys use ``.`` separators (``c.7.0.0...``),
so a shard is a file beside its array's ``zarr.json`` instead of a path 6 directories deep. Every
chunk carries a crc32c (the sharding codec's inner ``crc32c`` codec) and every shard index its own,
so a reader detects a missing, short or damaged chunk and raises (`StoreDataError`) instead of
handing fill values (zeros) to a model.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch

from evl_cache.errors import UserError
from evl_cache.faults import fault_point
from evl_cache.formats import StoreFormats
from evl_cache import location

SCHEMA_VERSION = 2
PENDING, DONE, FAILED = 0, 1, 2
STATUS_NAMES = {PENDING: "pending", DONE: "done", FAILED: "failed"}
TABLE_ARRAYS = ("paths", "labels", "status", "errors", "decode_meta")
TABLE_CHUNK = 65536  # videos per chunk of the per-video table: 4 chunk files per column at K400 size; flushed every few seconds, so its size barely matters
DEFAULT_SHARD_MIB = 1024
MAX_SHARD_VIDEOS = 1024


class StoreDataError(UserError):
    """A done video's data is missing, short or damaged: an error, never zeros."""


# ------------------------------------------------------------------------------------ schema


def tensor_shapes(attrs: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Per-(video, view) chunk shape of every stored tensor array (codes, scales, indices)."""
    return {name: spec.shape for name, spec in StoreFormats(attrs).arrays().items()}


def bytes_per_video(attrs: dict[str, Any]) -> dict[str, int]:
    """Stored (uncompressed) bytes of one video (all V views) in each tensor array."""
    v = int(attrs["num_views"])
    return {name: v * int(np.prod(spec.shape)) * spec.dtype.itemsize for name, spec in StoreFormats(attrs).arrays().items()}


def choose_shard_size(attrs: dict[str, Any], target_mib: float = DEFAULT_SHARD_MIB) -> int:
    """Videos per shard so the largest shard file is about ``target_mib`` MiB (uncompressed).

    Fewer, larger files keep a K400 store to thousands of files; a shard is also the unit that is
    redone after an interruption, so it is capped at `MAX_SHARD_VIDEOS` videos.
    """
    largest = max(bytes_per_video(attrs).values())
    return int(max(1, min(MAX_SHARD_VIDEOS, (target_mib * 2**20) // largest)))


@dataclass
class StoreInfo:
    """Summary numbers for `inspect` and run summaries."""

    num_videos: int
    done: int
    failed: int
    pending: int
    bytes_on_disk: int
    failures: list[tuple[int, str, str]]
    files: int = 0

    def counts(self) -> str:
        return f"{self.done} done, {self.failed} failed, {self.pending} pending of {self.num_videos}"


# ------------------------------------------------------------------------------------ chunk reads


ABSENT = 2**64 - 1
READ_THREADS = int(os.environ.get("EVL_CACHE_READ_THREADS", "8"))  # default pool size of a batch read
MAX_OPEN_FILES = 256  # shard files a reader keeps open (least recently used closed first)
COALESCE_BYTES = 64 << 20  # file-adjacent chunks of one batch form one read job, up to this many bytes
_IOV_MAX = 1024  # preadv's buffer limit (Linux): 2 buffers (payload, crc) per chunk
READ_PIECE = 1 << 20  # bytes per preadv: each piece is checksummed right after its read, while still in cache

_pools: dict[int, tuple[int, ThreadPoolExecutor]] = {}


def read_pool(threads: int) -> ThreadPoolExecutor:
    """This process's pool of ``threads`` reader threads, shared by its readers (a DataLoader worker
    gets its own after fork: threads do not survive fork)."""
    pid = os.getpid()
    got = _pools.get(threads)
    if got is None or got[0] != pid:
        got = _pools[threads] = (pid, ThreadPoolExecutor(threads, thread_name_prefix="evl-read"))
    return got[1]


@dataclass
class _Shard:
    """A shard file as last seen: its identity (inode, mtime, size), its checked index, an open fd."""

    path: str
    key: tuple[int, int, int]
    index: np.ndarray
    fd: int = -1


@dataclass
class _Job:
    """One positioned read: file-adjacent chunks of one shard, each into its batch slot."""

    shard: _Shard
    offset: int
    items: list[tuple[int, int, int, int]]  # (batch position, video, view, nbytes)


@dataclass
class ChunkReader:
    """Reads (video, view) chunks of one sharded tensor array straight from its shard files.

    Zarr's generic read path returns the fill value for a chunk that is absent (a lost or truncated
    shard file), which would hand zeros to a model; it also costs ~1.5 ms per chunk. This reader
    locates a chunk through its shard's index (itself crc32c-checked), refuses an absent or short
    chunk with `StoreDataError`, checks the chunk's own crc32c, then decodes it (raw bytes, or zstd /
    blosc).

    Every shard index it has read is kept, with the shard file's descriptor open, until the file
    changes (another inode, mtime or size: a rewrite renames a new file into place), so each index is
    read once per process. `read_batch` reads a whole batch with a thread pool straight into the
    caller's batch array, file-adjacent chunks as one run (`read_batches`). Descriptors and the pool
    are per process: a pickled or forked reader reopens its files.
    """

    store_path: str
    name: str
    meta: dict[str, Any]
    verify_checksums: bool = True
    threads: int = READ_THREADS
    max_open: int = MAX_OPEN_FILES
    _shards: dict[int, _Shard] = field(default_factory=dict, repr=False)
    _open: OrderedDict = field(default_factory=OrderedDict, repr=False)  # shard -> None, LRU order of open fds
    _pid: int = field(default_factory=os.getpid, repr=False)
    _lock: Any = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        meta = self.meta
        sharding = meta["codecs"][0]
        if sharding["name"] != "sharding_indexed":
            raise UserError(f"array {self.name} of {self.store_path} is not sharded; re-extract the store")
        cfg = sharding["configuration"]
        self.dtype = np.dtype(meta["data_type"]).newbyteorder("<")
        self.shard_shape = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
        self.chunk_shape = tuple(cfg["chunk_shape"])
        self.per_shard = tuple(s // c for s, c in zip(self.shard_shape, self.chunk_shape))
        self.index_bytes = 16 * int(np.prod(self.per_shard)) + 4
        names = [c["name"] for c in cfg["codecs"]]
        if names[0] != "bytes" or names[-1] != "crc32c" or len(names) > 3:
            raise UserError(f"array {self.name} of {self.store_path} has codecs {names}; this evl-cache reads bytes[+zstd|blosc]+crc32c")
        self.compressor = names[1] if len(names) == 3 else None
        self.separator = meta["chunk_key_encoding"].get("configuration", {}).get("separator", "/")
        self.payload_bytes = int(np.prod(self.chunk_shape)) * self.dtype.itemsize
        self.remote = location.is_url(self.store_path)  # object storage: range GETs instead of preadv

    @classmethod
    def open(cls, store_path: str, name: str, verify_checksums: bool = True, threads: int = READ_THREADS) -> "ChunkReader":
        if location.is_url(store_path):
            meta = json.loads(location.read_bytes(location.join(store_path, name, "zarr.json")))
            return cls(store_path, name, meta, verify_checksums, threads)
        with open(os.path.join(store_path, name, "zarr.json")) as fh:
            return cls(store_path, name, json.load(fh), verify_checksums, threads)

    # -- files and indexes ----------------------------------------------------------------------
    def shard_file(self, shard: int) -> str:
        coords = (shard,) + (0,) * (len(self.shard_shape) - 1)
        return location.join(self.store_path, self.name, self.separator.join(["c", *map(str, coords)]))

    def shard_index(self, shard: int) -> np.ndarray:
        """(S, V) x (offset, nbytes) of every chunk of the shard; raises if the file is missing or damaged."""
        with self._lock:
            self._after_fork()
            return self._shard(shard).index

    def _shard(self, shard: int) -> _Shard:
        """The shard as it is now on disk (one stat), its index re-read only if the file changed."""
        if self.remote:
            return self._remote_shard(shard)
        path = self.shard_file(shard)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise StoreDataError(f"shard file {path} is missing") from None
        cached = self._shards.get(shard)
        if cached is not None and cached.key == (st.st_ino, st.st_mtime_ns, st.st_size):
            if cached.fd < 0:
                cached.fd = os.open(path, os.O_RDONLY)
            self._touch(shard)
            return cached
        self._forget(shard)
        fd = os.open(path, os.O_RDONLY)
        try:
            st = os.fstat(fd)  # the file this descriptor reads, should it have been replaced meanwhile
            if st.st_size < self.index_bytes:
                raise StoreDataError(f"shard file {path} is truncated ({st.st_size} bytes)")
            raw = os.pread(fd, self.index_bytes, st.st_size - self.index_bytes)
            body, crc = raw[:-4], raw[-4:]
            if len(raw) != self.index_bytes or _crc32c(body) != crc:
                raise StoreDataError(f"shard file {path} is damaged (index checksum mismatch; truncated or overwritten)")
        except BaseException:
            os.close(fd)
            raise
        index = np.frombuffer(body, dtype="<u8").reshape(*self.per_shard[:2], 2)
        self._shards[shard] = entry = _Shard(path, (st.st_ino, st.st_mtime_ns, st.st_size), index, fd)
        self._touch(shard)
        return entry

    def _remote_shard(self, shard: int) -> _Shard:
        """An object's kept index, or its size (HEAD) and index (a range GET of its tail), checked.

        Objects are replaced whole, never modified in place, and a writer in this process drops the
        kept index (`forget`); a reader does not re-check the object per batch (a HEAD per shard per
        batch would double the requests): a shard replaced by another process meanwhile shows up as a
        chunk that fails its crc32c.
        """
        cached = self._shards.get(shard)
        if cached is not None:
            return cached
        url = self.shard_file(shard)
        try:
            total = location.size(url)
        except FileNotFoundError:
            raise StoreDataError(f"shard object {url} is missing") from None
        if total < self.index_bytes:
            raise StoreDataError(f"shard object {url} is truncated ({total} bytes)")
        raw = location.read_bytes(url, total - self.index_bytes, total)
        body, crc = raw[:-4], raw[-4:]
        if len(raw) != self.index_bytes or _crc32c(body) != crc:
            raise StoreDataError(f"shard object {url} is damaged (index checksum mismatch; truncated or overwritten)")
        index = np.frombuffer(body, dtype="<u8").reshape(*self.per_shard[:2], 2)
        self._shards[shard] = entry = _Shard(url, (0, 0, total), index, -1)
        return entry

    def _touch(self, shard: int) -> None:
        self._open[shard] = None
        self._open.move_to_end(shard)

    def _trim(self, keep: set[int]) -> None:
        """Close the least recently used descriptors beyond ``max_open`` (never one this batch uses)."""
        for shard in [s for s in self._open if s not in keep][: max(0, len(self._open) - self.max_open)]:
            entry = self._shards[shard]
            if entry.fd >= 0:
                os.close(entry.fd)
            entry.fd = -1
            del self._open[shard]

    def forget(self, shard: int) -> None:
        """Drop the shard's kept index and close its file (a writer replaced it)."""
        with self._lock:
            self._forget(shard)

    def _forget(self, shard: int) -> None:
        entry = self._shards.pop(shard, None)
        if entry is not None and entry.fd >= 0:
            os.close(entry.fd)
        self._open.pop(shard, None)

    def _after_fork(self) -> None:
        """In a forked child, drop the parent's descriptors (the child's copies) and reopen on demand."""
        if self._pid != os.getpid():
            self._close_fds()
            self._pid = os.getpid()

    def _close_fds(self) -> None:
        for entry in self._shards.values():
            if entry.fd >= 0:
                try:
                    os.close(entry.fd)
                except OSError:
                    pass
                entry.fd = -1
        self._open.clear()

    def open_files(self) -> int:
        """Shard files this reader holds open now (tests, diagnostics)."""
        return sum(1 for e in self._shards.values() if e.fd >= 0)

    def close(self) -> None:
        """Close every descriptor; indexes stay (checked against the file again on the next read)."""
        with self._lock:
            self._close_fds()

    def __del__(self) -> None:
        try:
            self._close_fds()  # in a forked child these are the child's own copies
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def __getstate__(self) -> dict[str, Any]:
        """Pickled without descriptors or lock: the receiving process opens its own files."""
        state = dict(self.__dict__)
        state["_shards"], state["_open"], state["_lock"], state["_pid"] = {}, OrderedDict(), None, -1
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock, self._pid = threading.Lock(), os.getpid()

    # -- reads ----------------------------------------------------------------------------------
    def read(self, video: int, view: int, out: np.ndarray | None = None) -> np.ndarray:
        """The chunk as a C-order array (read straight into ``out`` when uncompressed)."""
        out = np.empty(self.chunk_shape[2:], dtype=self.dtype) if out is None else out
        self.read_batch([(video, view)], out[None], threads=1)
        return out

    def read_batch(self, pairs: list[tuple[int, int]], out: np.ndarray | None = None,
                   threads: int | None = None) -> np.ndarray:
        """Chunks (video, view) into ``out[b]`` (B, *chunk shape), in any order, duplicates allowed
        (`read_batches` with this one array)."""
        out = np.empty((len(pairs), *self.chunk_shape[2:]), dtype=self.dtype) if out is None else out
        read_batches([(self, out)], pairs, self.threads if threads is None else threads)
        return out

    def _plan(self, pairs: list[tuple[int, int]]) -> list[_Job]:
        """Locate every chunk (raising for an absent or wrong-sized one), then group file-adjacent runs."""
        located = []
        seen: dict[int, _Shard] = {}
        for b, (video, view) in enumerate(pairs):
            shard, pos = divmod(int(video), self.shard_shape[0])
            entry = seen.get(shard)
            if entry is None:
                entry = seen[shard] = self._shard(shard)
            offset, nbytes = (int(v) for v in entry.index[pos, view])
            if offset == ABSENT:
                raise StoreDataError(f"video {video} view {view} has no '{self.name}' chunk in shard file {entry.path}")
            if self.compressor is None and nbytes != self.payload_bytes + 4:
                raise StoreDataError(f"video {video} view {view}: '{self.name}' chunk in {entry.path} has {nbytes} bytes, "
                                     f"expected {self.payload_bytes + 4}")
            located.append((shard, offset, b, int(video), int(view), nbytes))
        self._trim(set(seen))
        if self.compressor is not None:
            return [_Job(seen[s], off, [(b, v, w, n)]) for s, off, b, v, w, n in located]
        jobs: list[_Job] = []
        for s, off, b, v, w, n in sorted(located):
            last = jobs[-1] if jobs else None
            if (last is not None and last.shard is seen[s] and off == last.offset + sum(i[3] for i in last.items)
                    and 2 * len(last.items) + 2 <= _IOV_MAX and sum(i[3] for i in last.items) + n <= COALESCE_BYTES):
                last.items.append((b, v, w, n))
            else:
                jobs.append(_Job(seen[s], off, [(b, v, w, n)]))
        return jobs

    def _run(self, job: _Job, out: np.ndarray) -> tuple[int, StoreDataError] | None:
        """One job's read and checks; returns (batch position, error) instead of raising (pool-safe)."""
        path, fd = job.shard.path, job.shard.fd
        at = job.items[0][0]  # the batch position an error is reported for
        try:
            if self.remote:
                return self._run_remote(job, out)
            if self.compressor is not None:
                b, video, view, nbytes = job.items[0]
                raw = os.pread(fd, nbytes, job.offset)
                if len(raw) != nbytes:
                    raise StoreDataError(f"video {video} view {view}: short read of '{self.name}' in {path} (truncated shard file)")
                body = np.frombuffer(raw, dtype=np.uint8)[:-4]
                self._check(body, raw[-4:], video, view, path)
                data = np.frombuffer(self._decompress(body), dtype=self.dtype)
                if data.size != out[b].size:
                    raise StoreDataError(f"video {video} view {view}: '{self.name}' chunk in {path} decodes to {data.nbytes} bytes")
                np.copyto(out[b], data.reshape(out[b].shape))
                return None
            crcs = np.empty((len(job.items), 4), dtype=np.uint8)
            sums = [0] * len(job.items)
            for piece in self._pieces(job, out, crcs):  # one preadv per piece, checksummed while in cache
                want = sum(len(p[0]) for p in piece)
                got = os.preadv(fd, [p[0] for p in piece], piece[0][2])
                if got != want:
                    for buf, k, _, _ in piece:
                        got -= len(buf)
                        if got < 0:
                            at, (_, video, view_, _) = job.items[k][0], job.items[k]
                            raise StoreDataError(f"video {video} view {view_}: short read of '{self.name}' in {path} "
                                                 "(truncated shard file)")
                if self.verify_checksums:
                    for buf, k, _, payload in piece:
                        if payload:
                            sums[k] = _extend_crc32c(sums[k], buf)
            for k, (b, video, view, _) in enumerate(job.items):
                at = b
                if self.verify_checksums and np.uint32(sums[k]).tobytes() != crcs[k].tobytes():
                    raise StoreDataError(f"video {video} view {view}: '{self.name}' chunk in {path} fails its crc32c")
            return None
        except StoreDataError as err:
            return at, err
        except OSError as err:
            return at, StoreDataError(f"reading '{self.name}' from {path} failed: {err}")

    def _run_remote(self, job: _Job, out: np.ndarray) -> None:
        """One job as one range GET of its adjacent chunks, then each chunk's length and crc32c checked."""
        path = job.shard.path
        total = sum(item[3] for item in job.items)
        try:
            raw = location.read_bytes(path, job.offset, job.offset + total)
        except FileNotFoundError:
            raise StoreDataError(f"shard object {path} is missing") from None
        pos = 0
        for b, video, view, nbytes in job.items:
            chunk = memoryview(raw)[pos:pos + nbytes]
            pos += nbytes
            if len(chunk) != nbytes:
                raise StoreDataError(f"video {video} view {view}: short read of '{self.name}' in {path} (truncated shard object)")
            body = np.frombuffer(chunk, dtype=np.uint8)[:-4]
            self._check(body, bytes(chunk[-4:]), video, view, path)
            data = np.frombuffer(self._decompress(body), dtype=self.dtype) if self.compressor else body.view(self.dtype)
            if data.size != out[b].size:
                raise StoreDataError(f"video {video} view {view}: '{self.name}' chunk in {path} decodes to {data.nbytes} bytes")
            np.copyto(out[b], data.reshape(out[b].shape))
        return None

    def _pieces(self, job: _Job, out: np.ndarray, crcs: np.ndarray) -> Iterator[list[tuple[np.ndarray, int, int, bool]]]:
        """The job's bytes (each chunk's payload slot, then its 4 crc bytes) cut into consecutive
        pieces of at most `READ_PIECE` bytes: lists of (buffer, chunk number, file offset, is payload)."""
        piece: list[tuple[np.ndarray, int, int, bool]] = []
        size, pos = 0, job.offset
        for k, (b, _, _, _) in enumerate(job.items):
            body = out[b].reshape(-1).view(np.uint8)
            for buf, payload in ((body, True), (crcs[k], False)):
                lo = 0
                while lo < len(buf):
                    take = min(len(buf) - lo, READ_PIECE - size)
                    piece.append((buf[lo:lo + take], k, pos, payload))
                    size, pos, lo = size + take, pos + take, lo + take
                    if size == READ_PIECE:
                        yield piece
                        piece, size = [], 0
        if piece:
            yield piece

    def _check(self, body: Any, crc: bytes, video: int, view: int, path: str) -> None:
        if self.verify_checksums and _crc32c(body) != bytes(crc):
            raise StoreDataError(f"video {video} view {view}: '{self.name}' chunk in {path} fails its crc32c")

    def _decompress(self, body: memoryview) -> bytes:
        if self.compressor == "zstd":
            from numcodecs import Zstd

            return Zstd().decode(body)
        from numcodecs import Blosc

        return Blosc().decode(body)


def read_batches(targets: list[tuple[ChunkReader, np.ndarray]], pairs: list[tuple[int, int]],
                 threads: int = READ_THREADS) -> None:
    """Read the chunks (video, view) of ``pairs`` of every (reader, out) into ``out[b]``, all arrays'
    reads in one pool of ``threads`` (1: in this thread).

    Each shard's index comes from the reader's kept ones (one stat per shard per batch). A run of
    chunks that lie back to back in one shard file is one job: its bytes go straight into their slots
    (and 4 crc bytes per chunk) by ``preadv`` calls of `READ_PIECE` bytes that cross chunk boundaries,
    each piece checksummed right after its read, while it is still in the CPU cache. Every chunk is checked as `ChunkReader.read` checks it; an absent
    or wrong-sized chunk raises before any read, a short or damaged one (the first in batch order)
    after all reads have finished, so no thread still writes into an ``out``.
    """
    plans = []
    for reader, out in targets:
        shape = (len(pairs), *reader.chunk_shape[2:])
        if out.shape != shape or out.dtype != reader.dtype or not out.flags.c_contiguous:
            raise ValueError(f"out must be a C-contiguous {reader.dtype} array of shape {shape}")
    locks = sorted({id(reader): reader._lock for reader, _ in targets}.items())  # one order: no deadlock
    locks = [lock for _, lock in locks]
    for lock in locks:
        lock.acquire()
    try:
        for reader, out in targets:
            reader._after_fork()
            plans += [(reader, job, out) for job in reader._plan(pairs)]
        if threads <= 1 or len(plans) <= 1:
            errors = [reader._run(job, out) for reader, job, out in plans]
        else:
            errors = list(read_pool(threads).map(lambda p: p[0]._run(p[1], p[2]), plans))
    finally:
        for lock in reversed(locks):
            lock.release()
    bad = [e for e in errors if e is not None]
    if bad:
        raise min(bad, key=lambda e: e[0])[1]


def _extend_crc32c(crc: int, data: Any) -> int:
    import google_crc32c

    return google_crc32c.extend(crc, data)


def _crc32c(data: Any) -> bytes:
    import google_crc32c

    return np.uint32(google_crc32c.value(data)).tobytes()



# ------------------------------------------------------------------------------------ the table


class VideoTable:
    """The per-video columns in memory, for the driver: marks are cheap, flushes write dirty chunks.

    Marking a shard only updates memory (its cost does not grow with N); `flush` writes each dirty
    chunk of ``errors``, ``decode_meta`` and then ``status``, so a kill mid-flush leaves those videos
    pending (redone), never done with stale metadata. Until a flush, a crash only costs redoing the
    unflushed shards: their files are already durable and rewriting them is deterministic.
    """

    def __init__(self, store: "CacheStore") -> None:
        self.store = store
        self.status = store.status().copy()
        self.errors = np.asarray(store.array("errors")[:], dtype=object)
        self.decode_meta = np.asarray(store.array("decode_meta")[:], dtype=np.float32)
        self._dirty: set[int] = set()
        self._shards: list[int] = []

    def mark(self, results: dict[int, dict[str, Any]], shard: int | None = None) -> None:
        """Record per-video outcomes {index: {"status", "error", "num_frames", "fps"}} in memory."""
        for i, rec in results.items():
            self.status[i] = rec.get("status", PENDING)
            self.errors[i] = rec.get("error", "")
            self.decode_meta[i] = (rec.get("num_frames", 0.0), rec.get("fps", 0.0))
            self._dirty.add(int(i) // TABLE_CHUNK)
        if shard is not None:
            self._shards.append(shard)

    def flush(self) -> None:
        """Write every dirty chunk: errors and metadata first, status (the commit point) last."""
        if not self._dirty:
            return
        ranges = [(c * TABLE_CHUNK, min((c + 1) * TABLE_CHUNK, len(self.status))) for c in sorted(self._dirty)]
        errors, meta, status = (self.store.array(n) for n in ("errors", "decode_meta", "status"))
        for lo, hi in ranges:
            errors[lo:hi] = self.errors[lo:hi]
            meta[lo:hi] = self.decode_meta[lo:hi]
        for shard in self._shards:
            fault_point("mark_before_status", shard)
        for lo, hi in ranges:
            status[lo:hi] = self.status[lo:hi]
        self._dirty.clear()
        self._shards.clear()


# ------------------------------------------------------------------------------------ the store


class CacheStore:
    """An opened cache store. Use `create_store` / `open_store` rather than the constructor."""

    def __init__(self, path: str, group: Any) -> None:
        self.path = path
        self.group = group
        self.attrs: dict[str, Any] = dict(group.attrs["evl_cache"])
        self._arrays: dict[str, Any] = {}
        self._readers: dict[str, ChunkReader] = {}
        self.formats = StoreFormats(self.attrs, path)

    # -- schema -------------------------------------------------------------------------------
    @property
    def num_videos(self) -> int:
        return int(self.attrs["num_videos"])

    @property
    def num_views(self) -> int:
        return int(self.attrs["num_views"])

    @property
    def blocks(self) -> list[int]:
        return list(self.attrs["blocks"])

    @property
    def attention(self) -> str:
        return self.attrs["attention"]

    @property
    def class_names(self) -> list[str]:
        return list(self.attrs["class_names"])

    @property
    def shard_size(self) -> int:
        return int(self.attrs["shard_size"])

    def array(self, name: str) -> Any:
        if name not in self._arrays:
            self._arrays[name] = self.group[name]
        return self._arrays[name]

    def tensor_names(self) -> list[str]:
        return list(tensor_shapes(self.attrs))

    def reader(self, name: str) -> ChunkReader:
        if name not in self._readers:
            self._readers[name] = ChunkReader.open(self.path, name)
        return self._readers[name]

    # -- per-video table ----------------------------------------------------------------------
    def status(self) -> np.ndarray:
        return np.asarray(self.array("status")[:])

    def labels(self) -> np.ndarray:
        return np.asarray(self.array("labels")[:])

    def paths(self) -> list[str]:
        return [str(p) for p in self.array("paths")[:]]

    def errors(self) -> list[str]:
        return [str(e) for e in self.array("errors")[:]]

    def decode_meta(self) -> np.ndarray:
        return np.asarray(self.array("decode_meta")[:])

    def done_indices(self) -> np.ndarray:
        return np.flatnonzero(self.status() == DONE)

    def mark(self, results: dict[int, dict[str, Any]]) -> None:
        """Record per-video outcomes now (one-off callers; the extraction driver batches a `VideoTable`)."""
        table = VideoTable(self)
        table.mark(results)
        table.flush()

    # -- tensors ------------------------------------------------------------------------------
    def write_videos(self, shard: int, todo: list[int], videos: list[int], tensors: dict[str, np.ndarray],
                     keep: Iterable[int] = ()) -> list[str]:
        """Write ``videos`` (global indices in ``shard``, those of ``todo`` that succeeded), then fsync.

        ``tensors[name]`` has shape (len(videos), V, *chunk shape). ``keep`` lists the shard's done
        videos: their chunks must already be there, else `StoreDataError` (a retry never papers over
        lost data). When ``todo`` is the whole shard, its file is written in one go, the rows of
        failed videos left at the fill value, which Zarr does not store (absent chunks). Otherwise
        each run of consecutive videos is one read-modify-write of the shard file, which Zarr
        rebuilds from the existing chunk bytes, so every other chunk keeps its bytes. Every write is
        a temp file renamed into place. Returns the shard files written.
        """
        fault_point("shard_write", shard)
        lo = shard * self.shard_size
        hi = min(lo + self.shard_size, self.num_videos)
        keep = list(keep)
        for name in self.tensor_names() if keep else []:  # check every array before writing any
            reader = self.reader(name)
            try:
                index = reader.shard_index(shard)
            except StoreDataError as err:
                raise StoreDataError(f"done videos {keep[:5]} cannot be kept: {err}") from None
            lost = [i for i in keep if int(index[i - lo, 0, 0]) == 2**64 - 1]
            if lost:
                raise StoreDataError(f"done videos {lost[:5]} have no '{name}' data in {reader.shard_file(shard)}")
        files = []
        for name in self.tensor_names():
            arr = self.array(name)
            data = tensors[name].astype(arr.dtype, copy=False) if videos else None
            if sorted(todo) != list(range(lo, hi)):
                for start, stop in consecutive_runs(videos):
                    first = videos.index(start)
                    arr[start:stop] = data[first:first + stop - start]
            elif videos:
                full = np.full((hi - lo, *arr.shape[1:]), arr.fill_value, dtype=arr.dtype)
                full[np.asarray(videos) - lo] = data
                arr[lo:hi] = full
            files.append(self.reader(name).shard_file(shard))
            self.reader(name).forget(shard)  # drop the replaced file's descriptor: it would pin its disk space
        sync_files(f for f in files if os.path.exists(f))
        return files

    def read(self, video: int, view: int) -> dict[str, torch.Tensor]:
        """One (video, view) as the decoder's input dict (unbatched), on the CPU.

        ``feats`` (K, T, L, C); ``attn`` (K, 2, T-1, P, P) or ``q``/``k`` (K, T, L, H, D); ``label``.
        Float formats come in their storage dtype, quantized ones decoded to float16.
        Raises `StoreDataError` naming the file and the fix if the chunk is absent or damaged.
        """
        stored: dict[str, torch.Tensor] = {}
        for name in self.tensor_names():
            try:
                stored[name] = torch.from_numpy(self.reader(name).read(video, view)[None])
            except StoreDataError as err:
                raise StoreDataError(data_error_hint(self.path, str(err))) from None
        out = {k: v[0] for k, v in self.formats.decode(stored).items()}
        out["label"] = torch.tensor(int(self.array("labels")[video]))
        return out

    # -- summaries ----------------------------------------------------------------------------
    def info(self) -> StoreInfo:
        status = self.status()
        errors = self.errors()
        paths = self.paths()
        failures = [(int(i), paths[i], errors[i]) for i in np.flatnonzero(status == FAILED)]
        files, nbytes = count_entries(self.path)
        return StoreInfo(
            num_videos=self.num_videos,
            done=int((status == DONE).sum()),
            failed=int((status == FAILED).sum()),
            pending=int((status == PENDING).sum()),
            bytes_on_disk=nbytes,
            failures=failures,
            files=files,
        )

    def raw_bytes_per_view(self) -> int:
        """Stored bytes of one (video, view)'s arrays (codes, scales, indices), uncompressed."""
        return sum(bytes_per_video(self.attrs).values()) // self.num_views


def consecutive_runs(indices: list[int]) -> list[tuple[int, int]]:
    """[3, 4, 5, 9] -> [(3, 6), (9, 10)]: half-open ranges of consecutive indices."""
    runs: list[tuple[int, int]] = []
    for i in indices:
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def data_error_hint(store_path: str, message: str) -> str:
    return (f"{message}; the store {store_path} has lost data of a done video: run "
            f"`evl-cache verify {store_path} --repair`, then rerun the extract command to recompute it")


def comparable_attr(key: str, value: Any) -> Any:
    """A schema attribute as it must match between stores/checkpoints: the backbone is identified by
    its weights' sha256 (``weights_id``), not by the path the weights were read from, which may differ
    between machines."""
    if key == "backbone" and isinstance(value, dict):
        return {k: v for k, v in value.items() if k != "weights"}
    if key == "emb":  # optional since per-frame embeddings were added: a store without the key has none
        return bool(value)
    return value


def count_entries(path: str) -> tuple[int, int]:
    """(files + directories under ``path``, bytes of its files); for a URL, objects + implied folders."""
    if location.is_url(path):
        return location.count_entries(path)
    entries, total = 0, 0
    for root, dirs, files in os.walk(path):
        entries += len(dirs) + len(files)
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return entries, total


def sync_files(files: Iterable[str]) -> None:
    """fsync each file, then each containing directory (so the renames that created them are durable)."""
    files = list(files)
    for path in [*files, *sorted({os.path.dirname(f) for f in files})]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def create_store(path: str, attrs: dict[str, Any], paths: list[str], labels: list[int], shard_size: int | None = None,
                 compressor: str | None = None) -> CacheStore:
    """Create an empty store with every array allocated and all videos pending.

    ``attrs`` must hold: backbone, blocks, frames, tokens, width, heads, grid, sampling, views,
    num_views, attention, dtype, class_names, manifest_sha256. ``shard_size`` defaults to
    `choose_shard_size` (about 1 GiB per shard file).
    """
    import zarr

    attrs = dict(attrs)
    n, v = len(paths), int(attrs["num_views"])
    shard_size = int(shard_size or choose_shard_size(attrs))
    attrs.update(schema_version=SCHEMA_VERSION, num_videos=n, shard_size=shard_size, compressor=compressor)
    flat = {"name": "default", "separator": "."}
    target = location.zarr_store(path, read_only=False) if location.is_url(path) else path
    group = zarr.open_group(target, mode="w-", zarr_format=3)
    chunk = (max(1, min(n, TABLE_CHUNK)),)

    def column(name: str, **kw: Any) -> Any:
        return group.create_array(name, chunks=kw.pop("chunks", chunk), chunk_key_encoding=flat, **kw)

    column("paths", shape=(n,), dtype=str)[:] = np.array(paths, dtype=object)
    column("labels", shape=(n,), dtype=np.int32)[:] = np.asarray(labels, dtype=np.int32)
    column("status", shape=(n,), dtype=np.uint8, fill_value=PENDING)
    column("errors", shape=(n,), dtype=str, fill_value="")
    column("decode_meta", shape=(n, 2), dtype=np.float32, fill_value=0.0, chunks=(chunk[0], 2))
    for name, spec in StoreFormats(attrs).arrays().items():
        create_tensor_array(group, name, spec, n, v, shard_size, compressor)
    group.attrs["evl_cache"] = attrs
    return CacheStore(path, group)


def create_tensor_array(group: Any, name: str, spec: Any, n: int, v: int, shard_size: int, compressor: str | None,
                        overwrite: bool = False) -> Any:
    """One tensor array: chunk = one (video, view), shard = ``shard_size`` videos, crc32c per chunk.
    Used by `create_store` and to add a kind to an existing store (`evl_cache.derive`)."""
    from zarr.codecs import Crc32cCodec

    return group.create_array(
        name,
        shape=(n, v, *spec.shape),
        dtype=spec.dtype,
        chunks=(1, 1, *spec.shape),
        shards=(shard_size, v, *spec.shape),
        compressors=[*_compressors(compressor, spec.dtype.itemsize), Crc32cCodec()],
        chunk_key_encoding={"name": "default", "separator": "."},
        fill_value=spec.fill,  # NaN (floats): never a real chunk, so rows at the fill are not stored
        overwrite=overwrite,
    )


def _compressors(name: str | None, typesize: int = 2) -> list[Any]:
    if name in (None, "", "none"):
        return []
    from zarr.codecs import BloscCodec, ZstdCodec

    if name == "zstd":
        return [ZstdCodec(level=3)]
    if name == "blosc":
        return [BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle", typesize=typesize)]
    raise UserError(f"unknown compressor '{name}'; use none, zstd or blosc")


def open_store(path: str, mode: str = "r") -> CacheStore:
    """Open an existing store, failing with one clear line if it is missing or not an evl-cache store."""
    import zarr

    remote = location.is_url(path)
    if not remote and not Path(path, "zarr.json").is_file():
        raise UserError(f"no cache store at {path}; run `evl-cache extract` first or check the path")
    try:
        if remote and not location.exists(location.join(path, "zarr.json")):
            raise UserError(f"no cache store at {path} (no zarr.json object); run `evl-cache extract` first or check the URL")
        group = zarr.open_group(location.zarr_store(path, read_only=mode == "r") if remote else path, mode=mode, zarr_format=3)
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - any zarr failure means an unreadable store
        raise UserError(f"cannot open cache store {path} ({err.__class__.__name__}: {err}); is it a Zarr v3 store?") from err
    if "evl_cache" not in group.attrs:
        raise UserError(f"{path} is a Zarr group but not an evl-cache store (no 'evl_cache' attributes)")
    store = CacheStore(path, group)
    version = store.attrs.get("schema_version")
    if version != SCHEMA_VERSION:
        raise UserError(f"store {path} has schema version {version}; this evl-cache reads version {SCHEMA_VERSION}: re-extract it")
    return store


def remove_partial_files(path: str) -> int:
    """Delete temp files a killed writer left behind (zarr writes ``*.partial`` then renames)."""
    if location.is_url(path):
        return 0  # object PUTs are atomic: there are no temp objects (docs/object-storage.md)
    removed = 0
    for root, _, files in os.walk(path):
        for f in files:
            if f.endswith(".partial"):
                os.remove(os.path.join(root, f))
                removed += 1
    return removed


def delete_store(path: str) -> None:
    if location.is_url(path):
        location.remove(path)
        return
    shutil.rmtree(path, ignore_errors=True)


def shards_of(indices: Iterable[int], shard_size: int) -> dict[int, list[int]]:
    """Group video indices by shard."""
    out: dict[int, list[int]] = {}
    for i in indices:
        out.setdefault(int(i) // shard_size, []).append(int(i))
    return out
