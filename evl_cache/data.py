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

from evl_cache.formats import StoreFormats, torch_dtype
from evl_cache.ring import RingLoader
from evl_cache.store import (
    READ_THREADS,
    CacheStore,
    StoreDataError,
    data_error_hint,
    open_store,
    read_batches,
    tensor_shapes,
)


class StoreDataset(Dataset):
    """Map-style dataset over a store: item ``video * V + view`` -> the decoder's input dict.

    Reads go through the store's `ChunkReader`s (a batch at a time, by a pool of ``threads``, checked): a done
    video whose chunk is absent, short or damaged raises `StoreDataError` naming the shard file and
    `evl-cache verify`; it never yields zeros. Each process (main or DataLoader worker) opens the
    store itself on first use: Zarr objects and open files are not shared across fork.
    """

    def __init__(self, path: str, threads: int = READ_THREADS, pin_memory: bool = False,
                 needs: Any = None) -> None:
        self.path = path
        self.threads = int(threads)  # reader threads per process (main or worker)
        self.pin_memory = bool(pin_memory) and torch.cuda.is_available()  # main-process batches land pinned
        store = open_store(path)
        self.num_views = store.num_views
        self.num_videos = store.num_videos
        self.formats = StoreFormats(store.attrs, path)
        self.specs = self.formats.arrays()
        if needs is not None:  # read only what the model reads (its head's declared needs)
            keep = self.formats.arrays_for(needs)
            self.specs = {name: spec for name, spec in self.specs.items() if name in keep}
        self.labels = torch.from_numpy(store.labels().astype(np.int64))
        self._store: CacheStore | None = None
        self._pid = -1

    @property
    def store(self) -> CacheStore:
        if self._store is None or self._pid != os.getpid():
            self._store = open_store(self.path)
            self._pid = os.getpid()
        return self._store

    def read(self, video: int, view: int) -> dict[str, torch.Tensor]:
        """The decoder's input dict for one (video, view) (same result as `CacheStore.read`)."""
        return self.store.read(video, view)

    def __len__(self) -> int:
        return self.num_videos * self.num_views

    def __getitem__(self, item: int) -> dict[str, torch.Tensor]:
        video, view = divmod(int(item), self.num_views)
        out = self.read(video, view)
        out["video"] = torch.tensor(video)
        return out

    def __getitems__(self, items: list[int]) -> dict[str, torch.Tensor]:
        """A whole batch, every array's chunks read by one thread pool straight into their slots of
        the batch tensors (`evl_cache.store.read_batches`: no stacking copy, file-adjacent chunks
        coalesced). In a DataLoader worker the batch is allocated in shared memory, as torch's collate
        does; in the main process, in pinned memory when the loader pins on CUDA, else from numpy
        (whose large buffers get transparent huge pages: torch's CPU allocator pays one page fault
        per 4 KiB of a fresh batch)."""
        in_worker = torch.utils.data.get_worker_info() is not None
        out: dict[str, torch.Tensor] = {}
        for name, spec in self.specs.items():
            shape = (len(items), *spec.shape)
            if in_worker:  # allocate in shared memory up front: handing the batch over costs no copy
                storage = torch.UntypedStorage._new_shared(int(np.prod(shape)) * spec.dtype.itemsize)
                out[name] = torch.empty(0, dtype=torch_dtype(spec.dtype)).set_(storage, 0, shape)
            elif self.pin_memory:
                out[name] = torch.empty(shape, dtype=torch_dtype(spec.dtype), pin_memory=True)
            else:
                out[name] = torch.from_numpy(np.empty(shape, dtype=spec.dtype))
        return self.read_into(items, out)

    def read_into(self, items: list[int], out: dict[str, torch.Tensor]) -> dict[str, Any]:
        """The batch of ``items`` read into the given tensors (one (len(items), *chunk shape) C-order
        CPU tensor per stored array: fresh ones, or a `evl_cache.ring` slot), plus fresh ``label``
        and ``video`` tensors and the store's formats (`to_device` decodes by them)."""
        store = self.store
        pairs = [divmod(int(i), self.num_views) for i in items]
        targets = [(store.reader(name), out[name].numpy()) for name in self.specs]
        try:
            read_batches(targets, pairs, self.threads)
        except StoreDataError as err:
            raise StoreDataError(data_error_hint(self.path, str(err))) from None
        batch: dict[str, Any] = dict(out)
        videos = torch.tensor([v for v, _ in pairs], dtype=torch.int64)
        batch["label"] = self.labels[videos]
        batch["video"] = videos
        batch["formats"] = self.formats  # the batch says how to decode itself (`to_device`)
        return batch

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_store"], state["_pid"] = None, -1
        return state


class EpochSampler(Sampler[int]):
    """Endless stream of items: epoch e is a permutation of the done videos, each with a random view,
    drawn from numpy's generator seeded by (seed, e). ``start`` skips that many items (resume).

    Data parallel: the global stream is cut into blocks of ``block`` items dealt round robin to the
    ``world_size`` ranks, and this sampler yields rank ``rank``'s blocks. With block = global batch /
    world size, rank r reads items [r*block, (r+1)*block) of every global batch, so which items form
    global batch g never depends on the world size. ``start`` (a global position) must then fall on
    a global batch boundary.
    """

    def __init__(self, videos: np.ndarray, num_views: int, seed: int, start: int = 0,
                 rank: int = 0, world_size: int = 1, block: int = 1, use_views: int = 0) -> None:
        self.videos = np.asarray(videos, dtype=np.int64)
        if len(self.videos) == 0:
            raise ValueError("no done videos to sample from")
        if not (world_size >= 1 and 0 <= rank < world_size and block >= 1):
            raise ValueError(f"bad shard: rank {rank} of {world_size}, block {block}")
        if world_size > 1 and start % (block * world_size):
            raise ValueError(f"start {start} is not a multiple of block x world_size = {block * world_size}")
        self.num_views = int(num_views)  # the store's V: items are ``video * V + view``
        if not 0 <= use_views <= self.num_views:
            raise ValueError(f"use_views {use_views} is outside 0..{self.num_views} (the store's views per video)")
        self.use_views = int(use_views) or self.num_views  # views drawn from: the first use_views of V
        self.seed = int(seed)
        self.start = int(start)
        self.rank, self.world_size, self.block = int(rank), int(world_size), int(block)

    def epoch_items(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch])
        order = self.videos[rng.permutation(len(self.videos))]
        views = rng.integers(0, self.use_views, size=len(order))
        return order * self.num_views + views

    def __iter__(self) -> Iterator[int]:
        n = len(self.videos)
        epoch, offset = divmod(self.start, n)
        pos = self.start  # global position of items[offset]
        while True:
            items = self.epoch_items(epoch)[offset:]
            if self.world_size > 1:
                positions = pos + np.arange(len(items))
                items = items[(positions // self.block) % self.world_size == self.rank]
            for item in items:
                yield int(item)
            pos += n - offset
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
                items: list[int] | None = None, rank: int = 0, world_size: int = 1,
                block: int | None = None, views: int = 0, read_threads: int = READ_THREADS,
                ring: bool | None = None, needs: Any = None,
                videos: np.ndarray | None = None) -> DataLoader | RingLoader:
    """A DataLoader yielding batched decoder dicts (``feats``, ``attn`` | ``q``/``k``, ``label``, ``video``).

    ``train``: endless `EpochSampler` stream from global position ``start`` in full batches (in a
    data-parallel run, this rank's blocks of ``block`` items, default ``batch_size``); otherwise the
    given ``items`` (default: `eval_items`) once, last batch partial. ``views`` > 0 trains on the
    first ``views`` cached views of every video only (with all of them, the same stream). ``videos``
    restricts training to those store indices (a few-shot subset, `evl_cache.fewshot`; default every
    done video); batches stay full, the stream running on into the next epoch. The loader
    gets its own generator so creating it never draws from the global torch RNG (exact resume). Each
    process that reads (the main one, or each worker) reads a batch with a pool of ``read_threads``
    threads; with ``pin_memory`` on CUDA and no workers, batches are read straight into pinned memory.

    ``ring`` (default: when ``num_workers`` is 0) returns a `evl_cache.ring.RingLoader` instead: the
    same batches, read by a background thread ``prefetch_factor`` batches ahead into ``prefetch_factor
    + 2`` reused batch buffers. A batch's stored arrays are then valid only until ``next()`` is called
    for the batch after the next one (``label`` and ``video`` are its own); see `evl_cache.ring`.

    ``needs`` (cached tensor kinds, see `model_needs`) limits the arrays read to those; None reads all.
    """
    if ring is None:
        ring = num_workers == 0
    if ring and num_workers:
        raise ValueError("the ring loader reads in this process: use num_workers=0 with ring=True")
    dataset = StoreDataset(path, threads=read_threads, pin_memory=pin_memory and num_workers == 0, needs=needs)
    store = dataset.store
    if train:
        pool = store.done_indices() if videos is None else videos
        sampler: Any = EpochSampler(pool, store.num_views, seed, start, rank=rank,
                                    world_size=world_size, block=block or batch_size, use_views=views)
        batches = BatchSampler(sampler, batch_size, drop_last=True)
    else:
        batches = BatchSampler(items if items is not None else eval_items(store), batch_size, drop_last=False)
    if ring:
        return RingLoader(dataset, batches, batch_size, depth=prefetch_factor, pin_memory=pin_memory)
    kwargs: dict[str, Any] = {}
    if num_workers > 0:
        kwargs.update(prefetch_factor=prefetch_factor, worker_init_fn=_worker_init, persistent_workers=False)
    return DataLoader(dataset, batch_sampler=batches, num_workers=num_workers, pin_memory=pin_memory,
                      collate_fn=collate, generator=torch.Generator(), **kwargs)


def model_needs(cfgs: Any) -> set[str] | None:
    """The cached tensor kinds models with these built configs read (the union of their heads'
    declared needs), or None (read everything) when a config is unknown."""
    from evl_cache.heads import head_of

    needs: set[str] = set()
    for cfg in cfgs:
        if cfg is None:
            return None
        needs |= set(head_of(cfg).needs(cfg))
    return needs


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # workers only copy bytes; leave the cores to the training step


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
    """Move a batch to ``device`` and decode its stored arrays there (int8 codes and scales cross to
    the GPU at their stored size and expand on it): the decoder's ``feats``, ``attn`` | ``q``/``k``."""
    formats = batch.get("formats")
    if formats is None:
        return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    return formats.decode({k: v for k, v in batch.items() if k != "formats"}, device)


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
                   prefetch_factor: int = 2) -> Throughput:
    """Clip-views/s and MB/s (payload bytes) of the training DataLoader alone."""
    store = open_store(path)
    per_view = store.raw_bytes_per_view()
    loader = make_loader(path, batch_size, train=True, num_workers=num_workers, prefetch_factor=prefetch_factor)
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
        folder = os.path.join(path, name)
        files.extend(os.path.join(folder, f) for f in sorted(os.listdir(folder)) if f.startswith("c."))
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
