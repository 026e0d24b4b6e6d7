"""Views travel to the backbone workers as uint8 and are finished there, bit-identical to building
them in one place (the float pipeline as it ran before the split, written out here step by step)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from evl_cache.augment import normalise as aug_normalise, sample_resized_crop
from evl_cache.video import (
    Sampling,
    ViewSet,
    build_views,
    decode_frames,
    decode_views,
    eval_indices,
    finish_views,
    normalise,
    open_video,
    resize_short_side,
    spatial_crops,
    train_indices,
    view_generator,
)
from tests.media import moving_square_frames, write_video


def _reference_eval(path, sampling, views, size):
    reader = open_video(path)
    out = []
    for clip in eval_indices(len(reader), sampling, views.temporal):
        frames = torch.from_numpy(decode_frames(reader, clip)).permute(0, 3, 1, 2)
        frames = resize_short_side(normalise(frames), size)
        out.extend(spatial_crops(frames, size, views.spatial))
    return torch.stack(out)


def _reference_train(path, sampling, views, size, key):
    from evl_cache.augment import ClipRandAugment

    reader = open_video(path)
    out = []
    for v in range(views.count):
        gen = view_generator(views.seed, key, v)
        clip = train_indices(len(reader), sampling, gen)
        frames = torch.from_numpy(decode_frames(reader, clip)).permute(0, 3, 1, 2).contiguous()
        frames = ClipRandAugment()(frames, gen)
        x = aug_normalise(frames)  # normalise the whole frame, then crop and resize (the old order)
        top, left, h, w = sample_resized_crop(x.shape[-2], x.shape[-1], gen)
        x = x[:, :, top:top + h, left:left + w]
        out.append(F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False))
    return torch.stack(out)


@pytest.mark.parametrize("grid", [(3, 1), (1, 3)])
def test_eval_views_from_uint8_are_bit_identical(tmp_path, grid):
    path = write_video(tmp_path / "v.mp4", moving_square_frames(20, 48, 64))
    sampling = Sampling("dense", 4, 2)
    views = ViewSet("eval", count=grid[0] * grid[1], temporal=grid[0], spatial=grid[1])
    packed, _ = decode_views(str(path), sampling, views, 32)
    assert packed.ready is None and all(c.dtype == np.uint8 for c in packed.clips)
    got = finish_views(packed)
    assert torch.equal(got, _reference_eval(str(path), sampling, views, 32))
    assert torch.equal(got, build_views(str(path), sampling, views, 32)[0])


def test_train_views_from_uint8_are_bit_identical(tmp_path):
    path = write_video(tmp_path / "v.mp4", moving_square_frames(20, 48, 64))
    sampling = Sampling("dense", 4, 2)
    views = ViewSet("train", count=3, temporal=1, spatial=1, seed=5)
    packed, _ = decode_views(str(path), sampling, views, 32, key="v.mp4")
    assert packed.ready is None and all(c.dtype == np.uint8 for c in packed.clips)
    assert torch.equal(finish_views(packed), _reference_train(str(path), sampling, views, 32, "v.mp4"))


def test_uint8_views_are_smaller_and_large_sources_ship_float(tmp_path):
    """Sources near the input size ship uint8 (far fewer bytes than float32 views); a source much
    larger than the views ships the float32 views instead, so a video never costs more than before."""
    path = write_video(tmp_path / "v.mp4", moving_square_frames(20, 48, 64))
    sampling = Sampling("dense", 4, 2)
    views = ViewSet("eval", count=3, temporal=1, spatial=3)
    packed, _ = decode_views(str(path), sampling, views, 48)
    float_bytes = 3 * 4 * 3 * 48 * 48 * 4
    assert packed.ready is None and packed.nbytes == 4 * 48 * 64 * 3 < float_bytes
    small, _ = decode_views(str(path), sampling, ViewSet("eval", count=1, temporal=1, spatial=1), 8)
    assert small.ready is not None and small.ready.dtype == np.float32
    assert torch.equal(finish_views(small), _reference_eval(str(path), sampling, ViewSet("eval", count=1, temporal=1, spatial=1), 8))
