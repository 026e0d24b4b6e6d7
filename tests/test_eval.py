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


NAMES = ("a", "b", "c", "d", "e", "f")  # 6 classes: top-5 is a real test (rank 6 is a miss)
LABELS = [0, 1, 2, 3, 4, 5, 1, 3]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    paths, _ = write_videos(root / "videos", len(LABELS))
    views = ViewSet("eval", count=2, temporal=2, spatial=1)
    store = build_store(root / "s.zarr", paths, LABELS, views, dtype="float32", class_names=NAMES)
    attrs = open_store(store).attrs
    model = random_decoder(attrs, seed=9)
    ck = save_checkpoint(root / "ck", model, checkpoint_meta(attrs, attrs, store, 0))
    return {"root": root, "paths": paths, "labels": LABELS, "store": store, "ck": ck, "model": model, "views": views}


def expected_metrics(setup, videos: list[int]) -> dict:
    """Top-1/top-5/mean-class accuracy of `videos` recomputed from the cached views, without evaluate's code."""
    scores = np.stack([cached_logits(setup["model"], setup["store"], v).softmax(-1).mean(0).numpy() for v in videos])
    labels = np.array([setup["labels"][v] for v in videos])
    rank = (scores > scores[np.arange(len(videos)), labels][:, None]).sum(1)  # 0 = the label scored highest
    per_class = [float((rank[labels == c] == 0).mean()) for c in sorted(set(labels.tolist()))]
    return {"scores": scores, "labels": labels, "top1": float((rank == 0).mean()), "top5": float((rank < 5).mean()),
            "mean_class": float(np.mean(per_class))}


def test_evaluate_end_to_end(setup, tmp_path):
    m = evaluate(setup["ck"], setup["store"], tmp_path / "out", batch_size=3, device="cpu")
    want = expected_metrics(setup, list(range(8)))
    # the fixture is informative: some labels rank 2..5 and one ranks 6th (out of top-5)
    assert 0 < want["top1"] < want["top5"] < 1, want
    assert m["top1"] == pytest.approx(want["top1"]) and m["top5"] == pytest.approx(want["top5"]) and m["topk"] == 5
    assert m["mean_class_accuracy"] == pytest.approx(want["mean_class"])
    assert m["videos"] == 8 and m["views"] == 2
    assert m["store_videos"] == {"total": 8, "done": 8, "failed": 0, "pending": 0}
    for name in ("metrics.json", "predictions.csv", "confusion_matrix.png"):
        assert (tmp_path / "out" / name).is_file()
    rows = list(csv.DictReader(open(tmp_path / "out" / "predictions.csv")))
    assert [Path(r["path"]).name for r in rows] == [f"v{i}.mp4" for i in range(8)]
    for r, s, y in zip(rows, want["scores"], want["labels"]):
        assert r["label"] == NAMES[y] and r["pred"] == NAMES[int(s.argmax())]
        assert float(r["prob"]) == pytest.approx(float(s.max()), abs=1e-6)
        assert [c.split(":")[0] for c in r["top5"].split(";")] == [NAMES[c] for c in np.argsort(-s)[:5]]
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["top1"] == m["top1"] and sum(map(sum, saved["confusion"])) == 8
    assert saved["store_videos"] == m["store_videos"]


def test_partial_store_needs_allow_partial_and_counts_are_reported(setup, tmp_path):
    from typer.testing import CliRunner

    from evl_cache.cli import app
    from evl_cache.store import FAILED, PENDING
    from test_train import copy_store, set_status

    store = copy_store(setup["store"], tmp_path / "p.zarr")
    set_status(store, {1: PENDING, 4: PENDING, 7: FAILED})
    with pytest.raises(UserError, match=r"2 of 8 videos are still pending; .*or pass --allow-partial to use its 5 done"):
        evaluate(setup["ck"], store, tmp_path / "refused", device="cpu")
    assert not (tmp_path / "refused").exists()
    m = evaluate(setup["ck"], store, tmp_path / "out", device="cpu", allow_partial=True)
    done = [0, 2, 3, 5, 6]
    want = expected_metrics(setup, done)
    assert 0 < want["top1"] < 1 and want["top5"] < 1, want
    assert m["videos"] == 5 and m["top1"] == pytest.approx(want["top1"]) and m["top5"] == pytest.approx(want["top5"])
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["store_videos"] == {"total": 8, "done": 5, "failed": 1, "pending": 2}
    rows = list(csv.DictReader(open(tmp_path / "out" / "predictions.csv")))
    assert [Path(r["path"]).name for r in rows] == [f"v{i}.mp4" for i in done]
    r = CliRunner()
    res = r.invoke(app, ["eval", "--checkpoint", str(setup["ck"]), "--store", store, "--device", "cpu"])
    assert isinstance(res.exception, UserError) and "--allow-partial" in str(res.exception)
    res = r.invoke(app, ["eval", "--checkpoint", str(setup["ck"]), "--store", store, "--device", "cpu", "--allow-partial"])
    assert res.exit_code == 0, res.output
    assert res.output.strip().endswith("(store: 5 done, 1 failed, 2 pending)"), res.output
    # failed videos alone are not partial: no flag needed, and they are counted
    failed_only = copy_store(setup["store"], tmp_path / "f.zarr")
    set_status(failed_only, {0: FAILED, 5: FAILED})
    m = evaluate(setup["ck"], failed_only, device="cpu")
    assert m["videos"] == 6 and m["store_videos"] == {"total": 8, "done": 6, "failed": 2, "pending": 0}


def test_evaluate_refuses_a_store_of_other_precision(setup, tmp_path):
    from test_train import copy_store, set_precision

    attrs = dict(open_store(setup["store"]).attrs)
    attrs["backbone"] = {**attrs["backbone"], "precision": "bf16"}
    ck = save_checkpoint(tmp_path / "bf16", setup["model"], checkpoint_meta(attrs, attrs, setup["store"], 0))
    store = copy_store(setup["store"], tmp_path / "s.zarr")
    set_precision(store, "fp32")
    with pytest.raises(UserError, match=r"has backbone.precision='fp32' but the checkpoint was trained with "
                                        r"backbone.precision='bf16'; evaluate on a store extracted with --precision bf16"):
        evaluate(ck, store, device="cpu")
    set_precision(store, "bf16")
    assert evaluate(ck, store, device="cpu")["videos"] == 8
    set_precision(store, None)  # a store written before precision was recorded: unknown, accepted
    assert evaluate(ck, store, device="cpu")["videos"] == 8


def test_evaluate_refuses_mismatched_inputs(setup, tmp_path):
    with pytest.raises(UserError, match="no cache store"):
        evaluate(setup["ck"], str(tmp_path / "nope.zarr"), device="cpu")
    three = build_store(tmp_path / "three.zarr", setup["paths"][:2], [0, 2], setup["views"], class_names=("a", "b", "c"))
    with pytest.raises(UserError, match="3 classes but the checkpoint's head has 6"):
        evaluate(setup["ck"], three, device="cpu")
    other_blocks = build_store(tmp_path / "b.zarr", setup["paths"][:2], [0, 1], setup["views"], blocks=[0, 2],
                               class_names=NAMES)
    with pytest.raises(UserError, match="blocks"):
        evaluate(setup["ck"], other_blocks, device="cpu")
    # corrupt checkpoint: flip bytes in the weights file
    bad = tmp_path / "bad"
    save_checkpoint(bad, setup["model"], {"class_names": list(NAMES)})
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
    assert evaluate(ck, setup["store"], device="cpu")["videos"] == 8
    wrong = save_checkpoint(tmp_path / "imp2", setup["model"], {**partial, "backbone": {"arch": "ViT-B-16"}})
    with pytest.raises(UserError, match="backbone"):
        evaluate(wrong, setup["store"], device="cpu")
