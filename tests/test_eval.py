"""Evaluation: hand-checkable metrics, view averaging, end-to-end outputs, refusing mismatched inputs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from evl_cache.checkpoints import save_checkpoint
from evl_cache.errors import UserError
from evl_cache.evaluate import compute_metrics, evaluate, video_scores
from evl_cache.store import open_store
from evl_cache.train import checkpoint_meta
from evl_cache.video import ViewSet
from test_predict import cached_logits, random_decoder
from test_train import build_store, write_videos


def test_video_score_is_mean_of_view_softmax():
    # video 7 has two views whose argmaxes disagree; the mean of probabilities decides (not logits)
    view_probs = np.array([[0.9, 0.1, 0.0], [0.2, 0.3, 0.5], [0.0, 0.0, 1.0]])
    videos, scores = video_scores(view_probs, np.array([7, 7, 3]))
    assert videos.tolist() == [3, 7]
    np.testing.assert_allclose(scores, [[0, 0, 1], [0.55, 0.2, 0.25]])


def test_metrics_by_hand():
    names = ["a", "b", "c", "d", "e", "f"]
    scores = np.array([
        [0.50, 0.20, 0.10, 0.10, 0.05, 0.05],  # label a: top-1 correct
        [0.50, 0.20, 0.10, 0.10, 0.05, 0.05],  # label b: rank 2 -> top-5 only
        [0.30, 0.25, 0.20, 0.15, 0.06, 0.04],  # label f: rank 6 -> wrong for top-5 too
        [0.10, 0.60, 0.10, 0.10, 0.05, 0.05],  # label b: correct
        [0.10, 0.60, 0.10, 0.10, 0.05, 0.05],  # unlabelled: ignored
    ])
    labels = np.array([0, 1, 5, 1, -1])
    m = compute_metrics(scores, labels, names)
    assert m["videos"] == 4
    assert m["top1"] == pytest.approx(2 / 4) and m["top5"] == pytest.approx(3 / 4)
    assert m["per_class"]["a"] == {"support": 1, "accuracy": 1.0}
    assert m["per_class"]["b"] == {"support": 2, "accuracy": 0.5}
    assert m["per_class"]["f"] == {"support": 1, "accuracy": 0.0}
    assert m["per_class"]["c"] == {"support": 0, "accuracy": None}
    assert m["mean_class_accuracy"] == pytest.approx((1.0 + 0.5 + 0.0) / 3)
    assert m["confusion"][1] == [1, 1, 0, 0, 0, 0] and m["confusion"][5][0] == 1


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    paths, labels = write_videos(root / "videos", 4)
    views = ViewSet("eval", count=2, temporal=2, spatial=1)
    store = build_store(root / "s.zarr", paths, labels, views, dtype="float32")
    attrs = open_store(store).attrs
    model = random_decoder(attrs, seed=3)
    ck = save_checkpoint(root / "ck", model, checkpoint_meta(attrs, attrs, store, 0))
    return {"root": root, "paths": paths, "labels": labels, "store": store, "ck": ck, "model": model, "views": views}


def test_evaluate_end_to_end(setup, tmp_path):
    m = evaluate(setup["ck"], setup["store"], tmp_path / "out", batch_size=3, device="cpu")
    # recompute independently: per video, mean of softmax over its two cached views
    scores = np.stack([cached_logits(setup["model"], setup["store"], v).softmax(-1).mean(0).numpy() for v in range(4)])
    labels = np.array(setup["labels"])
    pred = scores.argmax(1)
    assert m["top1"] == pytest.approx(float((pred == labels).mean()))
    assert m["top5"] == 1.0  # two classes: the label is always in the top 2
    assert m["videos"] == 4 and m["views"] == 2
    for name in ("metrics.json", "predictions.csv", "confusion_matrix.png"):
        assert (tmp_path / "out" / name).is_file()
    rows = list(csv.DictReader(open(tmp_path / "out" / "predictions.csv")))
    assert [Path(r["path"]).name for r in rows] == ["v0.mp4", "v1.mp4", "v2.mp4", "v3.mp4"]
    names = ["left", "right"]
    for r, s, y in zip(rows, scores, labels):
        assert r["label"] == names[y] and r["pred"] == names[int(s.argmax())]
        assert float(r["prob"]) == pytest.approx(float(s.max()), abs=1e-6)
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["top1"] == m["top1"] and sum(map(sum, saved["confusion"])) == 4


def test_evaluate_refuses_mismatched_inputs(setup, tmp_path):
    with pytest.raises(UserError, match="no cache store"):
        evaluate(setup["ck"], str(tmp_path / "nope.zarr"), device="cpu")
    three = build_store(tmp_path / "three.zarr", setup["paths"][:2], [0, 2], setup["views"], class_names=("a", "b", "c"))
    with pytest.raises(UserError, match="3 classes but the checkpoint's head has 2"):
        evaluate(setup["ck"], three, device="cpu")
    other_blocks = build_store(tmp_path / "b.zarr", setup["paths"][:2], [0, 1], setup["views"], blocks=[0, 2])
    with pytest.raises(UserError, match="blocks"):
        evaluate(setup["ck"], other_blocks, device="cpu")
    # corrupt checkpoint: flip bytes in the weights file
    bad = tmp_path / "bad"
    save_checkpoint(bad, setup["model"], {"class_names": ["left", "right"]})
    w = bad.with_suffix(".safetensors")
    data = bytearray(w.read_bytes())
    data[-8:] = b"\x00" * 8
    w.write_bytes(bytes(data))
    with pytest.raises(UserError, match="corrupt"):
        evaluate(bad, setup["store"], device="cpu")
    assert not (tmp_path / "out").exists()


def test_imported_checkpoint_with_partial_meta_evaluates(setup, tmp_path):
    """A checkpoint that records only some facts (as `import-evl` writes) is checked on those facts."""
    attrs = open_store(setup["store"]).attrs
    partial = {"backbone": {"arch": attrs["backbone"]["arch"]}, "blocks": attrs["blocks"], "frames": attrs["frames"]}
    ck = save_checkpoint(tmp_path / "imp", setup["model"], partial)
    assert evaluate(ck, setup["store"], device="cpu")["videos"] == 4
    wrong = save_checkpoint(tmp_path / "imp2", setup["model"], {**partial, "backbone": {"arch": "ViT-B-16"}})
    with pytest.raises(UserError, match="backbone"):
        evaluate(wrong, setup["store"], device="cpu")
