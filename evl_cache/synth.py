"""Procedural motion benchmark: real video files whose classes differ by motion or by appearance.

Why: no action-recognition data can be downloaded here, yet the tool must be exercised on a task
that needs what EVL adds (local temporal modelling over multi-layer frame features). Classes in the
spirit of Something-Something differ only in temporal order or change (moving left vs right, growing
vs shrinking, ...); beside them, appearance-only classes (which static shape) are solvable from one
frame. Everything is drawn with numpy and encoded with PyAV, deterministically from a seed.

The same renderer (`render`, `random_scene`) draws the single frames the tiny backbone is
pretrained on (pipelines/pretrain_tiny.py), so backbone and benchmark share one visual world.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tempfile
import time
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from evl_cache.errors import UserError

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
# Rotational symmetry order of each shape (0: fully symmetric, rotation invisible).
SYMMETRY: dict[str, int] = {"circle": 0, "square": 4, "triangle": 3, "cross": 4}

# Container extension -> (codec, pixel format, codec options). One thread, and x264's macroblock-tree
# rate control off: with mbtree on, libx264 gave different bytes for the same frames from run to run.
CODECS: dict[str, tuple[str, str, dict[str, str]]] = {
    ".mp4": ("libx264", "yuv420p", {"crf": "18", "preset": "medium", "threads": "1", "x264-params": "mbtree=0"}),
    ".avi": ("mpeg4", "yuv420p", {"qscale": "2", "threads": "1"}),
    ".webm": ("libvpx-vp9", "yuv420p", {"crf": "20", "b": "0", "deadline": "good", "cpu-used": "4",
                                        "threads": "1", "row-mt": "0"}),
}


@dataclass(frozen=True)
class Obj:
    """One filled shape: centre and radius in pixels, angle in radians (y axis points down, so a
    growing angle turns clockwise on screen), alpha 0 (invisible) .. 1 (opaque)."""

    shape: int
    colour: tuple[float, float, float]
    cx: float
    cy: float
    radius: float
    angle: float = 0.0
    alpha: float = 1.0


# --- drawing ---------------------------------------------------------------------------------


def shape_mask(obj: Obj, size: int) -> np.ndarray:
    """Boolean (size, size) mask of the pixels whose centres fall inside the object."""
    c = np.arange(size, dtype=np.float64) + 0.5
    dx = c[None, :] - obj.cx
    dy = c[:, None] - obj.cy
    cos, sin = np.cos(obj.angle), np.sin(obj.angle)
    u = cos * dx + sin * dy  # object-local coordinates (rotate the grid by -angle)
    v = -sin * dx + cos * dy
    r = obj.radius
    name = SHAPES[obj.shape]
    if name == "circle":
        return u * u + v * v <= r * r
    if name == "square":
        half = r * 0.8
        return (np.abs(u) <= half) & (np.abs(v) <= half)
    if name == "triangle":
        # equilateral, circumradius r, one vertex pointing along -v (up at angle 0)
        inside = np.ones((size, size), dtype=bool)
        for k in range(3):
            a = -np.pi / 2 + k * 2 * np.pi / 3 + np.pi  # outward normal of the edge facing away from vertex k
            inside &= u * np.cos(a) + v * np.sin(a) <= r * 0.5
        return inside
    if name == "cross":
        arm = r * 0.32
        return ((np.abs(u) <= r) & (np.abs(v) <= arm)) | ((np.abs(v) <= r) & (np.abs(u) <= arm))
    raise ValueError(f"unknown shape index {obj.shape}")


def render(size: int, background: Sequence[float], objs: Sequence[Obj]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Draw objects in order over a flat background; return the uint8 (size, size, 3) frame and
    each object's visible mask (later objects occlude earlier ones)."""
    img = np.empty((size, size, 3), dtype=np.float64)
    img[:] = np.asarray(background, dtype=np.float64)
    masks = [shape_mask(o, size) for o in objs]
    visible = [m.copy() for m in masks]
    for i, (o, m) in enumerate(zip(objs, masks)):
        if o.alpha <= 0:
            visible[i][:] = False
            continue
        img[m] = (1 - o.alpha) * img[m] + o.alpha * np.asarray(o.colour, dtype=np.float64)
        for j in range(i):
            visible[j] &= ~m
    frame = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return frame, visible


# --- random scene parameters -----------------------------------------------------------------


def random_background(rng: np.random.Generator) -> tuple[float, float, float]:
    return tuple(float(x) for x in rng.uniform(0, 255, 3))


def random_colour(rng: np.random.Generator, avoid: Sequence[Sequence[float]], min_dist: float = 110.0) -> tuple[float, float, float]:
    """A colour at least `min_dist` (RGB euclidean) from every colour in `avoid`, so objects stay visible."""
    best, best_d = None, -1.0
    for _ in range(64):
        c = rng.uniform(0, 255, 3)
        d = min(float(np.linalg.norm(c - np.asarray(a))) for a in avoid) if avoid else 1e9
        if d >= min_dist:
            return tuple(float(x) for x in c)
        if d > best_d:
            best, best_d = c, d
    return tuple(float(x) for x in best)


def random_scene(rng: np.random.Generator, size: int, max_objects: int = 2) -> tuple[tuple[float, float, float], list[Obj]]:
    """One still scene for image pretraining: 1..max_objects shapes with random shape, colour,
    size (covering the grow/shrink range of the video classes), position, angle, and sometimes
    partial opacity (as in mid-fade frames of appearing/disappearing)."""
    bg = random_background(rng)
    n = int(rng.integers(1, max_objects + 1))
    objs: list[Obj] = []
    for _ in range(n):
        r = float(rng.uniform(0.07, 0.24)) * size
        cx, cy = (float(x) for x in rng.uniform(r * 0.6, size - r * 0.6, 2))
        alpha = 1.0 if rng.random() > 0.1 else float(rng.uniform(0.4, 1.0))
        colour = random_colour(rng, [bg] + [o.colour for o in objs])
        objs.append(Obj(int(rng.integers(len(SHAPES))), colour, cx, cy, r, float(rng.uniform(0, 2 * np.pi)), alpha))
    return bg, objs


# --- classes ----------------------------------------------------------------------------------

# A class builds the per-frame object lists of one clip: (rng, frames, size) -> (background, frames).
Clip = tuple[tuple[float, float, float], list[list[Obj]]]


def _base(rng: np.random.Generator, size: int, shapes: Sequence[int] | None = None, rmin: float = 0.11,
          rmax: float = 0.17) -> tuple[tuple[float, float, float], Obj]:
    bg = random_background(rng)
    shape = int(rng.choice(shapes)) if shapes is not None else int(rng.integers(len(SHAPES)))
    r = float(rng.uniform(rmin, rmax)) * size
    obj = Obj(shape, random_colour(rng, [bg]), size / 2, size / 2, r, float(rng.uniform(0, 2 * np.pi)))
    return bg, obj


def _place(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi)) if hi > lo else (lo + hi) / 2


def _moving(dx: int, dy: int) -> Callable[[np.random.Generator, int, int], Clip]:
    def make(rng: np.random.Generator, frames: int, size: int) -> Clip:
        bg, o = _base(rng, size)
        speed = float(rng.uniform(1.0, 2.0)) * size / 64
        travel = speed * (frames - 1)
        margin = o.radius * 0.9
        # start so the whole path stays inside the frame along the motion axis
        along_lo, along_hi = margin, size - margin - travel
        start = _place(rng, along_lo, along_hi)
        across = _place(rng, margin, size - margin)
        if dx:
            x0 = start if dx > 0 else size - start
            path = [replace(o, cx=x0 + dx * speed * t, cy=across) for t in range(frames)]
        else:
            y0 = start if dy > 0 else size - start
            path = [replace(o, cx=across, cy=y0 + dy * speed * t) for t in range(frames)]
        return bg, [[p] for p in path]
    return make


def _rotating(direction: int) -> Callable[[np.random.Generator, int, int], Clip]:
    def make(rng: np.random.Generator, frames: int, size: int) -> Clip:
        bg, o = _base(rng, size, shapes=[SHAPES.index(s) for s in ("square", "triangle", "cross")], rmin=0.15, rmax=0.22)
        o = replace(o, cx=_place(rng, o.radius, size - o.radius), cy=_place(rng, o.radius, size - o.radius))
        step = np.deg2rad(float(rng.uniform(5.0, 10.0))) * direction
        return bg, [[replace(o, angle=o.angle + step * t)] for t in range(frames)]
    return make


def _scaling(grow: bool) -> Callable[[np.random.Generator, int, int], Clip]:
    def make(rng: np.random.Generator, frames: int, size: int) -> Clip:
        bg, o = _base(rng, size, rmin=0.08, rmax=0.1)
        factor = float(rng.uniform(1.8, 2.4))
        rbig = o.radius * factor
        o = replace(o, cx=_place(rng, rbig, size - rbig), cy=_place(rng, rbig, size - rbig))
        radii = np.linspace(o.radius, rbig, frames)
        if not grow:
            radii = radii[::-1]
        return bg, [[replace(o, radius=float(r))] for r in radii]
    return make


def _fading(appear: bool) -> Callable[[np.random.Generator, int, int], Clip]:
    def make(rng: np.random.Generator, frames: int, size: int) -> Clip:
        bg, o = _base(rng, size)
        o = replace(o, cx=_place(rng, o.radius, size - o.radius), cy=_place(rng, o.radius, size - o.radius))
        start = int(rng.integers(frames // 4, frames // 2 + 1))
        ramp = max(2, frames // 4)
        alpha = np.clip((np.arange(frames) - start + 1) / ramp, 0.0, 1.0)
        if not appear:
            alpha = 1.0 - alpha
        return bg, [[replace(o, alpha=float(a))] for a in alpha]
    return make


def _pair(approach: bool) -> Callable[[np.random.Generator, int, int], Clip]:
    def make(rng: np.random.Generator, frames: int, size: int) -> Clip:
        bg, a = _base(rng, size, rmin=0.08, rmax=0.11)
        _, b = _base(rng, size, rmin=0.08, rmax=0.11)
        b = replace(b, colour=random_colour(rng, [bg, a.colour]))
        theta = float(rng.uniform(0, np.pi))
        ux, uy = np.cos(theta), np.sin(theta)
        rmax = max(a.radius, b.radius)
        near = 2.2 * rmax  # centre distance when closest (never touching)
        # farthest distance that keeps both objects inside the frame along this direction
        reach = (size / 2 - rmax - 1) / max(abs(ux), abs(uy))
        far = max(near + 0.2 * size, 2 * reach * float(rng.uniform(0.85, 1.0)))
        slack = max(0.0, size / 2 - rmax - far / 2 * max(abs(ux), abs(uy)))
        cx = size / 2 + float(rng.uniform(-slack, slack)) * abs(uy)
        cy = size / 2 + float(rng.uniform(-slack, slack)) * abs(ux)
        dists = np.linspace(far, near, frames)
        if not approach:
            dists = dists[::-1]
        clip = [[replace(a, cx=cx - ux * d / 2, cy=cy - uy * d / 2), replace(b, cx=cx + ux * d / 2, cy=cy + uy * d / 2)]
                for d in dists]
        return bg, clip
    return make


def _static(shape: str) -> Callable[[np.random.Generator, int, int], Clip]:
    def make(rng: np.random.Generator, frames: int, size: int) -> Clip:
        bg, o = _base(rng, size, shapes=[SHAPES.index(shape)], rmin=0.1, rmax=0.2)
        o = replace(o, cx=_place(rng, o.radius, size - o.radius), cy=_place(rng, o.radius, size - o.radius))
        jitter = rng.uniform(-0.5, 0.5, (frames, 2))  # sub-pixel wobble: not a motion cue
        return bg, [[replace(o, cx=o.cx + float(j[0]), cy=o.cy + float(j[1]))] for j in jitter]
    return make


@dataclass(frozen=True)
class ClassSpec:
    name: str
    kind: str  # "motion" (needs temporal order or change) or "appearance" (one frame suffices)
    description: str
    make: Callable[[np.random.Generator, int, int], Clip]


CLASS_SPECS: dict[str, ClassSpec] = {s.name: s for s in [
    ClassSpec("moving_left", "motion", "one shape translates right-to-left", _moving(-1, 0)),
    ClassSpec("moving_right", "motion", "one shape translates left-to-right", _moving(1, 0)),
    ClassSpec("moving_up", "motion", "one shape translates bottom-to-top", _moving(0, -1)),
    ClassSpec("moving_down", "motion", "one shape translates top-to-bottom", _moving(0, 1)),
    ClassSpec("rotating_cw", "motion", "a square, triangle or cross turns clockwise in place", _rotating(1)),
    ClassSpec("rotating_ccw", "motion", "a square, triangle or cross turns counter-clockwise in place", _rotating(-1)),
    ClassSpec("growing", "motion", "one shape grows about 2x in place", _scaling(True)),
    ClassSpec("shrinking", "motion", "one shape shrinks about 2x in place", _scaling(False)),
    ClassSpec("approaching", "motion", "two shapes move towards each other", _pair(True)),
    ClassSpec("separating", "motion", "two shapes move away from each other", _pair(False)),
    ClassSpec("appearing", "motion", "one shape fades in part-way through", _fading(True)),
    ClassSpec("disappearing", "motion", "one shape fades out part-way through", _fading(False)),
    ClassSpec("static_circle", "appearance", "a still circle (sub-pixel jitter)", _static("circle")),
    ClassSpec("static_square", "appearance", "a still square (sub-pixel jitter)", _static("square")),
    ClassSpec("static_triangle", "appearance", "a still triangle (sub-pixel jitter)", _static("triangle")),
    ClassSpec("static_cross", "appearance", "a still cross (sub-pixel jitter)", _static("cross")),
]}

# What each class is called when a text tower is prompted (model.class_prompts, zero-shot): plain words,
# as a caption would say it. The tiny CLIP's captions (pipelines/pretrain_tiny_clip.py) describe still
# frames only, so only the appearance classes' names carry meaning for it.
PROMPT_NAMES: dict[str, str] = {
    "moving_left": "moving left", "moving_right": "moving right", "moving_up": "moving up", "moving_down": "moving down",
    "rotating_cw": "rotating clockwise", "rotating_ccw": "rotating counter-clockwise", "growing": "growing",
    "shrinking": "shrinking", "approaching": "approaching", "separating": "separating", "appearing": "appearing",
    "disappearing": "disappearing", "static_circle": "circle", "static_square": "square",
    "static_triangle": "triangle", "static_cross": "cross",
}

# 14 by default: the fade pair is left out because it is the slowest for small decoders to learn
# and keeps the default near the first trials' size; pick it with --classes.
DEFAULT_CLASSES: tuple[str, ...] = tuple(n for n in CLASS_SPECS if n not in ("appearing", "disappearing"))


def parse_classes(classes: str | Sequence[str] | None) -> list[str]:
    """Class names from a comma-separated string or a list; None or "default" -> DEFAULT_CLASSES, "all" -> every class."""
    if classes is None:
        return list(DEFAULT_CLASSES)
    names = [c.strip() for c in classes.split(",")] if isinstance(classes, str) else [str(c).strip() for c in classes]
    names = [n for n in names if n]
    if names == ["default"]:
        return list(DEFAULT_CLASSES)
    if names == ["all"]:
        return list(CLASS_SPECS)
    unknown = [n for n in names if n not in CLASS_SPECS]
    if unknown:
        raise UserError(f"unknown synthetic class(es) {', '.join(unknown)} in --classes; "
                        f"choose from: {', '.join(CLASS_SPECS)} (or 'default', 'all')")
    if len(set(names)) != len(names):
        raise UserError(f"--classes lists a class twice: {','.join(names)}; list each class once")
    if not names:
        raise UserError("--classes is empty; give a comma-separated list of class names")
    return names


# --- clips and files ---------------------------------------------------------------------------

SPLIT_CODES = {"train": 0, "val": 1}


def clip_rng(seed: int, split: str, class_name: str, index: int) -> np.random.Generator:
    """Per-video generator from (seed, split, class, index): a video does not change when other
    classes are added or removed, or when a split gets more videos."""
    return np.random.default_rng(np.random.SeedSequence([seed, SPLIT_CODES[split], zlib.crc32(class_name.encode()), index]))


def render_clip(class_name: str, rng: np.random.Generator, frames: int = 16, size: int = 64) -> tuple[np.ndarray, list[list[np.ndarray]]]:
    """(frames, size, size, 3) uint8 video of one class, and per frame the visible mask of each object."""
    bg, clip = CLASS_SPECS[class_name].make(rng, frames, size)
    out = np.empty((frames, size, size, 3), dtype=np.uint8)
    masks = []
    for t, objs in enumerate(clip):
        out[t], m = render(size, bg, objs)
        masks.append(m)
    return out, masks


def rgb_to_yuv420p(rgb: np.ndarray) -> np.ndarray:
    """BT.601 limited-range planar YUV 4:2:0 as one (H * 3 / 2, W) uint8 array.

    Done here rather than by libswscale so the encoder's input is fixed by this code alone."""
    x = rgb.astype(np.float64)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    y = 16 + 0.256788 * r + 0.504129 * g + 0.097906 * b
    u = 128 - 0.148223 * r - 0.290993 * g + 0.439216 * b
    v = 128 + 0.439216 * r - 0.367788 * g - 0.071427 * b
    h, w = y.shape

    def sub(c: np.ndarray) -> np.ndarray:
        return c.reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3)).reshape(h // 4, w)

    planes = [y, sub(u), sub(v)]
    return np.clip(np.rint(np.concatenate(planes, axis=0)), 0, 255).astype(np.uint8)


def encode_video(frames: np.ndarray, path: Path, fps: int, ext: str) -> None:
    """Encode uint8 RGB frames into a real container with PyAV, single-threaded for reproducible bytes."""
    import av

    codec, pix_fmt, options = CODECS[ext]
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps, options=dict(options))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = pix_fmt
        stream.codec_context.thread_count = 1
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb_to_yuv420p(f), format="yuv420p")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _check_args(out_dir: Path, train_per_class: int, val_per_class: int, size: int, frames: int, fps: int, ext: str,
                force: bool) -> None:
    if ext not in CODECS:
        raise UserError(f"unsupported --ext {ext!r}; choose one of {', '.join(CODECS)}")
    if train_per_class < 1 or val_per_class < 0:
        raise UserError(f"--train-per-class must be >= 1 and --val-per-class >= 0 (got {train_per_class}, {val_per_class})")
    if size < 16 or size % 2:
        raise UserError(f"--size {size} must be an even number >= 16 (yuv420p needs even sides)")
    if frames < 4:
        raise UserError(f"--frames {frames} must be >= 4: motion needs several frames")
    if fps < 1:
        raise UserError(f"--fps {fps} must be >= 1")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir} exists and is not a directory; choose another output path")
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise UserError(f"{out_dir} already exists and is not empty; pass --force to replace it or choose a new directory")


def write_synthetic_dataset(out_dir: str | os.PathLike, classes: str | Sequence[str] | None = None, train_per_class: int = 60,
                            val_per_class: int = 20, seed: int = 0, size: int = 64, frames: int = 16, fps: int = 8,
                            ext: str = ".mp4", force: bool = False, progress: bool = True) -> dict:
    """Write videos, `train.csv`/`val.csv` (list manifests: `path,label`, paths relative to out_dir),
    `classes.txt` and `classes.json` into out_dir; return a summary dict.

    Everything is written into a temporary sibling directory first and moved into place at the end,
    so an interrupted run leaves no half-written dataset. Same arguments -> byte-identical files.
    """
    out = Path(out_dir)
    ext = ext if ext.startswith(".") else "." + ext
    names = parse_classes(classes)
    _check_args(out, train_per_class, val_per_class, size, frames, fps, ext, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    t0 = time.perf_counter()
    counts = {"train": train_per_class, "val": val_per_class}
    jobs = [(split, name, i) for split in ("train", "val") for name in names for i in range(counts[split])]
    rows: dict[str, list[tuple[str, str]]] = {"train": [], "val": []}
    try:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        # the bar goes to stderr so stdout carries only the summary line
        with Progress(TextColumn("synth"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      console=Console(stderr=True), disable=not progress, transient=True) as bar:
            task = bar.add_task("videos", total=len(jobs))
            for split, name, i in jobs:
                rel = Path(split) / name / f"{i:05d}{ext}"
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                video, _ = render_clip(name, clip_rng(seed, split, name, i), frames, size)
                encode_video(video, tmp / rel, fps, ext)
                rows[split].append((rel.as_posix(), name))
                bar.advance(task)
        for split in ("train", "val"):
            buf = io.StringIO()
            writer = csv.writer(buf, lineterminator="\n")
            writer.writerow(["path", "label"])
            writer.writerows(rows[split])
            (tmp / f"{split}.csv").write_text(buf.getvalue())
        (tmp / "classes.txt").write_text("".join(n + "\n" for n in names))
        meta = [{"name": n, "kind": CLASS_SPECS[n].kind, "description": CLASS_SPECS[n].description} for n in names]
        (tmp / "classes.json").write_text(json.dumps(meta, indent=2) + "\n")
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "x")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    nbytes = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return {
        "out_dir": str(out), "classes": names,
        "kinds": {n: CLASS_SPECS[n].kind for n in names},
        "train_videos": len(rows["train"]), "val_videos": len(rows["val"]),
        "frames": frames, "size": size, "fps": fps, "ext": ext, "seed": seed,
        "bytes": nbytes, "seconds": round(time.perf_counter() - t0, 2),
    }
