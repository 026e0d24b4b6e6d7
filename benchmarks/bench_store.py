"""The cache store at Kinetics scale (issue 8): inodes, the driver's marking cost against N, and the
bytes each video puts through Ray's object store on its way to a backbone actor.

    .venv/bin/python benchmarks/bench_store.py            # about 5 min on 2 CPU cores, no GPU needed

1. Inodes. A real store built by `evl_cache.extract.extract` on the embedded Ray (a tiny random ViT,
   41 generated videos, one of them unreadable so the ``errors`` column is written too), counted with
   `count_entries` against the bound 1.2 x shard files + 20, at the shard size chosen by bytes and at
   ``--shard-size 4``. Then the K400 train store (ViT-B/16, 8 frames, K = 4, attention maps, fp16,
   ``train:2``, N = 240,436): projected by formula from `choose_shard_size` on the real attributes,
   and confirmed by creating that store (metadata only) and writing real-shaped random tensors for
   2 videos in each of 2 shards. The old layout (schema 1) is counted by formula, checked on a small
   old-layout store built here.
2. Marking. Stores created for N = 240,436 and N = 1,000 at S = the K400 shard size and S = 16:
   per shard, `VideoTable.mark` (memory), `VideoTable.flush` right after (the worst case), and the
   amortised cost of flushing every 5 s; against the old per-shard mark (reproduced below). Also the
   time to load the `VideoTable` once.
3. Object-store bytes per video: float32 views (before) against `PackedViews.nbytes` from real
   `decode_views` calls (after) at 340x256 and 1280x720.

Prints markdown tables, writes ``results/bench/store.json`` and ``results/bench/store_marking.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # tests/media.py: real PyAV writers

import evl_cache  # noqa: F401,E402 - sets Ray's loopback-only environment before ray is imported
from evl_cache.backbone import BackboneSpec, build_backbone  # noqa: E402
from evl_cache.datasets import Manifest  # noqa: E402
from evl_cache.extract import FLUSH_SECONDS, ExtractConfig, extract, store_attributes  # noqa: E402
from evl_cache.store import (  # noqa: E402
    DONE,
    TABLE_ARRAYS,
    TABLE_CHUNK,
    VideoTable,
    bytes_per_video,
    choose_shard_size,
    count_entries,
    create_store,
    open_store,
    tensor_shapes,
)
from evl_cache.video import Sampling, ViewSet, decode_views  # noqa: E402

K400_TRAIN = 240_436
TINY = str(Path(__file__).resolve().parent.parent / "tests" / "assets" / "tiny_vit.json")
RATES = (250, 1000, 4000)  # driver video rates (videos/s) for the amortised marking cost


# ------------------------------------------------------------------------------------ helpers


def md_table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def ms(seconds: float) -> float:
    return round(seconds * 1e3, 3)


def k400_paths(n: int, classes: int = 400) -> tuple[list[str], list[int]]:
    """Kinetics-like relative paths (``train/<class>/<youtube id>_<start>_<end>.mp4``) and labels."""
    rng = np.random.default_rng(0)
    alphabet = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"))
    ids = ["".join(row) for row in alphabet[rng.integers(0, len(alphabet), (n, 11))]]
    labels = [i * classes // n for i in range(n)]
    starts = rng.integers(0, 300, n)
    return [f"train/class_{lab:03d}/{vid}_{s:06d}_{s + 10:06d}.mp4" for vid, lab, s in zip(ids, labels, starts)], labels


def b16_attrs(n_classes: int = 400) -> dict[str, Any]:
    """The schema attributes `extract` records for K400 train: ViT-B/16 (built, random weights, fp16),
    8 frames stride 16, the last 4 blocks, attention maps, fp16 storage, ``train:2``."""
    spec = BackboneSpec("ViT-B-16", "random", seed=0, precision="fp16")
    backbone = build_backbone(spec, attention="maps", device="cpu")
    desc, blocks = backbone.describe(), backbone.blocks
    del backbone
    sampling = Sampling("dense", 8, 16)
    cfg = ExtractConfig(backbone=spec, sampling=sampling, views=ViewSet.parse("train:2", sampling),
                        attention="maps", dtype="float16")
    return store_attributes(desc, blocks, cfg, [f"class_{i:03d}" for i in range(n_classes)], "k400", {})


def layout_census(path: str) -> dict[str, int]:
    """Files + directories of a store, split into shard files, table chunk files and the rest."""
    store = open_store(path)
    entries, nbytes = count_entries(path)
    shard_files = sum(1 for name in store.tensor_names() for f in os.listdir(Path(path) / name) if f.startswith("c."))
    table_files = sum(1 for name in TABLE_ARRAYS for f in os.listdir(Path(path) / name) if f.startswith("c."))
    depth = max(len(Path(root).relative_to(path).parts) for root, _, _ in os.walk(path))
    return {"entries": entries, "shard_files": shard_files, "table_chunk_files": table_files,
            "fixed": entries - shard_files - table_files, "max_dir_depth": depth, "bytes": nbytes,
            "bound": round(1.2 * shard_files + 20, 1)}


# ------------------------------------------------------------------------------------ 1. inodes


def real_small_store(work: Path, n_good: int, num_cpus: int) -> dict[str, Any]:
    """Extract generated videos with the real Ray pipeline; census at two shard sizes."""
    import media

    folder = work / "videos"
    paths, labels = [], []
    for i in range(n_good):
        paths.append(str(media.write_video(folder / f"v{i:03d}.mp4", media.moving_square_frames(24, 48, 64, seed=i))))
        labels.append(i % 2)
    paths.append(str(media.corrupt_random(folder / "broken.mp4")))  # recorded as failed: errors column written
    labels.append(0)
    manifest = Manifest(paths=paths, labels=labels, class_names=["left", "right"], root=str(folder), name="bench")
    sampling = Sampling("dense", 8, 2)
    out = {}
    for label, shard_size in (("by bytes (default)", None), ("--shard-size 4", 4)):
        cfg = ExtractConfig(backbone=BackboneSpec(TINY, "random", seed=0), sampling=sampling,
                            views=ViewSet.parse("train:2", sampling), blocks=[1, 2], attention="maps",
                            shard_size=shard_size, num_cpus=num_cpus, progress=False)
        path = work / f"small_{shard_size or 'auto'}.zarr"
        t0 = time.time()
        summary = extract(manifest, str(path), cfg)
        census = layout_census(str(path))
        store = open_store(str(path))
        arrays, s = len(store.tensor_names()), store.shard_size
        # the formula of docs/cache-format.md: an upper bound (a shard whose videos all failed has no file)
        formula = arrays * math.ceil(len(paths) / s) + len(TABLE_ARRAYS) * math.ceil(len(paths) / TABLE_CHUNK) + 1 + 2 * (len(TABLE_ARRAYS) + arrays)
        census.update(videos=len(paths), done=summary.done, failed=summary.failed, seconds=round(time.time() - t0, 1),
                      shard_size=s, arrays=arrays, formula_entries=formula)
        out[label] = census
    return out


def new_layout_projection(attrs: dict[str, Any], n: int, fixed: int) -> dict[str, Any]:
    s = choose_shard_size(attrs)
    arrays = len(tensor_shapes(attrs))
    shards = math.ceil(n / s)
    chunks = math.ceil(n / TABLE_CHUNK)
    shard_files = arrays * shards
    table_files = len(TABLE_ARRAYS) * chunks
    per_video = bytes_per_video(attrs)
    return {
        "N": n, "shard_size": s, "arrays": arrays, "shards_per_array": shards, "shard_files": shard_files,
        "table_chunks_per_column": chunks, "table_chunk_files": table_files, "fixed": fixed,
        "entries": shard_files + table_files + fixed, "bound": round(1.2 * shard_files + 20, 1),
        "bytes_per_video": per_video, "shard_file_mib": {k: round(v * s / 2**20, 1) for k, v in per_video.items()},
        "formula": (f"{arrays} arrays x ceil({n:,}/{s}) + {len(TABLE_ARRAYS)} columns x ceil({n:,}/{TABLE_CHUNK}) + {fixed} "
                    f"= {arrays} x {shards:,} + {len(TABLE_ARRAYS)} x {chunks} + {fixed} = {shard_files + table_files + fixed:,}"),
    }


def projection_configs(attrs: dict[str, Any]) -> list[dict[str, Any]]:
    """The new layout's count by formula at N = 240,436 for other configurations: where the bound
    1.2 x shard files + 20 holds and where it does not (the table's 5 x ceil(N/TABLE_CHUNK) chunk files
    outgrow 0.2 x the shard files once S exceeds ~164 x arrays)."""
    l14 = dict(attrs, frames=32, tokens=577, width=1024, heads=16, grid=[24, 24], num_views=3)
    configs = [
        ("B/16 8f K=4 maps train:2 (K400 train)", attrs),
        ("B/16 8f K=4 maps eval 3x1", dict(attrs, num_views=3)),
        ("B/16 8f K=4 qk train:2", dict(attrs, attention="qk")),
        ("L/14@336 32f K=4 maps eval 1x3", l14),
        ("B/16 8f K=4 none train:2", dict(attrs, attention="none")),
        ("B/16 8f K=1 none train:1 (linear probe)", dict(attrs, blocks=[11], attention="none", num_views=1)),
        ("tiny ViT (tests/assets) 8f K=2 maps train:2", dict(attrs, blocks=[1, 2], tokens=17, width=64, heads=4, grid=[4, 4])),
    ]
    rows = []
    for name, a in configs:
        arrays = len(tensor_shapes(a))
        p = new_layout_projection(a, K400_TRAIN, 1 + 2 * (len(TABLE_ARRAYS) + arrays))
        rows.append({"config": name, "shard_size": p["shard_size"], "arrays": arrays, "shard_files": p["shard_files"],
                     "entries": p["entries"], "bound": p["bound"], "within_bound": p["entries"] <= p["bound"]})
    return rows


def old_layout_count(n: int, blocks: int, shard_size: int = 16, feats_ndim: int = 5, attn_ndim: int = 6,
                     table_columns_written: int = 6) -> dict[str, Any]:
    """Files and directories of a finished schema-1 store (evl_cache/store.py at commit 3c36745).

    Arrays ``feats/<b>`` (N, V, T, L, C) and ``attn/<b>`` (N, V, 2, T-1, P, P), S videos per shard,
    Zarr's default chunk keys ``c/<i>/0/.../0``: a shard file of a d-dimensional array sits under d-1
    directories of its own. Fixed: root zarr.json; groups videos/, feats/, attn/ (dir + zarr.json);
    each of the 6 table columns and 2K tensor arrays: dir + zarr.json, plus c/ once a chunk is written
    (a column whose values all equal its fill value, e.g. no failed video's error, has neither). Table:
    chunks of S x floor(4096/S) videos, one file per written column per chunk.
    """
    shards = math.ceil(n / shard_size)
    vchunk = shard_size * max(1, 4096 // shard_size)
    table_chunks = math.ceil(n / vchunk)
    shard_files = 2 * blocks * shards
    shard_dirs = blocks * shards * (feats_ndim - 1) + blocks * shards * (attn_ndim - 1)
    fixed_files = 1 + 3 + 6 + 2 * blocks
    fixed_dirs = 3 + 6 + table_columns_written + 2 * blocks * 2
    files = shard_files + table_columns_written * table_chunks + fixed_files
    dirs = shard_dirs + fixed_dirs
    return {
        "N": n, "shard_size": shard_size, "arrays": 2 * blocks, "shard_files": shard_files, "shard_dirs": shard_dirs,
        "table_chunk_files": table_columns_written * table_chunks, "fixed_files": fixed_files, "fixed_dirs": fixed_dirs,
        "files": files, "dirs": dirs, "entries": files + dirs,
        "formula": (f"files = {2 * blocks} arrays x ceil({n:,}/{shard_size}) + {table_columns_written} x ceil({n:,}/{vchunk}) + "
                    f"{fixed_files} = {files:,}; dirs = {blocks} x {shards:,} x {feats_ndim - 1} + {blocks} x {shards:,} x "
                    f"{attn_ndim - 1} + {fixed_dirs} = {dirs:,}"),
    }


def old_layout_store(path: Path, n: int, shard_size: int, blocks: list[int], v: int, t: int, length: int, c: int,
                     paths: list[str], labels: list[int]) -> Any:
    """Reproduces the schema-1 layout of evl_cache/store.py at commit 3c36745 (``create_store`` there):
    per-block tensor arrays under feats/ and attn/, the six-column table under videos/, Zarr's default
    (nested) chunk keys, table chunks of S x floor(4096/S) videos. Used for the old marking cost and to
    check the old inode formula; the product no longer writes this layout."""
    import zarr

    group = zarr.open_group(str(path), mode="w-", zarr_format=3)
    vchunk = max(1, min(n, shard_size * max(1, 4096 // shard_size)))
    group.create_array("videos/path", shape=(n,), dtype=str, chunks=(vchunk,))[:] = np.array(paths, dtype=object)
    group.create_array("videos/label", data=np.asarray(labels, dtype=np.int32), chunks=(vchunk,))
    group.create_array("videos/status", shape=(n,), dtype=np.uint8, chunks=(vchunk,), fill_value=0)
    group.create_array("videos/error", shape=(n,), dtype=str, chunks=(vchunk,), fill_value="")
    group.create_array("videos/num_frames", shape=(n,), dtype=np.int32, chunks=(vchunk,), fill_value=0)
    group.create_array("videos/fps", shape=(n,), dtype=np.float32, chunks=(vchunk,), fill_value=0.0)
    p = length - 1
    for b in blocks:
        for name, shape in ((f"feats/{b}", (t, length, c)), (f"attn/{b}", (2, t - 1, p, p))):
            group.create_array(name, shape=(n, v, *shape), dtype="float16", chunks=(1, 1, *shape),
                               shards=(shard_size, v, *shape), fill_value=0)
    return group


class OldTable:
    """Reproduces ``CacheStore.mark`` of evl_cache/store.py at commit 3c36745, which the driver called
    once per landed shard: for each of error, num_frames, fps and status (the commit point, last),
    read the marked range, set the values, write the range back (Zarr rewrites the whole 4096-entry
    chunk it falls in)."""

    def __init__(self, group: Any) -> None:
        self.group = group
        self._arrays: dict[str, Any] = {}

    def array(self, name: str) -> Any:
        if name not in self._arrays:
            self._arrays[name] = self.group[name]
        return self._arrays[name]

    def mark(self, results: dict[int, dict[str, Any]]) -> None:
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
                block[int(i) - lo] = results[int(i)].get(key, "" if dtype is None else 0)
            arr[lo:hi] = block if dtype is None else block.astype(dtype)


def old_layout_check(work: Path) -> dict[str, Any]:
    """Build a small schema-1 store (N = 64, S = 16, 2 blocks, tiny shapes), write every shard and mark
    every video, and compare its census with `old_layout_count`."""
    n, s, blocks, v, t, length, c = 64, 16, [1, 2], 2, 4, 17, 32
    paths, labels = k400_paths(n)
    path = work / "old_small.zarr"
    group = old_layout_store(path, n, s, blocks, v, t, length, c, paths, labels)
    rng = np.random.default_rng(0)
    for name in [f"{kind}/{b}" for b in blocks for kind in ("feats", "attn")]:
        arr = group[name]
        for lo in range(0, n, s):
            arr[lo:lo + s] = rng.standard_normal((s, *arr.shape[1:])).astype(np.float16)
    table = OldTable(group)
    for lo in range(0, n, s):
        table.mark({i: {"status": DONE, "error": "", "num_frames": 300, "fps": 30.0} for i in range(lo, lo + s)})
    files = dirs = 0
    for _, ds, fs in os.walk(path):
        files, dirs = files + len(fs), dirs + len(ds)
    # errors are all "" (the fill value), so Zarr stores no chunk for that column: 5 columns written
    formula = old_layout_count(n, len(blocks), s, table_columns_written=5)
    return {"measured_files": files, "measured_dirs": dirs, "formula_files": formula["files"],
            "formula_dirs": formula["dirs"], "formula": formula["formula"], "match": (files, dirs) == (formula["files"], formula["dirs"])}


def k400_confirmation(work: Path, attrs: dict[str, Any], videos_per_shard: int = 2) -> dict[str, Any]:
    """Create the K400-sized store (metadata only), count; write real-shaped random tensors for
    ``videos_per_shard`` videos in each of shards 0 and 1 through `CacheStore.write_videos`, mark and
    flush them as the driver does, count again."""
    paths, labels = k400_paths(K400_TRAIN)
    path = work / "k400_b16.zarr"
    t0 = time.time()
    store = create_store(str(path), attrs, paths, labels)
    create_s = time.time() - t0
    created = layout_census(str(path))
    rng = np.random.default_rng(0)
    s = store.shard_size
    written = []
    table = VideoTable(store)
    for shard in (0, 1):
        videos = list(range(shard * s, shard * s + videos_per_shard))
        tensors = {name: rng.standard_normal((len(videos), store.num_views, *shape), dtype=np.float32).astype(np.float16)
                   for name, shape in tensor_shapes(store.attrs).items()}
        store.write_videos(shard, videos, videos, tensors)
        table.mark({i: {"status": DONE, "error": "", "num_frames": 300.0, "fps": 30.0} for i in videos}, shard)
        written += videos
    table.flush()
    after = layout_census(str(path))
    check = open_store(str(path))
    readable = all(check.read(i, 1)["feats"].shape == tensor_shapes(attrs)["feats"] for i in written)
    shard_listing = sorted(str(p.relative_to(path)) for name in store.tensor_names() for p in (path / name).glob("c.*"))
    table_listing = sorted(str(p.relative_to(path)) for name in TABLE_ARRAYS for p in (path / name).glob("c.*"))
    out = {"N": K400_TRAIN, "shard_size": s, "create_s": round(create_s, 1), "after_create": created,
           "written_videos": written, "after_write": after, "shard_files_written": shard_listing,
           "table_files_after_write": table_listing, "written_videos_read_back": readable}
    shutil.rmtree(path)
    return out


# ------------------------------------------------------------------------------------ 2. marking


def shard_records(lo: int, hi: int) -> dict[int, dict[str, Any]]:
    return {i: {"status": DONE, "error": "", "num_frames": 300.0, "fps": 30.0} for i in range(lo, hi)}


def sample_shards(num_shards: int, count: int) -> list[int]:
    """``count`` shard indices spread over the store (cycling when it has fewer shards)."""
    if num_shards >= count:
        return [int(x) for x in np.linspace(0, num_shards - 1, count).round()]
    return [k % num_shards for k in range(count)]


class Clock:
    """Wall and this process's CPU time of a block (the machine is shared: CPU time is the steadier)."""

    def __enter__(self) -> "Clock":
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def median_ms(values: list[float]) -> float:
    return ms(statistics.median(values))


class MarkCase:
    """One (N, S): a new store (`create_store`, metadata only) with its `VideoTable`, and the old
    table layout beside it, timed shard by shard."""

    def __init__(self, work: Path, attrs: dict[str, Any], n: int, s: int, shards: list[int]) -> None:
        paths, labels = k400_paths(n)
        self.n, self.s, self.shards = n, s, shards
        self.new_path, self.old_path = work / f"mark_new_{n}_{s}.zarr", work / f"mark_old_{n}_{s}.zarr"
        with Clock() as c:
            create_store(str(self.new_path), attrs, paths, labels, shard_size=s)
        self.create_s = c.wall
        self.store = open_store(str(self.new_path), mode="r+")
        self.loads = []
        for _ in range(5):
            with Clock() as c:
                self.table = VideoTable(self.store)
            self.loads.append(c)
        self.old = OldTable(old_layout_store(self.old_path, n, s, [8, 9, 10, 11], 2, 8, 197, 768, paths, labels))
        self.marks: list[Clock] = []
        self.flushes: list[Clock] = []
        self.old_marks: list[Clock] = []
        self.amortised: dict[int, list[tuple[int, int, float, float]]] = {r: [] for r in RATES}

    def records(self, shard: int) -> dict[int, dict[str, Any]]:
        return shard_records(shard * self.s, min(self.n, (shard + 1) * self.s))

    def one_shard(self, k: int) -> None:
        """(a) mark, (b) flush at once, and the old per-shard mark, for the k-th sampled shard."""
        shard = self.shards[k]
        recs = self.records(shard)
        with Clock() as mark:
            self.table.mark(recs, shard)
        with Clock() as flush:
            self.table.flush()
        with Clock() as old:
            self.old.mark(recs)
        self.marks.append(mark)
        self.flushes.append(flush)
        self.old_marks.append(old)

    def one_interval(self, rate: int, start: int) -> None:
        """(c) The shards landing in one FLUSH_SECONDS interval at ``rate`` videos/s, in order from
        shard ``start``, each marked, then one flush: what the driver pays per interval."""
        num_shards = math.ceil(self.n / self.s)
        k = max(1, round(rate * FLUSH_SECONDS / self.s))
        wall = cpu = 0.0
        for j in range(k):
            shard = (start + j) % num_shards
            recs = self.records(shard)
            with Clock() as c:
                self.table.mark(recs, shard)
            wall, cpu = wall + c.wall, cpu + c.cpu
        dirty = len(self.table._dirty)
        with Clock() as c:
            self.table.flush()
        self.amortised[rate].append((k, dirty, (wall + c.wall) / k, (cpu + c.cpu) / k))

    def result(self) -> dict[str, Any]:
        amortised = {}
        for rate, runs in self.amortised.items():
            wall = statistics.median(r[2] for r in runs)
            amortised[rate] = {"shards_per_flush": runs[0][0], "dirty_chunks": sorted({r[1] for r in runs}),
                               "ms_per_shard": ms(wall), "cpu_ms_per_shard": ms(statistics.median(r[3] for r in runs)),
                               "driver_share": round(wall * rate / self.s, 5)}
        old = statistics.median(c.wall for c in self.old_marks)
        return {
            "N": self.n, "S": self.s, "samples": len(self.marks), "create_s": round(self.create_s, 1),
            "load_ms": median_ms([c.wall for c in self.loads]),
            "mark_ms": median_ms([c.wall for c in self.marks]), "mark_cpu_ms": median_ms([c.cpu for c in self.marks]),
            "flush_ms": median_ms([c.wall for c in self.flushes]), "flush_cpu_ms": median_ms([c.cpu for c in self.flushes]),
            "flush_ms_p90": ms(float(np.percentile([c.wall for c in self.flushes], 90))),
            "worst_case_ms": median_ms([a.wall + b.wall for a, b in zip(self.marks, self.flushes)]),
            "worst_case_cap_videos_per_s": round(self.s / statistics.median(a.wall + b.wall for a, b in zip(self.marks, self.flushes)), 1),
            "amortised": amortised,
            "old_mark_ms": ms(old), "old_mark_cpu_ms": median_ms([c.cpu for c in self.old_marks]),
            "old_mark_ms_p90": ms(float(np.percentile([c.wall for c in self.old_marks], 90))),
            "old_cap_videos_per_s": round(self.s / old, 1),
        }

    def close(self) -> None:
        shutil.rmtree(self.new_path)
        shutil.rmtree(self.old_path)


def marking(work: Path, attrs: dict[str, Any], sizes: list[int], ns: list[int], samples: int) -> list[dict[str, Any]]:
    """Every (N, S) case is timed round-robin, one shard of each in turn, so the load on a shared
    machine falls on all cases alike."""
    cases = [MarkCase(work, attrs, n, s, sample_shards(math.ceil(n / s), samples)) for n in ns for s in sizes]
    for k in range(samples):
        for case in cases:
            case.one_shard(k)
    for rep in range(3):
        for rate in RATES:
            for case in cases:
                case.one_interval(rate, (rep * math.ceil(case.n / case.s)) // 3)
    out = [case.result() for case in cases]
    for case in cases:
        case.close()
    return out


# ------------------------------------------------------------------------------------ 3. views


def view_bytes(work: Path, videos_340: int, train_keys: int = 4) -> list[dict[str, Any]]:
    import media

    cases = [
        ("L/14@336, 32f, 1x3 eval", Sampling("dense", 32, 8), "eval", 336),
        ("B/16, 8f, 3x1 eval", Sampling("dense", 8, 16), "eval", 224),
        ("B/16, 8f, train:2", Sampling("dense", 8, 16), "train:2", 224),
    ]
    files = {"340x256": [str(media.write_video(work / "views" / f"k{i}.mp4", media.moving_square_frames(300, 256, 340, seed=i)))
                         for i in range(videos_340)],
             "1280x720": [str(media.write_video(work / "views" / "hd.mp4", media.moving_square_frames(260, 720, 1280, seed=9)))]}
    rows = []
    for name, sampling, view_text, size in cases:
        views = ViewSet.parse(view_text, sampling)
        before = views.num_views * sampling.frames * 3 * size * size * 4
        for res, paths in files.items():
            nbytes, pickled, kinds = [], [], set()
            # train crops depend on (seed, key, view): several keys per file sample the crop sizes
            keys = [(p, f"{Path(p).name}#{j}") for p in paths for j in range(train_keys if views.kind == "train" else 1)]
            for p, key in keys:
                packed, _ = decode_views(p, sampling, views, size, key=key)
                nbytes.append(packed.nbytes)
                pickled.append(len(pickle.dumps(packed, protocol=5)))
                kinds.add("float32 views" if packed.ready is not None else "uint8 clips")
            rows.append({"case": name, "source": res, "videos": len(paths), "samples": len(keys), "views": views.num_views,
                         "before_bytes": before, "after_bytes_mean": int(statistics.mean(nbytes)),
                         "after_bytes_min": min(nbytes), "after_bytes_max": max(nbytes),
                         "pickled_bytes_mean": int(statistics.mean(pickled)), "shipped_as": ", ".join(sorted(kinds)),
                         "ratio": round(before / statistics.mean(nbytes), 2)})
    return rows


# ------------------------------------------------------------------------------------ report


def plot(marks: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r["S"] for r in marks})
    fig, axes = plt.subplots(1, len(sizes), figsize=(5.2 * len(sizes), 4.4), dpi=110, sharey=True)
    for ax, s in zip(np.atleast_1d(axes), sizes):
        new = [r for r in marks if r["S"] == s]
        labels = [f"N = {r['N']:,}" for r in new]
        series = [("old: mark per shard", [r["old_mark_ms"] for r in new]),
                  ("new: mark (memory)", [r["mark_ms"] for r in new]),
                  ("new: flush after every shard", [r["flush_ms"] for r in new]),
                  ("new: amortised, flush every 5 s @ 1000 videos/s", [r["amortised"][1000]["ms_per_shard"] for r in new])]
        x = np.arange(len(labels))
        w = 0.2
        for k, (name, ys) in enumerate(series):
            ax.bar(x + (k - 1.5) * w, ys, w, label=name)
        ax.set_xticks(x, labels)
        ax.set_yscale("log")
        ax.set_title(f"driver marking time per shard, S = {s}")
        ax.grid(alpha=0.3, axis="y")
    np.atleast_1d(axes)[0].set_ylabel("ms per shard (median)")
    handles, names = np.atleast_1d(axes)[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=2, fontsize=8)
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    fig.savefig(path)
    plt.close(fig)


def report(res: dict[str, Any]) -> str:
    out: list[str] = []
    if "inodes" in res:
        report_inodes(res, out)
    if "marking" in res:
        report_marking(res, out)
    if "views" in res:
        report_views(res, out)
    return "\n".join(out)


def report_inodes(res: dict[str, Any], out: list[str]) -> None:
    small = res["inodes"]["small_store"]
    out.append("### 1. Inodes: a real store (tiny ViT, Ray extract, train:2, 41 videos of which 1 unreadable)\n")
    out.append(md_table(["shard size", "S", "tensor arrays", "shard files", "table chunk files", "fixed", "files + dirs",
                         "formula (upper bound)", "bound 1.2 x shards + 20", "max dir depth", "done/failed", "extract s"],
                        [[k, v["shard_size"], v["arrays"], v["shard_files"], v["table_chunk_files"], v["fixed"], v["entries"],
                          v["formula_entries"], v["bound"], v["max_dir_depth"], f"{v['done']}/{v['failed']}", v["seconds"]]
                         for k, v in small.items()]))
    p = res["inodes"]["k400_projection"]
    o = res["inodes"]["k400_old_layout"]
    out.append("\n### K400 train, ViT-B/16 8f K=4 maps fp16 train:2, N = 240,436\n")
    out.append(md_table(["layout", "S", "files + dirs", "formula"],
                        [["new (schema 2), projected", p["shard_size"], f"{p['entries']:,} (bound {p['bound']:,})", p["formula"]],
                         ["old (schema 1), by formula", o["shard_size"], f"{o['entries']:,} ({o['files']:,} files + {o['dirs']:,} dirs)",
                          o["formula"]]]))
    out.append(f"\nShard files: {', '.join(f'{k} {v} MiB' for k, v in p['shard_file_mib'].items())}.")
    out.append("\nThe same formula (fixed = 1 + 2 x (5 + arrays)) for other configurations at N = 240,436:\n")
    out.append(md_table(["configuration", "S", "arrays", "shard files", "files + dirs", "bound", "within"],
                        [[r["config"], r["shard_size"], r["arrays"], f"{r['shard_files']:,}", f"{r['entries']:,}", f"{r['bound']:,}",
                          "yes" if r["within_bound"] else "**no**"] for r in res["inodes"]["other_configs"]]))
    c = res["inodes"]["k400_confirmation"]
    out.append(f"\nBuilt: `create_store` for {c['N']:,} entries at those attributes (S = {c['shard_size']}, created in "
               f"{c['create_s']} s): {c['after_create']['entries']} entries ({c['after_create']['fixed']} fixed + "
               f"{c['after_create']['table_chunk_files']} table chunk files: paths and labels). After writing random "
               f"B/16-shaped tensors for videos {c['written_videos']} (2 per shard, shards 0 and 1) and flushing their "
               f"marks: {c['after_write']['entries']} entries ({c['after_write']['shard_files']} shard files "
               f"{c['shard_files_written']}, {c['after_write']['table_chunk_files']} table chunk files), max directory "
               f"depth {c['after_write']['max_dir_depth']}.")
    ol = res["inodes"]["old_layout_check"]
    out.append(f"\nOld-layout formula check (N = 64, S = 16, 2 blocks, built here): measured {ol['measured_files']} files + "
               f"{ol['measured_dirs']} dirs, formula {ol['formula_files']} + {ol['formula_dirs']} ({'match' if ol['match'] else 'MISMATCH'}).")


def report_marking(res: dict[str, Any], out: list[str]) -> None:
    out.append("\n### 2. Driver marking time per shard (median wall ms over shards spread across the store; CPU ms in brackets)\n")
    rows = []
    for r in res["marking"]:
        rows.append([f"{r['N']:,}", r["S"], r["samples"], f"{r['old_mark_ms']} ({r['old_mark_cpu_ms']})",
                     f"{r['mark_ms']} ({r['mark_cpu_ms']})", f"{r['flush_ms']} ({r['flush_cpu_ms']})", r["worst_case_ms"],
                     *[f"{r['amortised'][k]['ms_per_shard']} ({r['amortised'][k]['cpu_ms_per_shard']})" for k in RATES],
                     r["load_ms"]])
    out.append(md_table(["N", "S", "shards", "old mark", "new mark (a)", "new flush (b)", "a + b",
                         *[f"(c) flush every {FLUSH_SECONDS:g} s @ {k} videos/s" for k in RATES], "VideoTable load"], rows))
    out.append("\nShards per flush interval and dirty table chunks (TABLE_CHUNK videos each) per flush: " + "; ".join(
        f"S={r['S']}, N={r['N']:,}: " + ", ".join(f"{k} v/s {a['shards_per_flush']} shards/{a['dirty_chunks']}" for k, a in r["amortised"].items())
        for r in res["marking"]))


def report_views(res: dict[str, Any], out: list[str]) -> None:
    out.append("\n### 3. Object-store bytes per video\n")
    out.append(md_table(["case", "source", "videos x keys", "before (float32)", "after (mean)", "after min..max", "pickled", "shipped as", "before/after"],
                        [[r["case"], r["source"], f"{r['videos']} x {r['samples'] // r['videos']}", f"{r['before_bytes']:,}", f"{r['after_bytes_mean']:,}",
                          f"{r['after_bytes_min']:,}..{r['after_bytes_max']:,}", f"{r['pickled_bytes_mean']:,}", r["shipped_as"], r["ratio"]]
                         for r in res["views"]]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--out", default="results/bench", help="folder for store.json and store_marking.png")
    parser.add_argument("--videos", type=int, default=40, help="good videos in the real small store")
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--samples", type=int, default=40, help="shards timed per (N, S)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["inodes", "marking", "views"])
    args = parser.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_store_"))
    work.mkdir(parents=True, exist_ok=True)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "loadavg_start": os.getloadavg()}}
    timed: dict[str, float] = {}

    def step(name: str, fn: Callable[[], Any]) -> Any:
        t0 = time.time()
        value = fn()
        timed[name] = round(time.time() - t0, 1)
        print(f"[bench_store] {name}: {timed[name]} s", file=sys.stderr, flush=True)
        return value

    attrs = step("build ViT-B/16 attributes", b16_attrs)
    s_k400 = choose_shard_size(attrs)
    if "inodes" not in args.skip:
        small = step("real small stores (Ray extract)", lambda: real_small_store(work, args.videos, args.num_cpus))
        fixed = {v["fixed"] for v in small.values()}
        assert len(fixed) == 1, small
        res["inodes"] = {
            "small_store": small,
            "k400_projection": new_layout_projection(attrs, K400_TRAIN, fixed.pop()),
            "k400_old_layout": old_layout_count(K400_TRAIN, len(attrs["blocks"])),
            "other_configs": projection_configs(attrs),
            "old_layout_check": step("old layout check", lambda: old_layout_check(work)),
            "k400_confirmation": step("K400 store, metadata + 2x2 videos", lambda: k400_confirmation(work, attrs)),
        }
    if "marking" not in args.skip:
        res["marking"] = step("marking", lambda: marking(work, attrs, [s_k400, 16], [K400_TRAIN, 1000], args.samples))
        plot(res["marking"], out_dir / "store_marking.png")
    if "views" not in args.skip:
        res["views"] = step("object-store bytes", lambda: view_bytes(work, 4))
    res["machine"]["loadavg_end"] = os.getloadavg()
    res["step_seconds"] = timed
    (out_dir / "store.json").write_text(json.dumps(res, indent=2))
    print(report(res))
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
