"""`evl-cache derive-emb`: add per-frame CLIP embeddings to a store that already holds the last block.

``emb = ln_post(CLS) @ proj`` only needs the last block's CLS token, which a store caching the last
block has; ``ln_post`` and ``proj`` come from the same CLIP weights the store was extracted with
(checked by sha256). The new ``emb`` array is written shard by shard, fsynced, and only then do the
store's attributes name it, so an interrupted run leaves a store that reads as before and a rerun
starts over (docs/zero-shot.md, "Deriving emb").

On a URL store the same order holds with objects: each shard is one PUT, seen whole or not at all,
and the commit point is the PUT of the root ``zarr.json`` that names ``emb``, after every shard's PUT
has returned. Readers rely on the object store's read-after-write consistency (S3, GCS and Azure give
it) to see those shards once they see the new ``zarr.json``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from evl_cache import location
from evl_cache.errors import UserError
from evl_cache.faults import fault_point


@dataclass
class DeriveSummary:
    store: str
    videos: int
    clip_views: int
    embed_dim: int
    seconds: float
    already: bool = False

    def lines(self) -> list[str]:
        if self.already:
            return [f"store {self.store} already holds per-frame embeddings (emb); nothing to do"]
        return [f"store {self.store}: derived emb (T x {self.embed_dim}, float16) for {self.videos} done videos, "
                f"{self.clip_views} clip-views, in {self.seconds:.1f} s"]


def derive_emb(store_path: str, weights: str | None = None, arch: str | None = None, trust_torchscript: bool = False,
               device: str | None = None, batch_views: int = 256) -> DeriveSummary:
    """Compute ``emb`` for every done video from the store's last-block features and record it."""
    import time

    from evl_cache.backbone import build_visual_tower, check_token_pooled, resolve_device
    from evl_cache.formats import StoreFormats
    from evl_cache.store import (
        StoreDataError,
        create_tensor_array,
        data_error_hint,
        open_store,
        shards_of,
        sync_files,
    )
    from evl_cache.zeroshot import spec_like_store, with_flag

    started = time.perf_counter()
    store = with_flag("STORE", open_store, store_path, mode="r+")
    attrs = dict(store.attrs)
    if attrs.get("emb"):
        return DeriveSummary(store_path, 0, 0, int(attrs["embed_dim"]), 0.0, already=True)
    last = int(attrs["backbone"]["layers"]) - 1
    blocks = list(attrs["blocks"])
    if last not in blocks:
        raise UserError(f"store {store_path} caches blocks {blocks}, not the last block ({last}); emb cannot be derived from it: "
                        f"re-extract with `evl-cache extract --emb`")
    spec = spec_like_store(attrs, store_path, weights, arch, "fp32", trust_torchscript)
    dev = resolve_device(device)
    visual, _ = build_visual_tower(spec, dev)
    check_token_pooled(visual)
    embed_dim = int(visual.proj.shape[1])
    new_attrs = {**attrs, "emb": True, "embed_dim": embed_dim}
    spec_emb = StoreFormats(new_attrs).arrays()["emb"]
    formats = StoreFormats(attrs, store_path)
    k = blocks.index(last)
    arr = create_tensor_array(store.group, "emb", spec_emb, store.num_videos, store.num_views, store.shard_size,
                              attrs.get("compressor"), overwrite=True)
    names = store.tensor_names()
    done = store.done_indices()
    views = 0
    for shard, videos in shards_of(done, store.shard_size).items():
        lo = shard * store.shard_size
        hi = min(lo + store.shard_size, store.num_videos)
        full = np.full((hi - lo, store.num_views, *spec_emb.shape), np.nan, dtype=np.float16)
        items = [(i, v) for i in videos for v in range(store.num_views)]
        for start in range(0, len(items), batch_views):
            chunk = items[start:start + batch_views]
            try:
                stored = {n: torch.from_numpy(np.stack([store.reader(n).read(i, v) for i, v in chunk])) for n in names}
            except StoreDataError as err:
                raise StoreDataError(data_error_hint(store_path, str(err))) from None
            feats = formats.decode(stored, dev, out_dtype=torch.float32)["feats"][:, k]  # (n, T, L, C)
            with torch.no_grad():
                emb = visual.ln_post(feats[:, :, 0]) @ visual.proj  # (n, T, E)
            for (i, v), value in zip(chunk, emb.to(torch.float16).cpu().numpy()):
                full[i - lo, v] = value
        arr[lo:hi] = full  # a local file: temp file renamed into place; a URL store: one PUT
        if not location.is_url(store_path):
            sync_files([store.reader("emb").shard_file(shard)])
        fault_point("derive_shard", shard)
        views += len(items)
    store.group.attrs["evl_cache"] = new_attrs  # the commit point: from here on the store names emb
    return DeriveSummary(store_path, len(done), views, embed_dim, time.perf_counter() - started)
