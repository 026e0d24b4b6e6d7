"""TCA cost: relative-offset binning (evl_cache.tca) vs the direct (P, P, C) gather formulation.

Run: .venv/bin/python benchmarks/bench_tca.py [--repeats 3] [--threads 1] [--no-backward]
     [--batch 32 --shapes B/16@224]

Per shape (T=8, batch 1 unless --batch, one decoder layer's TCA = prev + next tables) it reports wall time
(median of --repeats after one warm-up) and peak tensor memory of the call. Peak memory comes from
torch.cuda.max_memory_allocated on a GPU, else from torch's MemTracker (a dispatch-mode tracker
of every live CPU tensor, parameters and inputs included), i.e. tensor bytes, not process RSS.
Both formulations are checked to agree before timing. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from evl_cache.tca import TemporalCrossAttention, tca_direct

SHAPES = [("tiny@64", (8, 8), 128),  # the demo's tiny ViT: TemporalCrossAttention gathers directly here
          ("B/16@224", (14, 14), 768), ("L/14@224", (16, 16), 1024), ("L/14@336", (24, 24), 1024)]


def make(grid, width, frames, device, batch=1):
    torch.manual_seed(0)
    tca = TemporalCrossAttention(grid, width, method="binned").to(device)
    with torch.no_grad():
        tca.w_prev.normal_(std=0.02)
        tca.w_next.normal_(std=0.02)
    P = grid[0] * grid[1]
    maps = torch.rand(batch, 2, frames - 1, P, P, device=device).softmax(-1)
    return tca, maps


def step(kind, tca, maps, backward):
    if kind == "binned":
        out = tca(maps)
    else:
        out = tca_direct(maps, tca.w_prev, tca.w_next, tca.grid)
    if backward:
        out.square().sum().backward()
        tca.w_prev.grad = tca.w_next.grad = None
    return out


def timed(kind, tca, maps, backward, repeats, device):
    times = []
    for i in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step(kind, tca, maps, backward)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:  # first run is warm-up
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_bytes(kind, tca, maps, backward, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step(kind, tca, maps, backward)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    tracker.track_external(tca, maps)
    with tracker:
        step(kind, tca, maps, backward)
    return tracker.get_tracker_snapshot("peak")[device]["Total"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--shapes", default="", help="comma-separated shape names to run (default: all)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-backward", action="store_true")
    ap.add_argument("--skip-direct", default="", help="comma-separated shape names to skip for direct")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backward = not args.no_backward
    skip = set(filter(None, args.skip_direct.split(",")))
    mode = "forward+backward" if backward else "forward"
    print(f"TCA {mode}, T={args.frames}, batch {args.batch}, fp32, {device.type}"
          f"{'' if device.type == 'cuda' else f', {args.threads} thread(s)'}\n")
    print("| shape | grid | C | P | (2h-1)(2w-1) | binned ms | binned peak MiB | direct ms | direct peak MiB | memory ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    wanted = set(filter(None, args.shapes.split(",")))
    for name, grid, width in SHAPES:
        if wanted and name not in wanted:
            continue
        tca, maps = make(grid, width, args.frames, device, args.batch)
        with torch.no_grad():
            err = (tca(maps) - tca_direct(maps, tca.w_prev, tca.w_next, grid)).abs().max().item()
        assert err < 1e-4, f"{name}: formulations disagree by {err}"
        b_ms = 1e3 * timed("binned", tca, maps, backward, args.repeats, device)
        b_mem = peak_bytes("binned", tca, maps, backward, device) / 2**20
        if name in skip:
            d_ms = d_mem = float("nan")
        else:
            d_ms = 1e3 * timed("direct", tca, maps, backward, 1 if name == "L/14@336" else args.repeats, device)
            d_mem = peak_bytes("direct", tca, maps, backward, device) / 2**20
        P, R = grid[0] * grid[1], (2 * grid[0] - 1) * (2 * grid[1] - 1)
        print(f"| {name} | {grid[0]}x{grid[1]} | {width} | {P} | {R} | {b_ms:.1f} | {b_mem:.1f} | "
              f"{d_ms:.1f} | {d_mem:.1f} | {d_mem / b_mem:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
