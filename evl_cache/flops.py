"""Analytic cost of EVL: multiply-accumulates (the paper's "FLOPs") and parameter counts.

Counting convention (fvcore-style, reproduces the paper's per-view numbers to <0.1 %):
- one multiply-accumulate = 1; only matmul / linear / conv / einsum work is counted;
- LayerNorm, softmax, GELU, residual adds, scatter/gather are free;
- backbone: patch-embedding conv + per block (qkv, q.k^T, attn.v, out proj, MLP) up to the
  last block the decoder reads; ln_post / final projection are excluded (EVL never runs them);
- decoder per layer: depthwise temporal conv, TCA, k/v projections of the T*L memory, q/out
  projections, the query's attention matmuls, MLP; plus the head's linear.
- TCA is counted in the reference implementation's formulation ("reference"): per neighbour
  direction and frame pair, the head-split q.k^T over patches (P*P*C) plus the einsum of the (P, P)
  map with the gathered (P, P, C) weight (P*P*C). Our implementation ("binned") does the same maths
  as a (P, R) x (R, C) matmul, R = (2h-1)(2w-1) ~ 4P: ~4x the weight MACs, but no (P, P, C) tensor;
  on small grids (tca.gathers_directly, e.g. the demo's 8x8) it gathers as the reference does.
With that convention: B/16 8f = 140.51 G backbone + 10.79 G decoder, L/14 32f = 2592.4 G + 102.5 G
per view, as measured on the reference model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from evl_cache.decoder import DecoderConfig
from evl_cache.errors import UserError
from evl_cache.tca import gathers_directly

TCA_FORMULAS = ("reference", "binned")


@dataclass(frozen=True)
class ViTDims:
    """The few numbers of a CLIP ViT image tower that its cost depends on."""

    image_size: int
    patch_size: int
    width: int
    layers: int
    heads: int
    mlp_ratio: float = 4.0
    embed_dim: int = 0  # output projection width (params only)

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def tokens(self) -> int:
        return 1 + self.grid**2


def vit_dims(arch: str, image_size: int | None = None) -> ViTDims:
    """Dims from an open_clip model name (offline, bundled config) or a model-config JSON path."""
    if arch.endswith(".json") or Path(arch).is_file():
        try:
            cfg = json.loads(Path(arch).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise UserError(f"cannot read model config {arch}: {err}; pass an open_clip model-config JSON") from err
    else:
        import open_clip

        cfg = open_clip.get_model_config(arch)
        if cfg is None:
            raise UserError(
                f"unknown architecture {arch!r}; use an open_clip name such as ViT-B-16, ViT-L-14, "
                f"ViT-L-14-336 or a path to a model-config JSON"
            )
    v = cfg.get("vision_cfg", {})
    if isinstance(v.get("layers"), (list, tuple)) or "patch_size" not in v:
        raise UserError(f"architecture {arch!r} is not a plain ViT image tower; EVL needs a CLIP ViT")
    size = image_size or v.get("image_size", 224)
    size = size[0] if isinstance(size, (list, tuple)) else size
    width = v["width"]
    return ViTDims(
        image_size=int(size),
        patch_size=int(v["patch_size"]),
        width=int(width),
        layers=int(v["layers"]),
        heads=int(width // v.get("head_width", 64)),
        mlp_ratio=float(v.get("mlp_ratio", 4.0)),
        embed_dim=int(cfg.get("embed_dim", 0)),
    )


def backbone_macs(dims: ViTDims, frames: int, last_block: int | None = None) -> dict[str, int]:
    """MACs of the frozen tower for `frames` frames, blocks 0..last_block (default: the last)."""
    n_blocks = dims.layers if last_block is None else last_block + 1
    C, L, P = dims.width, dims.tokens, dims.grid**2
    hidden = int(C * dims.mlp_ratio)
    per_block = {
        "qkv": L * C * 3 * C,
        "attention": 2 * L * L * C,  # q.k^T and attn.v over all heads
        "out_proj": L * C * C,
        "mlp": 2 * L * C * hidden,
    }
    parts = {"patch_embed": P * C * 3 * dims.patch_size**2}
    parts.update({k: v * n_blocks for k, v in per_block.items()})
    return {k: v * frames for k, v in parts.items()}


def decoder_macs(cfg: DecoderConfig, tca_formula: str = "reference", tca_qk: bool = True) -> dict[str, int]:
    """MACs of decoder + head for one view. `tca_qk`: count the q.k^T that builds the TCA maps
    (the reference computes it in the decoder; with cached "maps" it happens at extraction)."""
    if tca_formula not in TCA_FORMULAS:
        raise UserError(f"unknown TCA formula {tca_formula!r}; use one of {TCA_FORMULAS}")
    K, T, C, L, P = cfg.num_layers, cfg.frames, cfg.width, cfg.num_tokens, cfg.num_patches
    h, w = cfg.grid
    R = (2 * h - 1) * (2 * w - 1)
    if cfg.pool != "none":  # Table 6c: the layers see pooled tokens (TCA is off with pooling)
        T, (ph, pw) = cfg.layer_frames, cfg.layer_grid
        L = 1 + ph * pw
    hidden = round(C * cfg.mlp_ratio)
    parts = {
        "tconv": T * L * C * 3 if cfg.temporal_conv else 0,
        "tca": 0,
        "kv_proj": 2 * T * L * C * C,
        "q_out_proj": 2 * C * C,
        "attention": 2 * T * L * C,
        "mlp": 2 * C * hidden,
    }
    if cfg.temporal_cross_attention:
        # "binned" counts what TemporalCrossAttention executes: binning, or the gather on small grids
        direct = tca_formula == "reference" or gathers_directly(cfg.grid, C)
        weight = P * P * C if direct else P * R * C
        qk = P * P * C if tca_qk else 0
        parts["tca"] = 2 * (T - 1) * (weight + qk)
    parts = {k: v * K for k, v in parts.items()}
    parts["head"] = C * cfg.num_classes
    return parts


def backbone_params(dims: ViTDims) -> int:
    """Parameters of the whole open_clip visual tower (frozen), ln_post and projection included."""
    C, hidden = dims.width, int(dims.width * dims.mlp_ratio)
    block = 4 * C + (3 * C * C + 3 * C) + (C * C + C) + (C * hidden + hidden) + (hidden * C + C)
    stem = C + dims.tokens * C + 3 * dims.patch_size**2 * C + 2 * C
    return stem + dims.layers * block + 2 * C + C * dims.embed_dim


def decoder_params(cfg: DecoderConfig) -> int:
    """Trainable parameters (decoder + head), counted on a meta-device model (allocates nothing)."""
    import torch

    from evl_cache.decoder import EVLDecoder, count_parameters

    with torch.device("meta"):
        return count_parameters(EVLDecoder(cfg))


def decoder_config_for(dims: ViTDims, frames: int, layers: int = 4, classes: int = 400) -> DecoderConfig:
    return DecoderConfig(
        num_layers=layers, width=dims.width, heads=dims.width // 64, frames=frames,
        grid=(dims.grid, dims.grid), num_classes=classes,
    )


@dataclass
class CostReport:
    arch: str
    image_size: int
    frames: int
    views: int
    backbone_gmacs_per_view: float
    decoder_gmacs_per_view: float
    trainable_params: int
    frozen_params: int

    @property
    def total_gmacs(self) -> float:
        return (self.backbone_gmacs_per_view + self.decoder_gmacs_per_view) * self.views


def model_cost(
    arch: str, frames: int, views: int = 3, decoder_layers: int = 4, classes: int = 400,
    image_size: int | None = None, tca_formula: str = "reference",
) -> CostReport:
    """Per-view and total GMACs plus parameter counts of one EVL model; builds nothing heavy."""
    if frames < 2 or views < 1 or decoder_layers < 1:
        raise UserError(f"need frames >= 2, views >= 1, decoder layers >= 1 (got {frames}, {views}, {decoder_layers})")
    dims = vit_dims(arch, image_size)
    if decoder_layers > dims.layers:
        raise UserError(f"{arch} has {dims.layers} blocks, cannot feed {decoder_layers} decoder layers")
    cfg = decoder_config_for(dims, frames, decoder_layers, classes)
    return CostReport(
        arch=arch, image_size=dims.image_size, frames=frames, views=views,
        backbone_gmacs_per_view=sum(backbone_macs(dims, frames).values()) / 1e9,
        decoder_gmacs_per_view=sum(decoder_macs(cfg, tca_formula).values()) / 1e9,
        trainable_params=decoder_params(cfg), frozen_params=backbone_params(dims),
    )


# Table 1 of the paper (Kinetics-400, 3 views): (label, arch, frames, paper GFLOPs, paper top-1).
TABLE1 = [
    ("B/16", "ViT-B-16", 8, 444, 82.9),
    ("B/16", "ViT-B-16", 16, 888, 83.6),
    ("B/16", "ViT-B-16", 32, 1777, 84.2),
    ("L/14", "ViT-L-14", 8, 2022, 86.3),
    ("L/14", "ViT-L-14", 16, 4044, 87.0),
    ("L/14", "ViT-L-14", 32, 8088, 87.3),
    ("L/14@336", "ViT-L-14-336", 32, 18196, 87.7),
]


def table1(tca_formula: str = "reference") -> list[dict]:
    """Every Table 1 row: the paper's GFLOPs beside our count of the same model (3 views, 400 classes).

    Also counts the model without TCA, because the paper's B/16 rows equal that count (their own
    reference model, with TCA, measures 10.8 G of decoder per view, not 7.5 G).
    """
    rows = []
    for label, arch, frames, paper, top1 in TABLE1:
        r = model_cost(arch, frames, views=3, tca_formula=tca_formula)
        dims = vit_dims(arch)
        no_tca = replace(decoder_config_for(dims, frames), temporal_cross_attention=False, attention_input="none")
        no_tca_total = 3 * (r.backbone_gmacs_per_view + sum(decoder_macs(no_tca).values()) / 1e9)
        diff, diff_no_tca = (100 * (x - paper) / paper for x in (r.total_gmacs, no_tca_total))
        if abs(diff) <= 0.5:
            note = "full model"
        elif abs(diff_no_tca) <= 0.5:
            note = "no-TCA model"
        else:
            note = "neither"
        rows.append({
            "model": label, "frames": frames, "views": 3, "top1": top1, "paper_gflops": paper,
            "backbone_per_view": r.backbone_gmacs_per_view, "decoder_per_view": r.decoder_gmacs_per_view,
            "ours_gflops": r.total_gmacs, "diff_pct": diff, "ours_no_tca_gflops": no_tca_total,
            "diff_no_tca_pct": diff_no_tca, "note": note, "trainable_params": r.trainable_params,
        })
    return rows
