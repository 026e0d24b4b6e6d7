"""Compact storage formats end to end: a store declares its formats, extraction encodes next to the
backbone, every reader decodes (on the device the batch lands on) to what a float16 store holds,
within each format's measured error (benchmarks/bench_quant.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from evl_cache.data import make_loader, to_device
from evl_cache.errors import UserError
from evl_cache.extract import BackboneRunner, ExtractConfig, extract_serially, store_attributes
from evl_cache.formats import feature_format, map_format
from evl_cache.store import create_store, open_store
from evl_cache.verify import verify_store
from evl_cache.video import ViewSet
from test_train import SAMPLING, SPEC, build_store, write_videos

VIEWS = ViewSet("train", count=2, temporal=1, spatial=1, seed=0)


def build(path: Path, paths: list[str], dtype: str = "float16", attn_dtype: str = "float16", attn_topk: int = 0) -> str:
    return build_store(path, paths, [i % 2 for i in range(len(paths))], VIEWS, dtype=dtype, shard_size=3,
                       attn_dtype=attn_dtype, attn_topk=attn_topk)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("formats")
    paths, _ = write_videos(root / "videos", 5)
    return {
        "fp16": build(root / "fp16.zarr", paths),
        "int8": build(root / "int8.zarr", paths, dtype="int8", attn_dtype="uint8"),
        "fp8": build(root / "fp8.zarr", paths, dtype="float8_e4m3"),
        "top": build(root / "top.zarr", paths, attn_dtype="uint8", attn_topk=4),
    }


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)


def test_formats_are_recorded_and_arrays_declared(stores):
    a = open_store(stores["int8"]).attrs
    assert a["dtype"] == "int8:channel_token" and a["attn_format"] == "uint8"
    # one array per tensor kind: codes, scales and indices packed into its chunks
    assert open_store(stores["int8"]).tensor_names() == ["feats", "attn"] == open_store(stores["top"]).tensor_names()
    parts = open_store(stores["int8"]).formats.parts()
    assert [p for p, _ in parts["feats"]] == ["feats", "feats_scale_channel", "feats_scale_token"]
    assert [p for p, _ in open_store(stores["top"]).formats.parts()["attn"]] == ["attn", "attn_index", "attn_scale_row"]
    assert open_store(stores["top"]).array("attn").dtype == np.uint8
    fp16 = open_store(stores["fp16"]).raw_bytes_per_view()
    k, t, length, c, p = 2, 4, 17, 64, 16  # codes 1 byte, scales float16 (per channel, per token, per map row)
    int8 = k * t * length * c + 2 * k * c + 2 * k * t * length + k * 2 * (t - 1) * p * p + 2 * k * 2 * (t - 1) * p
    assert open_store(stores["int8"]).raw_bytes_per_view() == int8 == 12688
    assert fp16 == 2 * (k * t * length * c + k * 2 * (t - 1) * p * p) and int8 < 0.54 * fp16


@pytest.mark.parametrize("name, min_cos", [("int8", 0.999), ("fp8", 0.995)])
def test_quantized_features_decode_close_to_float16(stores, name, min_cos):
    ref, q = open_store(stores["fp16"]), open_store(stores[name])
    for video in range(5):
        for view in range(2):
            a, b = ref.read(video, view), q.read(video, view)
            assert b["feats"].dtype == torch.float16 and b["feats"].shape == a["feats"].shape
            assert float(cosine(a["feats"], b["feats"]).min()) > min_cos
    assert verify_store(stores[name]).bad == []


def test_uint8_and_topk_maps(stores):
    ref, u8, top = open_store(stores["fp16"]), open_store(stores["int8"]), open_store(stores["top"])
    a, b, c = ref.read(3, 1)["attn"].float(), u8.read(3, 1)["attn"].float(), top.read(3, 1)["attn"].float()
    assert b.shape == a.shape == c.shape
    assert float((a - b).abs().sum(-1).max()) < 0.02  # row L1 error of uint8 maps
    assert int((c > 0).sum(-1).max()) <= 4  # top-k rows keep at most K entries
    kept = a.topk(4, dim=-1).values.sum(-1)
    assert torch.allclose(c.sum(-1), kept, atol=0.02)


def test_loader_decodes_on_the_device_like_the_store(stores):
    for name in ("int8", "top"):
        st = open_store(stores[name])
        for workers in (0, 1):
            batch = next(iter(make_loader(stores[name], 4, train=False, num_workers=workers)))
            assert batch["feats"].dtype in (torch.int8, torch.float16, torch.uint8)
            decoded = to_device(batch, torch.device("cpu"))
            for b, video in enumerate(batch["video"].tolist()):
                view = b % 2
                ref = st.read(video, view)
                assert torch.equal(decoded["feats"][b], ref["feats"]) and torch.equal(decoded["attn"][b], ref["attn"])


def test_bad_format_names_are_one_line_errors():
    assert feature_format("int8") == "int8:channel_token" and feature_format("float16") == "float16"
    assert map_format("uint8", 16) == "top16:uint8" and map_format() == "float16"
    for bad in ("int4", "int8:rows"):
        with pytest.raises(UserError):
            feature_format(bad)
    with pytest.raises(UserError):
        map_format("bf16")


def build_prefix(path: Path, paths: list[str], dtype: str = "float16") -> str:
    from evl_cache.backbone import load_model_config
    from evl_cache.extract import write_tail
    from evl_cache.prefix import tail_blocks

    cfg = ExtractConfig(backbone=SPEC, sampling=SAMPLING, views=VIEWS, blocks=[1, 2], dtype=dtype, layout="prefix", shard_size=3)
    runner = BackboneRunner(SPEC.to_dict(), [1, 2], "maps", feature_format(dtype), device="cpu", layout="prefix")
    attrs = store_attributes(runner.backbone.describe(), [1, 2], cfg, ["left", "right"], "t", {})
    attrs["model_config"] = {k: v for k, v in load_model_config(SPEC.arch).items() if k in ("embed_dim", "vision_cfg")}
    attrs["tail"] = {"file": "tail_weights.safetensors", "blocks": tail_blocks([1, 2])}
    store = write_tail(create_store(str(path), attrs, paths, [i % 2 for i in range(len(paths))], shard_size=3), runner.backbone)
    extract_serially(store, runner, paths, [Path(p).name for p in paths])
    return str(path)


@pytest.mark.parametrize("dtype", ["float16", "float8_e4m3"])
def test_prefix_layout_recomputes_what_the_full_layout_caches(stores, tmp_path, dtype):
    """Stage 2 recomputes the tail blocks from the cached stream: the same features and maps a full
    store holds, within float16 rounding of the cached stream (float8 for the fp8 prefix)."""
    paths = [str(Path(stores["fp16"]).parent / "videos" / f"v{i}.mp4") for i in range(5)]
    prefix = open_store(build_prefix(tmp_path / f"prefix_{dtype}.zarr", paths, dtype))
    full = open_store(stores["fp16"])
    assert prefix.tensor_names()[0] == "prefix" and prefix.attrs["layout"] == "prefix"
    one = 4 * 17 * 64  # T x L x C of the stream entering block 1
    assert prefix.raw_bytes_per_view() == {"float16": 2 * one, "float8_e4m3": one + 2 * 64 + 2 * 4 * 17}[dtype]
    tol = {"float16": (0.99999, 0.01), "float8_e4m3": (0.999, 0.05)}[dtype]
    for video in range(5):
        a, b = full.read(video, 1), prefix.read(video, 1)
        assert a["feats"].dtype == b["feats"].dtype == torch.float16
        assert float(cosine(a["feats"], b["feats"]).min()) > tol[0]
        assert float((a["attn"].float() - b["attn"].float()).abs().sum(-1).max()) < tol[1]
    batch = next(iter(make_loader(str(prefix.path), 4, train=False, num_workers=1)))
    assert set(batch) >= {"prefix", "label", "video"} and "feats" not in batch
    decoded = to_device(batch, torch.device("cpu"))
    assert torch.equal(decoded["feats"][0], prefix.read(int(batch["video"][0]), 0)["feats"])
    (Path(prefix.path) / "tail_weights.safetensors").write_bytes(b"x")  # a prefix store without its tail is lost
    with pytest.raises(UserError, match="sha256"):
        open_store(str(prefix.path)).read(0, 0)


def test_inspect_prints_bytes_per_clip_view(stores):
    from typer.testing import CliRunner

    from evl_cache.cli import app

    for name in ("fp16", "int8"):
        res = CliRunner().invoke(app, ["inspect", stores[name]])
        assert res.exit_code == 0, res.output
        per_view = open_store(stores[name]).raw_bytes_per_view()
        assert f"bytes per clip-view: {per_view:,} (" in res.output
    assert "bytes per clip-view: 12,688 (0.01 MB; layout full, features int8:channel_token, maps uint8)" in res.output
