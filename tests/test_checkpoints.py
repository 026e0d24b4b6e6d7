"""Own checkpoint format round trip, clear failures, and import of the released EVL layout."""

import json

import pytest
import torch

from evl_cache.checkpoints import import_evl_checkpoint, load_checkpoint, save_checkpoint
from evl_cache.decoder import EVLDecoder
from evl_cache.errors import UserError
from evl_cache.tca import temporal_attention_maps
from test_decoder import randomize, reference_forward, tiny_cfg, tiny_inputs


def _batch(cfg, dtype=torch.float32):
    feats, q, k = tiny_inputs(cfg, dtype=dtype)
    return {"feats": feats, "attn": temporal_attention_maps(q, k)}, q, k


def test_round_trip(tmp_path):
    cfg = tiny_cfg()
    model = randomize(EVLDecoder(cfg)).eval()
    meta = {"backbone": {"arch": "ViT-B-16", "sha256": "ab" * 32}, "blocks": [8, 9], "frames": 3,
            "sampling": {"kind": "dense", "stride": 16}, "class_names": list("abcde")}
    out = save_checkpoint(tmp_path / "run" / "best", model, meta)
    assert out == tmp_path / "run" / "best.json" and (tmp_path / "run" / "best.safetensors").is_file()
    assert not list((tmp_path / "run").glob("*.tmp"))
    for p in ("run/best", "run/best.json", "run/best.safetensors"):
        loaded, meta2 = load_checkpoint(tmp_path / p)
        assert meta2 == meta and loaded.cfg == cfg and not loaded.training
        batch, _, _ = _batch(cfg)
        torch.testing.assert_close(loaded(batch), model(batch), atol=0, rtol=0)


def test_failures_are_one_clear_line(tmp_path):
    cfg = tiny_cfg()
    model = EVLDecoder(cfg)
    stem = tmp_path / "ck"
    with pytest.raises(UserError, match="not found"):
        load_checkpoint(stem)
    with pytest.raises(UserError, match="3 class names for a 5-class head"):
        save_checkpoint(stem, model, {"class_names": ["a", "b", "c"]})
    with pytest.raises(UserError, match="not JSON-serialisable"):
        save_checkpoint(stem, model, {"when": object()})
    assert not list(tmp_path.iterdir())  # nothing half-written
    (tmp_path / "other.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(UserError, match="not an evl-cache decoder checkpoint"):
        load_checkpoint(tmp_path / "other.json")
    (tmp_path / "other.json").unlink()
    save_checkpoint(stem, model, {})
    with pytest.raises(UserError, match="5-class head but 7 classes"):
        load_checkpoint(stem, expected_classes=7)
    # corrupt weights: sha256 mismatch is caught before parsing
    w = tmp_path / "ck.safetensors"
    good = w.read_bytes()
    w.write_bytes(good[:-10])
    with pytest.raises(UserError, match="sha256"):
        load_checkpoint(stem)
    # config edited to a different class count -> shape mismatch named precisely
    w.write_bytes(good)
    doc = json.loads((tmp_path / "ck.json").read_text())
    doc["decoder"]["num_classes"] = 9
    (tmp_path / "ck.json").write_text(json.dumps(doc))
    with pytest.raises(UserError, match="head has 5 classes but the config says 9"):
        load_checkpoint(stem)
    doc["decoder"]["num_classes"] = 5
    doc["decoder"]["temporal_pos"] = False
    (tmp_path / "ck.json").write_text(json.dumps(doc))
    with pytest.raises(UserError, match="unexpected"):
        load_checkpoint(stem)
    (tmp_path / "ck.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_checkpoint(stem)
    (tmp_path / "ck.safetensors").unlink()
    (tmp_path / "ck.json").write_text(json.dumps({**doc, "decoder": cfg.to_dict()}))
    with pytest.raises(UserError, match="weights .* not found"):
        load_checkpoint(stem)


def released_state(K=2, C=16, T=3, h=2, classes=5, mods=("conv", "pos", "tca"), seed=0):
    """A random state dict in exactly the released EVL layout (DDP prefix, 'model' key)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.5  # noqa: E731
    sd = {"decoder.cls_token": r(C)}
    R = (2 * h - 1) ** 2
    for i in range(K):
        pre = f"decoder.decoder_layers.{i}."
        for n in ("q", "k", "v", "out"):
            sd[pre + f"attn.{n}_proj.weight"], sd[pre + f"attn.{n}_proj.bias"] = r(C, C), r(C)
        sd[pre + "mlp.fc1.weight"], sd[pre + "mlp.fc1.bias"] = r(4 * C, C), r(4 * C)
        sd[pre + "mlp.fc2.weight"], sd[pre + "mlp.fc2.bias"] = r(C, 4 * C), r(C)
        for n in (1, 2, 3):
            sd[pre + f"norm{n}.weight"], sd[pre + f"norm{n}.bias"] = 1 + r(C), r(C)
        if "conv" in mods:
            sd[f"decoder.temporal_conv.{i}.weight"], sd[f"decoder.temporal_conv.{i}.bias"] = r(C, 1, 3), r(C)
        if "pos" in mods:
            sd[f"decoder.temporal_pos_embed.{i}"] = r(T, C)
        if "tca" in mods:
            sd[f"decoder.cross_attention.{i}.w1"], sd[f"decoder.cross_attention.{i}.w2"] = r(R, C), r(R, C)
    sd["proj.0.weight"], sd["proj.0.bias"] = 1 + r(C), r(C)
    sd["proj.2.weight"], sd["proj.2.bias"] = r(classes, C), r(classes)
    return sd


def test_import_released_layout_matches_reference_forward(tmp_path):
    sd = released_state()
    src = tmp_path / "evl_release.pth"
    torch.save({"model": {"module." + k: v for k, v in sd.items()}}, src)
    model, out = import_evl_checkpoint(src, tmp_path / "imported", heads=2, meta={"class_names": list("vwxyz")})
    cfg = model.cfg
    assert (cfg.num_layers, cfg.width, cfg.heads, cfg.frames, cfg.grid, cfg.num_classes) == (2, 16, 2, 3, (2, 2), 5)
    loaded, meta = load_checkpoint(out)
    assert meta["class_names"] == list("vwxyz") and meta["imported_from"]["layout"] == "EVL release"
    feats, q, k = tiny_inputs(cfg, dtype=torch.float64)
    ref = reference_forward({k_: v.double() for k_, v in sd.items()}, feats, q, k, heads=2, grid=(2, 2))
    out_model = loaded.double()({"feats": feats, "attn": temporal_attention_maps(q, k)})
    torch.testing.assert_close(out_model, ref, atol=1e-10, rtol=1e-10)


def test_import_infers_switched_off_modules_and_defaults(tmp_path):
    sd = released_state(C=128, mods=("conv",))
    src = tmp_path / "noTCA.pth"
    torch.save({"model": {"module." + k: v for k, v in sd.items()}}, src)
    with pytest.raises(UserError, match="frames cannot be inferred"):
        import_evl_checkpoint(src, tmp_path / "x")
    model, _ = import_evl_checkpoint(src, tmp_path / "x", num_frames=3, grid=(2, 2))
    assert model.cfg.heads == 2  # C // 64
    assert (model.cfg.temporal_conv, model.cfg.temporal_pos, model.cfg.temporal_cross_attention) == (True, False, False)


def test_import_rejects_non_evl_files(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read"):
        import_evl_checkpoint(bad, tmp_path / "x")
    sd = released_state()
    sd["backbone.conv1.weight"] = torch.zeros(1)
    torch.save({"model": sd}, bad)
    with pytest.raises(UserError, match="not EVL decoder/head weights"):
        import_evl_checkpoint(bad, tmp_path / "x")
    assert not (tmp_path / "x.json").exists()


def test_cli_import_evl(tmp_path):
    from typer.testing import CliRunner

    from evl_cache.cli import app

    sd = released_state()
    src = tmp_path / "evl.pth"
    torch.save({"model": {"module." + k: v for k, v in sd.items()}}, src)
    names = tmp_path / "names.txt"
    names.write_text("a\nb\nc\nd\ne\n")
    result = CliRunner().invoke(app, ["import-evl", str(src), str(tmp_path / "out"), "--heads", "2",
                                      "--classes-file", str(names), "--arch", "ViT-B-16"])
    assert result.exit_code == 0, result.output
    assert "K=2 width=16 heads=2 frames=3 grid=2x2 classes=5" in result.output
    model, meta = load_checkpoint(tmp_path / "out")
    assert meta["class_names"] == list("abcde") and meta["blocks"] == [10, 11]
    assert meta["backbone_arch"] == "ViT-B-16" and "imported_from" in meta
    names.write_text("a\nb\n")
    bad = CliRunner().invoke(app, ["import-evl", str(src), str(tmp_path / "out2"), "--heads", "2",
                                   "--classes-file", str(names)])
    assert isinstance(bad.exception, UserError) and "2 class names for a 5-class head" in str(bad.exception)
    assert not (tmp_path / "out2.json").exists()


def test_imported_release_evaluates_on_a_store(tmp_path):
    """import-evl --store: the imported release runs through `evaluate`, matching the reference forward."""
    import numpy as np
    from typer.testing import CliRunner

    from evl_cache.cli import app
    from evl_cache.evaluate import evaluate
    from evl_cache.store import open_store
    from evl_cache.video import ViewSet
    from test_train import build_store, write_videos

    paths, labels = write_videos(tmp_path / "videos", 2)
    store = build_store(tmp_path / "s.zarr", paths, labels, ViewSet("eval", count=2, temporal=2, spatial=1),
                        dtype="float32", attention="qk")
    st = open_store(store)
    a = st.attrs
    sd = released_state(K=len(a["blocks"]), C=a["width"], T=a["frames"], h=a["grid"][0], classes=2, seed=4)
    src = tmp_path / "evl.pth"
    torch.save({"model": {"module." + k: v for k, v in sd.items()}}, src)
    res = CliRunner().invoke(app, ["import-evl", str(src), str(tmp_path / "imp"), "--heads", str(a["heads"]),
                                   "--store", store])
    assert res.exit_code == 0, res.output
    model, meta = load_checkpoint(tmp_path / "imp")
    assert model.cfg.attention_input == "qk" and meta["blocks"] == list(a["blocks"])
    evaluate(tmp_path / "imp", store, tmp_path / "ev", batch_size=4, device="cpu")
    import csv

    rows = list(csv.DictReader(open(tmp_path / "ev" / "predictions.csv")))
    ref_scores = []
    for v in range(2):
        reads = [st.read(v, i) for i in range(2)]
        b = {k: torch.stack([r[k] for r in reads]).double() for k in ("feats", "q", "k")}
        logits = reference_forward({k: t.double() for k, t in sd.items()}, b["feats"], b["q"], b["k"],
                                   a["heads"], tuple(a["grid"]))
        ref_scores.append(logits.softmax(-1).mean(0).numpy())
    ref = np.stack(ref_scores)
    assert [r["pred"] for r in rows] == [["left", "right"][i] for i in ref.argmax(1)]
    np.testing.assert_allclose([float(r["prob"]) for r in rows], ref.max(1), rtol=1e-4)
