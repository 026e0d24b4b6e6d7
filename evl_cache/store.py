"""The cache store: a Zarr v3 group that is the contract between extraction and training.

Layout (docs/design.md): root attribute ``evl_cache`` holds the schema (backbone, blocks, frames,
sampling, views, attention mode, dtype, classes, manifest sha256); arrays hold N videos x V views:

- ``videos/{path,label,status,error,num_frames,fps}``: per-video table, written by the driver only;
- ``feats/<block>`` (N, V, T, L, C) block outputs, CLS included;
- ``attn/<block>`` (N, V, 2, T-1, P, P) adjacent-frame maps (attention ``maps``), or
  ``q/<block>``, ``k/<block>`` (N, V, T, L, H, D) (attention ``qk``).

Chunk = one (video, view). Tensor arrays are sharded by S consecutive videos (Zarr's sharding
codec): a shard is one file per array, written whole by exactly one task, so writers never share a
file, and a K400-sized store holds thousands of files rather than millions. Zarr's local store
writes every file atomically (temp file + rename), so a killed writer leaves no torn shard.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from evl_cache.errors import UserError

SCHEMA_VERSION = 1
PENDING, DONE, FAILED = 0, 1, 2
STATUS_NAMES = {PENDING: "pending", DONE: "done", FAILED: "failed"}
DTYPES = {"float16": np.float16, "float32": np.float32, "bfloat16": None}



def tensor_shapes(attrs: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Per-(video, view) shapes of every tensor array named by the schema attributes."""
    t, length, c = attrs["frames"], attrs["tokens"], attrs["width"]
    p = length - 1
    heads = attrs["heads"]
    shapes: dict[str, tuple[int, ...]] = {}
    for b in attrs["blocks"]:
        shapes[f"feats/{b}"] = (t, length, c)
        if attrs["attention"] == "maps":
            shapes[f"attn/{b}"] = (2, max(t - 1, 0), p, p)
        elif attrs["attention"] == "qk":
            shapes[f"q/{b}"] = (t, length, heads, c // heads)
            shapes[f"k/{b}"] = (t, length, heads, c // heads)
    return shapes


@dataclass
class StoreInfo:
    """Summary numbers for `inspect` and run summaries."""

    num_videos: int
    done: int
    failed: int
    pending: int
    bytes_on_disk: int
    failures: list[tuple[int, str, str]]


def _zarr():
    import zarr

    return zarr


class CacheStore:
    """An opened cache store. Use `create_store` / `open_store` rather than the constructor."""

    def __init__(self, path: str, group: Any) -> None:
        self.path = path
        self.group = group
        self.attrs: dict[str, Any] = dict(group.attrs["evl_cache"])
        self._arrays: dict[str, Any] = {}

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

    # -- per-video table (driver only writes) --------------------------------------------------
    def status(self) -> np.ndarray:
        return np.asarray(self.array("videos/status")[:])

    def labels(self) -> np.ndarray:
        return np.asarray(self.array("videos/label")[:])

    def paths(self) -> list[str]:
        return [str(p) for p in self.array("videos/path")[:]]

    def errors(self) -> list[str]:
        return [str(e) for e in self.array("videos/error")[:]]

    def done_indices(self) -> np.ndarray:
        return np.flatnonzero(self.status() == DONE)

    def mark(self, results: dict[int, dict[str, Any]]) -> None:
        """Record per-video outcomes: {index: {"status", "error", "num_frames", "fps"}}.

        Called by the driver only, after the shard holding these videos is durably written.
        ``status`` is written last: it is the commit point, so a kill between these writes leaves
        the videos pending (and their shard redone), never done with stale metadata.
        """
        if not results:
            return
        idx = np.array(sorted(results), dtype=np.int64)
        lo, hi = int(idx.min()), int(idx.max()) + 1
        for name, key, dtype in (("error", "error", None), ("num_frames", "num_frames", np.int32),
                                 ("fps", "fps", np.float32), ("status", "status", np.uint8)):
            arr = self.array(f"videos/{name}")
            block = np.asarray(arr[lo:hi])
            block = block.astype(object) if dtype is None else block
            for i in idx:
                value = results[int(i)].get(key, "" if dtype is None else 0)
                block[int(i) - lo] = value
            arr[lo:hi] = block if dtype is None else block.astype(dtype)

    # -- tensors ------------------------------------------------------------------------------
    def write_shard(self, shard: int, tensors: dict[str, np.ndarray]) -> None:
        """Write one whole shard (videos shard*S .. shard*S+S-1) of every tensor array.

        ``tensors[name]`` has shape (n, V, *per-view shape) for the n videos of the shard; videos
        that failed are zeros. One call per shard, by exactly one task.
        """
        lo = shard * self.shard_size
        for name in self.tensor_names():
            data = tensors[name]
            arr = self.array(name)
            arr[lo:lo + data.shape[0]] = data.astype(arr.dtype, copy=False)

    def read(self, video: int, view: int) -> dict[str, torch.Tensor]:
        """One (video, view) as the decoder's input dict (unbatched), tensors in the storage dtype.

        ``feats`` (K, T, L, C); ``attn`` (K, 2, T-1, P, P) or ``q``/``k`` (K, T, L, H, D); ``label``.
        """
        out: dict[str, torch.Tensor] = {}
        groups: dict[str, list[np.ndarray]] = {}
        for name in self.tensor_names():
            kind = name.split("/")[0]
            groups.setdefault(kind, []).append(np.asarray(self.array(name)[video, view]))
        for kind, parts in groups.items():
            out[kind] = torch.from_numpy(np.stack(parts))
        out["label"] = torch.tensor(int(self.array("videos/label")[video]))
        return out

    # -- summaries ----------------------------------------------------------------------------
    def info(self) -> StoreInfo:
        status = self.status()
        errors = self.errors()
        paths = self.paths()
        failures = [(int(i), paths[i], errors[i]) for i in np.flatnonzero(status == FAILED)]
        return StoreInfo(
            num_videos=self.num_videos,
            done=int((status == DONE).sum()),
            failed=int((status == FAILED).sum()),
            pending=int((status == PENDING).sum()),
            bytes_on_disk=directory_bytes(self.path),
            failures=failures,
        )

    def raw_bytes_per_view(self) -> int:
        """Bytes of one (video, view)'s tensors in the storage dtype, uncompressed."""
        itemsize = np.dtype(self.attrs["dtype"]).itemsize
        return sum(int(np.prod(s)) * itemsize for s in tensor_shapes(self.attrs).values())


def comparable_attr(key: str, value: Any) -> Any:
    """A schema attribute as it must match between stores/checkpoints: the backbone is identified by
    its weights' sha256 (``weights_id``), not by the path the weights were read from, which may differ
    between machines."""
    if key == "backbone" and isinstance(value, dict):
        return {k: v for k, v in value.items() if k != "weights"}
    return value


def directory_bytes(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            total += os.path.getsize(os.path.join(root, f))
    return total


def create_store(path: str, attrs: dict[str, Any], paths: list[str], labels: list[int], shard_size: int = 16,
                 compressor: str | None = None) -> CacheStore:
    """Create an empty store with every array allocated and all videos pending.

    ``attrs`` must hold: backbone, blocks, frames, tokens, width, heads, grid, sampling, views,
    num_views, attention, dtype, class_names, manifest_sha256.
    """
    zarr = _zarr()
    attrs = dict(attrs)
    n, v = len(paths), int(attrs["num_views"])
    attrs.update(schema_version=SCHEMA_VERSION, num_videos=n, shard_size=int(shard_size), compressor=compressor)
    group = zarr.open_group(path, mode="w-", zarr_format=3)
    # The driver rewrites the per-video table after every shard, so its chunks are a whole number of
    # shards (~4096 videos): a mark touches a few KB, and reading the table stays a handful of files.
    vchunk = max(1, min(n, int(shard_size) * max(1, 4096 // int(shard_size))))
    group.create_array("videos/path", shape=(n,), dtype=str, chunks=(vchunk,))[:] = np.array(paths, dtype=object)
    group.create_array("videos/label", data=np.asarray(labels, dtype=np.int32), chunks=(vchunk,))
    group.create_array("videos/status", shape=(n,), dtype=np.uint8, chunks=(vchunk,), fill_value=PENDING)
    group.create_array("videos/error", shape=(n,), dtype=str, chunks=(vchunk,), fill_value="")
    group.create_array("videos/num_frames", shape=(n,), dtype=np.int32, chunks=(vchunk,), fill_value=0)
    group.create_array("videos/fps", shape=(n,), dtype=np.float32, chunks=(vchunk,), fill_value=0.0)
    compressors = _compressors(compressor)
    for name, shape in tensor_shapes(attrs).items():
        group.create_array(
            name,
            shape=(n, v, *shape),
            dtype=attrs["dtype"],
            chunks=(1, 1, *shape),
            shards=(int(shard_size), v, *shape),
            compressors=compressors,
            fill_value=0,
        )
    group.attrs["evl_cache"] = attrs
    return CacheStore(path, group)


def _compressors(name: str | None) -> Any:
    if name in (None, "", "none"):
        return None
    from zarr.codecs import BloscCodec, ZstdCodec

    if name == "zstd":
        return ZstdCodec(level=3)
    if name == "blosc":
        return BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle", typesize=2)
    raise UserError(f"unknown compressor '{name}'; use none, zstd or blosc")


def open_store(path: str, mode: str = "r") -> CacheStore:
    """Open an existing store, failing with one clear line if it is missing or not an evl-cache store."""
    zarr = _zarr()
    if "://" not in path and not Path(path, "zarr.json").is_file():
        raise UserError(f"no cache store at {path}; run `evl-cache extract` first or check the path")
    try:
        group = zarr.open_group(path, mode=mode, zarr_format=3)
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
    removed = 0
    for root, _, files in os.walk(path):
        for f in files:
            if f.endswith(".partial"):
                os.remove(os.path.join(root, f))
                removed += 1
    return removed


def delete_store(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def shards_of(indices: Iterable[int], shard_size: int) -> dict[int, list[int]]:
    """Group video indices by shard."""
    out: dict[int, list[int]] = {}
    for i in indices:
        out.setdefault(int(i) // shard_size, []).append(int(i))
    return out
