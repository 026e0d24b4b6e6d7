"""`make explain-demo`: Figure 4 on the synthetic benchmark, and a number for "does the query look at
the object?".

For the first ``--per-class`` validation videos of every class, `evl_cache.explain.explain_video`
runs the demo's trained decoder online and keeps each decoder layer's query attention and the
backbone CLS token's. The synthetic frames have a flat background, so the object is known exactly:
a pixel belongs to it when its colour is more than ``OBJECT_DISTANCE`` (L1, 0-765) from the median
colour of the frame's border, and a patch does when at least ``PATCH_SHARE`` of its pixels do.

Per video, the *on-object share* of a map is the attention mass on object patches over the mass on
all patch tokens (CLS tokens left out), summed over frames; the *area share* is the object patches'
fraction of all patches, what a uniform map would get. A share well above the area share means the
map attends to the object. Writes results/explain/table.md and table.json, and the grid and GIF of
one motion and one appearance video (the README shows the first).

Needs `make demo`'s trained decoder (runs/demo/train/model.json) and its synthetic videos.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from common import (
    ROOT, class_kinds, main_guard, md_table, rel, say, set_threads, write_text_atomic,
)

from evl_cache.errors import UserError

OBJECT_DISTANCE = 40  # L1 colour distance from the flat background that counts as object (anti-aliased edges are below)
PATCH_SHARE = 0.25  # a patch is an object patch when at least this share of its pixels are object
SHOWN = ("moving_right", "static_circle")  # the examples copied beside the table (one motion, one appearance)


def object_patches(frames: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """(T, S, S, 3) uint8 frames -> (T, h, w) bool: patches at least ``PATCH_SHARE`` covered by the object."""
    f = frames.astype(np.int32)
    border = np.concatenate([f[:, 0], f[:, -1], f[:, :, 0], f[:, :, -1]], axis=1)  # (T, 4S, 3)
    background = np.median(border, axis=1)  # (T, 3)
    pixel = np.abs(f - background[:, None, None, :]).sum(-1) > OBJECT_DISTANCE  # (T, S, S)
    t, s, _ = pixel.shape
    h, w = grid
    cover = pixel.reshape(t, h, s // h, w, s // w).mean(axis=(2, 4))
    return cover >= PATCH_SHARE


def on_object_share(maps: np.ndarray, mask: np.ndarray, per_frame: bool) -> float:
    """Attention mass on object patches over mass on all patches; ``maps`` (T, 1 + h*w) with the CLS
    token first. ``per_frame``: each frame's map sums to 1 on its own (the backbone CLS), so frames
    are weighted equally; otherwise the map is one distribution over all frames (the decoder query)."""
    patches = maps[:, 1:].reshape(mask.shape)
    if per_frame:
        patches = patches / np.maximum(patches.sum(axis=(1, 2), keepdims=True), 1e-12)
    return float((patches * mask).sum() / max(patches.sum(), 1e-12))


def measure(exp: Any) -> dict[str, Any]:
    """The on-object shares of one `Explanation`: every decoder layer, their mean, the backbone CLS."""
    mask = object_patches(exp.frames, exp.grid)
    row: dict[str, Any] = {
        "area": float(mask.mean()),
        "layers": [on_object_share(m, mask, per_frame=False) for m in exp.decoder],
        "decoder_mean": on_object_share(exp.decoder_mean, mask, per_frame=False),
        "cls": on_object_share(exp.cls, mask, per_frame=True) if exp.cls is not None else None,
        "predicted": exp.class_names[int(np.argmax(exp.probs))],
    }
    return row


def videos_per_class(data_dir: Path, per_class: int) -> dict[str, list[Path]]:
    """The first ``per_class`` validation videos of every class, from the synthetic dataset's manifest
    (the same `list` manifest extraction reads)."""
    from evl_cache.datasets import load_manifest

    manifest = load_manifest("list", str(data_dir), "val")
    out: dict[str, list[Path]] = {}
    for path, label in zip(manifest.paths, manifest.labels):
        videos = out.setdefault(manifest.class_names[label], [])
        if len(videos) < per_class:
            videos.append(Path(path))
    return out


def report(rows: dict[str, list[dict[str, Any]]], kinds: dict[str, str], meta: dict[str, Any]) -> str:
    """The markdown table: per class, mean shares over its videos, with the area share as the baseline."""
    def mean(values: list[float]) -> float:
        return float(np.mean(values)) if values else float("nan")

    layers = len(next(iter(rows.values()))[0]["layers"])
    header = ["class", "kind", "videos", "correct", "object area", "decoder mean", *[f"layer {i + 1}" for i in range(layers)],
              "backbone CLS", "decoder mean / area"]
    table = []
    for name, rs in rows.items():
        area, dm = mean([r["area"] for r in rs]), mean([r["decoder_mean"] for r in rs])
        table.append([name, kinds.get(name, "?"), len(rs), sum(r["predicted"] == name for r in rs),
                      f"{100 * area:.1f}%", f"{100 * dm:.1f}%",
                      *[f"{100 * mean([r['layers'][i] for r in rs]):.1f}%" for i in range(layers)],
                      f"{100 * mean([r['cls'] for r in rs if r['cls'] is not None]):.1f}%", f"{dm / area:.1f}x"])
    return "\n".join([
        "# Where the decoder's query looks (synthetic benchmark, EVL Figure 4)",
        "",
        f"`make explain-demo` ({meta['command']}): the trained decoder of `make demo` ({rel(meta['checkpoint'])}), "
        f"online on the first {meta['per_class']} validation videos of each class. Share of each map's patch "
        "attention on object patches (object pixels: L1 colour distance > "
        f"{OBJECT_DISTANCE} from the flat background; object patch: >= {int(100 * PATCH_SHARE)}% object pixels). "
        "`object area` is the object patches' share of all patches: what a uniform map would put on them.",
        "",
        md_table(header, table),
        "",
        f"Wall time {meta['seconds']:.0f} s. Grids: {', '.join(meta['shown'])}.",
        "",
    ])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--demo-work", default=str(ROOT / "runs" / "demo"), help="`make demo`'s work folder")
    ap.add_argument("--out", default=str(ROOT / "results" / "explain"))
    ap.add_argument("--per-class", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    set_threads(args.threads)
    from evl_cache.explain import explain_video, write_explanation

    work = Path(args.demo_work)
    checkpoint = work / "train" / "model.json"
    data_dir = work / "synth"
    if not checkpoint.is_file() or not (data_dir / "val.csv").is_file():
        raise UserError(f"{rel(checkpoint)} or {rel(data_dir / 'val.csv')} is missing; run `make demo` first")
    if args.per_class < 1:
        raise UserError(f"--per-class {args.per_class} must be >= 1")
    kinds = class_kinds(data_dir)
    out = Path(args.out)
    started = time.perf_counter()
    rows: dict[str, list[dict[str, Any]]] = {}
    shown: list[str] = []
    staging = out.parent / f".{out.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name, paths in videos_per_class(data_dir, args.per_class).items():
        for k, path in enumerate(paths):
            exp = explain_video(checkpoint, path)
            row = measure(exp)
            rows.setdefault(name, []).append(row | {"video": rel(path)})
            say(f"{name} {path.name}: predicted {row['predicted']}, object area {100 * row['area']:.1f}%, "
                f"decoder mean {100 * row['decoder_mean']:.1f}%, backbone CLS {100 * row['cls']:.1f}%")
            if k == 0 and name in SHOWN:
                write_explanation(exp, staging / name)
                shown.append(f"{name}/explain.png")
    meta = {"checkpoint": str(checkpoint), "per_class": args.per_class, "seconds": time.perf_counter() - started,
            "shown": shown, "command": f"python pipelines/explain_synthetic.py --per-class {args.per_class}"}
    write_text_atomic(staging / "table.md", report(rows, kinds, meta))
    write_text_atomic(staging / "table.json", json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    staging.replace(out)
    say(f"wrote {rel(out / 'table.md')}")
    print((out / "table.md").read_text())
    return 0


if __name__ == "__main__":
    main_guard(main)
