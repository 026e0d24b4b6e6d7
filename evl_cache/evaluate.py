"""Evaluation over a cache store: per-view softmax, averaged per video, then top-k and per-class accuracy.

Video score = mean over the video's views of softmax(logits) (docs/reference.md, "Evaluation").
Writes ``metrics.json``, ``predictions.csv``, ``scores.npz`` (the full video-level probabilities, which
``evl-cache ensemble`` combines) and ``confusion_matrix.png``.
"""

from __future__ import annotations

import csv
import json
import os
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from evl_cache.completeness import require_complete, video_counts
from evl_cache.config import PAIR_KEYS, backbone_difference
from evl_cache.errors import UserError
from evl_cache.store import comparable_attr, open_store


def video_scores(view_probs: np.ndarray, view_videos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean of per-view probabilities per video: (M, C) probs of M views -> (videos (N,), scores (N, C))."""
    videos, inverse = np.unique(view_videos, return_inverse=True)
    sums = np.zeros((len(videos), view_probs.shape[1]), dtype=np.float64)
    np.add.at(sums, inverse, view_probs.astype(np.float64))
    counts = np.bincount(inverse, minlength=len(videos)).astype(np.float64)
    return videos, sums / counts[:, None]


def compute_metrics(scores: np.ndarray, labels: np.ndarray, class_names: list[str]) -> dict[str, Any]:
    """Top-1, top-5, per-class and mean class accuracy, and the confusion matrix (rows = true class).

    Videos with label < 0 (unlabelled) are left out of every metric.
    """
    num_classes = scores.shape[1]
    keep = labels >= 0
    scores, labels = scores[keep], labels[keep].astype(np.int64)
    k = min(5, num_classes)
    # stable sort of -score: ties go to the lower class index, the same rule as argmax
    order = np.argsort(-scores, axis=1, kind="stable")
    pred = order[:, 0]
    correct1 = pred == labels
    correct5 = (order[:, :k] == labels[:, None]).any(axis=1)
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (labels, pred), 1)
    support = confusion.sum(axis=1)
    per_class = {}
    for c, name in enumerate(class_names):
        per_class[name] = {"support": int(support[c]),
                           "accuracy": float(confusion[c, c] / support[c]) if support[c] else None}
    present = [v["accuracy"] for v in per_class.values() if v["accuracy"] is not None]
    n = int(len(labels))
    return {
        "videos": n,
        "top1": float(correct1.mean()) if n else None,
        "top5": float(correct5.mean()) if n else None,
        "topk": k,
        "mean_class_accuracy": float(np.mean(present)) if present else None,
        "per_class": per_class,
        "confusion": confusion.tolist(),
    }


@torch.no_grad()
def collect_view_probs(model: torch.nn.Module, store_path: str, batch_size: int = 64, device: torch.device | str = "cpu",
                       num_workers: int = 0, amp: str = "off", dist: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """Softmax of every (done video, view) of a store: (probs (M, C) float32, video index (M,)).

    With ``dist`` (an `evl_cache.distributed.Dist` of several ranks) each rank scores a contiguous
    share of the (video, view) items and the shares are gathered in rank order, so every rank gets
    the single-process arrays (same rows in the same order).
    """
    from evl_cache.data import eval_items, make_loader, model_needs, to_device

    device = torch.device(device)
    was_training = model.training
    model.eval()
    items = None
    if dist is not None and dist.active:
        from evl_cache.distributed import shard_bounds

        every = eval_items(open_store(store_path))
        lo, hi = shard_bounds(len(every), dist.rank, dist.world_size)
        items = every[lo:hi]
    loader = make_loader(store_path, batch_size, train=False, num_workers=num_workers,
                         pin_memory=device.type == "cuda", items=items,
                         needs=model_needs([getattr(model, "cfg", None)]))
    probs, videos = [], []
    try:
        for batch in loader:
            vid = batch.pop("video")
            batch.pop("label")
            with autocast(device, amp):
                logits = model(to_device(batch, device))
            probs.append(logits.float().softmax(-1).cpu().numpy())
            videos.append(vid.numpy())
    finally:
        model.train(was_training)
    num_classes = model.cfg.num_classes
    mine = (np.concatenate(probs) if probs else np.zeros((0, num_classes), np.float32),
            np.concatenate(videos) if videos else np.zeros((0,), np.int64))
    if dist is None or not dist.active:
        return mine
    shares = dist.gather(mine)
    return np.concatenate([p for p, _ in shares]), np.concatenate([v for _, v in shares])


def autocast(device: torch.device, amp: str):
    """Autocast context for ``amp`` in bf16/fp16 on CUDA; a no-op on CPU or with amp off."""
    if device.type != "cuda" or amp == "off":
        return nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def check_store_fits(meta: dict[str, Any], attrs: dict[str, Any], num_classes: int, where: str) -> None:
    """Refuse a store the checkpoint was not trained for (every schema fact the checkpoint records)."""
    for key in PAIR_KEYS:
        if key not in meta:
            continue
        if key == "backbone" and isinstance(meta[key], dict):
            # an imported checkpoint may record only part of the backbone (e.g. its arch)
            diff = backbone_difference(meta[key], attrs.get(key), keys=list(meta[key]))
            if diff is not None:
                name, mine, theirs = diff
                fix = (f"evaluate on a store extracted with --precision {mine}" if name == "precision"
                       else "evaluate on a store extracted with the same backbone")
                field_name = f"backbone.{name}" if name else "backbone"
                raise UserError(f"store {where} has {field_name}={theirs!r} but the checkpoint was trained with "
                                f"{field_name}={mine!r}; {fix}")
            continue
        mine, theirs = comparable_attr(key, meta[key]), comparable_attr(key, attrs.get(key))
        if mine != theirs:
            raise UserError(
                f"store {where} has {key}={attrs.get(key)!r} but the checkpoint was trained with "
                f"{key}={meta[key]!r}; evaluate on a store extracted the same way"
            )
    names = list(attrs.get("class_names") or [])
    if len(names) != num_classes:
        raise UserError(f"store {where} has {len(names)} classes but the checkpoint's head has {num_classes}; "
                        f"use a store with the checkpoint's label set")
    if meta.get("class_names") is not None and list(meta["class_names"]) != names:
        raise UserError(f"store {where} names its classes differently from the checkpoint; "
                        f"use a store extracted with the same label set")


def evaluate(checkpoint: str | os.PathLike, store: str, out_dir: str | os.PathLike | None = None,
             batch_size: int = 64, device: str | None = None, num_workers: int = 0,
             allow_partial: bool = False) -> dict[str, Any]:
    """Evaluate a checkpoint on a store; with ``out_dir``, write metrics.json, predictions.csv and
    confusion_matrix.png there. Returns the metrics dict, whose ``store_videos`` says how many of
    the store's videos are done (evaluated), failed (skipped) and pending (refused unless
    ``allow_partial``).

    Under torchrun the views are scored sharded over the ranks and gathered (the same arrays as one
    process); every rank returns the metrics and only rank 0 writes ``out_dir``."""
    from evl_cache.checkpoints import load_checkpoint
    from evl_cache.distributed import join

    dist, dev = join(device)
    try:
        model, meta = load_checkpoint(checkpoint, device=dev)
        st = open_store(store)
        check_store_fits(meta, st.attrs, model.cfg.num_classes, store)
        from evl_cache.heads import check_store

        check_store(model.cfg, st.attrs, store)  # the tensors this head reads
        counts = video_counts(st)
        require_complete(counts, store, allow_partial)
        if counts["done"] == 0:
            raise UserError(f"store {store} has no extracted videos; run `evl-cache extract` to completion first")
        probs, view_videos = collect_view_probs(model, store, batch_size, dev, num_workers, dist=dist)
    finally:
        dist.close()
    videos, scores = video_scores(probs, view_videos)
    labels = st.labels()[videos].astype(np.int64)
    names = st.class_names
    metrics = compute_metrics(scores, labels, names)
    metrics.update(checkpoint=str(checkpoint), store=store, views=st.num_views, store_videos=counts)
    if out_dir is not None and dist.main:
        write_outputs(Path(out_dir), metrics, scores, videos, labels, st.paths(), names)
    return metrics


def write_outputs(out: Path, metrics: dict[str, Any], scores: np.ndarray, videos: np.ndarray, labels: np.ndarray,
                  paths: list[str], names: list[str]) -> None:
    from evl_cache.plots import plot_confusion

    out.mkdir(parents=True, exist_ok=True)
    k = min(5, len(names))
    with open(out / "predictions.csv.tmp", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "pred", "prob", "top5"])
        for row, vid in enumerate(videos):
            order = np.argsort(-scores[row], kind="stable")[:k]
            label = names[labels[row]] if labels[row] >= 0 else ""
            w.writerow([paths[vid], label, names[order[0]], f"{scores[row, order[0]]:.6f}",
                        ";".join(f"{names[c]}:{scores[row, c]:.4f}" for c in order)])
    os.replace(out / "predictions.csv.tmp", out / "predictions.csv")
    write_scores(out / SCORES_FILE, metrics, scores, videos, labels, paths, names)
    plot_confusion(np.asarray(metrics["confusion"]), names, out / "confusion_matrix.png")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")


SCORES_FILE = "scores.npz"
SCORES_FORMAT = 1
# keys of metrics.json copied into the scores file, so it says which model and store it came from
_SOURCE_KEYS = ("checkpoint", "store", "views", "ensemble", "zeroshot")


def write_scores(path: Path, metrics: dict[str, Any], scores: np.ndarray, videos: np.ndarray, labels: np.ndarray,
                 paths: list[str], names: list[str]) -> None:
    """The (N, C) float32 video-level probabilities with everything needed to read them alone.

    Arrays: ``scores`` (N, C) float32, ``video`` (N,) store index, ``path`` (N,) video path,
    ``label`` (N,) class index or -1, ``class_names`` (C,), ``source`` (JSON: format and where the
    scores came from). Strings are unicode arrays, so ``np.load(..., allow_pickle=False)`` reads it.
    """
    source = {"format": SCORES_FORMAT, **{k: metrics[k] for k in _SOURCE_KEYS if k in metrics}}
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, scores=np.asarray(scores, dtype=np.float32), video=np.asarray(videos, dtype=np.int64),
             path=np.array([paths[v] for v in videos], dtype=str).reshape(-1),
             label=np.asarray(labels, dtype=np.int64), class_names=np.array(names, dtype=str),
             source=np.array(json.dumps(source, default=str)))
    os.replace(tmp, path)
