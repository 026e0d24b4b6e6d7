"""The ring loader (`evl_cache.ring`): the DataLoader's batches from reused slots, a slot refilled only
after the consumer has moved two batches on (checked by the producer's hook, not by timing), store
errors raised in batch order, and no producer thread left behind.

Stores are the small random-data stores of tests/test_reader.py (the project's own writer).
"""

from __future__ import annotations

import gc
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from evl_cache.data import StoreDataset, eval_items, make_loader
from evl_cache.ring import RingLoader
from evl_cache.store import StoreDataError, open_store
from test_reader import N, V, build

STORED = ("feats", "attn")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return build(tmp_path_factory.mktemp("ring") / "plain.zarr")


def ring_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "evl-ring"]


def same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in (*STORED, "label", "video"))


@pytest.mark.parametrize("train", [True, False])
def test_ring_yields_the_dataloaders_batches(store, train):
    kw = dict(train=train, seed=5, start=3) if train else dict(train=False)
    ring = make_loader(store, 5, **kw)
    assert isinstance(ring, RingLoader)  # the default with no workers
    plain = make_loader(store, 5, ring=False, **kw)
    count = 7 if train else len(eval_items(open_store(store))) // 5 + 1  # train: past an epoch (12 videos)
    got_ring, got_plain = iter(ring), iter(plain)
    for _ in range(count):
        a, b = next(got_ring), next(got_plain)
        assert same(a, b) and a["formats"] is not None
    if not train:  # the eval stream ends (last batch partial) on both
        with pytest.raises(StopIteration):
            next(got_ring)
        assert len(ring) == len(plain) == count


def test_slots_are_reused_and_never_refilled_while_held(store):
    depth = 2
    slots = depth + 2
    fills: list[tuple[int, int, int]] = []
    cv, blocked = threading.Condition(), [-1]

    def hook(event: str, batch: int, slot: int, requested: int) -> None:
        if event == "fill":
            fills.append((batch, slot, requested))
        else:  # the producer is blocked: it writes nothing more until the next next()
            with cv:
                blocked[0] = requested
                cv.notify_all()

    ds = StoreDataset(store)
    sampler = torch.utils.data.BatchSampler(range(N * V), 3, drop_last=False)
    it = iter(RingLoader(ds, sampler, 3, depth=depth, hook=hook))
    ptrs, held = [], []
    for i in range(len(sampler)):
        batch = next(it)
        ptrs.append(batch["feats"].data_ptr())
        held.append((batch, {k: batch[k].clone() for k in STORED}))
        if i + 1 < len(sampler) - depth:
            with cv:  # wait until the producer has filled all it may after this next()
                assert cv.wait_for(lambda: blocked[0] == i + 1, 10)
        if i >= 1:  # the previous batch, held through this next(), is intact
            prev, copy = held[i - 1]
            assert all(torch.equal(prev[k], copy[k]) for k in STORED)
    assert ptrs[slots] == ptrs[0] and ptrs[slots + 1] == ptrs[1] and len(set(ptrs)) == slots
    assert [s for _, s, _ in fills] == [b % slots for b, _, _ in fills]
    for b, _, requested in fills:  # batch b is written only after next() was called for b - depth
        assert requested >= b - depth + 1
        if b >= slots:  # ... so its slot's previous batch (b - slots) was two next() calls back
            assert requested >= (b - slots) + 3
    it.close()


def test_a_damaged_chunk_raises_from_next_naming_the_file(store, tmp_path):
    import shutil

    path = tmp_path / "bad.zarr"
    shutil.copytree(store, path)
    st = open_store(str(path))
    victim = Path(st.reader("feats").shard_file(1))  # videos 4..7
    offset = int(st.reader("feats").shard_index(1)[1, 0, 0])  # video 5, view 0
    data = bytearray(victim.read_bytes())
    data[offset + 100] ^= 0x01
    victim.write_bytes(bytes(data))
    items = [0, 2, 4, 5 * V, 6 * V]  # video 5 view 0 is in the second batch of 3
    it = iter(make_loader(str(path), 3, train=False, items=items))
    first = next(it)
    assert first["video"].tolist() == [0, 1, 2]
    with pytest.raises(StoreDataError, match="evl-cache verify") as err:
        next(it)
    assert str(victim) in str(err.value) and "crc32c" in str(err.value)
    assert not ring_threads()
    with pytest.raises(StopIteration):
        next(it)


def test_the_producer_thread_ends_on_close_exhaustion_and_garbage_collection(store):
    assert not ring_threads()
    it = iter(make_loader(store, 4, train=True))
    next(it)
    assert len(ring_threads()) == 1
    it.close()
    assert not ring_threads()

    batches = list(make_loader(store, 8, train=False))  # exhausted
    assert sum(len(b["video"]) for b in batches) == N * V and not ring_threads()

    batch = next(iter(make_loader(store, 4, train=True)))  # the iterator is dropped at once
    gc.collect()
    assert not ring_threads()
    assert batch["feats"].shape[0] == 4 and np.isfinite(batch["feats"].float().numpy()).all()


def test_ring_needs_no_workers(store):
    with pytest.raises(ValueError, match="num_workers=0"):
        make_loader(store, 4, train=True, num_workers=1, ring=True)


def test_the_loader_keeps_its_slots_for_the_next_pass_unless_still_in_use(store):
    loader = make_loader(store, 8, train=False)
    loader.reserve()
    ptr = loader.slots[0]["feats"].data_ptr()
    first = [b["video"].clone() for b in loader]
    assert loader.slots[0]["feats"].data_ptr() == ptr
    a, b = iter(loader), iter(loader)  # two live passes: the second gets slots of its own
    x, y = next(a), next(b)
    assert x["feats"].data_ptr() == ptr != y["feats"].data_ptr() and same(x, y)
    a.close(), b.close()
    assert torch.equal(next(iter(loader))["video"], first[0])
