"""Stage 1 end to end on a real local Ray: stores, tensors, the bad-input zoo, determinism, resume after kill -9."""

from __future__ import annotations

import csv
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from evl_cache.backbone import BackboneSpec, build_backbone
from evl_cache.datasets import load_manifest
from evl_cache.extract import ExtractConfig, extract
from evl_cache.store import DONE, FAILED, PENDING, open_store
from evl_cache.video import Sampling, ViewSet, build_views
from media import moving_square_frames, write_video, write_zoo

TINY = str(Path(__file__).parent / "assets" / "tiny_vit.json")
EVL = [sys.executable, "-m", "evl_cache.cli"]


def make_dataset(root: Path, n_good: int = 6, zoo: bool = False) -> Path:
    """Good videos in three containers (+ optionally the bad-input zoo) and a `list` manifest CSV."""
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    exts = [".mp4", ".avi", ".webm"]
    for i in range(n_good):
        name = f"good{i}{exts[i % 3]}"
        write_video(root / name, moving_square_frames(20 + 3 * i, 40, 56, seed=i))
        rows.append((name, ["left", "right"][i % 2]))
    if zoo:
        for name, path in write_zoo(root).items():
            rows.append((path.name, "left"))
        rows.append(("does_not_exist.mp4", "right"))
    csv_path = root / "train.csv"
    with open(csv_path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label"])
        writer.writerows(rows)
    return csv_path


def tree_bytes(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def cli_args(root: Path, csv_path: Path, store: Path, *extra: str) -> list[str]:
    return [*EVL, "extract", "--dataset", "list", "--root", str(root), "--annotations", str(csv_path),
            "--store", str(store), "--arch", TINY, "--weights", "random", "--seed", "3",
            "--frames", "4", "--stride", "2", "--num-cpus", "2", *extra]


@pytest.fixture(scope="module")
def zoo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    csv_path = make_dataset(root, n_good=6, zoo=True)
    manifest = load_manifest("list", str(root), "train", annotations=str(csv_path))
    sampling = Sampling("dense", 4, 2)
    cfg = ExtractConfig(backbone=BackboneSpec(TINY, "random", seed=3), sampling=sampling,
                        views=ViewSet.parse("eval", sampling), shard_size=4, num_cpus=2, progress=False)
    summary = extract(manifest, str(root / "store"), cfg)
    return root, manifest, cfg, summary


def test_store_schema_shapes_and_statuses(zoo_run):
    root, manifest, cfg, summary = zoo_run
    store = open_store(str(root / "store"))
    a = store.attrs
    assert a["frames"] == 4 and a["tokens"] == 17 and a["width"] == 64 and a["grid"] == [4, 4]
    assert a["blocks"] == [0, 1, 2] and a["attention"] == "maps" and a["dtype"] == "float16"
    assert a["num_views"] == 3 and a["views"]["temporal"] == 3 and a["sampling"]["stride"] == 2
    assert a["manifest_sha256"] == manifest.sha256() and a["class_names"] == ["left", "right"]
    assert a["backbone"]["precision"] == "fp32"  # auto on a machine without GPUs
    assert store.array("feats").shape == (len(manifest), 3, 3, 4, 17, 64)
    assert store.array("attn").shape == (len(manifest), 3, 3, 2, 3, 16, 16)
    status = store.status()
    assert list(status[:6]) == [DONE] * 6
    assert PENDING not in status
    errors = dict(zip([Path(p).name for p in store.paths()], store.errors()))
    failed = {Path(p).name for p, s in zip(store.paths(), status) if s == FAILED}
    expected_failed = {"zero_byte.mp4", "truncated.mp4", "corrupt_random.mp4", "audio_only.m4a",
                       "unsupported_codec.mkv", "one_frame.mp4", "very_short.mp4", "does_not_exist.mp4"}
    assert expected_failed <= failed, errors
    for name in expected_failed:
        assert errors[name], f"{name} failed without a reason"
    assert summary.failed == len(failed) and summary.done == len(manifest) - len(failed)


def test_cached_tensors_equal_direct_backbone_run(zoo_run):
    root, manifest, cfg, _ = zoo_run
    store = open_store(str(root / "store"))
    backbone = build_backbone(cfg.backbone, attention="maps")
    for video in (0, 4):
        views, _ = build_views(manifest.paths[video], cfg.sampling, cfg.views, 32)
        direct = backbone(views)
        for v in range(3):
            cached = store.read(video, v)
            assert cached["label"].item() == manifest.labels[video]
            torch.testing.assert_close(cached["feats"].float(), direct["feats"][v].half().float(), atol=2e-3, rtol=2e-3)
            torch.testing.assert_close(cached["attn"].float(), direct["attn"][v].half().float(), atol=1e-3, rtol=2e-3)


def test_bytes_on_disk_within_two_percent_of_raw_fp16(tmp_path):
    root = tmp_path / "d"
    csv_path = make_dataset(root, n_good=8)
    manifest = load_manifest("list", str(root), "train", annotations=str(csv_path))
    sampling = Sampling("dense", 4, 2)
    cfg = ExtractConfig(backbone=BackboneSpec(TINY, "random", seed=3), sampling=sampling,
                        views=ViewSet.parse("eval:1x1", sampling), shard_size=8, num_cpus=2, progress=False)
    extract(manifest, str(root / "store"), cfg)
    store = open_store(str(root / "store"))
    tensor_bytes = sum(p.stat().st_size for name in store.tensor_names() for p in (root / "store" / name).rglob("*") if p.is_file() and p.name != "zarr.json")
    raw = store.raw_bytes_per_view() * 8
    assert raw <= tensor_bytes <= 1.02 * raw  # 4 bytes of crc32c per chunk, 16 bytes of index per chunk


def test_cli_kill_after_a_shard_write_resumes_byte_identical(tmp_path):
    """Killed (a fault hook, not timing luck) after shard 2's files are durable and before its videos
    are marked: they stay pending, and the rerun redoes them into a store byte-identical to an
    uninterrupted run."""
    root = tmp_path / "data"
    csv_path = make_dataset(root, n_good=9)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent.parent))
    ref = tmp_path / "ref.zarr"
    subprocess.run(cli_args(root, csv_path, ref, "--views", "train:2", "--shard-size", "2"), check=True, env=env,
                   capture_output=True)
    killed = tmp_path / "killed.zarr"
    proc = subprocess.run(cli_args(root, csv_path, killed, "--views", "train:2", "--shard-size", "2"),
                          env=dict(env, EVL_CACHE_FAULT="after_shard_write@2=kill"), capture_output=True, text=True)
    assert proc.returncode == 137, proc.stderr
    store = open_store(str(killed))
    assert list(store.status()[4:6]) == [PENDING, PENDING]
    assert (killed / "feats" / "c.2.0.0.0.0.0").is_file()  # written and fsynced, not yet marked
    out = subprocess.run(cli_args(root, csv_path, killed, "--views", "train:2", "--shard-size", "2"), check=True,
                         env=env, capture_output=True, text=True)
    assert "9/9 done" in out.stdout
    assert tree_bytes(killed) == tree_bytes(ref)


@pytest.fixture
def two_actor_ray(monkeypatch):
    """An embedded Ray with 1 CPU and 2 (pretend) GPUs: two backbone actors, one CPU for decoding.
    Before actors stopped reserving a CPU this shape hung forever. Workers inherit the environment
    at start-up, so the decode fault is set first."""
    import ray

    from evl_cache.ray_runtime import _short_temp_dir

    monkeypatch.setenv("EVL_CACHE_FAULT", "decode@good2.webm=hang")
    ray.init(num_cpus=1, num_gpus=2, include_dashboard=False, _temp_dir=_short_temp_dir(),
             _node_ip_address="127.0.0.1", log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.mark.timeout(300)
def test_one_cpu_two_actors_hanging_decode_times_out_and_tensors_are_exact(tmp_path, two_actor_ray):
    root = tmp_path / "data"
    csv_path = make_dataset(root, n_good=6)
    manifest = load_manifest("list", str(root), "train", annotations=str(csv_path))
    sampling = Sampling("dense", 4, 2)
    cfg = ExtractConfig(backbone=BackboneSpec(TINY, "random", seed=3), sampling=sampling,
                        views=ViewSet.parse("train:2", sampling), shard_size=4, batch_size=4, decode_timeout=15,
                        progress=False)
    summary = extract(manifest, str(root / "store"), cfg)
    store = open_store(str(root / "store"))
    assert summary.done == 5 and summary.failed == 1, summary.failures
    assert store.status()[2] == FAILED and "timed out after 15 s" in store.errors()[2]
    # the cached tensors are bit-identical to running the same work units on views built in one place
    from evl_cache.extract import BackboneRunner
    from evl_cache.video import PackedViews

    runner = BackboneRunner(cfg.backbone.to_dict(), None, "maps", "float16", threads=4, device="cpu")
    for pair in ((0, 1), (4, 5)):  # the same batches the driver formed (batch 4 clip-views = 2 videos)
        ready = []
        for video in pair:
            views, meta = build_views(manifest.paths[video], sampling, cfg.views, 32, key=Path(manifest.paths[video]).name)
            ready.append((PackedViews("train", 32, ready=views.numpy()), {"status": DONE, **meta}))
        tensors, _ = runner.compute(4, *ready)
        for j, video in enumerate(pair):
            for v in range(2):
                cached = store.read(video, v)
                assert torch.equal(cached["feats"], torch.from_numpy(tensors["feats"][j, v]))
                assert torch.equal(cached["attn"], torch.from_numpy(tensors["attn"][j, v]))
    torch.set_num_threads(1)


@pytest.mark.timeout(300)
def test_retry_failed_redoes_only_failed_videos_and_never_touches_done_ones(tmp_path, monkeypatch):
    root = tmp_path / "data"
    csv_path = make_dataset(root, n_good=6)
    manifest = load_manifest("list", str(root), "train", annotations=str(csv_path))
    sampling = Sampling("dense", 4, 2)
    cfg = ExtractConfig(backbone=BackboneSpec(TINY, "random", seed=3), sampling=sampling,
                        views=ViewSet.parse("eval:1x1", sampling), shard_size=6, num_cpus=2, progress=False)
    monkeypatch.setenv("EVL_CACHE_FAULT", "decode@good1.avi=raise")
    extract(manifest, str(root / "store"), cfg)
    store = open_store(str(root / "store"))
    assert list(store.status()) == [DONE, FAILED, DONE, DONE, DONE, DONE]
    before = {v: store.read(v, 0) for v in (0, 2, 3, 4, 5)}
    monkeypatch.delenv("EVL_CACHE_FAULT")
    (root / "good3.mp4").write_bytes(b"")  # a done video whose source is unreadable now
    summary = extract(manifest, str(root / "store"), dataclasses.replace(cfg, retry_failed=True))
    store = open_store(str(root / "store"))
    assert list(store.status()) == [DONE] * 6 and summary.processed == 1
    for v, old in before.items():
        new = store.read(v, 0)
        assert all(torch.equal(old[k], new[k]) for k in old), v
    from evl_cache.verify import verify_store

    assert verify_store(str(root / "store")).bad == []


def test_bad_arguments_fail_fast_and_write_nothing(tmp_path):
    root = tmp_path / "data"
    csv_path = make_dataset(root, n_good=1)
    store = tmp_path / "s.zarr"
    cases = [
        ([*EVL, "extract", "--dataset", "nope", "--root", str(root), "--store", str(store), "--weights", "random"], "nope"),
        ([*EVL, "extract", "--dataset", "list", "--root", str(root), "--annotations", str(root / "missing.csv"),
          "--store", str(store), "--weights", "random", "--arch", TINY], "missing.csv"),
        ([*EVL, "extract", "--dataset", "list", "--root", str(root), "--annotations", str(csv_path),
          "--store", str(store), "--arch", TINY, "--weights", str(tmp_path / "nowhere.pt")], "nowhere.pt"),
        ([*EVL, "extract", "--dataset", "list", "--root", str(root), "--annotations", str(csv_path),
          "--store", str(store), "--arch", TINY], "--weights"),
    ]
    for args, needle in cases:
        out = subprocess.run(args, capture_output=True, text=True)
        assert out.returncode == 2, out.stderr
        lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and needle in lines[0], out.stderr
        assert not store.exists()


def test_rerun_with_a_different_config_is_refused(zoo_run):
    root, manifest, cfg, _ = zoo_run
    before = tree_bytes(root / "store")
    other = ExtractConfig(backbone=cfg.backbone, sampling=Sampling("dense", 4, 3), views=cfg.views,
                          shard_size=4, num_cpus=2, progress=False)
    from evl_cache.errors import UserError

    with pytest.raises(UserError, match="different sampling"):
        extract(manifest, str(root / "store"), other)
    assert tree_bytes(root / "store") == before
