"""Heads beyond EVL (evl_cache.heads): the registry's refusals, X-CLIP's and V-JEPA's numerics against
forwards written here from their equations, and every head trained, evaluated and predicted through
the one training loop on a tiny CLIP store."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from safetensors.torch import load_file

import media
from evl_cache.config import HEADS, RunConfig
from evl_cache.errors import UserError
from evl_cache.heads import build_head, head_names
from evl_cache.heads.probes import AttentiveProbeConfig, LinearProbeConfig
from evl_cache.heads.xclip import XCLIPConfig
from evl_cache.train import train
from test_zeroshot_cli import LOGIT_SCALE, TINY_CLIP, build, make_weights


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("heads")
    videos, labels = [], []
    for i in range(6):
        frames = media.moving_square_frames(12, seed=20 + i)
        if i % 2:
            frames = np.ascontiguousarray(frames[:, :, ::-1])
        videos.append(str(media.write_video(root / f"v{i}.mp4", frames)))
        labels.append(i % 2)
    weights = make_weights(root / "clip.safetensors")
    return {
        "root": root, "videos": videos, "weights": weights,
        "full": build(root / "full.zarr", videos, labels, weights, [1, 2], emb=True),  # last block of 3, maps, emb
        "emb_only": build(root / "emb.zarr", videos, labels, weights, [], emb=True, attention="none"),
        "no_emb": build(root / "noemb.zarr", videos, labels, weights, [1, 2], emb=False),
        "no_last": build(root / "nolast.zarr", videos, labels, weights, [1], emb=True),
    }


def run_cfg(store: str, head: str | None, steps: int = 6, lr: float = 3e-3, **model) -> RunConfig:
    model = {"head": head, **model}
    if head in (None, "evl"):
        model.update(mlp_dropout=0.0, head_dropout=0.0)
    return RunConfig.from_dict({
        "model": model,
        "train": {"steps": steps, "batch_size": 4, "lr": lr, "weight_decay": 0.0, "checkpoint_every": steps,
                  "eval_every": steps, "log_every": 1, "eval_batch_size": 4},
        "data": {"train_store": store, "num_workers": 0},
    })


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


# ------------------------------------------------------------------------------------ registry and refusals


def test_registry_holds_every_configurable_head():
    assert sorted(head_names()) == sorted(HEADS) == ["attentive_probe", "evl", "linear", "xclip"]
    with pytest.raises(UserError, match=r"model.head='mlp' must be one of"):
        RunConfig.from_dict({"model": {"head": "mlp"}})


@pytest.mark.parametrize("store, head, needle", [
    ("emb_only", None, r"no block features \(feats\), which the evl head reads; extract with --decoder-layers K"),
    ("emb_only", "attentive_probe", r"no the last block's tokens .* which the attentive_probe head reads; .*--blocks 2"),
    ("no_last", "xclip", r"the xclip head reads; extract with the ViT's last block .*--blocks 2"),
    ("no_emb", "xclip", r"no per-frame embeddings \(emb\), which the xclip head reads; add them with `evl-cache derive-emb"),
    ("no_emb", "linear", r"no per-frame embeddings \(emb\), which the linear head reads; .*--emb"),
])
def test_a_store_lacking_what_a_head_reads_is_refused_in_one_line_before_training(stores, tmp_path, store, head, needle):
    out = tmp_path / "run"
    with pytest.raises(UserError, match=needle) as err:
        train(run_cfg(stores[store], head), out, progress=False)
    assert "\n" not in str(err.value)
    assert not out.exists()  # refused before the run directory or the first batch


def test_an_option_of_another_head_is_refused(stores, tmp_path):
    with pytest.raises(UserError, match=r"model.mit_layers applies to the xclip head, not model.head=linear"):
        train(run_cfg(stores["full"], "linear", mit_layers=2), tmp_path / "r", progress=False)
    with pytest.raises(UserError, match=r"model.text_weights: .* not found"):
        train(run_cfg(stores["full"], "xclip", text_weights=str(tmp_path / "none.pt")), tmp_path / "r", progress=False)


# ------------------------------------------------------------------------------------ independent forwards


def _ln(x, w, b, eps=1e-5):
    mu = x.mean(-1, keepdim=True)
    var = x.var(-1, unbiased=False, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def _attend(q, k, v, heads):
    """softmax(q k^T / sqrt(d)) v per head; q (B, N, E), k/v (B, M, E), already projected."""
    B, N, E = q.shape
    d = E // heads
    qh, kh, vh = (t.reshape(B, t.shape[1], heads, d).permute(0, 2, 1, 3) for t in (q, k, v))
    a = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(d), dim=-1)
    return (a @ vh).permute(0, 2, 1, 3).reshape(B, N, E)


def _quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


def xclip_reference(sd, emb, feats, heads, mit_layers, prompt_layers):
    """X-CLIP's head from its equations (MIT, prompt generator, text matching), plain torch ops."""
    E = emb.shape[-1]
    x = emb + sd["mit.positional_embedding"]
    for i in range(mit_layers):
        p = f"mit.resblocks.{i}."
        W, b = sd[p + "attn.in_proj_weight"], sd[p + "attn.in_proj_bias"]
        h = _ln(x, sd[p + "ln_1.weight"], sd[p + "ln_1.bias"])
        a = _attend(h @ W[:E].T + b[:E], h @ W[E:2 * E].T + b[E:2 * E], h @ W[2 * E:].T + b[2 * E:], heads)
        x = x + a @ sd[p + "attn.out_proj.weight"].T + sd[p + "attn.out_proj.bias"]
        h = _ln(x, sd[p + "ln_2.weight"], sd[p + "ln_2.bias"])
        x = x + _quick_gelu(h @ sd[p + "mlp.c_fc.weight"].T + sd[p + "mlp.c_fc.bias"]) @ sd[p + "mlp.c_proj.weight"].T \
            + sd[p + "mlp.c_proj.bias"]
    video = (x + emb).mean(dim=1)
    patches = feats[:, -1, :, 1:, :]  # the last block's patch tokens (B, T, P, C)
    z = (_ln(patches, sd["prompts_visual_ln.weight"], sd["prompts_visual_ln.bias"]) @ sd["prompts_visual_proj"]).mean(dim=1)
    z = _ln(z, sd["prompts_generator.norm.weight"], sd["prompts_generator.norm.bias"])
    w = sd["text_emb"].unsqueeze(0).expand(emb.shape[0], -1, -1)
    u = w
    for j in range(prompt_layers):
        p = f"prompts_generator.decoder.{j}."
        h = _ln(u, sd[p + "norm1.weight"], sd[p + "norm1.bias"])
        a = _attend(h @ sd[p + "cross_attn.q_proj.weight"].T, z @ sd[p + "cross_attn.k_proj.weight"].T,
                    z @ sd[p + "cross_attn.v_proj.weight"].T, heads)
        u = u + a @ sd[p + "cross_attn.proj.weight"].T + sd[p + "cross_attn.proj.bias"]
        h = _ln(u, sd[p + "norm3.weight"], sd[p + "norm3.bias"])
        u = u + _quick_gelu(h @ sd[p + "mlp.0.weight"].T + sd[p + "mlp.0.bias"]) @ sd[p + "mlp.3.weight"].T + sd[p + "mlp.3.bias"]
    w = w + sd["prompts_generator.alpha"] * u
    video = video / video.norm(dim=-1, keepdim=True)
    w = w / w.norm(dim=-1, keepdim=True)
    return sd["logit_scale"] * (w @ video.unsqueeze(-1)).squeeze(-1)


def _perturb(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            t.add_(0.2 * torch.randn(t.shape, generator=g))


def test_xclip_head_matches_its_equations():
    torch.manual_seed(0)
    cfg = XCLIPConfig(frames=4, width=48, embed_dim=128, tokens=1 + 9, num_classes=5, mit_layers=2, prompt_layers=2,
                      class_names=[f"c{i}" for i in range(5)])
    model = build_head(cfg, fresh=False)
    assert cfg.attn_heads == 2
    _perturb(model, 1)
    with torch.no_grad():
        model.logit_scale.fill_(LOGIT_SCALE)
    model.eval()
    emb = torch.randn(3, 4, 128)
    feats = torch.randn(3, 2, 4, 10, 48)
    got = model({"emb": emb.half(), "feats": feats})
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    want = xclip_reference(sd, emb.half().float(), feats, 2, 2, 2)
    scale = float(want.abs().max())
    assert scale > 1  # not a degenerate comparison
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * scale)


def test_xclip_init_is_xclips():
    torch.manual_seed(0)
    cfg = XCLIPConfig(frames=8, width=256, embed_dim=256, tokens=1 + 16, num_classes=3)
    sd = build_head(cfg, fresh=False).state_dict()
    assert torch.equal(sd["prompts_generator.alpha"], torch.full((256,), 0.1))
    assert abs(float(sd["prompts_visual_proj"].std()) - 1.0) < 0.05  # standard normal, not 0.02
    assert abs(float(sd["mit.positional_embedding"].std()) - 0.02) < 0.003
    for name in ("mit.resblocks.0.mlp.c_fc.weight", "mit.resblocks.0.attn.out_proj.weight",
                 "prompts_generator.decoder.0.cross_attn.q_proj.weight", "prompts_generator.decoder.1.mlp.3.weight"):
        assert abs(float(sd[name].std()) - 0.02) < 0.003, name
    bound = math.sqrt(6 / (256 + 3 * 256))  # PyTorch MHA's xavier-uniform in-projection
    assert float(sd["mit.resblocks.0.attn.in_proj_weight"].abs().max()) <= bound
    assert abs(float(sd["mit.resblocks.0.attn.in_proj_weight"].std()) - bound / math.sqrt(3)) < 0.003
    assert not any(sd[k].any() for k in sd if k.endswith(".bias") and "norm" not in k and "ln" not in k)
    assert "prompts_generator.decoder.0.cross_attn.q_proj.bias" not in sd  # bias-free q/k/v
    assert len([k for k in sd if k.startswith("prompts_generator.decoder.")]) == 2 * 13  # X-CLIP's keys per layer


def attentive_reference(sd, tokens, heads):
    """V-JEPA's attentive classifier from its equations: no output projection after the cross attention."""
    p = "pooler.cross_attention_block."
    B, N, C = tokens.shape
    q0 = sd["pooler.query_tokens"].expand(B, 1, C)
    x = _ln(tokens, sd[p + "norm1.weight"], sd[p + "norm1.bias"])
    kv = x @ sd[p + "xattn.kv.weight"].T + sd[p + "xattn.kv.bias"]
    a = _attend(q0 @ sd[p + "xattn.q.weight"].T + sd[p + "xattn.q.bias"], kv[..., :C], kv[..., C:], heads)
    q1 = q0 + a
    h = _ln(q1, sd[p + "norm2.weight"], sd[p + "norm2.bias"]) @ sd[p + "mlp.fc1.weight"].T + sd[p + "mlp.fc1.bias"]
    q2 = q1 + torch.nn.functional.gelu(h) @ sd[p + "mlp.fc2.weight"].T + sd[p + "mlp.fc2.bias"]
    return q2[:, 0] @ sd["linear.weight"].T + sd["linear.bias"]


def test_attentive_probe_matches_its_equations_and_init():
    torch.manual_seed(0)
    cfg = AttentiveProbeConfig(width=256, heads=4, frames=3, tokens=5, num_classes=7)
    model = build_head(cfg, fresh=False)
    sd = model.state_dict()
    assert not any(k.endswith("xattn.proj.weight") for k in sd)  # V-JEPA's forward skips it: not built
    fc2 = "pooler.cross_attention_block.mlp.fc2.weight"
    assert abs(float(sd[fc2].std()) - 0.02 / math.sqrt(2)) < 0.002
    assert abs(float(sd["pooler.cross_attention_block.xattn.kv.weight"].std()) - 0.02) < 0.002
    assert float(sd["pooler.query_tokens"].std()) < 0.05 and sd["pooler.query_tokens"].any()
    assert abs(float(sd["linear.weight"].abs().max()) - 1 / 16) < 0.005  # PyTorch's default Linear init, 1/sqrt(256)
    _perturb(model, 2)
    model.eval()
    feats = torch.randn(2, 2, 3, 5, 256)
    got = model({"feats": feats.half()})
    want = attentive_reference({k: v.detach() for k, v in model.state_dict().items()},
                               feats.half().float()[:, -1].flatten(1, 2), 4)
    scale = float(want.abs().max())
    assert scale > 1
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * scale)


@pytest.mark.parametrize("norm", [True, False])
def test_linear_probe_reads_pooled_embeddings(norm):
    model = build_head(LinearProbeConfig(embed_dim=6, frames=3, num_classes=2, norm=norm))
    emb = torch.randn(4, 3, 6, dtype=torch.float64)
    pooled = (emb / emb.norm(dim=-1, keepdim=True)).mean(1) if norm else emb.mean(1)
    if norm:
        pooled = pooled / pooled.norm(dim=-1, keepdim=True)
    want = pooled @ model.fc.weight.double().T + model.fc.bias.double()
    torch.testing.assert_close(model({"emb": emb.float()}).double(), want, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------ the one loop, every head


@pytest.mark.parametrize("head, store", [("evl", "full"), ("xclip", "full"), ("attentive_probe", "full"),
                                         ("linear", "full"), ("linear", "emb_only")])
def test_every_head_trains_evaluates_and_reloads_through_the_same_loop(stores, tmp_path, head, store):
    from evl_cache.checkpoints import load_checkpoint
    from evl_cache.evaluate import collect_view_probs, evaluate

    out = tmp_path / "run"
    summary = train(run_cfg(stores[store], head, steps=12), out, progress=False)
    seen = losses(out)
    assert len(seen) == 12 and np.mean(seen[-3:]) < seen[0], seen
    doc = json.loads((out / "model.json").read_text())
    assert doc["decoder"].get("head", "evl") == head
    model, _ = load_checkpoint(summary.checkpoint)
    assert type(model).__name__ == {"evl": "EVLDecoder", "xclip": "XCLIPHead", "attentive_probe": "AttentiveProbe",
                                    "linear": "LinearProbe"}[head]
    metrics = evaluate(summary.checkpoint, stores[store], out_dir=tmp_path / "eval")
    assert metrics["videos"] == 6 and 0 <= metrics["top1"] <= 1
    probs, _ = collect_view_probs(model, stores[store], 4)
    assert probs.shape == (12, 2) and np.allclose(probs.sum(1), 1, atol=1e-5)


def test_xclip_text_side_is_the_frozen_towers_class_embeddings(stores, tmp_path):
    """The buffer holds open_clip's encode_text of the bare class names (X-CLIP's prompt), unnormalised,
    and CLIP's logit scale; both survive the checkpoint; the head's RNG stream is the run's seed."""
    from evl_cache.checkpoints import load_checkpoint

    summary = train(run_cfg(stores["full"], "xclip", steps=1), tmp_path / "a", progress=False)
    model, _ = load_checkpoint(summary.checkpoint)
    cfg = json.loads(Path(TINY_CLIP).read_text())
    clip = open_clip.model.CLIP(cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"], quick_gelu=True)
    clip.load_state_dict(load_file(str(stores["weights"])))
    with torch.no_grad():
        want = clip.encode_text(open_clip.tokenize(["left", "right"], context_length=24))
    torch.testing.assert_close(model.text_emb, want, rtol=1e-4, atol=1e-5)
    assert float(model.logit_scale) == pytest.approx(LOGIT_SCALE, rel=1e-5)
    assert model.cfg.templates == ["{}"] and model.cfg.text["weights_id"]
    from evl_cache.evaluate import evaluate

    with pytest.raises(UserError, match=r"no per-frame embeddings \(emb\), which the xclip head reads"):
        evaluate(summary.checkpoint, stores["no_emb"])  # same blocks and maps, no emb: eval refuses it too


def test_predict_runs_every_non_evl_head_online_as_from_the_cache(stores, tmp_path):
    """Predict builds only the backbone outputs the head reads (emb, the last block) and scores each
    of the store's views as eval does from the float32 store (emb is stored as float16 there)."""
    from evl_cache.evaluate import collect_view_probs
    from evl_cache.predict import Predictor

    wants = {"xclip": {"emb", "feats"}, "attentive_probe": {"feats"}, "linear": {"emb"}}
    for head, keys in wants.items():
        cfg = run_cfg(stores["full"], head, steps=4, lr=3e-2)
        cfg.data.val_store = stores["full"]  # the checkpoint's eval views are the store's
        summary = train(cfg, tmp_path / head, progress=False)
        predictor = Predictor(summary.checkpoint, device="cpu")
        views = torch.randn(1, 4, 3, 32, 32)
        outputs = predictor.backbone(views)
        assert set(outputs) == keys, head
        if "feats" in outputs:
            assert outputs["feats"].shape[1] == 1  # the last block only
        probs, vids = collect_view_probs(predictor.model, stores["full"], 4)
        online = predictor(stores["videos"][1])
        assert online.error is None
        np.testing.assert_allclose(online.logits.softmax(-1).numpy(), probs[vids == 1], atol=1e-4, err_msg=head)


@pytest.mark.parametrize("head, arrays", [("linear", ["emb"]), ("xclip", ["feats", "emb"]),
                                          ("attentive_probe", ["feats"]), ("evl", ["feats", "attn"])])
def test_the_loader_reads_only_what_the_head_declares(stores, tmp_path, head, arrays):
    """From a full store (blocks, maps, emb), each head's training batches carry only the arrays its
    declared needs map to (an emb head reads 8 KiB a view, not the blocks), and training on them equals
    training on batches that read everything."""
    import evl_cache.data as data

    seen: list[list[str]] = []
    real = data.StoreDataset.read_into

    def spy(self, items, out):
        seen.append(sorted(out))
        return real(self, items, out)

    cfg = run_cfg(stores["full"], head, steps=3)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(data.StoreDataset, "read_into", spy)
        train(cfg, tmp_path / "needs", progress=False)
    assert seen and all(s == sorted(arrays) for s in seen), seen
    all_arrays = sorted(data.StoreDataset(stores["full"]).specs)
    assert all_arrays == ["attn", "emb", "feats"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(data, "model_needs", lambda cfgs: None)  # the old behaviour: every stored array
        train(cfg, tmp_path / "all", progress=False)
    assert losses(tmp_path / "needs") == losses(tmp_path / "all")


def test_evl_without_tca_skips_the_maps(stores, tmp_path):
    import evl_cache.data as data

    assert data.model_needs([None]) is None
    ds = data.StoreDataset(stores["full"], needs={"blocks"})
    assert sorted(ds.specs) == ["feats"]
    batch = data.to_device(ds.__getitems__([0, 1]), torch.device("cpu"))
    assert "attn" not in batch and batch["feats"].shape[0] == 2
