"""Stores on object storage, against a real S3-compatible server (moto's server mode) on 127.0.0.1.

Real HTTP requests from s3fs/aiobotocore in this process and in the CLI's and Ray's processes; the
server keeps objects in memory. Extract straight to s3://, then inspect, verify, train and eval from
it, each equal to the same run on a local path; a killed writer (fault hooks) leaves nothing a reader
takes for a finished shard, and a resumed extract ends byte-identical. Prefix-layout stores keep their
tail weights as an object of the store (checked by sha256); derive-emb adds emb to a URL store with
the same commit point as on disk.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

from test_extract import TINY, make_dataset, tree_bytes  # noqa: E402

from evl_cache import location  # noqa: E402
from evl_cache.backbone import BackboneSpec, load_model_config  # noqa: E402
from evl_cache.extract import BackboneRunner, ExtractConfig, extract_serially, store_attributes, write_tail  # noqa: E402
from evl_cache.prefix import tail_blocks  # noqa: E402
from evl_cache.faults import InjectedFault  # noqa: E402
from evl_cache.store import create_store  # noqa: E402
from evl_cache.video import Sampling, ViewSet  # noqa: E402
from evl_cache.config import RunConfig  # noqa: E402
from evl_cache.errors import UserError  # noqa: E402
from evl_cache.store import PENDING, StoreDataError, open_store  # noqa: E402

EVL = [sys.executable, "-m", "evl_cache.cli"]
SECRET = "evlSecretKey-7f3a9c1e5b"  # grepped for in stores and outputs: it must appear nowhere
BUCKET = "evl-bucket"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on 127.0.0.1, the AWS_* variables pointing at it, a bucket, a local dataset."""
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "evl-test-key", "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_REGION": "us-east-1",
           "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    location._fs_cache.clear()
    fs, _ = location.filesystem(f"s3://{BUCKET}")
    fs.call_s3("create_bucket", Bucket=BUCKET)
    root = tmp_path_factory.mktemp("s3data")
    csv_path = make_dataset(root / "videos", n_good=7)
    yield {"fs": fs, "root": root, "csv": csv_path, "env": dict(os.environ, PYTHONPATH=str(Path(__file__).parent.parent))}
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    location._fs_cache.clear()
    server.stop()


SAMPLING = Sampling("dense", 4, 2)
SPEC = BackboneSpec(TINY, "random", seed=3)
VIEWS = ViewSet("train", count=2, temporal=1, spatial=1, seed=0)


def extract_args(s3: dict, store: str, *extra: str) -> list[str]:
    return [*EVL, "extract", "--dataset", "list", "--root", str(s3["root"] / "videos"), "--annotations", str(s3["csv"]),
            "--store", store, "--arch", TINY, "--weights", "random", "--seed", "3", "--frames", "4", "--stride", "2",
            "--views", "train:2", "--blocks", "1,2", "--shard-size", "2", "--num-cpus", "2", *extra]


def run(args: list[str], env: dict, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def cli(*args: str) -> tuple[int, str]:
    """The CLI in this process (typer's runner): exit code and output (stdout and stderr)."""
    from typer.testing import CliRunner

    from evl_cache.cli import app

    from evl_cache.errors import UserError

    result = CliRunner().invoke(app, list(args))
    if isinstance(result.exception, UserError):  # what `evl_cache.cli.main` turns into one line and exit 2
        return 2, result.output + str(result.exception)
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def objects(fs, url: str) -> dict[str, bytes]:
    fs.invalidate_cache()
    root = url.split("://", 1)[1].rstrip("/")
    return {p[len(root) + 1:]: fs.cat_file(p) for p in sorted(fs.find(root))}


def videos(s3: dict) -> tuple[list[str], list[int]]:
    rows = [line.split(",") for line in s3["csv"].read_text().splitlines()[1:]]
    return [str(s3["root"] / "videos" / r[0]) for r in rows], [["left", "right"].index(r[1]) for r in rows]


def build(s3: dict, store: str, create: bool = True, layout: str = "full") -> str:
    """Extract the dataset into ``store`` (a path or URL) with extract's work units, serially (no Ray):
    the writer's `write_batches` opens the store by its location, as a Ray writer task does. A prefix
    layout store gets its tail weights as `extract` gives them (`write_tail`, before any shard)."""
    paths, labels = videos(s3)
    cfg = ExtractConfig(backbone=SPEC, sampling=SAMPLING, views=VIEWS, blocks=[1, 2], shard_size=2, layout=layout)
    probe = BackboneRunner(SPEC.to_dict(), [1, 2], "maps", "float16", device="cpu").backbone
    attrs = store_attributes(probe.describe(), probe.blocks, cfg, ["left", "right"], "test", {})
    if layout == "prefix":
        attrs["model_config"] = {k: v for k, v in load_model_config(SPEC.arch).items() if k in ("embed_dim", "vision_cfg")}
        attrs["tail"] = {"file": "tail_weights.safetensors", "blocks": tail_blocks(probe.blocks)}
    runner = BackboneRunner(SPEC.to_dict(), [1, 2], "maps", attrs["dtype"], device="cpu", attn_format=attrs["attn_format"],
                            layout=layout)
    st = create_store(store, attrs, paths, labels, shard_size=2) if create else open_store(store, mode="r+")
    if layout == "prefix" and create:
        st = write_tail(st, probe)
    extract_serially(st, runner, paths, [Path(p).name for p in paths])
    return store


@pytest.fixture(scope="module")
def stores(s3):
    """The same extraction to a local path and straight to s3://."""
    return {"local": build(s3, str(s3["root"] / "local.zarr")), "url": build(s3, f"s3://{BUCKET}/runs/ref")}


def test_extract_to_s3_writes_the_local_store_byte_for_byte(s3, stores):
    got = objects(s3["fs"], stores["url"])
    assert got == tree_bytes(Path(stores["local"]))
    assert "feats/c.3.0.0.0.0.0" in got  # 7 videos, 2 per shard: 4 shard objects
    for key, data in got.items():  # no credential or endpoint in any object (attributes included)
        assert SECRET.encode() not in data and b"127.0.0.1" not in data, key


def test_inspect_verify_and_reads_from_s3_equal_local(s3, stores):
    code, out = cli("inspect", stores["url"])
    _, local_out = cli("inspect", stores["local"])
    assert code == 0 and "videos: 7 total, 7 done" in out and SECRET not in out
    assert out.split("bytes on disk:")[0] == local_out.split("bytes on disk:")[0]  # same attributes and arrays
    assert out.split("bytes on disk:")[1].split(" in ")[0] == local_out.split("bytes on disk:")[1].split(" in ")[0]
    code, out = cli("verify", stores["url"])
    assert code == 0 and "7 done videos, 28 chunks" in out and "all intact" in out and SECRET not in out
    remote, here = open_store(stores["url"]), open_store(stores["local"])
    pairs = [(6, 1), (0, 0), (1, 1), (0, 1), (3, 0), (2, 0)]  # across shards, adjacent ones coalesced
    for name in here.tensor_names():
        assert remote.reader(name).read_batch(pairs).tobytes() == here.reader(name).read_batch(pairs).tobytes()


def test_a_damaged_object_is_refused_naming_the_url_and_verify(s3, stores):
    fs = s3["fs"]
    url = f"s3://{BUCKET}/runs/damaged"
    for key, data in objects(fs, stores["url"]).items():
        fs.pipe_file(f"{url[5:]}/{key}", data)
    key = f"{url[5:]}/feats/c.1.0.0.0.0.0"
    data = bytearray(fs.cat_file(key))
    data[100] ^= 0xFF  # one payload byte of video 2, view 0
    fs.pipe_file(key, bytes(data))
    with pytest.raises(StoreDataError, match=r"video 2 view 0: 'feats' chunk in s3://\S+c\.1\.0\.0\.0\.0\.0 fails its crc32c.*"
                                             r"evl-cache verify s3://"):
        open_store(url).read(2, 0)
    fs.rm(key)
    with pytest.raises(StoreDataError, match=r"c\.1\.0\.0\.0\.0\.0 is missing.*evl-cache verify s3://\S+ --repair"):
        open_store(url).read(3, 1)
    code, out = cli("verify", url)
    assert code == 1 and "2 bad video(s)" in out


def test_train_and_eval_from_s3_equal_local(s3, stores, tmp_path):
    from evl_cache.evaluate import evaluate
    from evl_cache.train import train

    def cfg(store: str) -> RunConfig:
        return RunConfig.from_dict({
            "train": {"steps": 3, "batch_size": 4, "lr": 1e-3, "checkpoint_every": 3, "eval_every": 3, "log_every": 1, "seed": 0},
            "data": {"train_store": store, "num_workers": 0},
        })

    train(cfg(stores["local"]), tmp_path / "local", progress=False)
    train(cfg(stores["url"]), tmp_path / "s3", progress=False)
    assert (tmp_path / "local" / "model.safetensors").read_bytes() == (tmp_path / "s3" / "model.safetensors").read_bytes()
    m_local = evaluate(tmp_path / "local" / "model", stores["local"], batch_size=4)
    m_s3 = evaluate(tmp_path / "local" / "model", stores["url"], batch_size=4)
    for key in ("top1", "top5", "mean_class_accuracy", "videos", "views"):
        assert m_local[key] == m_s3[key]


def abandoned_multipart_upload(fs, url: str) -> None:
    """A writer killed mid-upload: a multipart upload started, one part sent, never completed."""
    bucket, key = url[5:].split("/", 1)
    upload = fs.call_s3("create_multipart_upload", Bucket=bucket, Key=key)
    fs.call_s3("upload_part", Bucket=bucket, Key=key, UploadId=upload["UploadId"], PartNumber=1, Body=b"x" * (5 << 20))


def test_a_failed_writer_leaves_no_finished_looking_shard_and_resume_is_byte_identical(s3, stores, monkeypatch):
    """The writer fails (fault hook) before shard 2's objects are put; shards 0-1 are put but their videos
    never marked. Nothing reads as done, an abandoned multipart upload of shard 2 is invisible, verify
    passes, and the resumed extraction ends byte-identical to the uninterrupted one."""
    fs = s3["fs"]
    url = f"s3://{BUCKET}/runs/failed-writer"
    monkeypatch.setenv("EVL_CACHE_FAULT", "shard_write@2=raise")
    with pytest.raises(InjectedFault):
        build(s3, url)
    monkeypatch.delenv("EVL_CACHE_FAULT")
    store = open_store(url)
    assert (store.status() == PENDING).all()
    assert fs.exists(f"{url[5:]}/feats/c.1.0.0.0.0.0") and not fs.exists(f"{url[5:]}/feats/c.2.0.0.0.0.0")
    abandoned_multipart_upload(fs, f"{url}/feats/c.2.0.0.0.0.0")
    fs.invalidate_cache()
    assert not fs.exists(f"{url[5:]}/feats/c.2.0.0.0.0.0")
    with pytest.raises(StoreDataError, match="c.2.0.0.0.0.0 is missing"):
        store.reader("feats").shard_index(2)
    code, out = cli("verify", url)
    assert code == 0 and "all intact" in out
    build(s3, url, create=False)
    assert objects(fs, url) == objects(fs, stores["url"])


def test_options_file_carries_credentials_and_refusals_are_one_line(s3, stores, tmp_path, monkeypatch):
    opts = tmp_path / "s3.yaml"
    opts.write_text(f"key: evl-test-key\nsecret: {SECRET}\nclient_kwargs:\n  endpoint_url: {os.environ['AWS_ENDPOINT_URL_S3']}\n")
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(k)
    monkeypatch.delenv(location.OPTIONS_ENV, raising=False)
    location._fs_cache.clear()
    try:
        code, out = cli("verify", stores["url"], "--storage-options", str(opts))
        assert code == 0 and "all intact" in out and SECRET not in out
        monkeypatch.delenv(location.OPTIONS_ENV)
        code, out = cli("verify", stores["url"], "--storage-options", str(tmp_path / "missing.json"))
        assert code == 2 and "cannot read --storage-options file" in out
    finally:
        location._fs_cache.clear()


def test_a_missing_url_store_is_one_clear_line(s3):
    with pytest.raises(UserError, match="no cache store at s3://"):
        open_store(f"s3://{BUCKET}/nothing-here")


@pytest.fixture(scope="module")
def prefix_stores(s3):
    """The same prefix-layout extraction (tail weights included) to a local path and straight to s3://."""
    return {"local": build(s3, str(s3["root"] / "prefix.zarr"), layout="prefix"),
            "url": build(s3, f"s3://{BUCKET}/runs/prefix", layout="prefix")}


def copy_store(fs, src: str, dst: str) -> None:
    for key, data in objects(fs, src).items():
        fs.pipe_file(f"{dst[5:]}/{key}", data)


def test_prefix_store_on_s3_is_the_local_one_and_reads_the_same(s3, prefix_stores):
    """A prefix store extracted straight to the bucket: the same objects as the local store's files (the
    tail weights object included), and the reader, which recomputes the tail blocks from the stream with
    the weights it reads from the bucket, gives the same tensors, per chunk and through the loader."""
    from evl_cache.data import make_loader, to_device

    got = objects(s3["fs"], prefix_stores["url"])
    assert "tail_weights.safetensors" in got and "prefix/c.3.0.0.0.0" in got
    assert got == tree_bytes(Path(prefix_stores["local"]))
    assert all(SECRET.encode() not in data and b"127.0.0.1" not in data for data in got.values())
    remote, here = open_store(prefix_stores["url"]), open_store(prefix_stores["local"])
    assert remote.attrs["layout"] == "prefix" and remote.tensor_names() == ["prefix"]
    for video, view in [(0, 0), (3, 1), (6, 1)]:
        a, b = remote.read(video, view), here.read(video, view)
        assert set(a) == set(b) >= {"feats", "attn"}
        for key in a:
            assert torch.equal(a[key], b[key]), key
    batches = [next(iter(make_loader(store, 4, train=False, num_workers=0))) for store in prefix_stores.values()]
    decoded = [to_device(b, torch.device("cpu")) for b in batches]
    assert torch.equal(batches[0]["prefix"], batches[1]["prefix"])
    for key in ("feats", "attn"):
        assert torch.equal(decoded[0][key], decoded[1][key]), key


def test_a_tampered_lost_or_unrecorded_tail_object_is_refused_in_one_line(s3, prefix_stores):
    fs = s3["fs"]
    url = f"s3://{BUCKET}/runs/prefix-tampered"
    copy_store(fs, prefix_stores["url"], url)
    tail = f"{url[5:]}/tail_weights.safetensors"
    data = bytearray(fs.cat_file(tail))
    data[-1] ^= 0xFF  # one weight byte
    fs.pipe_file(tail, bytes(data))
    with pytest.raises(UserError, match=r"^tail weights s3://\S+/prefix-tampered/tail_weights\.safetensors do not match "
                                        r"the sha256 the store recorded; re-extract the store$") as err:
        open_store(url).read(0, 0)
    assert "\n" not in str(err.value)
    fs.rm(tail)
    with pytest.raises(UserError, match=r"^prefix store s3://\S+ has lost its tail weights \(no object s3://\S+\); re-extract"):
        open_store(url).read(0, 0)
    copy_store(fs, prefix_stores["url"], url)  # whole again, but its attributes as before write_tail recorded it
    store = open_store(url, mode="r+")
    store.group.attrs["evl_cache"] = {**store.attrs, "tail": {k: v for k, v in store.attrs["tail"].items() if k != "sha256"}}
    with pytest.raises(UserError, match=r"has no recorded tail weights .*rerun the same `evl-cache extract` command$"):
        open_store(url).read(0, 0)


def test_derive_emb_on_s3_equals_local_and_an_interrupted_run_changes_nothing_a_reader_sees(s3, stores, tmp_path, monkeypatch):
    """derive-emb on a URL store, failed (fault hook) after shard 1's emb object was put: the store's
    attributes and every other object are as before, it reads and verifies as before; the rerun (the
    CLI) ends with exactly the objects a failed and rerun derive-emb gives on a local copy."""
    import shutil

    from evl_cache.derive import derive_emb

    fs = s3["fs"]
    url = f"s3://{BUCKET}/runs/derive"
    copy_store(fs, stores["url"], url)
    local = tmp_path / "derive.zarr"
    shutil.copytree(stores["local"], local)
    before = objects(fs, url)
    monkeypatch.setenv("EVL_CACHE_FAULT", "derive_shard@1=raise")
    for store_path in (url, str(local)):  # the local copy too: its rerun must also clear the unnamed emb files
        with pytest.raises(InjectedFault):
            derive_emb(store_path, device="cpu")
    monkeypatch.delenv("EVL_CACHE_FAULT")
    assert (local / "emb" / "c.1.0.0.0").is_file() and not open_store(str(local)).attrs["emb"]
    after = objects(fs, url)
    assert "emb/c.1.0.0.0" in after and "emb/c.2.0.0.0" not in after  # shards 0-1 put, never named
    assert {k: v for k, v in after.items() if not k.startswith("emb/")} == before
    store = open_store(url)
    assert not store.attrs["emb"] and "emb" not in store.tensor_names()
    code, out = cli("verify", url)
    assert code == 0 and "all intact" in out
    code, out = cli("derive-emb", url, "--device", "cpu")
    assert code == 0 and f"store {url}: derived emb (T x 32, float16) for 7 done videos, 14 clip-views" in out, out
    derive_emb(str(local), device="cpu")
    got = objects(fs, url)
    assert got == tree_bytes(local)
    assert "emb/c.3.0.0.0" in got and open_store(url).tensor_names() == ["feats", "attn", "emb"]
    assert all(SECRET.encode() not in data and b"127.0.0.1" not in data for data in got.values())
    code, out = cli("verify", url)
    assert code == 0 and "all intact" in out


@pytest.mark.slow
def test_cli_extract_on_ray_straight_to_s3_killed_and_resumed(s3, stores):
    """`evl-cache extract --store s3://...` on the embedded Ray (writer tasks put the shards), killed
    (fault hook) after shard 2's objects are put and before its videos are marked: verify passes and
    the rerun ends byte-identical to the serial reference; the secret is in no output."""
    fs = s3["fs"]
    url = f"s3://{BUCKET}/runs/cli-killed"
    proc = run(extract_args(s3, url), dict(s3["env"], EVL_CACHE_FAULT="after_shard_write@2=kill"), check=False)
    assert proc.returncode == 137, proc.stdout + proc.stderr
    assert list(open_store(url).status()[4:6]) == [PENDING, PENDING]
    assert "all intact" in run([*EVL, "verify", url], s3["env"]).stdout
    out = run(extract_args(s3, url), s3["env"])
    assert "7/7 done" in out.stdout
    assert SECRET not in proc.stdout + proc.stderr + out.stdout + out.stderr
    ref = objects(fs, stores["url"])
    assert objects(fs, url).keys() == ref.keys()
    assert {k: v for k, v in objects(fs, url).items() if k != "zarr.json"} == {k: v for k, v in ref.items() if k != "zarr.json"}


@pytest.mark.slow
def test_cli_extract_prefix_layout_on_ray_straight_to_s3(s3, prefix_stores):
    """`evl-cache extract --layout prefix --store s3://...` on the embedded Ray: the tail weights object
    and every shard object equal the serial prefix extraction's, and `verify` reads it back."""
    fs = s3["fs"]
    url = f"s3://{BUCKET}/runs/cli-prefix"
    out = run(extract_args(s3, url, "--layout", "prefix"), s3["env"])
    assert "7/7 done" in out.stdout and SECRET not in out.stdout + out.stderr
    ref = objects(fs, prefix_stores["url"])
    got = objects(fs, url)
    assert got.keys() == ref.keys() and "tail_weights.safetensors" in got
    assert {k: v for k, v in got.items() if k != "zarr.json"} == {k: v for k, v in ref.items() if k != "zarr.json"}
    assert open_store(url).attrs["tail"] == open_store(prefix_stores["url"]).attrs["tail"]
    assert "all intact" in run([*EVL, "verify", url], s3["env"]).stdout
