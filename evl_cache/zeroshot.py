"""CLIP zero-shot video classification from per-frame image embeddings (docs/zero-shot.md).

A frame's embedding is what CLIP's image tower outputs: ``ln_post`` of the last block's CLS
token times the projection, shape (E,). A video view's embedding is the mean of its normalised
frame embeddings, normalised again; its class logits are ``logit_scale * img @ text.T`` against
the unit class embeddings of `evl_cache.text`, softmaxed over classes; a video's scores are the
mean of its views' softmax.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from evl_cache.backbone import BackboneSpec
from evl_cache.errors import UserError

DEFAULT_TEMPLATES = "clip-kinetics700"
VIDEO_EMBEDDING = "mean over frames of the L2-normalised frame embeddings, L2-normalised again"
_T = TypeVar("_T")


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
    from evl_cache.backbone import check_token_pooled

    check_token_pooled(visual)


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


# ------------------------------------------------------------------------------------ zero-shot on a store


def with_flag(flag: str, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
    """Run ``fn``; a `UserError` it raises is re-raised prefixed with the flag that fixes it."""
    try:
        return fn(*args, **kwargs)
    except UserError as err:
        raise UserError(f"{flag}: {err}") from None


def default_text_cache() -> Path:
    """Where class text embeddings are kept between runs: $EVL_CACHE_TEXT_CACHE, else
    $XDG_CACHE_HOME/evl-cache/text-emb (~/.cache/evl-cache/text-emb)."""
    if os.environ.get("EVL_CACHE_TEXT_CACHE"):
        return Path(os.environ["EVL_CACHE_TEXT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "evl-cache" / "text-emb"


def spec_like_store(attrs: dict[str, Any], where: str, weights: str | None = None, arch: str | None = None,
                    precision: str | None = None, trust_torchscript: bool = False) -> BackboneSpec:
    """The CLIP weights a store's embeddings came from, as a spec: ``weights`` (default: the path the
    store recorded) must have the store's recorded identity (file sha256, ``random:<seed>`` or
    ``openclip:<tag>``), because image and text embeddings must come from one CLIP model."""
    from evl_cache.backbone import file_sha256, load_model_config

    bb = attrs["backbone"]
    recorded = str(bb.get("weights_id", ""))
    seed = int(recorded.split(":", 1)[1]) if recorded.startswith("random:") else 0
    if weights is None:
        if recorded.startswith(("random:", "openclip:")):
            weights = "random" if recorded.startswith("random:") else recorded
        else:
            weights = str(bb.get("weights", ""))
            if not Path(weights).is_file():
                raise UserError(f"--weights: the store's CLIP weights {weights or '(none recorded)'} are not on this machine; "
                                f"pass --weights FILE (sha256 {recorded[:12]}...)")
    if weights == "random":
        actual = f"random:{seed}"
    elif weights.startswith("openclip:"):
        actual = weights
    elif Path(weights).is_file():
        actual = file_sha256(weights)
    else:
        raise UserError(f"--weights: weights file {weights} not found; pass the CLIP checkpoint store {where} was extracted with")
    if actual != recorded:
        raise UserError(f"--weights: {weights} has identity {actual[:16]} but store {where} was extracted with "
                        f"{recorded[:16]}; pass the same CLIP weights (image and text embeddings must come from one model)")
    arch = arch or str(bb["arch"])
    with_flag("--arch", load_model_config, arch)
    return BackboneSpec(arch=arch, weights=weights, seed=seed, quick_gelu=bool(bb.get("quick_gelu", True)),
                        precision=precision or "auto", trust_torchscript=trust_torchscript)


def map_labels(store_names: list[str], labels: np.ndarray, class_names: list[str], classes_file: str) -> tuple[np.ndarray, str]:
    """The store's labels as indices into ``class_names`` and how they were matched.

    ``name``: every store class appears in the list (any order; extra names are distractors).
    ``position``: the list has as many names as the store has classes, line i naming label i (a
    reworded list). A store without class names has no labels (-1, left out of the metrics).
    """
    labels = np.asarray(labels, dtype=np.int64)
    if not store_names:
        return np.full_like(labels, -1), "none"
    index = {name: i for i, name in enumerate(class_names)}
    if all(name in index for name in store_names):
        table = np.array([index[name] for name in store_names], dtype=np.int64)
        mapping = "name"
    elif len(class_names) == len(store_names):
        table, mapping = np.arange(len(store_names), dtype=np.int64), "position"
    else:
        missing = [n for n in store_names if n not in index]
        raise UserError(f"--classes: {classes_file} has {len(class_names)} names, and the store's {len(store_names)} classes "
                        f"are not all among them (e.g. {missing[0]!r}); list every store class by name (extra names are "
                        f"fine), or exactly {len(store_names)} names in the store's label order")
    return np.where(labels >= 0, table[np.clip(labels, 0, None)], -1), mapping


def read_embeddings(store: Any, videos: np.ndarray) -> torch.Tensor:
    """(len(videos), V, T, E) float16 per-frame embeddings, each chunk crc32c-checked."""
    from evl_cache.store import StoreDataError, data_error_hint

    reader = store.reader("emb")
    out = np.empty((len(videos), store.num_views, *reader.chunk_shape[2:]), dtype=np.float16)
    for row, video in enumerate(videos):
        for view in range(store.num_views):
            try:
                reader.read(int(video), view, out=out[row, view])
            except StoreDataError as err:
                raise StoreDataError(data_error_hint(store.path, str(err))) from None
    return torch.from_numpy(out)


def zeroshot_store(store_path: str, classes_file: str, templates: str = DEFAULT_TEMPLATES, out_dir: str | os.PathLike | None = None,
                   weights: str | None = None, arch: str | None = None, precision: str | None = None,
                   trust_torchscript: bool = False, text_cache: str | os.PathLike | None = None,
                   device: str | None = None, allow_partial: bool = False, batch_videos: int = 512) -> dict[str, Any]:
    """CLIP zero-shot classification of a store's done videos from their cached ``emb``.

    Every input is checked before anything is computed or written. With ``out_dir``, writes eval's
    outputs (metrics.json, predictions.csv, scores.npz, confusion_matrix.png). Returns the metrics.
    """
    from evl_cache.backbone import resolve_device
    from evl_cache.completeness import require_complete, video_counts
    from evl_cache.evaluate import compute_metrics, write_outputs
    from evl_cache.store import open_store
    from evl_cache.templates import read_class_names, resolve_templates
    from evl_cache.text import class_text_embeddings

    store = with_flag("--store", open_store, store_path)
    if not store.attrs.get("emb"):
        raise UserError(f"--store: store {store_path} holds no per-frame embeddings (emb); extract with `evl-cache extract --emb`, "
                        f"or add them from its last block with `evl-cache derive-emb {store_path} --weights FILE`")
    names = with_flag("--classes", read_class_names, classes_file)
    template_name, template_list = with_flag("--templates", resolve_templates, templates)
    counts = video_counts(store)
    require_complete(counts, store_path, allow_partial)
    if counts["done"] == 0:
        raise UserError(f"store {store_path} has no extracted videos; run `evl-cache extract` to completion first")
    videos = store.done_indices()
    labels, mapping = map_labels(store.class_names, store.labels()[videos], names, str(classes_file))
    dev = resolve_device(device)
    spec = spec_like_store(store.attrs, store_path, weights, arch, precision, trust_torchscript)
    cache = Path(text_cache) if text_cache is not None else default_text_cache()
    text = with_flag("--weights", class_text_embeddings, spec, names, template_list, cache_dir=cache, device=dev)
    scores = torch.cat([zero_shot_scores(read_embeddings(store, videos[i:i + batch_videos]).to(dev), text.emb.to(dev),
                                         text.logit_scale).cpu()
                        for i in range(0, len(videos), batch_videos)]).numpy()
    metrics = compute_metrics(scores, labels, names)
    metrics.update(store=store_path, views=store.num_views, store_videos=counts, zeroshot={
        "classes_file": str(classes_file), "templates": template_name, "num_templates": len(template_list),
        "weights_id": text.identity["weights_id"], "logit_scale": text.logit_scale, "text_key": text.key,
        "text_source": text.source, "label_mapping": mapping, "video_embedding": VIDEO_EMBEDDING})
    if out_dir is not None:
        write_outputs(Path(out_dir), metrics, scores, videos, labels, store.paths(), names)
    return metrics
