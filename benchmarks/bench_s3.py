"""Reader throughput from a local S3-compatible server against the local filesystem, same shapes.

Builds a ViT-B/16-shaped fp16 store of random data (8 frames, 197 tokens, width 768, blocks 8-11,
attention maps: 13,985,536 payload bytes per clip-view) on the local disk, copies its objects into a
moto S3 server on 127.0.0.1 (`moto.server.ThreadedMotoServer`, in this process, objects in memory),
then reads every clip-view in training order (a random permutation, batches of --batch) with
`evl_cache.store.read_batches` (a pool of --threads, crc32c checked) from both, --repeats passes each
(the best is reported; the local pass runs from the page cache). Prints one markdown table.

    .venv/bin/python benchmarks/bench_s3.py --videos 32

moto is a Python (werkzeug) server: the figure bounds what the reader gets from a slow local
endpoint, not what a real object store on a fast network gives.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_reader import build_store  # noqa: E402

from evl_cache import location  # noqa: E402
from evl_cache.store import open_store, read_batches  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_pass(path: str, order: list[int], batch: int, threads: int) -> tuple[float, int]:
    """Seconds and payload bytes of one pass over ``order`` (clip-views, one view per video)."""
    store = open_store(path)
    readers = [store.reader(n) for n in store.tensor_names()]
    started = time.perf_counter()
    nbytes = 0
    for lo in range(0, len(order), batch):
        pairs = [(v, 0) for v in order[lo:lo + batch]]
        outs = [np.empty((len(pairs), *r.chunk_shape[2:]), dtype=r.dtype) for r in readers]
        read_batches(list(zip(readers, outs)), pairs, threads)
        nbytes += sum(o.nbytes for o in outs)
    return time.perf_counter() - started, nbytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--videos", type=int, default=32)
    ap.add_argument("--shard-size", type=int, default=8)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per ranged GET otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_REGION="us-east-1",
                      AWS_ENDPOINT_URL_S3=f"http://127.0.0.1:{port}")
    try:
        with tempfile.TemporaryDirectory(prefix="bench-s3-") as tmp:
            local = os.path.join(tmp, "fp16.zarr")
            build_store(local, "fp16", args.videos, 1, args.shard_size, seed=0)
            fs, _ = location.filesystem("s3://bench")
            fs.call_s3("create_bucket", Bucket="bench")
            fs.put(local, "bench/fp16.zarr", recursive=True)
            url = "s3://bench/fp16.zarr"
            order = list(np.random.default_rng(0).permutation(args.videos))
            rows = []
            for name, path in (("local filesystem (page cache)", local), ("S3 (moto on 127.0.0.1)", url)):
                best, nbytes = min(one_pass(path, order, args.batch, args.threads) for _ in range(args.repeats))
                rows.append((name, nbytes / best / 1e9, args.videos / best))
            load = os.getloadavg()
    finally:
        server.stop()
    print(f"B/16 fp16 store, {args.videos} clip-views, shard {args.shard_size} videos, batch {args.batch}, "
          f"{args.threads} threads, best of {args.repeats}; load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}, "
          f"{os.cpu_count()} CPUs\n")
    print("| source | GB/s | clip-views/s |\n|---|---|---|")
    for name, gbs, cvs in rows:
        print(f"| {name} | {gbs:.3f} | {cvs:.1f} |")
    print(f"\nS3 / local: {rows[1][1] / rows[0][1]:.3f}")


if __name__ == "__main__":
    main()
