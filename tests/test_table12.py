"""Table 12 (UCF-101 / HMDB-51 fine-tuning): the configs' values, the recipe's refusal without data,
and (slow) the whole recipe on generated videos laid out like UCF-101 and HMDB-51. Also the summary
lines bench-gpu prints for the Table 3 and Table 5 benchmarks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PIPES = ROOT / "pipelines"
sys.path.insert(0, str(PIPES))

from common import extract_plan, load_recipe, run_config  # noqa: E402

from evl_cache.errors import UserError  # noqa: E402

ROWS = [("ucf101_vitl14_32f", "ucf101", "ViT-L-14", 600), ("ucf101_vitl14_336_32f", "ucf101", "ViT-L-14-336", 1000),
        ("hmdb51_vitl14_32f", "hmdb51", "ViT-L-14", 600), ("hmdb51_vitl14_336_32f", "hmdb51", "ViT-L-14-336", 1000)]
VARS = ("UCF101_ROOT", "UCF101_ANN", "HMDB51_ROOT", "HMDB51_ANN", "CLIP_L14", "CLIP_L14_336", "K400_CKPT_L14",
        "K400_CKPT_L14_336")


@pytest.mark.parametrize("name,dataset,arch,steps", ROWS)
def test_table12_config_values(name, dataset, arch, steps):
    from evl_cache.video import Sampling, ViewSet

    r = load_recipe(ROOT / "configs" / f"{name}.yaml")
    e = r["extract"]
    assert (e["dataset"], e["arch"], e["sampling"], e["frames"], e["stride"]) == (dataset, arch, "dense", 32, 2)
    views = ViewSet.parse(e["views"], Sampling("dense", 32, 2))
    assert (views.kind, views.temporal, views.spatial) == ("eval", 2, 3)
    assert e["decoder_layers"] == 4 == r["model"]["num_layers"]
    k400 = load_recipe(ROOT / "configs" / f"{r['pipeline']['k400_row']}.yaml")
    assert (k400["extract"]["arch"], k400["extract"]["frames"]) == (arch, 32)  # the checkpoint's decoder shape
    assert r["pipeline"]["splits"] == [1, 2, 3] and r["pipeline"]["paper"]["views"] == 6
    t = run_config(r, "a", "b", train={"init_from": "runs/k400/model"}).train
    assert (t.steps, t.pretrained_lr_mult, t.pretrained_wd_mult, t.init_from) == (steps, 0.1, 1.0, "runs/k400/model")
    assert (t.lr, t.weight_decay, t.warmup_steps, t.min_lr, t.grad_accum) == (4e-4, 0.05, 0, 0.0, 4)
    cfg = extract_plan(r, r["pipeline"]["train_views"], weights="random").config()
    assert cfg.views.kind == "train" and cfg.sampling.stride == 2 and cfg.sampling.frames == 32


def test_table12_config_needs_init_from_for_the_train_cli():
    """pretrained_lr_mult scales weights that only init_from provides: the config alone is refused in one line."""
    from evl_cache.config import load_config

    path = ROOT / "configs" / "ucf101_vitl14_32f.yaml"
    with pytest.raises(UserError, match="train.init_from"):
        load_config(path)
    assert load_config(path, ["train.init_from=runs/k400/model"]).train.pretrained_lr_mult == 0.1


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in VARS}
    env.update(extra)
    return env


def _recipe(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(PIPES / "finetune_table12.py"), *args], capture_output=True, text=True,
                          env=_env(**env), cwd=ROOT, timeout=120)


def test_without_data_it_says_what_it_needs_in_one_line(tmp_path):
    p = _recipe("--work", str(tmp_path / "w"))
    assert p.returncode == 2 and p.stdout == ""
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "UCF101_ROOT" in lines[0] and "HMDB51_ROOT" in lines[0] and "SMOKE=1" in lines[0]
    assert not (tmp_path / "w").exists()


def test_names_the_missing_checkpoint_and_bad_split_folder(tmp_path):
    ucf = tmp_path / "ucf"
    ucf.mkdir()
    weights = tmp_path / "clip.pt"
    weights.write_bytes(b"x")
    p = _recipe("--rows", "ucf101_vitl14_32f", UCF101_ROOT=str(ucf), CLIP_L14=str(weights))
    assert p.returncode == 2 and "K400_CKPT_L14 is not set" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    p = _recipe("--rows", "ucf101_vitl14_32f", UCF101_ROOT=str(ucf), CLIP_L14=str(weights),
                K400_CKPT_L14=str(tmp_path / "nope" / "model"))
    assert p.returncode == 2 and "not an evl-cache checkpoint" in p.stderr
    (tmp_path / "model.json").write_text("{}")
    p = _recipe("--rows", "ucf101_vitl14_32f", UCF101_ROOT=str(ucf), CLIP_L14=str(weights),
                K400_CKPT_L14=str(tmp_path / "model"))
    assert p.returncode == 2 and "classInd.txt" in p.stderr and "UCF101_ANN" in p.stderr
    p = _recipe("--rows", "nope")
    assert p.returncode == 2 and "unknown --rows" in p.stderr


def test_bench_gpu_summary_of_tables_3_and_5():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_gpu import table3_and_5

    lat = {"models": [{"arch": "ViT-B-16", "frames": 8, "precision": "fp16", "stop_reason": "out of memory at batch 512",
                       "points": [{"batch": 1, "total_s": 0.02, "clips_per_s": 50.0},
                                  {"batch": 256, "total_s": 1.0, "clips_per_s": 256.0}]}]}
    step = {"batch": 64, "median_s": {"pool": 0.5, "evl": 1.0}, "evl_over_pool": 2.0}
    lines = "\n".join(table3_and_5(lat, step))
    assert "| ViT-B-16 8f fp16 | 20.0 ms | 256 (out of memory at batch 512) | 256.0 clips/s |" in lines
    assert "x2.00" in lines and "unfrozen" not in lines
    assert table3_and_5(None, None) == []


@pytest.mark.slow
def test_finetune_table12_smoke_end_to_end(tmp_path):
    p = subprocess.run([sys.executable, str(PIPES / "finetune_table12.py"), "--smoke", "--no-progress", "--work",
                        str(tmp_path / "work"), "--out", str(tmp_path / "out"), "--threads", "2"],
                       capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=1800)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    data = json.loads((tmp_path / "out" / "table12.json").read_text())
    assert data["smoke"] and [r["name"] for r in data["rows"]] == ["ucf101_vitl14_32f", "hmdb51_vitl14_32f"]
    for r in data["rows"]:
        assert [s["split"] for s in r["splits"]] == [1, 2, 3]
        for s in r["splits"]:
            # 4 classes x 3 videos: split n tests one video per class, trains on the other two
            assert (s["videos"], s["train_videos"], s["views"]) == (4, 8, 6)
            assert s["init_fresh"] == ["head.fc.weight", "head.fc.bias"] and s["init_taken"] > 10
            assert 0 <= s["top1"] <= 1
        assert abs(r["mean_top1"] - sum(s["top1"] for s in r["splits"]) / 3) < 1e-9
    md = (tmp_path / "out" / "table12.md").read_text()
    assert "SMOKE RUN" in md and "not in docs/reference.md" in md
    assert (tmp_path / "out" / "table12_splits.png").stat().st_size > 5_000


def test_init_from_flag_satisfies_a_finetuning_config(tmp_path):
    """`--init-from` joins the overrides before validation: the config's pretrained_lr_mult needs it."""
    from typer.testing import CliRunner

    from evl_cache.cli import app
    from evl_cache.errors import UserError

    args = ["train", "--config", str(ROOT / "configs" / "ucf101_vitl14_32f.yaml"), "--out", str(tmp_path / "run")]
    refused = CliRunner().invoke(app, args)
    assert isinstance(refused.exception, UserError) and "init_from" in str(refused.exception)
    passed = CliRunner().invoke(app, [*args, "--init-from", str(tmp_path / "k400" / "model")])
    assert isinstance(passed.exception, UserError) and "no training store given" in str(passed.exception)
    assert not (tmp_path / "run").exists()
