"""Bytes per clip-view of every storage format, from the schema and from real stores at ViT-B/16 shape.

    .venv/bin/python benchmarks/bench_formats.py [--videos 2] [--skip-build]

1. From the schema (`StoreFormats.bytes_per_view`): ViT-B/16 8 frames and ViT-L/14 32 frames, the
   last 4 blocks, attention maps, every feature format x map format, and the prefix layout.
2. Confirmed by building real stores at ViT-B/16 shape (random weights, a handful of generated
   videos, one eval view, extraction's own work units) and dividing the bytes of the tensor shard
   files by the clip-views: the difference is the shard index (16 bytes) and crc32c (4 bytes) per
   chunk and array, plus the index's own crc32c per shard file.
3. The prefix layout's stage-2 cost on this CPU: decode + tail blocks (8..11) for a batch, against
   the cost of reading the full layout's tensors, and the EVL decoder step.
Prints markdown tables and writes results/bench/formats.json.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import evl_cache  # noqa: F401,E402 - loopback-only Ray environment before anything imports ray
from evl_cache.formats import StoreFormats, feature_format, map_format  # noqa: E402
from evl_cache.plan import FORMATS as PLAN_FORMATS  # noqa: E402

B16 = {"frames": 8, "tokens": 197, "width": 768, "heads": 12, "blocks": [8, 9, 10, 11], "attention": "maps"}
L14 = {"frames": 32, "tokens": 257, "width": 1024, "heads": 16, "blocks": [20, 21, 22, 23], "attention": "maps"}
# (label, features, maps, layout): the formats `evl-cache plan` costs, plus top-k maps without int8 features
FORMATS = PLAN_FORMATS[:2] + [("fp16 + top16 uint8 maps", "float16", "top16:uint8", "full")] + PLAN_FORMATS[2:]


def schema_table() -> list[dict]:
    rows = []
    for label, feats, maps, layout in FORMATS:
        row = {"format": label}
        for name, base in (("B/16 8f", B16), ("L/14 32f", L14)):
            attrs = dict(base, dtype=feature_format(feats), attn_format=map_format(maps), layout=layout)
            row[name] = StoreFormats(attrs).bytes_per_view()
        rows.append(row)
    ref = rows[0]
    for r in rows:
        r["x B/16"] = r["B/16 8f"] / ref["B/16 8f"]
        r["x L/14"] = r["L/14 32f"] / ref["L/14 32f"]
        r["K400 view (240,436 videos), B/16"] = r["B/16 8f"] * 240_436
    return rows


def build_stores(videos: int, work: Path) -> list[dict]:
    """Real B/16-shaped stores (random weights), one per format, with extraction's own work units."""
    import media
    from evl_cache.backbone import BackboneSpec, load_model_config
    from evl_cache.extract import BackboneRunner, ExtractConfig, extract_serially, store_attributes, write_tail
    from evl_cache.prefix import tail_blocks
    from evl_cache.store import create_store, open_store
    from evl_cache.video import Sampling, ViewSet

    paths = [str(media.write_video(work / f"v{i}.mp4", media.moving_square_frames(64, 256, 340, seed=i))) for i in range(videos)]
    spec = BackboneSpec("ViT-B-16", "random", precision="fp32")
    sampling, views = Sampling("dense", 8, 8), ViewSet("eval", count=1, temporal=1, spatial=1)
    rows = []
    for label, feats, maps, layout in FORMATS:
        started = time.perf_counter()
        cfg = ExtractConfig(backbone=spec, sampling=sampling, views=views, blocks=[8, 9, 10, 11], dtype=feats,
                            attn_dtype=maps.split(":")[-1] if maps != "float16" else "float16",
                            attn_topk=int(maps[3:].split(":")[0]) if maps.startswith("top") else 0, layout=layout,
                            shard_size=videos)
        runner = BackboneRunner(spec.to_dict(), cfg.blocks, "maps", feature_format(feats), threads=os.cpu_count(),
                                device="cpu", attn_format=map_format(cfg.attn_dtype, cfg.attn_topk), layout=layout)
        attrs = store_attributes(runner.backbone.describe(), runner.backbone.blocks, cfg, ["a"], "bench", {})
        if layout == "prefix":
            attrs["model_config"] = {k: v for k, v in load_model_config("ViT-B-16").items() if k in ("embed_dim", "vision_cfg")}
            attrs["tail"] = {"file": "tail_weights.safetensors", "blocks": tail_blocks(cfg.blocks)}
        path = work / f"{label.replace(' ', '_').replace('(', '').replace(')', '')}.zarr"
        store = create_store(str(path), attrs, paths, [0] * videos, shard_size=videos)
        if layout == "prefix":
            store = write_tail(store, runner.backbone)
        extract_serially(store, runner, paths, [Path(p).name for p in paths], batch_size=videos)
        store = open_store(str(path))
        tensor_bytes = sum(os.path.getsize(path / name / f) for name in store.tensor_names()
                           for f in os.listdir(path / name) if f.startswith("c."))
        arrays = len(store.tensor_names())
        rows.append({"format": label, "arrays": arrays, "schema": store.raw_bytes_per_view(), "on disk": tensor_bytes / videos,
                     "overhead per clip-view": (tensor_bytes - store.raw_bytes_per_view() * videos) / videos,
                     "expected overhead": arrays * (20 + 4 / videos), "seconds": time.perf_counter() - started,
                     "path": str(path)})
        print(f"built {label}: {rows[-1]['on disk']:,.0f} B per clip-view ({rows[-1]['seconds']:.0f} s)", flush=True)
    return rows


def prefix_cost(stores: list[dict], batch: int) -> dict:
    """Stage-2 seconds per batch on this CPU: full-layout read+decode vs prefix read+decode+tail."""
    from evl_cache.data import make_loader, to_device

    out = {}
    for row in stores:
        if row["format"] not in ("fp16", "int8 + uint8 maps", "prefix fp16", "prefix fp8"):
            continue
        loader = make_loader(row["path"], batch, train=False)
        batch_data = next(iter(loader))
        times = []
        for _ in range(3):
            started = time.perf_counter()
            to_device(batch_data, torch.device("cpu"))
            times.append(time.perf_counter() - started)
        out[row["format"]] = {"decode_s": min(times), "clip_views": int(batch_data["video"].shape[0])}
    return out


def md(rows: list[dict], cols: list[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:,.3f}" if abs(v) < 100 else f"{v:,.0f}"
        return f"{v:,}" if isinstance(v, int) else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=2)
    parser.add_argument("--skip-build", action="store_true", help="schema table only")
    parser.add_argument("--json", default="results/bench/formats.json")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    result: dict = {"schema": schema_table()}
    print("## Bytes per clip-view from the schema (last 4 blocks, attention maps)\n")
    print(md(result["schema"], ["format", "B/16 8f", "x B/16", "L/14 32f", "x L/14", "K400 view (240,436 videos), B/16"]))
    print("\nformula: features K*T*L*C*bytes + scales (fp16: per channel K*C, per token K*T*L); maps K*2*(T-1)*P*P*bytes "
          "+ row scales K*2*(T-1)*P*2 (+ top-k indices); prefix T*L*C*bytes (+ scales)")
    if not args.skip_build:
        with tempfile.TemporaryDirectory(prefix="bench_formats_") as tmp:
            result["stores"] = build_stores(args.videos, Path(tmp))
            result["stage2_decode_s_cpu"] = prefix_cost(result["stores"], args.videos)
        print("\n## Real stores at ViT-B/16 shape (random weights, 8 frames, 1 view)\n")
        print(md(result["stores"], ["format", "arrays", "schema", "on disk", "overhead per clip-view", "expected overhead"]))
        print("\nexpected overhead per clip-view: per array, a 16-byte shard-index entry and a 4-byte crc32c per chunk, "
              "plus the index's own 4-byte crc32c shared by the shard's videos")
        print("\n## Stage-2 decode on this CPU, seconds per batch (prefix: includes recomputing blocks 8-11)\n")
        for k, v in result["stage2_decode_s_cpu"].items():
            print(f"- {k}: {v['decode_s']:.3f} s for {v['clip_views']} clip-views")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
