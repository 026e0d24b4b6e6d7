"""Score ensembles: a weighted mean of several models' video-level probabilities.

Inputs are the ``scores.npz`` files that ``evl-cache eval --out`` writes (or an earlier ensemble's,
which has the same format). Files must hold the same videos (matched by path, in any order) and the
same class list in the same order; anything else is refused before a file is written.

Weights: explicit (``--weights 0.3,0.7``), equal, or searched on validation predictions of the same
models on a 0.1 grid of the weight simplex (EVL's ensembles search the weight in steps of 0.1 on
validation). The search keeps the best validation top-1; ties go to the weighting nearest equal
weights, then to the one with more weight on the earlier-listed model.
"""

from __future__ import annotations

import itertools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from evl_cache.errors import UserError
from evl_cache.evaluate import SCORES_FILE, compute_metrics, write_outputs

GRID_STEPS = 10  # weights are multiples of 1/10
MAX_SEARCHED = 4  # 4 models: 286 weightings; 5 would be 1001
CURVE_PLOT = "val_top1_vs_weight.png"


@dataclass
class Predictions:
    """One prediction file: video-level probabilities and what they belong to."""

    file: Path
    scores: np.ndarray  # (N, C) float32
    videos: np.ndarray  # (N,) index of each video in its store
    paths: list[str]
    labels: np.ndarray  # (N,) class index, -1 = unlabelled
    class_names: list[str]
    source: dict[str, Any]

    def take(self, order: np.ndarray) -> Predictions:
        """The same file with its rows reordered."""
        return Predictions(self.file, self.scores[order], self.videos[order], [self.paths[i] for i in order],
                           self.labels[order], self.class_names, self.source)


def scores_file(path: str | os.PathLike) -> Path:
    """An eval output folder, its predictions.csv or its scores.npz -> the scores.npz path."""
    p = Path(path)
    if p.is_dir():
        p = p / SCORES_FILE
    elif p.name == "predictions.csv":
        p = p.with_name(SCORES_FILE)
    if not p.is_file():
        hint = (f"{p.parent} has predictions.csv but no {SCORES_FILE}; rerun `evl-cache eval --out` to write the "
                f"full probabilities" if (p.parent / "predictions.csv").is_file()
                else "pass a folder written by `evl-cache eval --out` (or `evl-cache ensemble`)")
        raise UserError(f"no prediction scores at {path}: {hint}")
    return p


def load_predictions(path: str | os.PathLike) -> Predictions:
    """Read a scores.npz written by ``evaluate.write_scores``; refuse anything else in one line."""
    p = scores_file(path)
    try:
        with np.load(p, allow_pickle=False) as z:
            data = {k: z[k] for k in ("scores", "video", "path", "label", "class_names", "source")}
        source = json.loads(str(data["source"]))
    except (KeyError, ValueError, OSError) as err:
        raise UserError(f"{p} is not an evl-cache scores file ({err}); rerun `evl-cache eval --out`") from None
    scores, names = data["scores"], [str(n) for n in data["class_names"]]
    n = len(data["path"])
    if scores.ndim != 2 or scores.shape != (n, len(names)) or len(data["label"]) != n or len(data["video"]) != n:
        raise UserError(f"{p} has scores of shape {scores.shape} for {n} videos and {len(names)} classes; "
                        f"the file is damaged, rerun `evl-cache eval --out`")
    paths = [str(s) for s in data["path"]]
    if len(set(paths)) != n:
        dup = next(s for s in paths if paths.count(s) > 1)
        raise UserError(f"{p} lists video {dup} more than once; ensemble only eval outputs (one row per video)")
    return Predictions(p, scores.astype(np.float32), data["video"].astype(np.int64), paths,
                       data["label"].astype(np.int64), names, source)


def align(preds: list[Predictions]) -> list[Predictions]:
    """Reorder every file's rows to the first file's video order; refuse different videos, classes or labels."""
    ref = preds[0]
    out = [ref]
    row = {p: i for i, p in enumerate(ref.paths)}
    for other in preds[1:]:
        if other.class_names != ref.class_names:
            raise UserError(f"{ref.file} and {other.file} have different class lists ({_class_diff(ref, other)}); "
                            f"ensemble models trained on the same classes, in the same order")
        mine, theirs = set(ref.paths), set(other.paths)
        if mine != theirs:
            a, b = sorted(mine - theirs), sorted(theirs - mine)
            raise UserError(f"{ref.file} and {other.file} hold different videos ({len(a)} only in the first"
                            f"{', e.g. ' + a[0] if a else ''}; {len(b)} only in the second"
                            f"{', e.g. ' + b[0] if b else ''}); ensemble predictions on the same videos")
        order = np.array([i for _, i in sorted((row[p], i) for i, p in enumerate(other.paths))], dtype=np.int64)
        moved = other.take(order)
        bad = np.flatnonzero(moved.labels != ref.labels)
        if len(bad):
            raise UserError(f"{ref.file} and {other.file} label video {ref.paths[bad[0]]} differently "
                            f"({len(bad)} videos differ); ensemble predictions on stores with the same labels")
        out.append(moved)
    return out


def _class_diff(a: Predictions, b: Predictions) -> str:
    if len(a.class_names) != len(b.class_names):
        return f"{len(a.class_names)} vs {len(b.class_names)} classes"
    i = next(i for i, (x, y) in enumerate(zip(a.class_names, b.class_names)) if x != y)
    return f"class {i} is {a.class_names[i]!r} vs {b.class_names[i]!r}"


def combine(scores: list[np.ndarray], weights: list[float] | tuple[float, ...]) -> np.ndarray:
    """Weighted mean of probabilities, in float64: sum_i w_i * P_i (the weights sum to 1)."""
    total = np.zeros(scores[0].shape, dtype=np.float64)
    for s, w in zip(scores, weights):
        total += w * s.astype(np.float64)
    return total


def top1(scores: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 over labelled videos; argmax ties go to the lower class index, as in ``compute_metrics``."""
    keep = labels >= 0
    return float((scores[keep].argmax(axis=1) == labels[keep]).mean())


def weight_grid(n: int) -> list[tuple[float, ...]]:
    """Every n-model weighting whose weights are multiples of 0.1 and sum to 1, first model's weight ascending."""
    combos = [c for c in itertools.product(range(GRID_STEPS + 1), repeat=n) if sum(c) == GRID_STEPS]
    return [tuple(k / GRID_STEPS for k in c) for c in combos]


def search_weights(val: list[Predictions]) -> tuple[tuple[float, ...], list[dict[str, Any]]]:
    """The grid weighting with the best validation top-1, and the top-1 of every weighting tried."""
    n = len(val)
    if n > MAX_SEARCHED:
        raise UserError(f"searching weights for {n} models would try {len(weight_grid(n))} weightings; at most "
                        f"{MAX_SEARCHED} models are searched: pass --weights equal or --weights w1,...,w{n}")
    labels = val[0].labels
    if not (labels >= 0).any():
        raise UserError(f"validation predictions {val[0].file} have no labelled videos; "
                        f"evaluate the models on a labelled validation store")
    curve = []
    for w in weight_grid(n):
        curve.append({"weights": list(w), "top1": top1(combine([p.scores for p in val], w), labels)})

    def rank(point: dict[str, Any]) -> tuple:
        w = point["weights"]
        spread = sum((x - 1 / n) ** 2 for x in w)
        return (-point["top1"], round(spread, 9), tuple(-x for x in w))

    best = min(curve, key=rank)
    return tuple(best["weights"]), curve


def parse_weights(spec: str, n: int) -> tuple[float, ...]:
    """``0.3,0.7`` -> normalised weights (one per model, non-negative, not all zero)."""
    try:
        values = [float(v) for v in spec.split(",")]
    except ValueError:
        raise UserError(f"bad --weights {spec!r}; give 'equal' or {n} comma-separated numbers, e.g. "
                        f"{','.join(['0.5'] * n) if n == 2 else ','.join(['1'] * n)}") from None
    if len(values) != n:
        raise UserError(f"--weights {spec!r} gives {len(values)} weights for {n} prediction files; give one per file")
    if any(v < 0 or not np.isfinite(v) for v in values) or sum(values) <= 0:
        raise UserError(f"--weights {spec!r} must be non-negative numbers, not all zero")
    total = sum(values)
    return tuple(v / total for v in values)


@dataclass
class EnsembleResult:
    """What ``ensemble`` computed: per-input and ensemble metrics, the weights and how they were chosen."""

    out_dir: Path
    inputs: list[dict[str, Any]]
    weights: tuple[float, ...]
    rule: str  # "searched", "explicit" or "equal"
    how: str  # the rule in words, for the summary
    metrics: dict[str, Any]
    val_top1: float | None = None
    curve: list[dict[str, Any]] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = []
        for i, inp in enumerate(self.inputs, 1):
            out.append(f"model {i}: {inp['file']}: {_acc(inp['test'])}"
                       + (f"  (val top-1 {100 * inp['val_top1']:.2f}%)" if inp.get("val_top1") is not None else ""))
        w = ", ".join(f"{x:.2f}" for x in self.weights)
        val = f"; val top-1 {100 * self.val_top1:.2f}%" if self.val_top1 is not None else ""
        out.append(f"weights {w}: {self.how}{val}")
        out.append(f"ensemble: {_acc(self.metrics)}")
        out.append(f"wrote {self.out_dir}/" + ", ".join(self.files))
        return out


def _acc(m: dict[str, Any]) -> str:
    if m["top1"] is None:
        return f"{m['videos']} labelled videos: no accuracy to report"
    return f"top-1 {100 * m['top1']:.2f}%  top-{m['topk']} {100 * m['top5']:.2f}%  on {m['videos']} videos"


def ensemble(pred_files: list[str | os.PathLike], out_dir: str | os.PathLike,
             val_files: list[str | os.PathLike] | None = None, weights: str | None = None) -> EnsembleResult:
    """Combine two or more models' test predictions and write the ensemble's outputs to ``out_dir``.

    ``weights``: None (search on ``val_files`` if given, else equal), "equal", or "w1,w2,...".
    Writes metrics.json, predictions.csv, scores.npz and confusion_matrix.png (eval's format, so an
    ensemble can be ensembled again), ensemble.json, and for a two-model search the validation curve PNG.
    """
    if len(pred_files) < 2:
        raise UserError(f"ensemble needs at least two prediction files, got {len(pred_files)}; "
                        f"pass the eval output folders of the models to combine")
    val_files = list(val_files or [])
    if val_files and len(val_files) != len(pred_files):
        raise UserError(f"{len(val_files)} --val files for {len(pred_files)} prediction files; "
                        f"give one validation prediction file per model, in the same order")
    test = align([load_predictions(p) for p in pred_files])
    val = align([load_predictions(p) for p in val_files]) if val_files else []
    if val and val[0].class_names != test[0].class_names:
        raise UserError(f"validation file {val[0].file} and test file {test[0].file} have different class lists "
                        f"({_class_diff(test[0], val[0])}); use the same models' predictions on both stores")
    n = len(test)
    result_warnings = []
    for i, (t, v) in enumerate(zip(test, val), 1):
        a, b = t.source.get("checkpoint"), v.source.get("checkpoint")
        if a and b and a != b:
            result_warnings.append(f"model {i}: test predictions come from {a} but validation ones from {b}")
    curve: list[dict[str, Any]] = []
    if weights is not None and weights.strip().lower() != "equal":
        chosen, rule, how = parse_weights(weights, n), "explicit", "given by --weights"
    elif weights is None and val:
        chosen, curve = search_weights(val)
        rule, how = "searched", f"searched on validation over {len(curve)} weightings in steps of 0.1"
    else:
        chosen, rule = tuple([1.0 / n] * n), "equal"
        how = "equal (--weights equal)" if weights is not None else "equal (no --val or --weights given)"

    labels = test[0].labels
    combined = combine([p.scores for p in test], chosen)
    names = test[0].class_names
    val_top1 = top1(combine([p.scores for p in val], chosen), val[0].labels) if val else None
    inputs = []
    for i, p in enumerate(test):
        m = compute_metrics(p.scores.astype(np.float64), labels, names)
        inputs.append({"file": str(p.file), "source": p.source,
                       "test": {k: m[k] for k in ("videos", "top1", "top5", "topk", "mean_class_accuracy")},
                       "val_file": str(val[i].file) if val else None,
                       "val_top1": top1(val[i].scores, val[i].labels) if val else None})
    metrics = compute_metrics(combined, labels, names)
    metrics["ensemble"] = {"inputs": [inp["file"] for inp in inputs], "weights": list(chosen), "rule": rule}

    out = Path(out_dir)
    videos = test[0].videos
    paths = [""] * (int(videos.max()) + 1 if len(videos) else 0)
    for v, p in zip(videos, test[0].paths):
        paths[v] = p
    write_outputs(out, metrics, combined, videos, labels, paths, names)
    files = ["metrics.json", "predictions.csv", SCORES_FILE, "confusion_matrix.png", "ensemble.json"]
    if rule == "searched" and n == 2:
        from evl_cache.plots import plot_weight_curve

        labels = [Path(inp["file"]).parent.name for inp in inputs]
        if len(set(labels)) < 2 or not all(labels):  # e.g. two folders both named eval
            labels = ["model 1", "model 2"]
        plot_weight_curve([c["weights"][0] for c in curve], [c["top1"] for c in curve], chosen[0],
                          out / CURVE_PLOT, labels)
        files.append(CURVE_PLOT)
    record = {"inputs": inputs, "weights": list(chosen), "rule": rule,
              "tie_rule": "best val top-1, then nearest equal weights, then more weight on the earlier model",
              "val_top1": val_top1, "val_curve": curve,
              "test": {k: metrics[k] for k in ("videos", "top1", "top5", "topk", "mean_class_accuracy")}}
    tmp = out / "ensemble.json.tmp"
    tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
    os.replace(tmp, out / "ensemble.json")
    return EnsembleResult(out, inputs, chosen, rule, how, metrics, val_top1, curve, files, result_warnings)
