"""Stage-1 throughput: decode + views alone, backbone alone, and the whole Ray pipeline, in one run.

    .venv/bin/python benchmarks/bench_extract.py                 # small ViT, CPU
    .venv/bin/python benchmarks/bench_extract.py --arch ViT-B-16 --videos 64   # on a GPU

All three are measured over the same videos with the same Ray resources, after Ray has started.
The pipeline rate is its steady state: from the first landed shard to the last (the one-off
start-up of worker processes and weights, seconds per run, is reported separately). Targets (issue 2): with a GPU the pipeline runs
at >= 85% of the slower half; on CPU only, where both halves share the cores, at >= 90% of the
serial bound 1/(1/decode + 1/backbone). Also reports stored bytes per clip-view against raw bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import evl_cache  # noqa: F401 - sets Ray's loopback-only environment before ray is imported
from evl_cache.backbone import BackboneSpec, build_backbone, default_device
from evl_cache.datasets import load_manifest
from evl_cache.extract import ExtractConfig, decode_video, extract
from evl_cache.ray_runtime import ray_session
from evl_cache.store import open_store
from evl_cache.video import Sampling, ViewSet, finish_views

SMALL_VIT = {
    "embed_dim": 192,
    "vision_cfg": {"image_size": 112, "layers": 6, "width": 192, "patch_size": 16, "head_width": 64},
    "text_cfg": {"context_length": 16, "vocab_size": 64, "width": 64, "heads": 1, "layers": 1},
}


def write_videos(folder: Path, count: int, frames: int, height: int, width: int) -> Path:
    """Moving-object mp4 clips at a Kinetics-like aspect, plus a `list` manifest."""
    import av

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = ["path,label"]
    for i in range(count):
        path = folder / f"v{i:04d}.mp4"
        container = av.open(str(path), "w")
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        base = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
        for t in range(frames):
            img = np.roll(base, shift=3 * t, axis=1)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
        container.close()
        rows.append(f"{path.name},{i % 4}")
    (folder / "list.csv").write_text("\n".join(rows) + "\n")
    return folder / "list.csv"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default=None, help="open_clip name or config JSON (default: a small 6-block ViT at 112 px)")
    parser.add_argument("--videos", type=int, default=48)
    parser.add_argument("--video-frames", type=int, default=64)
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--width", type=int, default=170)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--stride", type=int, default=8)
    parser.add_argument("--views", default="eval:3x1")
    parser.add_argument("--batch-size", type=int, default=12)
    parser.add_argument("--shard-size", type=int, default=4)
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count())
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--json", default=None, help="write the results here too")
    args = parser.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_extract_"))
    work.mkdir(parents=True, exist_ok=True)
    arch = args.arch
    if arch is None:
        arch = str(work / "small_vit.json")
        Path(arch).write_text(json.dumps(SMALL_VIT))
    csv_path = write_videos(work / "videos", args.videos, args.video_frames, args.height, args.width)
    manifest = load_manifest("list", str(work / "videos"), "train", annotations=str(csv_path))
    spec = BackboneSpec(arch, "random", seed=0)
    sampling = Sampling("dense", args.frames, args.stride)
    views = ViewSet.parse(args.views, sampling)
    device = default_device()
    size = build_backbone(spec, attention="maps", device="cpu").image_size
    clip_views = args.videos * views.num_views

    t0 = time.time()
    with ray_session(num_cpus=args.num_cpus) as ray:
        startup = time.time() - t0
        # 1. decode + view building alone, as the pipeline runs it (Ray CPU tasks, all cores)
        task = ray.remote(num_cpus=1)(decode_video)
        ray.get([task.remote(manifest.paths[0], "warm", sampling, views, size, args.frames)])
        t0 = time.time()
        decoded = ray.get([task.remote(p, p, sampling, views, size, args.frames) for p in manifest.paths])
        decode_s = time.time() - t0
        assert all(d[0] is not None for d in decoded), [d[1] for d in decoded if d[0] is None]

        # 2. backbone alone on ready tensors (all cores / the GPU), same batch size
        torch.set_num_threads(args.num_cpus)
        backbone = build_backbone(spec, attention="maps", device=device)
        batches = torch.cat([finish_views(d[0]) for d in decoded])  # views as the actors finish them
        backbone(batches[: args.batch_size])
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.time()
        for start in range(0, len(batches), args.batch_size):
            out = backbone(batches[start:start + args.batch_size])
            for v in out.values():
                v.cpu().numpy()
        if device.type == "cuda":
            torch.cuda.synchronize()
        backbone_s = time.time() - t0
        del backbone, batches, decoded
        torch.set_num_threads(1)

        # 3. the whole pipeline into a fresh store (Ray already up)
        cfg = ExtractConfig(backbone=spec, sampling=sampling, views=views, shard_size=args.shard_size,
                            batch_size=args.batch_size, num_cpus=args.num_cpus, progress=False)
        store_path = work / "store.zarr"
        t0 = time.time()
        summary = extract(manifest, str(store_path), cfg)
        pipeline_s = time.time() - t0

    store = open_store(str(store_path))
    tensor_bytes = sum(p.stat().st_size for name in store.tensor_names()
                       for p in (store_path / name).rglob("c*") if p.is_file())
    raw_fp16 = store.raw_bytes_per_view() * clip_views
    decode_rate, backbone_rate = clip_views / decode_s, clip_views / backbone_s
    pipe_rate = summary.steady_clip_views_per_s
    serial = 1.0 / (1.0 / decode_rate + 1.0 / backbone_rate)
    slower = min(decode_rate, backbone_rate)
    target = "pipeline / slower half (GPU target >= 0.85)" if device.type == "cuda" else "pipeline / serial bound (CPU target >= 0.90)"
    ratio = pipe_rate / slower if device.type == "cuda" else pipe_rate / serial
    result = {
        "device": str(device), "arch": arch if args.arch else "small ViT (6x192, 112px, patch 16)",
        "videos": args.videos, "clip_views": clip_views, "frames": args.frames, "num_cpus": args.num_cpus,
        "ray_startup_s": round(startup, 2),
        "decode_clips_per_s": round(decode_rate, 2), "backbone_clips_per_s": round(backbone_rate, 2),
        "pipeline_first_shard_s": round(summary.first_shard_s, 2),
        "pipeline_clips_per_s_incl_startup": round(clip_views / pipeline_s, 2),
        "pipeline_clips_per_s": round(pipe_rate, 2), "serial_bound_clips_per_s": round(serial, 2),
        "ratio": round(ratio, 3), "ratio_meaning": target,
        "stored_bytes_per_clip_view": tensor_bytes / clip_views, "raw_fp16_bytes_per_clip_view": raw_fp16 / clip_views,
        "stored_over_raw": round(tensor_bytes / raw_fp16, 4), "failed": summary.failed,
    }
    print("| measure | value |\n|---|---|")
    for k, v in result.items():
        print(f"| {k} | {v} |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    sys.exit(main())
