"""The store never fakes or loses data: lost, truncated or damaged shard files are errors naming the file
and `evl-cache verify`, never zeros; verify finds them and --repair sends just those videos back to
extraction; shard files are fsynced before their videos are marked; the layout stays lean.

Stores are built with extraction's own work units in this process (no Ray), so each test is fast.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from evl_cache.data import make_loader
from evl_cache.extract import BackboneRunner, ExtractConfig, extract_serially, store_attributes
from evl_cache.store import (
    DONE,
    FAILED,
    PENDING,
    StoreDataError,
    VideoTable,
    choose_shard_size,
    count_entries,
    create_store,
    open_store,
)
from evl_cache.verify import verify_store
from test_train import SAMPLING, SPEC, build_store, write_videos
from evl_cache.video import ViewSet

VIEWS = ViewSet("train", count=2, temporal=1, spatial=1, seed=0)
EVL = [sys.executable, "-m", "evl_cache.cli"]


def build(path: Path, paths: list[str], shard_size: int = 4, compressor: str | None = None) -> str:
    return build_store(path, paths, [i % 2 for i in range(len(paths))], VIEWS, shard_size=shard_size, compressor=compressor)


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    root = tmp_path_factory.mktemp("integrity")
    paths, _ = write_videos(root / "videos", 10)
    return root, paths, build(root / "ref.zarr", paths)


def copy_of(ref, name: str) -> Path:
    root, _, store = ref
    dst = root / name
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(store, dst)
    return dst


def shard_file(store: Path, array: str, shard: int) -> Path:
    return Path(open_store(str(store)).reader(array).shard_file(shard))


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*EVL, *args], capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(Path(__file__).parent.parent)))


@pytest.mark.parametrize("damage", ["delete", "truncate", "flip"])
def test_lost_or_damaged_shard_is_an_error_naming_file_and_verify(ref, damage):
    store = copy_of(ref, f"damaged_{damage}.zarr")
    victim = shard_file(store, "feats", 1)  # videos 4..7
    data = victim.read_bytes()
    if damage == "delete":
        victim.unlink()
    elif damage == "truncate":
        victim.write_bytes(data[: len(data) // 2])
    else:  # one bit flipped inside video 5's first chunk: only its crc32c can tell
        st = open_store(str(store))
        offset = int(st.reader("feats").shard_index(1)[1, 0, 0])
        flipped = bytearray(data)
        flipped[offset + 100] ^= 0x01
        victim.write_bytes(bytes(flipped))
    st = open_store(str(store))
    assert st.status()[5] == DONE
    with pytest.raises(StoreDataError, match=r"c\.1\.0.*evl-cache verify") as err:
        st.read(5, 0)
    assert str(victim) in str(err.value)
    for workers in (0, 1):  # the DataLoader (main process and a worker) refuses too: never zeros
        loader = make_loader(str(store), 4, train=False, items=[5 * 2], num_workers=workers)
        with pytest.raises(StoreDataError, match="evl-cache verify"):
            next(iter(loader))
    # videos of the other shards still read, and match the intact store
    assert torch.equal(st.read(1, 1)["feats"], open_store(ref[2]).read(1, 1)["feats"])


def test_cli_reports_a_lost_shard_in_one_line_and_exit_2(ref, tmp_path):
    store = copy_of(ref, "cli_lost.zarr")
    shard_file(store, "attn", 0).unlink()
    from test_train import tiny_cfg  # noqa: F401 - the train fixture's config shape

    out = run_cli("train", "--train-store", str(store), "--out", str(tmp_path / "run"), "--steps", "2", "--batch", "4",
                  "--no-progress", "--set", "model.num_layers=2", "--set", "data.num_workers=1")
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert out.returncode == 2, out.stderr
    assert len(lines) == 1 and "c.0.0" in lines[0] and "evl-cache verify" in lines[0], out.stderr


def test_verify_finds_exactly_the_bad_videos_and_repair_redoes_just_them(ref):
    root, paths, ref_store = ref
    store = copy_of(ref, "repair.zarr")
    st = open_store(str(store))
    offset = int(st.reader("attn").shard_index(2)[0, 1, 0])  # video 8, view 1, attention maps
    f = shard_file(store, "attn", 2)
    data = bytearray(f.read_bytes())
    data[offset + 8] ^= 0x10
    f.write_bytes(bytes(data))
    shard_file(store, "feats", 1).unlink()  # videos 4..7

    report = verify_store(str(store))
    assert [i for i, _, _ in report.bad] == [4, 5, 6, 7, 8]
    assert "crc32c" in dict((i, r) for i, _, r in report.bad)[8]
    quick = verify_store(str(store), quick=True)  # index-only: finds the lost file, not the flipped bit
    assert [i for i, _, _ in quick.bad] == [4, 5, 6, 7]
    out = run_cli("verify", str(store))
    assert out.returncode == 1 and "5 bad video(s)" in out.stdout and "--repair" in out.stdout

    out = run_cli("verify", str(store), "--repair")
    assert out.returncode == 0, out.stderr
    status = open_store(str(store)).status()
    assert [i for i in range(10) if status[i] == PENDING] == [4, 5, 6, 7, 8]
    # the next extraction recomputes exactly those, and the store equals an untouched one
    runner = BackboneRunner(SPEC.to_dict(), [1, 2], "maps", "float16", device="cpu")
    extract_serially(open_store(str(store), mode="r+"), runner, paths, [Path(p).name for p in paths])
    assert verify_store(str(store)).bad == []
    a, b = open_store(str(store)), open_store(ref_store)
    for video in range(10):
        for view in range(2):
            x, y = a.read(video, view), b.read(video, view)
            assert all(torch.equal(x[k], y[k]) for k in x)


def test_retry_keeps_done_chunks_byte_for_byte(ref):
    """A shard holding done videos is rewritten only for its undone ones: done chunks keep their exact
    bytes, and a done video whose data is gone is refused rather than recomputed over."""
    root, paths, _ = ref
    store = copy_of(ref, "retry.zarr")
    st = open_store(str(store), mode="r+")
    before = {v: st.read(v, 0)["feats"].clone() for v in (4, 5, 7)}
    index_before = st.reader("feats").shard_index(1).copy()
    raw_before = shard_file(store, "feats", 1).read_bytes()
    st.mark({6: {"status": FAILED, "error": "pretend it failed"}})
    runner = BackboneRunner(SPEC.to_dict(), [1, 2], "maps", "float16", device="cpu")
    from evl_cache.extract import decode_video, write_batches

    decoded = [decode_video(paths[6], Path(paths[6]).name, SAMPLING, VIEWS, 32, 4)]
    write_batches(str(store), 1, [6], [4, 5, 7], runner.compute(8, *decoded))
    st = open_store(str(store))
    after = shard_file(store, "feats", 1).read_bytes()
    index_after = st.reader("feats").shard_index(1)
    for pos in (0, 1, 3):
        for view in range(2):
            o0, n0 = index_before[pos, view]
            o1, n1 = index_after[pos, view]
            assert raw_before[o0:o0 + n0] == after[o1:o1 + n1]
    for v, t in before.items():
        assert torch.equal(st.read(v, 0)["feats"], t)
    # lost data of a done video is never papered over by a retry
    shard_file(store, "feats", 1).unlink()
    with pytest.raises(StoreDataError, match="done videos"):
        write_batches(str(store), 1, [6], [4, 5, 7], runner.compute(8, *decoded))


def test_shard_files_and_directory_are_fsynced_before_marking(ref, tmp_path, monkeypatch):
    root, paths, _ = ref
    events: list[str] = []
    real_fsync = os.fsync

    def fsync(fd):
        events.append("fsync:" + os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    real_flush = VideoTable.flush
    monkeypatch.setattr(VideoTable, "flush", lambda self: (events.append("flush"), real_flush(self)))
    build(tmp_path / "s.zarr", paths[:4], shard_size=4)
    flush = events.index("flush")
    synced = {e.split(":", 1)[1] for e in events[:flush]}
    for name in ("feats", "attn"):
        assert str(shard_file(tmp_path / "s.zarr", name, 0)) in synced
        assert str(tmp_path / "s.zarr" / name) in synced


def test_a_kill_between_metadata_and_status_leaves_videos_pending(ref, tmp_path):
    """The flush writes errors and decode metadata first and status last: killed in between, the
    videos are still pending (redone), never done with stale metadata."""
    root, paths, _ = ref
    store = copy_of(ref, "kill_mark.zarr")
    st = open_store(str(store), mode="r+")
    st.mark({i: {"status": PENDING} for i in range(10)})
    code = (
        "import sys; from evl_cache.store import open_store, VideoTable, DONE\n"
        f"t = VideoTable(open_store({str(store)!r}, mode='r+'))\n"
        "t.mark({0: {'status': DONE, 'error': '', 'num_frames': 12.0, 'fps': 25.0}}, shard=0)\n"
        "t.flush()\n"
    )
    env = dict(os.environ, EVL_CACHE_FAULT="mark_before_status@0=kill", PYTHONPATH=str(Path(__file__).parent.parent))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 137, out.stderr
    st = open_store(str(store))
    assert st.status()[0] == PENDING and st.decode_meta()[0, 0] == 12.0


def test_layout_is_lean(ref, tmp_path):
    """Files + directories <= 1.2 x shard files + 20, for every attention mode and a compressed store."""
    root, paths, ref_store = ref
    stores = [ref_store, build(tmp_path / "zstd.zarr", paths, shard_size=3, compressor="zstd")]
    for path in stores:
        entries, _ = count_entries(path)
        shards = sum(1 for name in open_store(path).tensor_names() for f in os.listdir(Path(path) / name) if f.startswith("c."))
        assert entries <= 1.2 * shards + 20, (path, entries, shards)
        assert all(not (Path(path) / name / "c").exists() for name in open_store(path).tensor_names())
    z = open_store(stores[1])
    assert torch.equal(z.read(9, 1)["attn"], open_store(ref_store).read(9, 1)["attn"])  # zstd decodes to the same


def test_shard_size_is_chosen_by_bytes():
    attrs = {"frames": 8, "tokens": 197, "width": 768, "heads": 12, "blocks": [8, 9, 10, 11], "attention": "maps",
             "dtype": "float16", "num_views": 2}
    per_video = 2 * 4 * 8 * 197 * 768 * 2  # the largest array, feats: V x K x T x L x C x 2 bytes
    assert choose_shard_size(attrs) == 2**30 // per_video == 55
    assert choose_shard_size(attrs, target_mib=64) == 3
    assert choose_shard_size(dict(attrs, frames=2, tokens=17, width=64, heads=4)) == 1024  # capped
    assert choose_shard_size(attrs, target_mib=1) == 1


def test_status_table_marks_in_memory_until_flush(ref):
    store = copy_of(ref, "table.zarr")
    st = open_store(str(store), mode="r+")
    table = VideoTable(st)
    table.mark({3: {"status": FAILED, "error": "x"}}, shard=0)
    assert open_store(str(store)).status()[3] == DONE  # not yet written
    table.flush()
    assert open_store(str(store)).status()[3] == FAILED and open_store(str(store)).errors()[3] == "x"
    np.testing.assert_array_equal(table.status, open_store(str(store)).status())


def test_layout_stays_lean_at_large_n_and_for_compact_formats(ref, tmp_path):
    """The bound holds where table chunk files could dominate (N = 100k videos, 1024 per shard) and
    where a compact format has codes + scales (packed into one array per kind, so no extra files)."""
    attrs = dict(open_store(ref[2]).attrs)
    for key in ("schema_version", "num_videos", "shard_size", "compressor"):
        attrs.pop(key)
    n, s = 100_000, 1024
    big = create_store(str(tmp_path / "big.zarr"), attrs, [f"v{i}.mp4" for i in range(n)], [0] * n, shard_size=s)
    reference = open_store(ref[2])
    one = {name: np.asarray(reference.array(name)[0:1]) for name in reference.tensor_names()}
    for shard in range(0, -(-n // s), 7):  # every 7th shard gets one video
        big.write_videos(shard, [shard * s], [shard * s], one)
    big.mark({shard * s: {"status": DONE} for shard in range(0, -(-n // s), 7)})
    entries, _ = count_entries(big.path)
    shards = sum(1 for name in big.tensor_names() for f in os.listdir(Path(big.path) / name) if f.startswith("c."))
    assert shards == 2 * len(range(0, -(-n // s), 7)) and entries <= 1.2 * shards + 20, (entries, shards)
    compact = dict(attrs, dtype="int8:channel_token", attn_format="top4:uint8")
    small = create_store(str(tmp_path / "int8.zarr"), compact, ref[1], [0] * len(ref[1]), shard_size=64)
    runner = BackboneRunner(SPEC.to_dict(), [1, 2], "maps", compact["dtype"], device="cpu", attn_format="top4:uint8")
    extract_serially(small, runner, ref[1], [Path(p).name for p in ref[1]])
    entries, _ = count_entries(small.path)
    assert small.tensor_names() == ["feats", "attn"] and entries <= 1.2 * 2 + 20, entries
