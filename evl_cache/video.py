"""Decoding with decord, frame sampling and view building: the only place pixels become tensors.

Extraction and online prediction both call `build_views`, so the cached path and `predict` see
identical inputs. Sampling follows the EVL reference implementation (docs/reference.md):
dense sampling with a stride (Kinetics) and segment sampling (SSv2).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from evl_cache.errors import UserError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class VideoError(Exception):
    """A single video cannot be used (unreadable, no video stream, too short): recorded, not fatal."""


@dataclass(frozen=True)
class Sampling:
    """Which frames make a clip: ``dense`` (T frames ``stride`` apart) or ``segment`` (one per T segments)."""

    mode: Literal["dense", "segment"] = "dense"
    frames: int = 8
    stride: int = 16

    def __post_init__(self) -> None:
        if self.mode not in ("dense", "segment"):
            raise UserError(f"unknown sampling mode '{self.mode}'; use dense or segment")
        if self.frames < 1 or self.stride < 1:
            raise UserError(f"sampling needs frames >= 1 and stride >= 1 (got {self.frames}, {self.stride})")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def span(self) -> int:
        """Frames covered by one dense clip."""
        return (self.frames - 1) * self.stride + 1


@dataclass(frozen=True)
class ViewSet:
    """The views cached (or predicted) per video.

    ``train``: ``count`` independently augmented views (random temporal start, RandomResizedCrop,
    clip-consistent RandAugment), each deterministic from (seed, video key, view index).
    ``eval``: the ``temporal`` x ``spatial`` grid of the reference evaluation, temporal-major.
    """

    kind: Literal["train", "eval"] = "eval"
    count: int = 1
    temporal: int = 3
    spatial: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("train", "eval"):
            raise UserError(f"unknown view kind '{self.kind}'; use train:V or eval")
        if self.kind == "train" and self.count < 1:
            raise UserError("--views train:V needs V >= 1")
        if self.kind == "eval" and (self.temporal < 1 or self.spatial not in (1, 3)):
            raise UserError("eval views need temporal >= 1 and spatial 1 or 3")

    @property
    def num_views(self) -> int:
        return self.count if self.kind == "train" else self.temporal * self.spatial

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def parse(cls, text: str, sampling: Sampling, seed: int = 0) -> "ViewSet":
        """Parse ``train:V``, ``eval`` (the recipe's grid for this sampling) or ``eval:TxS``."""
        kind, _, arg = text.partition(":")
        if kind == "train":
            try:
                return cls("train", count=int(arg or 1), temporal=1, spatial=1, seed=seed)
            except ValueError:
                raise UserError(f"bad --views '{text}'; use train:V with an integer V, e.g. train:2") from None
        if kind == "eval":
            if arg:
                try:
                    t, s = (int(v) for v in arg.lower().split("x"))
                except ValueError:
                    raise UserError(f"bad --views '{text}'; use eval or eval:TxS, e.g. eval:3x1") from None
                return cls("eval", count=t * s, temporal=t, spatial=s, seed=seed)
            t, s = default_eval_grid(sampling)
            return cls("eval", count=t * s, temporal=t, spatial=s, seed=seed)
        raise UserError(f"bad --views '{text}'; use train:V, eval or eval:TxS")


def default_eval_grid(sampling: Sampling) -> tuple[int, int]:
    """Reference evaluation: 8-frame dense models 3 temporal x 1 centre crop; others 1 x 3 spatial."""
    if sampling.mode == "dense" and sampling.frames <= 8:
        return 3, 1
    return 1, 3


def view_generator(seed: int, key: str, view: int) -> torch.Generator:
    """A torch generator that depends only on (seed, video key, view), so reruns are byte-identical."""
    digest = hashlib.sha256(f"{seed}|{key}|{view}".encode()).digest()
    gen = torch.Generator()
    gen.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return gen


# ---------------------------------------------------------------------------------------------
# frame indices


def train_indices(num_frames: int, sampling: Sampling, gen: torch.Generator) -> list[int]:
    """Random clip for training (reference behaviour).

    dense: a random start; a clip longer than the video starts at 0 and repeats its last in-range
    frame. segment: T equal segments over the video, a random frame in each.
    """
    if num_frames < 1:
        raise VideoError("video has no frames")
    t, s = sampling.frames, sampling.stride
    if sampling.mode == "segment":
        seg = (num_frames - 1) / t
        out = []
        for i in range(t):
            lo, hi = round(seg * i), round(seg * (i + 1))
            out.append(lo + int(torch.randint(hi - lo + 1, (1,), generator=gen)))
        return out
    if sampling.span >= num_frames:
        out = []
        for i in range(t):
            out.append(i * s if i * s < num_frames else out[-1])
        return out
    start = int(torch.randint(num_frames - sampling.span + 1, (1,), generator=gen))
    return [start + i * s for i in range(t)]


def eval_indices(num_frames: int, sampling: Sampling, temporal: int) -> list[list[int]]:
    """Evaluation clips: ``temporal`` evenly spaced dense clips (the video padded with its last frame
    to one clip's span), or the centre frame of each of T segments."""
    if num_frames < 1:
        raise VideoError("video has no frames")
    t, s = sampling.frames, sampling.stride
    if sampling.mode == "segment":
        seg = (num_frames - 1) / t
        one = [min(num_frames - 1, round(seg * (i + 0.5))) for i in range(t)]
        return [one for _ in range(temporal)]
    slide = max(num_frames - sampling.span, 0)
    clips = []
    for v in range(temporal):
        start = slide // 2 if temporal == 1 else round(slide / (temporal - 1) * v)
        clips.append([min(start + i * s, num_frames - 1) for i in range(t)])
    return clips


# ---------------------------------------------------------------------------------------------
# decoding


def open_video(path: str) -> Any:
    """Open a video with decord, turning every failure into a one-line `VideoError`."""
    import os

    import decord

    if not os.path.exists(path):
        raise VideoError("file not found")
    if os.path.getsize(path) == 0:
        raise VideoError("empty file (0 bytes)")
    try:
        reader = decord.VideoReader(path, num_threads=1)
    except Exception as err:  # noqa: BLE001 - decord raises DECORDError / RuntimeError variants
        raise VideoError(f"cannot open video: {_short(err)}") from None
    if len(reader) < 1:
        raise VideoError("video stream has no frames")
    return reader


def decode_frames(reader: Any, indices: list[int]) -> np.ndarray:
    """Decode the given frame indices as uint8 (N, H, W, 3); a decoding failure is a `VideoError`."""
    unique = sorted(set(indices))
    try:
        batch = reader.get_batch(unique).asnumpy()
    except Exception as err:  # noqa: BLE001 - truncated/corrupt streams fail here
        raise VideoError(f"cannot decode frames: {_short(err)}") from None
    pos = {idx: i for i, idx in enumerate(unique)}
    return batch[[pos[i] for i in indices]]


_DECORD_PREFIX = re.compile(r"^\[[0-9:]+\] \S+\.cc:\d+: (Check failed: )?")


def _short(err: Exception) -> str:
    """decord's messages carry a timestamp and source location; keep the part a user can act on."""
    text = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
    line = _DECORD_PREFIX.sub("", text[0]) if text else err.__class__.__name__
    if "cannot find video stream" in line:
        return "no decodable video stream (audio-only file, or a codec decord lacks, e.g. AV1)"
    return line[:200]


# ---------------------------------------------------------------------------------------------
# views


def normalise(frames: torch.Tensor) -> torch.Tensor:
    """uint8 or [0,1] float (..., 3, H, W) -> CLIP-normalised float32."""
    if frames.dtype == torch.uint8:
        frames = frames.float() / 255.0
    mean = torch.tensor(CLIP_MEAN, dtype=frames.dtype).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=frames.dtype).view(3, 1, 1)
    return (frames - mean) / std


def resize_short_side(frames: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of float (T, 3, H, W) so the short side equals ``size`` (reference eval).

    The long side is ``long * size // short``, floored in integers as the reference computes it
    (340x256 -> 297x224, not 298), so crops see the same pixels as the reference's.
    """
    h, w = frames.shape[-2:]
    if min(h, w) == size:
        return frames
    if h <= w:
        new_h, new_w = size, w * size // h
    else:
        new_h, new_w = h * size // w, size
    return F.interpolate(frames, size=(new_h, new_w), mode="bilinear", align_corners=False)


def spatial_crops(frames: torch.Tensor, size: int, count: int) -> list[torch.Tensor]:
    """1 centre crop, or 3 crops along the long side (start, centre, end), each size x size."""
    h, w = frames.shape[-2:]
    top_c, left_c = (h - size) // 2, (w - size) // 2
    if count == 1:
        return [frames[..., top_c:top_c + size, left_c:left_c + size]]
    if h >= w:
        offsets = [0, (h - size) // 2, h - size]
        return [frames[..., o:o + size, left_c:left_c + size] for o in offsets]
    offsets = [0, (w - size) // 2, w - size]
    return [frames[..., top_c:top_c + size, o:o + size] for o in offsets]


@dataclass
class PackedViews:
    """A video's views in the form that is cheapest to ship to a backbone worker, still exact.

    Either ``clips``: uint8 pixels that every view is cut from (eval: one (T, H, W, 3) clip per
    temporal position at source resolution; train: one RandAugmented RandomResizedCrop box per view),
    finished into float views by `finish_views` on the worker; or ``ready``: the float32 views
    themselves, chosen when they are smaller (sources far larger than the input size). Both give
    bit-identical views, because `finish_views` runs the same float operations in the same order as
    building the views in one place would.
    """

    kind: str
    size: int
    spatial: int = 1
    clips: list[np.ndarray] | None = None
    ready: np.ndarray | None = None

    @property
    def nbytes(self) -> int:
        if self.ready is not None:
            return int(self.ready.nbytes)
        return sum(int(c.nbytes) for c in self.clips or [])


def finish_views(packed: PackedViews) -> torch.Tensor:
    """Float32 (V, T, 3, size, size) CLIP-normalised views from `PackedViews` (runs on the worker)."""
    if packed.ready is not None:
        return torch.from_numpy(packed.ready)
    out: list[torch.Tensor] = []
    if packed.kind == "eval":
        for clip in packed.clips or []:  # decord's (T, H, W, 3), permuted exactly as a one-step build would
            frames = resize_short_side(normalise(torch.from_numpy(clip).permute(0, 3, 1, 2)), packed.size)
            out.extend(spatial_crops(frames, packed.size, packed.spatial))
    else:
        from evl_cache.augment import finish_train_view

        out = [finish_train_view(torch.from_numpy(clip), packed.size) for clip in packed.clips or []]
    return torch.stack(out).contiguous()


def _eval_clips(reader: Any, sampling: Sampling, views: ViewSet) -> list[np.ndarray]:
    """uint8 (T, H, W, 3) source frames of each temporal clip of the evaluation grid."""
    return [decode_frames(reader, clip) for clip in eval_indices(len(reader), sampling, views.temporal)]


def _train_crops(reader: Any, sampling: Sampling, views: ViewSet, key: str) -> list[np.ndarray]:
    """uint8 RandAugmented crop boxes (T, 3, h, w), one per view, deterministic per (seed, key, view)."""
    from evl_cache.augment import train_view_crop

    out = []
    for v in range(views.count):
        gen = view_generator(views.seed, key, v)
        clip = train_indices(len(reader), sampling, gen)
        frames = torch.from_numpy(decode_frames(reader, clip)).permute(0, 3, 1, 2).contiguous()
        out.append(np.ascontiguousarray(train_view_crop(frames, gen).numpy()))
    return out


def decode_views(path: str, sampling: Sampling, views: ViewSet, size: int, key: str | None = None,
                 min_frames: int = 1) -> tuple[PackedViews, dict[str, float]]:
    """Decode ``path`` into `PackedViews` (uint8 unless float32 views are smaller) plus decode metadata.

    ``key`` names the video for the train-view seed (defaults to the path). A video with fewer than
    ``min_frames`` frames is refused rather than padded into a clip of one repeated frame.
    Raises `VideoError`.
    """
    reader = open_video(path)
    if len(reader) < min_frames:
        raise VideoError(f"too short: {len(reader)} frame(s), needs at least {min_frames}")
    meta = {"num_frames": float(len(reader)), "fps": float(reader.get_avg_fps() or 0.0)}
    if views.kind == "eval":
        packed = PackedViews("eval", size, views.spatial, clips=_eval_clips(reader, sampling, views))
    else:
        packed = PackedViews("train", size, clips=_train_crops(reader, sampling, views, key or path))
    float_bytes = views.num_views * sampling.frames * 3 * size * size * 4
    if packed.nbytes > float_bytes:
        packed = PackedViews(packed.kind, size, packed.spatial, ready=finish_views(packed).numpy())
    return packed, meta


def build_views(path: str, sampling: Sampling, views: ViewSet, size: int, key: str | None = None,
                min_frames: int = 1) -> tuple[torch.Tensor, dict[str, float]]:
    """Decode ``path`` and build its views: float (V, T, 3, size, size) plus decode metadata.

    The same two steps extraction runs on two machines (`decode_views` in a decode worker,
    `finish_views` on the backbone worker), so the cached and online paths see identical inputs.
    Raises `VideoError`.
    """
    packed, meta = decode_views(path, sampling, views, size, key=key, min_frames=min_frames)
    return finish_views(packed), meta
