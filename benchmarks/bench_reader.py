"""Reader throughput at ViT-B/16 8-frame shapes: the project's reader against the disk and against
well-kept Zarr v3 libraries (issue 9, "a reader at disk speed").

It builds two stores of random data at B/16 shapes (8 frames, 197 tokens, width 768, 12 heads, blocks
8-11, attention maps): fp16, and int8 features (per-channel x per-token scales) with uint8 maps. For
each it measures, cold (every shard file's pages dropped with posix_fadvise(DONTNEED) before the
pass) and hot (the same pass again), payload GB/s and clip-views/s of:

- raw: plain sequential reads of the shard files with one 8 MiB buffer (the disk / page-cache
  ceiling), and the same reads into a batch-sized buffer (what writing to cold memory costs);
- ChunkReader (evl_cache/store.py) per (video, view), training order (one epoch of
  `EpochSampler`: a permutation of the videos, a random view each) and store order, with and
  without crc32c verification, into a new buffer per batch (as the DataLoader allocates), and from a
  pool of threads (a bench-side pool, not project code);
- the training DataLoader (`make_loader(train=True)`, batch 16) with 0, 1, 2 workers;
- zarr-python (`arr[video, view]`, and a batch's chunks as concurrent `AsyncArray.getitem` calls);
- zarrs (zarr-python with the `zarrs.ZarrsCodecPipeline`, strict: no silent fallback);
- tensorstore (zarr3 driver, no cache pool: one read per chunk, futures in parallel, vindex).

Before timing, every library's read of a chunk is checked byte for byte against ChunkReader's, and
each library is asked to read a chunk with one flipped payload byte (does it check the crc32c?).

    .venv/bin/python benchmarks/bench_reader.py                   # ~3.6 GB fp16 + ~1.8 GB int8, ~10 min
    .venv/bin/python benchmarks/bench_reader.py --videos 8 --repeats 1 --formats fp16   # smoke run

    .venv/bin/python benchmarks/bench_reader.py --suite batch --store DIR --keep --videos 384 --views 1 --formats fp16

``--suite batch`` (issue 9's target) times the batch reader (`evl_cache.store.read_batches`, pool
sizes 1, 4, 8, 16), the ring loader (`evl_cache.ring`, the 0-worker training path) and the
DataLoader in training order against a plain sequential read of the same files, cold and warm, plus
tensorstore with an index cache and a memcpy of the same bytes (the memory-bandwidth ceiling); it writes
results/bench/reader_batch.{json,md,png} (the PNG: GB/s against the pool size).

Prints markdown; writes results/bench/reader.json and results/bench/reader.png. The stores are
deleted at the end unless --keep (--store DIR reuses DIR/fp16.zarr, DIR/int8.zarr when present).
Needs `pip install -e .[bench]` (tensorstore, zarrs); a missing library is reported, not fatal.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from evl_cache.data import EpochSampler, make_loader  # noqa: E402
from evl_cache.formats import StoreFormats  # noqa: E402
from evl_cache.store import DONE, ChunkReader, create_store, open_store, read_batches  # noqa: E402

FORMATS = {"fp16": {"dtype": "float16", "attn_format": "float16"},
           "int8": {"dtype": "int8:channel_token", "attn_format": "uint8"}}
BATCH = 16
RAW_BUFFER = 8 << 20
# Issue 9's H100 figures for one 256-clip batch of the EVL decoder step (forward + backward).
GPU_BATCH, GPU_STEP_S = 256, (0.05, 0.1)


# ------------------------------------------------------------------------------------ the stores


def b16_attrs(fmt: str, views: int) -> dict[str, Any]:
    """Store attributes of a ViT-B/16 8-frame cache, last 4 blocks, attention maps."""
    return {
        "backbone": {"arch": "ViT-B-16", "weights": "random", "weights_id": "random", "quick_gelu": False,
                     "image_size": 224, "patch_size": 16, "width": 768, "heads": 12, "layers": 12, "grid": [14, 14]},
        "blocks": [8, 9, 10, 11], "frames": 8, "tokens": 197, "width": 768, "heads": 12, "grid": [14, 14],
        "sampling": {"kind": "dense", "frames": 8, "stride": 8},
        "views": {"kind": "train", "num_views": views, "seed": 0}, "num_views": views,
        "attention": "maps", "min_frames": 8, "class_names": ["a", "b"], "manifest_sha256": "bench-reader",
        "manifest": {}, **FORMATS[fmt],
    }


def random_arrays(formats: StoreFormats, n: int, views: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random stored arrays for n videos, in their stored dtypes; floats finite (NaN is the fill)."""
    out = {}
    for name, spec in formats.arrays().items():
        shape = (n, views, *spec.shape)
        count = int(np.prod(shape))
        if spec.dtype == np.float16:
            bits = np.frombuffer(rng.bytes(2 * count), dtype=np.uint16) & np.uint16(0xBBFF)  # |x| < 2, finite
            data = bits.view(np.float16)
            if name != "feats" and name != "attn":  # scales: positive
                data = np.abs(data) + np.float16(1e-3)
        else:
            data = np.frombuffer(rng.bytes(count * spec.dtype.itemsize), dtype=spec.dtype)
        out[name] = data.reshape(shape)
    return out


def build_store(path: str, fmt: str, videos: int, views: int, shard_size: int | None, seed: int) -> None:
    attrs = b16_attrs(fmt, views)
    store = create_store(path, attrs, [f"v{i}.mp4" for i in range(videos)], [i % 2 for i in range(videos)],
                         shard_size=shard_size)
    rng = np.random.default_rng(seed)
    s = store.shard_size
    for shard in range((videos + s - 1) // s):
        todo = list(range(shard * s, min(videos, (shard + 1) * s)))
        store.write_videos(shard, todo, todo, random_arrays(store.formats, len(todo), views, rng))
    store.mark({i: {"status": DONE} for i in range(videos)})


def shard_files(path: str, names: list[str]) -> list[str]:
    files = []
    for name in names:
        folder = os.path.join(path, name)
        files += [os.path.join(folder, f) for f in sorted(os.listdir(folder)) if f.startswith("c.")]
    return files


def drop_pages(files: list[str]) -> None:
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def resident_bytes(files: list[str]) -> int | None:
    """Bytes of ``files`` in the page cache (util-linux fincore), to confirm a cold pass starts cold."""
    if not shutil.which("fincore"):
        return None
    res = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", *files],
                         capture_output=True, text=True, check=False)
    return sum(int(x) for x in res.stdout.split()) if res.returncode == 0 else None


# ------------------------------------------------------------------------------------ the readers


Pass = Callable[[], tuple[int, int]]  # one timed pass -> (clip-views read, payload bytes read)


class Bench:
    """One store: its files, its item orders and the passes under test.

    Each ``*_pass`` method does its one-off setup (opening arrays, building the DataLoader) untimed and
    returns the timed pass. ``extra`` collects per-pass details (the DataLoader's first-batch latency).
    """

    def __init__(self, path: str, threads: int) -> None:
        self.path = path
        store = open_store(path)
        self.names = store.tensor_names()
        self.specs = store.formats.arrays()
        self.views = store.num_views
        self.videos = store.num_videos
        self.files = shard_files(path, self.names)
        self.per_view = store.raw_bytes_per_view()
        items = EpochSampler(store.done_indices(), self.views, seed=0).epoch_items(0)  # the loader's epoch 0
        self.train = [divmod(int(i), self.views) for i in items]
        self.ordered = [(v, w) for v in range(self.videos) for w in range(self.views)]
        self.batches = [self.train[lo:lo + BATCH] for lo in range(0, len(self.train) - BATCH + 1, BATCH)]
        self.threads = threads
        self.buffers = {n: np.empty((BATCH, *s.shape), dtype=s.dtype) for n, s in self.specs.items()}
        self.extra: dict[str, float] = {}

    def _batched(self) -> tuple[int, int]:
        n = len(self.batches) * BATCH
        return n, n * self.per_view

    def raw_pass(self) -> Pass:
        def run() -> tuple[int, int]:
            buf, total = bytearray(RAW_BUFFER), 0
            for f in self.files:
                with open(f, "rb", buffering=0) as fh:
                    while n := fh.readinto(buf):
                        total += n
            return total // self.per_view, total
        return run

    def raw_into_batch_pass(self) -> Pass:
        """The raw read, but into consecutive slices of a batch-sized buffer (as a reader filling batch
        slots does) instead of one cache-resident 8 MiB buffer: what the destination memory costs."""
        dest = memoryview(bytearray(BATCH * self.per_view))

        def run() -> tuple[int, int]:
            total, pos = 0, 0
            for f in self.files:
                with open(f, "rb", buffering=0) as fh:
                    while True:
                        if pos + RAW_BUFFER > len(dest):
                            pos = 0
                        n = fh.readinto(dest[pos:pos + RAW_BUFFER])
                        if not n:
                            break
                        total, pos = total + n, pos + n
            return total // self.per_view, total
        return run

    def chunk_reader_pass(self, order: str, verify: bool, fresh: bool = False) -> Pass:
        """ChunkReader per (video, view) chunk into a reused batch buffer, or (``fresh``) into a new
        buffer per batch of 16, as `StoreDataset.__getitems__` allocates one."""
        pairs = self.train if order == "train" else self.ordered
        readers = {n: ChunkReader.open(self.path, n, verify_checksums=verify) for n in self.names}

        def run() -> tuple[int, int]:
            buffers = self.buffers
            for i, (video, view) in enumerate(pairs):
                if fresh and i % BATCH == 0:
                    buffers = {n: np.empty((BATCH, *s.shape), dtype=s.dtype) for n, s in self.specs.items()}
                for n, r in readers.items():
                    r.read(video, view, out=buffers[n][i % BATCH])
            return len(pairs), len(pairs) * self.per_view
        return run

    def chunk_reader_threads_pass(self) -> Pass:
        """Batches of 16 training items, every (item, array) chunk read by a pool of threads, each with
        its own ChunkReaders (a bench-side pool around the project's reader, not project code)."""
        local = threading.local()

        def read(job: tuple[str, int, int, int]) -> None:
            n, b, video, view = job
            readers = getattr(local, "readers", None)
            if readers is None:
                readers = local.readers = {m: ChunkReader.open(self.path, m) for m in self.names}
            readers[n].read(video, view, out=self.buffers[n][b])

        def run() -> tuple[int, int]:
            with ThreadPoolExecutor(self.threads) as pool:
                for batch in self.batches:
                    list(pool.map(read, [(n, b, v, w) for n in self.names for b, (v, w) in enumerate(batch)]))
            return self._batched()
        return run

    def loader_pass(self, workers: int) -> Pass:
        loader = make_loader(self.path, BATCH, train=True, num_workers=workers)

        def run() -> tuple[int, int]:
            started = time.perf_counter()
            it = iter(loader)  # workers fork here (counted: with an endless sampler this is once per run)
            next(it)
            self.extra["first_batch_s"] = time.perf_counter() - started
            for _ in range(len(self.batches) - 1):
                next(it)
            del it
            return self._batched()
        return run

    def zarr_pass(self, batched: bool, zarrs: bool = False) -> Pass:
        """zarr-python (or zarrs' codec pipeline): ``arr[video, view]`` one at a time, or a batch's
        chunks as concurrent ``AsyncArray.getitem`` calls (zarr's batched ``vindex`` cannot pick
        (video, view) pairs of a 7-d array, and ``oindex`` per view is orders of magnitude slower)."""
        import asyncio

        import zarr
        import zarr.api.asynchronous as za

        if not batched:
            with zarr_config(zarrs):
                arrays = {n: zarr.open_array(os.path.join(self.path, n), mode="r") for n in self.names}

            def run() -> tuple[int, int]:
                with zarr_config(zarrs):
                    for video, view in self.train:
                        for a in arrays.values():
                            a[video, view]
                return len(self.train), len(self.train) * self.per_view
            return run

        async def read_all() -> None:
            arrays = [await za.open_array(store=os.path.join(self.path, n), mode="r") for n in self.names]
            for batch in self.batches:
                await asyncio.gather(*[a.getitem((v, w)) for a in arrays for v, w in batch])

        def run_batched() -> tuple[int, int]:
            with zarr_config(zarrs):
                asyncio.run(read_all())
            return self._batched()
        return run_batched

    def ts_arrays(self) -> dict[str, Any]:
        import tensorstore as ts

        ctx = ts.Context({"cache_pool": {"total_bytes_limit": 0}})
        return {n: ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": os.path.join(self.path, n)}},
                           read=True, context=ctx).result() for n in self.names}

    def ts_pass(self, mode: str) -> Pass:
        """tensorstore, no cache pool: ``single`` = one chunk read at a time; ``futures`` = a batch's
        chunks (x arrays) issued together, then awaited; ``vindex`` = one read of the batch's pairs per array."""
        arrays = self.ts_arrays()

        def run() -> tuple[int, int]:
            if mode == "single":
                for video, view in self.train:
                    for a in arrays.values():
                        a[video, view].read().result()
                return len(self.train), len(self.train) * self.per_view
            for batch in self.batches:
                if mode == "futures":
                    futures = [a[v, w].read() for a in arrays.values() for v, w in batch]
                else:
                    videos, views = np.array([p[0] for p in batch]), np.array([p[1] for p in batch])
                    futures = [a.vindex[videos, views].read() for a in arrays.values()]
                for f in futures:
                    f.result()
            return self._batched()
        return run


class zarr_config:
    """zarr-python's default codec pipeline, or zarrs' (strict: an unsupported read raises, never falls back)."""

    def __init__(self, zarrs: bool) -> None:
        self.zarrs = zarrs
        self.ctx: Any = None

    def __enter__(self) -> None:
        import zarr

        if self.zarrs:
            self.ctx = zarr.config.set({"codec_pipeline.path": "zarrs.ZarrsCodecPipeline", "codec_pipeline.strict": True,
                                        "codec_pipeline.validate_checksums": True})
            self.ctx.__enter__()

    def __exit__(self, *exc: Any) -> None:
        if self.ctx is not None:
            self.ctx.__exit__(*exc)


# ------------------------------------------------------------------------------------ checks


def library_check(bench: Bench) -> dict[str, str]:
    """Each library's read of one training chunk against ChunkReader's bytes: 'ok' or why not."""
    video, view = bench.train[0]
    want = {n: ChunkReader.open(bench.path, n).read(video, view) for n in bench.names}
    readers: dict[str, Callable[[], dict[str, np.ndarray]]] = {
        "zarr": lambda: _zarr_chunk(bench, False, video, view),
        "zarrs": lambda: _zarr_chunk(bench, True, video, view),
        "tensorstore": lambda: _ts_chunk(bench, video, view),
    }
    out = {}
    for lib, read in readers.items():
        try:
            got = read()
            bad = [n for n in bench.names if got[n].tobytes() != want[n].tobytes()]
            out[lib] = "ok" if not bad else f"differs from ChunkReader on {bad}"
        except Exception as err:  # noqa: BLE001 - reported, not fatal
            out[lib] = f"{type(err).__name__}: {err}".splitlines()[0][:300]
    return out


def _zarr_chunk(bench: Bench, zarrs: bool, video: int, view: int) -> dict[str, np.ndarray]:
    import asyncio

    import zarr
    import zarr.api.asynchronous as za

    pairs = bench.train[:3]

    async def batch(name: str) -> list[Any]:  # the batched read timed below must agree too
        arr = await za.open_array(store=os.path.join(bench.path, name), mode="r")
        return await asyncio.gather(*[arr.getitem((v, w)) for v, w in pairs])

    with zarr_config(zarrs):
        got = {n: np.asarray(zarr.open_array(os.path.join(bench.path, n), mode="r")[video, view]) for n in bench.names}
        for n in bench.names:
            r = ChunkReader.open(bench.path, n)
            if any(np.asarray(x).tobytes() != r.read(v, w).tobytes() for x, (v, w) in zip(asyncio.run(batch(n)), pairs)):
                raise AssertionError(f"concurrent getitem reads of {n} differ from ChunkReader")
    return got


def _ts_chunk(bench: Bench, video: int, view: int) -> dict[str, np.ndarray]:
    arrays = bench.ts_arrays()
    got = {n: a[video, view].read().result() for n, a in arrays.items()}
    pairs = bench.train[:3]
    videos, views = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])
    for n, a in arrays.items():
        batch = a.vindex[videos, views].read().result()
        r = ChunkReader.open(bench.path, n)
        if any(batch[i].tobytes() != r.read(v, w).tobytes() for i, (v, w) in enumerate(pairs)):
            raise AssertionError(f"vindex read of {n} differs from ChunkReader")
    return got


def zarr_oindex_probe(bench: Bench) -> dict[str, float]:
    """zarr-python's orthogonal selection (the batched read zarr offers for (video, view) pairs, one
    call per view) against plain indexing, on one hot 'feats' chunk: seconds each. Too slow to time
    over a whole pass, so it is probed here and left out of the table."""
    import zarr

    video, view = bench.train[0]
    arr = zarr.open_array(os.path.join(bench.path, "feats"), mode="r")
    arr[video, view]  # pages in
    out = {}
    for name, read in (("arr[video, view]", lambda: arr[video, view]),
                       ("arr.oindex[[video], view]", lambda: arr.oindex[np.array([video]), view])):
        started = time.perf_counter()
        got = np.asarray(read()).reshape(arr.shape[2:])
        out[name] = time.perf_counter() - started
        if got.tobytes() != ChunkReader.open(bench.path, "feats").read(video, view).tobytes():
            raise AssertionError(f"zarr {name} differs from ChunkReader")
    return out


def corruption_check(workdir: str) -> dict[str, str]:
    """A 2-video fp16 store with one payload byte flipped in video 0 view 0's 'attn' chunk: does each
    reader refuse it? ('raises ...' = detected)."""
    path = os.path.join(workdir, "corrupt.zarr")
    attrs = b16_attrs("fp16", 1)
    store = create_store(path, attrs, ["a", "b"], [0, 1], shard_size=2)
    store.write_videos(0, [0, 1], [0, 1], random_arrays(store.formats, 2, 1, np.random.default_rng(1)))
    reader = ChunkReader.open(path, "attn")
    clean = reader.read(0, 0).tobytes()
    offset, _ = (int(x) for x in reader.shard_index(0)[0, 0])
    with open(reader.shard_file(0), "r+b") as fh:
        fh.seek(offset + 1000)
        byte = fh.read(1)
        fh.seek(offset + 1000)
        fh.write(bytes([byte[0] ^ 0x40]))

    def zarr_read(zarrs: bool) -> Any:
        import zarr

        with zarr_config(zarrs):
            return zarr.open_array(os.path.join(path, "attn"), mode="r")[0, 0]

    def ts_read() -> Any:
        import tensorstore as ts

        return ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": os.path.join(path, "attn")}},
                       read=True).result()[0, 0].read().result()

    tries = {"ChunkReader": lambda: ChunkReader.open(path, "attn").read(0, 0),
             "ChunkReader (verify off)": lambda: ChunkReader.open(path, "attn", verify_checksums=False).read(0, 0),
             "zarr": lambda: zarr_read(False), "zarrs": lambda: zarr_read(True), "tensorstore": ts_read}
    out = {}
    for name, fn in tries.items():
        try:
            got = np.asarray(fn()).tobytes()
            out[name] = "returned the damaged bytes without an error" if got != clean else "returned the original bytes"
        except Exception as err:  # noqa: BLE001
            out[name] = f"raises {type(err).__name__}: {str(err).splitlines()[0][:160]}"
    shutil.rmtree(path, ignore_errors=True)
    return out


def loader_child(path: str, passes: int) -> None:
    """(child process) hot DataLoader passes, 0 workers: prints [[wall s, CPU s, GB], ...] as JSON."""
    bench = Bench(path, 1)
    run = bench.loader_pass(0)
    run()  # pages in
    out = []
    for _ in range(passes):
        wall, cpu = time.perf_counter(), time.process_time()
        _, nbytes = run()
        out.append([time.perf_counter() - wall, time.process_time() - cpu, nbytes / 1e9])
    print(json.dumps(out))


def thp_probe(path: str, passes: int = 3) -> dict[str, dict[str, float]]:
    """The DataLoader (0 workers, hot) with torch's CPU allocator as is and with THP_MEM_ALLOC_ENABLE=1.

    `StoreDataset.__getitems__` allocates each batch with torch.empty. With transparent huge pages in
    ``madvise`` mode, torch's allocations get 4 KiB pages (numpy's get a huge-page madvise), so filling
    a fresh 224 MB fp16 batch costs ~55,000 page faults. Each setting runs in its own process (torch reads
    the variable once); the best of ``passes`` hot epochs is kept.
    """
    out = {}
    for label, value in (("torch allocator as is", None), ("THP_MEM_ALLOC_ENABLE=1", "1")):
        env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
        if value:
            env["THP_MEM_ALLOC_ENABLE"] = value
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
        res = subprocess.run([sys.executable, __file__, "--loader-child", path, "--repeats", str(passes)],
                             capture_output=True, text=True, env=env, check=True)
        runs = json.loads(res.stdout.strip().splitlines()[-1])
        gb = runs[0][2]
        out[label] = {"gb_per_s": gb / min(r[0] for r in runs), "cpu_s_per_gb": min(r[1] for r in runs) / gb,
                      "load1": os.getloadavg()[0]}
    return out


def library_versions() -> dict[str, str]:
    out = {}
    from importlib.metadata import PackageNotFoundError, version

    for mod in ("zarr", "zarrs", "tensorstore", "numpy", "torch", "google-crc32c"):
        try:
            out[mod] = version(mod)
        except PackageNotFoundError:
            out[mod] = "not installed (pip install -e .[bench])"
    return out


# ------------------------------------------------------------------------------------ timing


def methods(bench: Bench, libs: dict[str, str], workers: list[int]) -> list[tuple[str, Callable[[], Pass]]]:
    """(label, setup returning the timed pass) in the order they run; libraries whose check failed
    are left out (their reason is reported)."""
    out: list[tuple[str, Callable[[], Pass]]] = [
        ("raw sequential read (8 MiB buffers)", bench.raw_pass),
        (f"raw sequential read into a {BATCH}-clip-view buffer", bench.raw_into_batch_pass),
        ("ChunkReader, training order, crc32c on", lambda: bench.chunk_reader_pass("train", True)),
        ("ChunkReader, training order, crc32c on, new buffer per batch",
         lambda: bench.chunk_reader_pass("train", True, fresh=True)),
        ("ChunkReader, training order, crc32c off", lambda: bench.chunk_reader_pass("train", False)),
        ("ChunkReader, store order, crc32c on", lambda: bench.chunk_reader_pass("store", True)),
        ("ChunkReader, store order, crc32c off", lambda: bench.chunk_reader_pass("store", False)),
        (f"ChunkReader x {bench.threads} threads (bench-side pool), training order", bench.chunk_reader_threads_pass),
    ]
    out += [(f"DataLoader batch {BATCH}, {w} worker(s)", (lambda w=w: bench.loader_pass(w))) for w in workers]
    if libs.get("zarr") == "ok":
        out += [("zarr-python arr[video, view]", lambda: bench.zarr_pass(False)),
                (f"zarr-python async getitem, {BATCH} x arrays in flight", lambda: bench.zarr_pass(True))]
    if libs.get("zarrs") == "ok":
        out += [("zarrs pipeline arr[video, view]", lambda: bench.zarr_pass(False, True)),
                (f"zarrs pipeline async getitem, {BATCH} x arrays in flight", lambda: bench.zarr_pass(True, True))]
    if libs.get("tensorstore") == "ok":
        out += [("tensorstore, one read at a time", lambda: bench.ts_pass("single")),
                (f"tensorstore, {BATCH} x arrays futures in flight", lambda: bench.ts_pass("futures")),
                (f"tensorstore vindex, batch {BATCH}", lambda: bench.ts_pass("vindex"))]
    return out


def cpu_seconds() -> float:
    """CPU time of this process and of its reaped children (DataLoader workers), user + system."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def timed(bench: Bench, run: Pass) -> dict[str, Any]:
    load = os.getloadavg()[0]
    bench.extra = {}
    cpu, start = cpu_seconds(), time.perf_counter()
    views, nbytes = run()
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    return {"seconds": seconds, "clip_views": views, "bytes": nbytes, "cpu_s": cpu, "cpu_s_per_gb": cpu / (nbytes / 1e9),
            "load1": load, "gb_per_s": nbytes / seconds / 1e9, "clip_views_per_s": views / seconds, **bench.extra}


def measure_all(bench: Bench, todo: list[tuple[str, Callable[[], Pass]]], repeats: int, report: Callable[[str], None],
                failed: dict[str, str]) -> list[dict[str, Any]]:
    """``repeats`` rounds over every method (interleaved, so a change of machine load hits all of them
    alike); in each: setup (untimed), drop the pages, a cold pass, then the same pass hot. The fastest
    cold and fastest hot pass of each method are kept; every pass is in ``runs``."""
    rows = {label: {"method": label, "runs": {"cold": [], "hot": []}} for label, _ in todo}
    for _ in range(repeats):
        for label, setup in todo:
            if label in failed:
                continue
            try:
                run = setup()
                drop_pages(bench.files)
                resident = resident_bytes(bench.files)
                cold = timed(bench, run)
                cold["resident_before"] = resident
                hot = timed(bench, run)
            except Exception as err:  # noqa: BLE001 - a failing library is reported, the rest still runs
                failed[label] = f"{type(err).__name__}: {err}".splitlines()[0][:300]
                traceback.print_exc()
                continue
            rows[label]["runs"]["cold"].append(cold)
            rows[label]["runs"]["hot"].append(hot)
            report(f"  {label}: cold {cold['gb_per_s']:.3f} GB/s, hot {hot['gb_per_s']:.3f} GB/s "
                   f"(load {cold['load1']:.1f}; page-cache bytes before the cold pass: {resident})")
    out = []
    for row in rows.values():
        if row["runs"]["cold"]:
            row["best"] = {k: max(r, key=lambda x: x["gb_per_s"]) for k, r in row["runs"].items()}
            out.append(row)
    return out


# ------------------------------------------------------------------------------------ report


def gpu_arithmetic() -> list[dict[str, Any]]:
    """Bytes per clip-view and per 256-clip batch, and the read rate an H100 step would need."""
    rows = []
    for fmt in FORMATS:
        per_view = StoreFormats(b16_attrs(fmt, 1)).bytes_per_view()
        batch = per_view * GPU_BATCH
        rows.append({"format": fmt, "bytes_per_clip_view": per_view, "bytes_per_batch": batch,
                     "need_gb_per_s": [batch / t / 1e9 for t in GPU_STEP_S]})
    return rows


def table(fmt: str, results: list[dict[str, Any]]) -> str:
    raw = results[0]["best"]
    lines = [f"| {fmt}: method | cold GB/s | cold clip-views/s | cold / raw | hot GB/s | hot clip-views/s | hot / raw "
             "| CPU s per GB (cold, hot) | load (cold, hot) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        c, h = r["best"]["cold"], r["best"]["hot"]
        lines.append(f"| {r['method']} | {c['gb_per_s']:.3f} | {c['clip_views_per_s']:.1f} | "
                     f"{c['gb_per_s'] / raw['cold']['gb_per_s']:.2f} | {h['gb_per_s']:.3f} | {h['clip_views_per_s']:.1f} | "
                     f"{h['gb_per_s'] / raw['hot']['gb_per_s']:.2f} | {c['cpu_s_per_gb']:.2f}, {h['cpu_s_per_gb']:.2f} | "
                     f"{c['load1']:.1f}, {h['load1']:.1f} |")
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fmts = list(report["results"])
    fig, axes = plt.subplots(1, len(fmts), figsize=(10 * len(fmts), 8), squeeze=False)
    for ax, fmt in zip(axes[0], fmts):
        rows = report["results"][fmt]
        labels = [r["method"] for r in rows]
        y = np.arange(len(rows))
        cold = [r["best"]["cold"]["gb_per_s"] for r in rows]
        hot = [r["best"]["hot"]["gb_per_s"] for r in rows]
        ax.barh(y - 0.2, cold, 0.4, label="cold (pages dropped)")
        ax.barh(y + 0.2, hot, 0.4, label="hot (page cache)")
        ax.axvline(cold[0], color="C0", ls=":", lw=1)
        ax.axvline(hot[0], color="C1", ls=":", lw=1)
        ax.set_yticks(y, labels, fontsize=8)
        ax.invert_yaxis()
        for i, (c, h) in enumerate(zip(cold, hot)):
            ax.text(c, i - 0.2, f" {c:.2f}", va="center", fontsize=7)
            ax.text(h, i + 0.2, f" {h:.2f}", va="center", fontsize=7)
        ax.set_xlabel("payload GB/s (dotted: raw sequential read, cold and hot)")
        ax.set_title(f"B/16 8f K=4 {fmt} store, {rows[0]['best']['cold']['bytes'] / 1e9:.2f} GB of shard files")
        ax.legend(loc="lower right", fontsize=8)
    fig.suptitle(f"Reader throughput ({report['machine']['cpus']} CPUs, load avg {report['machine']['load_start']:.1f})")
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", help="folder holding (or to hold) fp16.zarr / int8.zarr; reused if present")
    ap.add_argument("--videos", type=int, default=128, help="videos per store (fp16: ~28 MB each at --views 2)")
    ap.add_argument("--views", type=int, default=2)
    ap.add_argument("--shard-size", type=int, default=None, help="videos per shard (default: ~1 GiB shard files)")
    ap.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--threads", type=int, default=4, help="threads of the bench-side ChunkReader pool")
    ap.add_argument("--repeats", type=int, default=2, help="cold+hot rounds per method (fastest kept)")
    ap.add_argument("--keep", action="store_true", help="keep the stores")
    ap.add_argument("--out", default=str(ROOT / "results" / "bench"))
    ap.add_argument("--probe-only", action="store_true",
                    help="only the DataLoader huge-page probe (writes reader_thp.json)")
    ap.add_argument("--loader-child", help=argparse.SUPPRESS)
    ap.add_argument("--suite", choices=["libraries", "batch"], default="libraries",
                    help="libraries: the comparison above; batch: the batch reader and DataLoader against a "
                         "sequential read, thread-pool sizes (writes reader_batch.{json,md,png})")
    ap.add_argument("--thread-sizes", type=int, nargs="+", default=list(THREAD_SIZES), help="batch suite: pool sizes")
    ap.add_argument("--batch", type=int, default=BATCH, help="batch suite: clip-views per batch")
    ap.add_argument("--no-tensorstore", action="store_true", help="batch suite: skip the tensorstore row")
    args = ap.parse_args()
    if args.suite == "batch":
        batch_suite(args)
        return
    if args.loader_child:
        loader_child(args.loader_child, args.repeats)
        return
    if args.probe_only:
        probe_only(args)
        return

    made_dir = args.store is None
    workdir = args.store or tempfile.mkdtemp(prefix="bench_reader_", dir=os.environ.get("BENCH_DIR"))
    os.makedirs(workdir, exist_ok=True)
    report: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_start": os.getloadavg()[0],
                    "disk": subprocess.run(["df", "-h", workdir], capture_output=True, text=True).stdout.strip()},
        "libraries": library_versions(), "gpu_arithmetic": gpu_arithmetic(), "results": {}, "checks": {},
    }
    print(f"# Reader throughput\n\n`{report['command']}` on {os.cpu_count()} CPUs, load average "
          f"{report['machine']['load_start']:.1f} at the start; stores in {workdir}\n")
    print("libraries: " + ", ".join(f"{k} {v}" for k, v in report["libraries"].items()) + "\n")
    try:
        report["checks"]["crc32c_detection"] = corruption_check(workdir)
        print("a flipped payload byte:\n" + "\n".join(f"- {k}: {v}" for k, v in report["checks"]["crc32c_detection"].items()) + "\n")
        for fmt in args.formats:
            path = os.path.join(workdir, f"{fmt}.zarr")
            if not os.path.exists(path):
                started = time.perf_counter()
                build_store(path, fmt, args.videos, args.views, args.shard_size, seed=0)
                print(f"built {path} in {time.perf_counter() - started:.1f} s")
            bench = Bench(path, args.threads)
            size = sum(os.path.getsize(f) for f in bench.files)
            print(f"{fmt}: {bench.videos} videos x {bench.views} views, {len(bench.files)} shard files, {size / 1e9:.3f} GB, "
                  f"{bench.per_view:,} payload bytes per clip-view; training epoch = {len(bench.train)} clip-views")
            libs = library_check(bench)
            report["checks"][f"{fmt}_library_reads"] = libs
            print("library reads vs ChunkReader: " + "; ".join(f"{k}: {v}" for k, v in libs.items()))
            if libs.get("zarr") == "ok":
                probe = report["checks"][f"{fmt}_zarr_oindex_probe_s"] = zarr_oindex_probe(bench)
                print("zarr-python, one hot 'feats' chunk: " + ", ".join(f"{k} {v:.3f} s" for k, v in probe.items()))
            failed: dict[str, str] = {}
            rows = measure_all(bench, methods(bench, libs, args.workers), args.repeats, lambda m: print(m, flush=True), failed)
            if failed:
                report["checks"][f"{fmt}_failed"] = failed
                print("failed: " + "; ".join(f"{k}: {v}" for k, v in failed.items()))
            report["results"][fmt] = rows
            thp = report["checks"][f"{fmt}_loader_thp_probe"] = thp_probe(path)
            print("DataLoader, 0 workers, hot: " + "; ".join(f"{k}: {v['gb_per_s']:.3f} GB/s, {v['cpu_s_per_gb']:.2f} CPU s/GB"
                                                              for k, v in thp.items()))
            report["machine"]["total_bytes_" + fmt] = size
            print("\n" + table(fmt, rows) + "\n")
    finally:
        if not args.keep:
            for fmt in FORMATS:
                shutil.rmtree(os.path.join(workdir, f"{fmt}.zarr"), ignore_errors=True)
            if made_dir:
                shutil.rmtree(workdir, ignore_errors=True)
    report["machine"]["load_end"] = os.getloadavg()[0]

    print("## GPU-side arithmetic (issue 9: a 256-clip H100 decoder step takes 0.05-0.1 s)\n")
    print("| format | bytes / clip-view | GB / 256-clip batch | read rate needed at 0.1 s | at 0.05 s |\n|---|---|---|---|---|")
    for g in report["gpu_arithmetic"]:
        print(f"| {g['format']} | {g['bytes_per_clip_view']:,} | {g['bytes_per_batch'] / 1e9:.2f} | "
              f"{g['need_gb_per_s'][1]:.1f} GB/s | {g['need_gb_per_s'][0]:.1f} GB/s |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "reader.json").write_text(json.dumps(report, indent=1))
    if report["results"]:
        plot(report, out / "reader.png")
    print(f"\nwrote {out / 'reader.json'} and {out / 'reader.png'}; load average at the end {report['machine']['load_end']:.1f}")


def probe_only(args: argparse.Namespace) -> None:
    if not args.store:
        raise SystemExit("--probe-only needs --store DIR holding fp16.zarr / int8.zarr (build them with --keep)")
    out = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "load_start": os.getloadavg()[0]}
    for fmt in args.formats:
        probe = out[fmt] = thp_probe(os.path.join(args.store, f"{fmt}.zarr"))
        print(f"{fmt}: DataLoader, 0 workers, hot: " + "; ".join(
            f"{k}: {v['gb_per_s']:.3f} GB/s, {v['cpu_s_per_gb']:.2f} CPU s/GB (load {v['load1']:.1f})" for k, v in probe.items()))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "reader_thp.json").write_text(json.dumps(out, indent=1))


# ------------------------------------------------------------------------------------ the batch-reader suite


THREAD_SIZES = (1, 4, 8, 16)
WARM_PASSES = 3  # warm passes per method and repeat; the fastest is kept


def store_files(path: str) -> list[str]:
    """Every file of the store (shard files, zarr.json, the table's chunks): what a cold pass drops."""
    return sorted(os.path.join(root, f) for root, _, files in os.walk(path) for f in files)


class BatchBench:
    """The batch reader (`evl_cache.store.read_batches`) and the training DataLoader in training order
    (`EpochSampler` epoch 0, batches of ``batch``) against a plain sequential read of the same files."""

    def __init__(self, path: str, batch: int) -> None:
        self.path = path
        store = open_store(path)
        self.names = store.tensor_names()
        self.specs = store.formats.arrays()
        self.views = store.num_views
        self.per_view = store.raw_bytes_per_view()
        self.files = shard_files(path, self.names)
        self.all_files = store_files(path)
        self.batch = batch
        items = EpochSampler(store.done_indices(), self.views, seed=0).epoch_items(0)
        pairs = [divmod(int(i), self.views) for i in items]
        self.batches = [pairs[lo:lo + batch] for lo in range(0, len(pairs) - batch + 1, batch)]
        self.read_bytes = len(self.batches) * batch * self.per_view

    def sequential(self, into_batch: bool = False) -> Pass:
        """Every tensor shard file front to back with one reused 8 MiB buffer (or, ``into_batch``,
        into consecutive slices of a batch-sized buffer)."""
        dest = memoryview(bytearray(self.batch * self.per_view if into_batch else RAW_BUFFER))

        def run() -> tuple[int, int]:
            total, pos = 0, 0
            for f in self.files:
                with open(f, "rb", buffering=0) as fh:
                    while True:
                        if pos + RAW_BUFFER > len(dest):
                            pos = 0
                        n = fh.readinto(dest[pos:pos + RAW_BUFFER])
                        if not n:
                            break
                        total += n
                        pos = pos + n if into_batch else 0
            return total // self.per_view, total
        return run

    def batch_reader(self, threads: int, verify: bool = True) -> Pass:
        """`read_batches` of every array into one reused batch buffer per array (fresh readers: the
        shard indexes are read during the pass, as a new worker would). ``verify=False`` skips the
        crc32c checks: not a training mode, the cost of the copy path alone."""
        buffers = {n: np.empty((self.batch, *s.shape), dtype=s.dtype) for n, s in self.specs.items()}

        def run() -> tuple[int, int]:
            readers = {n: ChunkReader.open(self.path, n, verify_checksums=verify, threads=threads) for n in self.names}
            targets = [(readers[n], buffers[n]) for n in self.names]
            for pairs in self.batches:
                read_batches(targets, pairs, threads)
            for r in readers.values():
                r.close()
            return len(self.batches) * self.batch, self.read_bytes
        return run

    def loader(self, threads: int, workers: int) -> Pass:
        """`make_loader(train=True, ring=False)`: the DataLoader, batch tensors allocated per batch."""
        def run() -> tuple[int, int]:
            loader = make_loader(self.path, self.batch, train=True, num_workers=workers, read_threads=threads, ring=False)
            it = iter(loader)
            for _ in range(len(self.batches)):
                next(it)
            del it
            return len(self.batches) * self.batch, self.read_bytes
        return run

    def ring(self, threads: int, depth: int = 2) -> Pass:
        """The ring loader (`evl_cache.ring`, the 0-worker training path): the same epoch in the same
        batches, read ``depth`` batches ahead by a background thread into ``depth + 2`` reused slots.
        The slots are allocated and touched in setup (`RingLoader.reserve`): a training run pays that
        once, not per epoch. The items are the epoch's, in training order, so the pass ends with it."""
        items = [video * self.views + view for pairs in self.batches for video, view in pairs]
        loader = make_loader(self.path, self.batch, train=False, items=items, read_threads=threads,
                             prefetch_factor=depth)
        loader.reserve()

        def run() -> tuple[int, int]:
            n = sum(1 for _ in loader)
            assert n == len(self.batches)
            return n * self.batch, self.read_bytes
        return run

    def memcpy(self, into_batch: bool, threads: int = 1) -> Pass:
        """The memory-bandwidth ceiling, no file or kernel involved: the epoch's bytes (a source buffer
        of the same size as the page-cache pages a warm pass reads, capped at 2 GB) copied into one
        reused 8 MiB buffer, or into a reused batch-sized buffer, as the two sequential reads do.
        ``threads`` > 1 splits the bytes and the destination between threads (numpy copies release the
        GIL), as the reader's pool splits a batch: the ceiling of any reader that fills batch memory."""
        size = min(self.read_bytes, 2 << 30)
        src = np.ones(size, dtype=np.uint8)
        dests = [np.empty((self.batch * self.per_view // threads) if into_batch else RAW_BUFFER, dtype=np.uint8)
                 for _ in range(threads)]
        for d in dests:
            d.fill(0)
        share = self.read_bytes // threads

        def copy(k: int) -> int:
            dest, total, pos = dests[k], 0, 0
            while total < share:
                lo = (k * share + total) % size
                n = min(RAW_BUFFER, size - lo, len(dest) - pos, share - total)
                np.copyto(dest[pos:pos + n], src[lo:lo + n])
                total += n
                pos = (pos + n) % len(dest) if into_batch else 0
            return total

        def run() -> tuple[int, int]:
            if threads == 1:
                total = copy(0)
            else:
                with ThreadPoolExecutor(threads) as pool:
                    total = sum(pool.map(copy, range(threads)))
            return total // self.per_view, total
        return run

    def tensorstore(self) -> Pass:
        """tensorstore (zarr3 driver), a batch's chunks x arrays as futures in flight, with a 64 MiB cache
        pool so shard indexes stay cached (its docs: without one every read re-reads the index)."""
        import tensorstore as ts

        ctx = ts.Context({"cache_pool": {"total_bytes_limit": 64 << 20}})
        arrays = [ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": os.path.join(self.path, n)}},
                          read=True, context=ctx).result() for n in self.names]

        def run() -> tuple[int, int]:
            for pairs in self.batches:
                futures = [a[v, w].read() for a in arrays for v, w in pairs]
                for f in futures:
                    f.result()
            return len(self.batches) * self.batch, self.read_bytes
        return run


def check_batch_reader(bench: BatchBench) -> str:
    """Before timing: the first batch through read_batches, the DataLoader and (if present) tensorstore
    equals zarr-python's reads, byte for byte."""
    import zarr

    pairs = bench.batches[0]
    want = {n: np.stack([np.asarray(zarr.open_array(os.path.join(bench.path, n), mode="r")[v, w]) for v, w in pairs])
            for n in bench.names}
    readers = [(ChunkReader.open(bench.path, n), np.empty_like(want[n])) for n in bench.names]
    read_batches(readers, pairs, 8)
    got = next(iter(make_loader(bench.path, bench.batch, train=True, ring=False)))
    ring = next(iter(make_loader(bench.path, bench.batch, train=True)))
    for (_, out), n in zip(readers, bench.names):
        if out.tobytes() != want[n].tobytes() or got[n].numpy().tobytes() != want[n].tobytes() \
                or ring[n].numpy().tobytes() != want[n].tobytes():
            raise AssertionError(f"batch reader differs from zarr on {n}")
    try:
        import tensorstore  # noqa: F401
    except ImportError:
        return "tensorstore not installed"
    import tensorstore as ts

    for n in bench.names:
        a = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": os.path.join(bench.path, n)}}, read=True).result()
        if np.stack([a[v, w].read().result() for v, w in pairs]).tobytes() != want[n].tobytes():
            raise AssertionError(f"tensorstore differs from zarr on {n}")
    return "ok"


def batch_suite(args: argparse.Namespace) -> None:
    """Issue 9's reader target: the batch reader and the DataLoader, cold and warm, against a plain
    sequential read of the same files; thread-pool sizes 1, 4, 8, 16."""
    workdir = args.store or tempfile.mkdtemp(prefix="bench_reader_", dir=os.environ.get("BENCH_DIR"))
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, f"batch_{args.formats[0]}_v{args.views}.zarr")
    report: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "loadavg_start": list(os.getloadavg())},
        "libraries": library_versions(), "rows": [],
    }
    try:
        if not os.path.exists(path):
            started = time.perf_counter()
            build_store(path, args.formats[0], args.videos, args.views, args.shard_size, seed=0)
            report["build_s"] = time.perf_counter() - started
        bench = BatchBench(path, args.batch)
        size = sum(os.path.getsize(f) for f in bench.files)
        report["store"] = {"path": path, "format": args.formats[0], "videos": open_store(path).num_videos, "views": bench.views,
                           "shard_files": len(bench.files), "shard_bytes": size, "bytes_per_clip_view": bench.per_view,
                           "epoch_clip_views": len(bench.batches) * bench.batch, "epoch_bytes": bench.read_bytes,
                           "batch": bench.batch}
        print(f"# Batch reader\n\n`{report['command']}`; load average {os.getloadavg()}\n")
        print(f"store: {len(bench.files)} shard files, {size / 1e9:.2f} GB, {bench.per_view:,} B per clip-view; "
              f"epoch: {len(bench.batches)} batches of {bench.batch}, {bench.read_bytes / 1e9:.2f} GB")
        report["check"] = check_batch_reader(bench)
        print(f"check against zarr-python (batch reader, DataLoader, tensorstore): {report['check']}")
        todo: list[tuple[str, str, int | None, Callable[[], Pass]]] = [
            ("sequential", "plain sequential read (8 MiB buffer)", None, lambda: bench.sequential()),
            ("sequential_batch", f"plain sequential read into a {bench.batch}-clip-view buffer", None,
             lambda: bench.sequential(True)),
        ]
        for t in args.thread_sizes:
            todo.append(("batch_reader", f"batch reader, {t} threads", t, lambda t=t: bench.batch_reader(t)))
        for t in args.thread_sizes:
            todo.append(("ring", f"ring loader (0 workers, depth 2), {t} threads", t, lambda t=t: bench.ring(t)))
        for t in args.thread_sizes:
            todo.append(("loader0", f"DataLoader, 0 workers, {t} threads", t, lambda t=t: bench.loader(t, 0)))
        for w in args.workers:
            if w > 0:
                todo.append((f"loader{w}", f"DataLoader, {w} workers, {args.threads} threads each", args.threads,
                             lambda w=w: bench.loader(args.threads, w)))
        if report["check"] == "ok" and not args.no_tensorstore:
            todo.append(("tensorstore", "tensorstore, futures per batch, index cache", None, bench.tensorstore))
        todo.append(("batch_reader_nocrc", "batch reader, 4 threads, crc32c checks off (the copy path alone)", 4,
                     lambda: bench.batch_reader(4, verify=False)))
        todo += [("memcpy", "memcpy of the same bytes into an 8 MiB buffer (no file)", None, lambda: bench.memcpy(False)),
                 ("memcpy_batch", f"memcpy into a {bench.batch}-clip-view buffer (no file)", None, lambda: bench.memcpy(True)),
                 ("memcpy_batch2", f"memcpy into a {bench.batch}-clip-view buffer, 2 threads (no file)", 2,
                  lambda: bench.memcpy(True, threads=2))]
        for _ in range(args.repeats):
            for kind, label, threads, setup in todo:
                run = setup()
                drop_pages(bench.all_files)
                resident = resident_bytes(bench.all_files)
                cold = timed(bench, run)  # type: ignore[arg-type]
                # warm: the fastest of WARM_PASSES passes (a warm pass takes about a second, so one is noisy)
                hot = max((timed(bench, run) for _ in range(WARM_PASSES)), key=lambda r: r["gb_per_s"])  # type: ignore[arg-type]
                cold["resident_before"] = resident
                report["rows"].append({"kind": kind, "method": label, "threads": threads, "cold": cold, "warm": hot})
                print(f"  {label}: cold {cold['gb_per_s']:.3f} GB/s, warm {hot['gb_per_s']:.3f} GB/s "
                      f"(load {cold['load1']:.1f}, {hot['load1']:.1f}; resident before cold: {resident})", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(path, ignore_errors=True)
            if args.store is None:
                shutil.rmtree(workdir, ignore_errors=True)
    report["machine"]["loadavg_end"] = list(os.getloadavg())
    best = summarize(report)
    md = batch_table(report, best)
    print("\n" + md)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "reader_batch.json").write_text(json.dumps(report, indent=1))
    (out / "reader_batch.md").write_text(md + "\n")
    plot_threads(report, best, out / "reader_batch.png")
    print(f"\nwrote {out / 'reader_batch.json'}, reader_batch.md, reader_batch.png")


def summarize(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The fastest cold and fastest warm pass of each method (over the repeats)."""
    best: dict[str, dict[str, Any]] = {}
    for row in report["rows"]:
        b = best.setdefault(row["method"], {"kind": row["kind"], "threads": row["threads"], "cold": row["cold"], "warm": row["warm"]})
        for k in ("cold", "warm"):
            if row[k]["gb_per_s"] > b[k]["gb_per_s"]:
                b[k] = row[k]
    report["best"] = best
    return best


def batch_table(report: dict[str, Any], best: dict[str, dict[str, Any]]) -> str:
    seq = next(b for b in best.values() if b["kind"] == "sequential")
    lines = ["| method | cold GB/s | cold / sequential | warm GB/s | warm / sequential | CPU s per GB (cold, warm) | load (cold, warm) |",
             "|---|---|---|---|---|---|---|"]
    for label, b in best.items():
        c, w = b["cold"], b["warm"]
        lines.append(f"| {label} | {c['gb_per_s']:.3f} | {c['gb_per_s'] / seq['cold']['gb_per_s']:.2f} | {w['gb_per_s']:.3f} | "
                     f"{w['gb_per_s'] / seq['warm']['gb_per_s']:.2f} | {c['cpu_s_per_gb']:.2f}, {w['cpu_s_per_gb']:.2f} | "
                     f"{c['load1']:.1f}, {w['load1']:.1f} |")
    return "\n".join(lines)


def plot_threads(report: dict[str, Any], best: dict[str, dict[str, Any]], path: Path) -> None:
    """GB/s against the thread-pool size, cold and warm, with the sequential read as dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    seq = next(b for b in best.values() if b["kind"] == "sequential")
    for kind, name, marker in (("batch_reader", "batch reader", "o"), ("ring", "ring loader", "^"),
                               ("loader0", "DataLoader, 0 workers", "s")):
        rows = sorted((b for b in best.values() if b["kind"] == kind), key=lambda b: b["threads"])
        if not rows:
            continue
        xs = [b["threads"] for b in rows]
        ax.plot(xs, [b["cold"]["gb_per_s"] for b in rows], marker=marker, color="C0", label=f"{name}, cold")
        ax.plot(xs, [b["warm"]["gb_per_s"] for b in rows], marker=marker, color="C1", label=f"{name}, warm",
                ls={"batch_reader": "-", "ring": "-."}.get(kind, "--"))
    for state, color in (("cold", "C0"), ("warm", "C1")):
        ax.axhline(seq[state]["gb_per_s"], color=color, ls=":", lw=1.5, label=f"sequential read, {state}")
        ax.axhline(0.8 * seq[state]["gb_per_s"], color=color, ls=":", lw=0.7, alpha=0.6)
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(THREAD_SIZES), [str(t) for t in THREAD_SIZES])
    ax.set_xlabel("reader threads per process")
    ax.set_ylabel("payload GB/s (training order)")
    st = report["store"]
    load = report["machine"]["loadavg_start"][0]
    ax.set_title(f"B/16 8f {st['format']} store, {st['shard_bytes'] / 1e9:.1f} GB, batch {st['batch']} "
                 f"({report['machine']['cpus']} CPUs, load {load:.1f}); faint: 0.8 x sequential", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
