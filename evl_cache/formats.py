"""What a store holds, array by array, and how its stored bytes become the decoder's float inputs.

A store declares its formats in its attributes: ``dtype`` (the features' `FeatureFormat`: float16,
float32, int8:<scales>, float8_e4m3:<scales>) and ``attn_format`` (the maps' `MapFormat`: float16,
uint8, topK[:uint8]). `StoreFormats` turns those into the list of stored arrays (codes, scales,
top-k indices), encodes the backbone's float outputs on the extraction worker, and decodes a batch
of stored arrays on the device where the batch lands, so it crosses PCIe at its stored size.
Formats: docs/cache-format.md; their measured errors: benchmarks/bench_quant.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from evl_cache.quant import (
    FeatureFormat,
    MapFormat,
    QuantizedMaps,
    decode_features,
    decode_maps,
    encode_features,
    encode_maps,
    index_dtype,
)

SCALE_DTYPE = np.float16


@dataclass(frozen=True)
class ArraySpec:
    """One stored array: per-(video, view) chunk shape, numpy dtype, and the fill value that marks
    an absent chunk (rows at the fill value are not written)."""

    shape: tuple[int, ...]
    dtype: np.dtype
    fill: Any


def _fill(dtype: np.dtype) -> Any:
    return float("nan") if np.issubdtype(dtype, np.floating) else 0


class StoreFormats:
    """The stored arrays of a store and the encode/decode between them and the decoder's inputs."""

    def __init__(self, attrs: dict[str, Any], store_path: str | None = None) -> None:
        self.attrs, self.store_path = attrs, store_path
        self.layout = attrs.get("layout", "full")
        self._tails: dict[str, Any] = {}
        self.features = FeatureFormat.parse(feature_format(attrs["dtype"]))
        self.maps = MapFormat.parse(attrs.get("attn_format", "float16"))
        t, length, c = attrs["frames"], attrs["tokens"], attrs["width"]
        self.k, self.p, self.heads = len(attrs["blocks"]), length - 1, attrs["heads"]
        self.feats_shape = (self.k, t, length, c)
        self.maps_shape = (self.k, 2, max(t - 1, 0), self.p, self.p)
        self.qk_shape = (self.k, 2, t, length, self.heads, c // self.heads)
        self.attention = attrs["attention"]
        # optional per-frame CLIP embeddings ln_post(CLS) @ proj, (T, E) float16, beside any layout
        self.emb = bool(attrs.get("emb"))
        self.emb_shape = (t, int(attrs["embed_dim"])) if self.emb else None
        # float32 stores keep float32 maps (float16 is the maps' default only beside float16 features)
        self.maps_dtype = np.dtype(np.float32 if self.features.dtype == "float32" and self.maps.name == "float16"
                                   else np.float16)
        if self.maps.values != "float16" or self.maps.topk:
            if self.attention != "maps":
                from evl_cache.errors import UserError

                raise UserError(f"--attn-dtype/--attn-topk apply to attention maps; this store has attention '{self.attention}'")

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_tails": {}}  # a tail built on one device stays there

    # -- what is stored ---------------------------------------------------------------------------
    def parts(self) -> dict[str, list[ArraySpec | tuple[str, ArraySpec]]]:
        """Every stored array and the named parts packed into it: codes first, then their scales and
        top-k indices. One array per tensor kind keeps a store's file count at ~1 per shard per kind."""
        code = _np_dtype(self.features.code_dtype)
        half = np.dtype(SCALE_DTYPE)

        def features(name: str, shape: tuple[int, ...]) -> list:
            scales = self.features.scale_shapes(shape)
            return [(name, ArraySpec(shape, code, _fill(code)))] + [
                (f"{name}_scale_{k}", ArraySpec(v, half, float("nan"))) for k, v in scales.items()]

        emb = {"emb": [("emb", ArraySpec(self.emb_shape, np.dtype(np.float16), float("nan")))]} if self.emb else {}
        if self.layout == "prefix":  # the residual stream entering the first captured block
            return {"prefix": features("prefix", self.feats_shape[1:]), **emb}
        out = {"feats": features("feats", self.feats_shape)} if self.k else {}  # k = 0: an emb-only store
        if self.k and self.attention == "maps":
            kept = self.maps.kept(self.p)
            values = self.maps_dtype if self.maps.values == "float16" else np.dtype(np.uint8)
            attn = [("attn", ArraySpec((*self.maps_shape[:-1], kept), values, _fill(values)))]
            if self.maps.topk:
                attn.append(("attn_index", ArraySpec((*self.maps_shape[:-1], kept), index_dtype(self.p), 0)))
            if self.maps.values == "uint8" and self.maps.scaling != "fixed":
                attn.append(("attn_scale_row", ArraySpec(self.maps_shape[:-1], half, float("nan"))))
            out["attn"] = attn
        elif self.k and self.attention == "qk":
            qk = np.dtype(np.float32 if self.features.dtype == "float32" else np.float16)
            out["qk"] = [("qk", ArraySpec(self.qk_shape, qk, float("nan")))]
        return {**out, **emb}

    def arrays(self) -> dict[str, ArraySpec]:
        """The stored arrays' chunk specs: a single part as itself; several parts packed as uint8
        bytes, each part padded to 8 bytes so it can be viewed in place after the move to a device."""
        out = {}
        for name, parts in self.parts().items():
            if len(parts) == 1:
                out[name] = parts[0][1]
            else:
                out[name] = ArraySpec((sum(_padded(spec) for _, spec in parts),), np.dtype(np.uint8), 0)
        return out

    def arrays_for(self, needs: Any) -> list[str]:
        """The stored arrays a reader fetches for these cached tensor kinds (`evl_cache.heads.NEEDS`
        keys): a model that reads no attention (TCA off, the linear or X-CLIP heads) never pays for
        the maps, and the linear head on a full store reads only ``emb`` (T x E, 8 KiB per clip-view
        at B/16 8f), not the blocks."""
        wanted: set[str] = set()
        for need in needs:
            if need in ("blocks", "last_block"):
                wanted |= {"feats", "prefix"}
            elif need == "attention":
                wanted |= {"attn", "qk", "prefix"}  # the prefix layout recomputes them from the stream
            elif need == "emb":
                wanted.add("emb")
            else:
                raise ValueError(f"unknown cached tensor kind {need!r}")
        return [name for name in self.arrays() if name in wanted]

    def pack(self, parts: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Encoded parts, each (n, *part shape) -> stored arrays, each (n, *chunk shape)."""
        out = {}
        for name, layout in self.parts().items():
            if len(layout) == 1:
                out[name] = parts[layout[0][0]]
                continue
            n = parts[layout[0][0]].shape[0]
            pieces = []
            for part, spec in layout:
                raw = np.ascontiguousarray(parts[part], dtype=spec.dtype).reshape(n, -1).view(np.uint8)
                pieces.append(np.pad(raw, ((0, 0), (0, _padded(spec) - raw.shape[1]))))
            out[name] = np.concatenate(pieces, axis=1)
        return out

    def unpack(self, batch: dict[str, torch.Tensor], device: torch.device | None = None) -> dict[str, torch.Tensor]:
        """Stored arrays of a batch -> named parts (views into the moved bytes, no copy); other
        entries pass through."""
        layouts = self.parts()
        out: dict[str, torch.Tensor] = {}
        for key, value in batch.items():
            layout = layouts.get(key)
            if layout is None or len(layout) == 1:
                out[key] = value
                continue
            raw = value.to(device, non_blocking=True) if device is not None else value
            offset = 0
            for part, spec in layout:
                nbytes = int(np.prod(spec.shape)) * spec.dtype.itemsize
                piece = raw[:, offset:offset + nbytes].view(torch_dtype(spec.dtype))
                out[part] = piece.reshape(raw.shape[0], *spec.shape)
                offset += _padded(spec)
        return out

    def bytes_per_view(self) -> int:
        return sum(int(np.prod(s.shape)) * s.dtype.itemsize for s in self.arrays().values())

    # -- worker side: float outputs -> stored arrays ---------------------------------------------------
    def encode(self, outputs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        """The backbone's outputs for n clip-views -> stored arrays (parts encoded, then packed)."""
        return self.pack(self.encode_parts(outputs))

    def encode_parts(self, outputs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        """The backbone's outputs for n clip-views (``feats`` (n, K, T, L, C), ``attn`` (n, K, 2, T-1, P, P)
        or ``q``/``k``) -> stored arrays, each (n, *chunk shape)."""
        out: dict[str, np.ndarray] = {}
        if self.emb:
            out["emb"] = outputs["emb"].to(torch.float16).cpu().numpy()
        if self.layout == "prefix":
            qp = encode_features(outputs["prefix"], self.features)
            out["prefix"] = qp.codes.cpu().numpy()
            out.update({f"prefix_scale_{k}": v.cpu().numpy() for k, v in qp.scales.items()})
            return out
        if not self.k:
            return out
        qf = encode_features(outputs["feats"], self.features)
        out["feats"] = qf.codes.cpu().numpy()
        for name, scale in qf.scales.items():
            out[f"feats_scale_{name}"] = scale.cpu().numpy()
        if "attn" in outputs and self.maps_dtype == np.float32:
            out["attn"] = outputs["attn"].float().cpu().numpy()
        elif "attn" in outputs:
            qm = encode_maps(outputs["attn"], self.maps)
            out["attn"] = qm.codes.cpu().numpy()
            if qm.indices is not None:
                out["attn_index"] = qm.indices.cpu().numpy()
            if "row" in qm.scales:
                out["attn_scale_row"] = qm.scales["row"].cpu().numpy()
        if "q" in outputs:
            dtype = torch.float32 if self.features.dtype == "float32" else torch.float16
            out["qk"] = torch.stack([outputs["q"], outputs["k"]], dim=2).to(dtype).cpu().numpy()
        return out

    # -- reader side: stored arrays -> decoder inputs ---------------------------------------------------
    def decode(self, batch: dict[str, torch.Tensor], device: torch.device | str = "cpu",
               out_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """A batch of stored arrays (each (B, *chunk shape)) -> ``feats``, ``attn`` | ``q``/``k`` on
        ``device`` (plus the batch's other entries, moved). Float formats keep their dtype unless
        ``out_dtype`` is given; quantized ones decode to ``out_dtype`` or float16."""
        device = torch.device(device)
        quant_dtype = out_dtype or torch.float16
        batch = self.unpack(batch, device)
        if self.layout == "prefix":
            return self._decode_prefix(batch, device, quant_dtype)
        scales = {k.removeprefix("feats_scale_"): v for k, v in batch.items() if k.startswith("feats_scale_")}
        out: dict[str, torch.Tensor] = {}
        if "feats" in batch:
            feats = decode_features(batch["feats"], scales, self.features, quant_dtype, device) if self.features.quantized \
                else batch["feats"].to(device, non_blocking=True)
            out["feats"] = feats if out_dtype is None else feats.to(out_dtype)
        if "attn" in batch:
            if self.maps.values == "float16" and not self.maps.topk:
                attn = batch["attn"].to(device, non_blocking=True)
                out["attn"] = attn if out_dtype is None else attn.to(out_dtype)
            else:
                enc = QuantizedMaps(batch["attn"], batch.get("attn_index"),
                                    {"row": batch["attn_scale_row"]} if "attn_scale_row" in batch else {})
                out["attn"] = decode_maps(enc, self.maps, quant_dtype, device)
        if "qk" in batch:
            qk = batch["qk"].to(device, non_blocking=True)
            if out_dtype is not None:
                qk = qk.to(out_dtype)
            out["q"], out["k"] = qk.select(-5, 0), qk.select(-5, 1)
        stored = {part for layout in self.parts().values() for part, _ in layout} - {"emb"}  # emb passes through
        for key, value in batch.items():
            if key not in stored:
                out[key] = value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
        return out


    def _decode_prefix(self, batch: dict[str, torch.Tensor], device: torch.device, out_dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Decode the cached stream and recompute the tail blocks on ``device``: the same feats and
        attention a full store holds (float16 unless ``out_dtype``)."""
        from evl_cache.prefix import load_tail

        out: dict[str, torch.Tensor] = {}
        if "prefix" in batch:  # absent when the model reads only emb (`StoreDataset` needs)
            if str(device) not in self._tails:
                if self.store_path is None:
                    raise ValueError("a prefix-layout batch needs its store path to load the tail weights")
                self._tails[str(device)] = load_tail(self.store_path, self.attrs, device)
            tail = self._tails[str(device)]
            scales = {k.removeprefix("prefix_scale_"): v for k, v in batch.items() if k.startswith("prefix_scale_")}
            stream = decode_features(batch["prefix"], scales, self.features, tail.dtype, device)
            out = {k: v.to(out_dtype) for k, v in tail.forward_from(stream).items()}
        stored = {part for layout in self.parts().values() for part, _ in layout} - {"emb"}  # emb passes through
        for key, value in batch.items():
            if key not in stored:
                out[key] = value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
        return out


def _padded(spec: ArraySpec) -> int:
    """Bytes of a packed part, rounded up to 8 so the next part starts aligned for any dtype."""
    return -(-int(np.prod(spec.shape)) * spec.dtype.itemsize // 8) * 8


def feature_format(text: str) -> str:
    """The canonical name of a feature format; bare ``int8`` / ``float8_e4m3`` take per-channel x
    per-token scales (``channel_token``), the variant that survives CLIP's outlier channels and
    high-norm tokens (benchmarks/bench_quant.py)."""
    if text in ("int8", "float8_e4m3"):
        text += ":channel_token"
    return FeatureFormat.parse(text).name


def map_format(values: str = "float16", topk: int = 0) -> str:
    """The canonical name of an attention-map format from ``--attn-dtype`` and ``--attn-topk``."""
    fmt = MapFormat.parse(values)
    return MapFormat(fmt.values, int(topk or fmt.topk), fmt.scaling).name


def torch_dtype(dtype: np.dtype) -> torch.dtype:
    return torch.from_numpy(np.empty(0, dtype=dtype)).dtype


def _np_dtype(dtype: torch.dtype) -> np.dtype:
    return np.dtype({torch.float16: np.float16, torch.float32: np.float32, torch.int8: np.int8,
                     torch.uint8: np.uint8}[dtype])
