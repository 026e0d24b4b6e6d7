"""The prefix layout: cache only the residual stream entering the first block the decoder reads, and
recompute the frozen tail blocks in stage 2, on the device where the batch lands.

For ViT-B/16 with K = 4 the cache holds the input of block 8 (T x 197 x 768 per clip-view) instead
of 4 blocks' outputs plus their attention maps; stage 2 pays the tail's forward (46.5 GMAC per
8-frame clip for B/16) to get back exactly what full extraction would have cached. The tail's
frozen weights travel inside the store (``tail_weights.safetensors``, sha256 in the attributes), so
a prefix store is self-contained. docs/cache-format.md, "Prefix layout".
"""

from __future__ import annotations

import os
from typing import Any

import torch

from evl_cache.errors import UserError

TAIL_FILE = "tail_weights.safetensors"


def tail_blocks(blocks: list[int]) -> list[int]:
    """Every block from the first captured one to the last: the ones stage 2 recomputes."""
    return list(range(blocks[0], blocks[-1] + 1))


def save_tail(store_path: str, visual: torch.nn.Module, blocks: list[int]) -> dict[str, Any]:
    """Write the tail blocks' weights (float32) into the store; return the attributes that name them."""
    from safetensors.torch import save_file

    from evl_cache.backbone import file_sha256

    keep = tuple(f"transformer.resblocks.{i}." for i in tail_blocks(blocks))
    state = {k: v.detach().float().cpu().contiguous() for k, v in visual.state_dict().items() if k.startswith(keep)}
    path = os.path.join(store_path, TAIL_FILE)
    tmp = path + ".partial"
    save_file(state, tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return {"file": TAIL_FILE, "sha256": file_sha256(path), "blocks": tail_blocks(blocks)}


def load_tail(store_path: str, attrs: dict[str, Any], device: torch.device) -> Any:
    """The frozen tail as a `FrozenCLIPBackbone` whose `forward_from` recomputes the cached blocks.

    Runs in the store's precision on CUDA and in float32 on the CPU. The weights file must match the
    sha256 the store recorded: a prefix store without its tail is as lost as a missing shard.
    """
    from safetensors.torch import load_file

    from evl_cache.backbone import FrozenCLIPBackbone, PRECISIONS, file_sha256
    from open_clip.model import _build_vision_tower, convert_weights_to_lp

    from evl_cache.location import is_url

    if is_url(store_path):
        raise UserError(f"prefix-layout stores cannot be read from a URL yet ({store_path}): copy the store to a local path")
    tail = attrs["tail"]
    path = os.path.join(store_path, tail["file"])
    if not os.path.isfile(path):
        raise UserError(f"prefix store {store_path} has lost its tail weights ({path}); re-extract the store")
    if file_sha256(path) != tail["sha256"]:
        raise UserError(f"tail weights {path} do not match the sha256 the store recorded; re-extract the store")
    cfg, bb = attrs["model_config"], attrs["backbone"]
    visual = _build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"], quick_gelu=bool(bb.get("quick_gelu", True)))
    missing, unexpected = visual.load_state_dict(load_file(path), strict=False)
    needed = [k for k in missing if k.startswith(tuple(f"transformer.resblocks.{i}." for i in tail["blocks"]))]
    if needed or unexpected:
        raise UserError(f"tail weights {path} do not fit the store's model config (missing {needed[:3]}, unexpected {unexpected[:3]})")
    dtype = PRECISIONS.get(bb.get("precision", "fp32"), torch.float32) if device.type == "cuda" else torch.float32
    if dtype != torch.float32:
        convert_weights_to_lp(visual, dtype)
    visual.to(device).eval().requires_grad_(False)
    return FrozenCLIPBackbone(visual, blocks=list(attrs["blocks"]), attention=attrs["attention"])
