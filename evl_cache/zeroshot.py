"""CLIP zero-shot video classification from per-frame image embeddings (docs/zero-shot.md).

A frame's embedding is what CLIP's image tower outputs: ``ln_post`` of the last block's CLS
token times the projection, shape (E,). A video view's embedding is the mean of its normalised
frame embeddings, normalised again; its class logits are ``logit_scale * img @ text.T`` against
the unit class embeddings of `evl_cache.text`, softmaxed over classes; a video's scores are the
mean of its views' softmax.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from evl_cache.errors import UserError


@torch.no_grad()
def frame_embeddings(visual: nn.Module, frames: torch.Tensor) -> torch.Tensor:
    """Per-frame CLIP image embeddings (B, T, E) in float32 from normalised frames (B, T, 3, S, S).

    The image tower's own forward output (open_clip ``VisionTransformer``): what ``encode_image``
    returns for each frame.
    """
    b, t = frames.shape[:2]
    weight = visual.conv1.weight
    out = visual(frames.flatten(0, 1).to(device=weight.device, dtype=weight.dtype))
    return out.float().view(b, t, -1)


def _check_tok_pooled(visual: nn.Module) -> None:
    """Refuse towers whose image embedding is not ``ln_post(CLS) @ proj`` (attention pooling, mean pooling)."""
    if getattr(visual, "attn_pool", None) is not None or getattr(visual, "pool_type", "tok") != "tok":
        raise UserError("this image tower pools with attention or a token mean, not the CLS token; "
                        "its embeddings cannot be derived from cached last-block tokens, extract them instead")
    if getattr(visual, "proj", None) is None:
        raise UserError("this image tower has no output projection, so it has no CLIP embedding space; use a CLIP checkpoint")


@torch.no_grad()
def embeddings_from_last_block(visual: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """CLIP image embeddings (..., E) from the last block's output tokens (..., L, C), CLS first.

    ``ln_post(CLS) @ proj``: the tail of the image tower's forward, so a store that holds the last
    block yields the same embeddings as running the tower (up to the store's precision).
    """
    _check_tok_pooled(visual)
    proj = visual.proj
    cls = tokens[..., 0, :].to(device=proj.device, dtype=proj.dtype)
    return (visual.ln_post(cls) @ proj).float()


def video_embeddings(frame_emb: torch.Tensor) -> torch.Tensor:
    """(..., T, E) -> (..., E): the mean of the normalised frame embeddings, normalised again."""
    return F.normalize(F.normalize(frame_emb.float(), dim=-1).mean(dim=-2), dim=-1)


def zero_shot_scores(frame_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """Class probabilities (N, C) of N videos from their per-frame embeddings (N, V, T, E).

    text_emb: (C, E) class embeddings (normalised here too, so any scale is accepted);
    logit_scale: ``exp`` of the CLIP model's learned temperature (`TextTower.logit_scale`).
    Per view: softmax over classes of ``logit_scale * video_emb @ text_emb.T``; then the mean over
    the V views, so each row sums to 1.
    """
    if frame_emb.dim() != 4:
        raise UserError(f"per-frame embeddings must be (videos, views, frames, dim); got shape {tuple(frame_emb.shape)}")
    if text_emb.dim() != 2 or text_emb.shape[1] != frame_emb.shape[-1]:
        raise UserError(
            f"image embeddings have dimension {frame_emb.shape[-1]} but the class embeddings are {tuple(text_emb.shape)}; "
            f"use the text tower of the same CLIP weights as the store"
        )
    if not (math.isfinite(logit_scale) and logit_scale > 0):
        raise UserError(f"logit scale {logit_scale} must be a positive finite number (exp of the model's logit_scale)")
    video = video_embeddings(frame_emb)  # (N, V, E)
    text = F.normalize(text_emb.float().to(video.device), dim=-1)
    logits = logit_scale * video @ text.T  # (N, V, C)
    return logits.softmax(dim=-1).mean(dim=1)
