"""The recipes in pipelines/: configs agree with the paper, bad input fails in one line, stages resume.

Fast tests check the Table 1 configs against the facts in docs/reference.md, the missing-input failures of
reproduce-table1 (subprocess, as `make` runs it) and the stage ledger. The end-to-end runs
(reproduce-table1 --smoke, the Table 8 recipe, the demo) are marked slow (`make test-slow`).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PIPES = ROOT / "pipelines"
sys.path.insert(0, str(PIPES))

from common import Ledger, extract_plan, load_recipe, run_config  # noqa: E402

from evl_cache.errors import UserError  # noqa: E402
from evl_cache.flops import TABLE1  # noqa: E402

# (config, arch, frames, stride, eval grid, grad accumulation, paper top-1, paper GFLOPs) from docs/reference.md
TABLE1_ROWS = [
    ("k400_vitb16_8f", "ViT-B-16", 8, 16, (3, 1), 1, 82.9, 444),
    ("k400_vitb16_16f", "ViT-B-16", 16, 16, (1, 3), 1, 83.6, 888),
    ("k400_vitb16_32f", "ViT-B-16", 32, 8, (1, 3), 1, 84.2, 1777),
    ("k400_vitl14_8f", "ViT-L-14", 8, 16, (3, 1), 1, 86.3, 2022),
    ("k400_vitl14_16f", "ViT-L-14", 16, 16, (1, 3), 2, 87.0, 4044),
    ("k400_vitl14_32f", "ViT-L-14", 32, 8, (1, 3), 4, 87.3, 8088),
    ("k400_vitl14_336_32f", "ViT-L-14-336", 32, 8, (1, 3), 4, 87.7, 18196),
]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("K400_ROOT", "K400_ANN", "CLIP_B16", "CLIP_L14", "CLIP_L14_336")}
    env.update(extra)
    return env


def _table1(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(PIPES / "reproduce_table1.py"), *args], capture_output=True, text=True,
                          env=_env(**env), cwd=ROOT, timeout=120)


# ------------------------------------------------------------------------------ configs


@pytest.mark.parametrize("name,arch,frames,stride,grid,accum,top1,gflops", TABLE1_ROWS)
def test_table1_config_matches_reference(name, arch, frames, stride, grid, accum, top1, gflops):
    from evl_cache.video import Sampling, ViewSet

    r = load_recipe(ROOT / "configs" / f"{name}.yaml")
    e = r["extract"]
    assert (e["dataset"], e["arch"], e["sampling"], e["frames"], e["stride"]) == ("k400", arch, "dense", frames, stride)
    assert e["decoder_layers"] == 4 and r["model"]["num_layers"] == 4 and e["attention"] == "maps"
    views = ViewSet.parse(e["views"], Sampling("dense", frames, stride))
    assert (views.temporal, views.spatial) == grid
    # the configured grid is the reference's default grid for this sampling
    assert ViewSet.parse("eval", Sampling("dense", frames, stride)) == views
    t = run_config(r, "train.zarr", "val.zarr").train
    assert (t.steps, t.batch_size, t.lr, t.weight_decay, t.warmup_steps, t.label_smoothing, t.min_lr) == \
        (50_000, 256, 4e-4, 0.05, 0, 0.0, 0.0)
    assert t.grad_accum == accum and t.amp == "auto"
    assert all(r["model"][m] for m in ("temporal_conv", "temporal_pos", "temporal_cross_attention"))
    p = r["pipeline"]["paper"]
    assert (p["frames"], p["views"], p["top1"], p["gflops"]) == (frames, 3, top1, gflops)
    assert (p["top1"], p["gflops"]) in {(row[4], row[3]) for row in TABLE1}  # same facts as evl_cache.flops
    plan = extract_plan(r, r["pipeline"]["train_views"], weights="random")
    cfg = plan.config()
    assert cfg.views.kind == "train" and cfg.blocks == [-4, -3, -2, -1] and cfg.sampling.stride == stride


def test_ssv2_and_demo_configs():
    s = load_recipe(ROOT / "configs" / "ssv2_vitb16_8f.yaml")
    assert (s["extract"]["sampling"], s["extract"]["frames"], s["extract"]["decoder_layers"]) == ("segment", 8, 12)
    assert s["extract"]["attention"] == "maps" and s["model"]["num_layers"] == 12 and s["extract"]["views"] == "eval:1x3"
    assert run_config(s, "a", "b").train.steps == 30_000 and s["pipeline"]["paper"]["top1"] == 61.0
    d = load_recipe(ROOT / "configs" / "synthetic_demo.yaml")
    assert d["extract"]["arch"] == "evl_cache/assets/tiny_vit/config.json"
    assert d["extract"]["weights"] == "evl_cache/assets/tiny_vit/weights.safetensors"
    assert run_config(d, "a", "b").train.steps <= 1000  # sized for a CPU demo
    from evl_cache.synth import parse_classes

    assert len(parse_classes(d["pipeline"]["synth"]["classes"])) >= 4


def test_every_config_is_valid_yaml_for_the_cli_extract_section():
    mine = [r[0] for r in TABLE1_ROWS] + ["ssv2_vitb16_8f", "synthetic_demo"]
    for path in [ROOT / "configs" / f"{n}.yaml" for n in mine]:
        doc = yaml.safe_load(path.read_text())
        assert set(doc) <= {"extract", "model", "train", "data", "pipeline"}, path
        assert {"dataset", "arch", "frames", "views", "attention"} <= set(doc["extract"]), path


@pytest.mark.parametrize("name", [r[0] for r in TABLE1_ROWS] + ["ssv2_vitb16_8f", "synthetic_demo"])
def test_configs_are_accepted_by_the_train_cli(name):
    """`evl-cache train --config configs/<row>.yaml` reads the same file as the recipe."""
    from evl_cache.config import load_config

    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    r = load_recipe(ROOT / "configs" / f"{name}.yaml")
    assert cfg.to_dict() == run_config(r, None, None).to_dict()


def test_recipe_rejects_unknown_section(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("extract: {}\ntrainer: {}\n")
    with pytest.raises(UserError, match="unknown section"):
        load_recipe(bad)


# ------------------------------------------------------------------------------ missing inputs


def test_table1_without_k400_fails_in_one_line():
    p = _table1()
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "K400_ROOT is not set" in lines[0] and "SMOKE=1" in lines[0]
    assert not p.stdout.strip()


def test_table1_names_the_missing_path_or_weights(tmp_path):
    p = _table1(K400_ROOT=str(tmp_path / "nope"))
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and "K400_ROOT=" in p.stderr
    p = _table1(K400_ROOT=str(tmp_path))
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and "CLIP_B16 is not set" in p.stderr
    p = _table1("--rows", "k400_vitl14_8f", K400_ROOT=str(tmp_path))
    assert p.returncode == 2 and "CLIP_L14 is not set" in p.stderr
    p = _table1("--rows", "k400_vitb16_8f", K400_ROOT=str(tmp_path), CLIP_B16=str(tmp_path / "missing.pt"))
    assert p.returncode == 2 and "CLIP_B16=" in p.stderr and "not a file" in p.stderr
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"x")
    p = _table1("--rows", "k400_vitb16_8f", K400_ROOT=str(tmp_path), CLIP_B16=str(weights))
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and "K400_ANN" in p.stderr  # no annotations


# ------------------------------------------------------------------------------ the ledger


def test_ledger_skips_done_stages_and_redoes_changed_ones(tmp_path):
    calls = []
    out = tmp_path / "out"

    def fn():
        calls.append(1)
        out.mkdir(exist_ok=True)
        (out / "x").write_text("1")
        return {"n": len(calls)}

    led = Ledger(tmp_path)
    first = led.run("s", {"a": 1}, fn, complete=lambda: (out / "x").is_file(), outputs=[out])
    assert not first.skipped and len(calls) == 1
    again = Ledger(tmp_path).run("s", {"a": 1}, fn, complete=lambda: (out / "x").is_file(), outputs=[out])
    assert again.skipped and again.seconds == first.seconds and again.info == {"n": 1} and len(calls) == 1
    (out / "x").unlink()  # output gone: the stage runs again even with the same key
    Ledger(tmp_path).run("s", {"a": 1}, fn, complete=lambda: (out / "x").is_file(), outputs=[out])
    assert len(calls) == 2
    (out / "stale").write_text("old")  # a changed key removes the old output first
    Ledger(tmp_path).run("s", {"a": 2}, fn, complete=lambda: (out / "x").is_file(), outputs=[out])
    assert len(calls) == 3 and not (out / "stale").exists()
    assert json.loads((tmp_path / "stages.json").read_text())["s"]["key"] == {"a": 2}


def test_ledger_counts_interrupted_time_once_resumed(tmp_path):
    def boom():
        raise KeyboardInterrupt

    led = Ledger(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        led.run("s", {"a": 1}, boom, complete=lambda: False)
    entry = json.loads((tmp_path / "stages.json").read_text())["s"]
    assert entry["done"] is False
    res = Ledger(tmp_path).run("s", {"a": 1}, lambda: {}, complete=lambda: True)
    assert not res.skipped and res.seconds >= entry["seconds"]


def test_ledger_keys_survive_moving_the_checkout(tmp_path):
    """A key naming files inside the checkout is stored relative to it: the same stage run from
    another checkout (a worktree, a moved clone) is still done, and its output is not removed."""
    from common import ROOT, portable_key

    inside = {"weights": str(ROOT / "evl_cache" / "assets" / "w.safetensors"), "other": "/elsewhere/x", "n": [1]}
    assert portable_key(inside) == {"weights": "evl_cache/assets/w.safetensors", "other": "/elsewhere/x", "n": [1]}
    clone = tmp_path / "clone"
    moved = {"weights": str(clone / "evl_cache" / "assets" / "w.safetensors"), "other": "/elsewhere/x", "n": [1]}
    assert portable_key(moved, root=clone) == portable_key(inside)
    out = tmp_path / "work" / "out"
    led = Ledger(tmp_path / "work")
    led.run("s", inside, lambda: out.mkdir(parents=True) or {}, complete=out.is_dir, outputs=[out])
    again = Ledger(tmp_path / "work").run("s", inside, lambda: {}, complete=out.is_dir, outputs=[out])
    assert again.skipped and out.is_dir()


def test_weights_are_stamped_by_content_and_legacy_stamps_of_the_same_file_are_kept(tmp_path):
    """A copy of the weights in another clone (new mtime) is the same cache; other bytes are a new one; a
    stage recorded with the old (size, mtime) stamp of this very file is kept, not redone."""
    import shutil

    from common import legacy_weights_stamp, upgrade_legacy_weights_stamp, weights_stamp

    w = tmp_path / "w.safetensors"
    w.write_bytes(b"weights" * 100)
    copy = tmp_path / "clone" / "w.safetensors"
    copy.parent.mkdir()
    shutil.copy(w, copy)
    os.utime(copy, (1, 1))
    assert weights_stamp(str(w)) == weights_stamp(str(copy)) and weights_stamp(str(w))[0] == "sha256"
    assert legacy_weights_stamp(str(w)) != legacy_weights_stamp(str(copy))
    assert weights_stamp(str(tmp_path / "none")) is None and weights_stamp("random") is None
    out = tmp_path / "work" / "store"
    calls = []

    def fn():
        calls.append(1)
        out.mkdir(parents=True, exist_ok=True)
        return {}

    led = Ledger(tmp_path / "work")
    led.run("extract", {"plan": 1, "weights_file": legacy_weights_stamp(str(w))}, fn, complete=out.is_dir, outputs=[out])
    led = Ledger(tmp_path / "work")
    key = {"plan": 1, "weights_file": weights_stamp(str(w))}
    upgrade_legacy_weights_stamp(led, "extract", str(w), key["weights_file"])
    assert led.run("extract", key, fn, complete=out.is_dir, outputs=[out]).skipped and len(calls) == 1
    # an old stamp of other bytes is not upgraded: the stage is redone
    led = Ledger(tmp_path / "work2")
    led.run("extract", {"plan": 1, "weights_file": [1, 2.0]}, fn, complete=out.is_dir, outputs=[])
    upgrade_legacy_weights_stamp(led, "extract", str(w), key["weights_file"])
    assert not led.run("extract", key, fn, complete=out.is_dir, outputs=[]).skipped and len(calls) == 3


def test_weights_are_hashed_once_per_file_version(tmp_path, monkeypatch):
    """A recipe stamps the same weights for every extraction stage: the file is hashed once, and again
    only when it is rewritten (new bytes, new mtime)."""
    import common
    from evl_cache import backbone

    hashed = []
    real = backbone.file_sha256
    monkeypatch.setattr(backbone, "file_sha256", lambda p: hashed.append(p) or real(p))
    w = tmp_path / "w.safetensors"
    w.write_bytes(b"a" * 64)
    first = common.weights_stamp(str(w))
    assert common.weights_stamp(str(w)) == first and len(hashed) == 1
    w.write_bytes(b"b" * 64)  # same size, in place
    os.utime(w, ns=(os.stat(w).st_mtime_ns + 1_000_000, os.stat(w).st_mtime_ns + 1_000_000))
    assert common.weights_stamp(str(w)) == ["sha256", real(w)] != first and len(hashed) == 2


def test_ledger_never_removes_outside_its_work_dir(tmp_path):
    outside = tmp_path / "precious"
    outside.mkdir()
    led = Ledger(tmp_path / "work")
    led.run("s", {"a": 1}, lambda: {}, complete=lambda: True, outputs=[outside])
    Ledger(tmp_path / "work").run("s", {"a": 2}, lambda: {}, complete=lambda: True, outputs=[outside])
    assert outside.is_dir()


# ------------------------------------------------------------------------------ end to end (slow)


def _run(script: str, *args: str, timeout: int = 1200, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, str(PIPES / script), "--no-progress", *args], capture_output=True, text=True,
                       env=_env(), cwd=ROOT, timeout=timeout)
    assert p.returncode == 0 or not check, p.stdout[-3000:] + p.stderr[-3000:]
    return p


@pytest.mark.slow
def test_reproduce_table1_smoke_end_to_end(tmp_path):
    _run("reproduce_table1.py", "--smoke", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out"))
    table = (tmp_path / "out" / "table1.md").read_text()
    assert "SMOKE RUN" in table and "NOT Kinetics-400" in table
    data = json.loads((tmp_path / "out" / "table1.json").read_text())
    assert data["smoke"] and [r["name"] for r in data["rows"]] == [r[0] for r in TABLE1_ROWS]
    for r in data["rows"]:
        assert 0 <= r["top1"] <= 1 and r["stages"]["extract_train"]["bytes"] > 0
        assert abs(r["counted_gflops"] - r["paper"]["gflops"]) / r["paper"]["gflops"] < 0.07
    assert (tmp_path / "out" / "table1_accuracy_vs_gflops.png").stat().st_size > 10_000
    again = _run("reproduce_table1.py", "--smoke", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out"))
    assert again.stdout.count("[skip]") == 1 + 4 * 7 and "[done]" not in again.stdout


def small_synthetic_recipe(tmp_path: Path) -> Path:
    """The demo recipe on 4 classes x (4 train, 2 val) videos: an ablation end to end in minutes."""
    cfg = load_recipe(ROOT / "configs" / "synthetic_demo.yaml")
    cfg.pop("_path")
    cfg["pipeline"]["synth"].update(classes="moving_left,moving_right,static_circle,static_square",
                                  train_per_class=4, val_per_class=2)
    small = tmp_path / "small.yaml"
    small.write_text(yaml.safe_dump(cfg))
    return small


@pytest.mark.slow
def test_ablation_table8_from_one_cache(tmp_path):
    small = small_synthetic_recipe(tmp_path)
    p = _run("ablation_table8.py", "--config", str(small), "--work", str(tmp_path / "work"),
             "--out", str(tmp_path / "out"), "--steps", "2")
    assert p.stdout.count("extract") >= 2
    md = (tmp_path / "out" / "table8.md").read_text()
    assert md.count("\n| ") >= 9 and "total with one cache" in md
    data = json.loads((tmp_path / "out" / "table8.json").read_text())
    assert len(data["results"]) == 8 and len({tuple(r["combo"]) for r in data["results"]}) == 8
    assert data["payoff"]["per_run_s"] > data["payoff"]["cached_s"]
    assert (tmp_path / "out" / "table8.png").is_file()
    # one cache: the extraction stages ran once, every training read the same stores
    stages = json.loads((tmp_path / "work" / "stages.json").read_text())
    assert sum(k.startswith("extract") for k in stages) == 2 and [k for k in stages if "sweep" in k] == ["ablation_sweep_train"]
    assert [k for k in stages if k.endswith("_train") and not k.startswith("extract")] == ["ablation_sweep_train"]
    assert stages["ablation_sweep_train"]["info"]["members"] == ["ablation_" + "".join(map(str, c)) for c in
                                                                  [(0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (1, 0, 1), (0, 1, 1), (1, 1, 1)]]
    # the random-init baseline: its own cache pair of the same videos, the paper's 5 combinations
    assert {tuple(r["combo"]) for r in data["random_init"]} == {(0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 1)}
    rstages = json.loads((tmp_path / "work" / "random_init" / "stages.json").read_text())
    assert "synth" not in rstages and sum(k.startswith("extract") for k in rstages) == 2
    assert "random-init backbone" in md and "points over no temporal module" in md


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    p = _run("demo.py", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out"), timeout=1800)
    assert "demo finished: top-1" in p.stdout
    report = (tmp_path / "out" / "report.md").read_text()
    for needle in ("top-1", "motion classes", "appearance classes", "Time per stage", "bytes on disk"):
        assert needle in report
    numbers = json.loads((tmp_path / "out" / "report.json").read_text())
    assert numbers["cache_bytes"] > 0 and set(numbers["stage_seconds"]) == {"synth", "extract_train", "extract_eval",
                                                                           "train", "eval"}
    for png in ("loss.png", "confusion_matrix.png"):
        assert (tmp_path / "out" / png).stat().st_size > 5_000


# ------------------------------------------------------------------------------ storage formats vs accuracy


def test_format_recipe_selects_each_format_at_extraction():
    from format_accuracy import BASELINE, FORMATS, RUN_ORDER, format_recipe, select_formats

    assert sorted(RUN_ORDER) == sorted(f.name for f in FORMATS) and RUN_ORDER[0] == BASELINE

    recipe = load_recipe(ROOT / "configs" / "synthetic_demo.yaml")
    plans = {f.name: extract_plan(format_recipe(recipe, f), "eval:1x1", num_cpus=1) for f in FORMATS}
    assert (plans["int8"].dtype, plans["int8"].attn_dtype, plans["int8"].attn_topk) == ("int8", "float16", 0)
    assert (plans["int8_u8maps"].dtype, plans["int8_u8maps"].attn_dtype) == ("int8", "uint8")
    assert plans["top8"].attn_topk == 8 and plans["fp8"].dtype == "float8_e4m3"
    # the plans differ only in the format keys, so the ledger keys differ and the caches are separate
    base = plans[BASELINE].key()
    for name, plan in plans.items():
        diff = {k for k, v in plan.key().items() if base[k] != v}
        assert diff <= {"dtype", "attn_dtype", "attn_topk", "layout"} and (diff or name == BASELINE), name
    assert plans["prefix8"].layout == "prefix" and plans["prefix8"].dtype == "float8_e4m3"
    # the V rows share one 8-view prefix store and train on its first V views
    views = [f for f in FORMATS if f.name.startswith("views")]
    assert [f.use_views for f in views] == [1, 2, 4, 8] and {f.cache for f in views} == {"views8"}
    assert {format_recipe(recipe, f)["pipeline"]["train_views"] for f in views} == {"train:8"}
    assert recipe["extract"]["dtype"] == "float16"  # the recipe itself is not modified
    assert [f.name for f in select_formats("top8,int8")] == [BASELINE, "int8", "top8"]
    with pytest.raises(UserError, match="unknown format.*int4"):
        select_formats("int4")


def test_format_table_keeps_the_v_rows_apart_from_the_storage_formats(tmp_path):
    """A V row trains on V fixed augmentations of one store: its own table and plot, never a format
    verdict (a V row 8 points below float16 must not read as a failing storage format)."""
    from format_accuracy import BASELINE, FORMATS, plot, plot_views, write_table

    recipe = load_recipe(ROOT / "configs" / "synthetic_demo.yaml")
    top1 = {BASELINE: 0.93, "int8": 0.925, "views1": 0.836, "views8": 0.861}
    formats = [f for f in FORMATS if f.name in top1]
    rows = {f.name: {"top1": top1[f.name], "top5": 1.0, "motion": top1[f.name], "appearance": top1[f.name],
                     "videos": 280, "feature_format": f.dtype, "map_format": f.attn_dtype, "train_views": f.use_views or 1,
                     "bytes_per_view": 1000 if f.name in (BASELINE, "int8") else 134, "disk_bytes": 1, "disk_bytes_per_view": 1,
                     "extract_s": 1.0, "train_s": 2.0, "train_store": f"runs/{f.name}"} for f in formats}
    result = {"rows": rows, "formats": formats, "smoke": False, "backbone": "tiny", "threads": 2, "wall_s": 1.0,
              "recipe": recipe}
    data = write_table(tmp_path, result)
    md = (tmp_path / "table.md").read_text()
    assert "1 of 1 formats within 1 point" in md and "## Cached augmented views (V)" in md
    assert "| 8 | 86.1 | -6.90 |" in md and "prefix fp16, 8 augmented views" not in md
    verdict = {r["name"]: r["pass"] for r in data["rows"]}
    assert verdict == {BASELINE: True, "int8": True, "views1": None, "views8": None}
    plot(tmp_path, result)
    assert plot_views(tmp_path, result).stat().st_size > 10_000


@pytest.mark.slow
def test_format_accuracy_smoke_has_every_row(tmp_path):
    from format_accuracy import FORMATS

    from evl_cache.store import open_store

    args = ("--smoke", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out"))
    _run("format_accuracy.py", *args, timeout=900)
    md = (tmp_path / "out" / "table.md").read_text()
    assert "SMOKE RUN" in md and (tmp_path / "out" / "top1_vs_bytes.png").stat().st_size > 10_000
    for f in FORMATS:
        assert f.train_views is not None or f"| {f.label} |" in md, f.label
    assert "## Cached augmented views (V)" in md and (tmp_path / "out" / "top1_vs_views.png").stat().st_size > 10_000
    data = json.loads((tmp_path / "out" / "table.json").read_text())
    rows = {r["name"]: r for r in data["rows"]}
    assert list(rows) == [f.name for f in FORMATS] and not [r for r in data["rows"] if "error" in r]
    for f in FORMATS:
        r = rows[f.name]
        store = open_store(str(ROOT / r["train_store"]) if not Path(r["train_store"]).is_absolute() else r["train_store"])
        # each row was trained from a store that really holds its format
        assert store.attrs["dtype"].split(":")[0] == f.dtype and r["bytes_per_view"] == store.raw_bytes_per_view()
        assert (f"top{f.attn_topk}" in store.attrs["attn_format"]) == bool(f.attn_topk)
        assert ("uint8" in store.attrs["attn_format"]) == (f.attn_dtype == "uint8")
        assert 0 <= r["top1"] <= 1 and r["disk_bytes"] > 0 and "delta" in r and "pass" in r
    size = {n: r["bytes_per_view"] for n, r in rows.items()}
    assert size["int8_u8maps"] < size["top8"] < size["top16"] < size["int8"] < size["u8maps"] < size["float16"] < size["float32"]
    assert size["fp8"] == size["int8"]
    again = _run("format_accuracy.py", *args)
    assert again.stdout.count("[skip]") == 1 + 4 * len(FORMATS) and "[done]" not in again.stdout


@pytest.mark.slow
def test_ablation_table6_from_one_cache(tmp_path):
    small = small_synthetic_recipe(tmp_path)
    _run("ablation_table6.py", "--config", str(small), "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out"),
         "--steps", "2")
    data = json.loads((tmp_path / "out" / "table6.json").read_text())
    tags = [r["tag"] for r in data["results"]]
    assert tags == ["depth1", "depth2", "depth3", "depth4", "maps1", "maps2", "pool_none", "pool_time", "pool_space"]
    assert all(0 <= r["top1"] <= 1 for r in data["results"])
    md = (tmp_path / "out" / "table6.md").read_text()
    assert md.count("\n| ") >= 10 and (tmp_path / "out" / "table6.png").is_file()
    stages = json.loads((tmp_path / "work" / "stages.json").read_text())
    assert sum(k.startswith("extract") for k in stages) == 2 and [k for k in stages if "sweep" in k] == ["table6_sweep_train"]
    # each row's decoder read what it says: its checkpoint's config
    for tag, (layers, blocks, pool) in {"depth1": (1, [3], "none"), "maps2": (4, [2, 2, 3, 3], "none"),
                                        "pool_space": (4, [0, 1, 2, 3], "spatial")}.items():
        saved = json.loads((tmp_path / "work" / "table6" / tag / "model.json").read_text())
        dc = saved["decoder"]
        assert (dc["num_layers"], dc["layer_blocks"], dc["pool"]) == (layers, blocks, pool), saved


def test_table6_paper_values_become_a_column_and_bad_files_are_refused(tmp_path):
    """--paper-values: a YAML of row tag -> the paper's top-1 %; a wrong tag or value is one clear error
    (before any training), and the rows it names get a paper column in table6.md."""
    from ablation_table6 import load_paper_values, rows_for, write_report

    tags = [r["tag"] for r in rows_for(4)]
    good = tmp_path / "paper.yaml"
    good.write_text("depth4: 82.9\npool_space: 80.1\n")
    assert load_paper_values(good, tags) == {"depth4": 82.9, "pool_space": 80.1} and load_paper_values(None, tags) == {}
    for text, words in (("depth9: 80\n", "unknown row tag(s) depth9"), ("depth4: high\n", "depth4: 'high' is not a top-1"),
                        ("depth4: 182\n", "is not a top-1"), ("- 82.9\n", "expected a mapping"), ("a: [\n", "cannot read it as YAML (")):
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        with pytest.raises(UserError, match=re.escape(words)):
            load_paper_values(bad, tags)
    results = [{**r, "top1": 0.9, "top5": 1.0, "motion": 0.9, "appearance": 0.8} for r in rows_for(4)]
    c = {"kinds": {"a": "motion"}, "dataset": "synthetic", "backbone": "tiny", "train_store": tmp_path / "t.zarr",
         "val_store": tmp_path / "v.zarr"}
    steps = types.SimpleNamespace(steps=10, batch_size=4)
    write_report(tmp_path, results, c, 1.0, 2.0, steps, load_paper_values(good, tags), good)
    md = (tmp_path / "table6.md").read_text()
    assert "| paper top-1 (B/16, K400) |" in md and "| 82.9 |" in md and "| 80.1 |" in md and md.count("| - |") == 7
    assert json.loads((tmp_path / "table6.json").read_text())["paper"] == {"depth4": 82.9, "pool_space": 80.1}
    write_report(tmp_path, results, c, 1.0, 2.0, steps, {})
    assert "paper top-1" not in (tmp_path / "table6.md").read_text()
    p = _run("ablation_table6.py", "--paper-values", str(tmp_path / "bad.yaml"), "--work", str(tmp_path / "work"), check=False)
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1].startswith("error: --paper-values")
    assert not (tmp_path / "work").exists()
    with pytest.raises(UserError, match="cannot read it"):
        load_paper_values(tmp_path / "none.yaml", tags)


def test_table6_paper_tags_follow_the_blocks_the_recipe_caches(tmp_path):
    """--paper-values is checked before any work against the rows of the cache the recipe will build:
    a 6-block recipe has a depth6 row, so its paper value is accepted there and refused at K = 4."""
    from ablation_table6 import load_paper_values, planned_blocks, rows_for

    def args(config: Path, k400: bool = False) -> types.SimpleNamespace:
        return types.SimpleNamespace(config=config, k400=k400)

    assert planned_blocks(args(ROOT / "configs" / "synthetic_demo.yaml")) == 4
    assert planned_blocks(args(ROOT / "configs" / "synthetic_demo.yaml", k400=True)) == 4
    def saved(recipe: dict, name: str) -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump({k: v for k, v in recipe.items() if not k.startswith("_")}))
        return path

    r = load_recipe(ROOT / "configs" / "synthetic_demo.yaml")
    r["extract"]["decoder_layers"] = 6
    six = saved(r, "six.yaml")
    assert planned_blocks(args(six)) == 6
    r["extract"]["blocks"] = "9,10,11"
    assert planned_blocks(args(saved(r, "three.yaml"))) == 3
    paper = tmp_path / "paper.yaml"
    paper.write_text("depth6: 83.0\n")
    assert load_paper_values(paper, [t["tag"] for t in rows_for(planned_blocks(args(six)))]) == {"depth6": 83.0}
    with pytest.raises(UserError, match="unknown row tag"):
        load_paper_values(paper, [t["tag"] for t in rows_for(4)])


def test_ledger_ignores_later_options_at_their_default(tmp_path):
    """A train stage recorded before model.pool/layer_blocks existed (or with absolute checkout paths)
    is still done: its output is not removed and retrained."""
    from common import ROOT, comparable_key

    from evl_cache.config import RunConfig

    new = {"config": RunConfig().to_dict(), "out": "runs/x/train"}
    old = json.loads(json.dumps(new))
    del old["config"]["model"]["pool"], old["config"]["model"]["layer_blocks"], old["config"]["data"]["few_shot"]
    old["out"] = str(ROOT / "runs" / "x" / "train")
    assert comparable_key(old) == comparable_key(new)
    changed = json.loads(json.dumps(new))
    changed["config"]["model"]["pool"] = "temporal"
    assert comparable_key(old) != comparable_key(changed)
    (tmp_path / "stages.json").write_text(json.dumps({"train": {"key": old, "done": True, "seconds": 5.0, "info": {}}}))
    out = tmp_path / "out"
    out.mkdir()
    res = Ledger(tmp_path).run("train", new, lambda: {}, complete=out.is_dir, outputs=[out])
    assert res.skipped and out.is_dir()


@pytest.mark.slow
def test_fewshot_smoke_extracts_one_store_pair_for_every_head(tmp_path):
    """`make fewshot-table SMOKE=1`: the demo config's tiny ViT has no text tower, so the smoke swaps in a
    random tiny CLIP with both; one store pair with emb serves the X-CLIP, text-initialised linear and EVL heads."""
    from evl_cache.store import open_store

    args = ("--smoke", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out"))
    p = _run("fewshot.py", *args, timeout=1500)
    assert "RANDOM tiny CLIP" in p.stdout
    data = json.loads((tmp_path / "out" / "table.json").read_text())
    assert data["smoke"] and not data["unavailable"] and data["zeroshot"] is not None
    assert [(r["head"], r["k"]) for r in data["rows"]] == [(h, k) for h in ("xclip", "linear_text", "evl") for k in (1, 2)]
    classes = data["classes"]
    for r in data["rows"]:
        assert r["videos"] == classes * r["k"] and r["eval_videos"] == classes  # SMOKE: 1 eval video per class
    store = open_store(str(tmp_path / "work" / "cache" / "train.zarr"))
    assert store.attrs["emb"] and store.attrs["attention"] == "maps" and len(store.attrs["blocks"]) == 4
    assert (tmp_path / "out" / "top1_vs_k.png").stat().st_size > 5_000


# ------------------------------------------------------------------------------ transfer to new classes (Table 12 offline)


def test_transfer_split_is_disjoint_and_each_side_has_both_kinds():
    """configs/synthetic_transfer.yaml: the 14 default classes, 7/7, one of each mirror pair per side."""
    from transfer_synthetic import split_classes

    from evl_cache.synth import CLASS_SPECS, DEFAULT_CLASSES

    source, target = split_classes(load_recipe(ROOT / "configs" / "synthetic_transfer.yaml"))
    assert not set(source) & set(target) and sorted(source + target) == sorted(DEFAULT_CLASSES)
    for side in (source, target):
        kinds = [CLASS_SPECS[n].kind for n in side]
        assert kinds.count("motion") == 5 and kinds.count("appearance") == 2
    pairs = [("moving_left", "moving_right"), ("moving_up", "moving_down"), ("rotating_cw", "rotating_ccw"),
             ("growing", "shrinking"), ("approaching", "separating")]
    assert all((a in source) != (b in source) for a, b in pairs)


def test_transfer_refuses_a_class_on_both_sides(tmp_path):
    from transfer_synthetic import split_classes

    r = load_recipe(ROOT / "configs" / "synthetic_transfer.yaml")
    r["pipeline"]["target_classes"] = ["moving_left", "static_cross"]
    with pytest.raises(UserError, match="moving_left in both"):
        split_classes(r)
    r["pipeline"]["target_classes"] = ["moving_sideways"]
    with pytest.raises(UserError, match="target_classes: unknown synthetic class"):
        split_classes(r)


def test_transfer_target_runs_differ_only_in_init_from_and_lr_mult():
    """Same steps, seed, data and optimiser for every target run; fine-tuned ones add init_from and the mult."""
    from transfer_synthetic import settings, target_config, target_seeds

    r = load_recipe(ROOT / "configs" / "synthetic_transfer.yaml")
    runs = settings(r)
    assert [(s.name, s.lr_mult) for s in runs] == [("scratch", None), ("finetune_lr0.1", 0.1), ("finetune_lr1", 1.0)]
    assert target_seeds(r) == [0, 1, 2]
    assert target_config(r, runs[0], Path("t.zarr"), Path("v.zarr"), Path("src/model"), 2).train.seed == 2
    cfgs = [target_config(r, s, Path("t.zarr"), Path("v.zarr"), Path("src/model"), 1).to_dict() for s in runs]
    assert cfgs[0]["train"]["init_from"] is None and cfgs[1]["train"]["init_from"] == "src/model"
    assert [c["train"]["pretrained_lr_mult"] for c in cfgs] == [1.0, 0.1, 1.0]
    for c in cfgs:
        c["train"].pop("init_from"), c["train"].pop("pretrained_lr_mult")
        assert c == cfgs[0] and c["train"]["steps"] == r["pipeline"]["target_steps"]
    r["pipeline"]["finetune_lr_mults"] = "0.1"
    with pytest.raises(UserError, match="finetune_lr_mults must be a list"):
        settings(r)
    for bad in ([0, 0], [], "0", [True], [-1]):
        r["pipeline"]["target_seeds"] = bad
        with pytest.raises(UserError, match="target_seeds must be a list of distinct integers"):
            target_seeds(r)
    del r["pipeline"]["target_seeds"]
    assert target_seeds(r) == [r["train"]["seed"]]


def test_transfer_setting_row_is_the_mean_over_seeds_with_paired_gaps_to_scratch():
    """One row per setting: mean and sample sd of top-1 over seeds, the mean curve over steps every run
    has, and top-1 minus scratch's at the same seed, seed by seed."""
    from transfer_synthetic import Setting, paired_text, summarise_setting

    def run(seed: int, top1: float, curve: list[tuple[int, float]]) -> dict:
        return {"seed": seed, "top1": top1, "motion": top1, "appearance": None, "mean_class": top1, "train_s": 10.0 * (seed + 1),
                "videos": 210, "steps": 80, "taken": None, "fresh": None, "curve": curve}

    scratch_runs = [run(0, 0.50, [(20, 0.2), (40, 0.4)]), run(1, 0.60, [(20, 0.3), (40, 0.5)])]
    scratch = summarise_setting(Setting("scratch", "from scratch"), scratch_runs, None)
    assert scratch["top1"] == pytest.approx(0.55) and scratch["top1_sd"] == pytest.approx(0.0707107, rel=1e-5)
    assert scratch["curve"] == [(20, pytest.approx(0.25)), (40, pytest.approx(0.45))] and scratch["train_s"] == 15.0
    assert scratch["vs_scratch_paired"] is None and scratch["appearance"] is None and scratch["seeds"] == [0, 1]
    tuned = summarise_setting(Setting("finetune_lr1", "x1", 1.0), [run(0, 0.70, [(20, 0.5)]), run(1, 0.55, [(20, 0.4), (40, 0.5)])],
                              scratch_runs)
    assert tuned["vs_scratch_paired"] == [pytest.approx(0.20), pytest.approx(-0.05)]
    assert tuned["curve"] == [(20, pytest.approx(0.45))]  # step 40 is missing from seed 0's curve
    assert paired_text(tuned["vs_scratch_paired"]) == "+7.5 (1 of 2 seeds ahead)" and paired_text(None) == "-"
    one = summarise_setting(Setting("scratch", "from scratch"), scratch_runs[:1], None)
    assert one["top1_sd"] is None and one["top1"] == 0.50
    with pytest.raises(ValueError):  # a setting missing a seed cannot be paired
        summarise_setting(Setting("finetune_lr1", "x1", 1.0), [run(0, 0.7, [])], scratch_runs)


def test_transfer_val_curve_reads_the_validation_records(tmp_path):
    from transfer_synthetic import val_curve

    (tmp_path / "metrics.jsonl").write_text('{"step": 5, "loss": 1.0}\n{"step": 20, "val_top1": 0.5}\n'
                                            '{"step": 10, "val_top1": 0.25}\n')
    assert val_curve(tmp_path) == [(10, 0.25), (20, 0.5)] and val_curve(tmp_path / "none") == []


@pytest.mark.slow
def test_transfer_smoke_end_to_end(tmp_path):
    """`make transfer-demo SMOKE=1`: both class sets extracted, source trained, three target runs, the table;
    the fine-tuned runs take every source tensor but the classifier; a rerun skips every stage."""
    args = ("--smoke", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out"))
    p = _run("transfer_synthetic.py", *args, timeout=1200)
    assert "transfer (SMOKE)" in p.stdout
    data = json.loads((tmp_path / "out" / "table.json").read_text())
    assert data["smoke"] and [r["name"] for r in data["rows"]] == ["scratch", "finetune_lr0.1", "finetune_lr1"]
    scratch, *tuned = data["rows"]
    assert scratch["taken"] is None and all(r["taken"] > 0 and r["fresh"] == ["head.fc.weight", "head.fc.bias"] for r in tuned)
    assert all(r["videos"] == 7 and r["curve"] and r["steps"] == 3 for r in data["rows"])
    assert data["seeds"] == [0, 1] and all([x["seed"] for x in r["runs"]] == [0, 1] for r in data["rows"])
    assert all(len(r["vs_scratch_paired"]) == 2 for r in tuned)
    stages = json.loads((tmp_path / "work" / "stages.json").read_text())
    assert sum(k.startswith("extract_") for k in stages) == 4
    assert sum(k.startswith("train_") and k.endswith(("_seed0", "_seed1")) for k in stages) == 6
    md = (tmp_path / "out" / "table.md").read_text()
    assert "SMOKE RUN" in md and "fine-tuned, pretrained lr x0.1" in md
    assert (tmp_path / "out" / "transfer.png").stat().st_size > 10_000
    again = _run("transfer_synthetic.py", *args, timeout=600)
    assert again.stdout.count("[skip]") == len(stages) and "[done]" not in again.stdout
