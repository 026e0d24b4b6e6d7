"""The EVL decoder and classification head, built from a `DecoderConfig`.

A zero-initialised query token cross-attends, layer by layer, to the outputs of the last K frozen
backbone blocks, each enriched by the three temporal modules (depthwise temporal conv, temporal
position embedding, temporal cross attention). Numerics, widths and inits follow the reference
implementation (docs/reference.md, "Decoder").

The input is one batch dict, the contract shared with the cache reader and the online predict path:
  "feats": (B, K, T, L, C) block outputs, CLS token at index 0; decoder layer i reads
           feats[:, layer_blocks[i]] (by default layer i of K reads block i).
  "attn":  (B, K, 2, T-1, P, P) head-averaged neighbour-frame maps   (attention_input == "maps")
  "q","k": (B, K, T, L, H, D) raw attention projections             (attention_input == "qk")
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from evl_cache.errors import UserError
from evl_cache.tca import TemporalCrossAttention, compute_dtype, temporal_attention_maps

ATTENTION_INPUTS = ("maps", "qk", "none")
# Feature pooling before the decoder (the paper's Table 6c): average adjacent frame pairs, or 2x2 patches.
POOLS = ("none", "temporal", "spatial")


@dataclass
class DecoderConfig:
    """Shape and switches of one EVL decoder; JSON round-trips through to_dict/from_dict."""

    num_layers: int = 4
    width: int = 768
    heads: int = 12
    frames: int = 8
    grid: tuple[int, int] = (14, 14)
    num_classes: int = 400
    mlp_ratio: float = 4.0
    mlp_dropout: float = 0.5
    head_dropout: float = 0.5
    temporal_conv: bool = True
    temporal_pos: bool = True
    temporal_cross_attention: bool = True
    attention_input: str = "maps"
    # Table 6 ablations, all read from one cache of K blocks (docs/decoder.md, "Table 6 options"):
    cached_blocks: int | None = None  # K, the blocks a batch carries (default num_layers)
    layer_blocks: tuple[int, ...] | None = None  # the cached block each layer reads (default the last num_layers)
    pool: str = "none"  # one of POOLS: the decoder sees T/2 frames or an (h/2, w/2) grid

    def __post_init__(self) -> None:
        self.grid = (int(self.grid[0]), int(self.grid[1]))
        if self.cached_blocks is None:
            self.cached_blocks = int(self.num_layers)
        if self.layer_blocks is None:
            self.layer_blocks = tuple(range(int(self.cached_blocks) - int(self.num_layers), int(self.cached_blocks)))
        self.layer_blocks = tuple(int(b) for b in self.layer_blocks)
        problems = []
        for name in ("num_layers", "width", "heads", "frames", "num_classes"):
            if int(getattr(self, name)) < 1:
                problems.append(f"{name}={getattr(self, name)} must be >= 1")
        if min(self.grid) < 1:
            problems.append(f"grid={self.grid} must be positive")
        if self.heads >= 1 and self.width % self.heads:
            problems.append(f"width {self.width} is not divisible by heads {self.heads}")
        if self.attention_input not in ATTENTION_INPUTS:
            problems.append(f"attention_input={self.attention_input!r} is not one of {ATTENTION_INPUTS}")
        if self.temporal_cross_attention and self.attention_input == "none":
            problems.append("temporal_cross_attention needs attention_input 'maps' or 'qk', not 'none'")
        if self.temporal_cross_attention and self.frames < 2:
            problems.append("temporal_cross_attention needs frames >= 2")
        if len(self.layer_blocks) != self.num_layers or any(not 0 <= b < self.cached_blocks for b in self.layer_blocks):
            problems.append(f"layer_blocks={list(self.layer_blocks)} must name one of the {self.cached_blocks} cached "
                            f"blocks (0..{self.cached_blocks - 1}) for each of the {self.num_layers} layers")
        if self.pool not in POOLS:
            problems.append(f"pool={self.pool!r} is not one of {POOLS}")
        elif self.pool != "none" and self.temporal_cross_attention:
            problems.append(f"pool={self.pool!r} with temporal_cross_attention: the cached maps are between full-resolution "
                            "frames and patches; set temporal_cross_attention=false")
        if self.pool == "temporal" and self.frames % 2:
            problems.append(f"pool 'temporal' needs an even frame count, not {self.frames}")
        if self.pool == "spatial" and (self.grid[0] % 2 or self.grid[1] % 2):
            problems.append(f"pool 'spatial' needs an even grid, not {list(self.grid)}")
        if problems:
            raise UserError("bad decoder config: " + "; ".join(problems) + "; fix the config values")

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def num_tokens(self) -> int:
        return 1 + self.num_patches

    @property
    def layer_frames(self) -> int:
        """Frames the decoder layers see (after temporal pooling)."""
        return self.frames // 2 if self.pool == "temporal" else self.frames

    @property
    def layer_grid(self) -> tuple[int, int]:
        """The patch grid the decoder layers see (after spatial pooling)."""
        return (self.grid[0] // 2, self.grid[1] // 2) if self.pool == "spatial" else self.grid

    def to_dict(self) -> dict:
        d = asdict(self)
        d["grid"] = list(self.grid)
        d["layer_blocks"] = list(self.layer_blocks)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "DecoderConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(f"decoder config has unknown keys {unknown}; known keys are {sorted(known)}")
        return cls(**d)


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 and cast back, so fp16/bf16 weights or autocast stay stable."""

    def forward(self, x: Tensor) -> Tensor:
        dt = compute_dtype(x)
        w = self.weight.to(dt) if self.weight is not None else None
        b = self.bias.to(dt) if self.bias is not None else None
        return F.layer_norm(x.to(dt), self.normalized_shape, w, b, self.eps).to(x.dtype)


class QuickGELU(nn.Module):
    """CLIP's GELU approximation x * sigmoid(1.702 x)."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


class CrossAttention(nn.Module):
    """Multi-head attention from a few query tokens to a memory; separate q/k/v/out projections."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)
        for lin in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)
        # `evl-cache explain` turns this on to keep the softmax weights it already computed (a read:
        # the forward's numerics do not change); off by default, and never part of the state dict.
        self.keep_attention = False
        self.attention: Tensor | None = None  # (B, H, Nq, memory tokens) of the last forward, when kept

    def forward(self, x: Tensor, mem: Tensor) -> Tensor:
        B, Nq, C = x.shape
        H, D = self.heads, C // self.heads
        q = self.q_proj(x).view(B, Nq, H, D).transpose(1, 2)
        k = self.k_proj(mem).view(B, -1, H, D).transpose(1, 2)
        v = self.v_proj(mem).view(B, -1, H, D).transpose(1, 2)
        attn = ((q @ k.transpose(-2, -1)) / math.sqrt(D)).softmax(dim=-1)
        if self.keep_attention:
            self.attention = attn.detach()
        return self.out_proj((attn @ v).transpose(1, 2).reshape(B, Nq, C))


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = QuickGELU()
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, width)
        for lin in (self.fc1, self.fc2):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.normal_(lin.bias, std=1e-6)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.drop(self.act(self.fc1(x))))


class DecoderLayer(nn.Module):
    """Temporal modules on one block's tokens, then one cross-attention + MLP step of the query."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        C = cfg.width
        # Switched-off modules are absent (not zeroed), so their parameters do not exist.
        self.tconv = nn.Conv1d(C, C, kernel_size=3, padding=1, groups=C) if cfg.temporal_conv else None
        self.tpos = nn.Parameter(torch.zeros(cfg.layer_frames, C)) if cfg.temporal_pos else None
        self.tca = TemporalCrossAttention(cfg.grid, C) if cfg.temporal_cross_attention else None  # never pooled
        self.attn = CrossAttention(C, cfg.heads)
        self.mlp = Mlp(C, round(C * cfg.mlp_ratio), cfg.mlp_dropout)
        self.norm1 = LayerNorm(C)
        self.norm2 = LayerNorm(C)
        self.norm3 = LayerNorm(C)

    def memory(self, feats: Tensor, maps: Tensor | None) -> Tensor:
        """Y = X + Tconv(X) + Tpos + TCA, flattened over frames: (B, T, L, C) -> (B, T*L, C)."""
        B, T, L, C = feats.shape
        y = feats
        if self.tconv is not None:
            seq = feats.permute(0, 2, 3, 1).reshape(B * L, C, T)
            y = y + self.tconv(seq).view(B, L, C, T).permute(0, 3, 1, 2)
        if self.tpos is not None:
            y = y + self.tpos[None, :, None, :]
        if self.tca is not None:
            y = y + self.tca(maps)
        return y.reshape(B, T * L, C)

    def forward(self, x: Tensor, feats: Tensor, maps: Tensor | None) -> Tensor:
        mem = self.norm3(self.memory(feats, maps))
        x = x + self.attn(self.norm1(x), mem)
        return x + self.mlp(self.norm2(x))


class Head(nn.Module):
    def __init__(self, width: int, num_classes: int, dropout: float) -> None:
        super().__init__()
        self.norm = LayerNorm(width)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.drop(self.norm(x)))


class EVLDecoder(nn.Module):
    """EVL decoder + classification head: batch dict (see module doc) -> logits (B, num_classes)."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.query = nn.Parameter(torch.zeros(cfg.width))  # zero init, as the reference runs
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg.width, cfg.num_classes, cfg.head_dropout)

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        self.check_batch(batch)
        dtype = self.query.dtype
        feats = batch["feats"].to(dtype)
        B = feats.shape[0]
        # an op, not a view of the parameter: views of leaves confuse torch's module/flop trackers
        x = feats.new_zeros(B, 1, self.cfg.width) + self.query
        for i, layer in enumerate(self.layers):
            b = self.cfg.layer_blocks[i]
            x = layer(x, self._pool(feats[:, b]), self._maps(batch, b))
        return self.head(x[:, 0])

    def _pool(self, f: Tensor) -> Tensor:
        """(B, T, L, C) -> the decoder's view of one block: frame pairs or 2x2 patches averaged (CLS
        tokens averaged over the frame pair, kept per frame under spatial pooling)."""
        pool = self.cfg.pool
        if pool == "none":
            return f
        B, T, L, C = f.shape
        if pool == "temporal":
            return f.view(B, T // 2, 2, L, C).mean(2)
        h, w = self.cfg.grid
        patches = f[:, :, 1:].reshape(B, T, h // 2, 2, w // 2, 2, C).mean((3, 5)).reshape(B, T, -1, C)
        return torch.cat([f[:, :, :1], patches], dim=2)

    def _maps(self, batch: dict[str, Tensor], b: int) -> Tensor | None:
        if not self.cfg.temporal_cross_attention:
            return None
        if self.cfg.attention_input == "maps":
            return batch["attn"][:, b]
        return temporal_attention_maps(batch["q"][:, b], batch["k"][:, b])

    def check_batch(self, batch: dict[str, Tensor]) -> None:
        """Fail with one clear line when a batch does not match this decoder (wrong store/config)."""
        cfg = self.cfg
        K, T, L, C, P = cfg.cached_blocks, cfg.frames, cfg.num_tokens, cfg.width, cfg.num_patches
        _expect(batch, "feats", (K, T, L, C), "(B, K, T, L, C)")
        if cfg.temporal_cross_attention and cfg.attention_input == "maps":
            _expect(batch, "attn", (K, 2, T - 1, P, P), "(B, K, 2, T-1, P, P)")
        if cfg.temporal_cross_attention and cfg.attention_input == "qk":
            for key in ("q", "k"):
                _expect(batch, key, (K, T, L), "(B, K, T, L, H, D)", ndim=6)


def _expect(batch: dict, key: str, tail: tuple, layout: str, ndim: int | None = None) -> None:
    if key not in batch:
        raise UserError(
            f"decoder batch has no {key!r} (keys: {sorted(batch)}); the cache/attention mode does not "
            f"match the decoder config, rebuild the cache or change attention_input"
        )
    shape = tuple(batch[key].shape)
    ndim = ndim or 1 + len(tail)
    if len(shape) != ndim or shape[1 : 1 + len(tail)] != tail:
        raise UserError(
            f"decoder batch {key!r} has shape {shape}, expected {layout} with trailing {tail}; "
            f"the cache does not match the decoder config (layers, frames, grid, width)"
        )


def count_parameters(model: nn.Module, trainable: bool = True) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)
