"""Clip-consistent training augmentation: the EVL reference recipe, reproducible from a torch.Generator.

The reference (docs/reference.md, "Augmentation") trains on: RandAugment with the timm/SlowFast
config "rand-m7-n4-mstd0.5-inc1" (4 ops, magnitude 7 +- 0.5, each op with p 0.5, the *increasing*
op set, bicubic resampling, fill grey 128) applied at source resolution with the same ops and
magnitudes for every frame of a clip; then normalise with the CLIP mean/std; then a
RandomResizedCrop (scale 0.08-1, log-uniform ratio 3/4-4/3, 10 tries, centre-crop fallback)
resized bilinearly (align_corners=False, no antialias) to the input size. No horizontal flip.

Here every random number comes from the caller's `torch.Generator` (seeded from (video, view,
seed)), so a cached training view can be rebuilt bit for bit, and every op runs once on the whole
(T, 3, H, W) stack, so all frames get identical parameters by construction.
Known deviation: torchvision cannot resample tensors bicubically in affine/rotate, so the four
geometric ops use bilinear (measured against PIL bicubic: mean |diff| under 1.5 grey levels).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as TF
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

FILL = [128.0, 128.0, 128.0]  # timm/SlowFast RandAugment fill colour for geometric ops
_LEVEL_MAX = 10.0  # magnitudes live on a 0..10 scale; args are (m / 10) * range


# ------------------------------------------------------------------------ generator-only randoms


def _uniform(gen: torch.Generator, lo: float = 0.0, hi: float = 1.0) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=gen, dtype=torch.float64))


def _randint(gen: torch.Generator, lo: int, hi: int) -> int:
    """Uniform integer in [lo, hi], both ends included (like random.randint)."""
    return int(torch.randint(lo, hi + 1, (), generator=gen))


def _normal(gen: torch.Generator, mean: float, std: float) -> float:
    return mean + std * float(torch.randn((), generator=gen, dtype=torch.float64))


# ------------------------------------------------------------------------------ resized crop


def sample_resized_crop(height: int, width: int, generator: torch.Generator,
                        scale: tuple[float, float] = (0.08, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """RandomResizedCrop box (top, left, h, w): area fraction ~ U(scale), aspect ~ log-U(ratio).

    Ten tries for a box that fits, then a centre crop with the aspect ratio clamped into `ratio`.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = _uniform(generator, *scale) * area
        aspect = math.exp(_uniform(generator, *log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return _randint(generator, 0, height - h), _randint(generator, 0, width - w), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


# ------------------------------------------------------------------------------- RandAugment ops
# Each op: (frames uint8 (T,3,H,W), arg) -> frames. Args come from `_level_to_arg`.

_BILINEAR = InterpolationMode.BILINEAR


def _affine(x: torch.Tensor, **kw) -> torch.Tensor:
    base = dict(angle=0.0, translate=[0.0, 0.0], scale=1.0, shear=[0.0, 0.0])
    return F.affine(x, **{**base, **kw}, interpolation=_BILINEAR, fill=FILL)


def _solarize_add(x: torch.Tensor, add: int, thresh: int = 128) -> torch.Tensor:
    return torch.where(x < thresh, (x.to(torch.int16) + add).clamp_(max=255).to(torch.uint8), x)


def _solarize(x: torch.Tensor, thresh: int) -> torch.Tensor:
    return x if thresh > 255 else F.solarize(x, thresh)  # threshold 256 inverts nothing


def _posterize(x: torch.Tensor, bits: int) -> torch.Tensor:
    return x if bits >= 8 else F.posterize(x, bits)


_OPS = {
    "AutoContrast": lambda x, _: F.autocontrast(x),
    "Equalize": lambda x, _: F.equalize(x),
    "Invert": lambda x, _: F.invert(x),
    # PIL rotate and torchvision rotate both turn counter-clockwise about the image centre.
    "Rotate": lambda x, deg: F.rotate(x, deg, interpolation=_BILINEAR, fill=FILL),
    "PosterizeIncreasing": _posterize,
    "SolarizeIncreasing": _solarize,
    "SolarizeAdd": _solarize_add,
    "ColorIncreasing": lambda x, f: F.adjust_saturation(x, f),
    "ContrastIncreasing": lambda x, f: F.adjust_contrast(x, f),
    "BrightnessIncreasing": lambda x, f: F.adjust_brightness(x, f),
    "SharpnessIncreasing": lambda x, f: F.adjust_sharpness(x, f),
    # PIL's AFFINE data (1, f, 0, 0, 1, 0) shears about the top-left corner: the same map as a
    # torchvision shear of atan(f) degrees centred at (0, 0).
    "ShearX": lambda x, f: _affine(x, shear=[math.degrees(math.atan(f)), 0.0], center=[0.0, 0.0]),
    "ShearY": lambda x, f: _affine(x, shear=[0.0, math.degrees(math.atan(f))], center=[0.0, 0.0]),
    # PIL samples input at x + pct*W, i.e. content moves by -pct*W.
    "TranslateXRel": lambda x, pct: _affine(x, translate=[-pct * x.shape[-1], 0.0]),
    "TranslateYRel": lambda x, pct: _affine(x, translate=[0.0, -pct * x.shape[-2]]),
}

OP_NAMES = tuple(_OPS)  # the 15 ops of timm's increasing RandAugment set, in timm's order
_SIGNED = {"Rotate": 30.0, "ShearX": 0.3, "ShearY": 0.3, "TranslateXRel": 0.45, "TranslateYRel": 0.45}
_ENHANCE = {"ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing"}


def _level_to_arg(name: str, m: float, gen: torch.Generator) -> float | int | None:
    """timm's level->argument maps for the increasing set (m on 0..10); draws a sign where signed."""
    level = m / _LEVEL_MAX
    if name in _SIGNED:
        v = level * _SIGNED[name]
        return -v if _uniform(gen) > 0.5 else v
    if name in _ENHANCE:
        v = level * 0.9
        return 1.0 + (-v if _uniform(gen) > 0.5 else v)  # 0.1..1.9, 1.0 = unchanged
    if name == "PosterizeIncreasing":
        return 4 - int(level * 4)  # bits kept: 4 (m=0) down to 0 (m=10)
    if name == "SolarizeIncreasing":
        return 256 - int(level * 256)  # threshold: 256 (nothing) down to 0 (everything)
    if name == "SolarizeAdd":
        return int(level * 110)
    return None


@dataclass(frozen=True)
class ClipRandAugment:
    """RandAugment "rand-m{magnitude}-n{num_ops}-mstd{magnitude_std}-inc1" with per-op probability `prob`.

    `sample(gen)` draws the op list once per clip; `apply(frames, ops)` runs it on the whole
    (T, 3, H, W) uint8 stack, so every frame gets the same ops, magnitudes and signs.
    """

    num_ops: int = 4
    magnitude: float = 7.0
    magnitude_std: float = 0.5
    prob: float = 0.5

    def sample(self, gen: torch.Generator) -> list[tuple[str, float | int | None]]:
        """The ops to apply, in order, with their arguments (skipped ops are left out)."""
        picks = torch.randint(0, len(OP_NAMES), (self.num_ops,), generator=gen).tolist()  # with replacement
        ops = []
        for i in picks:
            if self.prob < 1.0 and _uniform(gen) > self.prob:
                continue
            m = self.magnitude if self.magnitude_std <= 0 else _normal(gen, self.magnitude, self.magnitude_std)
            m = min(_LEVEL_MAX, max(0.0, m))
            ops.append((OP_NAMES[i], _level_to_arg(OP_NAMES[i], m, gen)))
        return ops

    @staticmethod
    def apply(frames: torch.Tensor, ops: list[tuple[str, float | int | None]]) -> torch.Tensor:
        if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[1] != 3:
            raise ValueError(f"expected uint8 frames (T, 3, H, W), got {tuple(frames.shape)} {frames.dtype}")
        for name, arg in ops:
            frames = _OPS[name](frames, arg)
        return frames

    def __call__(self, frames: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return self.apply(frames, self.sample(gen))


# --------------------------------------------------------------------------------- full view


def normalise(frames: torch.Tensor) -> torch.Tensor:
    """uint8 (T, 3, H, W) -> float32 in CLIP's normalised space."""
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=torch.float32).view(1, 3, 1, 1)
    return (frames.to(torch.float32) / 255.0 - mean) / std


def train_view_crop(frames: torch.Tensor, generator: torch.Generator,
                    randaugment: ClipRandAugment | None = ClipRandAugment(),
                    scale: tuple[float, float] = (0.08, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    """The uint8 part of a training view: RandAugment at source resolution, then the RandomResizedCrop box.

    Cropping commutes exactly with the per-pixel normalisation that follows, so the box can be cut
    from uint8 frames: decode workers ship these bytes (4x fewer than float32 of the same pixels,
    usually far fewer than the resized view) and `finish_train_view` does the float work.
    """
    if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[1] != 3:
        raise ValueError(f"expected uint8 frames (T, 3, H, W), got {tuple(frames.shape)} {frames.dtype}")
    if randaugment is not None:
        frames = randaugment(frames, generator)
    top, left, h, w = sample_resized_crop(frames.shape[-2], frames.shape[-1], generator, scale, ratio)
    return frames[:, :, top:top + h, left:left + w]


def finish_train_view(crop: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 crop (T, 3, h, w) -> float32 (T, 3, size, size): normalise, then bilinear resize."""
    return TF.interpolate(normalise(crop), size=(size, size), mode="bilinear", align_corners=False).contiguous()


def train_view(frames: torch.Tensor, generator: torch.Generator, size: int,
               randaugment: ClipRandAugment | None = ClipRandAugment(),
               scale: tuple[float, float] = (0.08, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    """One augmented training view: uint8 (T, 3, H, W) -> float32 (T, 3, size, size), normalised.

    Order as in the reference: RandAugment at source resolution, normalise, RandomResizedCrop.
    `randaugment=None` gives crop-only views (ablations).
    """
    return finish_train_view(train_view_crop(frames, generator, randaugment, scale, ratio), size)
