"""Clip-consistent augmentation: determinism, frame consistency, crop statistics, PIL-equivalent ops."""

import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps

from evl_cache.augment import (CLIP_MEAN, CLIP_STD, OP_NAMES, ClipRandAugment, sample_resized_crop,
                               train_view)


def _gen(seed):
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def _clip(t=4, h=60, w=80, seed=0):
    """A textured clip with a moving square: uint8 (T, 3, H, W), frames differ."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * 4) % 256, (yy * 5) % 256, ((xx + yy) * 3) % 256], -1).astype(np.uint8)
    frames = np.repeat(base[None], t, 0)
    for i in range(t):
        frames[i, 10 + i:30 + i, 20 + 2 * i:40 + 2 * i] = rng.integers(0, 256, 3)
    return torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous()


# -------------------------------------------------------------------------------- crop params


def test_crop_params_within_bounds_and_limits():
    g = _gen(0)
    H, W = 300, 300  # square, so rejected (too tall / too wide) boxes do not bias the ratio
    fracs, logr = [], []
    for _ in range(3000):
        top, left, h, w = sample_resized_crop(H, W, g)
        assert 0 <= top and top + h <= H and 0 <= left and left + w <= W and h > 0 and w > 0
        fracs.append(h * w / (H * W))
        logr.append(math.log(w / h))
    fracs, logr = np.array(fracs), np.array(logr)
    # integer rounding of h and w moves ratio/area slightly past the real-valued limits
    assert fracs.min() > 0.07 and fracs.max() <= 1.0
    assert logr.min() > math.log(3 / 4) - 0.05 and logr.max() < math.log(4 / 3) + 0.05
    # log-uniform ratio: symmetric around 0 and spread over the whole range
    assert abs(logr.mean()) < 0.02 and logr.std() > 0.12
    # area ~ U(0.08, 1) (big boxes that do not fit are redrawn, lowering the mean a little)
    assert 0.45 < fracs.mean() < 0.56
    assert (fracs < 0.2).mean() > 0.08 and (fracs > 0.8).mean() > 0.1


def test_crop_fallback_is_centre_with_clamped_ratio():
    # A 10x1000 strip: no box with ratio <= 4/3 and area >= 8% fits, so every try fails.
    top, left, h, w = sample_resized_crop(10, 1000, _gen(1))
    assert (top, h, w) == (0, 10, 13) and left == (1000 - 13) // 2
    top, left, h, w = sample_resized_crop(1000, 10, _gen(1))
    assert (left, w, h) == (0, 10, 13) and top == (1000 - 13) // 2


def test_crop_params_deterministic_from_generator():
    a = [sample_resized_crop(240, 320, _gen(5)) for _ in range(3)]
    assert a[0] == a[1] == a[2]
    assert len({sample_resized_crop(240, 320, _gen(s)) for s in range(20)}) > 15


# ---------------------------------------------------------------------------------- RandAugment


def test_randaugment_sampling_statistics():
    ra = ClipRandAugment()
    g = _gen(0)
    samples = [ra.sample(g) for _ in range(3000)]
    counts = np.array([len(s) for s in samples])
    assert abs(counts.mean() - 2.0) < 0.1 and counts.max() <= 4  # 4 ops, each kept with p 0.5
    ops = [op for s in samples for op in s]
    names = {n for n, _ in ops}
    assert names == set(OP_NAMES) and len(OP_NAMES) == 15
    rot = np.array([a for n, a in ops if n == "Rotate"])
    m = np.abs(rot) / 3.0  # 30 degrees at m = 10
    assert abs(m.mean() - 7.0) < 0.1 and abs(m.std() - 0.5) < 0.1  # magnitude ~ N(7, 0.5)
    assert 0.4 < (rot > 0).mean() < 0.6  # random sign
    tx = np.array([a for n, a in ops if n == "TranslateXRel"])
    assert np.all(np.abs(tx) <= 0.45) and abs(np.abs(tx).mean() - 0.315) < 0.01
    enh = np.array([a for n, a in ops if n == "ColorIncreasing"])
    assert np.all((enh >= 0.1) & (enh <= 1.9)) and abs(np.abs(enh - 1).mean() - 0.63) < 0.02
    assert {a for n, a in ops if n == "PosterizeIncreasing"} <= {1, 2}  # 4 - int(0.4 m), m ~ 7
    sol = np.array([a for n, a in ops if n == "SolarizeIncreasing"])
    assert abs(sol.mean() - (256 - 0.7 * 256)) < 2
    add = np.array([a for n, a in ops if n == "SolarizeAdd"])
    assert abs(add.mean() - 76.5) < 2  # int(0.1 m * 110)
    assert all(a is None for n, a in ops if n in ("AutoContrast", "Equalize", "Invert"))


def _pil_frames(frames, fn):
    out = [np.asarray(fn(Image.fromarray(f.permute(1, 2, 0).numpy()))) for f in frames]
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2)


def _solarize_add_pil(img, add):
    lut = [min(255, i + add) if i < 128 else i for i in range(256)] * 3
    return img.point(lut)


FILL = (128, 128, 128)
BIC = Image.BICUBIC
PIL_REFERENCE = [  # (op, arg, PIL equivalent as the reference applies it, mean tol, max tol)
    ("AutoContrast", None, ImageOps.autocontrast, 0.1, 1),
    ("Equalize", None, ImageOps.equalize, 0.0, 0),
    ("Invert", None, ImageOps.invert, 0.0, 0),
    ("PosterizeIncreasing", 2, lambda i: ImageOps.posterize(i, 2), 0.0, 0),
    ("SolarizeIncreasing", 77, lambda i: ImageOps.solarize(i, 77), 0.0, 0),
    ("SolarizeIncreasing", 256, lambda i: ImageOps.solarize(i, 256), 0.0, 0),
    ("SolarizeAdd", 76, lambda i: _solarize_add_pil(i, 76), 0.0, 0),
    ("ColorIncreasing", 0.37, lambda i: ImageEnhance.Color(i).enhance(0.37), 0.5, 1),
    ("ContrastIncreasing", 1.63, lambda i: ImageEnhance.Contrast(i).enhance(1.63), 0.5, 1),
    ("BrightnessIncreasing", 0.37, lambda i: ImageEnhance.Brightness(i).enhance(0.37), 0.0, 0),
    ("SharpnessIncreasing", 1.63, lambda i: ImageEnhance.Sharpness(i).enhance(1.63), 0.0, 0),
    # geometric: reference resamples bicubically, torchvision tensors only bilinearly
    ("Rotate", -21.0, lambda i: i.rotate(-21.0, resample=BIC, fillcolor=FILL), 2.0, 255),
    ("ShearX", 0.21, lambda i: i.transform(i.size, Image.AFFINE, (1, 0.21, 0, 0, 1, 0), resample=BIC, fillcolor=FILL), 1.5, 255),
    ("ShearY", -0.21, lambda i: i.transform(i.size, Image.AFFINE, (1, 0, 0, -0.21, 1, 0), resample=BIC, fillcolor=FILL), 1.5, 255),
    ("TranslateXRel", 0.315, lambda i: i.transform(i.size, Image.AFFINE, (1, 0, 0.315 * i.size[0], 0, 1, 0), resample=BIC, fillcolor=FILL), 1.5, 255),
    ("TranslateYRel", -0.315, lambda i: i.transform(i.size, Image.AFFINE, (1, 0, 0, 0, 1, -0.315 * i.size[1]), resample=BIC, fillcolor=FILL), 1.5, 255),
]


@pytest.mark.parametrize("name,arg,pil_fn,mean_tol,max_tol", PIL_REFERENCE, ids=[f"{r[0]}{r[1]}" for r in PIL_REFERENCE])
def test_ops_match_pil_reference_semantics(name, arg, pil_fn, mean_tol, max_tol):
    frames = _clip()
    ours = ClipRandAugment.apply(frames, [(name, arg)])
    ref = _pil_frames(frames, pil_fn)
    assert ours.dtype == torch.uint8 and ours.shape == frames.shape
    diff = (ours.float() - ref.float()).abs()
    assert diff.mean() <= mean_tol + 1e-6 and diff.max() <= max_tol, (diff.mean().item(), diff.max().item())
    if name not in ("SolarizeIncreasing",) or arg != 256:
        assert not torch.equal(ours, frames)  # the op really changed something


def test_ops_are_per_frame_identical():
    # Running the op list on the stack equals running it on each frame alone: same parameters for
    # every frame, and per-image statistics (autocontrast, equalize, contrast) stay per frame.
    frames = _clip(t=5)
    ops = [(n, a) for n, a, *_ in PIL_REFERENCE]
    stacked = ClipRandAugment.apply(frames, ops)
    single = torch.cat([ClipRandAugment.apply(frames[i:i + 1], ops) for i in range(len(frames))])
    assert torch.equal(stacked, single)


def test_randaugment_rejects_float_input():
    with pytest.raises(ValueError, match="uint8"):
        ClipRandAugment()(torch.zeros(2, 3, 8, 8), _gen(0))


# ---------------------------------------------------------------------------------- train_view


def test_train_view_deterministic_per_seed():
    frames = _clip(t=4, h=72, w=96)
    a = train_view(frames, _gen(123), 32)
    b = train_view(frames, _gen(123), 32)
    assert torch.equal(a, b)
    outs = [train_view(frames, _gen(s), 32) for s in range(6)]
    assert all(not torch.equal(outs[0], o) for o in outs[1:])


def test_train_view_identical_frames_stay_identical():
    one = _clip(t=1, h=72, w=96)
    frames = one.repeat(6, 1, 1, 1)
    for seed in range(25):  # enough seeds that every op (geometric ones included) is exercised
        out = train_view(frames, _gen(seed), 32)
        assert torch.equal(out, out[:1].expand_as(out)), seed


def test_train_view_shape_dtype_and_range():
    frames = _clip(t=3, h=72, w=96)
    out = train_view(frames, _gen(0), 40)
    assert out.shape == (3, 3, 40, 40) and out.dtype == torch.float32 and out.is_contiguous()
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    lo, hi = (0 - mean) / std, (1 - mean) / std
    assert torch.all(out >= lo - 1e-5) and torch.all(out <= hi + 1e-5)
    # without RandAugment, a full-frame crop is exactly the normalised bilinear resize
    g = _gen(7)
    out = train_view(frames, g, 48, randaugment=None, scale=(1.0, 1.0), ratio=(96 / 72, 96 / 72))
    ref = torch.nn.functional.interpolate((frames.float() / 255 - mean) / std, size=(48, 48),
                                          mode="bilinear", align_corners=False)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_train_view_rejects_wrong_layout():
    with pytest.raises(ValueError, match=r"\(T, 3, H, W\)"):
        train_view(torch.zeros(4, 72, 96, 3, dtype=torch.uint8), _gen(0), 32)
