"""Compact storage formats for cached block outputs and attention maps (the numerical core of issue 9).

Features: block outputs x of shape (..., T, L, C), stored as float16/float32, or as int8 / float8_e4m3
codes with float16 scales. The scale granularity matters because CLIP's residual stream has a few
channels far larger than the rest (and, in large ViTs, a few high-norm tokens):

- ``token``: one scale per token (absmax over C). An outlier channel sets every token's scale, so the
  ordinary channels get a coarse step: the wrong choice for CLIP (measured in benchmarks/bench_quant.py).
- ``channel``: one scale per channel per chunk, the chunk being whatever leading index x carries
  (one (video, view) and one block in the store: the absmax runs over that chunk's T*L tokens).
  Outlier channels keep their own range; a high-norm token still stretches the range of every channel.
- ``group``: one scale per G consecutive channels of each token (G = 32 or 64).
- ``channel_token``: x is first divided by a per-channel factor over the chunk (equalising the
  channels), then each token by its own absmax (so nothing clips): survives both outlier channels and
  high-norm tokens for 2/C + 2/(T*L) bytes of scales per element. The channel factor is the geometric
  mean of the channel's RMS and absmax. Absmax alone lets a rare high-norm token set the factor, so
  the chunk's ordinary tokens get a coarse step; RMS alone lets a spiky channel (small RMS, one large
  value) dominate its token's range. The geometric mean halves both effects in log terms and was best
  or near best on every measured case (the ablation table of benchmarks/bench_quant.py).

Scales are stored as float16 (2 bytes each); the codes are computed against the already-rounded float16
scale, so scale rounding adds no error. float8_e4m3 codes are torch.float8_e4m3fn bytes viewed as uint8
(numpy and Zarr have no fp8 type).

Attention maps: head-averaged softmax rows (..., P, P) that sum to 1, stored dense as float16 or uint8,
or sparse as the K largest entries of each row with their column indices (uint8 for P <= 256, else
int16). uint8 values are scaled per row by the row's largest probability s, and square-root companded
(code = round(sqrt(p / s) * 255)): with P = 196 the mean probability is 1/196, and a fixed step of 1/255
rounds most of a flat row to 0 or 1; a linear per-row step still rounds away the many small entries
of a peaked row (measured in benchmarks/bench_quant.py).

Decoding is vectorised and runs on whatever device the codes are moved to (``device=``), so a reader
can ship the compact bytes to the GPU and expand them there.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from evl_cache.errors import UserError

FEATURE_DTYPES = ("float16", "float32", "int8", "float8_e4m3")
GRANULARITIES = ("token", "channel", "group", "channel_token")
MAP_VALUES = ("float16", "uint8")
MAP_SCALINGS = ("sqrt", "row", "fixed")

INT8_MAX = 127.0
FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP16_MAX = 65504.0
# Smallest normal float16: scales are clamped here so a zero channel/token never divides by zero and
# never becomes a subnormal scale (the absolute error of such a chunk is then <= 3e-5).
SCALE_MIN = 2.0 ** -14
SCALE_DTYPE = torch.float16


# ---------------------------------------------------------------------------------------------
# formats


@dataclass(frozen=True)
class FeatureFormat:
    """How block outputs are stored: ``dtype`` and, for int8/float8_e4m3, the scale ``granularity``.

    Written as text: ``float16``, ``float32``, ``int8:channel``, ``int8:group32``,
    ``float8_e4m3:channel_token``, ... (``parse``/``name`` round-trip).
    """

    dtype: str = "float16"
    granularity: str | None = None
    group: int = 32

    def __post_init__(self) -> None:
        if self.dtype not in FEATURE_DTYPES:
            raise UserError(f"unknown feature dtype '{self.dtype}'; use one of {', '.join(FEATURE_DTYPES)}")
        if self.dtype in ("float16", "float32"):
            if self.granularity is not None:
                raise UserError(f"feature dtype {self.dtype} takes no scales; drop ':{self.granularity}'")
            return
        if self.granularity not in GRANULARITIES:
            raise UserError(f"feature dtype {self.dtype} needs a scale granularity ({', '.join(GRANULARITIES)}), "
                            f"e.g. {self.dtype}:channel_token")
        if self.granularity == "group" and self.group < 1:
            raise UserError(f"group size must be >= 1, got {self.group}")

    @property
    def quantized(self) -> bool:
        return self.granularity is not None

    @property
    def name(self) -> str:
        if not self.quantized:
            return self.dtype
        gran = f"group{self.group}" if self.granularity == "group" else self.granularity
        return f"{self.dtype}:{gran}"

    @classmethod
    def parse(cls, text: str) -> "FeatureFormat":
        """``float16`` | ``float32`` | ``int8:<g>`` | ``float8_e4m3:<g>``, g in token, channel, groupN, channel_token."""
        dtype, _, gran = text.strip().partition(":")
        if not gran:
            return cls(dtype)
        if gran.startswith("group"):
            try:
                return cls(dtype, "group", int(gran[5:] or 32))
            except ValueError:
                raise UserError(f"bad feature format '{text}'; write groupN with an integer N, e.g. int8:group32") from None
        return cls(dtype, gran)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FeatureFormat":
        return cls(d["dtype"], d.get("granularity"), int(d.get("group", 32)))

    @property
    def code_dtype(self) -> torch.dtype:
        """The torch dtype of the stored codes (float8 is stored as its uint8 bytes)."""
        return {"float16": torch.float16, "float32": torch.float32, "int8": torch.int8,
                "float8_e4m3": torch.uint8}[self.dtype]

    def scale_shapes(self, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        """Shapes of the scale tensors for features of ``shape`` (..., T, L, C)."""
        *lead, t, length, c = shape
        lead = tuple(lead)
        if self.granularity == "token":
            return {"token": (*lead, t, length)}
        if self.granularity == "channel":
            return {"channel": (*lead, c)}
        if self.granularity == "group":
            if c % self.group:
                raise UserError(f"{c} channels do not split into groups of {self.group}; pick a group size dividing {c}")
            return {"group": (*lead, t, length, c // self.group)}
        if self.granularity == "channel_token":
            return {"channel": (*lead, c), "token": (*lead, t, length)}
        return {}

    def nbytes(self, shape: tuple[int, ...]) -> int:
        """Stored bytes (codes + float16 scales) for features of ``shape`` (..., T, L, C)."""
        codes = int(np.prod(shape)) * torch.empty(0, dtype=self.code_dtype).element_size()
        scales = sum(int(np.prod(s)) for s in self.scale_shapes(tuple(shape)).values())
        return codes + scales * torch.empty(0, dtype=SCALE_DTYPE).element_size()


@dataclass(frozen=True)
class MapFormat:
    """How attention maps (..., P, P) are stored.

    ``values``: float16 or uint8; ``topk``: 0 = dense, K = keep the K largest entries per row.
    ``scaling`` (uint8 values only), with s = the row's largest probability stored as float16:
    ``sqrt`` (default) = code round(sqrt(p / s) * 255), decoded s * (code / 255)^2: a finer step for the
    many small probabilities of a peaked row, whose rounding otherwise loses mass;
    ``row`` = code round(p / s * 255); ``fixed`` = code round(p * 255), no scale (dense only; kept for
    comparison: it zeroes most entries of a flat row).
    Written as text: ``float16``, ``uint8`` (= ``uint8:sqrt``), ``uint8:row``, ``uint8:fixed``,
    ``top16`` (float16 values), ``top16:uint8``, ``top16:uint8:row``.
    """

    values: str = "float16"
    topk: int = 0
    scaling: str = "sqrt"

    def __post_init__(self) -> None:
        if self.values not in MAP_VALUES:
            raise UserError(f"unknown attention-map dtype '{self.values}'; use float16 or uint8")
        if self.scaling not in MAP_SCALINGS:
            raise UserError(f"unknown attention-map scaling '{self.scaling}'; use {', '.join(MAP_SCALINGS)}")
        if self.values == "float16" and self.scaling != "sqrt":
            raise UserError(f"float16 attention maps take no scaling; drop ':{self.scaling}'")
        if self.topk < 0:
            raise UserError(f"--attn-topk must be >= 1 (or 0 for dense maps), got {self.topk}")
        if self.topk and self.scaling == "fixed":
            raise UserError("top-k uint8 values are row-scaled (sqrt or row); drop ':fixed'")

    @property
    def name(self) -> str:
        text = f"top{self.topk}" if self.topk else ""
        if self.values == "uint8":
            text += (":" if text else "") + "uint8" + ("" if self.scaling == "sqrt" else f":{self.scaling}")
        return text or "float16"

    @classmethod
    def parse(cls, text: str) -> "MapFormat":
        parts = text.strip().split(":")
        k = 0
        if parts[0].startswith("top"):
            try:
                k = int(parts[0][3:])
            except ValueError:
                raise UserError(f"bad attention-map format '{text}'; write topK with an integer K, e.g. top16") from None
            parts = parts[1:] or ["float16"]
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "uint8"):
            raise UserError(f"bad attention-map format '{text}'; use float16, uint8[:sqrt|row|fixed], topK or topK:uint8[:sqrt|row]")
        return cls(parts[0], k, parts[1] if len(parts) == 2 else "sqrt")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MapFormat":
        return cls(d.get("values", "float16"), int(d.get("topk", 0)), d.get("scaling", "sqrt"))

    def kept(self, num_patches: int) -> int:
        """Entries stored per row: K capped at P (a larger K keeps the dense row)."""
        return min(self.topk, num_patches) if self.topk else num_patches

    def nbytes(self, shape: tuple[int, ...]) -> int:
        """Stored bytes for maps of ``shape`` (..., P, P): values, indices and float16 row scales."""
        *lead, rows, p = shape
        nrows = int(np.prod(lead)) * rows
        value_bytes = 2 if self.values == "float16" else 1
        total = nrows * self.kept(p) * value_bytes
        if self.topk:
            total += nrows * self.kept(p) * index_dtype(p).itemsize
        if self.values == "uint8" and self.scaling != "fixed":
            total += nrows * 2
        return total


def index_dtype(num_patches: int) -> np.dtype:
    """Column indices of a top-k row: uint8 up to 256 patches, int16 up to 32768 (L/14@336 has 576)."""
    if num_patches <= 256:
        return np.dtype(np.uint8)
    if num_patches <= 32768:
        return np.dtype(np.int16)
    raise UserError(f"{num_patches} patches per frame is more than a top-k index can address (32768)")


# ---------------------------------------------------------------------------------------------
# features


class QuantizedFeatures(NamedTuple):
    """codes: the stored tensor (int8, uint8 holding float8 bytes, float16 or float32);
    scales: named float16 tensors ("token", "channel", "group"), empty for float16/float32."""

    codes: Tensor
    scales: dict[str, Tensor]


def _to_scale(v: Tensor) -> Tensor:
    """float32 scale candidates -> the float16 scales that are stored (clamped to normal range)."""
    return v.clamp(SCALE_MIN, FP16_MAX).to(SCALE_DTYPE)


def _to_codes(y: Tensor, dtype: str) -> Tensor:
    if dtype == "int8":
        return y.round().clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return y.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).view(torch.uint8)


CHANNEL_STATS = ("geomean", "rms", "absmax")


def _channel_factor(xf: Tensor, stat: str) -> Tensor:
    """The per-chunk channel equaliser of ``channel_token``: sqrt(RMS * absmax), RMS or absmax."""
    if stat not in CHANNEL_STATS:
        raise UserError(f"unknown channel statistic '{stat}'; use one of {', '.join(CHANNEL_STATS)}")
    if stat == "absmax":
        return xf.abs().amax(dim=(-3, -2), keepdim=True)
    rms = xf.square().mean(dim=(-3, -2), keepdim=True).sqrt()
    return rms if stat == "rms" else (rms * xf.abs().amax(dim=(-3, -2), keepdim=True)).sqrt()


def encode_features(x: Tensor, fmt: FeatureFormat, channel_stat: str = "geomean") -> QuantizedFeatures:
    """Encode block outputs x (..., T, L, C) in ``fmt``; scales are per leading index (per chunk).

    ``channel_stat`` picks the channel equaliser of ``channel_token`` (kept selectable for the ablation
    in benchmarks/bench_quant.py; decoding does not depend on it).
    Deterministic: the same x gives the same bytes. Refuses non-finite input and, for float16,
    values beyond float16's range (they would be stored as inf).
    """
    if x.dim() < 3:
        raise UserError(f"features must be (..., T, L, C), got shape {tuple(x.shape)}")
    xf = x.float()
    peak = xf.abs().amax() if xf.numel() else xf.new_zeros(())
    if not torch.isfinite(peak):
        raise UserError("features hold inf or NaN; the backbone output is broken (check weights and precision)")
    if fmt.dtype == "float32":
        return QuantizedFeatures(xf.contiguous(), {})
    if fmt.dtype == "float16":
        if peak > FP16_MAX:
            raise UserError(f"features reach {peak.item():.3g}, beyond float16's range; store float32 or int8/float8 with scales")
        return QuantizedFeatures(xf.to(torch.float16), {})
    qmax = INT8_MAX if fmt.dtype == "int8" else FP8_MAX
    shapes = fmt.scale_shapes(tuple(x.shape))  # validates the group size
    if peak / qmax > FP16_MAX:
        raise UserError(f"features reach {peak.item():.3g}, beyond what float16 scales can map to {fmt.dtype}; store float32")
    scales: dict[str, Tensor] = {}
    if fmt.granularity == "token":
        s = _to_scale(xf.abs().amax(-1, keepdim=True) / qmax)
        y = xf / s.float()
        scales["token"] = s.squeeze(-1)
    elif fmt.granularity == "channel":
        s = _to_scale(xf.abs().amax(dim=(-3, -2), keepdim=True) / qmax)
        y = xf / s.float()
        scales["channel"] = s.squeeze(-2).squeeze(-2)
    elif fmt.granularity == "group":
        g = xf.unflatten(-1, (-1, fmt.group))
        s = _to_scale(g.abs().amax(-1, keepdim=True) / qmax)
        y = (g / s.float()).flatten(-2)
        scales["group"] = s.squeeze(-1)
    else:  # channel_token: equalise the channels (chunk statistic), then each token by its own absmax
        sc = _to_scale(_channel_factor(xf, channel_stat))
        y = xf / sc.float()
        st = _to_scale(y.abs().amax(-1, keepdim=True) / qmax)
        y = y / st.float()
        scales["channel"] = sc.squeeze(-2).squeeze(-2)
        scales["token"] = st.squeeze(-1)
    assert {k: tuple(v.shape) for k, v in scales.items()} == shapes
    return QuantizedFeatures(_to_codes(y, fmt.dtype), {k: v.contiguous() for k, v in scales.items()})


def _as_tensor(a: Tensor | np.ndarray) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)) if isinstance(a, np.ndarray) else a


def decode_features(codes: Tensor | np.ndarray, scales: dict[str, Tensor | np.ndarray], fmt: FeatureFormat,
                    out_dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> Tensor:
    """Expand stored codes back to features (..., T, L, C) of ``out_dtype`` on ``device``.

    The compact codes and scales are moved first and expanded there, so a batch crosses PCIe at its
    stored size. Accepts numpy arrays (as read from the store) or tensors (pinned ones move async).
    Arithmetic is float32, cast to ``out_dtype`` at the end.
    """
    dev = torch.device(device) if device is not None else None
    c = _as_tensor(codes)
    if dev is not None:
        c = c.to(dev, non_blocking=True)
    if c.dtype != fmt.code_dtype:
        raise UserError(f"stored features are {c.dtype}, but the format {fmt.name} stores {fmt.code_dtype}; the store's attributes do not match its arrays")
    if not fmt.quantized:
        return c.to(out_dtype)
    s = {k: _as_tensor(v) for k, v in scales.items()}
    if dev is not None:
        s = {k: v.to(dev, non_blocking=True) for k, v in s.items()}
    missing = set(fmt.scale_shapes(tuple(c.shape))) - set(s)
    if missing:
        raise UserError(f"features stored as {fmt.name} lack their {', '.join(sorted(missing))} scales; the store is incomplete")
    y = c.float() if fmt.dtype == "int8" else c.view(torch.float8_e4m3fn).float()
    if fmt.granularity == "group":
        y = (y.unflatten(-1, (-1, fmt.group)) * s["group"].float().unsqueeze(-1)).flatten(-2)
    else:
        if "token" in s:
            y = y * s["token"].float().unsqueeze(-1)
        if "channel" in s:
            y = y * s["channel"].float().unsqueeze(-2).unsqueeze(-2)
    return y.to(out_dtype)


# ---------------------------------------------------------------------------------------------
# attention maps


class QuantizedMaps(NamedTuple):
    """codes: (..., P, P) dense or (..., P, K) top-k values; indices: (..., P, K) uint8/int16 columns
    for top-k, else None; scales: {"row": (..., P) float16} for row-scaled uint8, else empty."""

    codes: Tensor
    indices: Tensor | None
    scales: dict[str, Tensor]


def encode_maps(a: Tensor, fmt: MapFormat) -> QuantizedMaps:
    """Encode attention maps a (..., P, P) (rows of probabilities) in ``fmt``. Deterministic."""
    if a.dim() < 2 or a.shape[-1] != a.shape[-2]:
        raise UserError(f"attention maps must be (..., P, P), got shape {tuple(a.shape)}")
    af = a.float()
    p = a.shape[-1]
    indices = None
    if fmt.topk:
        k = fmt.kept(p)
        af, idx = af.topk(k, dim=-1, sorted=True)
        indices = idx.to(torch.int16 if index_dtype(p) == np.int16 else torch.uint8)
    if fmt.values == "float16":
        return QuantizedMaps(af.to(torch.float16), indices, {})
    if fmt.scaling == "fixed":
        return QuantizedMaps((af * 255.0).round_().clamp_(0, 255).to(torch.uint8), indices, {})
    s = _to_scale(af.amax(-1, keepdim=True))
    u = (af / s.float()).clamp_(0.0, 1.0)
    if fmt.scaling == "sqrt":
        u = u.sqrt_()
    codes = (u * 255.0).round_().to(torch.uint8)
    return QuantizedMaps(codes, indices, {"row": s.squeeze(-1).contiguous()})


def decode_maps(enc: QuantizedMaps | tuple, fmt: MapFormat, out_dtype: torch.dtype = torch.float32,
                device: torch.device | str | None = None, renormalise: bool = False) -> Tensor:
    """Expand stored maps to dense (..., P, P) ``out_dtype`` rows on ``device``.

    Top-k rows are scattered into zeros (P = the number of rows). ``renormalise`` divides each row by
    its decoded sum, restoring rows that sum to 1 (a row decoded to all zeros stays zero).
    """
    codes, indices, scales = (_as_tensor(enc[0]), enc[1], enc[2])
    dev = torch.device(device) if device is not None else None
    if dev is not None:
        codes = codes.to(dev, non_blocking=True)
    if codes.dtype == torch.uint8:
        v = codes.float() / 255.0
        if fmt.scaling == "sqrt":
            v = v.square()
        if fmt.scaling != "fixed":
            row = _as_tensor(scales["row"])
            v = v * (row.to(dev, non_blocking=True) if dev is not None else row).float().unsqueeze(-1)
    else:
        v = codes.float()
    if fmt.topk:
        idx = _as_tensor(indices)
        idx = (idx.to(dev, non_blocking=True) if dev is not None else idx).long()
        p = v.shape[-2]
        dense = v.new_zeros(*v.shape[:-1], p)
        v = dense.scatter_(-1, idx, v)
    if renormalise:
        total = v.sum(-1, keepdim=True)
        v = torch.where(total > 0, v / total.clamp_min(torch.finfo(torch.float32).tiny), v)
    return v.to(out_dtype)


def topk_dropped_mass(a: Tensor, k: int) -> Tensor:
    """Per row of maps (..., P, P): 1 - (sum of the K largest probabilities), in float32."""
    k = min(k, a.shape[-1])
    return 1.0 - a.float().topk(k, dim=-1).values.sum(-1)
