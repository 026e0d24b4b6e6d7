"""Few-shot training subsets: K done videos per class of a train store, drawn with a seed (docs/fewshot.md).

X-CLIP's few-shot protocol trains on K videos per class drawn at random from the training split and
evaluates on the whole test split. Here the draw is a restriction of the training sampler's video
list (`evl_cache.data.EpochSampler`); validation and `evl-cache eval` still read every done video of
their stores.

The draw is deterministic: class c's videos are its done videos in store order, permuted by numpy's
generator seeded with (seed, c), and the first K are kept. So the same (K, seed, store) gives the
same videos, one class's draw never depends on another's, and for one seed the K-shot subset is
contained in every larger K's subset (2 in 4 in 8 in 16), which makes a K-curve compare like with like.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from evl_cache.errors import UserError

FILE = "few_shot.json"


@dataclass
class FewShot:
    """A drawn subset: ``videos`` (sorted store indices) and, per class name, the chosen indices."""

    k: int
    seed: int
    videos: np.ndarray
    per_class: dict[str, list[int]]
    available: dict[str, int]  # done videos per class in the store
    short: dict[str, int] = field(default_factory=dict)  # classes with fewer than k done videos (allowed)

    def to_dict(self, store: str, paths: list[str] | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "k": self.k, "seed": self.seed, "store": store, "videos": int(len(self.videos)),
            "rule": "per class: done videos in store order, permuted by numpy default_rng([seed, class index]), first k",
            "per_class": self.per_class, "available": self.available, "short": self.short,
        }
        if paths is not None:
            out["paths"] = {name: [paths[i] for i in idx] for name, idx in self.per_class.items()}
        return out


def draw(done: np.ndarray, labels: np.ndarray, class_names: list[str], k: int, seed: int,
         allow_short: bool, where: str) -> FewShot:
    """K of each class's done videos (``done``: store indices, ``labels``: their labels).

    A class with fewer than K done videos is refused in one line naming it and the counts, unless
    ``allow_short``: then all of its videos are used and the class is listed in ``short``.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    done = np.asarray(done, dtype=np.int64)
    labels = np.asarray(labels, dtype=np.int64)
    per_class: dict[str, list[int]] = {}
    available: dict[str, int] = {}
    short: dict[str, int] = {}
    for c, name in enumerate(class_names):
        mine = done[labels == c]
        available[name] = int(len(mine))
        if len(mine) < k:
            short[name] = int(len(mine))
        order = np.random.default_rng([int(seed), c]).permutation(len(mine))
        per_class[name] = sorted(int(v) for v in mine[order[:k]])
    if short and not allow_short:
        name, n = next(iter(short.items()))
        more = f" (and {len(short) - 1} more class{'es' * (len(short) > 2)})" if len(short) > 1 else ""
        raise UserError(f"data.few_shot={k}: class {name!r} has {n} done video{'s' * (n != 1)} in store {where}, fewer "
                        f"than {k}{more}; lower data.few_shot (--few-shot), or set data.few_shot_allow_short=true "
                        f"(--few-shot-allow-short) to train on all the videos of such classes")
    videos = np.array(sorted(v for idx in per_class.values() for v in idx), dtype=np.int64)
    if len(videos) == 0:
        raise UserError(f"data.few_shot={k}: store {where} has no done video of any class; extract it first")
    return FewShot(int(k), int(seed), videos, per_class, available, short)


def draw_from_store(store: Any, k: int, seed: int, allow_short: bool, where: str) -> FewShot:
    """`draw` on a store's done videos and labels."""
    done = store.done_indices()
    return draw(done, store.labels()[done], list(store.class_names), k, seed, allow_short, where)


def write(run_dir: Path, subset: FewShot, store: str, paths: list[str] | None = None) -> Path:
    """``run_dir/few_shot.json``: K, seed, the rule, and the chosen video indices (and paths) per class."""
    path = Path(run_dir) / FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(subset.to_dict(store, paths), indent=1) + "\n")
    tmp.replace(path)
    return path
