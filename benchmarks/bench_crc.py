"""crc32c throughput of the two PyPI implementations, with 1..N threads (the reader's pool).

The store reader checks every chunk's crc32c inside its thread pool. An implementation that holds
the GIL serialises those checks: with N threads the checks still run at one core's speed, a ceiling
on the reader however many cores the node has. `google-crc32c` (what zarr uses) holds it for
everything but `bytes` of 1 MiB or more (the reader passes numpy buffers); `crc32c` (ICRAR) releases
it for any buffer of 32 KiB and more. Each thread checks its own share of a buffer
cut into B/16 fp16 feature chunks (9.68 MB); the best of --repeats runs is printed.

    .venv/bin/python benchmarks/bench_crc.py --threads 1,2 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np

CHUNK = 4 * 8 * 197 * 768 * 2  # one B/16 8-frame fp16 feature chunk (4 blocks), bytes


def implementations() -> dict[str, Callable[[int, np.ndarray], int]]:
    """google-crc32c (a dependency) and, when installed (`pip install crc32c`, not a dependency), crc32c."""
    import google_crc32c

    out = {"google-crc32c": lambda crc, data: google_crc32c.extend(crc, data)}
    try:
        import crc32c
    except ImportError:
        print("crc32c is not installed (pip install crc32c): measuring google-crc32c only")
        return out
    out["crc32c"] = lambda crc, data: crc32c.crc32c(data, value=crc)
    return out


def throughput(fn: Callable[[int, np.ndarray], int], chunks: list[np.ndarray], threads: int, repeats: int) -> float:
    """GB/s of checking every chunk once with a pool of ``threads`` (best of ``repeats``)."""
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats):
            started = time.perf_counter()
            list(pool.map(lambda c: fn(0, c), chunks))
            best = min(best, time.perf_counter() - started)
    return sum(len(c) for c in chunks) / best / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--chunks", type=int, default=24, help="chunks per pass (default 24: 232 MB)")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    data = np.random.default_rng(0).integers(0, 256, size=args.chunks * CHUNK, dtype=np.uint8)
    chunks = [data[i * CHUNK:(i + 1) * CHUNK] for i in range(args.chunks)]
    impls = implementations()
    sums = {name: [fn(0, c) for c in chunks[:2]] for name, fn in impls.items()}
    assert len({tuple(v) for v in sums.values()}) == 1, "the implementations disagree"
    counts = [int(t) for t in args.threads.split(",")]
    print(f"{args.chunks} chunks of {CHUNK:,} bytes, best of {args.repeats}; {os.cpu_count()} CPUs, "
          f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}\n")
    print("| implementation | " + " | ".join(f"{t} thread{'s' if t > 1 else ''} (GB/s)" for t in counts) + " |")
    print("|---|" + "---|" * len(counts))
    for name, fn in impls.items():
        print(f"| {name} | " + " | ".join(f"{throughput(fn, chunks, t, args.repeats):.2f}" for t in counts) + " |")


if __name__ == "__main__":
    main()
