"""Running a released X-CLIP model online: its own test preprocessing, `predict` and `eval` on video files.

Preprocessing follows X-CLIP's test pipeline (microsoft/VideoX, X-CLIP ``datasets/build.py``),
not EVL's, because the release was trained and tested on it:

- frames: T equal segments of the video, the frame at int(i * n/T + n/(2T)) of each (n frames);
  a video shorter than T repeats frames, as X-CLIP's sampler does;
- one crop: the short side resized to int(256/224 * S) (256 for S = 224), a centre S x S crop;
  three crops: the short side resized to S, crops at the start, middle and end of the long side;
- pixels: resized as uint8 (rounded, as OpenCV's bilinear resize returns them), then
  (x - mean) / std with ImageNet's mean (123.675, 116.28, 103.53) and std (58.395, 57.12, 57.375),
  not CLIP's.

X-CLIP's multi-clip test (``TEST.NUM_CLIP`` > 1) draws each clip's frame offsets at random; here
clip v of V takes the frame at fraction (v + 1/2) / V of each segment, so runs are repeatable.
Video score = mean over views of softmax(logits), as in `evl-cache eval`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from evl_cache.errors import UserError

IMAGENET_MEAN = (123.675, 116.28, 103.53)  # X-CLIP's img_norm_cfg, in 0..255 pixel units
IMAGENET_STD = (58.395, 57.12, 57.375)
DEFAULT_TEMPLATES = "xclip"  # X-CLIP feeds the bare class name


@dataclass(frozen=True)
class ReleaseViews:
    """The test grid: ``temporal`` clips x ``spatial`` crops (1 or 3). X-CLIP's default is 1 x 1; its
    published multi-view numbers use 4 x 3."""

    temporal: int = 1
    spatial: int = 1

    @property
    def count(self) -> int:
        return self.temporal * self.spatial

    @classmethod
    def parse(cls, text: str | None) -> "ReleaseViews":
        """``eval`` (X-CLIP's default, 1 x 1) or ``eval:TxS``."""
        text = (text or "eval").strip()
        kind, _, arg = text.partition(":")
        if kind != "eval":
            raise UserError(f"bad --views '{text}'; a released X-CLIP model scores test views: eval or eval:TxS, e.g. eval:4x3")
        if not arg:
            return cls()
        try:
            t, s = (int(v) for v in arg.lower().split("x"))
        except ValueError:
            raise UserError(f"bad --views '{text}'; use eval or eval:TxS, e.g. eval:4x3") from None
        if t < 1 or s not in (1, 3):
            raise UserError(f"bad --views '{text}'; T must be >= 1 and S 1 or 3 (X-CLIP's one centre crop or three crops)")
        return cls(t, s)


def frame_indices(num_frames: int, frames: int, temporal: int = 1) -> list[list[int]]:
    """Frame indices of each test clip: one frame per T equal segments (see the module docstring)."""
    if num_frames < 1:
        from evl_cache.video import VideoError

        raise VideoError("video has no frames")
    avg = num_frames / frames
    return [[min(num_frames - 1, int(avg * i + avg * (v + 0.5) / temporal)) for i in range(frames)]
            for v in range(temporal)]


def resize_short_side(frames: torch.Tensor, short: int) -> torch.Tensor:
    """uint8-valued float (N, 3, H, W) -> short side ``short``, long side rounded; values rounded to integers."""
    h, w = frames.shape[-2:]
    scale = short / min(h, w)
    size = (int(h * scale + 0.5), int(w * scale + 0.5))
    if size == (h, w):
        return frames
    return F.interpolate(frames, size=size, mode="bilinear", align_corners=False).round_().clamp_(0, 255)


def crops(frames: torch.Tensor, size: int, count: int) -> list[torch.Tensor]:
    """One centre crop, or three along the long side (start, middle, end at twice the middle offset)."""
    h, w = frames.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    if count == 1:
        return [frames[..., top:top + size, left:left + size]]
    if w >= h:
        return [frames[..., :size, o:o + size] for o in (0, left, 2 * left)]
    return [frames[..., o:o + size, :size] for o in (0, top, 2 * top)]


def normalise(frames: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(3, 1, 1)
    return (frames - mean) / std


def release_views(path: str, frames: int, size: int, views: ReleaseViews) -> torch.Tensor:
    """Decode ``path`` into float32 views (V, T, 3, S, S), temporal-major. Raises `VideoError`."""
    from evl_cache.video import decode_frames, open_video

    reader = open_video(path)
    short = size if views.spatial == 3 else int(256 / 224 * size)
    out = []
    for clip in frame_indices(len(reader), frames, views.temporal):
        pixels = torch.from_numpy(decode_frames(reader, clip)).permute(0, 3, 1, 2).float()
        out.extend(normalise(c) for c in crops(resize_short_side(pixels, short), size, views.spatial))
    return torch.stack(out).contiguous()


class ReleasePredictor:
    """A released X-CLIP model, its class prompts encoded once, ready to score videos."""

    def __init__(self, release: str | os.PathLike, class_names: Sequence[str], templates: str | None = None,
                 views: ReleaseViews | None = None, device: str | None = None, precision: str | None = None,
                 trust_torchscript: bool = False, batch_size: int = 4) -> None:
        from evl_cache.backbone import _resolve_dtype, resolve_device
        from evl_cache.templates import resolve_templates, validate_class_names
        from evl_cache.xclip_release.layout import check_layout, infer_config, read_release
        from evl_cache.xclip_release.model import build_release_model, build_text_tower, class_text_embeddings, logit_scale
        from evl_cache.zeroshot import with_flag

        self.class_names = validate_class_names(list(class_names))
        self.template_set, self.templates = with_flag("--templates", resolve_templates, templates or DEFAULT_TEMPLATES)
        self.views = views or ReleaseViews()
        self.device = resolve_device(device)
        self.dtype = _resolve_dtype(precision or "auto", self.device)
        source = str(release)
        sd, digest = read_release(release, trust_torchscript)
        self.config = infer_config(sd, source)
        check_layout(sd, self.config, source)
        tower = build_text_tower(self.config, sd, {"source": source, "weights_id": digest})
        text = class_text_embeddings(tower, self.class_names, self.templates)
        del tower
        self.model = build_release_model(self.config, sd, self.class_names, text, logit_scale(sd))
        self.model.to(device=self.device, dtype=self.dtype)
        self.identity = {"file": source, "sha256": digest, "config": self.config.to_dict(),
                         "templates": self.template_set, "views": f"{self.views.temporal}x{self.views.spatial}",
                         "precision": str(self.dtype).removeprefix("torch.")}
        self.batch_size = max(1, int(batch_size))

    @torch.no_grad()
    def logits(self, views: torch.Tensor) -> torch.Tensor:
        """(V, T, 3, S, S) normalised views -> (V, K) float32 logits."""
        parts = [self.model(views[i:i + self.batch_size].to(self.device)).float()
                 for i in range(0, views.shape[0], self.batch_size)]
        return torch.cat(parts)

    def scores(self, path: str) -> torch.Tensor:
        """Mean over the views of softmax(logits), (K,). Raises `VideoError`."""
        views = release_views(path, self.config.frames, self.config.image_size, self.views)
        return self.logits(views).softmax(-1).mean(0).cpu()

    def __call__(self, path: str, topk: int = 5):
        from evl_cache.predict import Prediction
        from evl_cache.video import VideoError

        try:
            probs = self.scores(path).numpy()
        except VideoError as err:
            return Prediction(path=path, error=str(err))
        order = np.argsort(-probs, kind="stable")[:min(topk, len(probs))]
        return Prediction(path=path, top=[(self.class_names[c], float(probs[c])) for c in order], probs=probs)


def predict_release(release: str | os.PathLike, video_path_or_folder: str | os.PathLike, classes_file: str,
                    templates: str | None = None, views: str | None = None, device: str | None = None, topk: int = 5,
                    precision: str | None = None, trust_torchscript: bool = False) -> list[Any]:
    """Zero-shot top-k of a released X-CLIP model on a video or every video in a folder."""
    from evl_cache.predict import list_videos
    from evl_cache.templates import read_class_names
    from evl_cache.zeroshot import with_flag

    names = with_flag("--classes", read_class_names, classes_file)
    grid = ReleaseViews.parse(views)
    videos = list_videos(video_path_or_folder)
    predictor = ReleasePredictor(release, names, templates, grid, device, precision, trust_torchscript)
    return [predictor(v, topk) for v in videos]


def evaluate_release(release: str | os.PathLike, manifest: Any, out_dir: str | os.PathLike | None = None,
                     templates: str | None = None, views: str | None = None, device: str | None = None,
                     precision: str | None = None, trust_torchscript: bool = False, batch_size: int = 4,
                     class_prompts: str | os.PathLike | None = None) -> dict[str, Any]:
    """Evaluate a released X-CLIP model on a dataset manifest, decoding every video (no store).

    The manifest's class names are the prompts, or the lines of ``class_prompts`` (one per class,
    in label order: X-CLIP's own label files write HMDB's ``brush_hair`` as ``brush hair``).
    Videos that cannot be decoded are left out and listed under ``failed``. With ``out_dir``,
    writes eval's outputs (metrics.json, predictions.csv, scores.npz, confusion_matrix.png),
    metrics.json last.
    """
    from evl_cache.evaluate import compute_metrics, write_outputs
    from evl_cache.templates import read_class_names
    from evl_cache.video import VideoError
    from evl_cache.zeroshot import with_flag

    if not len(manifest):
        raise UserError(f"the {manifest.name} manifest ({manifest.split}) lists no videos; check --root and --annotations")
    if out_dir is not None and Path(out_dir).is_file():
        raise UserError(f"--out {out_dir} is a file; pass a folder for metrics.json and predictions.csv")
    prompts = list(manifest.class_names)
    if class_prompts is not None:
        prompts = with_flag("--class-prompts", read_class_names, class_prompts)
        if len(prompts) != len(manifest.class_names):
            raise UserError(f"--class-prompts {class_prompts} has {len(prompts)} names but the {manifest.name} manifest has "
                            f"{len(manifest.class_names)} classes; give one prompt per class, in label order")
    predictor = ReleasePredictor(release, prompts, templates, ReleaseViews.parse(views), device, precision,
                                 trust_torchscript, batch_size)
    start = time.perf_counter()
    rows, done, failed = [], [], []
    for i, path in enumerate(manifest.paths):
        try:
            rows.append(predictor.scores(path).numpy())
            done.append(i)
        except VideoError as err:
            failed.append({"video": i, "path": path, "error": str(err)})
    if not done:
        raise UserError(f"none of the {len(manifest)} videos could be decoded (first: {failed[0]['path']}: "
                        f"{failed[0]['error']}); check the dataset root")
    scores = np.stack(rows).astype(np.float64)
    videos = np.asarray(done, dtype=np.int64)
    labels = np.asarray(manifest.labels, dtype=np.int64)[videos]
    metrics = compute_metrics(scores, labels, list(manifest.class_names))
    identity = dict(predictor.identity, prompts=prompts if prompts != list(manifest.class_names) else "class names")
    metrics.update(checkpoint=str(release), views=predictor.views.count, xclip_release=identity,
                   dataset={"name": manifest.name, "split": manifest.split, "root": manifest.root,
                            "videos": len(manifest), "failed": len(failed)},
                   failed=failed, seconds=round(time.perf_counter() - start, 3))
    if out_dir is not None:
        write_outputs(Path(out_dir), metrics, scores, videos, labels, list(manifest.paths), list(manifest.class_names))
    return metrics
