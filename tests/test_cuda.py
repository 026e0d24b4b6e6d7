"""CUDA-only checks (`make bench-gpu` runs them): fp16 AMP with a GradScaler resumes exactly, pinned-memory
loading, fp16 extraction against fp32, and int8/fp8/uint8/top-k dequantisation on the device equal to
the CPU's. Every test is skipped without CUDA.

EVL_CUDA_TESTS_DEVICE=cpu runs the same code paths on the CPU (AMP and pinning are CUDA-only and
fall away there): a way to prove the tests themselves run on a machine without a GPU.
"""

from __future__ import annotations

import os

import pytest
import torch

DEVICE = torch.device(os.environ.get("EVL_CUDA_TESTS_DEVICE", "cuda"))
pytestmark = pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(),
                                reason="needs a CUDA device (EVL_CUDA_TESTS_DEVICE=cpu runs the logic on the CPU)")
CUDA = DEVICE.type == "cuda"


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    from test_formats import VIEWS, build, build_prefix
    from test_train import write_videos

    root = tmp_path_factory.mktemp("cuda")
    paths, _ = write_videos(root / "videos", 5)
    return {
        "root": root, "paths": paths,
        "fp16": build(root / "fp16.zarr", paths),
        "int8": build(root / "int8.zarr", paths, dtype="int8", attn_dtype="uint8"),
        "fp8": build(root / "fp8.zarr", paths, dtype="float8_e4m3", attn_dtype="uint8"),
        "top": build(root / "top.zarr", paths, dtype="int8", attn_dtype="uint8", attn_topk=4),
        "prefix": build_prefix(root / "prefix.zarr", paths),
        "views": VIEWS,
    }


def test_amp_fp16_gradscaler_resume_is_exact(stores, tmp_path):
    from test_train import losses, open_state, tiny_cfg

    from evl_cache.train import train

    def cfg():
        c = tiny_cfg({"train": stores["fp16"]}, device=str(DEVICE), amp="fp16" if CUDA else "off")
        return c

    train(cfg(), tmp_path / "full", progress=False)
    train(cfg(), tmp_path / "cut", until_step=3, progress=False)
    train(cfg(), tmp_path / "cut", resume=True, progress=False)
    full, cut = losses(tmp_path / "full"), losses(tmp_path / "cut")
    assert len(full) == 6 and cut == full  # exact floats: scaler state, RNG and optimizer all restored
    if CUDA:
        state = torch.load(tmp_path / "cut" / "train_state.pt", weights_only=False)
        assert state["scaler"] and state["scaler"]["scale"] > 0  # the GradScaler really ran and was saved
    a, b = open_state(tmp_path / "full" / "model.safetensors"), open_state(tmp_path / "cut" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_pinned_memory_loading_matches_store_reads(stores):
    from evl_cache.data import make_loader, to_device
    from evl_cache.store import open_store

    st = open_store(stores["int8"])
    for workers in (0, 1):
        batch = next(iter(make_loader(stores["int8"], 4, train=False, num_workers=workers, pin_memory=CUDA)))
        if CUDA:
            assert all(v.is_pinned() for k, v in batch.items() if isinstance(v, torch.Tensor))
        decoded = to_device(batch, DEVICE)
        assert decoded["feats"].device.type == DEVICE.type
        for b, video in enumerate(batch["video"].tolist()):
            ref = st.read(video, b % 2)
            assert torch.equal(decoded["feats"][b].cpu(), ref["feats"]) and torch.equal(decoded["attn"][b].cpu(), ref["attn"])


def test_fp16_extraction_matches_fp32(stores):
    from test_train import SPEC

    from evl_cache.backbone import build_backbone
    from evl_cache.video import Sampling, build_views

    frames = build_views(stores["paths"][0], Sampling("dense", 4, 2), stores["views"], 32, key="v0")[0]
    ref = build_backbone(SPEC, blocks=[1, 2], attention="maps", device="cpu")(frames)
    half = build_backbone(SPEC.__class__(**{**SPEC.to_dict(), "precision": "fp16" if CUDA else "fp32"}),
                          blocks=[1, 2], attention="maps", device=DEVICE)(frames)
    cos = torch.nn.functional.cosine_similarity(half["feats"].float().cpu(), ref["feats"].float(), dim=-1)
    assert float(cos.min()) > 0.999
    assert float((half["attn"].float().cpu() - ref["attn"].float()).abs().max()) < 5e-3


@pytest.mark.parametrize("name", ["int8", "fp8", "top"])
def test_dequantisation_on_device_equals_cpu(stores, name):
    from evl_cache.data import make_loader, to_device

    batch = next(iter(make_loader(stores[name], 5, train=False)))
    on_cpu = to_device(batch, torch.device("cpu"))
    on_dev = to_device(batch, DEVICE)
    for key in ("feats", "attn"):
        assert on_dev[key].device.type == DEVICE.type and on_dev[key].dtype == on_cpu[key].dtype
        assert torch.equal(on_dev[key].cpu(), on_cpu[key]), key


def test_prefix_tail_on_device_matches_cpu(stores):
    from evl_cache.data import make_loader, to_device

    batch = next(iter(make_loader(stores["prefix"], 4, train=False)))
    on_cpu, on_dev = to_device(batch, torch.device("cpu")), to_device(batch, DEVICE)
    cos = torch.nn.functional.cosine_similarity(on_dev["feats"].float().cpu(), on_cpu["feats"].float(), dim=-1)
    assert float(cos.min()) > 0.999
    assert float((on_dev["attn"].float().cpu() - on_cpu["attn"].float()).abs().max()) < 5e-3

