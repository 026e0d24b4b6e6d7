"""Table 3 of the EVL paper as a benchmark: inference latency at batch 1 and throughput at the
largest batch that fits, for the frozen backbone plus the EVL decoder, end to end.

"End to end" starts from normalised frames already on the device, (B, T, 3, S, S), and ends at the
logits: every backbone block the decoder needs (with the adjacent-frame attention maps), then the
decoder and head. Video decoding is not in it. Random-init weights at the real shapes (the speed of
a ViT does not depend on its weights); fp32 on the CPU, fp16 on CUDA (docs/reference.md, "Backbone").

How the largest batch is found:
- CUDA: double the batch until the forward runs out of memory, then bisect between the last batch
  that ran and the first that did not (`--bisect` rounds).
- CPU: double the batch until `--max-batch` (default 8) or until the process's peak resident memory,
  scaled to the next batch, would pass `--mem-cap-gib` (default 8 GiB): a CPU has no OOM to back
  off from, only swapping.

    .venv/bin/python benchmarks/bench_latency.py                      # B/16 8 frames, CPU, a few minutes
    .venv/bin/python benchmarks/bench_latency.py --arch ViT-B-16 ViT-L-14 --device cuda
Writes results/bench/latency.json and results/bench/latency.png (latency and throughput vs batch).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from evl_cache.backbone import BackboneSpec, build_backbone  # noqa: E402
from evl_cache.decoder import EVLDecoder  # noqa: E402
from evl_cache.flops import backbone_macs, decoder_config_for, decoder_macs, vit_dims  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class Point:
    """One batch size: median seconds per forward, split into backbone and decoder."""

    batch: int
    total_s: float
    backbone_s: float
    decoder_s: float
    peak_bytes: int
    cpu_s: float = 0.0  # median process CPU seconds per forward: on a shared CPU, what the work itself cost

    @property
    def clips_per_s(self) -> float:
        return self.batch / self.total_s


@dataclass
class ModelBench:
    arch: str
    frames: int
    layers: int
    device: str
    precision: str
    gmacs_per_clip: float
    points: list[Point] = field(default_factory=list)
    stop_reason: str = ""


class EndToEnd:
    """Backbone (the last `layers` blocks captured, attention maps) + decoder, one timed forward."""

    def __init__(self, arch: str, frames: int, layers: int, classes: int, device: torch.device, precision: str) -> None:
        dims = vit_dims(arch)
        spec = BackboneSpec(arch=arch, weights="random", seed=0, precision=precision)
        blocks = list(range(dims.layers - layers, dims.layers))
        self.backbone = build_backbone(spec, blocks=blocks, attention="maps", device=device)
        torch.manual_seed(0)
        self.cfg = decoder_config_for(dims, frames, layers, classes)
        self.decoder = EVLDecoder(self.cfg).to(device).eval()
        self.device, self.frames, self.size = device, frames, dims.image_size
        self.half = precision == "fp16"
        self.gmacs = (sum(backbone_macs(dims, frames).values()) + sum(decoder_macs(self.cfg, "binned").values())) / 1e9

    def inputs(self, batch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(batch)
        x = torch.randn(batch, self.frames, 3, self.size, self.size, generator=g)
        return x.to(self.device, torch.float16 if self.half else torch.float32)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> tuple[float, float, torch.Tensor]:
        sync(self.device)
        t0 = time.perf_counter()
        feats = self.backbone(x)
        sync(self.device)
        t1 = time.perf_counter()
        ctx = torch.autocast("cuda", dtype=torch.float16) if self.device.type == "cuda" and self.half else \
            torch.autocast(self.device.type, enabled=False)
        with ctx:
            logits = self.decoder(feats)
        sync(self.device)
        return t1 - t0, time.perf_counter() - t1, logits


def measure(model: EndToEnd, batch: int, warmup: int, repeats: int) -> Point:
    x = model.inputs(batch)
    if model.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(model.device)
    for _ in range(warmup):
        model(x)
    bb, dec, cpu = [], [], []
    for _ in range(repeats):
        c0 = time.process_time()
        a, b, logits = model(x)
        cpu.append(time.process_time() - c0)
        bb.append(a)
        dec.append(b)
    assert logits.shape == (batch, model.cfg.num_classes) and torch.isfinite(logits.float()).all()
    totals = [a + b for a, b in zip(bb, dec)]
    peak = torch.cuda.max_memory_allocated(model.device) if model.device.type == "cuda" else peak_rss_bytes()
    return Point(batch, statistics.median(totals), statistics.median(bb), statistics.median(dec), int(peak),
                 statistics.median(cpu))


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def bench_model(arch: str, args: argparse.Namespace, device: torch.device) -> ModelBench:
    precision = args.precision if args.precision != "auto" else ("fp16" if device.type == "cuda" else "fp32")
    model = EndToEnd(arch, args.frames, args.layers, args.classes, device, precision)
    res = ModelBench(arch, args.frames, args.layers, str(device), precision, model.gmacs)
    print(f"# {arch}, {args.frames} frames, K={args.layers}, {device} {precision}: {model.gmacs:.1f} GMACs per clip", flush=True)
    good, bad, batch = 0, 0, 1
    while True:
        try:
            p = measure(model, batch, args.warmup, args.repeats)
        except RuntimeError as err:
            if device.type != "cuda" or not is_oom(err):
                raise
            torch.cuda.empty_cache()
            bad = batch
            print(f"  batch {batch}: out of memory", flush=True)
            break
        res.points.append(p)
        good = batch
        print(f"  batch {batch}: {p.total_s * 1e3:.1f} ms (backbone {p.backbone_s * 1e3:.1f}, decoder "
              f"{p.decoder_s * 1e3:.1f}), {p.clips_per_s:.2f} clips/s, process CPU {p.cpu_s * 1e3:.1f} ms, "
              f"peak {p.peak_bytes / 2**30:.2f} GiB", flush=True)
        if batch * 2 > args.max_batch:
            res.stop_reason = f"batch cap {args.max_batch}"
            break
        if device.type == "cpu" and p.peak_bytes * 2 > args.mem_cap_gib * 2**30:
            res.stop_reason = f"memory cap {args.mem_cap_gib} GiB (peak RSS {p.peak_bytes / 2**30:.1f} GiB x 2 would pass it)"
            break
        batch *= 2
    if bad:  # CUDA: back off between the last batch that ran and the first that did not
        for _ in range(args.bisect):
            mid = (good + bad) // 2
            if mid <= good:
                break
            try:
                p = measure(model, mid, args.warmup, args.repeats)
                res.points.append(p)
                good = mid
                print(f"  batch {mid}: {p.total_s * 1e3:.1f} ms, {p.clips_per_s:.2f} clips/s", flush=True)
            except RuntimeError as err:
                if not is_oom(err):
                    raise
                torch.cuda.empty_cache()
                bad = mid
                print(f"  batch {mid}: out of memory", flush=True)
        res.stop_reason = f"out of memory at batch {bad}"
    res.points.sort(key=lambda q: q.batch)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return res


def table(results: list[ModelBench]) -> str:
    lines = ["| model | frames | device, precision | GMACs / clip | latency, batch 1 (backbone + decoder) | "
             "process CPU, batch 1 | largest batch (why it stops) | throughput at it | achieved TMAC/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        one = r.points[0]
        top = max(r.points, key=lambda q: q.batch)
        lines.append(f"| {r.arch} | {r.frames} | {r.device}, {r.precision} | {r.gmacs_per_clip:.1f} | "
                     f"{one.total_s * 1e3:.1f} ms ({one.backbone_s * 1e3:.1f} + {one.decoder_s * 1e3:.1f}) | "
                     f"{one.cpu_s * 1e3:.1f} ms | {top.batch} ({r.stop_reason}) | {top.clips_per_s:.2f} clips/s | "
                     f"{top.clips_per_s * r.gmacs_per_clip / 1e3:.3f} |")
    return "\n".join(lines)


def plot(results: list[ModelBench], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    for r in results:
        xs = [p.batch for p in r.points]
        label = f"{r.arch} {r.frames}f ({r.device}, {r.precision})"
        a.plot(xs, [p.total_s * 1e3 for p in r.points], "-o", label=label)
        b.plot(xs, [p.clips_per_s for p in r.points], "-o", label=label)
    for ax, name in ((a, "latency per batch (ms)"), (b, "throughput (clips/s)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch (clips)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3, which="both")
    a.set_title("EVL inference latency (backbone + decoder)")
    b.set_title("EVL inference throughput")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__)
    ap.add_argument("--arch", nargs="+", default=["ViT-B-16"], help="open_clip names or config JSONs (e.g. ViT-B-16 ViT-L-14)")
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--layers", type=int, default=4, help="decoder layers K (reads the last K blocks)")
    ap.add_argument("--classes", type=int, default=400)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                    help="auto: fp16 on CUDA, fp32 on the CPU")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3, help="timed forwards per batch size (the median is reported)")
    ap.add_argument("--max-batch", type=int, default=None, help="batch cap (default: 8 on the CPU, 4096 on CUDA)")
    ap.add_argument("--mem-cap-gib", type=float, default=8.0, help="CPU only: stop before the peak RSS would pass this")
    ap.add_argument("--bisect", type=int, default=3, help="CUDA: bisection rounds after the first out-of-memory")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "bench", help="latency.json and latency.png go here")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_latency: --device cuda but CUDA is not available; use --device cpu", file=sys.stderr)
        return 2
    if args.max_batch is None:
        args.max_batch = 4096 if device.type == "cuda" else 8
    if args.threads:
        torch.set_num_threads(args.threads)
    results = [bench_model(arch, args, device) for arch in args.arch]
    md = table(results)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs visible"
    print("\n" + md + f"\n\n{where}; median of {args.repeats} after {args.warmup} warm-up; load average "
          f"{os.getloadavg()[0]:.1f} at the end")
    args.out.mkdir(parents=True, exist_ok=True)
    doc = {"where": where, "warmup": args.warmup, "repeats": args.repeats, "models": [
        {"arch": r.arch, "frames": r.frames, "layers": r.layers, "device": r.device, "precision": r.precision,
         "gmacs_per_clip": r.gmacs_per_clip, "stop_reason": r.stop_reason,
         "points": [{"batch": p.batch, "total_s": p.total_s, "backbone_s": p.backbone_s, "decoder_s": p.decoder_s,
                     "clips_per_s": p.clips_per_s, "cpu_s": p.cpu_s, "peak_bytes": p.peak_bytes} for p in r.points]} for r in results]}
    (args.out / "latency.json").write_text(json.dumps(doc, indent=2) + "\n")
    plot(results, args.out / "latency.png")
    print(f"wrote {args.out / 'latency.json'} and {args.out / 'latency.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
