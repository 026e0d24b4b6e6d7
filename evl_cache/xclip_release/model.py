"""The full X-CLIP model of a release: the image tower with CCT, MIT, the prompt generator and the text side.

Equations (microsoft/VideoX, X-CLIP ``models/cct.py``, ``mit.py``, ``prompt.py``, ``xclip.py``;
docs/heads.md). A clip is T frames; every frame is a ViT token sequence x_t (L = 1 + P tokens, C).

    embed   x_t = LN_pre([cls; conv1(frame_t)] + pos)
    block   (every block, with its own message_fc, message_ln, message_attn)
            m_t = message_fc(x_t[0])                        one message token per frame, from its CLS
            m   = m + MHA_msg(LN_msg(m))                    attention over the T messages of the clip
            y_t = [x_t; m_t]                                the frame's tokens plus its message (L + 1)
            y_t = y_t + MHA(LN_1(y_t))                      CLIP's attention, which now sees the message
            x_t = y_t[:L] + MLP(LN_2(y_t[:L]))              the message is dropped before the MLP
    image   e_t = LN_post(x_t[0]) @ proj  (E);  tokens_t = x_t[1:] (P, C), before LN_post
    video   MIT, prompts and logits: the same as the cache-trained head (evl_cache.heads.xclip),
            whose parameter names are the release's, with w the class text embeddings
            (unnormalised, mean over templates) and s = exp(logit_scale).

MLPs are Linear(C, 4C) -> QuickGELU -> Linear(4C, C); all heads are width // 64. The text side is
CLIP's text transformer (argmax/EOT pooling), built by open_clip from the release's text tensors.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from evl_cache.decoder import QuickGELU
from evl_cache.heads.xclip import XCLIPConfig, XCLIPHead
from evl_cache.xclip_release.layout import ReleaseConfig

# release prefixes that belong to the video head (evl_cache.heads.xclip's parameter names)
HEAD_PREFIXES = ("mit.", "prompts_generator.", "prompts_visual_ln.", "prompts_visual_proj")


class CrossFrameBlock(nn.Module):
    """One CCT block: CLIP's pre-LN block whose attention also sees the frame's message token."""

    def __init__(self, width: int, heads: int, frames: int) -> None:
        super().__init__()
        self.frames = frames
        self.message_fc = nn.Linear(width, width)
        self.message_ln = nn.LayerNorm(width)
        self.message_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, 4 * width))
        self.mlp.add_module("gelu", QuickGELU())
        self.mlp.add_module("c_proj", nn.Linear(4 * width, width))
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x: Tensor) -> Tensor:
        """x (B, T, L, C) -> (B, T, L, C)."""
        B, T, L, C = x.shape
        msg = self.message_fc(x[:, :, 0])  # (B, T, C)
        h = self.message_ln(msg)
        msg = msg + self.message_attn(h, h, h, need_weights=False)[0]
        y = torch.cat([x, msg.unsqueeze(2)], dim=2).reshape(B * T, L + 1, C)
        h = self.ln_1(y)
        y = y + self.attn(h, h, h, need_weights=False)[0]
        x = y[:, :L]
        x = x + self.mlp(self.ln_2(x))
        return x.reshape(B, T, L, C)


class _Blocks(nn.Module):
    """Holds the blocks under ``resblocks`` (the release's ``visual.transformer.resblocks.N``)."""

    def __init__(self, blocks: list[CrossFrameBlock]) -> None:
        super().__init__()
        self.resblocks = nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        return self.resblocks(x)


class CCTVisual(nn.Module):
    """X-CLIP's image tower: frames (B, T, 3, S, S) -> (last-block tokens (B, T, L, C), embeddings (B, T, E))."""

    def __init__(self, cfg: ReleaseConfig) -> None:
        super().__init__()
        C, p = cfg.vision_width, cfg.patch_size
        self.frames = cfg.frames
        self.conv1 = nn.Conv2d(3, C, kernel_size=p, stride=p, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(C))
        self.positional_embedding = nn.Parameter(torch.zeros(cfg.tokens, C))
        self.ln_pre = nn.LayerNorm(C)
        self.transformer = _Blocks([CrossFrameBlock(C, cfg.vision_heads, cfg.frames) for _ in range(cfg.vision_layers)])
        self.ln_post = nn.LayerNorm(C)
        self.proj = nn.Parameter(torch.zeros(C, cfg.embed_dim))

    def forward(self, frames: Tensor) -> tuple[Tensor, Tensor]:
        B, T = frames.shape[:2]
        x = self.conv1(frames.flatten(0, 1).to(self.conv1.weight.dtype))  # (BT, C, g, g)
        x = x.flatten(2).transpose(1, 2)  # (BT, P, C)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = self.ln_pre(torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype))
        x = self.transformer(x.view(B, T, *x.shape[1:]))
        emb = self.ln_post(x[:, :, 0]) @ self.proj
        return x, emb


class ReleasedXCLIP(nn.Module):
    """A released X-CLIP model for one class list: frames (B, T, 3, S, S) normalised -> logits (B, K).

    ``head`` is the cache-trained X-CLIP head (MIT, prompts, text matching) holding the release's
    weights and the class text embeddings, so both paths share one implementation of them.
    """

    def __init__(self, cfg: ReleaseConfig, class_names: Sequence[str]) -> None:
        super().__init__()
        self.release = cfg
        self.visual = CCTVisual(cfg)
        head_cfg = XCLIPConfig(frames=cfg.frames, width=cfg.vision_width, embed_dim=cfg.embed_dim, tokens=cfg.tokens,
                               num_classes=len(class_names), mit_layers=cfg.mit_layers, prompt_layers=cfg.prompt_layers,
                               class_names=list(class_names))
        self.head = XCLIPHead(head_cfg)
        self.cfg = head_cfg  # what eval/predict read: num_classes

    def forward(self, frames: Tensor) -> Tensor:
        tokens, emb = self.visual(frames)
        return self.head({"emb": emb, "feats": tokens.unsqueeze(1)})


def module_state_dict(sd: dict[str, Tensor], text_emb: Tensor, logit_scale: float) -> dict[str, Tensor]:
    """`ReleasedXCLIP`'s state dict from a release's: visual as is, the head's under ``head.``."""
    out = {k: v for k, v in sd.items() if k.startswith("visual.")}
    out.update({f"head.{k}": v for k, v in sd.items() if k.startswith(HEAD_PREFIXES)})
    out["head.text_emb"] = text_emb
    out["head.logit_scale"] = torch.tensor(logit_scale, dtype=torch.float32)
    return {k: v.float() if v.is_floating_point() else v for k, v in out.items()}


def build_release_model(cfg: ReleaseConfig, sd: dict[str, Tensor], class_names: Sequence[str], text_emb: Tensor,
                        logit_scale: float) -> ReleasedXCLIP:
    """The model with the release's weights, built on the meta device and then given the tensors (no init pass)."""
    with torch.device("meta"):
        model = ReleasedXCLIP(cfg, class_names)
    model.load_state_dict(module_state_dict(sd, text_emb, logit_scale), strict=True, assign=True)
    return model.eval().requires_grad_(False)


def build_text_tower(cfg: ReleaseConfig, sd: dict[str, Tensor], identity: dict[str, Any]):
    """CLIP's text transformer (open_clip's, QuickGELU) with the release's text tensors, in a `TextTower`."""
    from open_clip.model import _build_text_tower
    from open_clip.tokenizer import SimpleTokenizer

    from evl_cache.errors import UserError
    from evl_cache.text import TextTower, text_state_dict

    text_cfg = {"context_length": cfg.context_length, "vocab_size": cfg.vocab_size, "width": cfg.text_width,
                "heads": cfg.text_heads, "layers": cfg.text_layers}
    text = _build_text_tower(cfg.embed_dim, text_cfg, quick_gelu=True)
    tensors, _ = text_state_dict(sd, identity["source"])
    missing, unexpected = text.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise UserError(f"{identity['source']}: the text tower does not load (missing {missing[:3]}, unexpected "
                        f"{unexpected[:3]}); pass an unmodified X-CLIP checkpoint")
    text.eval().requires_grad_(False)
    tok_id = f"clip-bpe:ctx={cfg.context_length}:{{}}"
    return TextTower(text, SimpleTokenizer(context_length=cfg.context_length), tok_id, logit_scale(sd), identity)


def logit_scale(sd: dict[str, Tensor]) -> float:
    """exp of the release's raw temperature, computed in float32 as X-CLIP's forward does."""
    return float(sd["logit_scale"].float().reshape(-1)[0].exp())


def class_text_embeddings(tower: Any, class_names: Sequence[str], templates: Sequence[str]) -> Tensor:
    """(K, E) unnormalised text embeddings of the class prompts, the mean over templates (fp32)."""
    from evl_cache.templates import format_prompts

    prompts = format_prompts(list(class_names), list(templates))
    return tower.encode(prompts).view(len(class_names), len(templates), -1).mean(dim=1)
