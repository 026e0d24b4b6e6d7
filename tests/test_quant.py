"""Compact cache formats (evl_cache.quant): error bounds, scale granularity under outliers, byte counts."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from evl_cache.errors import UserError
from evl_cache.quant import (FeatureFormat, MapFormat, decode_features, decode_maps, encode_features, encode_maps,
                             index_dtype, topk_dropped_mass)

OUTLIERS = [3, 77, 150, 201]
ALL_FEATURE_FORMATS = ["float16", "float32"] + [f"{d}:{g}" for d in ("int8", "float8_e4m3")
                                                for g in ("token", "channel", "group32", "group64", "channel_token")]


def features(hot_tokens: bool = False, seed: int = 0, tokens: int = 33) -> torch.Tensor:
    """(clips=2, blocks=2, T=4, L=tokens, C=256) Gaussian features with 4 channels x50 (like CLIP's
    outlier channels) and optionally 2% of tokens x10 (high-norm tokens)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 2, 4, tokens, 256, generator=gen)
    x[..., OUTLIERS] *= 50.0
    if hot_tokens:
        hot = torch.rand(2, 2, 4, tokens, generator=gen) < 0.02
        hot[0, 0, 0, 5] = True
        x = x * torch.where(hot, 10.0, 1.0).unsqueeze(-1)
    return x


def roundtrip(x: torch.Tensor, name: str) -> torch.Tensor:
    fmt = FeatureFormat.parse(name)
    q = encode_features(x, fmt)
    return decode_features(q.codes, q.scales, fmt)


def bulk_cos(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    keep = torch.ones(x.shape[-1], dtype=torch.bool)
    keep[OUTLIERS] = False
    return F.cosine_similarity(x[..., keep], y[..., keep], dim=-1)


def test_per_channel_int8_survives_outlier_channels_where_per_token_fails():
    x = features()
    chan, tok = roundtrip(x, "int8:channel"), roundtrip(x, "int8:token")
    assert F.cosine_similarity(x, chan, dim=-1).min() > 0.999
    assert bulk_cos(x, chan).min() > 0.999
    # per-token: the outlier channels set every token's step, so the other 252 channels are coarse.
    # The full-vector cosine hides it (the outliers hold most of the norm); the rest of the channels do not.
    assert bulk_cos(x, tok).min() < 0.99
    assert (tok - x).norm() > 3 * (chan - x).norm()


def test_channel_token_survives_high_norm_tokens_where_per_channel_does_not():
    x = features(hot_tokens=True, tokens=197)
    chan, both = roundtrip(x, "int8:channel"), roundtrip(x, "int8:channel_token")
    # a hot token stretches its channels' range for every other token in the chunk
    assert F.cosine_similarity(x, chan, dim=-1).min() < 0.99
    assert F.cosine_similarity(x, both, dim=-1).min() > 0.995
    assert bulk_cos(x, both).min() > 0.999
    for name in ("int8:group32", "float8_e4m3:channel", "float8_e4m3:channel_token"):
        assert F.cosine_similarity(x, roundtrip(x, name), dim=-1).min() > 0.995, name


@pytest.mark.parametrize("name", ["int8:token", "int8:channel", "int8:group32", "int8:channel_token"])
def test_int8_error_is_at_most_half_a_step(name):
    x = features(hot_tokens=True)
    fmt = FeatureFormat.parse(name)
    q = encode_features(x, fmt)
    y = decode_features(q.codes, q.scales, fmt)
    s = {k: v.float() for k, v in q.scales.items()}
    if fmt.granularity == "token":
        step = s["token"].unsqueeze(-1)
    elif fmt.granularity == "channel":
        step = s["channel"][:, :, None, None, :]
    elif fmt.granularity == "group":
        step = s["group"].repeat_interleave(fmt.group, dim=-1)
    else:
        step = s["token"].unsqueeze(-1) * s["channel"][:, :, None, None, :]
    assert ((y - x).abs() <= 0.5 * step * (1 + 1e-5) + 1e-6).all()
    assert q.codes.dtype == torch.int8 and q.codes.abs().max() <= 127
    assert all(v.dtype == torch.float16 for v in q.scales.values())


@pytest.mark.parametrize("name", ["float8_e4m3:token", "float8_e4m3:channel", "float8_e4m3:group64"])
def test_float8_relative_error_is_within_three_mantissa_bits(name):
    x = features(hot_tokens=True)
    y = roundtrip(x, name)
    # e4m3 keeps 3 mantissa bits: rounding error <= 2^-4 of the value in the normal range; values
    # below the scale's normal range (|x| < 2^-6 of the scale, i.e. < amax/448/64) get an absolute bound
    amax = x.abs().max()
    assert ((y - x).abs() <= 2.0 ** -4 * x.abs() + amax / 448 * 2.0 ** -9 + 1e-6).all()
    assert F.cosine_similarity(x, y, dim=-1).min() > 0.998


def test_float16_and_float32_round_trip():
    x = features()
    assert torch.equal(roundtrip(x, "float32"), x)
    assert ((roundtrip(x, "float16") - x).abs() <= 2.0 ** -11 * x.abs() + 1e-7).all()


@pytest.mark.parametrize("name", ALL_FEATURE_FORMATS)
def test_feature_bytes_match_the_stored_tensors_and_names_round_trip(name):
    x = features()[0]  # one clip-view: (K, T, L, C)
    fmt = FeatureFormat.parse(name)
    q = encode_features(x, fmt)
    stored = q.codes.numel() * q.codes.element_size() + sum(v.numel() * v.element_size() for v in q.scales.values())
    assert fmt.nbytes(tuple(x.shape)) == stored
    assert {k: tuple(v.shape) for k, v in q.scales.items()} == fmt.scale_shapes(tuple(x.shape))
    assert q.codes.dtype == fmt.code_dtype and q.codes.shape == x.shape
    assert FeatureFormat.parse(fmt.name) == fmt == FeatureFormat.from_dict(fmt.to_dict())


def test_int8_channel_is_about_half_of_float16():
    shape = (4, 8, 197, 768)  # ViT-B/16 8 frames, last 4 blocks
    ratio = FeatureFormat.parse("int8:channel_token").nbytes(shape) / FeatureFormat.parse("float16").nbytes(shape)
    # scales: 4*(768 + 8*197) float16 values next to 4*8*197*768 int8 codes
    assert ratio == pytest.approx((4 * 8 * 197 * 768 + 2 * 4 * (768 + 8 * 197)) / (2 * 4 * 8 * 197 * 768))
    assert ratio < 0.503


@pytest.mark.parametrize("name", ["int8:channel_token", "float8_e4m3:group32", "float16"])
def test_decode_takes_numpy_a_device_and_an_out_dtype_and_is_deterministic(name):
    x = features(hot_tokens=True)
    fmt = FeatureFormat.parse(name)
    q1, q2 = encode_features(x, fmt), encode_features(x.clone(), fmt)
    assert torch.equal(q1.codes, q2.codes) and all(torch.equal(q1.scales[k], q2.scales[k]) for k in q1.scales)
    ref = decode_features(q1.codes, q1.scales, fmt)
    via_numpy = decode_features(q1.codes.numpy(), {k: v.numpy() for k, v in q1.scales.items()}, fmt,
                                out_dtype=torch.float16, device=torch.device("cpu"))
    assert via_numpy.dtype == torch.float16 and via_numpy.device.type == "cpu"
    assert torch.equal(via_numpy, ref.half())
    assert torch.equal(decode_features(q1.codes, q1.scales, fmt, device="cpu"), ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_decode_on_cuda_matches_cpu():
    x = features(hot_tokens=True)
    for name in ("int8:channel_token", "float8_e4m3:channel", "int8:group32"):
        fmt = FeatureFormat.parse(name)
        q = encode_features(x, fmt)
        assert torch.equal(decode_features(q.codes, q.scales, fmt, device="cuda").cpu(), decode_features(q.codes, q.scales, fmt))
    a = maps()
    for name in ("uint8", "top8:uint8"):
        fmt = MapFormat.parse(name)
        q = encode_maps(a, fmt)
        assert torch.allclose(decode_maps(q, fmt, device="cuda").cpu(), decode_maps(q, fmt), atol=1e-7)


def test_bad_feature_input_is_refused():
    with pytest.raises(UserError, match="groups of 48"):
        encode_features(torch.zeros(1, 2, 3, 100), FeatureFormat("int8", "group", 48))
    with pytest.raises(UserError, match="inf or NaN"):
        encode_features(torch.tensor([[[1.0, float("nan")]]]), FeatureFormat.parse("int8:channel"))
    with pytest.raises(UserError, match="float16's range"):
        encode_features(torch.full((1, 1, 2), 1e6), FeatureFormat.parse("float16"))
    with pytest.raises(UserError, match="granularity"):
        FeatureFormat.parse("int8")
    with pytest.raises(UserError, match="unknown feature dtype"):
        FeatureFormat.parse("int4:channel")
    q = encode_features(features(), FeatureFormat.parse("int8:channel"))
    with pytest.raises(UserError, match="do not match"):
        decode_features(q.codes, q.scales, FeatureFormat.parse("float8_e4m3:channel"))
    with pytest.raises(UserError, match="lack their channel"):
        decode_features(q.codes, {}, FeatureFormat.parse("int8:channel"))


def test_channel_token_factor_choices_all_decode_with_the_same_format():
    x = features(hot_tokens=True)
    fmt = FeatureFormat.parse("int8:channel_token")
    for stat in ("geomean", "rms", "absmax"):
        q = encode_features(x, fmt, channel_stat=stat)
        assert F.cosine_similarity(x, decode_features(q.codes, q.scales, fmt), dim=-1).min() > 0.97, stat
    with pytest.raises(UserError, match="channel statistic"):
        encode_features(x, fmt, channel_stat="median")


def test_zero_features_decode_to_zero():
    x = torch.zeros(1, 2, 5, 64)
    for name in ALL_FEATURE_FORMATS:
        assert torch.equal(roundtrip(x, name), x), name


# ---------------------------------------------------------------------------------------------
# attention maps


def maps(p: int = 64, seed: int = 0) -> torch.Tensor:
    """(2 blocks, 2, T-1=3, P, P) softmax rows, peaked like a trained tower's and strictly positive."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 2, 3, p, p, generator=gen) * 3.0).softmax(-1)


@pytest.mark.parametrize("k", [1, 8, 16])
@pytest.mark.parametrize("values", ["float16", "uint8"])
def test_topk_keeps_exactly_k_per_row_and_reports_the_dropped_mass(k, values):
    a = maps()
    fmt = MapFormat(values, k)
    q = encode_maps(a, fmt)
    assert q.codes.shape == (*a.shape[:-1], k) and q.indices.shape == (*a.shape[:-1], k)
    assert q.indices.dtype == torch.uint8
    top = a.topk(k, dim=-1)
    kept = q.indices.long().sort(-1).values
    assert torch.equal(kept, top.indices.sort(-1).values)  # the K largest, each column once
    d = decode_maps(q, fmt)
    assert d.shape == a.shape and d.dtype == torch.float32
    assert ((d != 0).sum(-1) <= k).all() and torch.equal(d.gather(-1, q.indices.long()) != 0, q.codes != 0)
    assert (d >= 0).all()
    if values == "float16":
        assert ((d > 0).sum(-1) == k).all()  # every kept probability is positive and representable
    dropped = topk_dropped_mass(a, k)
    assert torch.allclose(dropped, 1 - top.values.sum(-1))
    tol = 2e-3 * k if values == "float16" else 1 / 255 * k * a.amax(-1).max()
    assert torch.allclose(dropped, 1 - d.sum(-1), atol=float(tol))
    renorm = decode_maps(q, fmt, renormalise=True)
    assert torch.allclose(renorm.sum(-1), torch.ones(()), atol=1e-5)


def test_topk_indices_widen_past_256_patches():
    assert index_dtype(196) == np.uint8 and index_dtype(256) == np.uint8 and index_dtype(576) == np.int16
    a = (torch.randn(1, 576, 576) * 3).softmax(-1)
    fmt = MapFormat.parse("top4:uint8")
    q = encode_maps(a, fmt)
    assert q.indices.dtype == torch.int16 and int(q.indices.max()) > 255
    assert torch.equal(q.indices.long().sort(-1).values, a.topk(4, dim=-1).indices.sort(-1).values)
    d = decode_maps(q, fmt)
    assert torch.allclose(d.gather(-1, q.indices.long()), a.topk(4, dim=-1).values, atol=float(a.amax()) / 500)
    assert fmt.nbytes(tuple(a.shape)) == q.codes.numel() + 2 * q.indices.numel() + 2 * 576


def uint8_bound(a: torch.Tensor, scaling: str) -> torch.Tensor:
    """Largest rounding error of one uint8 entry: half a step of the code, mapped back to p."""
    s = a.amax(-1, keepdim=True)
    if scaling == "fixed":
        return torch.full_like(a, 1 / 510)
    if scaling == "row":
        return s / 510 + s * 2.0 ** -11  # + the float16 rounding of s
    u = (a / s).sqrt()
    return s * (2 * u / 510 + 1 / 510 ** 2) + s * 2.0 ** -10


@pytest.mark.parametrize("scaling", ["sqrt", "row", "fixed"])
def test_uint8_maps_decode_within_half_a_step(scaling):
    a = maps()
    fmt = MapFormat("uint8", 0, scaling)
    q = encode_maps(a, fmt)
    assert q.codes.dtype == torch.uint8 and q.codes.shape == a.shape
    assert set(q.scales) == (set() if scaling == "fixed" else {"row"})
    d = decode_maps(q, fmt, out_dtype=torch.float16, device=torch.device("cpu"))
    assert d.shape == a.shape and d.dtype == torch.float16
    d = decode_maps(q, fmt)
    assert ((d - a).abs() <= uint8_bound(a, scaling) + 1e-7).all()
    assert torch.allclose(decode_maps(q, fmt, renormalise=True).sum(-1), torch.ones(()), atol=1e-5)


def test_uint8_row_scale_beats_fixed_point_on_flat_rows_and_sqrt_keeps_the_mass_of_peaked_rows():
    def l1(a, name):
        fmt = MapFormat.parse(name)
        return (decode_maps(encode_maps(a, fmt), fmt) - a).abs().sum(-1).mean()

    flat = (torch.randn(2, 2, 3, 196, 196, generator=torch.Generator().manual_seed(0)) * 0.3).softmax(-1)  # mean p = 1/196
    assert l1(flat, "uint8:row") < l1(flat, "uint8:fixed") / 20
    assert l1(flat, "uint8") < l1(flat, "uint8:fixed") / 20
    peaked = (torch.randn(2, 2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 4.0).softmax(-1)
    fmt_sqrt, fmt_row = MapFormat.parse("uint8"), MapFormat.parse("uint8:row")
    mass = {n: (decode_maps(encode_maps(peaked, f), f).sum(-1) - 1).abs().mean() for n, f in (("sqrt", fmt_sqrt), ("row", fmt_row))}
    assert l1(peaked, "uint8") < l1(peaked, "uint8:row")
    assert mass["sqrt"] < mass["row"] / 2


def test_map_bytes_and_names():
    shape = (4, 2, 7, 196, 196)  # ViT-B/16 8 frames, last 4 blocks
    rows = 4 * 2 * 7 * 196
    assert MapFormat.parse("float16").nbytes(shape) == rows * 196 * 2
    assert MapFormat.parse("uint8").nbytes(shape) == rows * (196 + 2)
    assert MapFormat.parse("uint8:sqrt") == MapFormat.parse("uint8")
    assert MapFormat.parse("uint8:row").nbytes(shape) == rows * (196 + 2)
    assert MapFormat.parse("uint8:fixed").nbytes(shape) == rows * 196
    assert MapFormat.parse("top16").nbytes(shape) == rows * 16 * 3
    assert MapFormat.parse("top16:uint8").nbytes(shape) == rows * (16 * 2 + 2)
    for name in ("float16", "uint8", "uint8:row", "uint8:fixed", "top16", "top16:uint8", "top16:uint8:row"):
        fmt = MapFormat.parse(name)
        assert fmt.name == name and MapFormat.from_dict(fmt.to_dict()) == fmt
    a = maps()
    for name in ("float16", "uint8", "top8", "top8:uint8"):
        fmt = MapFormat.parse(name)
        q = encode_maps(a, fmt)
        stored = sum(t.numel() * t.element_size() for t in [q.codes, *( [q.indices] if q.indices is not None else []), *q.scales.values()])
        assert fmt.nbytes(tuple(a.shape)) == stored, name
    with pytest.raises(UserError, match="topK"):
        MapFormat.parse("topx")
    with pytest.raises(UserError, match="float16 or uint8"):
        MapFormat.parse("int4")
    with pytest.raises(UserError, match="drop ':fixed'"):
        MapFormat.parse("top8:uint8:fixed")
    with pytest.raises(UserError, match="bad attention-map format"):
        MapFormat.parse("float16:row")


def test_map_encode_decode_is_deterministic():
    a = maps(seed=3)
    for name in ("uint8", "top16:uint8", "top16"):
        fmt = MapFormat.parse(name)
        q1, q2 = encode_maps(a, fmt), encode_maps(a.clone(), fmt)
        assert torch.equal(q1.codes, q2.codes)
        assert (q1.indices is None) or torch.equal(q1.indices, q2.indices)
        assert torch.equal(decode_maps(q1, fmt), decode_maps(q2, fmt))
        numpy_parts = (q1.codes.numpy(), None if q1.indices is None else q1.indices.numpy(), {k: v.numpy() for k, v in q1.scales.items()})
        assert torch.equal(decode_maps(numpy_parts, fmt, device="cpu"), decode_maps(q1, fmt))
