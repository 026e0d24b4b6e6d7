"""A ring of preallocated batch buffers filled ahead of the consumer by one background thread.

Why: a DataLoader hands out fresh batch tensors, and on a warm page cache the kernel's page faults and
zeroing of every new 224 MB batch (B/16 fp16, 16 clip-views) cost more than the read itself
(docs/benchmarks.md, "Reader throughput"). Here the memory of ``depth + 2`` batches is allocated once
(pinned when the batches go to CUDA) and reused, as FFCV's ``EpochIterator`` does. A producer thread
reads batch ``j`` into slot ``j % (depth + 2)`` with the store's thread pool (`read_batches`: the
reads release the GIL), at most ``depth`` batches ahead of the consumer.

The contract (what the consumer may rely on):

- A batch's stored arrays (``feats``, ``attn`` | ``qk`` ...) are views of a slot. They stay intact
  while the consumer holds that batch and through the next ``next()``: the slot of batch ``i`` is
  refilled only once ``next()`` has been called for batch ``i + 2``. So the consumer must be done
  with batch ``i`` (its step finished, or its arrays copied) before it asks for batch ``i + 2``.
  ``label`` and ``video`` are fresh tensors per batch and may be kept for ever.
- CUDA: each ``next()`` records an event on the consumer's current stream; before refilling the slot
  of batch ``i`` the producer waits on the event of the ``next()`` for batch ``i + 1``, so a
  ``non_blocking`` copy out of a pinned slot (`evl_cache.data.to_device`) has finished first.
- Same batches, in the same order, and the same `StoreDataError` (raised by the ``next()`` of the
  batch that failed, after every earlier batch was handed out) as the DataLoader over the same
  dataset and batch sampler.
- Closing the iterator (``close()``, exhausting it, an error, or dropping the last reference) stops
  and joins the producer thread. The slots belong to the `RingLoader` and the next iterator of the
  same loader reuses them: batches of a finished pass are overwritten by the next pass.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch

from evl_cache.formats import torch_dtype

Hook = Callable[[str, int, int, int], None]  # (event, batch index, slot, next() calls so far)


class RingLoader:
    """Iterable over ``batches`` (lists of dataset items) read by ``dataset.read_into`` into a ring of
    ``depth + 2`` reused slots. Every ``iter()`` starts the batch sampler afresh, like a DataLoader."""

    def __init__(self, dataset: Any, batches: Iterable[list[int]], batch_size: int, depth: int = 2,
                 pin_memory: bool = False, hook: Hook | None = None) -> None:
        if depth < 1:
            raise ValueError(f"ring depth must be >= 1, got {depth}")
        self.dataset = dataset
        self.batch_sampler = batches
        self.batch_size = int(batch_size)
        self.depth = int(depth)
        self.pin_memory = bool(pin_memory) and torch.cuda.is_available()
        self.hook = hook  # test hook at the producer's named points ("fill", "wait")
        self.slots: list[dict[str, torch.Tensor] | None] = [None] * (self.depth + 2)
        self._lock = threading.Lock()
        self._lent = False  # the slots are in use by a live iterator (a second one allocates its own)

    def reserve(self) -> None:
        """Allocate every slot now and touch its pages, so the first batches pay no page faults."""
        for k in range(len(self.slots)):
            for t in slot_tensors(self.slots, k, self.dataset.specs, self.batch_size, self.pin_memory).values():
                t.zero_()

    def _lend(self) -> list[dict[str, torch.Tensor] | None]:
        with self._lock:
            if self._lent:
                return [None] * len(self.slots)
            self._lent = True
            return self.slots

    def _give_back(self, slots: list[dict[str, torch.Tensor] | None]) -> None:
        with self._lock:
            if slots is self.slots:
                self._lent = False

    def __len__(self) -> int:
        return len(self.batch_sampler)  # type: ignore[arg-type]

    def __iter__(self) -> "RingIterator":
        return RingIterator(self)


class _Ring:
    """The state shared by the consumer and the producer thread (the thread holds only this, never
    the `RingIterator`, so dropping the iterator can stop the thread)."""

    def __init__(self, loader: RingLoader) -> None:
        self.dataset = loader.dataset
        self.batches = iter(loader.batch_sampler)
        self.depth = loader.depth
        self.num_slots = loader.depth + 2
        self.pin = loader.pin_memory
        self.hook = loader.hook
        self.batch_size = loader.batch_size
        self.loader = loader
        self.slots = loader._lend()
        self.cond = threading.Condition()
        self.requested = 0  # next() calls so far
        self.ready: dict[int, dict[str, Any]] = {}
        self.error: tuple[int, BaseException] | None = None
        self.total: int | None = None  # batches in the stream, once the sampler is exhausted
        self.stop = False
        self.events: dict[int, Any] = {}  # next() call -> CUDA event recorded on the consumer's stream
        self.thread = threading.Thread(target=_produce, args=(self,), name="evl-ring", daemon=True)

    def slot(self, k: int) -> dict[str, torch.Tensor]:
        return slot_tensors(self.slots, k, self.dataset.specs, self.batch_size, self.pin)

    def shutdown(self) -> None:
        with self.cond:
            self.stop = True
            self.cond.notify_all()
        if threading.current_thread() is self.thread:
            return
        if self.thread.is_alive():
            self.thread.join()
        self.loader._give_back(self.slots)


def slot_tensors(slots: list[dict[str, torch.Tensor] | None], k: int, specs: dict[str, Any], batch_size: int,
                 pin: bool) -> dict[str, torch.Tensor]:
    """Slot ``k``'s tensors, one (batch_size, *chunk shape) tensor per stored array, allocated on first
    use (an eval stream shorter than the ring allocates less): pinned for CUDA, else numpy's memory,
    whose large buffers are madvised to huge pages (torch's CPU allocator faults every 4 KiB page)."""
    got = slots[k]
    if got is None:
        got = slots[k] = {}
        for name, spec in specs.items():
            shape = (batch_size, *spec.shape)
            got[name] = torch.empty(shape, dtype=torch_dtype(spec.dtype), pin_memory=True) if pin \
                else torch.from_numpy(np.empty(shape, dtype=spec.dtype))
    return got


def _produce(ring: _Ring) -> None:
    """The producer: batch j into slot j % num_slots once the consumer has asked for batch j - depth."""
    j = 0
    try:
        for items in ring.batches:
            with ring.cond:
                while not ring.stop and j >= ring.requested + ring.depth:
                    if ring.hook is not None:
                        ring.hook("wait", j, j % ring.num_slots, ring.requested)
                    ring.cond.wait()
                if ring.stop:
                    return
                requested = ring.requested
                event = ring.events.pop(j - ring.num_slots + 1, None)
                for old in [k for k in ring.events if k < j - ring.num_slots + 1]:
                    del ring.events[old]
            if event is not None:
                event.synchronize()  # the consumer's copies out of this slot have finished
            k = j % ring.num_slots
            if ring.hook is not None:
                ring.hook("fill", j, k, requested)
            views = {name: t[:len(items)] for name, t in ring.slot(k).items()}
            batch = ring.dataset.read_into(items, views)
            with ring.cond:
                ring.ready[j] = batch
                ring.cond.notify_all()
            j += 1
        with ring.cond:
            ring.total = j
            ring.cond.notify_all()
    except BaseException as err:  # handed to the consumer at batch j, in order
        with ring.cond:
            ring.error = (j, err)
            ring.cond.notify_all()


class RingIterator(Iterator[dict[str, Any]]):
    """One pass over a `RingLoader` (see the module docstring for how long a batch stays valid)."""

    def __init__(self, loader: RingLoader) -> None:
        self._ring = _Ring(loader)
        self._cuda = self._ring.pin  # batches go to CUDA: fence slot reuse on the consumer's stream
        self._finalizer = weakref.finalize(self, self._ring.shutdown)
        self._ring.thread.start()

    def __iter__(self) -> "RingIterator":
        return self

    def __next__(self) -> dict[str, Any]:
        ring = self._ring
        with ring.cond:
            if ring.stop:
                raise StopIteration
            i = ring.requested
            if self._cuda:
                event = torch.cuda.Event()
                event.record()  # after every copy the consumer enqueued out of batch i - 1
                ring.events[i] = event
            ring.requested += 1
            ring.cond.notify_all()
            while i not in ring.ready and not (ring.error and ring.error[0] == i) and \
                    not (ring.total is not None and i >= ring.total):
                ring.cond.wait()
            batch = ring.ready.pop(i, None)
        if batch is not None:
            return batch
        error = ring.error[1] if ring.error and ring.error[0] == i else None
        self.close()
        if error is not None:
            raise error
        raise StopIteration

    def close(self) -> None:
        """Stop and join the producer thread (idempotent)."""
        self._finalizer()
