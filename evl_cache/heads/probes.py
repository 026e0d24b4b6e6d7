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
embedding), otherwise their plain mean. With ``linear_init: text`` its weights start as CLIP's
zero-shot classifier (CLIP's "zero-shot initialised" linear probe): row c is ``s * t_c``, t_c the
unit prompt-ensemble text embedding of class c (`evl_cache.text`) and s CLIP's ``exp(logit_scale)``,
the bias 0. Its step-0 logits are then exactly `evl-cache zeroshot`'s, ``s * cos(video, t_c)``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
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


LINEAR_INITS = ("default", "text")


@dataclass
class LinearProbeConfig:
    embed_dim: int
    frames: int
    num_classes: int
    norm: bool = True
    init: str = "default"  # "default": PyTorch's Linear init; "text": CLIP's zero-shot classifier
    # with init "text": the store's class names, the templates and where the text tower's weights are
    class_names: list[str] = field(default_factory=list)
    templates: list[str] = field(default_factory=list)
    template_set: str = ""
    text: dict[str, Any] = field(default_factory=dict)  # arch, weights, weights_id, seed, quick_gelu
    head: str = "linear"

    def __post_init__(self) -> None:
        if self.init not in LINEAR_INITS:
            raise UserError(f"model.linear_init={self.init!r} must be one of {LINEAR_INITS}")
        if self.init == "text" and len(self.class_names) != self.num_classes:
            raise UserError(f"bad linear config: {len(self.class_names)} class names for {self.num_classes} classes")

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

    @torch.no_grad()
    def init_from_text(self, text_emb: Tensor, logit_scale: float) -> None:
        """CLIP's zero-shot classifier as the starting weights: ``logit_scale`` x unit class embeddings, bias 0."""
        if tuple(text_emb.shape) != tuple(self.fc.weight.shape):
            raise UserError(f"class text embeddings have shape {tuple(text_emb.shape)}, the linear head needs "
                            f"{tuple(self.fc.weight.shape)}; use the text tower of the store's CLIP weights")
        self.fc.weight.copy_(float(logit_scale) * F.normalize(text_emb.float(), dim=-1))
        self.fc.bias.zero_()


def text_spec_for_store(model: Any, attrs: dict[str, Any], where: str, default_templates: str) -> tuple[str, list[str], dict[str, Any]]:
    """(template set name, templates, text-tower source) for a head whose text side comes from the
    store's CLIP weights (or ``model.text_weights``, checked to have the store's identity)."""
    from evl_cache.templates import resolve_templates
    from evl_cache.zeroshot import spec_like_store

    try:
        name, templates = resolve_templates(model.text_templates or default_templates)
        spec = spec_like_store(attrs, where, weights=model.text_weights)
    except UserError as err:
        msg = str(err).replace("--weights", "model.text_weights").replace("--arch", "the store's arch")
        raise UserError(msg.replace("--templates", "model.text_templates")) from None
    text = {"arch": spec.arch, "weights": spec.weights, "weights_id": str(attrs["backbone"].get("weights_id", "")),
            "seed": spec.seed, "quick_gelu": spec.quick_gelu}
    return name, list(templates), text


def prompt_names(model: Any, attrs: dict[str, Any], where: str) -> list[str]:
    """The names the text tower is prompted with: ``model.class_prompts`` (one per class, label order) or
    the store's class names. Folder names such as "ApplyEyeMakeup" or "static_circle" read badly to CLIP."""
    from evl_cache.templates import read_class_names

    names = list(attrs["class_names"])
    if model.class_prompts is None:
        return names
    try:
        given = read_class_names(model.class_prompts)
    except UserError as err:
        raise UserError(f"model.class_prompts: {err}") from None
    if len(given) != len(names):
        raise UserError(f"model.class_prompts: {model.class_prompts} has {len(given)} names but store {where} has "
                        f"{len(names)} classes; give one name per class, line i naming label i ({names[0]!r} first)")
    return given


def zero_shot_classifier(cfg: LinearProbeConfig) -> tuple[Tensor, float]:
    """(C, E) unit prompt-ensemble class embeddings and exp(logit_scale), as `evl-cache zeroshot` computes
    them (fp32, CPU), through its on-disk cache of text embeddings."""
    from evl_cache.backbone import BackboneSpec
    from evl_cache.text import class_text_embeddings
    from evl_cache.zeroshot import default_text_cache

    t = cfg.text
    spec = BackboneSpec(arch=t["arch"], weights=t["weights"], seed=int(t.get("seed", 0)),
                        quick_gelu=bool(t.get("quick_gelu", True)), precision="fp32")
    out = class_text_embeddings(spec, cfg.class_names, cfg.templates, cache_dir=default_text_cache(), device="cpu")
    if out.identity["weights_id"] != t["weights_id"]:
        raise UserError(f"model.text_weights: {t['weights']} changed since the run was configured "
                        f"(identity {out.identity['weights_id'][:16]}, expected {t['weights_id'][:16]}); "
                        f"pass the store's CLIP weights")
    return out.emb, out.logit_scale


class LinearProbeSpec(HeadSpec):
    name = "linear"
    options = ("linear_norm", "linear_init", "text_templates", "text_weights", "class_prompts")

    def needs(self, cfg: Any) -> tuple[str, ...]:
        return ("emb",)

    def config_for_store(self, model: Any, attrs: dict[str, Any], where: str) -> LinearProbeConfig:
        from evl_cache.zeroshot import DEFAULT_TEMPLATES

        check_needs(self.name, self.needs(None), attrs, where)
        shape = _shape_of_store(model, attrs, where, ("frames", "num_classes"))
        norm = True if model.linear_norm is None else bool(model.linear_norm)
        init = model.linear_init or "default"
        if init not in LINEAR_INITS:
            raise UserError(f"model.linear_init={init!r} must be one of {LINEAR_INITS}")
        if init != "text":
            stray = [k for k in ("text_templates", "text_weights", "class_prompts") if getattr(model, k) is not None]
            if stray:
                raise UserError(f"model.{stray[0]} applies to the linear head only with model.linear_init=text; "
                                f"set model.linear_init=text or remove model.{stray[0]}")
            return LinearProbeConfig(embed_dim=int(attrs["embed_dim"]), norm=norm, **shape)
        if not norm:
            raise UserError("model.linear_init=text starts from CLIP's zero-shot classifier, which reads the normalised "
                            "video embedding; drop model.linear_norm=false or model.linear_init=text")
        name, templates, text = text_spec_for_store(model, attrs, where, DEFAULT_TEMPLATES)
        return LinearProbeConfig(embed_dim=int(attrs["embed_dim"]), norm=norm, init="text",
                                 class_names=prompt_names(model, attrs, where), templates=templates, template_set=name,
                                 text=text, **shape)

    def config_from_dict(self, d: dict[str, Any]) -> LinearProbeConfig:
        return _from_dict(LinearProbeConfig, d)

    def build(self, cfg: Any, fresh: bool = True) -> nn.Module:
        model = LinearProbe(cfg)
        if fresh and cfg.init == "text":
            # the text tower's build may seed torch's RNG ('random' weights): keep the run's RNG stream
            with torch.random.fork_rng(devices=[]):
                emb, scale = zero_shot_classifier(cfg)
            model.init_from_text(emb, scale)
        return model

    def backbone_outputs(self, cfg: Any, meta: dict[str, Any]) -> dict[str, Any]:
        return {"blocks": [], "attention": "none", "emb": True}


register_head(AttentiveProbeSpec())
register_head(LinearProbeSpec())
