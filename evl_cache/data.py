"""Streaming cached (video, view) tensors from a store into decoder batches.

Training: every epoch visits each done video exactly once, with one of its V cached views chosen at
random; the order and the views depend only on (seed, epoch), and the sampler is one endless
stream that can start at any position, which is what makes `--resume` exact. Evaluation visits
every (done video, view) in order. Items are encoded as ``video * V + view`` integers so the
DataLoader's main process decides the order and the workers only read.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler

from evl_cache.store import CacheStore, open_store, tensor_shapes


class ShardChunkReader:
    """Reads one (video, view) chunk of an uncompressed sharded Zarr v3 array with a single file read.

    Zarr's generic path costs about 1.5 ms per chunk here (async round trip, shard-index parse,
    copies), which caps one DataLoader worker near 500 MB/s. For the layout `create_store` writes
    without a compressor (sharding codec, inner ``bytes`` little-endian, index = ``bytes`` +
    ``crc32c`` at the end of the shard file, ``/``-separated chunk keys) the chunk is a plain
    C-order byte range, located through the shard's index (read once per shard file and checked
    against its crc32c). `for_array` returns None for any other layout; callers then use Zarr.
    """

    EMPTY = 2**64 - 1

    def __init__(self, root: str, meta: dict[str, Any]) -> None:
        self.root = root
        self.dtype = np.dtype(meta["data_type"]).newbyteorder("<")
        self.shard_shape = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
        sharding = meta["codecs"][0]["configuration"]
        self.chunk_shape = tuple(sharding["chunk_shape"])
        self.per_shard = tuple(s // c for s, c in zip(self.shard_shape, self.chunk_shape))
        self.index_bytes = 16 * int(np.prod(self.per_shard)) + 4
        self.fill = meta.get("fill_value", 0)
        self._index: dict[str, tuple[int, np.ndarray]] = {}

    @classmethod
    def for_array(cls, root: str) -> "ShardChunkReader | None":
        import json

        try:
            with open(os.path.join(root, "zarr.json")) as fh:
                meta = json.load(fh)
            codecs = meta["codecs"]
            cfg = codecs[0]["configuration"]
            ok = (
                len(codecs) == 1 and codecs[0]["name"] == "sharding_indexed"
                and [c["name"] for c in cfg["codecs"]] == ["bytes"]
                and cfg["codecs"][0].get("configuration", {}).get("endian", "little") == "little"
                and [c["name"] for c in cfg["index_codecs"]] == ["bytes", "crc32c"]
                and cfg["index_codecs"][0].get("configuration", {}).get("endian", "little") == "little"
                and cfg.get("index_location", "end") == "end"
                and meta["chunk_key_encoding"]["name"] == "default"
                and meta["chunk_key_encoding"].get("configuration", {}).get("separator", "/") == "/"
                and meta["chunk_grid"]["name"] == "regular"
                and meta["data_type"] in ("float16", "float32")
                and all(c == 1 for c in cfg["chunk_shape"][:2])
                and list(cfg["chunk_shape"][2:]) == list(meta["shape"][2:])
            )
        except (OSError, KeyError, IndexError, TypeError, ValueError):
            return None
        return cls(root, meta) if ok else None

    def _shard_index(self, path: str) -> np.ndarray | None:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        cached = self._index.get(path)
        if cached is not None and cached[0] == st.st_mtime_ns:
            return cached[1]
        import google_crc32c

        with open(path, "rb") as fh:
            fh.seek(st.st_size - self.index_bytes)
            raw = fh.read(self.index_bytes)
        body, crc = raw[:-4], raw[-4:]
        if np.uint32(google_crc32c.value(body)).tobytes() != crc:
            raise OSError(f"shard index checksum mismatch in {path}; the store is corrupt, re-extract it")
        index = np.frombuffer(body, dtype="<u8").reshape(*self.per_shard, 2)
        self._index = {path: (st.st_mtime_ns, index)}  # one shard at a time: reads are shard-local
        return index

    def read(self, video: int, view: int, out: np.ndarray | None = None) -> np.ndarray:
        """The chunk as a C-order array, read straight into ``out`` (contiguous, chunk-shaped) if given."""
        coords = (video // self.shard_shape[0], view // self.shard_shape[1]) + (0,) * (len(self.shard_shape) - 2)
        path = os.path.join(self.root, "c", *map(str, coords))
        index = self._shard_index(path)
        out = np.empty(self.chunk_shape[2:], dtype=self.dtype) if out is None else out
        pos = (video % self.shard_shape[0], view % self.shard_shape[1]) + (0,) * (len(self.shard_shape) - 2)
        if index is None or int(index[pos][0]) == self.EMPTY:
            out.fill(self.fill)
            return out
        offset, nbytes = int(index[pos][0]), int(index[pos][1])
        if nbytes != out.nbytes:
            raise OSError(f"chunk ({video}, {view}) in {path} has {nbytes} bytes, expected {out.nbytes}; re-extract the store")
        with open(path, "rb", buffering=0) as fh:
            fh.seek(offset)
            if fh.readinto(memoryview(out).cast("B")) != nbytes:
                raise OSError(f"short read of chunk ({video}, {view}) in {path}; the store is truncated")
        return out


class StoreDataset(Dataset):
    """Map-style dataset over a store: item ``video * V + view`` -> the decoder's input dict.

    Each process (main or DataLoader worker) opens the store itself on first use: Zarr objects
    are not shared across fork.
    """

    def __init__(self, path: str, fast: bool = True) -> None:
        self.path = path
        store = open_store(path)
        self.num_views = store.num_views
        self.num_videos = store.num_videos
        self.names = store.tensor_names()
        self.labels = torch.from_numpy(store.labels().astype(np.int64))
        self.fast = fast and "://" not in path
        self._store: CacheStore | None = None
        self._readers: dict[str, ShardChunkReader] | None = None
        self._pid = -1

    @property
    def store(self) -> CacheStore:
        if self._store is None or self._pid != os.getpid():
            self._store = open_store(self.path)
            self._pid = os.getpid()
            readers = {n: ShardChunkReader.for_array(os.path.join(self.path, n)) for n in self.names} if self.fast else {}
            self._readers = readers if readers and all(readers.values()) else None
        return self._store

    @property
    def uses_fast_path(self) -> bool:
        self.store
        return self._readers is not None

    def read(self, video: int, view: int) -> dict[str, torch.Tensor]:
        """Same result as `CacheStore.read`, through one file read per tensor when the layout allows."""
        store = self.store
        if self._readers is None:
            return store.read(video, view)
        groups: dict[str, list[np.ndarray]] = {}
        for name in self.names:
            groups.setdefault(name.split("/")[0], []).append(self._readers[name].read(video, view))
        out = {kind: torch.from_numpy(np.stack(parts)) for kind, parts in groups.items()}
        out["label"] = self.labels[video].clone()
        return out

    def __len__(self) -> int:
        return self.num_videos * self.num_views

    def __getitem__(self, item: int) -> dict[str, torch.Tensor]:
        video, view = divmod(int(item), self.num_views)
        out = self.read(video, view)
        out["video"] = torch.tensor(video)
        return out

    def __getitems__(self, items: list[int]) -> dict[str, torch.Tensor]:
        """A whole batch, each chunk read straight into its slot of the batch tensor (no stacking copy;
        in a DataLoader worker the batch is allocated in shared memory, as torch's collate does)."""
        self.store
        if self._readers is None:
            return stack_items([self[i] for i in items])
        pairs = [divmod(int(i), self.num_views) for i in items]
        in_worker = torch.utils.data.get_worker_info() is not None
        kinds: dict[str, list[str]] = {}
        for name in self.names:
            kinds.setdefault(name.split("/")[0], []).append(name)
        out: dict[str, torch.Tensor] = {}
        for kind, names in kinds.items():
            first = self._readers[names[0]]
            dtype = torch.float16 if first.dtype == np.float16 else torch.float32
            shape = (len(pairs), len(names), *first.chunk_shape[2:])
            if in_worker:  # allocate in shared memory up front: handing the batch over costs no copy
                storage = torch.UntypedStorage._new_shared(int(np.prod(shape)) * first.dtype.itemsize)
                tensor = torch.empty(0, dtype=dtype).set_(storage, 0, shape)
            else:
                tensor = torch.empty(shape, dtype=dtype)
            arr = tensor.numpy()
            for b, (video, view) in enumerate(pairs):
                for k, name in enumerate(names):
                    self._readers[name].read(video, view, out=arr[b, k])
            out[kind] = tensor
        videos = torch.tensor([v for v, _ in pairs], dtype=torch.int64)
        out["label"] = self.labels[videos]
        out["video"] = videos
        return out

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_store"], state["_readers"], state["_pid"] = None, None, -1
        return state


class EpochSampler(Sampler[int]):
    """Endless stream of items: epoch e is a permutation of the done videos, each with a random view,
    drawn from numpy's generator seeded by (seed, e). ``start`` skips that many items (resume)."""

    def __init__(self, videos: np.ndarray, num_views: int, seed: int, start: int = 0) -> None:
        self.videos = np.asarray(videos, dtype=np.int64)
        if len(self.videos) == 0:
            raise ValueError("no done videos to sample from")
        self.num_views = int(num_views)
        self.seed = int(seed)
        self.start = int(start)

    def epoch_items(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch])
        order = self.videos[rng.permutation(len(self.videos))]
        views = rng.integers(0, self.num_views, size=len(order))
        return order * self.num_views + views

    def __iter__(self) -> Iterator[int]:
        epoch, offset = divmod(self.start, len(self.videos))
        while True:
            items = self.epoch_items(epoch)
            for item in items[offset:]:
                yield int(item)
            epoch, offset = epoch + 1, 0


def stack_items(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Batch a list of item dicts (numpy's stack: several times faster than torch.stack for fp16 on CPU)."""
    return {k: torch.from_numpy(np.stack([it[k].numpy() for it in items])) for k in items[0]}


def collate(batch: dict[str, torch.Tensor] | list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Pass through batches `StoreDataset.__getitems__` already built; stack lists of items."""
    return batch if isinstance(batch, dict) else stack_items(batch)


def eval_items(store: CacheStore) -> list[int]:
    """Every (done video, view), video-major."""
    v = store.num_views
    return [int(i) * v + j for i in store.done_indices() for j in range(v)]


def make_loader(path: str, batch_size: int, *, train: bool, seed: int = 0, start: int = 0,
                num_workers: int = 0, prefetch_factor: int = 2, pin_memory: bool = False,
                items: list[int] | None = None, fast: bool = True) -> DataLoader:
    """A DataLoader yielding batched decoder dicts (``feats``, ``attn`` | ``q``/``k``, ``label``, ``video``).

    ``train``: endless `EpochSampler` stream from position ``start`` in full batches; otherwise the
    given ``items`` (default: `eval_items`) once, last batch partial. The loader gets its own
    generator so creating it never draws from the global torch RNG (exact resume).
    """
    dataset = StoreDataset(path, fast=fast)
    store = dataset.store
    if train:
        sampler: Any = EpochSampler(store.done_indices(), store.num_views, seed, start)
        batches = BatchSampler(sampler, batch_size, drop_last=True)
    else:
        batches = BatchSampler(items if items is not None else eval_items(store), batch_size, drop_last=False)
    kwargs: dict[str, Any] = {}
    if num_workers > 0:
        kwargs.update(prefetch_factor=prefetch_factor, worker_init_fn=_worker_init, persistent_workers=False)
    return DataLoader(dataset, batch_sampler=batches, num_workers=num_workers, pin_memory=pin_memory,
                      collate_fn=collate, generator=torch.Generator(), **kwargs)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # workers only copy bytes; leave the cores to the training step


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


# ------------------------------------------------------------------------------ measurement


@dataclass
class Throughput:
    clip_views: int
    bytes: int
    seconds: float

    @property
    def clip_views_per_s(self) -> float:
        return self.clip_views / self.seconds

    @property
    def mb_per_s(self) -> float:
        return self.bytes / self.seconds / 1e6


def measure_loader(path: str, batch_size: int, num_batches: int, num_workers: int = 0,
                   prefetch_factor: int = 2, fast: bool = True) -> Throughput:
    """Clip-views/s and MB/s (payload bytes) of the training DataLoader alone."""
    store = open_store(path)
    per_view = store.raw_bytes_per_view()
    loader = make_loader(path, batch_size, train=True, num_workers=num_workers, prefetch_factor=prefetch_factor, fast=fast)
    it = iter(loader)
    next(it)  # worker start-up is not throughput
    started = time.perf_counter()
    for _ in range(num_batches):
        next(it)
    seconds = time.perf_counter() - started
    del it
    n = num_batches * batch_size
    return Throughput(n, n * per_view, seconds)


def measure_raw(path: str, passes: int = 3) -> Throughput:
    """Plain file reads of every tensor shard file (the fastest of ``passes``): the ceiling any loader
    could reach on this disk and page cache."""
    store = open_store(path)
    files = []
    for name in tensor_shapes(store.attrs):
        root = os.path.join(path, name, "c")
        for dirpath, _, names in os.walk(root):
            files.extend(os.path.join(dirpath, f) for f in names)
    buf = bytearray(1 << 22)
    best = float("inf")
    for _ in range(passes):
        total = 0
        started = time.perf_counter()
        for f in files:
            with open(f, "rb", buffering=0) as fh:
                while n := fh.readinto(buf):
                    total += n
        best = min(best, time.perf_counter() - started)
    seconds = best
    per_view = store.raw_bytes_per_view()
    return Throughput(total // per_view, total, seconds)
