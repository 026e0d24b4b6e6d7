"""One sweep of the 8 Table 8 configurations against 8 separate runs, from the same store.

Measures, for N = 8 (every on/off combination of temporal conv / position embedding / cross
attention, pipelines/ablation_table8.py):
  - bytes read from the store per configuration: the bytes of the store's chunk reads (DataLoader
    in-process), divided by 8 for the sweep; and all the process's read-syscall bytes (/proc/self/io
    rchar: also checkpoint hashing, fonts for the plots);
  - wall time of `train_sweep` against the 8 `train` calls, and of their training loops alone;
and checks that every sweep member's losses and final weights equal its separate run's (and, as a
control, that a solo run repeats itself on this machine).

The store is extracted first (serially, no Ray) with the committed tiny ViT's shape at random
weights (speed does not depend on the weights): 4 blocks x 8 frames x 65 tokens x 128 channels plus
the attention maps, about 1 MB per view, as `make demo`'s cache.

    .venv/bin/python benchmarks/bench_sweep.py                  # ~2-4 min on 2 busy CPU cores
    .venv/bin/python benchmarks/bench_sweep.py --steps 40 --batch 32 --out results/bench_sweep.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "pipelines"))

import torch  # noqa: E402

from evl_cache.backbone import BackboneSpec  # noqa: E402
from evl_cache.config import RunConfig  # noqa: E402
from evl_cache.store import open_store  # noqa: E402
from evl_cache.sweep import members  # noqa: E402
from evl_cache.train import train, train_sweep  # noqa: E402
from evl_cache.video import Sampling, ViewSet  # noqa: E402

TINY_VIT = ROOT / "evl_cache" / "assets" / "tiny_vit" / "config.json"


class StoreReads:
    """Counts the bytes of the store's chunk reads: `ChunkReader` reads every uncompressed chunk with
    one os.preadv, and nothing else in this process calls it; the wrapper calls straight through."""

    def __init__(self) -> None:
        self.bytes = 0
        self._preadv = os.preadv

        def counted(fd: int, buffers: list, offset: int, *flags: int) -> int:
            n = self._preadv(fd, buffers, offset, *flags)
            self.bytes += n
            return n

        os.preadv = counted


def read_bytes() -> int:
    """Bytes this process has passed through read syscalls (page cache or disk) so far."""
    with open("/proc/self/io") as fh:
        for line in fh:
            if line.startswith("rchar:"):
                return int(line.split()[1])
    raise RuntimeError("/proc/self/io has no rchar")


def make_store(work: Path, videos: int) -> str:
    import media
    from test_train import build_store

    paths = [str(media.write_video(work / "videos" / f"v{i:03d}.mp4", media.moving_square_frames(16, 64, 64, seed=i)))
             for i in range(videos)]
    spec = BackboneSpec(arch=str(TINY_VIT), weights="random", seed=0, quick_gelu=True)
    return build_store(work / "train.zarr", paths, [i % 2 for i in range(videos)], ViewSet("eval", count=1, temporal=1, spatial=1),
                       blocks=[1, 2, 3, 4], sampling=Sampling("dense", frames=8, stride=2), spec=spec, shard_size=16)


def sweep_spec() -> list[dict]:
    from ablation_table8 import MODULES, combo_name, combos

    return [{"name": combo_name(c), "model": dict(zip(MODULES, map(bool, c)))} for c in combos()]


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def same_weights(a: Path, b: Path) -> bool:
    from safetensors.torch import load_file

    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--videos", type=int, default=64)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--work", type=Path, default=None, help="keep the store and runs here (default: a temp dir)")
    ap.add_argument("--out", type=Path, default=None, help="write the numbers as JSON")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        began = time.perf_counter()
        store = make_store(work, args.videos)
        extract_s = time.perf_counter() - began
        per_view = open_store(store).raw_bytes_per_view()
        base = RunConfig.from_dict({
            "train": {"steps": args.steps, "batch_size": args.batch, "lr": 1e-3, "log_every": 1,
                      "checkpoint_every": args.steps, "device": "cpu"},
            "data": {"train_store": store, "num_workers": 0},
        })
        ms = members(sweep_spec(), base, "bench")
        # warm the page cache and the imports: every measured run then reads from memory
        train(ms[0].cfg, work / "warmup", progress=False, until_step=2)
        chunks = StoreReads()
        separate = []
        for m in ms:
            r0, c0, t0 = read_bytes(), chunks.bytes, time.perf_counter()
            s = train(m.cfg, work / "separate" / m.name, progress=False)
            separate.append({"name": m.name, "wall_s": time.perf_counter() - t0, "loop_s": s.seconds,
                             "store_bytes": chunks.bytes - c0, "process_bytes": read_bytes() - r0})
        r0, c0, t0 = read_bytes(), chunks.bytes, time.perf_counter()
        summaries = train_sweep(ms, work / "sweep", progress=False)
        sweep = {"wall_s": time.perf_counter() - t0, "loop_s": summaries[0].seconds, "store_bytes": chunks.bytes - c0,
                 "process_bytes": read_bytes() - r0}

        def same(a: Path, b: Path) -> bool:
            return losses(a) == losses(b) and same_weights(a / "model.safetensors", b / "model.safetensors")

        identical = all(same(work / "sweep" / m.name, work / "separate" / m.name) for m in ms)
        diff = max(abs(x - y) for m in ms for x, y in zip(losses(work / "sweep" / m.name), losses(work / "separate" / m.name)))
        # control: the last configuration alone once more (is this machine's CPU math repeatable at all?)
        train(ms[-1].cfg, work / "again", progress=False)
        repeatable = same(work / "again", work / "separate" / ms[-1].name)
    load_after = os.getloadavg()
    n = len(ms)
    payload = args.steps * args.batch * per_view
    sep_wall = sum(r["wall_s"] for r in separate)
    sep_loop = sum(r["loop_s"] for r in separate)
    sep_bytes = sum(r["store_bytes"] for r in separate)
    sep_proc = sum(r["process_bytes"] for r in separate)
    result = {
        "configurations": n, "steps": args.steps, "batch": args.batch, "videos": args.videos,
        "bytes_per_view": per_view, "payload_bytes_per_run": payload, "extract_s": extract_s,
        "separate": separate, "sweep": sweep, "identical_losses_and_weights": identical, "max_loss_difference": diff,
        "solo_run_repeatable": repeatable,
        "store_bytes_read_per_config": {"separate": sep_bytes / n, "sweep": sweep["store_bytes"] / n},
        "process_bytes_read_per_config": {"separate": sep_proc / n, "sweep": sweep["process_bytes"] / n},
        "wall_s": {"separate": sep_wall, "sweep": sweep["wall_s"]}, "loop_s": {"separate": sep_loop, "sweep": sweep["loop_s"]},
        "loadavg_before": load_before, "loadavg_after": load_after, "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
    }
    mb = 1e6
    print(f"{n} configurations x {args.steps} steps x batch {args.batch} from one store "
          f"({args.videos} views of {per_view / mb:.2f} MB; payload {payload / mb:.1f} MB per run)")
    print(f"{'':28}{'8 separate runs':>18}{'one sweep':>14}{'ratio':>8}")
    rows = [("store bytes read per config", sep_bytes / n / mb, sweep["store_bytes"] / n / mb, "MB"),
            ("all reads per config (+ckpt)", sep_proc / n / mb, sweep["process_bytes"] / n / mb, "MB"),
            ("wall time, all 8", sep_wall, sweep["wall_s"], "s"),
            ("training loops, all 8", sep_loop, sweep["loop_s"], "s")]
    for label, a, b, unit in rows:
        print(f"{label:<28}{a:>15.1f} {unit:<2}{b:>11.1f} {unit:<2}{a / b:>7.2f}x")
    print(f"sweep members identical to their separate runs (losses, final weights): {identical} "
          f"(largest loss difference {diff:.3g}); a solo run repeated identically: {repeatable}")
    print(f"load average (1/5/15 min) before {load_before[0]:.2f}/{load_before[1]:.2f}/{load_before[2]:.2f}, "
          f"after {load_after[0]:.2f}/{load_after[1]:.2f}/{load_after[2]:.2f} on {os.cpu_count()} CPUs; "
          f"torch threads {torch.get_num_threads()}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
