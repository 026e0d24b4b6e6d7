"""The X-CLIP head on cached frozen-CLIP tensors: MIT, the video-specific prompt generator and text
matching (microsoft/VideoX, X-CLIP: ``models/mit.py``, ``models/prompt.py``, ``models/xclip.py``;
docs/heads.md). CCT, X-CLIP's message tokens inside the backbone, is not reproduced: it needs a
fine-tuned tower, not a frozen cache.

Inputs: ``emb`` (B, T, E), CLIP's per-frame image embeddings ``ln_post(CLS) @ proj`` (what X-CLIP's
MIT reads), and ``feats`` of the ViT's last block (B, K, T, L, C), whose patch tokens (before
``ln_post``) are what X-CLIP's image encoder hands the prompt generator. Per clip-view:

    MIT      x = emb + P;  x = x + MHA(LN1(x));  x = x + MLP(LN2(x))   (mit_layers blocks, E/64 heads)
             v = mean_t(x + emb)
    visual   Z = mean_t(LN_v(patch tokens) W_v)                 (P, E): LayerNorm(C), W_v (C, E)
    prompts  u = w (the K class text embeddings, unnormalised);  Z' = LN(Z)
             per layer: u = u + CA(LN1(u), Z', Z');  u = u + MLP(LN3(u))
             w' = w + alpha * u                                  (alpha: a learned (E,) vector)
    logits   s * <v / |v|, w' / |w'|>,   s = exp(CLIP's logit_scale), frozen

MLPs are Linear(E, 4E) -> QuickGELU -> Linear(4E, E). CA has bias-free q/k/v projections and an
output projection with bias. Init as X-CLIP: Linear weights trunc-normal(0.02) with zero bias,
LayerNorms 1/0, P trunc-normal(0.02), MHA in-projections PyTorch's (xavier-uniform, zero bias),
W_v standard normal (it is outside CLIP's and the modules' init), alpha = prompt_alpha.

The text side is X-CLIP's frozen-text variant (``MODEL.FIX_TEXT``, its default): the class
embeddings w are computed once by CLIP's frozen text tower (evl_cache.text) when a model is built
for training and kept in the checkpoint as the buffer ``text_emb``, with the logit scale.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from evl_cache.decoder import LayerNorm, QuickGELU
from evl_cache.errors import UserError
from evl_cache.heads import HeadSpec, check_needs, expect, register_head
from evl_cache.heads.probes import _from_dict, _shape_of_store, check_tokens, prompt_names, text_spec_for_store

DEFAULT_TEMPLATES = "xclip"  # X-CLIP's released code feeds the bare class name


@dataclass
class XCLIPConfig:
    frames: int
    width: int  # C of the ViT's tokens
    embed_dim: int  # E of CLIP's joint embedding space
    tokens: int  # L = 1 + patches per frame
    num_classes: int
    mit_layers: int = 1
    prompt_layers: int = 2
    prompt_alpha: float = 0.1
    class_names: list[str] = field(default_factory=list)
    templates: list[str] = field(default_factory=lambda: ["{}"])
    template_set: str = DEFAULT_TEMPLATES
    # where the frozen text embeddings come from: arch, weights, weights_id, seed, quick_gelu
    text: dict[str, Any] = field(default_factory=dict)
    head: str = "xclip"

    def __post_init__(self) -> None:
        problems = []
        if self.mit_layers < 1 or self.prompt_layers < 1:
            problems.append(f"mit_layers={self.mit_layers} and prompt_layers={self.prompt_layers} must be >= 1")
        if self.class_names and len(self.class_names) != self.num_classes:
            problems.append(f"{len(self.class_names)} class names for {self.num_classes} classes")
        if problems:
            raise UserError("bad xclip head config: " + "; ".join(problems) + "; fix model.mit_layers / model.prompt_layers")

    @property
    def attn_heads(self) -> int:
        """X-CLIP's E // 64 heads in MIT and the prompt generator (at least one for tiny models)."""
        return max(1, self.embed_dim // 64)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ResidualAttentionBlock(nn.Module):
    """Pre-LN self-attention block (MIT): nn.MultiheadAttention's parameters and numerics."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_1 = LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, 4 * width))
        self.mlp.add_module("gelu", QuickGELU())
        self.mlp.add_module("c_proj", nn.Linear(4 * width, width))
        self.ln_2 = LayerNorm(width)

    def forward(self, x: Tensor) -> Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class MultiframeIntegrationTransformer(nn.Module):
    def __init__(self, frames: int, width: int, layers: int, heads: int) -> None:
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.empty(1, frames, width))
        nn.init.trunc_normal_(self.positional_embedding, std=0.02, a=-2.0, b=2.0)
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads) for _ in range(layers)])
        _init_linear_and_norm(self)

    def forward(self, emb: Tensor) -> Tensor:
        x = self.resblocks(emb + self.positional_embedding)
        return (x + emb).mean(dim=1)


class PromptCrossAttention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(width, width, bias=False)
        self.k_proj = nn.Linear(width, width, bias=False)
        self.v_proj = nn.Linear(width, width, bias=False)
        self.proj = nn.Linear(width, width)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        B, N, C = q.shape
        H, D = self.heads, C // self.heads

        def split(t: Tensor, lin: nn.Linear) -> Tensor:
            return lin(t).view(B, t.shape[1], H, D).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(q, self.q_proj), split(k, self.k_proj), split(v, self.v_proj))
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class PromptGeneratorLayer(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.cross_attn = PromptCrossAttention(width, heads)
        self.norm1 = LayerNorm(width)
        self.norm3 = LayerNorm(width)
        # the same indices as X-CLIP's Sequential(Linear, QuickGELU, Dropout(0), Linear): mlp.0, mlp.3
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), QuickGELU(), nn.Identity(), nn.Linear(4 * width, width))

    def forward(self, x: Tensor, visual: Tensor) -> Tensor:
        x = x + self.cross_attn(self.norm1(x), visual, visual)
        return x + self.mlp(self.norm3(x))


class VideoSpecificPrompt(nn.Module):
    def __init__(self, width: int, heads: int, layers: int, alpha: float) -> None:
        super().__init__()
        self.norm = LayerNorm(width)
        self.decoder = nn.ModuleList(PromptGeneratorLayer(width, heads) for _ in range(layers))
        self.alpha = nn.Parameter(torch.full((width,), float(alpha)))
        _init_linear_and_norm(self)

    def forward(self, text: Tensor, visual: Tensor) -> Tensor:
        """alpha * (the text tokens after the layers): what X-CLIP adds to the text embeddings."""
        visual = self.norm(visual)
        for layer in self.decoder:
            text = layer(text, visual)
        return self.alpha * text


def _init_linear_and_norm(module: nn.Module) -> None:
    """X-CLIP's module init: every nn.Linear (MHA's out_proj included) trunc-normal(0.02), zero
    bias; LayerNorm 1/0. MHA's fused in-projection is no nn.Linear and keeps PyTorch's init."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02, a=-2.0, b=2.0)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class XCLIPHead(nn.Module):
    """MIT + video-specific prompts + text matching: batch dict -> logits (B, num_classes)."""

    def __init__(self, cfg: XCLIPConfig) -> None:
        super().__init__()
        self.cfg = cfg
        C, E, H = cfg.width, cfg.embed_dim, cfg.attn_heads
        self.prompts_generator = VideoSpecificPrompt(E, H, cfg.prompt_layers, cfg.prompt_alpha)
        self.mit = MultiframeIntegrationTransformer(cfg.frames, E, cfg.mit_layers, H)
        self.prompts_visual_ln = LayerNorm(C)
        self.prompts_visual_proj = nn.Parameter(torch.randn(C, E))
        # frozen text side: filled by `set_text` (training) or by the checkpoint's state dict
        self.register_buffer("text_emb", torch.zeros(cfg.num_classes, E))
        self.register_buffer("logit_scale", torch.ones(()))

    @torch.no_grad()
    def set_text(self, text_emb: Tensor, logit_scale: float) -> None:
        if tuple(text_emb.shape) != tuple(self.text_emb.shape):
            raise UserError(f"class text embeddings have shape {tuple(text_emb.shape)}, the xclip head needs "
                            f"{tuple(self.text_emb.shape)}; use the text tower of the store's CLIP weights")
        self.text_emb.copy_(text_emb)
        self.logit_scale.fill_(float(logit_scale))

    def video_features(self, emb: Tensor) -> Tensor:
        return self.mit(emb)

    def visual_tokens(self, feats: Tensor) -> Tensor:
        """Patch tokens of the last block (B, T, L, C) -> (B, P, E), projected per frame, mean over time."""
        patches = feats[:, :, 1:, :]
        return (self.prompts_visual_ln(patches) @ self.prompts_visual_proj).mean(dim=1)

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        cfg = self.cfg
        dtype = self.prompts_visual_proj.dtype
        emb = expect(batch, "emb", cfg.head, "use a store with per-frame embeddings (extract --emb or derive-emb)")
        feats = expect(batch, "feats", cfg.head, "use a store that caches the ViT's last block")
        check_tokens(feats, cfg.frames, cfg.tokens, cfg.width, cfg.head)
        if emb.dim() != 3 or tuple(emb.shape[1:]) != (cfg.frames, cfg.embed_dim):
            raise UserError(f"the xclip head reads emb (B, {cfg.frames}, {cfg.embed_dim}) but got {tuple(emb.shape)}; "
                            f"the store does not match the checkpoint")
        video = self.video_features(emb.to(dtype))
        visual = self.visual_tokens(feats[:, -1].to(dtype))
        text = self.text_emb.to(dtype).unsqueeze(0).expand(emb.shape[0], -1, -1)
        text = text + self.prompts_generator(text, visual)
        video = F.normalize(video.float(), dim=-1)
        text = F.normalize(text.float(), dim=-1)
        return self.logit_scale.float() * torch.einsum("be,bke->bk", video, text)


def class_text_embeddings(cfg: XCLIPConfig) -> tuple[Tensor, float]:
    """(K, E) unnormalised text embeddings of the class prompts (mean over templates) and exp(logit_scale).

    X-CLIP encodes each class's prompt once with the frozen tower and feeds the raw (unnormalised)
    embedding to the prompt generator; with several templates the raw embeddings are averaged.
    """
    from evl_cache.backbone import BackboneSpec
    from evl_cache.templates import format_prompts
    from evl_cache.text import build_text_tower

    t = cfg.text
    spec = BackboneSpec(arch=t["arch"], weights=t["weights"], seed=int(t.get("seed", 0)),
                        quick_gelu=bool(t.get("quick_gelu", True)), precision="fp32")
    tower = build_text_tower(spec, "cpu")
    if tower.identity()["weights_id"] != t["weights_id"]:
        raise UserError(f"model.text_weights: {t['weights']} changed since the run was configured "
                        f"(identity {tower.identity()['weights_id'][:16]}, expected {t['weights_id'][:16]}); "
                        f"pass the store's CLIP weights")
    prompts = format_prompts(cfg.class_names, cfg.templates)
    raw = tower.encode(prompts).view(len(cfg.class_names), len(cfg.templates), -1).mean(dim=1)
    return raw, tower.logit_scale


class XCLIPSpec(HeadSpec):
    name = "xclip"
    options = ("mit_layers", "prompt_layers", "prompt_alpha", "text_templates", "text_weights", "class_prompts")

    def needs(self, cfg: Any) -> tuple[str, ...]:
        return ("emb", "last_block")

    def config_for_store(self, model: Any, attrs: dict[str, Any], where: str) -> XCLIPConfig:

        check_needs(self.name, self.needs(None), attrs, where)
        shape = _shape_of_store(model, attrs, where, ("frames", "width", "num_classes"))
        name, templates, text = text_spec_for_store(model, attrs, where, DEFAULT_TEMPLATES)
        return XCLIPConfig(
            **shape, embed_dim=int(attrs["embed_dim"]), tokens=int(attrs["tokens"]),
            mit_layers=1 if model.mit_layers is None else int(model.mit_layers),
            prompt_layers=2 if model.prompt_layers is None else int(model.prompt_layers),
            prompt_alpha=0.1 if model.prompt_alpha is None else float(model.prompt_alpha),
            class_names=prompt_names(model, attrs, where), templates=list(templates), template_set=name, text=text)

    def config_from_dict(self, d: dict[str, Any]) -> XCLIPConfig:
        return _from_dict(XCLIPConfig, d)

    def build(self, cfg: Any, fresh: bool = True) -> nn.Module:
        model = XCLIPHead(cfg)
        if fresh:
            # the text tower's build may seed torch's RNG ('random' weights): keep the run's RNG stream
            with torch.random.fork_rng(devices=[]):
                emb, scale = class_text_embeddings(cfg)
            model.set_text(emb, scale)
        return model

    def backbone_outputs(self, cfg: Any, meta: dict[str, Any]) -> dict[str, Any]:
        return {"blocks": [int(meta["blocks"][-1])], "attention": "none", "emb": True}


register_head(XCLIPSpec())
