"""Training from the cache vs the online path, on this machine, in one run.

(a) a decoder training step fed by the store's DataLoader (zarr reads, collation, workers);
(b) the same step on the same batches already in memory (the cached path's own bound);
(c) the online path for the same batch: decode + augment the clips, frozen backbone forward,
    decoder forward/backward.
Also the DataLoader alone (clip-views/s, MB/s) against plain reads of the store's shard files.

Targets (issue 3): (a) <= 1.1 x (b); report (c)/(a) and the bound from the measured parts,
(decode + backbone + decoder step) / decoder step.
(d) with --formats: the same step fed from a store of each other storage format (evl_cache.plan's
names), e.g. "prefix fp16": read + decode + the tail blocks' forward on the device, then the step.

    .venv/bin/python benchmarks/bench_train.py                     # width-192 ViT, CPU, ~2-3 min
    .venv/bin/python benchmarks/bench_train.py --arch ViT-B-16 --device cuda --batch 32 --formats all
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from evl_cache.backbone import BackboneSpec, build_backbone  # noqa: E402
from evl_cache.config import decoder_config_for_store, load_config  # noqa: E402
from evl_cache.data import make_loader, measure_loader, measure_raw, to_device  # noqa: E402
from evl_cache.decoder import EVLDecoder, count_parameters  # noqa: E402
from evl_cache.extract import BackboneRunner, ExtractConfig, extract_serially, store_attributes, write_tail  # noqa: E402
from evl_cache.formats import feature_format, map_format  # noqa: E402
from evl_cache.plan import FORMATS  # noqa: E402
from evl_cache.store import create_store, open_store  # noqa: E402
from evl_cache.video import Sampling, ViewSet, build_views  # noqa: E402

# A width-192 ViT at 224 px (ViT-Ti-like: 12 blocks, 3 heads of 64): B/16's token grid at 1/4 the width.
VIT_W192 = {
    "embed_dim": 192,
    "vision_cfg": {"image_size": 224, "layers": 12, "width": 192, "patch_size": 16, "head_width": 64},
    "text_cfg": {"context_length": 16, "vocab_size": 64, "width": 64, "heads": 1, "layers": 1},
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def write_videos(folder: Path, n: int, frames: int, h: int, w: int) -> list[str]:
    import media

    out = []
    for i in range(n):
        out.append(str(media.write_video(folder / f"v{i:03d}.mp4", media.moving_square_frames(frames, h, w, seed=i))))
    return out


def build_store(path: Path, paths: list[str], spec: BackboneSpec, sampling: Sampling, views: ViewSet,
                blocks: list[int], device: str, dtype: str = "float16", attn: str = "float16", layout: str = "full") -> str:
    """Extract with extract.py's own work units, serially (Ray start-up is not what is measured here),
    in one storage format (a prefix-layout store also gets its tail weights, as `extract` writes them)."""
    from evl_cache.backbone import load_model_config
    from evl_cache.prefix import tail_blocks

    values, topk = attn.split(":")[-1], int(attn[3:].split(":")[0]) if attn.startswith("top") else 0
    cfg = ExtractConfig(backbone=spec, sampling=sampling, views=views, blocks=blocks, attention="maps",
                        dtype=dtype, attn_dtype=values, attn_topk=topk, layout=layout, shard_size=8)
    runner = BackboneRunner(spec.to_dict(), blocks, "maps", feature_format(dtype), device=device,
                            attn_format=map_format(values, topk), layout=layout)
    attrs = store_attributes(runner.backbone.describe(), runner.backbone.blocks, cfg, ["a", "b"], "bench", {})
    if layout == "prefix":
        attrs["model_config"] = {k: v for k, v in load_model_config(spec.arch).items() if k in ("embed_dim", "vision_cfg")}
        attrs["tail"] = {"file": "tail_weights.safetensors", "blocks": tail_blocks(blocks)}
    store = create_store(str(path), attrs, paths, [i % 2 for i in range(len(paths))], shard_size=8)
    if layout == "prefix":
        store = write_tail(store, runner.backbone)
    extract_serially(store, runner, paths, [Path(p).name for p in paths])
    return str(path)


class Stepper:
    """One AdamW training step of the decoder, as in train.py (fp16 autocast + scaler on CUDA)."""

    def __init__(self, model: EVLDecoder, device: torch.device) -> None:
        self.model = model.train()
        self.device = device
        self.opt = torch.optim.AdamW(model.parameters(), lr=4e-4, weight_decay=0.05)
        self.scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")

    def __call__(self, batch: dict[str, torch.Tensor], label: torch.Tensor) -> float:
        self.opt.zero_grad(set_to_none=True)
        ctx = torch.autocast("cuda", dtype=torch.float16) if self.device.type == "cuda" else torch.autocast("cpu", enabled=False)
        with ctx:
            logits = self.model(batch)
        loss = F.cross_entropy(logits.float(), label)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        return loss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default=None, help="open_clip name or config JSON (default: the width-192 ViT)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--videos", type=int, default=12)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=8, help="timed steps for (a) and (b)")
    ap.add_argument("--online-steps", type=int, default=4)
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--layers", type=int, default=4, help="decoder layers K (last K blocks)")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--formats", nargs="*", default=["prefix fp16"],
                    help="other storage formats to train from, as named by evl_cache.plan.FORMATS, or 'all' "
                         "(default: the prefix layout in fp16)")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    known = {name: (d, a, lay) for name, d, a, lay in FORMATS}
    formats = [n for n in known if n != "fp16"] if args.formats == ["all"] else [f for f in args.formats if f != "fp16"]
    for f in formats:
        if f not in known:
            ap.error(f"unknown format {f!r}; use one of {', '.join(known)} or all")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    work = Path(tempfile.mkdtemp(prefix="bench_train_"))
    arch = args.arch
    if arch is None:
        arch = str(work / "vit_w192.json")
        Path(arch).write_text(json.dumps(VIT_W192))
    spec = BackboneSpec(arch=arch, weights="random", seed=0)
    sampling = Sampling("dense", frames=args.frames, stride=16 if args.frames <= 16 else 8)
    views = ViewSet("train", count=1, temporal=1, spatial=1, seed=0)
    span = sampling.span + 8
    print(f"# bench_train: {arch if args.arch else 'width-192 ViT-12 @224'}, T={args.frames}, K={args.layers}, "
          f"batch {args.batch}, device {device}, torch threads {torch.get_num_threads()}", flush=True)

    t0 = time.perf_counter()
    paths = write_videos(work / "videos", args.videos, span, 240, 320)
    probe = build_backbone(spec, attention="maps", device="cpu")
    blocks = list(range(probe.num_layers - args.layers, probe.num_layers))
    del probe
    t1 = time.perf_counter()
    store_path = build_store(work / "train.zarr", paths, spec, sampling, views, blocks, str(device))
    extract_s = {"fp16": time.perf_counter() - t1}
    store = open_store(store_path)
    fmt_paths = {}
    for f in formats:
        t1 = time.perf_counter()
        fmt_paths[f] = build_store(work / f"{f.replace(' ', '_')}.zarr", paths, spec, sampling, views, blocks,
                                   str(device), *known[f])
        extract_s[f] = time.perf_counter() - t1
    print(f"setup: {args.videos} videos ({span} frames 320x240), store {store.raw_bytes_per_view() / 1e6:.2f} MB "
          f"per clip-view, built in {time.perf_counter() - t0:.1f} s", flush=True)

    torch.manual_seed(0)
    dcfg = decoder_config_for_store(load_config(None).model, store.attrs, store_path)

    def fresh_stepper() -> Stepper:
        torch.manual_seed(0)
        return Stepper(EVLDecoder(dcfg).to(device), device)

    # All paths run interleaved, round by round, so that load from other processes on a shared
    # machine hits them alike; every number is a median over rounds, as wall time and as this
    # process's CPU time (robust to time-sharing; DataLoader workers' CPU is not in it).
    # (b) runs on exactly the batches the loaders yield, materialised beforehand.
    it = iter(make_loader(store_path, args.batch, train=True, seed=0, num_workers=0))
    mem = [to_device(next(it), device) for _ in range(args.steps + 1)]
    del it
    iters, steppers = {}, {}
    for nw in args.workers:
        iters[nw] = iter(make_loader(store_path, args.batch, train=True, seed=0, num_workers=nw, prefetch_factor=2,
                                     pin_memory=device.type == "cuda"))
        steppers[nw] = fresh_stepper()
    for f in formats:
        iters[f] = iter(make_loader(fmt_paths[f], args.batch, train=True, seed=0, num_workers=args.workers[0],
                                    prefetch_factor=2, pin_memory=device.type == "cuda"))
        steppers[f] = fresh_stepper()
    steppers["mem"] = fresh_stepper()
    steppers["online"] = fresh_stepper()
    backbone = build_backbone(spec, blocks=blocks, attention="maps", device=device)
    size = store.attrs["backbone"]["image_size"]

    def split(b: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        return {k: v for k, v in b.items() if k not in ("label", "video")}, b["label"].long()

    keys = [f"w{nw}" for nw in args.workers] + ["mem", "online", "decode", "backbone", "decoder_step"]
    keys += [f"fmt:{f}" for f in formats] + [f"load:{f}" for f in formats]
    wall: dict[str, list[float]] = {k: [] for k in keys}
    cpu: dict[str, list[float]] = {k: [] for k in keys}

    def clock() -> tuple[float, float]:
        sync(device)
        return time.perf_counter(), time.process_time()

    def record(key: str, start: tuple[float, float], r: int) -> tuple[float, float]:
        now = clock()
        if r:  # round 0 is warm-up (worker start-up, allocator, lazy init)
            wall[key].append(now[0] - start[0])
            cpu[key].append(now[1] - start[1])
        return now

    rounds = args.steps + 1
    for r in range(rounds):
        for nw in args.workers:
            t = clock()
            steppers[nw](*split(to_device(next(iters[nw]), device)))
            record(f"w{nw}", t, r)
        for f in formats:  # (d): read + decode (+ the tail's forward for a prefix store) on the device, then the step
            t0 = t = clock()
            batch = to_device(next(iters[f]), device)
            t = record(f"load:{f}", t, r)
            steppers[f](*split(batch))
            record(f"fmt:{f}", t0, r)
        t = clock()
        steppers["mem"](*split(mem[r]))
        record("mem", t, r)
        if r <= args.online_steps:
            idx = [(r * args.batch + j) % len(paths) for j in range(args.batch)]
            t0 = t = clock()
            clips = torch.cat([build_views(paths[i], sampling, views, size, key=Path(paths[i]).name)[0] for i in idx])
            t = record("decode", t, r)
            feats = backbone(clips.to(device))
            t = record("backbone", t, r)
            steppers["online"](feats, torch.tensor([i % 2 for i in idx], device=device))
            record("decoder_step", t, r)
            record("online", t0, r)
        print(f"  round {r}/{rounds - 1} done", flush=True)
    del iters
    med = {k: (statistics.median(wall[k]), statistics.median(cpu[k])) for k in keys}

    # the loader alone (the store reader, checksums on) vs plain reads of the shard files
    thr = {}
    for nw in args.workers:
        thr[f"DataLoader, single-read chunks, {nw} worker(s)"] = measure_loader(store_path, args.batch, 6, num_workers=nw)
    raw = measure_raw(store_path)
    thr["plain file reads of the shard files"] = raw

    a_keys = [f"w{nw}" for nw in args.workers]
    a_best = min(a_keys, key=lambda k: med[k][0])
    res = {"batch": args.batch, "device": str(device), "threads": torch.get_num_threads(),
           "median_wall_s": {k: v[0] for k, v in med.items()}, "median_cpu_s": {k: v[1] for k, v in med.items()}}
    lines = [f"| path (batch {args.batch}, {device}) | wall s / step | CPU s / step | clip-views/s (wall) |", "|---|---|---|---|"]
    names = {"mem": "(b) cached, batches already in memory", "online": "(c) online: decode + backbone + decoder step",
             "decode": "  part: decode + augment", "backbone": "  part: frozen backbone forward",
             "decoder_step": "  part: decoder forward + backward + AdamW"}
    for nw in args.workers:
        names[f"w{nw}"] = f"(a) cached, DataLoader, {nw} worker(s)"
    for f in formats:
        names[f"fmt:{f}"] = f"(d) cached, {f} store, {args.workers[0]} worker(s)"
        names[f"load:{f}"] = f"  part: read + decode{' + tail blocks forward' if known[f][2] == 'prefix' else ''}"
    for k in a_keys + ["mem", "online", "decode", "backbone", "decoder_step"] + [x for f in formats for x in (f"fmt:{f}", f"load:{f}")]:
        w, c = med[k]
        rate = f"{args.batch / w:.2f}" if k in a_keys + ["mem", "online"] or k.startswith("fmt:") else ""
        lines.append(f"| {names[k]} | {w:.3f} | {c:.3f} | {rate} |")
    ratios = []
    for label, i in (("wall", 0), ("CPU", 1)):
        a = med[a_best][i] if i == 0 else med["w0"][i] if "w0" in med else med[a_best][i]
        parts = med["decode"][i] + med["backbone"][i] + med["decoder_step"][i]
        bound = parts / med["decoder_step"][i]
        speed = med["online"][i] / a
        ratios.append((label, a / med["mem"][i], speed, bound))
        res[f"{label.lower()}_ratios"] = {"a_over_b": a / med["mem"][i], "speedup": speed, "bound": bound}
    lines += ["", "| ratio | wall | CPU | target |", "|---|---|---|---|"]
    lines.append(f"| (a) / (b) | {ratios[0][1]:.3f} | {ratios[1][1]:.3f} | <= 1.10 |")
    lines.append(f"| speedup (c) / (a) | {ratios[0][2]:.2f}x | {ratios[1][2]:.2f}x | |")
    lines.append(f"| bound (decode + backbone + decoder step) / decoder step | {ratios[0][3]:.2f}x | {ratios[1][3]:.2f}x | |")
    lines.append(f"| share of the bound reached | {100 * ratios[0][2] / ratios[0][3]:.0f}% | "
                 f"{100 * ratios[1][2] / ratios[1][3]:.0f}% | >= 90% |")
    a0 = "w0" if "w0" in med else a_best
    for f in formats:
        lines.append(f"| (d) {f} / (a) fp16 | {med[f'fmt:{f}'][0] / med[a_best][0]:.3f} | "
                     f"{med[f'fmt:{f}'][1] / med[a0][1]:.3f} | |")
        lines.append(f"| online (c) / (d) {f} | {med['online'][0] / med[f'fmt:{f}'][0]:.2f}x | "
                     f"{med['online'][1] / med[f'fmt:{f}'][1]:.2f}x | |")
    res["formats"] = {f: {"bytes_per_clip_view": open_store(p).raw_bytes_per_view(), "extract_s": extract_s[f],
                          "clip_views": args.videos * views.num_views}
                      for f, p in {"fp16": store_path, **fmt_paths}.items()}
    lines += ["", f"(a) in the wall column is the best worker count ({names[a_best].split(', ')[-1]}); "
              "in the CPU column, 0 workers, so that reading is inside the measured CPU time.", "",
              "| reader | clip-views/s | MB/s |", "|---|---|---|"]
    for name, m in thr.items():
        lines.append(f"| {name} | {m.clip_views_per_s:.1f} | {m.mb_per_s:.0f} |")
    res["readers"] = {name: {"clip_views_per_s": m.clip_views_per_s, "mb_per_s": m.mb_per_s} for name, m in thr.items()}
    print("\n".join(lines))
    print(f"\ndecoder: {count_parameters(EVLDecoder(dcfg)) / 1e6:.2f} M trainable parameters; "
          f"{store.raw_bytes_per_view() / 1e6:.2f} MB per cached clip-view (fp16, no compression); "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible, load average "
          f"{os.getloadavg()[0]:.1f} at the end")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    import shutil

    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
