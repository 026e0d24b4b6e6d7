"""Probes on frozen CLIP features: V-JEPA's attentive probe and a linear probe (docs/heads.md).

**attentive_probe** follows V-JEPA's attentive pooler and classifier (facebookresearch/jepa,
``src/models/attentive_pooler.py``, ``src/models/utils/modules.py``), reading every token of the
last block, all frames concatenated (T*L tokens, CLS included, no time position, as its frame
aggregation without position embedding):

    q0 = query (1, C)                           trunc-normal(0.02) init
    a  = softmax((q0 Wq + bq)(LN1(X) Wk + bk)^T / sqrt(D)) (LN1(X) Wv + bv)   per head, heads concatenated
    q1 = q0 + a                                 no output projection after the cross attention
    q2 = q1 + fc2(GELU(fc1(LN2(q1))))           exact GELU; hidden = mlp_ratio * C
    logits = q2 W + b

Linear layers trunc-normal(0.02) with zero bias, LayerNorms 1/0, fc2's weight divided by
sqrt(2); the classifier keeps PyTorch's default Linear init (it is outside the pooler's init).

**linear** is one Linear on the clip-view's pooled per-frame embeddings: with ``linear_norm``
(default) the mean of the L2-normalised frame embeddings, normalised again (the zero-shot video
embedding), otherwise their plain mean.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from evl_cache.decoder import LayerNorm
from evl_cache.errors import UserError
from evl_cache.heads import HeadSpec, check_needs, expect, register_head


def _from_dict(cls: type, d: dict[str, Any]) -> Any:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise UserError(f"{cls.__name__} has unknown keys {unknown}; known keys are {sorted(known)}")
    return cls(**d)


def _shape_of_store(model: Any, attrs: dict[str, Any], where: str, keys: tuple[str, ...]) -> dict[str, Any]:
    from evl_cache.config import check_restated

    implied = {"width": int(attrs["width"]), "heads": int(attrs["heads"]), "frames": int(attrs["frames"]),
               "grid": [int(g) for g in attrs["grid"]], "num_classes": len(attrs["class_names"])}
    check_restated(model, implied, where)
    return {k: implied[k] for k in keys}


def check_tokens(feats: Tensor, frames: int, tokens: int, width: int, head: str) -> None:
    if feats.dim() != 5 or tuple(feats.shape[2:]) != (frames, tokens, width):
        raise UserError(f"the {head} head reads feats (B, K, {frames}, {tokens}, {width}) but got {tuple(feats.shape)}; "
                        f"the store does not match the checkpoint (frames, grid, width)")


# ------------------------------------------------------------------------------ attentive probe


@dataclass
class AttentiveProbeConfig:
    width: int
    heads: int
    frames: int
    tokens: int  # L = 1 + h*w per frame
    num_classes: int
    mlp_ratio: float = 4.0
    head: str = "attentive_probe"

    def __post_init__(self) -> None:
        if self.width % self.heads:
            raise UserError(f"bad attentive_probe config: width {self.width} is not divisible by heads {self.heads}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class QueryCrossAttention(nn.Module):
    """Queries attend a memory: separate q and fused kv projections, and no output projection."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)

    def forward(self, q: Tensor, x: Tensor) -> Tensor:
        B, n, C = q.shape
        H, D = self.heads, C // self.heads
        qh = self.q(q).view(B, n, H, D).transpose(1, 2)
        k, v = self.kv(x).view(B, x.shape[1], 2, H, D).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qh, k.to(qh.dtype), v.to(qh.dtype))
        return out.transpose(1, 2).reshape(B, n, C)


class ProbeMlp(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CrossAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = LayerNorm(width)
        self.xattn = QueryCrossAttention(width, heads)
        self.norm2 = LayerNorm(width)
        self.mlp = ProbeMlp(width, int(width * mlp_ratio))

    def forward(self, q: Tensor, x: Tensor) -> Tensor:
        q = q + self.xattn(q, self.norm1(x))  # only the memory is normalised, not the query
        return q + self.mlp(self.norm2(q))


class AttentivePooler(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float, init_std: float = 0.02) -> None:
        super().__init__()
        self.query_tokens = nn.Parameter(torch.zeros(1, 1, width))
        self.cross_attention_block = CrossAttentionBlock(width, heads, mlp_ratio)
        nn.init.trunc_normal_(self.query_tokens, std=init_std, a=-2.0, b=2.0)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=init_std, a=-2.0, b=2.0)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        with torch.no_grad():  # depth-1 rescale of the residual branch's last layer
            self.cross_attention_block.mlp.fc2.weight.div_(math.sqrt(2.0))

    def forward(self, x: Tensor) -> Tensor:
        q = x.new_zeros(x.shape[0], 1, x.shape[-1]) + self.query_tokens
        return self.cross_attention_block(q, x)


class AttentiveProbe(nn.Module):
    """V-JEPA's attentive classifier over the last block's tokens of every frame."""

    def __init__(self, cfg: AttentiveProbeConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.pooler = AttentivePooler(cfg.width, cfg.heads, cfg.mlp_ratio)
        self.linear = nn.Linear(cfg.width, cfg.num_classes)

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        cfg = self.cfg
        feats = expect(batch, "feats", cfg.head, "evaluate on a store that caches the ViT's last block")
        check_tokens(feats, cfg.frames, cfg.tokens, cfg.width, cfg.head)
        x = feats[:, -1].to(self.linear.weight.dtype).flatten(1, 2)  # (B, T*L, C)
        return self.linear(self.pooler(x)[:, 0])


class AttentiveProbeSpec(HeadSpec):
    name = "attentive_probe"

    def needs(self, cfg: Any) -> tuple[str, ...]:
        return ("last_block",)

    def config_for_store(self, model: Any, attrs: dict[str, Any], where: str) -> AttentiveProbeConfig:
        check_needs(self.name, self.needs(None), attrs, where)
        shape = _shape_of_store(model, attrs, where, ("width", "heads", "frames", "num_classes"))
        return AttentiveProbeConfig(**shape, tokens=int(attrs["tokens"]), mlp_ratio=float(model.mlp_ratio))

    def config_from_dict(self, d: dict[str, Any]) -> AttentiveProbeConfig:
        return _from_dict(AttentiveProbeConfig, d)

    def build(self, cfg: Any, fresh: bool = True) -> nn.Module:
        return AttentiveProbe(cfg)

    def backbone_outputs(self, cfg: Any, meta: dict[str, Any]) -> dict[str, Any]:
        return {"blocks": [int(meta["blocks"][-1])], "attention": "none", "emb": False}


# ------------------------------------------------------------------------------ linear probe


@dataclass
class LinearProbeConfig:
    embed_dim: int
    frames: int
    num_classes: int
    norm: bool = True
    head: str = "linear"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def pooled_embedding(emb: Tensor, norm: bool) -> Tensor:
    """(B, T, E) per-frame embeddings -> (B, E): normalised mean of normalised frames, or the plain mean."""
    if not norm:
        return emb.mean(dim=1)
    return F.normalize(F.normalize(emb, dim=-1).mean(dim=1), dim=-1)


class LinearProbe(nn.Module):
    def __init__(self, cfg: LinearProbeConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.fc = nn.Linear(cfg.embed_dim, cfg.num_classes)

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        cfg = self.cfg
        emb = expect(batch, "emb", cfg.head, "evaluate on a store with per-frame embeddings (extract --emb)")
        if emb.dim() != 3 or tuple(emb.shape[1:]) != (cfg.frames, cfg.embed_dim):
            raise UserError(f"the linear head reads emb (B, {cfg.frames}, {cfg.embed_dim}) but got {tuple(emb.shape)}; "
                            f"the store does not match the checkpoint")
        return self.fc(pooled_embedding(emb.float(), cfg.norm).to(self.fc.weight.dtype))


class LinearProbeSpec(HeadSpec):
    name = "linear"
    options = ("linear_norm",)

    def needs(self, cfg: Any) -> tuple[str, ...]:
        return ("emb",)

    def config_for_store(self, model: Any, attrs: dict[str, Any], where: str) -> LinearProbeConfig:
        check_needs(self.name, self.needs(None), attrs, where)
        shape = _shape_of_store(model, attrs, where, ("frames", "num_classes"))
        norm = True if model.linear_norm is None else bool(model.linear_norm)
        return LinearProbeConfig(embed_dim=int(attrs["embed_dim"]), norm=norm, **shape)

    def config_from_dict(self, d: dict[str, Any]) -> LinearProbeConfig:
        return _from_dict(LinearProbeConfig, d)

    def build(self, cfg: Any, fresh: bool = True) -> nn.Module:
        return LinearProbe(cfg)

    def backbone_outputs(self, cfg: Any, meta: dict[str, Any]) -> dict[str, Any]:
        return {"blocks": [], "attention": "none", "emb": True}


register_head(AttentiveProbeSpec())
register_head(LinearProbeSpec())
