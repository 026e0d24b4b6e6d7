"""Score ensembles: format shared with eval, weight search against brute force, refusals, outputs."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from evl_cache.cli import app, main
from evl_cache.ensemble import ensemble, load_predictions, weight_grid
from evl_cache.errors import UserError
from evl_cache.evaluate import compute_metrics, write_outputs

NAMES = ["walk", "run", "jump", "swim", "climb", "throw", "catch"]  # 7 classes
C = len(NAMES)


def write_preds(out: Path, scores: np.ndarray, labels: np.ndarray, paths: list[str], videos: np.ndarray | None = None,
                names: list[str] = NAMES, checkpoint: str = "runs/m/model") -> Path:
    """A prediction folder written by eval's own writer (so a change of eval's format breaks this test)."""
    videos = np.arange(len(paths)) if videos is None else videos
    store_paths = [""] * (int(videos.max()) + 1)
    for v, p in zip(videos, paths):
        store_paths[v] = p
    metrics = compute_metrics(scores.astype(np.float64), labels, names)
    metrics.update(checkpoint=checkpoint, store="stores/x.zarr", views=3)
    write_outputs(out, metrics, scores, videos, labels, store_paths, names)
    return out


def softmaxish(rng: np.random.Generator, n: int) -> np.ndarray:
    """Random probability rows (float32, summing to 1)."""
    return rng.dirichlet(np.ones(C), size=n).astype(np.float32)


def complementary(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels and two models' scores: A is right on two thirds of the videos, B on the other third.

    Where A is wrong it is only mildly so, while B's mistakes are confident: the best mix leans to A
    but not all the way, so the searched weight is neither 0, 0.5 nor 1.
    """
    labels = rng.integers(0, C, n)
    a, b = softmaxish(rng, n) * 0.2, softmaxish(rng, n) * 0.2
    for i, y in enumerate(labels):
        wrong = (y + 1 + rng.integers(0, C - 1)) % C
        if i % 3:
            a[i, y] += rng.uniform(0.2, 0.6)
            b[i, wrong] += rng.uniform(0.3, 0.9)
        else:
            b[i, y] += rng.uniform(0.4, 0.9)
            a[i, wrong] += rng.uniform(0.05, 0.3)
    a /= a.sum(1, keepdims=True)
    b /= b.sum(1, keepdims=True)
    return labels, a.astype(np.float32), b.astype(np.float32)


def brute_force_w(a: np.ndarray, b: np.ndarray, labels: np.ndarray) -> tuple[float, dict[float, float]]:
    """Best w for w*A + (1-w)*B by looping over videos; ties to the w nearest 0.5, then the larger w."""
    acc = {}
    for k in range(11):
        w = k / 10
        hits = 0
        for i in range(len(labels)):
            mixed = [w * float(a[i, c]) + (1 - w) * float(b[i, c]) for c in range(C)]
            hits += max(range(C), key=lambda c: (mixed[c], -c)) == labels[i]
        acc[w] = hits / len(labels)
    best = max(acc.values())
    w = sorted((abs(w - 0.5), -w) for w, t in acc.items() if t == best)[0]
    return -w[1], acc


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("ens")
    rng = np.random.default_rng(7)
    val_y, val_a, val_b = complementary(rng, 90)
    test_y, test_a, test_b = complementary(rng, 60)
    val_paths = [f"/data/val/v{i:03d}.mp4" for i in range(90)]
    test_paths = [f"/data/test/t{i:03d}.mp4" for i in range(60)]
    # model B was evaluated on a store that lists the same videos in another order
    perm = rng.permutation(60)
    d = {
        "A": write_preds(root / "A", test_a, test_y, test_paths, checkpoint="runs/a/model"),
        "B": write_preds(root / "B", test_b[perm], test_y[perm], [test_paths[i] for i in perm],
                         videos=np.arange(60)[perm], checkpoint="runs/b/model"),
        "A_val": write_preds(root / "A_val", val_a, val_y, val_paths, checkpoint="runs/a/model"),
        "B_val": write_preds(root / "B_val", val_b, val_y, val_paths, checkpoint="runs/b/model"),
    }
    return {"root": root, "dirs": d, "test": (test_y, test_a, test_b), "val": (val_y, val_a, val_b),
            "test_paths": test_paths}


def test_eval_writer_stores_full_probabilities(models):
    test_y, test_a, _ = models["test"]
    p = load_predictions(models["dirs"]["A"])
    assert p.class_names == NAMES and p.scores.dtype == np.float32 and p.scores.shape == (60, C)
    np.testing.assert_array_equal(p.scores, test_a)
    assert p.paths == models["test_paths"] and p.labels.tolist() == test_y.tolist()
    assert p.source["checkpoint"] == "runs/a/model" and p.source["format"] == 1
    with np.load(p.file, allow_pickle=False) as z:  # readable without pickle
        assert set(z.files) == {"scores", "video", "path", "label", "class_names", "source"}


def test_ensemble_of_a_model_with_itself_is_the_model(models, tmp_path):
    a = models["dirs"]["A"]
    r = ensemble([a, a], tmp_path / "aa", val_files=[models["dirs"]["A_val"]] * 2)
    assert r.weights == (0.5, 0.5)  # every weighting ties; nearest equal weights wins
    out = load_predictions(tmp_path / "aa")
    np.testing.assert_array_equal(out.scores, load_predictions(a).scores)
    mine, theirs = json.loads((tmp_path / "aa" / "metrics.json").read_text()), json.loads((a / "metrics.json").read_text())
    for key in ("top1", "top5", "mean_class_accuracy", "per_class", "confusion"):
        assert mine[key] == theirs[key]
    assert (tmp_path / "aa" / "predictions.csv").read_text() == (a / "predictions.csv").read_text()


def test_weight_search_matches_brute_force_and_is_applied_to_test(models, tmp_path):
    val_y, val_a, val_b = models["val"]
    test_y, test_a, test_b = models["test"]
    w, acc = brute_force_w(val_a, val_b, val_y)
    # the case is only a test if mixing matters: the best w is strictly inside and beats both models
    assert 0 < w < 1 and w != 0.5 and acc[w] > max(acc[0.0], acc[1.0]), acc
    d = models["dirs"]
    r = ensemble([d["A"], d["B"]], tmp_path / "ab", val_files=[d["A_val"], d["B_val"]])
    assert r.rule == "searched" and r.weights == pytest.approx((w, 1 - w))
    record = json.loads((tmp_path / "ab" / "ensemble.json").read_text())
    assert [round(c["weights"][0], 1) for c in record["val_curve"]] == [k / 10 for k in range(11)]
    for c in record["val_curve"]:
        assert c["top1"] == pytest.approx(acc[round(c["weights"][0], 1)])
    # the test metrics are compute_metrics of the combined test scores (B's rows matched to A's by path)
    expect = compute_metrics(w * test_a.astype(np.float64) + (1 - w) * test_b.astype(np.float64), test_y, NAMES)
    saved = json.loads((tmp_path / "ab" / "metrics.json").read_text())
    for key in ("videos", "top1", "top5", "mean_class_accuracy", "per_class", "confusion"):
        assert saved[key] == pytest.approx(expect[key]) if isinstance(expect[key], float) else saved[key] == expect[key]
    assert saved["ensemble"]["weights"] == pytest.approx([w, 1 - w])
    for name in ("metrics.json", "predictions.csv", "scores.npz", "confusion_matrix.png", "ensemble.json",
                 "val_top1_vs_weight.png"):
        assert (tmp_path / "ab" / name).stat().st_size > 0
    rows = list(csv.DictReader(open(tmp_path / "ab" / "predictions.csv")))
    assert [r["path"] for r in rows] == models["test_paths"]


def test_ensemble_output_can_be_ensembled_again(models, tmp_path):
    d = models["dirs"]
    first = ensemble([d["A"], d["B"]], tmp_path / "ab", weights="equal")
    again = ensemble([first.out_dir, d["A"]], tmp_path / "aba", weights="0.5,0.5")
    _, test_a, test_b = models["test"]
    combined = 0.5 * (0.5 * test_a.astype(np.float64) + 0.5 * test_b) + 0.5 * test_a
    np.testing.assert_allclose(load_predictions(again.out_dir).scores, combined, atol=1e-6)


def test_explicit_weights_via_cli(models, tmp_path):
    d = models["dirs"]
    test_y, test_a, test_b = models["test"]
    res = CliRunner().invoke(app, ["ensemble", str(d["A"]), str(d["B"]), "--out", str(tmp_path / "e"),
                                   "--weights", "3,7"])  # normalised to 0.3, 0.7
    assert res.exit_code == 0, res.output
    lines = res.output.strip().splitlines()
    assert lines[0].startswith("model 1: ") and lines[1].startswith("model 2: ")
    assert lines[2].startswith("weights 0.30, 0.70: given by --weights") and lines[3].startswith("ensemble: top-1 ")
    expect = compute_metrics(0.3 * test_a.astype(np.float64) + 0.7 * test_b.astype(np.float64), test_y, NAMES)
    saved = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert saved["top1"] == pytest.approx(expect["top1"]) and saved["confusion"] == expect["confusion"]
    assert f"{100 * expect['top1']:.2f}%" in lines[3]
    assert not (tmp_path / "e" / "val_top1_vs_weight.png").exists()
    # --weights wins over --val: no search, the validation top-1 of the given weights is reported
    val_y, val_a, val_b = models["val"]
    r = ensemble([d["A"], d["B"]], tmp_path / "ev", val_files=[d["A_val"], d["B_val"]], weights="0.3,0.7")
    assert r.rule == "explicit" and r.curve == [] and r.weights == pytest.approx((0.3, 0.7))
    assert r.val_top1 == pytest.approx(float(((0.3 * val_a + 0.7 * val_b).argmax(1) == val_y).mean()))


def test_no_val_no_weights_means_equal_weights(models, tmp_path):
    d = models["dirs"]
    r = ensemble([d["A"], d["B"], d["A"]], tmp_path / "eq")
    assert r.rule == "equal" and r.weights == pytest.approx((1 / 3,) * 3)
    assert "equal (no --val or --weights given)" in "\n".join(r.lines())


def test_three_model_search_covers_the_simplex(models, tmp_path):
    assert len(weight_grid(3)) == 66 and len(weight_grid(4)) == 286
    assert all(abs(sum(w) - 1) < 1e-9 for w in weight_grid(4))
    d = models["dirs"]
    r = ensemble([d["A"], d["B"], d["A"]], tmp_path / "s3", val_files=[d["A_val"], d["B_val"], d["A_val"]])
    assert len(r.curve) == 66 and r.val_top1 == max(c["top1"] for c in r.curve)
    with pytest.raises(UserError, match="at most 4 models"):
        ensemble([d["A"]] * 5, tmp_path / "s5", val_files=[d["A_val"]] * 5)
    r5 = ensemble([d["A"]] * 5, tmp_path / "e5", val_files=[d["A_val"]] * 5, weights="equal")
    assert r5.weights == pytest.approx((0.2,) * 5)


def run_main(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """`evl-cache ensemble ARGS` through the CLI entry point (its UserError handling), in process."""
    monkeypatch.setattr(sys, "argv", ["evl-cache", "ensemble", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    return exit_info.value.code, capsys.readouterr().err


def test_refuses_mismatched_inputs_in_one_line(models, tmp_path, monkeypatch, capsys):
    test_y, test_a, _ = models["test"]
    paths = models["test_paths"]
    other_videos = write_preds(tmp_path / "other", test_a, test_y, paths[:-1] + ["/data/test/elsewhere.mp4"])
    renamed = write_preds(tmp_path / "renamed", test_a, test_y, paths,
                          names=NAMES[:2] + ["leap"] + NAMES[3:])
    relabelled = write_preds(tmp_path / "relabelled", test_a, (test_y + 1) % C, paths)
    a = str(models["dirs"]["A"])
    cases = [
        ((a, str(other_videos)), "hold different videos (1 only in the first, e.g. /data/test/t059.mp4"),
        ((a, str(renamed)), "different class lists (class 2 is 'jump' vs 'leap')"),
        ((a, str(relabelled)), "label video"),
        ((a, str(tmp_path / "nowhere")), "no prediction scores"),
        ((a,), "at least two prediction files"),
        ((a, a, "--weights", "1,2,3"), "gives 3 weights for 2"),
        ((a, a, "--val", a), "1 --val files for 2"),
    ]
    for args, needle in cases:
        out = tmp_path / "out"
        code, err = run_main(monkeypatch, capsys, *args, "--out", str(out))
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert code == 2 and len(lines) == 1 and needle in lines[0], (args, err)
        assert not out.exists()


def test_old_eval_output_without_scores_gets_a_hint(models, tmp_path):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "predictions.csv").write_text("path,label,pred,prob,top5\n")
    with pytest.raises(UserError, match="rerun `evl-cache eval --out`"):
        ensemble([models["dirs"]["A"], tmp_path / "old"], tmp_path / "out")
