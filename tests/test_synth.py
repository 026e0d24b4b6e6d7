"""Synthetic motion benchmark: deterministic real videos, correct manifests, classes that really move
(or really differ by shape), and the committed tiny pretrained backbone it is meant for."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from evl_cache import synth
from evl_cache.errors import UserError
from evl_cache.synth import CLASS_SPECS, DEFAULT_CLASSES, clip_rng, render_clip, write_synthetic_dataset

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "evl_cache" / "assets" / "tiny_vit"
SMALL = dict(classes="moving_left,static_square,approaching", train_per_class=2, val_per_class=1, size=32, frames=8,
             progress=False)


def _files(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path):
    a = _files(Path(write_synthetic_dataset(tmp_path / "a", seed=3, **SMALL)["out_dir"]))
    b = _files(Path(write_synthetic_dataset(tmp_path / "b", seed=3, **SMALL)["out_dir"]))
    c = _files(Path(write_synthetic_dataset(tmp_path / "c", seed=4, **SMALL)["out_dir"]))
    assert a == b
    assert a.keys() == c.keys()
    videos = [k for k in a if k.endswith(".mp4")]
    assert len(videos) == 9 and all(a[k] != c[k] for k in videos)


def test_manifests_and_class_files(tmp_path):
    s = write_synthetic_dataset(tmp_path / "d", seed=0, **SMALL)
    d = Path(s["out_dir"])
    names = ["moving_left", "static_square", "approaching"]
    assert (d / "classes.txt").read_text().splitlines() == names
    assert [(c["name"], c["kind"]) for c in json.loads((d / "classes.json").read_text())] == [
        ("moving_left", "motion"), ("static_square", "appearance"), ("approaching", "motion")]
    for split, per in (("train", 2), ("val", 1)):
        with open(d / f"{split}.csv", newline="") as f:
            rows = list(csv.reader(f))
        assert rows[0] == ["path", "label"]
        body = rows[1:]
        assert len(body) == 3 * per
        assert sorted(lbl for _, lbl in body) == sorted(names * per)
        for path, label in body:
            assert path.startswith(f"{split}/{label}/") and (d / path).is_file()
    assert s["train_videos"] == 6 and s["val_videos"] == 3 and s["bytes"] > 0
    assert not list(tmp_path.glob(".d.tmp-*"))


@pytest.mark.parametrize("ext", [".mp4", ".avi", ".webm"])
def test_every_file_decodes_with_decord_to_the_right_frames(tmp_path, ext):
    import decord

    d = Path(write_synthetic_dataset(tmp_path / "v", seed=1, ext=ext, **SMALL)["out_dir"])
    paths = sorted(d.rglob(f"*{ext}"))
    assert len(paths) == 9
    for p in paths:
        vr = decord.VideoReader(str(p))
        assert len(vr) == 8
        assert vr[0].shape == (32, 32, 3)
        assert abs(vr.get_avg_fps() - 8) < 1e-6
    # the decoded pixels are the rendered ones (up to codec loss)
    raw, _ = render_clip("moving_left", clip_rng(1, "train", "moving_left", 0), 8, 32)
    dec = decord.VideoReader(str(d / "train/moving_left/00000" f"{ext}")).get_batch(list(range(8))).asnumpy()
    assert np.abs(dec.astype(float) - raw).mean() < 6


def _foreground(frame: np.ndarray) -> np.ndarray:
    """Pixels that differ clearly from the most common colour (the background)."""
    packed = frame.reshape(-1, 3).astype(np.int64) @ np.array([65536, 256, 1])
    colours, counts = np.unique(packed, return_counts=True)
    c = int(colours[counts.argmax()])
    bg = np.array([c >> 16, (c >> 8) & 255, c & 255], dtype=float)
    return np.linalg.norm(frame.astype(float) - bg, axis=-1) > 40


def _centroid(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return np.array([xs.mean(), ys.mean()])


def test_translation_classes_move_the_stated_way_in_decoded_video(tmp_path):
    import decord

    d = Path(write_synthetic_dataset(tmp_path / "m", classes="moving_left,moving_right,moving_up,moving_down",
                                     train_per_class=3, val_per_class=0, seed=5, size=64, frames=16, progress=False)["out_dir"])
    want = {"moving_left": (-1, 0), "moving_right": (1, 0), "moving_up": (0, -1), "moving_down": (0, 1)}
    for name, (wx, wy) in want.items():
        for i in range(3):
            v = decord.VideoReader(str(d / f"train/{name}/{i:05d}.mp4")).get_batch(list(range(16))).asnumpy()
            shift = _centroid(_foreground(v[-1])) - _centroid(_foreground(v[0]))
            along = shift[0] * wx + shift[1] * wy
            across = abs(shift[0] * wy) + abs(shift[1] * wx)
            assert along > 10 and across < 2, (name, i, shift)


def _area(name: str, i: int) -> np.ndarray:
    v, _ = render_clip(name, clip_rng(0, "train", name, i))
    return np.array([_foreground(f).sum() for f in v])


def test_growing_shrinking_appearing_disappearing_change_the_stated_way():
    for i in range(4):
        g, s = _area("growing", i), _area("shrinking", i)
        assert g[-1] > 2.5 * g[0] and np.all(np.diff(g) >= -2)
        assert s[0] > 2.5 * s[-1] and np.all(np.diff(s) <= 2)
        a, d = _area("appearing", i), _area("disappearing", i)
        assert a[0] == 0 and a[-1] > 20
        assert d[-1] == 0 and d[0] > 20


def test_approaching_and_separating_change_the_gap():
    for i in range(4):
        for name, sign in (("approaching", -1), ("separating", 1)):
            _, masks = render_clip(name, clip_rng(0, "train", name, i))
            gap = [np.linalg.norm(_centroid(m[0]) - _centroid(m[1])) for m in masks]
            assert sign * (gap[-1] - gap[0]) > 8, (name, i, gap[0], gap[-1])
            assert np.all(sign * np.diff(gap) > -0.6)


def _best_rotation(a: np.ndarray, b: np.ndarray) -> float:
    """Angle (degrees, y axis down so positive = clockwise on screen) that best maps mask a onto b."""
    c = _centroid(a)
    ys, xs = np.nonzero(a)
    best, best_iou = 0.0, -1.0
    for deg in np.arange(-40, 41, 2.0):
        t = np.deg2rad(deg)
        x = c[0] + np.cos(t) * (xs - c[0]) - np.sin(t) * (ys - c[1])
        y = c[1] + np.sin(t) * (xs - c[0]) + np.cos(t) * (ys - c[1])
        xi, yi = np.clip(np.rint(x).astype(int), 0, a.shape[1] - 1), np.clip(np.rint(y).astype(int), 0, a.shape[0] - 1)
        moved = np.zeros_like(a)
        moved[yi, xi] = True
        iou = (moved & b).sum() / (moved | b).sum()
        if iou > best_iou:
            best, best_iou = deg, iou
    return best


def test_rotation_classes_turn_the_stated_way():
    for i in range(4):
        for name, sign in (("rotating_cw", 1), ("rotating_ccw", -1)):
            v, _ = render_clip(name, clip_rng(0, "train", name, i))
            m0, m3 = _foreground(v[0]), _foreground(v[3])  # 3 steps of 5-10 degrees
            assert sign * _best_rotation(m0, m3) >= 10, (name, i)


def _shape_signature(mask: np.ndarray) -> tuple[float, float]:
    """Rotation-invariant: area over the circumscribed disc, and how much of the ring between 0.45 and
    0.7 of that radius the shape covers (1 for a disc or a square, about 0.6-0.75 for a triangle or a cross)."""
    c = _centroid(mask)
    ys, xs = np.nonzero(mask)
    rmax = np.sqrt(((xs - c[0]) ** 2 + (ys - c[1]) ** 2).max()) + 0.5
    yy, xx = np.mgrid[: mask.shape[0], : mask.shape[1]]
    d = np.sqrt((xx - c[0]) ** 2 + (yy - c[1]) ** 2)
    ring = (d >= 0.45 * rmax) & (d <= 0.7 * rmax)
    return mask.sum() / (np.pi * rmax**2), mask[ring].mean()


def test_appearance_classes_differ_by_shape_and_stay_still():
    sig = {}
    for name in ("static_circle", "static_square", "static_triangle", "static_cross"):
        sig[name] = []
        for i in range(6):
            v, _ = render_clip(name, clip_rng(0, "train", name, i))
            masks = [_foreground(f) for f in v]
            assert np.abs(_centroid(masks[-1]) - _centroid(masks[0])).max() < 1.5
            sig[name].append(_shape_signature(masks[0]))
    fill = {k: np.array(v)[:, 0] for k, v in sig.items()}
    ring = {k: np.array(v)[:, 1] for k, v in sig.items()}
    assert fill["static_circle"].min() > 0.8 and ring["static_circle"].min() > 0.95
    assert fill["static_square"].max() < 0.75 and ring["static_square"].min() > 0.9
    assert fill["static_triangle"].max() < 0.52
    assert fill["static_cross"].min() > 0.52 and ring["static_cross"].max() < 0.82


def test_per_video_seed_ignores_other_classes(tmp_path):
    a = write_synthetic_dataset(tmp_path / "a", classes="moving_up", train_per_class=1, val_per_class=0, size=32, frames=8, progress=False)
    b = write_synthetic_dataset(tmp_path / "b", classes="static_cross,moving_up", train_per_class=1, val_per_class=0, size=32, frames=8, progress=False)
    f = "train/moving_up/00000.mp4"
    assert (Path(a["out_dir"]) / f).read_bytes() == (Path(b["out_dir"]) / f).read_bytes()


def test_class_set_defaults_and_kinds():
    assert len(DEFAULT_CLASSES) == 14 and len(CLASS_SPECS) == 16
    kinds = [CLASS_SPECS[n].kind for n in DEFAULT_CLASSES]
    assert kinds.count("appearance") == 4 and kinds.count("motion") == 10
    assert synth.parse_classes("all") == list(CLASS_SPECS)


def test_bad_input_raises_user_error_and_writes_nothing(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="unknown synthetic class"):
        write_synthetic_dataset(tmp_path / "x", classes="moving_sideways", progress=False)
    with pytest.raises(UserError, match="--ext"):
        write_synthetic_dataset(tmp_path / "x", ext=".mkv", progress=False)
    assert not (tmp_path / "x").exists()
    write_synthetic_dataset(tmp_path / "y", **SMALL)
    with pytest.raises(UserError, match="--force"):
        write_synthetic_dataset(tmp_path / "y", **SMALL)

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(synth, "encode_video", boom)
    with pytest.raises(RuntimeError):
        write_synthetic_dataset(tmp_path / "z", **SMALL)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["y"]  # no half-written dir, no temp dir left


def test_cli_synth_summary_and_bad_class_exit_code(tmp_path):
    cmd = [sys.executable, "-m", "evl_cache.cli", "synth", str(tmp_path / "c"), "--classes", "growing,static_circle",
           "--train-per-class", "1", "--val-per-class", "1", "--size", "32", "--frames", "8"]
    ok = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert ok.returncode == 0, ok.stderr
    assert "2 train + 2 val videos, 2 classes (1 motion, 1 appearance)" in ok.stdout
    bad = subprocess.run(cmd[:5] + ["--classes", "nope"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "unknown synthetic class" in bad.stderr


# --- the committed tiny pretrained backbone ------------------------------------------------------


def _pretrain_module():
    sys.path.insert(0, str(ROOT / "pipelines"))
    try:
        import pretrain_tiny
    finally:
        sys.path.pop(0)
    return pretrain_tiny


@pytest.mark.skipif(not (TINY / "weights.safetensors").exists(), reason="tiny_vit not generated yet")
def test_tiny_vit_artefact_loads_in_open_clip_format():
    from open_clip.model import _build_vision_tower
    from safetensors.torch import load_file

    cfg = json.loads((TINY / "config.json").read_text())
    visual = _build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"], quick_gelu=True, cast_dtype=None)
    sd = load_file(str(TINY / "weights.safetensors"))
    assert set(sd) == set(visual.state_dict())
    visual.load_state_dict(sd)
    assert (TINY / "weights.safetensors").stat().st_size < 4.5e6
    assert "conv1.weight" in sd and "transformer.resblocks.0.attn.in_proj_weight" in sd and "proj" in sd
    assert (TINY / "PRETRAIN.md").read_text().count("pretrain_tiny.py") >= 1


@pytest.mark.skipif(not (TINY / "weights.safetensors").exists(), reason="tiny_vit not generated yet")
def test_tiny_vit_cross_frame_attention_follows_objects_unlike_random_init():
    import torch

    pt = _pretrain_module()
    cfg, visual = pt.load(TINY)
    heads = cfg["vision_cfg"]["width"] // cfg["vision_cfg"]["head_width"]
    torch.manual_seed(0)
    rand = pt.build_visual(cfg).eval()
    s = pt.video_attention_stats(visual, heads, 64, 8, clips_per_class=1)
    r = pt.video_attention_stats(rand, heads, 64, 8, clips_per_class=1)
    last = -1
    assert s["obj_mass"][last] > 4 * s["uniform_obj_mass"][last]
    assert r["obj_mass"][last] < 2 * r["uniform_obj_mass"][last]
    assert s["max_w"][last] > 5 * s["uniform_max_w"]


def test_pretrain_manual_block_forward_matches_open_clip():
    pt = _pretrain_module()
    import torch

    torch.manual_seed(0)
    model = pt.Pretrainer(pt.model_config(32, 8, 64, 2, 32, 32))
    pt.check_manual_forward(model, 32)  # raises if the written-out block drifts from open_clip's
    b = pt.make_batch(np.random.default_rng(0), 4, 32, 8, 0.75)
    L = pt.losses(model(b["image"]), b, 0.5)
    assert torch.isfinite(L["total"]) and L["attn"] > 0
    # attention targets are distributions over the object's own patches
    rows = b["attn_rows"] > 0
    assert torch.allclose(b["attn"][rows].sum(-1), torch.ones(int(rows.sum())))


def test_rescale_residual_stream_scales_block_outputs_and_keeps_attention():
    import torch

    pt = _pretrain_module()
    torch.manual_seed(0)
    cfg = pt.model_config(32, 8, 64, 3, 32, 32)
    visual = pt.build_visual(cfg).eval()
    images = pt.make_batch(np.random.default_rng(1), 6, 32, 8, 0.75)["image"]
    maps0, outs0 = pt._maps_and_outputs(visual, images, heads=2)
    pooled0 = visual(images)
    record = pt.normalise_stream(visual, images, heads=2, target_rms=0.5)
    maps1, outs1 = pt._maps_and_outputs(visual, images, heads=2)
    f = record["factor"]
    assert abs(pt.last_block_rms(visual, images) - 0.5) < 1e-3 and record["rms_after"] == pytest.approx(0.5, abs=1e-3)
    for a, b in zip(outs0, outs1):
        assert torch.allclose(b, a * f, rtol=1e-3, atol=1e-4 * float(a.abs().max()) * f)
    for a, b in zip(maps0, maps1):
        assert torch.allclose(a, b, atol=1e-4)
    assert torch.allclose(visual(images), pooled0, atol=1e-4)
    assert record["max_attention_change"] < 1e-4


@pytest.mark.skipif(not (TINY / "weights.safetensors").exists(), reason="tiny_vit not generated yet")
def test_tiny_vit_block_outputs_have_unit_scale():
    """The committed tower's residual stream is normalised (PRETRAIN.md): RMS ~1 per element in the
    last block, so the decoder's zero-initialised temporal modules can matter within a short run."""
    pt = _pretrain_module()
    _, visual = pt.load(TINY)
    images = pt.make_batch(np.random.default_rng(7), 64, 64, 8, 0.75)["image"]
    assert 0.8 < pt.last_block_rms(visual, images) < 1.25
