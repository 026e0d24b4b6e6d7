"""Training from a tiny real cache store: recipe config, loader, loss going down, exact resume, bad input.

Stores are built with extraction's own work units (decode_video -> BackboneRunner -> write_batches ->
mark) without starting Ray, from videos written with PyAV and a random-init tiny ViT.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import media
from evl_cache.backbone import BackboneSpec
from evl_cache.config import RunConfig, apply_override, decoder_config_for_store, load_config
from evl_cache.errors import UserError
from evl_cache.extract import BackboneRunner, ExtractConfig, extract_serially, store_attributes
from evl_cache.store import create_store, open_store
from evl_cache.train import STATE_FILE, lr_factor, train
from evl_cache.video import Sampling, ViewSet

TINY = str(Path(__file__).parent / "assets" / "tiny_vit.json")
SPEC = BackboneSpec(arch=TINY, weights="random", seed=0)
SAMPLING = Sampling("dense", frames=4, stride=2)


def write_videos(folder: Path, n: int, seed: int = 0) -> tuple[list[str], list[int]]:
    """n short videos, label = direction of motion (class 1 is the mirror image of class 0)."""
    paths, labels = [], []
    for i in range(n):
        frames = media.moving_square_frames(12, seed=seed + i)
        label = i % 2
        if label:
            frames = np.ascontiguousarray(frames[:, :, ::-1])
        paths.append(str(media.write_video(folder / f"v{i}.mp4", frames)))
        labels.append(label)
    return paths, labels


def build_store(path: Path, paths: list[str], labels: list[int], views: ViewSet, *, dtype: str = "float16",
                attention: str = "maps", blocks: list[int] | None = None, class_names=("left", "right"),
                sampling: Sampling = SAMPLING, spec: BackboneSpec = SPEC, shard_size: int = 4,
                compressor: str | None = None, **formats: object) -> str:
    """Extract `paths` into a store at `path` with extract's work units, serially (no Ray).
    ``formats``: ExtractConfig's attn_dtype / attn_topk."""
    blocks = [1, 2] if blocks is None else blocks
    cfg = ExtractConfig(backbone=spec, sampling=sampling, views=views, blocks=blocks, attention=attention,
                        dtype=dtype, shard_size=shard_size, compressor=compressor, **formats)
    probe = BackboneRunner(spec.to_dict(), blocks, attention, "float16", device="cpu").backbone
    attrs = store_attributes(probe.describe(), probe.blocks, cfg, list(class_names), "test", {})
    runner = BackboneRunner(spec.to_dict(), blocks, attention, attrs["dtype"], device="cpu", attn_format=attrs["attn_format"])
    store = create_store(str(path), attrs, paths, labels, shard_size=shard_size, compressor=compressor)
    extract_serially(store, runner, paths, [Path(p).name for p in paths])
    return str(path)


def copy_store(src: str, dst: Path) -> str:
    """A private copy of a shared fixture store, for tests that edit its status or attributes."""
    import shutil

    shutil.copytree(src, dst)
    return str(dst)


def set_status(store_path: str, statuses: dict[int, int]) -> None:
    """Set videos' extraction status (PENDING / DONE / FAILED): the one place tests write the
    per-video table, through the store's own driver-side `mark`, so a layout change lands here only."""
    from evl_cache.store import FAILED

    store = open_store(store_path, mode="r+")
    store.mark({i: {"status": code, "error": "test: marked failed" if code == FAILED else ""}
                for i, code in statuses.items()})


def set_precision(store_path: str, precision: str | None) -> None:
    """Record (or, with None, remove as in stores written before it was recorded) the resolved
    backbone precision in a store's root attributes."""
    store = open_store(store_path, mode="r+")
    attrs = dict(store.group.attrs["evl_cache"])
    backbone = {k: v for k, v in attrs["backbone"].items() if k != "precision"}
    if precision is not None:
        backbone["precision"] = precision
    attrs["backbone"] = backbone
    store.group.attrs["evl_cache"] = attrs


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    paths, labels = write_videos(root / "videos", 8)
    train_store = build_store(root / "train.zarr", paths, labels, ViewSet("train", count=2, temporal=1, spatial=1, seed=0))
    val_store = build_store(root / "val.zarr", paths[:4], labels[:4], ViewSet("eval", count=2, temporal=2, spatial=1))
    return {"root": root, "train": train_store, "val": val_store, "paths": paths, "labels": labels}


def tiny_cfg(stores, **train) -> RunConfig:
    cfg = RunConfig.from_dict({
        "model": {"mlp_dropout": 0.5, "head_dropout": 0.5},
        "train": {"steps": 6, "batch_size": 4, "lr": 1e-3, "checkpoint_every": 3, "eval_every": 3, "log_every": 1,
                  "eval_batch_size": 4, **train},
        "data": {"train_store": stores["train"], "num_workers": 0},
    })
    return cfg


def losses(run: Path, key: str = "loss") -> list[float]:
    return [r[key] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if key in r]


# ------------------------------------------------------------------------------------ config


def test_config_defaults_are_the_reference_recipe():
    cfg = load_config(None)
    t = cfg.train
    assert (t.batch_size, t.lr, t.weight_decay, t.warmup_steps, t.label_smoothing, t.grad_accum) == (256, 4e-4, 0.05, 0, 0.0, 1)
    assert t.betas == [0.9, 0.999] and t.steps == 50_000
    assert cfg.model.temporal_conv and cfg.model.temporal_pos and cfg.model.temporal_cross_attention
    assert cfg.model.mlp_dropout == 0.5 and cfg.model.head_dropout == 0.5


def test_config_yaml_and_overrides(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("train:\n  steps: 10\n  lr: 1.0e-3\nmodel:\n  temporal_pos: false\n")
    cfg = load_config(p, ["train.lr=2e-3", "data.num_workers=0", "train.betas=[0.8, 0.9]"])
    assert cfg.train.steps == 10 and cfg.train.lr == 2e-3 and cfg.train.betas == [0.8, 0.9]
    assert cfg.model.temporal_pos is False and cfg.data.num_workers == 0
    with pytest.raises(UserError, match="unknown key"):
        load_config(p, ["train.learning_rate=1"])
    with pytest.raises(UserError, match="wrong type"):
        load_config(p, ["train.steps=ten"])
    with pytest.raises(UserError, match="section.key=value"):
        apply_override({}, "lr")
    with pytest.raises(UserError, match="multiple of train.grad_accum"):
        load_config(p, ["train.batch_size=10", "train.grad_accum=3"])


def test_lr_schedule_cosine_per_step():
    assert lr_factor(0, 100, 0, 0.0) == 1.0
    assert lr_factor(50, 100, 0, 0.0) == pytest.approx(0.5)
    assert lr_factor(100, 100, 0, 0.0) == pytest.approx(0.0)
    assert lr_factor(0, 100, 10, 0.0) == pytest.approx(0.1)  # warmup ramps to 1 at step 9
    assert lr_factor(9, 100, 10, 0.0) == 1.0


def test_decoder_shape_comes_from_the_store(stores):
    attrs = open_store(stores["train"]).attrs
    d = decoder_config_for_store(load_config(None).model, attrs, "s")
    assert (d.num_layers, d.width, d.heads, d.frames, d.grid, d.num_classes, d.attention_input) == (2, 64, 4, 4, (4, 4), 2, "maps")
    cfg = load_config(None, ["model.frames=8"])
    with pytest.raises(UserError, match="frames=4 but the config says model.frames=8"):
        decoder_config_for_store(cfg.model, attrs, "s")


# ------------------------------------------------------------------------------------ data


def test_epoch_sampler_visits_every_video_once_per_epoch():
    from evl_cache.data import EpochSampler

    s = EpochSampler(np.array([0, 2, 3, 5]), num_views=3, seed=1)
    it = iter(s)
    stream = [next(it) for _ in range(12)]
    for e in range(3):
        epoch = stream[4 * e: 4 * e + 4]
        assert sorted(i // 3 for i in epoch) == [0, 2, 3, 5]
    assert stream[:4] != stream[4:8]  # reshuffled every epoch
    resumed = iter(EpochSampler(np.array([0, 2, 3, 5]), 3, seed=1, start=6))
    assert [next(resumed) for _ in range(6)] == stream[6:]


def test_epoch_sampler_trains_on_the_first_views_only():
    """data.train_views: a V-view cache serves as a smaller one (issue 9's V experiment reads one 8-view store)."""
    from evl_cache.data import EpochSampler

    videos = np.arange(50)
    full = iter(EpochSampler(videos, num_views=8, seed=3))
    same = iter(EpochSampler(videos, num_views=8, seed=3, use_views=8))
    assert [next(full) for _ in range(120)] == [next(same) for _ in range(120)]
    two = iter(EpochSampler(videos, num_views=8, seed=3, use_views=2))
    items = [next(two) for _ in range(200)]
    assert {i % 8 for i in items} == {0, 1}  # only views 0 and 1, both used
    assert sorted(i // 8 for i in items[:50]) == list(range(50))
    with pytest.raises(ValueError, match="outside 0..8"):
        EpochSampler(videos, num_views=8, seed=3, use_views=9)


def test_train_views_beyond_the_store_are_refused(stores, tmp_path):
    cfg = tiny_cfg(stores)
    cfg.data.train_views = 3  # the train store caches 2 views per video
    with pytest.raises(UserError, match="caches 2 view"):
        train(cfg, tmp_path / "run")
    cfg.data.train_views = 1
    summary = train(cfg, tmp_path / "run1", progress=False)
    assert summary.final_loss is not None


def test_loader_batches_match_store_reads_with_a_worker(stores):
    from evl_cache.data import make_loader

    store = open_store(stores["train"])
    batch0 = next(iter(make_loader(stores["train"], 4, train=True, seed=3, num_workers=0)))
    batch1 = next(iter(make_loader(stores["train"], 4, train=True, seed=3, num_workers=1)))
    assert batch0["feats"].shape == (4, 2, 4, 17, 64) and batch0["attn"].shape == (4, 2, 2, 3, 16, 16)
    assert batch0["feats"].dtype == torch.float16
    for k in batch0:
        if k != "formats":  # the batch carries how to decode itself
            assert torch.equal(batch0[k], batch1[k]) and batch0[k].dtype == batch1[k].dtype
    # eval mode: every (video, view) once, in order, last batch partial
    seen = [(int(v), b["feats"].shape[0]) for b in make_loader(stores["val"], 3, train=False) for v in b["video"]]
    assert [v for v, _ in seen] == [0, 0, 1, 1, 2, 2, 3, 3] and seen[-1][1] == 2
    # item 0 of the batch is what the store returns for that (video, view)
    from evl_cache.data import EpochSampler

    first = next(iter(EpochSampler(store.done_indices(), store.num_views, 3)))
    ref = store.read(*divmod(first, store.num_views))
    assert torch.equal(batch0["feats"][0], ref["feats"]) and int(batch0["label"][0]) == int(ref["label"])


# ------------------------------------------------------------------------------------ training


def test_training_reduces_loss(stores, tmp_path):
    cfg = tiny_cfg(stores, steps=30, checkpoint_every=100, log_every=1, lr=2e-3)
    cfg.model.mlp_dropout = cfg.model.head_dropout = 0.0
    summary = train(cfg, tmp_path / "run", progress=False)
    ls = losses(tmp_path / "run")
    assert len(ls) == 30 and all(math.isfinite(v) for v in ls)
    assert np.mean(ls[-5:]) < 0.5 * np.mean(ls[:5])
    assert summary.steps == 30
    for name in ("model.safetensors", "model.json", STATE_FILE, "plots/loss.png", "plots/lr.png", "config.yaml"):
        assert (tmp_path / "run" / name).is_file(), name
    meta = json.loads((tmp_path / "run" / "model.json").read_text())["meta"]
    assert meta["class_names"] == ["left", "right"] and meta["blocks"] == [1, 2]
    assert meta["backbone"]["weights_id"] == "random:0" and meta["eval_views"] == {"temporal": 3, "spatial": 1}
    lrs = [r["lr"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())]
    assert lrs[0] == pytest.approx(2e-3) and lrs[-1] == pytest.approx(2e-3 * lr_factor(29, 30, 0, 0.0))


def test_resume_continues_bit_for_bit(stores, tmp_path):
    full = train(tiny_cfg(stores), tmp_path / "full", progress=False)
    train(tiny_cfg(stores), tmp_path / "cut", until_step=3, progress=False)
    assert len(losses(tmp_path / "cut")) == 3
    with pytest.raises(UserError, match="--resume"):
        train(tiny_cfg(stores), tmp_path / "cut", progress=False)
    resumed = train(tiny_cfg(stores), tmp_path / "cut", resume=True, progress=False)
    assert resumed.start_step == 3 and full.steps == resumed.steps == 6
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")  # exact floats, not approx
    a = open_state(tmp_path / "full" / "model.safetensors")
    b = open_state(tmp_path / "cut" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_exact_with_a_worker_and_grad_accum(stores, tmp_path):
    kw = {"batch_size": 4, "grad_accum": 2, "log_every": 2}  # the cut at 3 falls inside a log window
    full = tiny_cfg(stores, **kw)
    full.data.num_workers = 1
    train(full, tmp_path / "full", progress=False)
    train(tiny_cfg(stores, **kw), tmp_path / "cut", until_step=3, progress=False)  # 0 workers before the cut
    cut = tiny_cfg(stores, **kw)
    cut.data.num_workers = 1
    train(cut, tmp_path / "cut", resume=True, progress=False)
    assert losses(tmp_path / "cut") == losses(tmp_path / "full") and len(losses(tmp_path / "full")) == 3
    assert losses(tmp_path / "cut", "loss_mean") == losses(tmp_path / "full", "loss_mean")


def test_resume_refuses_changed_recipe(stores, tmp_path):
    train(tiny_cfg(stores), tmp_path / "r", until_step=3, progress=False)
    with pytest.raises(UserError, match="train.lr was 0.001, now 0.01"):
        train(tiny_cfg(stores, lr=1e-2), tmp_path / "r", resume=True, progress=False)
    with pytest.raises(UserError, match="nothing to resume"):
        train(tiny_cfg(stores), tmp_path / "empty", resume=True, progress=False)


def test_validation_metrics_logged(stores, tmp_path):
    cfg = tiny_cfg(stores, steps=3)
    cfg.data.val_store = stores["val"]
    s = train(cfg, tmp_path / "v", progress=False)
    recs = [json.loads(x) for x in (tmp_path / "v" / "metrics.jsonl").read_text().splitlines()]
    vals = [r for r in recs if "val_top1" in r]
    assert len(vals) == 1 and vals[0]["step"] == 3
    assert s.val_top1 == vals[0]["val_top1"]
    # recomputed independently: the step-3 decoder (saved as model.*) on each val video's cached views
    from evl_cache.checkpoints import load_checkpoint
    from test_predict import cached_logits

    model, _ = load_checkpoint(tmp_path / "v" / "model")
    scores = np.stack([cached_logits(model, stores["val"], v).softmax(-1).mean(0).numpy() for v in range(4)])
    correct = scores.argmax(1) == np.array(stores["labels"][:4])
    assert vals[0]["val_top1"] == pytest.approx(correct.mean())
    per_class = [correct[np.array(stores["labels"][:4]) == c].mean() for c in (0, 1)]
    assert vals[0]["val_mean_class"] == pytest.approx(np.mean(per_class))
    assert (tmp_path / "v" / "plots" / "val_accuracy.png").is_file()
    meta = json.loads((tmp_path / "v" / "model.json").read_text())["meta"]
    assert meta["eval_views"] == {"temporal": 2, "spatial": 1}  # the val store's grid


def test_bad_stores_are_refused(stores, tmp_path):
    cfg = tiny_cfg(stores)
    cfg.data.train_store = str(tmp_path / "missing.zarr")
    with pytest.raises(UserError, match="no cache store"):
        train(cfg, tmp_path / "a", progress=False)
    other = build_store(tmp_path / "three.zarr", stores["paths"][:2], [0, 2], ViewSet("eval", count=1, temporal=1, spatial=1),
                        class_names=("a", "b", "c"))
    cfg = tiny_cfg(stores)
    cfg.data.val_store = other
    with pytest.raises(UserError, match=r"3 classes vs 2"):
        train(cfg, tmp_path / "b", progress=False)
    blocks = build_store(tmp_path / "blocks.zarr", stores["paths"][:2], [0, 1], ViewSet("eval", count=1, temporal=1, spatial=1),
                         blocks=[2])
    cfg.data.val_store = blocks
    with pytest.raises(UserError, match="blocks=\\[2\\]"):
        train(cfg, tmp_path / "c", progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_attention_none_store_needs_tca_off(stores, tmp_path):
    s = build_store(tmp_path / "none.zarr", stores["paths"][:4], stores["labels"][:4],
                    ViewSet("train", count=1, temporal=1, spatial=1), attention="none")
    cfg = tiny_cfg(stores, steps=2)
    cfg.data.train_store = s
    with pytest.raises(UserError, match="temporal_cross_attention=false"):
        train(cfg, tmp_path / "x", progress=False)
    cfg.model.temporal_cross_attention = False
    assert train(cfg, tmp_path / "x", progress=False).steps == 2


def test_stores_of_different_precision_are_refused(stores, tmp_path):
    """Features computed in bf16 and fp16 differ; a train/val pair must share the recorded precision."""
    t = copy_store(stores["train"], tmp_path / "t.zarr")
    v = copy_store(stores["val"], tmp_path / "v.zarr")
    set_precision(t, "bf16")
    set_precision(v, "fp16")
    cfg = tiny_cfg(stores, steps=1)
    cfg.data.train_store, cfg.data.val_store = t, v
    with pytest.raises(UserError, match=r"backbone.precision='fp16' but the train store has backbone.precision='bf16'; "
                                        r"extract both stores with the same --precision"):
        train(cfg, tmp_path / "a", progress=False)
    assert not (tmp_path / "a").exists()
    set_precision(v, None)  # a store written before precision was recorded: unknown, not refused
    train(cfg, tmp_path / "b", progress=False)
    meta = json.loads((tmp_path / "b" / "model.json").read_text())["meta"]
    assert meta["backbone"]["precision"] == "bf16"  # checkpoint meta records the train store's precision


def test_partial_stores_are_refused_unless_allowed(stores, tmp_path):
    from evl_cache.store import FAILED, PENDING

    t = copy_store(stores["train"], tmp_path / "t.zarr")
    set_status(t, {1: PENDING, 6: PENDING, 3: FAILED})
    cfg = tiny_cfg(stores, steps=2, log_every=1)
    cfg.data.train_store = t
    with pytest.raises(UserError, match=r"2 of 8 videos are still pending; finish it by rerunning the same "
                                        r"`evl-cache extract` command .* or pass --allow-partial"):
        train(cfg, tmp_path / "a", progress=False)
    assert not (tmp_path / "a").exists()
    cfg.data.allow_partial = True
    lines: list[str] = []
    summary = train(cfg, tmp_path / "a", progress=False, echo=lines.append)
    assert summary.store_videos["train"] == {"total": 8, "done": 5, "failed": 1, "pending": 2}
    assert lines == [f"train store {t}: 8 videos, 5 done, 1 failed, 2 pending; 1 failed videos are skipped; "
                     f"2 pending videos are left out (--allow-partial)"]
    recs = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert recs[0]["epoch"] == pytest.approx(4 / 5)  # an epoch is the 5 done videos
    from typer.testing import CliRunner

    from evl_cache.cli import app

    args = ["train", "--train-store", t, "--steps", "1", "--batch", "4", "--workers", "0", "--no-progress"]
    res = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "c")])
    assert isinstance(res.exception, UserError) and "--allow-partial" in str(res.exception)
    res = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "d"), "--allow-partial"])
    assert res.exit_code == 0, res.output
    assert res.output.splitlines()[0] == lines[0]
    # a partial val store is refused too, and the flag is a config field recipes can set
    v = copy_store(stores["val"], tmp_path / "v.zarr")
    set_status(v, {0: PENDING})
    cfg = tiny_cfg(stores, steps=1)
    cfg.data.val_store = v
    with pytest.raises(UserError, match=f"store {v} is partly extracted: 1 of 4"):
        train(cfg, tmp_path / "b", progress=False)
    assert load_config(None, ["data.allow_partial=true"]).data.allow_partial is True


def open_state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def test_default_recipe_file_restates_the_defaults():
    root = Path(__file__).parent.parent / "configs"
    assert load_config(root / "train_default.yaml") == load_config(None)
    for f in root.glob("train_*.yaml"):
        load_config(f)  # every shipped recipe parses


def test_cli_train_eval_predict(stores, tmp_path):
    """The three commands end to end in-process, and a bad input as one line with exit code 2."""
    import subprocess
    import sys

    from typer.testing import CliRunner

    from evl_cache.cli import app

    r = CliRunner()
    res = r.invoke(app, ["train", "--train-store", stores["train"], "--val-store", stores["val"], "--out", str(tmp_path / "run"),
                         "--steps", "4", "--batch", "4", "--workers", "0", "--no-progress", "--set", "train.eval_every=2"])
    assert res.exit_code == 0, res.output
    assert "trained steps 0..4" in res.output and "validation top-1" in res.output
    assert f"train store {stores['train']}: 8 videos, 8 done, 0 failed, 0 pending" in res.output
    assert f"val store {stores['val']}: 4 videos, 4 done, 0 failed, 0 pending" in res.output
    res = r.invoke(app, ["eval", "--checkpoint", str(tmp_path / "run" / "model"), "--store", stores["val"],
                         "--out", str(tmp_path / "ev"), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "4 videos x 2 views: top-1" in res.output and (tmp_path / "ev" / "confusion_matrix.png").is_file()
    assert "(store: 4 done, 0 failed, 0 pending)" in res.output
    res = r.invoke(app, ["predict", "--checkpoint", str(tmp_path / "run" / "model.json"), stores["paths"][0], "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "probability" in res.output and "left" in res.output and "right" in res.output
    proc = subprocess.run([sys.executable, "-m", "evl_cache.cli", "train", "--train-store", stores["train"],
                           "--out", str(tmp_path / "x"), "--set", "model.frames=16"], capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "model.frames=16" in lines[0], proc.stderr


def test_chunk_reader_equals_zarr(stores):
    """The store's own reader (one positioned read per chunk) returns exactly what Zarr's codec pipeline
    decodes (which checks every chunk's crc32c itself), for every (video, view) and every array."""
    from evl_cache.data import StoreDataset

    for path in (stores["train"], stores["val"]):
        ds, st = StoreDataset(path), open_store(path)
        for video in range(st.num_videos):
            for view in range(st.num_views):
                got = ds.read(video, view)
                assert torch.equal(got["feats"], torch.from_numpy(np.asarray(st.array("feats")[video, view])))
                assert torch.equal(got["attn"], torch.from_numpy(np.asarray(st.array("attn")[video, view])))
