"""Data-parallel training on real torch.distributed (gloo, CPU) launched by real `torchrun`, and on
Ray Train's TorchTrainer in an embedded loopback-only Ray.

The reference is the same recipe in one process. Dropout is 0 where losses are compared across
world sizes (each rank draws its own dropout masks, so masks depend on the world size); the exact
resume test keeps dropout on, so it checks that every rank's RNG state comes back.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from evl_cache.config import RunConfig
from evl_cache.data import EpochSampler
from evl_cache.errors import UserError
from evl_cache.train import train
from evl_cache.video import ViewSet
from test_train import build_store, write_videos

ROOT = Path(__file__).resolve().parent.parent
STEPS = 20


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    paths, labels = write_videos(root / "videos", 8)
    train_store = build_store(root / "train.zarr", paths, labels, ViewSet("train", count=2, temporal=1, spatial=1, seed=0))
    val_store = build_store(root / "val.zarr", paths[:6], labels[:6], ViewSet("eval", count=2, temporal=2, spatial=1))
    return {"root": root, "train": train_store, "val": val_store}


def recipe(stores, dropout: float = 0.0, **train_kw) -> dict:
    """The test recipe as CLI arguments' source: global batch 4, validation every 10 steps."""
    return {
        "model": {"mlp_dropout": dropout, "head_dropout": dropout},
        "train": {"steps": STEPS, "batch_size": 4, "lr": 1e-3, "checkpoint_every": 5, "eval_every": 10,
                  "log_every": 1, "eval_batch_size": 3, **train_kw},
        "data": {"train_store": stores["train"], "val_store": stores["val"], "num_workers": 0},
    }


def cli_args(stores, out: Path, dropout: float = 0.0, **train_kw) -> list[str]:
    r = recipe(stores, dropout, **train_kw)
    args = ["train", "--out", str(out), "--no-progress", "--train-store", r["data"]["train_store"],
            "--val-store", r["data"]["val_store"], "--workers", "0"]
    for section in ("model", "train"):
        args += [a for k, v in r[section].items() for a in ("--set", f"{section}.{k}={v}")]
    return args


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env() -> dict[str, str]:
    """The test's environment for launched processes: this checkout first, loopback gloo, 1 thread."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.update(GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1")
    return env


def torchrun(nproc: int, args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node N -m evl_cache.cli ...` on a free loopback port."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "evl_cache.cli", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(), timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def records(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def steps(run: Path) -> list[dict]:
    return [r for r in records(run) if "loss" in r]


def vals(run: Path) -> list[dict]:
    return [r for r in records(run) if "val_top1" in r]


def run_files(run: Path) -> set[str]:
    return {str(p.relative_to(run)) for p in run.rglob("*")}


def weights(run: Path, name: str = "model") -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / f"{name}.safetensors"))


def assert_close_losses(a: Path, b: Path, rel: float = 1e-5) -> None:
    la, lb = steps(a), steps(b)
    assert [r["step"] for r in la] == [r["step"] for r in lb] == list(range(1, STEPS + 1))
    for x, y in zip(la, lb):
        assert abs(x["loss"] - y["loss"]) <= rel * abs(x["loss"]), (x, y)


@pytest.fixture(scope="module")
def single(stores):
    """The reference: the recipe (dropout 0) in this one process."""
    out = stores["root"] / "single"
    train(RunConfig.from_dict(recipe(stores)), out, progress=False)
    return out


# ------------------------------------------------------------------------------------ sampler, refusals


def test_rank_slices_partition_every_global_batch():
    """Rank r of W reads items [g*B + r*B/W, g*B + (r+1)*B/W) of the one global stream, for any W."""
    videos, views, seed, B = np.array([0, 2, 3, 5, 7]), 3, 4, 6
    it = iter(EpochSampler(videos, views, seed))
    stream = [next(it) for _ in range(10 * B)]
    for world in (1, 2, 3, 6):
        b = B // world
        ranks = [iter(EpochSampler(videos, views, seed, rank=r, world_size=world, block=b)) for r in range(world)]
        shares = [[next(ranks[r]) for _ in range(10 * b)] for r in range(world)]
        for g in range(10):
            rebuilt = [x for r in range(world) for x in shares[r][g * b:(g + 1) * b]]
            assert rebuilt == stream[g * B:(g + 1) * B], (world, g)
        # a resumed rank (global position 4 batches in) continues its own share
        resumed = iter(EpochSampler(videos, views, seed, start=4 * B, rank=world - 1, world_size=world, block=b))
        assert [next(resumed) for _ in range(3 * b)] == shares[world - 1][4 * b:7 * b]
    with pytest.raises(ValueError, match="multiple of block x world_size"):
        EpochSampler(videos, views, seed, start=3, rank=0, world_size=2, block=3)


def test_global_batch_must_split_over_ranks_and_accumulation(stores, tmp_path, monkeypatch):
    cfg = RunConfig.from_dict(recipe(stores, batch_size=6, grad_accum=3))
    monkeypatch.setenv("WORLD_SIZE", "4")  # refused before any process group is opened
    with pytest.raises(UserError, match=r"train.batch_size=6 \(the global batch\) is not divisible by world size 4 "
                                        r"x train.grad_accum 3 = 12; use a multiple of 12"):
        train(cfg, tmp_path / "a", progress=False)
    monkeypatch.delenv("WORLD_SIZE")
    from typer.testing import CliRunner

    from evl_cache.cli import app

    # Ray Train: refused in the driver, before Ray starts
    res = CliRunner().invoke(app, [*cli_args(stores, tmp_path / "b"), "--ray-workers", "3"])
    assert isinstance(res.exception, UserError) and "not divisible by world size 3" in str(res.exception)
    res = CliRunner().invoke(app, [*cli_args(stores, tmp_path / "c"), "--ray-address", "127.0.0.1:1"])
    assert isinstance(res.exception, UserError) and "need --ray-workers" in str(res.exception)
    assert not any((tmp_path / n).exists() for n in "abc")


def test_ray_failure_unwraps_the_user_error():
    from ray.train import WorkerGroupError

    from evl_cache.distributed import _user_error_in

    inner = UserError("store x has no extracted videos")
    # Ray 2.60 hands the worker's own exception over (checked with a real TorchTrainer run)
    assert _user_error_in(WorkerGroupError("rank 1 failed", {1: inner})) is inner
    err = WorkerGroupError("rank 1 failed", {1: RuntimeError("wrapped")})
    err.worker_failures[0] = RuntimeError("outer")
    err.worker_failures[0].__cause__ = inner
    assert _user_error_in(err) is inner
    assert _user_error_in(WorkerGroupError("x", {0: RuntimeError("plain")})) is None


def test_run_directory_of_other_ranks_writes_nothing(stores, tmp_path):
    """What ranks other than 0 hold: every write of the run directory is a no-op."""
    from evl_cache.decoder import DecoderConfig, EVLDecoder
    from evl_cache.train import RunDir

    run = RunDir(tmp_path / "run", enabled=False)
    run.begin(RunConfig.from_dict(recipe(stores)), 0, resume=False)
    run.log({"step": 1, "loss": 1.0})
    model = EVLDecoder(DecoderConfig(num_layers=1, width=64, heads=4, frames=4, grid=(4, 4), num_classes=2))
    assert run.save(1, model, {}, lambda: {"step": 1}) is None
    assert run.finish(model, {}) == (None, [])
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------ torchrun


def test_torchrun_two_processes_equal_one(stores, single):
    """Same global batch on 1 and 2 processes: the same clips per step (digest of the video ids), the
    same losses within 1e-5 relative over 20 steps, the same validation; rank 1 writes nothing."""
    out = stores["root"] / "two"
    proc = torchrun(2, cli_args(stores, out))
    assert_close_losses(single, out)
    assert [r["batch_digest"] for r in steps(single)] == [r["batch_digest"] for r in steps(out)]
    assert len(vals(out)) == 2 and [(v["step"], v["val_top1"], v["val_top5"], v["val_mean_class"]) for v in vals(out)] \
        == [(v["step"], v["val_top1"], v["val_top5"], v["val_mean_class"]) for v in vals(single)]
    # one writer: no duplicated metrics lines, and the same files as the one-process run
    assert len(records(out)) == len(records(single)) == STEPS + 2
    assert run_files(out) == run_files(single)
    assert json.loads((out / "summary.json").read_text())["world_size"] == 2
    # the decoders agree too, except the attention key biases: their gradient is 0 in exact arithmetic
    # (softmax ignores a per-query shift), so AdamW turns float noise there into full-size steps
    a, b = weights(single), weights(out)
    assert all(torch.allclose(a[k], b[k], rtol=1e-3, atol=1e-5) for k in a if not k.endswith("k_proj.bias"))
    assert proc.stdout.count("trained steps 0..20 (80 clip-views) on 2 processes") == 1  # rank 0 speaks


@pytest.mark.slow
def test_torchrun_resume_exact_and_across_world_sizes(stores):
    """Dropout on. A 2-process run cut with --until-step and resumed on 2 processes equals the
    uninterrupted one bit for bit (each rank's RNG state restored); resumed on 1 process it reads
    the same clips per step as the uninterrupted run (the sampler position is global)."""
    root = stores["root"]
    full, cut = root / "full_d", root / "cut_d"
    torchrun(2, cli_args(stores, full, dropout=0.5))
    torchrun(2, [*cli_args(stores, cut, dropout=0.5), "--until-step", "10"])
    assert [r["step"] for r in steps(cut)] == list(range(1, 11))
    other = root / "cut_d_one"
    shutil.copytree(cut, other)
    torchrun(2, [*cli_args(stores, cut, dropout=0.5), "--resume"])
    assert steps(cut) == [{**r, "samples_per_s": s["samples_per_s"]} for r, s in zip(steps(full), steps(cut))]
    assert [r["loss"] for r in steps(cut)] == [r["loss"] for r in steps(full)]
    assert vals(cut) == vals(full)
    a, b = weights(full), weights(cut)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the same run resumed on one process: the same clips per step, the run goes on to the end
    summary = train(RunConfig.from_dict(recipe(stores, dropout=0.5)), other, resume=True, progress=False)
    assert summary.start_step == 10 and summary.steps == STEPS and summary.world_size == 1
    assert [r["batch_digest"] for r in steps(other)] == [r["batch_digest"] for r in steps(full)]


@pytest.mark.slow
def test_torchrun_resume_on_one_process_continues_the_losses(stores, single):
    """Dropout 0: a 2-process run cut at step 10 and resumed in one process (with grad_accum 2, the
    same global batch) gives the one-process losses within 1e-5 relative, and equal clips per step."""
    cut = stores["root"] / "cut_0"
    torchrun(2, [*cli_args(stores, cut), "--until-step", "10"])
    train(RunConfig.from_dict(recipe(stores, grad_accum=2)), cut, resume=True, progress=False)
    assert_close_losses(single, cut)
    assert [r["batch_digest"] for r in steps(cut)] == [r["batch_digest"] for r in steps(single)]


@pytest.mark.slow
def test_torchrun_eval_is_sharded_and_equal(stores, single, tmp_path):
    """`evl-cache eval` under torchrun: 2 ranks score halves of the views, rank 0 writes the same scores."""
    from evl_cache.evaluate import evaluate

    one = evaluate(single / "model", stores["val"], tmp_path / "one", batch_size=3)
    torchrun(2, ["eval", "--checkpoint", str(single / "model"), "--store", stores["val"], "--out", str(tmp_path / "two"),
                 "--batch", "3", "--device", "cpu"])
    a, b = np.load(tmp_path / "one" / "scores.npz"), np.load(tmp_path / "two" / "scores.npz")
    assert np.array_equal(a["video"], b["video"]) and np.allclose(a["scores"], b["scores"], rtol=1e-5, atol=1e-7)
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert (two["top1"], two["top5"], two["confusion"]) == (one["top1"], one["top5"], one["confusion"])


# ------------------------------------------------------------------------------------ Ray Train


@pytest.mark.slow
def test_ray_train_two_workers_equal_one_process(stores, single, monkeypatch):
    """`train --ray-workers 2` on an embedded loopback Ray: the same losses (1e-5) and clips as one
    process; a Ray run cut with --until-step and resumed equals the uninterrupted Ray run bit for bit.
    One Ray session serves the three runs (`ray_session` reuses a running Ray)."""
    from typer.testing import CliRunner

    from evl_cache.cli import app
    from evl_cache.distributed import train_on_ray
    from evl_cache.ray_runtime import ray_session

    for key, value in child_env().items():  # the Ray workers inherit this process's environment
        monkeypatch.setenv(key, value)
    out, cut = stores["root"] / "ray", stores["root"] / "ray_cut"
    cfg = RunConfig.from_dict(recipe(stores))
    with ray_session(num_cpus=2) as ray:
        assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}
        res = CliRunner().invoke(app, [*cli_args(stores, out), "--ray-workers", "2"])
        assert res.exit_code == 0, res.output
        assert "trained steps 0..20 (80 clip-views) on 2 processes" in res.output
        train_on_ray(cfg, cut, workers=2, until_step=10)
        resumed = train_on_ray(cfg, cut, workers=2, resume=True)
    assert resumed.start_step == 10 and resumed.world_size == 2
    assert_close_losses(single, out)
    assert [r["batch_digest"] for r in steps(single)] == [r["batch_digest"] for r in steps(out)]
    assert [r["loss"] for r in steps(cut)] == [r["loss"] for r in steps(out)]
    assert vals(cut) == vals(out)
    assert run_files(out) == run_files(single)  # Ray Train's own files stay out of the run directory
