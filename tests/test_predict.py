"""predict (decode -> backbone -> decoder online) against extract-then-decoder on the same video."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import media
from evl_cache.backbone import BackboneSpec
from evl_cache.checkpoints import save_checkpoint
from evl_cache.config import decoder_config_for_store, load_config
from evl_cache.decoder import EVLDecoder
from evl_cache.errors import UserError
from evl_cache.predict import Predictor, predict
from evl_cache.store import open_store
from evl_cache.train import checkpoint_meta
from evl_cache.video import ViewSet
from test_train import SPEC, TINY, build_store, write_videos

EVAL = ViewSet("eval", count=3, temporal=3, spatial=1)


def random_decoder(attrs, seed=0) -> EVLDecoder:
    """A decoder whose every parameter (TCA tables included) is non-zero, so every path matters."""
    torch.manual_seed(seed)
    model = EVLDecoder(decoder_config_for_store(load_config(None).model, attrs, "s"))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    paths, labels = write_videos(root / "videos", 2)
    s16 = build_store(root / "s16.zarr", paths, labels, EVAL, dtype="float16")
    s32 = build_store(root / "s32.zarr", paths, labels, EVAL, dtype="float32")
    attrs = open_store(s32).attrs
    model = random_decoder(attrs)
    ck = save_checkpoint(root / "ck" / "model", model, checkpoint_meta(attrs, attrs, s32, 0))
    return {"root": root, "paths": paths, "s16": s16, "s32": s32, "ck": ck, "model": model}


def cached_logits(model, store_path, video) -> torch.Tensor:
    store = open_store(store_path)
    reads = [store.read(video, v) for v in range(store.num_views)]
    batch = {k: torch.stack([r[k] for r in reads]) for k in reads[0] if k != "label"}
    with torch.no_grad():
        return model(batch).float()


def test_predict_matches_cached_path(setup):
    predictor = Predictor(setup["ck"], device="cpu")
    model = setup["model"]
    for video, path in enumerate(setup["paths"]):
        from evl_cache.video import build_views

        views, _ = build_views(path, predictor.sampling, predictor.views, predictor.size, min_frames=predictor.min_frames)
        online = predictor.logits(views)
        assert online.shape == (3, 2)
        # float32 store: the cached path is the same computation, bit for bit
        assert torch.equal(online, cached_logits(model, setup["s32"], video))
        # float16 store: features rounded to fp16 on the way through the cache
        half = cached_logits(model, setup["s16"], video)
        assert not torch.equal(online, half)
        torch.testing.assert_close(half, online, rtol=1e-2, atol=2e-2)


def test_predict_reports_top_classes(setup):
    out = predict(setup["ck"], setup["paths"][0], device="cpu", topk=5)
    assert len(out) == 1 and out[0].error is None
    # recomputed from the float32 store's cached views (the same numerics, see above), not from predict's logits
    probs = cached_logits(setup["model"], setup["s32"], 0).softmax(-1).mean(0)
    order = probs.argsort(descending=True).tolist()
    assert len(out[0].top) == 2  # top-k is capped at the class count
    assert [n for n, _ in out[0].top] == [["left", "right"][c] for c in order]
    assert [p for _, p in out[0].top] == pytest.approx([float(probs[c]) for c in order], abs=1e-6)


def test_predict_folder_keeps_going_past_bad_files(setup, tmp_path):
    folder = tmp_path / "clips"
    folder.mkdir()
    for p in setup["paths"]:
        (folder / Path(p).name).write_bytes(Path(p).read_bytes())
    media.zero_byte(folder / "broken.mp4")
    (folder / "notes.txt").write_text("not a video")
    out = predict(setup["ck"], folder, device="cpu")
    assert [Path(p.path).name for p in out] == ["broken.mp4", "v0.mp4", "v1.mp4"]
    assert out[0].error and out[1].error is None and out[2].error is None


def test_weights_must_match_the_recorded_identity(setup, tmp_path):
    from evl_cache.backbone import build_visual_tower

    visual, _ = build_visual_tower(BackboneSpec(arch=TINY, weights="random", seed=1))
    other = tmp_path / "other.pt"
    torch.save(visual.state_dict(), other)
    with pytest.raises(UserError, match="--force"):
        Predictor(setup["ck"], weights=str(other), device="cpu")
    forced = Predictor(setup["ck"], weights=str(other), device="cpu", force=True)
    assert forced.backbone.weights_id != "random:0"
    with pytest.raises(UserError, match="not found"):
        Predictor(setup["ck"], weights=str(tmp_path / "nope.pt"), device="cpu")


def test_recorded_weights_file_is_used_and_checked(tmp_path):
    """A store extracted from a weights file: predict finds it by path and verifies its sha256."""
    from evl_cache.backbone import build_visual_tower

    visual, _ = build_visual_tower(SPEC)
    wfile = tmp_path / "clip.pt"
    torch.save(visual.state_dict(), wfile)
    paths, labels = write_videos(tmp_path / "v", 2)
    spec = BackboneSpec(arch=TINY, weights=str(wfile))
    store = build_store(tmp_path / "s.zarr", paths, labels, EVAL, dtype="float32", spec=spec)
    attrs = open_store(store).attrs
    model = random_decoder(attrs, seed=1)
    ck = save_checkpoint(tmp_path / "ck", model, checkpoint_meta(attrs, attrs, store, 0))
    out = predict(ck, paths[1], device="cpu")
    assert torch.equal(out[0].logits, cached_logits(model, store, 1))
    moved = tmp_path / "moved.pt"
    wfile.rename(moved)
    with pytest.raises(UserError, match="--weights FILE"):
        predict(ck, paths[1], device="cpu")
    assert predict(ck, paths[1], weights_override=str(moved), device="cpu")[0].error is None


@pytest.mark.parametrize("recorded, override, dtype", [
    ("fp32", None, torch.float32),
    ("bf16", None, torch.bfloat16),  # the tiny ViT runs in bf16 on CPU
    (None, None, torch.float32),  # checkpoint from before precision was recorded: auto = fp32 on CPU
    ("bf16", "fp32", torch.float32),  # --precision wins over the checkpoint
    ("fp32", "bf16", torch.bfloat16),
])
def test_backbone_precision_comes_from_the_checkpoint(setup, tmp_path, recorded, override, dtype):
    attrs = dict(open_store(setup["s32"]).attrs)
    backbone = {k: v for k, v in attrs["backbone"].items() if k != "precision"}
    attrs["backbone"] = backbone if recorded is None else {**backbone, "precision": recorded}
    ck = save_checkpoint(tmp_path / "ck", setup["model"], checkpoint_meta(attrs, attrs, setup["s32"], 0))
    predictor = Predictor(ck, device="cpu", precision=override)
    assert predictor.backbone.visual.conv1.weight.dtype == dtype
    assert predictor.precision == (override or recorded or "auto")


def test_predict_cli_precision_flag(setup, tmp_path):
    """`--precision` reaches the backbone: bf16 features give logits close to, but not equal to, fp32's."""
    from typer.testing import CliRunner

    from evl_cache.cli import app

    attrs = dict(open_store(setup["s32"]).attrs)
    attrs["backbone"] = {**attrs["backbone"], "precision": "fp32"}
    ck = save_checkpoint(tmp_path / "ck", setup["model"], checkpoint_meta(attrs, attrs, setup["s32"], 0))
    fp32 = predict(ck, setup["paths"][0], device="cpu")[0]
    bf16 = predict(ck, setup["paths"][0], device="cpu", precision="bf16")[0]
    assert torch.equal(fp32.logits, cached_logits(setup["model"], setup["s32"], 0))
    assert not torch.equal(bf16.logits, fp32.logits)
    torch.testing.assert_close(bf16.logits, fp32.logits, rtol=0.05, atol=0.05)
    res = CliRunner().invoke(app, ["predict", "--checkpoint", str(ck), setup["paths"][0], "--device", "cpu",
                                   "--precision", "fp8"])
    assert isinstance(res.exception, UserError) and "unknown precision 'fp8'" in str(res.exception)
    res = CliRunner().invoke(app, ["predict", "--checkpoint", str(ck), setup["paths"][0], "--device", "cpu",
                                   "--precision", "bf16", "--topk", "1"])
    assert res.exit_code == 0, res.output
    name, prob = bf16.top[0]
    assert name in res.output and f"{prob:.4f}" in res.output


def test_bad_inputs(setup, tmp_path):
    with pytest.raises(UserError, match="not found"):
        predict(setup["ck"], tmp_path / "missing.mp4", device="cpu")
    bad = tmp_path / "bad"
    (bad.with_suffix(".json")).write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        predict(bad, setup["paths"][0], device="cpu")
    doc = json.loads(Path(setup["ck"]).read_text())
    assert doc["meta"]["eval_views"] == {"temporal": 3, "spatial": 1}
