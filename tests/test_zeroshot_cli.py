"""Per-frame embeddings in stores (extract --emb, derive-emb), `evl-cache zeroshot` and `predict --zero-shot`.

The tiny CLIP of tests/assets/tiny_clip.json has a text tower over CLIP's BPE vocabulary, so the
default tokenizer works; its weights are random, generated here from a seed. Every number is
checked against a computation written here from the equations (open_clip's own model for the
text side, numpy for the rest), never against the code under test.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from safetensors.torch import load_file, save_file

import media
from evl_cache.backbone import BackboneSpec, file_sha256
from evl_cache.derive import derive_emb
from evl_cache.errors import UserError
from evl_cache.extract import BackboneRunner, ExtractConfig, extract, extract_serially, store_attributes
from evl_cache.store import create_store, open_store
from evl_cache.video import Sampling, ViewSet

TINY_CLIP = str(Path(__file__).parent / "assets" / "tiny_clip.json")
SAMPLING = Sampling("dense", frames=4, stride=2)
VIEWS = ViewSet("eval", count=2, temporal=2, spatial=1)
LOGIT_SCALE = 23.0
EVL = [sys.executable, "-m", "evl_cache.cli"]


def make_weights(path: Path, seed: int = 0, text: bool = True) -> Path:
    """open_clip's CLIP for the tiny config, every parameter perturbed, saved as safetensors."""
    cfg = json.loads(Path(TINY_CLIP).read_text())
    torch.manual_seed(seed)
    model = open_clip.model.CLIP(cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"], quick_gelu=True)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        model.logit_scale.fill_(math.log(LOGIT_SCALE))
    sd = {k: v.contiguous() for k, v in model.state_dict().items() if text or k.startswith("visual.")}
    save_file(sd, str(path))
    return path


def build(path: Path, videos: list[str], labels: list[int], weights: Path, blocks: list[int], emb: bool,
          dtype: str = "float32", attention: str = "maps") -> str:
    """Extract with extract's own work units, serially (no Ray)."""
    spec = BackboneSpec(arch=TINY_CLIP, weights=str(weights), precision="fp32")
    cfg = ExtractConfig(backbone=spec, sampling=SAMPLING, views=VIEWS, blocks=blocks, attention=attention, dtype=dtype,
                        emb=emb, shard_size=2)
    runner = BackboneRunner(spec.to_dict(), blocks, attention, dtype, device="cpu", emb=emb)
    attrs = store_attributes(runner.backbone.describe(), runner.backbone.blocks, cfg, ["left", "right"], "test", {})
    store = create_store(str(path), attrs, videos, labels, shard_size=2)
    extract_serially(store, runner, videos, [Path(p).name for p in videos])
    return str(path)


from clirun import run_cli  # noqa: E402,F401  (shared with the other CLI tests)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("zs")
    videos, labels = [], []
    for i in range(3):
        frames = media.moving_square_frames(12, seed=10 + i)
        if i % 2:
            frames = np.ascontiguousarray(frames[:, :, ::-1])
        videos.append(str(media.write_video(root / f"v{i}.mp4", frames)))
        labels.append(i % 2)
    weights = make_weights(root / "clip.safetensors")
    full = build(root / "full.zarr", videos, labels, weights, [1, 2], emb=True)
    plain = build(root / "plain.zarr", videos, labels, weights, [2], emb=False, attention="none")
    classes = root / "classes.txt"
    classes.write_text("right\nup\nleft\n")  # the store's names in another order, plus a distractor
    templates = root / "templates.txt"
    templates.write_text("a video of {}.\n{} in motion\n")
    return {"root": root, "videos": videos, "labels": labels, "weights": weights, "full": full, "plain": plain,
            "classes": classes, "templates": templates}


def stored_emb(store_path: str) -> np.ndarray:
    import zarr

    return np.asarray(zarr.open_array(f"{store_path}/emb", mode="r")[:], dtype=np.float64)


def test_emb_is_ln_post_cls_times_proj_of_the_last_block(env):
    store = open_store(env["full"])
    assert store.attrs["emb"] is True and store.attrs["embed_dim"] == 32
    assert store.tensor_names() == ["feats", "attn", "emb"]
    w = {k: v.double() for k, v in load_file(str(env["weights"])).items()}
    for video in range(3):
        for view in range(VIEWS.count):
            got = store.read(video, view)
            assert got["emb"].shape == (4, 32) and got["emb"].dtype == torch.float16
            cls = got["feats"][1, :, 0].double()  # block 2 (the last of 3), float32 store, CLS token
            mu, var = cls.mean(-1, keepdim=True), cls.var(-1, unbiased=False, keepdim=True)
            ln = (cls - mu) / torch.sqrt(var + 1e-5) * w["visual.ln_post.weight"] + w["visual.ln_post.bias"]
            expected = ln @ w["visual.proj"]
            torch.testing.assert_close(got["emb"].double(), expected, rtol=2e-3, atol=2e-3)


@pytest.mark.slow  # starts a local Ray (about 2 minutes on a busy 2-core machine)
def test_emb_only_profile_through_the_cli_on_ray(env, tmp_path):
    """`--blocks none --emb`: one array, T x E float16 per clip-view, equal to the full store's emb."""
    import csv

    manifest = tmp_path / "list.csv"
    with open(manifest, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label"])
        w.writerows([(Path(p).name, ["left", "right"][l]) for p, l in zip(env["videos"], env["labels"])])
    store = tmp_path / "emb.zarr"
    args = [*EVL, "extract", "--dataset", "list", "--root", str(env["root"]), "--annotations", str(manifest),
            "--store", str(store), "--arch", TINY_CLIP,
            "--weights", str(env["weights"]), "--precision", "fp32", "--frames", "4", "--stride", "2", "--views", "eval:2x1",
            "--blocks", "none", "--emb", "--num-cpus", "1"]
    out = subprocess.run(args, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    st = open_store(str(store))
    assert st.tensor_names() == ["emb"] and st.attrs["blocks"] == [] and st.attrs["attention"] == "none"
    assert st.raw_bytes_per_view() == 4 * 32 * 2
    np.testing.assert_allclose(stored_emb(str(store)), stored_emb(env["full"]), rtol=0, atol=1e-3)


def test_derive_emb_equals_extract_emb(env, tmp_path, monkeypatch, capsys):
    import shutil

    store = str(tmp_path / "plain.zarr")
    shutil.copytree(env["plain"], store)
    assert "emb" not in open_store(store).tensor_names()
    code, out, err = run_cli(monkeypatch, capsys, "derive-emb", store, "--weights", str(env["weights"]))
    assert code == 0, err
    assert "derived emb" in out
    st = open_store(store)
    assert st.attrs["emb"] is True and st.tensor_names() == ["feats", "emb"]
    np.testing.assert_allclose(stored_emb(store), stored_emb(env["full"]), rtol=0, atol=1e-3)
    from evl_cache.verify import verify_store

    assert not verify_store(store).bad  # the derived array is integrity-checked like the others


def test_derive_emb_refusals(env, tmp_path, monkeypatch, capsys):
    early = build(tmp_path / "early.zarr", env["videos"][:1], [0], env["weights"], [1], emb=False, attention="none")
    code, _, err = run_cli(monkeypatch, capsys, "derive-emb", early, "--weights", str(env["weights"]))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "not the last block (2)" in err
    other = make_weights(tmp_path / "other.safetensors", seed=5)
    code, _, err = run_cli(monkeypatch, capsys, "derive-emb", env["plain"], "--weights", str(other))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--weights" in err and "extracted with" in err
    assert "emb" not in open_store(env["plain"]).tensor_names()


def hand_scores(env, store_path: str, class_names: list[str], templates: list[str]) -> np.ndarray:
    """From the equations, with open_clip's own CLIP and tokenizer: prompt-ensemble text embeddings,
    unit frame embeddings averaged and renormalised, scale x cosine, softmax, mean over views."""
    cfg = json.loads(Path(TINY_CLIP).read_text())
    model = open_clip.model.CLIP(cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"], quick_gelu=True)
    model.load_state_dict(load_file(str(env["weights"])))
    tok = open_clip.tokenizer.SimpleTokenizer(context_length=cfg["text_cfg"]["context_length"])
    text = []
    with torch.no_grad():
        for name in class_names:
            e = model.encode_text(tok([t.format(name) for t in templates])).double().numpy()
            e = (e / np.linalg.norm(e, axis=-1, keepdims=True)).mean(0)
            text.append(e / np.linalg.norm(e))
    text = np.stack(text)
    scale = float(model.logit_scale.detach().exp())
    f = stored_emb(store_path)
    f = f / np.linalg.norm(f, axis=-1, keepdims=True)
    v = f.mean(axis=2)
    v = v / np.linalg.norm(v, axis=-1, keepdims=True)
    logits = scale * np.einsum("nve,ce->nvc", v, text)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)).mean(1)


def test_zeroshot_store_matches_hand_computation(env, tmp_path, monkeypatch, capsys):
    out = tmp_path / "zs"
    cache = tmp_path / "text-cache"
    args = ["zeroshot", "--store", env["full"], "--classes", str(env["classes"]), "--templates", str(env["templates"]),
            "--out", str(out), "--text-cache", str(cache), "--device", "cpu"]
    code, stdout, err = run_cli(monkeypatch, capsys, *args)
    assert code == 0, err
    names = ["right", "up", "left"]
    expected = hand_scores(env, env["full"], names, ["a video of {}.", "{} in motion"])
    with np.load(out / "scores.npz", allow_pickle=False) as z:
        np.testing.assert_allclose(z["scores"], expected, rtol=1e-4, atol=1e-6)
        assert list(z["class_names"]) == names
        labels = z["label"].tolist()
        assert labels == [2, 0, 2]  # store labels left, right, left matched by name
        assert json.loads(str(z["source"]))["zeroshot"]["label_mapping"] == "name"
    metrics = json.loads((out / "metrics.json").read_text())
    pred = expected.argmax(1)
    assert metrics["top1"] == pytest.approx(float(np.mean(pred == np.array(labels))))
    assert metrics["videos"] == 3 and metrics["views"] == 2 and metrics["zeroshot"]["logit_scale"] == pytest.approx(LOGIT_SCALE)
    assert metrics["per_class"]["up"]["support"] == 0
    assert (out / "predictions.csv").read_text().count("\n") == 4 and (out / "confusion_matrix.png").is_file()
    assert "text embeddings computed" in stdout
    code, stdout, _ = run_cli(monkeypatch, capsys, *args)  # the class embeddings now come from the cache
    assert code == 0 and "text embeddings cache" in stdout


def test_zeroshot_labels_by_position_for_a_reworded_list(env, tmp_path):
    from evl_cache.zeroshot import zeroshot_store

    reworded = tmp_path / "reworded.txt"
    reworded.write_text("moving to the left\nmoving to the right\n")
    m = zeroshot_store(env["full"], str(reworded), "photo", tmp_path / "o", text_cache=tmp_path / "c", device="cpu")
    assert m["zeroshot"]["label_mapping"] == "position"
    assert [m["per_class"][n]["support"] for n in ("moving to the left", "moving to the right")] == [2, 1]
    bad = tmp_path / "bad.txt"
    bad.write_text("a\nb\nc\n")
    with pytest.raises(UserError, match="--classes"):
        zeroshot_store(env["full"], str(bad), "photo", tmp_path / "o2", text_cache=tmp_path / "c", device="cpu")
    assert not (tmp_path / "o2").exists()


def test_predict_zero_shot_equals_the_cached_path(env, tmp_path, monkeypatch, capsys):
    from evl_cache.predict import ZeroShotPredictor
    from evl_cache.zeroshot import zeroshot_store

    out = tmp_path / "zs"
    zeroshot_store(env["full"], str(env["classes"]), str(env["templates"]), out, text_cache=tmp_path / "c", device="cpu")
    with np.load(out / "scores.npz", allow_pickle=False) as z:
        cached = z["scores"]
    spec = BackboneSpec(arch=TINY_CLIP, weights=str(env["weights"]), precision="fp32")
    predictor = ZeroShotPredictor(str(env["classes"]), spec, SAMPLING, VIEWS, str(env["templates"]), device="cpu",
                                  text_cache=tmp_path / "c")
    for i, path in enumerate(env["videos"]):
        got = predictor(path)
        assert got.error is None
        np.testing.assert_allclose(got.probs, cached[i], rtol=0, atol=2e-3)  # the store keeps emb in float16
    code, stdout, err = run_cli(monkeypatch, capsys, "predict", "--zero-shot", "--classes", str(env["classes"]),
                                "--templates", str(env["templates"]), "--arch", TINY_CLIP, "--weights", str(env["weights"]),
                                "--frames", "4", "--stride", "2", "--views", "eval:2x1", "--precision", "fp32",
                                "--text-cache", str(tmp_path / "c"), "--device", "cpu", env["videos"][0])
    assert code == 0, err
    top = ["right", "up", "left"][int(cached[0].argmax())]
    assert top in stdout


def test_bad_inputs_one_line_exit_2_naming_the_flag(env, tmp_path, monkeypatch, capsys):
    image_only = make_weights(tmp_path / "image_only.safetensors", text=False)
    visual_store = build(tmp_path / "vis.zarr", env["videos"][:1], [0], image_only, [], emb=True, attention="none")
    out = tmp_path / "out"
    base = ["zeroshot", "--out", str(out), "--text-cache", str(tmp_path / "c"), "--device", "cpu"]
    cases = [
        (["--store", env["plain"], "--classes", str(env["classes"])], ["--store", "extract --emb", "derive-emb"]),
        (["--store", env["full"], "--classes", str(tmp_path / "nope.txt")], ["--classes", "nope.txt"]),
        (["--store", env["full"], "--classes", str(env["classes"]), "--templates", "kinetics-typo"], ["--templates", "kinetics-typo"]),
        (["--store", visual_store, "--classes", str(env["classes"])], ["--weights", "no text tower"]),
        (["--store", env["full"], "--classes", str(env["classes"]), "--weights", str(image_only)], ["--weights", "extracted with"]),
    ]
    for extra, needles in cases:
        code, _, err = run_cli(monkeypatch, capsys, *base, *extra)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert code == 2 and len(lines) == 1, err
        assert all(n in lines[0] for n in needles), lines[0]
        assert not out.exists()
    code, _, err = run_cli(monkeypatch, capsys, "predict", "--zero-shot", env["videos"][0], "--weights", str(env["weights"]))
    assert code == 2 and "--classes" in err
    code, _, err = run_cli(monkeypatch, capsys, "predict", "--classes", str(env["classes"]), env["videos"][0])
    assert code == 2 and "--zero-shot" in err


def test_resume_with_another_emb_setting_is_refused_and_old_stores_still_resume(env, tmp_path):
    import shutil

    from evl_cache.extract import prepare_store

    spec = BackboneSpec(arch=TINY_CLIP, weights=str(env["weights"]), precision="fp32")
    attrs = dict(open_store(env["plain"]).attrs)
    with pytest.raises(UserError, match="without per-frame embeddings.*derive-emb"):
        prepare_store(env["plain"], {**attrs, "emb": True}, [], [], ExtractConfig(backbone=spec))
    full = dict(open_store(env["full"]).attrs)
    with pytest.raises(UserError, match="with per-frame embeddings.*pass --emb"):
        prepare_store(env["full"], {**full, "emb": False}, [], [], ExtractConfig(backbone=spec))
    # a store written before emb existed has no 'emb' attribute: it resumes as a store without emb
    store = tmp_path / "old.zarr"
    shutil.copytree(env["plain"], store)
    st = open_store(str(store), mode="r+")
    old = {k: v for k, v in st.attrs.items() if k != "emb"}
    st.group.attrs["evl_cache"] = old
    assert open_store(str(store)).tensor_names() == ["feats"]
    prepare_store(str(store), {**old, "emb": False}, [], [], ExtractConfig(backbone=spec))
    with pytest.raises(UserError, match="derive-emb"):
        prepare_store(str(store), {**old, "emb": True}, [], [], ExtractConfig(backbone=spec))


def test_emb_chunk_damage_is_caught(env, tmp_path):
    import shutil

    from evl_cache.store import StoreDataError
    from evl_cache.verify import verify_store
    from evl_cache.zeroshot import read_embeddings

    store = tmp_path / "s.zarr"
    shutil.copytree(env["full"], store)
    shard = store / "emb" / "c.0.0.0.0"
    data = bytearray(shard.read_bytes())
    data[10] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert [b[0] for b in verify_store(str(store)).bad] == [0]
    with pytest.raises(StoreDataError, match="crc32c"):
        read_embeddings(open_store(str(store)), np.array([0]))


def test_emb_settings_and_emb_only_refusals(env, tmp_path):
    from evl_cache.datasets import load_manifest

    cfg = ExtractConfig.from_settings({"weights": "random", "blocks": "none", "emb": True})
    assert cfg.blocks == [] and cfg.emb is True
    assert ExtractConfig.from_settings({"weights": "random"}).emb is False
    csv_path = tmp_path / "m.csv"
    csv_path.write_text(f"path,label\n{Path(env['videos'][0]).name},left\n")
    manifest = load_manifest("list", str(env["root"]), "train", annotations=str(csv_path))
    spec = BackboneSpec(arch=TINY_CLIP, weights=str(env["weights"]), precision="fp32")
    with pytest.raises(UserError, match="add --emb"):
        extract(manifest, str(tmp_path / "a.zarr"), ExtractConfig(backbone=spec, blocks=[]))
    with pytest.raises(UserError, match="--layout prefix needs cached blocks"):
        extract(manifest, str(tmp_path / "b.zarr"), ExtractConfig(backbone=spec, blocks=[], emb=True, layout="prefix"))
    assert not (tmp_path / "a.zarr").exists() and not (tmp_path / "b.zarr").exists()


def test_prefix_layout_stores_the_same_emb(env):
    """--layout prefix --emb: the stream entering the first cached block plus the same emb as a full store."""
    from evl_cache.extract import decode_video

    spec = BackboneSpec(arch=TINY_CLIP, weights=str(env["weights"]), precision="fp32")
    decoded = decode_video(env["videos"][0], "v0.mp4", SAMPLING, VIEWS, 32, 4)
    full, _ = BackboneRunner(spec.to_dict(), [1, 2], "none", "float32", device="cpu", emb=True).compute(8, decoded)
    prefix, _ = BackboneRunner(spec.to_dict(), [1, 2], "none", "float32", device="cpu", layout="prefix",
                               emb=True).compute(8, decoded)
    assert sorted(prefix) == ["emb", "prefix"] and prefix["emb"].shape == (1, 2, 4, 32)
    np.testing.assert_allclose(prefix["emb"].astype(np.float64), full["emb"].astype(np.float64), rtol=0, atol=1e-3)
    np.testing.assert_allclose(full["emb"][0].astype(np.float64), stored_emb(env["full"])[0], rtol=0, atol=1e-3)
