"""`evl-cache explain`: decoder query attention and backbone CLS attention, online and from a store.

Every map is checked against a computation written here from the module's own weights (or torch's
MultiheadAttention), never against the capture under test.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from evl_cache.backbone import build_backbone
from evl_cache.checkpoints import save_checkpoint
from evl_cache.explain import decoder_attention, explain_store, explain_video, write_explanation
from evl_cache.store import PENDING, open_store
from evl_cache.train import checkpoint_meta
from evl_cache.video import ViewSet
from test_predict import random_decoder
from test_train import SPEC, build_store, copy_store, set_status, write_videos

EVAL = ViewSet("eval", count=2, temporal=2, spatial=1)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Two videos; an fp16 store of q/k (blocks 1, 2: the tiny ViT's last block is 2) and one of maps,
    each with a checkpoint of random (all non-zero) decoder weights trained 'on' it."""
    root = tmp_path_factory.mktemp("explain")
    paths, labels = write_videos(root / "videos", 2)
    out = {"root": root, "paths": paths}
    for attention in ("qk", "maps"):
        store = build_store(root / f"{attention}.zarr", paths, labels, EVAL, dtype="float16", attention=attention)
        attrs = open_store(store).attrs
        model = random_decoder(attrs, seed=1)
        out[attention] = {"store": store, "model": model,
                          "ck": save_checkpoint(root / f"ck_{attention}" / "model", model,
                                                checkpoint_meta(attrs, attrs, store, 0))}
    return out


def store_batch(store_path: str, video: int) -> dict[str, torch.Tensor]:
    store = open_store(store_path)
    reads = [store.read(video, v) for v in range(store.num_views)]
    return {k: torch.stack([r[k] for r in reads]) for k in reads[0] if k != "label"}


@pytest.mark.parametrize("attention", ["qk", "maps"])
def test_capture_leaves_logits_bit_identical(env, attention):
    model, batch = env[attention]["model"], store_batch(env[attention]["store"], 1)
    with torch.no_grad():
        plain = model(batch)
    captured, attn = decoder_attention(model, batch)
    assert torch.equal(captured, plain.float())
    assert attn.shape == (2, model.cfg.num_layers, model.cfg.heads, model.cfg.frames, model.cfg.num_tokens)
    # capture is off again afterwards and keeps nothing
    assert all(not layer.attn.keep_attention and layer.attn.attention is None for layer in model.layers)
    with torch.no_grad():
        assert torch.equal(model(batch), plain)


def test_decoder_attention_rows_sum_to_one_and_match_the_layer(env):
    model, batch = env["maps"]["model"], store_batch(env["maps"]["store"], 0)
    _, attn = decoder_attention(model, batch)
    sums = attn.sum(dim=(-2, -1))  # over the T x L memory tokens of each layer, per head
    torch.testing.assert_close(sums, torch.ones_like(sums), rtol=0, atol=1e-5)
    assert float(attn.amax()) > 1.2 / (attn.shape[-1] * attn.shape[-2])  # not uniform: the test can fail
    # layer 0 recomputed from its weights: the query token is the learned one, the memory LN3(Y)
    layer = model.layers[0]
    with torch.no_grad():
        feats = batch["feats"][:, 0].float()
        mem = layer.norm3(layer.memory(feats, batch["attn"][:, 0]))
        x = layer.norm1(model.query.expand(feats.shape[0], 1, -1))
        h, d = model.cfg.heads, model.cfg.width // model.cfg.heads
        q = (x @ layer.attn.q_proj.weight.T + layer.attn.q_proj.bias).view(-1, 1, h, d)
        k = (mem @ layer.attn.k_proj.weight.T + layer.attn.k_proj.bias).view(mem.shape[0], -1, h, d)
        want = torch.einsum("bqhd,bkhd->bhk", q, k).div(math.sqrt(d)).softmax(-1)
    torch.testing.assert_close(attn[:, 0].flatten(-2), want, rtol=1e-5, atol=1e-6)


def test_cls_attention_matches_the_block_qk(env):
    backbone = build_backbone(SPEC, blocks=[1, 2], attention="maps")
    torch.manual_seed(0)
    frames = torch.randn(1, 3, 3, backbone.image_size, backbone.image_size)
    got = backbone.cls_attention(frames)
    assert got.shape == (1, 3, backbone.num_tokens)
    visual = backbone.visual
    with torch.no_grad():
        x = visual._embeds(frames[0, 1:2])  # one frame, through every block but the last
        for block in visual.transformer.resblocks[:-1]:
            x = block(x)
        last = visual.transformer.resblocks[-1]
        y = last.ln_1(x)[0]  # (L, C)
        c, h = backbone.width, backbone.heads
        w, b = last.attn.in_proj_weight, last.attn.in_proj_bias
        q = (y[0] @ w[:c].T + b[:c]).view(h, -1)  # the CLS query
        k = (y @ w[c:2 * c].T + b[c:2 * c]).view(-1, h, c // h)
        want = torch.stack([(k[:, i] @ q[i] / math.sqrt(c // h)).softmax(0) for i in range(h)]).mean(0)
        # and torch's own multi-head attention of the same block, head-averaged
        _, weights = last.attn(y[None], y[None], y[None], need_weights=True, average_attn_weights=True)
    torch.testing.assert_close(got[0, 1], want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[0, 1], weights[0, 0], rtol=1e-5, atol=1e-6)
    assert float(want[1:].max()) > 1.2 / len(want)  # not uniform


def test_store_path_matches_online_path(env):
    for attention in ("qk", "maps"):
        ck, store = env[attention]["ck"], env[attention]["store"]
        online = explain_video(ck, env["paths"][1], view=1, device="cpu")
        cached = explain_store(ck, store, 1, view=1, device="cpu")
        # the cache rounds features (and q/k, maps) to fp16: close, not equal
        assert not np.array_equal(online.decoder_heads, cached.decoder_heads)
        np.testing.assert_allclose(cached.decoder_heads, online.decoder_heads, rtol=2e-2, atol=2e-4)
        np.testing.assert_array_equal(cached.frames, online.frames)  # the same decoded view
        np.testing.assert_allclose(cached.probs, online.probs, atol=2e-3)
        assert cached.label == "right" and online.label is None
    # q/k of the last block are in the qk store: its CLS map; a maps store says it has none
    online = explain_video(env["qk"]["ck"], env["paths"][1], view=1, device="cpu")
    cached = explain_store(env["qk"]["ck"], env["qk"]["store"], 1, view=1, device="cpu")
    assert cached.cls is not None
    np.testing.assert_allclose(cached.cls, online.cls, rtol=2e-2, atol=2e-4)
    maps = explain_store(env["maps"]["ck"], env["maps"]["store"], 1, view=1, device="cpu")
    assert maps.cls is None and any("not in the store" in n for n in maps.notes)


from clirun import run_cli  # noqa: E402,F401  (shared with the other CLI tests)


def test_cli_writes_grid_gif_npz_and_summary(env, tmp_path, monkeypatch, capsys):
    out = tmp_path / "ex"
    code, stdout, err = run_cli(monkeypatch, capsys, "explain", env["paths"][0], "--checkpoint", env["qk"]["ck"],
                                "--out", out, "--device", "cpu")
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["attention.npz", "explain.gif", "explain.png", "summary.txt"]
    data = np.load(out / "attention.npz", allow_pickle=False)
    k = len(open_store(env["qk"]["store"]).blocks)
    assert data["decoder"].shape == (k, 4, 17) and data["cls"].shape == (4, 17) and data["frames"].shape == (4, 32, 32, 3)
    np.testing.assert_allclose(data["decoder_mean"], data["decoder"].mean(0), rtol=1e-6)
    assert json.loads(str(data["meta"]))["blocks"] == [1, 2]
    lines = (out / "summary.txt").read_text().splitlines()
    assert stdout.splitlines()[:len(lines)] == lines
    assert sum(line.startswith("decoder layer") for line in lines) == k and any("backbone CLS" in x for x in lines)
    from PIL import Image

    with Image.open(out / "explain.gif") as gif:
        assert gif.n_frames == 4
    with Image.open(out / "explain.png") as png:
        assert png.size[0] > png.size[1] / 2


def test_store_with_the_video_gone_draws_maps_without_frames(env, tmp_path):
    path = Path(env["paths"][0])
    moved = tmp_path / "moved.mp4"
    shutil.move(path, moved)
    try:
        exp = explain_store(env["maps"]["ck"], env["maps"]["store"], 0, device="cpu")
    finally:
        shutil.move(moved, path)
    assert exp.frames is None and any("is gone" in n for n in exp.notes)
    write_explanation(exp, tmp_path / "out")
    data = np.load(tmp_path / "out" / "attention.npz", allow_pickle=False)
    assert "frames" not in data and "cls" not in data
    assert "is gone" in (tmp_path / "out" / "summary.txt").read_text()


def test_bad_input_is_one_line_exit_2_and_writes_nothing(env, tmp_path, monkeypatch, capsys):
    pending = copy_store(env["maps"]["store"], tmp_path / "pending.zarr")
    set_status(pending, {1: PENDING})
    ck_maps, ck_qk, maps = env["maps"]["ck"], env["qk"]["ck"], env["maps"]["store"]
    cases = {
        "not found": [tmp_path / "nope.mp4", "--checkpoint", ck_maps],
        "attention=": ["--store", maps, "--video", 0, "--checkpoint", ck_qk],  # the store lacks the decoder's inputs
        "out of range: store": ["--store", maps, "--video", 2, "--checkpoint", ck_maps],
        "--view 2 is out of range": ["--store", maps, "--video", 0, "--view", 2, "--checkpoint", ck_maps],
        "pending": ["--store", pending, "--video", 1, "--checkpoint", ck_maps],
        "one of them": [env["paths"][0], "--store", maps, "--video", 0, "--checkpoint", ck_maps],
        "--store needs --video": ["--store", maps, "--checkpoint", ck_maps],
        "--weights applies": ["--store", maps, "--video", 0, "--checkpoint", ck_maps, "--weights", "x.pt"],
    }
    for i, (needle, args) in enumerate(cases.items()):
        out = tmp_path / f"out{i}"
        code, stdout, err = run_cli(monkeypatch, capsys, "explain", *args, "--out", out, "--device", "cpu")
        assert code == 2, (needle, err)
        assert len(err.strip().splitlines()) == 1 and needle in err, (needle, err)
        assert not out.exists(), needle
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no partial folders


def test_explain_demo_measures_attention_on_the_object():
    """pipelines/explain_synthetic.py: object patches from a flat-background frame, and the share of a
    map's patch attention on them (all of it for a map on the object, the area share for a uniform one)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "pipelines"))
    from explain_synthetic import object_patches, on_object_share

    frames = np.full((2, 16, 16, 3), (240, 180, 220), dtype=np.uint8)
    frames[0, 0:8, 0:8] = (250, 200, 0)  # frame 0: the top-left patch of a 2x2 grid
    frames[1, 8:16, 8:12] = (250, 200, 0)  # frame 1: half of the bottom-right patch (>= 25%: counted)
    mask = object_patches(frames, (2, 2))
    assert mask.tolist() == [[[True, False], [False, False]], [[False, False], [False, True]]]
    on = np.zeros((2, 5))
    on[0, 1], on[1, 4], on[:, 0] = 0.4, 0.4, 0.1  # CLS tokens carry mass too: it is left out
    assert on_object_share(on, mask, per_frame=False) == pytest.approx(1.0)
    uniform = np.full((2, 5), 0.1)
    assert on_object_share(uniform, mask, per_frame=False) == pytest.approx(mask.mean())
    skewed = np.array([[0, 0.9, 0.1, 0, 0], [0, 0.01, 0.01, 0.01, 0.01]])  # per frame: 0.9 and 0.25
    assert on_object_share(skewed, mask, per_frame=True) == pytest.approx((0.9 + 0.25) / 2)
    assert on_object_share(skewed, mask, per_frame=False) == pytest.approx((0.9 + 0.01) / 1.04)


def test_a_table6_decoder_is_explained_per_layer_and_a_pooled_one_refused(env, tmp_path):
    """A decoder reading fewer or repeated cached blocks (`model.layer_blocks`) gets one row per layer,
    labelled with the block it read; a pooled one attends over pooled tokens and is refused in one line."""
    from evl_cache.config import ModelConfig, decoder_config_for_store
    from evl_cache.decoder import EVLDecoder
    from evl_cache.errors import UserError
    from evl_cache.explain import summary_lines

    store = env["maps"]["store"]
    attrs = open_store(store).attrs
    for model_cfg, rows in ((ModelConfig(num_layers=1), [attrs["blocks"][-1]]),
                            (ModelConfig(layer_blocks=[1, 1, 0]), [attrs["blocks"][1]] * 2 + [attrs["blocks"][0]])):
        model = EVLDecoder(decoder_config_for_store(model_cfg, attrs, store)).eval()
        ck = save_checkpoint(tmp_path / f"ck{len(rows)}" / "model", model, checkpoint_meta(attrs, attrs, store, 0))
        exp = explain_store(ck, store, 0, view=0, device="cpu")
        assert exp.blocks == rows and exp.decoder.shape[0] == len(rows)
        lines = summary_lines(exp)
        assert [ln.split(":")[0] for ln in lines if ln.startswith("decoder layer")] == [
            f"decoder layer {i + 1} (block {b})" for i, b in enumerate(rows)]
    pooled = EVLDecoder(decoder_config_for_store(ModelConfig(pool="spatial", temporal_cross_attention=False), attrs, store))
    ck = save_checkpoint(tmp_path / "pooled" / "model", pooled, checkpoint_meta(attrs, attrs, store, 0))
    with pytest.raises(UserError, match="pools its features"):
        explain_store(ck, store, 0, view=0, device="cpu")
