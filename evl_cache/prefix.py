"""The prefix layout: cache only the residual stream entering the first block the decoder reads, and
recompute the frozen tail blocks in stage 2, on the device where the batch lands.

For ViT-B/16 with K = 4 the cache holds the input of block 8 (T x 197 x 768 per clip-view) instead
of 4 blocks' outputs plus their attention maps; stage 2 pays the tail's forward (46.5 GMAC per
8-frame clip for B/16) to get back exactly what full extraction would have cached. The tail's
frozen weights travel inside the store (``tail_weights.safetensors``, a file, or an object of a URL
store; sha256 in the attributes), so a prefix store is self-contained. docs/cache-format.md, "Prefix layout".
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import torch

from evl_cache.errors import UserError

TAIL_FILE = "tail_weights.safetensors"


def tail_blocks(blocks: list[int]) -> list[int]:
    """Every block from the first captured one to the last: the ones stage 2 recomputes."""
    return list(range(blocks[0], blocks[-1] + 1))


def save_tail(store_path: str, visual: torch.nn.Module, blocks: list[int]) -> dict[str, Any]:
    """Write the tail blocks' weights (float32) into the store; return the attributes that name them.

    A local file is written to a temp file, fsynced and renamed into place; on a URL store the object
    is one PUT, which a reader sees whole or not at all. Either way the caller records the returned
    sha256 in the store's attributes only after this returns: that record is the commit point, and
    `load_tail` refuses a store without it."""
    from safetensors.torch import save, save_file

    from evl_cache import location
    from evl_cache.backbone import file_sha256

    keep = tuple(f"transformer.resblocks.{i}." for i in tail_blocks(blocks))
    state = {k: v.detach().float().cpu().contiguous() for k, v in visual.state_dict().items() if k.startswith(keep)}
    if location.is_url(store_path):
        data = save(state)  # the same bytes `save_file` writes
        location.write_bytes(location.join(store_path, TAIL_FILE), data)
        return {"file": TAIL_FILE, "sha256": hashlib.sha256(data).hexdigest(), "blocks": tail_blocks(blocks)}
    path = os.path.join(store_path, TAIL_FILE)
    tmp = path + ".partial"
    save_file(state, tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return {"file": TAIL_FILE, "sha256": file_sha256(path), "blocks": tail_blocks(blocks)}


def read_tail(store_path: str, tail: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The tail weights a store recorded, from a local file or a URL store's object, refused in one
    line if they were never recorded, are missing, or do not match the recorded sha256."""
    from safetensors.torch import load, load_file

    from evl_cache import location
    from evl_cache.backbone import file_sha256

    if "sha256" not in tail:
        raise UserError(f"prefix store {store_path} has no recorded tail weights (its extraction stopped before writing them); "
                        "rerun the same `evl-cache extract` command")
    where = location.join(store_path, tail["file"])
    if location.is_url(store_path):
        try:
            data = location.read_bytes(where)
        except FileNotFoundError:
            raise UserError(f"prefix store {store_path} has lost its tail weights (no object {where}); re-extract the store") from None
        if hashlib.sha256(data).hexdigest() != tail["sha256"]:
            raise UserError(f"tail weights {where} do not match the sha256 the store recorded; re-extract the store")
        return load(data)
    if not os.path.isfile(where):
        raise UserError(f"prefix store {store_path} has lost its tail weights ({where}); re-extract the store")
    if file_sha256(where) != tail["sha256"]:
        raise UserError(f"tail weights {where} do not match the sha256 the store recorded; re-extract the store")
    return load_file(where)


def load_tail(store_path: str, attrs: dict[str, Any], device: torch.device) -> Any:
    """The frozen tail as a `FrozenCLIPBackbone` whose `forward_from` recomputes the cached blocks.

    Runs in the store's precision on CUDA and in float32 on the CPU. The weights (a file in a local
    store, an object in a URL store) must match the sha256 the store recorded: a prefix store without
    its tail is as lost as a missing shard.
    """
    from evl_cache import location
    from evl_cache.backbone import FrozenCLIPBackbone, PRECISIONS
    from open_clip.model import _build_vision_tower, convert_weights_to_lp

    tail = attrs["tail"]
    state = read_tail(store_path, tail)
    path = location.join(store_path, tail["file"])
    cfg, bb = attrs["model_config"], attrs["backbone"]
    visual = _build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"], quick_gelu=bool(bb.get("quick_gelu", True)))
    missing, unexpected = visual.load_state_dict(state, strict=False)
    needed = [k for k in missing if k.startswith(tuple(f"transformer.resblocks.{i}." for i in tail["blocks"]))]
    if needed or unexpected:
        raise UserError(f"tail weights {path} do not fit the store's model config (missing {needed[:3]}, unexpected {unexpected[:3]})")
    dtype = PRECISIONS.get(bb.get("precision", "fp32"), torch.float32) if device.type == "cuda" else torch.float32
    if dtype != torch.float32:
        convert_weights_to_lp(visual, dtype)
    visual.to(device).eval().requires_grad_(False)
    return FrozenCLIPBackbone(visual, blocks=list(attrs["blocks"]), attention=attrs["attention"])
