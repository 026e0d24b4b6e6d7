"""The batch reader (`evl_cache.store.read_batches`, `ChunkReader.read_batch`): the same bytes as
Zarr's own reads in any order, every check of the per-chunk reader kept, shard indexes and file
descriptors kept per process and dropped when a file changes, a fork or a pickle.

Stores are small random-data stores written by the project's writer (`create_store`, `write_videos`).
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from evl_cache.data import StoreDataset, eval_items, make_loader
from evl_cache.store import DONE, ChunkReader, StoreDataError, create_store, open_store, read_batches

N, V, S = 12, 2, 4  # videos, views, videos per shard: 3 shard files per array


def small_attrs(dtype: str = "float16", attn: str = "float16") -> dict:
    """A tiny ViT-shaped schema: 2 blocks, 3 frames, 2x2 patches, width 8."""
    return {
        "backbone": {"arch": "tiny", "weights": "random", "weights_id": "random", "quick_gelu": False, "image_size": 32,
                     "patch_size": 16, "width": 8, "heads": 2, "layers": 2, "grid": [2, 2]},
        "blocks": [0, 1], "frames": 3, "tokens": 5, "width": 8, "heads": 2, "grid": [2, 2],
        "sampling": {"kind": "dense", "frames": 3, "stride": 1}, "views": {"kind": "train", "num_views": V, "seed": 0},
        "num_views": V, "attention": "maps", "min_frames": 3, "class_names": ["a", "b"], "manifest_sha256": "t",
        "manifest": {}, "dtype": dtype, "attn_format": attn,
    }


def build(path: Path, seed: int = 0, compressor: str | None = None, dtype: str = "float16", attn: str = "float16") -> str:
    store = create_store(str(path), small_attrs(dtype, attn), [f"v{i}" for i in range(N)], [i % 2 for i in range(N)],
                         shard_size=S, compressor=compressor)
    rng = np.random.default_rng(seed)
    for shard in range(N // S):
        todo = list(range(shard * S, (shard + 1) * S))
        arrays = {}
        for name, spec in store.formats.arrays().items():
            shape = (S, V, *spec.shape)
            arrays[name] = (rng.random(shape, dtype=np.float32) + 0.01).astype(spec.dtype) if spec.dtype.kind == "f" \
                else rng.integers(1, 255, size=shape, dtype=np.uint8).astype(spec.dtype)
        store.write_videos(shard, todo, todo, arrays)
    store.mark({i: {"status": DONE} for i in range(N)})
    return str(path)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("reader")
    return {"plain": build(root / "plain.zarr"), "other": build(root / "other.zarr", seed=1),
            "zstd": build(root / "zstd.zarr", compressor="zstd"),
            "int8": build(root / "int8.zarr", dtype="int8:channel_token", attn="uint8"), "root": root}


def copy_of(stores, name: str, src: str = "plain") -> str:
    dst = stores["root"] / name
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(stores[src], dst)
    return str(dst)


def random_pairs(seed: int, count: int = 20) -> list[tuple[int, int]]:
    """Random (video, view) pairs with duplicates, plus a file-adjacent run: Zarr lays a shard's chunks
    out in Morton order of (video, view), so (4, 1), (5, 1), (6, 0) lie back to back."""
    rng = np.random.default_rng(seed)
    pairs = [(int(v), int(w)) for v, w in zip(rng.integers(0, N, count), rng.integers(0, V, count))]
    return pairs[:4] + [(4, 1), (5, 1), (6, 0), pairs[0], pairs[0]] + pairs[4:]


@pytest.mark.parametrize("kind", ["plain", "zstd", "int8"])
@pytest.mark.parametrize("threads", [1, 4])
def test_batch_read_equals_zarr_in_random_order_with_duplicates(stores, kind, threads):
    path = stores[kind]
    pairs = random_pairs(seed=threads)
    for name in open_store(path).tensor_names():
        reader = ChunkReader.open(path, name, threads=threads)
        got = reader.read_batch(pairs)
        arr = zarr.open_array(os.path.join(path, name), mode="r")
        for b, (video, view) in enumerate(pairs):
            assert got[b].tobytes() == np.asarray(arr[video, view]).tobytes(), (kind, name, b)
            assert got[b].tobytes() == reader.read(video, view).tobytes()
    if kind == "plain":  # (4, 1), (5, 1), (6, 0) lie back to back: one preadv
        jobs = ChunkReader.open(path, "feats")._plan(pairs)
        assert max(len(j.items) for j in jobs) >= 3
        assert len(jobs) < len(pairs)


def test_dataset_batch_equals_per_item_reads(stores):
    path = stores["int8"]
    ds = StoreDataset(path, threads=4)
    pairs = random_pairs(seed=3)
    batch = ds.__getitems__([v * V + w for v, w in pairs])
    arrays = {n: zarr.open_array(os.path.join(path, n), mode="r") for n in ds.specs}
    for b, (video, view) in enumerate(pairs):
        for name, arr in arrays.items():  # the stored codes and scales, packed as written
            assert batch[name][b].numpy().tobytes() == np.asarray(arr[video, view]).tobytes()
        assert int(batch["label"][b]) == video % 2 and int(batch["video"][b]) == video


@pytest.mark.parametrize("where", ["alone", "in a coalesced run"])
def test_corrupted_chunk_in_the_middle_of_a_batch_is_an_error_naming_the_file(stores, where):
    path = copy_of(stores, f"corrupt_{where.replace(' ', '_')}.zarr")
    reader = ChunkReader.open(path, "attn", threads=4)
    offset, nbytes = (int(x) for x in reader.shard_index(1)[1, 1])  # video 5, view 1
    victim = reader.shard_file(1)
    with open(victim, "r+b") as fh:  # one payload bit, in place: only the chunk's crc32c can tell
        fh.seek(offset + nbytes // 2)
        byte = fh.read(1)
        fh.seek(offset + nbytes // 2)
        fh.write(bytes([byte[0] ^ 0x10]))
    middle = [(5, 1)] if where == "alone" else [(4, 1), (5, 1), (6, 0)]
    pairs = [(0, 0), (9, 1), (2, 1), *middle, (11, 0), (1, 1)]
    if where != "alone":
        assert any(len(j.items) == 3 for j in ChunkReader.open(path, "attn")._plan(pairs))
    with pytest.raises(StoreDataError, match=re.escape(f"video 5 view 1: 'attn' chunk in {victim} fails its crc32c")):
        reader.read_batch(pairs)
    items = [v * V + w for v, w in pairs]
    with pytest.raises(StoreDataError, match=re.escape(f"{victim} fails its crc32c") + ".*" + re.escape(f"evl-cache verify {path} --repair")):
        StoreDataset(path).__getitems__(items)
    reader.read_batch([p for p in pairs if p != (5, 1)])  # the rest of the batch is sound


def test_absent_and_short_chunks_in_a_batch_are_errors(stores):
    path = copy_of(stores, "short.zarr")
    reader = ChunkReader.open(path, "feats", threads=4)
    victim = reader.shard_file(2)
    data = Path(victim).read_bytes()
    offset = int(reader.shard_index(2)[0, 0, 0])  # video 8 view 0: cut inside it, keep a valid index after
    index = data[-reader.index_bytes:]
    Path(victim).write_bytes(data[: offset + 10] + index)
    pairs = [(0, 0), (8, 0), (3, 1)]
    with pytest.raises(StoreDataError, match=re.escape(f"video 8 view 0: short read of 'feats' in {victim}")):
        ChunkReader.open(path, "feats", threads=4).read_batch(pairs)
    with pytest.raises(StoreDataError, match=re.escape(f"evl-cache verify {path}")):
        StoreDataset(path, threads=4).__getitems__([v * V + w for v, w in pairs])


def test_kept_indexes_and_files_follow_a_rewritten_shard(stores):
    path = copy_of(stores, "rewrite.zarr")
    reader = ChunkReader.open(path, "feats", threads=4)
    before = reader.read_batch([(0, 0), (5, 1), (9, 0)])
    assert sorted(reader._shards) == [0, 1, 2] and reader.open_files() == 3  # every index kept, files open
    other = ChunkReader.open(stores["other"], "feats")
    # Same inode and size, new bytes, then a new mtime: the kept index and descriptor are stale.
    src, dst = other.shard_file(1), reader.shard_file(1)
    st = os.stat(dst)
    with open(dst, "r+b") as fh:
        fh.write(Path(src).read_bytes())
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert os.stat(dst).st_ino == st.st_ino and os.stat(dst).st_size == st.st_size
    after = reader.read_batch([(0, 0), (5, 1), (9, 0)])
    assert after[0].tobytes() == before[0].tobytes() and after[2].tobytes() == before[2].tobytes()
    assert after[1].tobytes() == other.read(5, 1).tobytes() != before[1].tobytes()
    # The writer's rewrite (a new file renamed into place): the same.
    store = open_store(path, mode="r+")
    fresh = {n: np.asarray(zarr.open_array(os.path.join(stores["plain"], n), mode="r")[4:8]) for n in store.tensor_names()}
    store.write_videos(1, [4, 5, 6, 7], [4, 5, 6, 7], fresh)
    assert reader.read_batch([(5, 1)])[0].tobytes() == before[1].tobytes()


def fd_targets() -> list[str]:
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            out.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass
    return out


def test_files_are_closed_on_close_pickle_and_beyond_the_open_limit(stores):
    path = copy_of(stores, "fds.zarr")
    reader = ChunkReader.open(path, "attn")
    reader.read_batch([(0, 0), (4, 0), (8, 0)])
    files = [reader.shard_file(s) for s in range(3)]
    assert all(f in fd_targets() for f in files)
    clone = pickle.loads(pickle.dumps(reader))
    assert clone.open_files() == 0 and clone.read(4, 1).tobytes() == reader.read(4, 1).tobytes()
    reader.close()
    clone.close()
    assert reader.open_files() == 0 and not any(f in fd_targets() for f in files)
    limited = ChunkReader.open(path, "attn")
    limited.max_open = 1
    limited.read_batch([(0, 0), (4, 0), (8, 0)])  # one batch may hold what it needs ...
    limited.read_batch([(1, 0)])  # ... the next trims to the limit
    assert limited.open_files() == 1 and sum(f in fd_targets() for f in files) == 1
    assert limited.read(9, 1).tobytes() == clone.read(9, 1).tobytes()
    clone.close()
    del limited
    assert not any(f in fd_targets() for f in files)


def test_loader_workers_reopen_after_fork(stores):
    path = stores["plain"]
    items = eval_items(open_store(path))
    loader = make_loader(path, 5, train=False, num_workers=2, read_threads=3)
    loader.dataset.__getitems__(items[:4])  # the parent holds open shard files and a live pool before the fork
    assert loader.dataset.store.reader("feats").open_files() > 0
    got = list(loader)
    ref = {n: zarr.open_array(os.path.join(path, n), mode="r") for n in ("feats", "attn")}
    assert sum(len(b["video"]) for b in got) == len(items)
    flat = [(int(v), b, i) for b in got for i, v in enumerate(b["video"])]
    for k, (video, batch, i) in enumerate(flat):
        view = items[k] % V
        assert video == items[k] // V
        for n, arr in ref.items():
            assert batch[n][i].numpy().tobytes() == np.asarray(arr[video, view]).tobytes()


def test_read_batches_checks_its_output_buffer(stores):
    reader = ChunkReader.open(stores["plain"], "feats")
    with pytest.raises(ValueError, match="C-contiguous"):
        read_batches([(reader, np.empty((2, *reader.chunk_shape[2:]), dtype=np.float32))], [(0, 0), (1, 0)])


def test_a_shard_rewrite_closes_the_replaced_file(stores):
    """The writer's rename leaves the old inode alive while a descriptor holds it: it must be dropped."""
    path = copy_of(stores, "writer.zarr")
    store = open_store(path, mode="r+")
    reader = store.reader("feats")
    reader.read_batch([(5, 0)])
    old_inode = os.stat(reader.shard_file(1)).st_ino
    data = {n: np.asarray(zarr.open_array(os.path.join(path, n), mode="r")[4:8]) for n in store.tensor_names()}
    store.write_videos(1, [4, 5, 6, 7], [4, 5, 6, 7], data)
    assert os.stat(reader.shard_file(1)).st_ino != old_inode
    held = [os.fstat(int(fd)).st_ino for fd in os.listdir("/proc/self/fd") if _is_file(int(fd))]
    assert old_inode not in held
    assert reader.read(5, 0).tobytes() == data["feats"][1, 0].tobytes()


def _is_file(fd: int) -> bool:
    try:
        return os.path.isfile(os.readlink(f"/proc/self/fd/{fd}").removesuffix(" (deleted)")) or \
            os.readlink(f"/proc/self/fd/{fd}").endswith(" (deleted)")
    except OSError:
        return False
