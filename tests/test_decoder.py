"""EVLDecoder against an independent forward written from docs/reference.md (no shared code).

`reference_forward` reads parameters in the released EVL checkpoint layout (key names of the
reference implementation, without the DDP prefix); test_checkpoints.py reuses it for import.
"""

import math

import pytest
import torch

from evl_cache.decoder import DecoderConfig, EVLDecoder, count_parameters
from evl_cache.errors import UserError
from evl_cache.tca import temporal_attention_maps


# ---------------------------------------------------------------- independent reference (spec) --
def _ln(x, w, b, eps=1e-5):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def _lin(x, sd, name):
    return x @ sd[name + ".weight"].T + sd[name + ".bias"]


def reference_maps(q, k):
    """q, k: (T, L, H, D) -> prev[t-1], next[t] as lists of (P, P): per-head softmax, head mean."""
    T, L, H, D = q.shape

    def one(tq, tk):
        acc = 0
        for h in range(H):
            logits = torch.einsum("pd,kd->pk", q[tq, 1:, h], k[tk, 1:, h]) / math.sqrt(D)
            acc = acc + torch.softmax(logits, -1)
        return acc / H

    return [one(t, t - 1) for t in range(1, T)], [one(t, t + 1) for t in range(T - 1)]


def reference_forward(sd, feats, q, k, heads, grid):
    """Logits (B, classes) of the EVL decoder + head in eval mode, straight from the spec text."""
    B, K, T, L, C = feats.shape
    h, w = grid
    D = C // heads
    out = []
    for b in range(B):
        x = sd["decoder.cls_token"].clone()  # the single query token, (C,)
        for i in range(K):
            X = feats[b, i]  # (T, L, C)
            Y = X.clone()
            if f"decoder.temporal_conv.{i}.weight" in sd:
                cw, cb = sd[f"decoder.temporal_conv.{i}.weight"], sd[f"decoder.temporal_conv.{i}.bias"]
                for t in range(T):
                    acc = cb.expand(L, C).clone()
                    for j in range(3):  # kernel 3, zero padding 1, depthwise
                        if 0 <= t + j - 1 < T:
                            acc = acc + X[t + j - 1] * cw[:, 0, j]
                    Y[t] = Y[t] + acc
            if f"decoder.temporal_pos_embed.{i}" in sd:
                Y = Y + sd[f"decoder.temporal_pos_embed.{i}"][:, None, :]
            if f"decoder.cross_attention.{i}.w1" in sd:
                w1, w2 = sd[f"decoder.cross_attention.{i}.w1"], sd[f"decoder.cross_attention.{i}.w2"]
                prev, nxt = reference_maps(q[b, i], k[b, i])
                add = torch.zeros_like(Y)
                for t in range(T):
                    for p in range(h * w):
                        for kk in range(h * w):
                            r = (p // w - kk // w + h - 1) * (2 * w - 1) + (p % w - kk % w + w - 1)
                            if t > 0:
                                add[t, 1 + p] += prev[t - 1][p, kk] * w1[r]
                            if t < T - 1:
                                add[t, 1 + p] += nxt[t][p, kk] * w2[r]
                Y = Y + add
            M = Y.reshape(T * L, C)
            pre = f"decoder.decoder_layers.{i}."
            xn = _ln(x, sd[pre + "norm1.weight"], sd[pre + "norm1.bias"])
            Mn = _ln(M, sd[pre + "norm3.weight"], sd[pre + "norm3.bias"])
            qq = _lin(xn, sd, pre + "attn.q_proj").view(heads, D)
            kk_ = _lin(Mn, sd, pre + "attn.k_proj").view(T * L, heads, D)
            vv = _lin(Mn, sd, pre + "attn.v_proj").view(T * L, heads, D)
            heads_out = []
            for hh in range(heads):
                a = torch.softmax(kk_[:, hh] @ qq[hh] / math.sqrt(D), dim=0)
                heads_out.append(a @ vv[:, hh])
            x = x + _lin(torch.cat(heads_out), sd, pre + "attn.out_proj")
            z = _lin(_ln(x, sd[pre + "norm2.weight"], sd[pre + "norm2.bias"]), sd, pre + "mlp.fc1")
            z = z * torch.sigmoid(1.702 * z)
            x = x + _lin(z, sd, pre + "mlp.fc2")
        x = _ln(x, sd["proj.0.weight"], sd["proj.0.bias"])
        out.append(x @ sd["proj.2.weight"].T + sd["proj.2.bias"])
    return torch.stack(out)


def to_reference_layout(model: EVLDecoder) -> dict:
    """Own parameter names -> released EVL names (test-local mapping, written independently)."""
    sd = {}
    for name, t in model.state_dict().items():
        parts = name.split(".")
        if name == "query":
            key = "decoder.cls_token"
        elif parts[0] == "head":
            key = {"norm": "proj.0", "fc": "proj.2"}[parts[1]] + "." + parts[2]
        else:
            i, mod = parts[1], parts[2]
            if mod == "tpos":
                key = f"decoder.temporal_pos_embed.{i}"
            elif mod == "tconv":
                key = f"decoder.temporal_conv.{i}.{parts[3]}"
            elif mod == "tca":
                key = f"decoder.cross_attention.{i}." + {"w_prev": "w1", "w_next": "w2"}[parts[3]]
            else:
                key = f"decoder.decoder_layers.{i}." + ".".join(parts[2:])
        sd[key] = t
    return sd


# --------------------------------------------------------------------------------- fixtures ------
def tiny_cfg(**kw):
    base = dict(num_layers=2, width=16, heads=2, frames=3, grid=(2, 3), num_classes=5)
    base.update(kw)
    return DecoderConfig(**base)


def randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
    return model


def tiny_inputs(cfg, B=2, Hb=2, Db=4, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    K, T, L = cfg.num_layers, cfg.frames, cfg.num_tokens
    feats = torch.randn(B, K, T, L, cfg.width, generator=g, dtype=dtype)
    q = torch.randn(B, K, T, L, Hb, Db, generator=g, dtype=dtype)
    k = torch.randn(B, K, T, L, Hb, Db, generator=g, dtype=dtype)
    return feats, q, k


# ------------------------------------------------------------------------------------ tests ------
@pytest.mark.parametrize("grid", [(2, 3), (2, 2)])
def test_matches_independent_reference(grid):
    cfg = tiny_cfg(grid=grid)
    model = randomize(EVLDecoder(cfg)).double().eval()
    feats, q, k = tiny_inputs(cfg)
    ref = reference_forward(to_reference_layout(model), feats, q, k, cfg.heads, cfg.grid)
    out_maps = model({"feats": feats, "attn": temporal_attention_maps(q, k)})
    assert out_maps.shape == (2, cfg.num_classes)
    torch.testing.assert_close(out_maps, ref, atol=1e-10, rtol=1e-10)
    qk_model = EVLDecoder(tiny_cfg(grid=grid, attention_input="qk")).double().eval()
    qk_model.load_state_dict(model.state_dict())
    torch.testing.assert_close(qk_model({"feats": feats, "q": q, "k": k}), ref, atol=1e-10, rtol=1e-10)


def test_fp32_and_fp16_maps_match_reference():
    cfg = tiny_cfg()
    model = randomize(EVLDecoder(cfg)).eval()
    feats, q, k = tiny_inputs(cfg)
    ref = reference_forward(to_reference_layout(model.double()), feats, q, k, cfg.heads, cfg.grid)
    model.float()
    maps = temporal_attention_maps(q, k)
    out = model({"feats": feats.float(), "attn": maps.float()})
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)
    out16 = model({"feats": feats.float(), "attn": maps.half()})  # cached maps arrive fp16
    assert out16.dtype == torch.float32
    torch.testing.assert_close(out16.double(), ref, atol=5e-2, rtol=5e-2)


def test_init_facts():
    torch.manual_seed(0)
    model = EVLDecoder(DecoderConfig(num_layers=2, width=64, heads=4, frames=4, grid=(3, 3), num_classes=7))
    assert model.query.abs().max() == 0
    for layer in model.layers:
        assert layer.tpos.abs().max() == 0
        assert layer.tca.w_prev.abs().max() == 0 and layer.tca.w_next.abs().max() == 0
        for lin in (layer.attn.q_proj, layer.attn.k_proj, layer.attn.v_proj, layer.attn.out_proj):
            assert lin.bias.abs().max() == 0
            bound = math.sqrt(6 / (lin.in_features + lin.out_features))  # xavier-uniform
            assert lin.weight.abs().max() <= bound and lin.weight.abs().max() > 0.9 * bound
        for lin in (layer.mlp.fc1, layer.mlp.fc2):
            assert 2e-7 < lin.bias.std() < 5e-6
            bound = math.sqrt(6 / (lin.in_features + lin.out_features))
            assert lin.weight.abs().max() <= bound
        assert layer.tconv.weight.abs().max() > 0  # PyTorch default init, not zero
        assert layer.mlp.fc1.out_features == 4 * 64
    assert isinstance(model.layers[0].mlp.drop, torch.nn.Dropout) and model.layers[0].mlp.drop.p == 0.5
    assert model.head.drop.p == 0.5


@pytest.mark.parametrize(
    "switch,prefix",
    [("temporal_conv", "tconv."), ("temporal_pos", "tpos"), ("temporal_cross_attention", "tca.")],
)
def test_module_switches_remove_exactly_their_parameters(switch, prefix):
    cfg_on = tiny_cfg()
    full = randomize(EVLDecoder(cfg_on)).double().eval()
    off = EVLDecoder(tiny_cfg(**{switch: False})).double().eval()
    names_full = set(full.state_dict())
    removed = names_full - set(off.state_dict())
    assert set(off.state_dict()) <= names_full
    assert removed and all(n.split(".", 2)[2].startswith(prefix) for n in removed)
    assert len(removed) == sum(1 for n in names_full if n.split(".")[0] == "layers" and n.split(".", 2)[2].startswith(prefix))
    off.load_state_dict({k: v for k, v in full.state_dict().items() if k not in removed})
    feats, q, k = tiny_inputs(cfg_on)
    batch = {"feats": feats, "attn": temporal_attention_maps(q, k)}
    assert not torch.allclose(full(batch), off(batch))


def test_all_modules_off_needs_no_attention():
    cfg = tiny_cfg(temporal_conv=False, temporal_pos=False, temporal_cross_attention=False, attention_input="none")
    model = EVLDecoder(cfg).eval()
    feats, _, _ = tiny_inputs(cfg, dtype=torch.float32)
    assert model({"feats": feats}).shape == (2, 5)


def test_gradient_reaches_every_parameter():
    cfg = tiny_cfg(attention_input="qk")
    model = randomize(EVLDecoder(cfg)).train()
    feats, q, k = tiny_inputs(cfg, dtype=torch.float32)
    torch.manual_seed(0)
    model({"feats": feats, "q": q, "k": k}).logsumexp(-1).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, name


def test_zero_init_model_gives_gradient_to_query_and_tca():
    """At init TCA and query are zero; one step must still move them (nothing is dead)."""
    cfg = tiny_cfg()
    model = EVLDecoder(cfg).train()
    feats, q, k = tiny_inputs(cfg, dtype=torch.float32)
    model({"feats": feats, "attn": temporal_attention_maps(q, k)}).logsumexp(-1).sum().backward()
    assert model.query.grad.abs().max() > 0
    assert model.layers[0].tca.w_prev.grad.abs().max() > 0


def test_autocast_bf16_runs_and_layernorm_stays_fp32():
    cfg = tiny_cfg()
    model = randomize(EVLDecoder(cfg)).eval()
    feats, q, k = tiny_inputs(cfg, dtype=torch.float32)
    batch = {"feats": feats, "attn": temporal_attention_maps(q, k).half()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(batch)
    torch.testing.assert_close(out.float(), model(batch), atol=0.3, rtol=0.1)


def test_parameter_counts_match_paper():
    """Paper: ~33.2 M (B/16) and ~58.7 M (L/14) trainable, K=4, T=8, 400 classes incl. the head."""
    with torch.device("meta"):  # shapes only, nothing allocated
        b16 = EVLDecoder(DecoderConfig(width=768, heads=12, grid=(14, 14)))
        l14 = EVLDecoder(DecoderConfig(width=1024, heads=16, grid=(16, 16)))
    assert count_parameters(b16) == 33_183_376
    assert count_parameters(l14) == 58_727_824


def test_bad_batch_and_config_raise_user_error():
    cfg = tiny_cfg()
    model = EVLDecoder(cfg)
    feats, q, k = tiny_inputs(cfg, dtype=torch.float32)
    with pytest.raises(UserError, match="no 'attn'"):
        model({"feats": feats})
    with pytest.raises(UserError, match="'feats' has shape"):
        model({"feats": feats[:, :, :2], "attn": temporal_attention_maps(q, k)})
    with pytest.raises(UserError, match="not divisible"):
        DecoderConfig(width=10, heads=3)
    with pytest.raises(UserError, match="attention_input"):
        DecoderConfig(attention_input="none")
    assert DecoderConfig.from_dict(cfg.to_dict()) == cfg


# ------------------------------------------------------------------ Table 6 options -------------
def test_layers_read_the_blocks_they_are_given():
    """6a/6b: a decoder over some of K cached blocks (the last ones by default, or a listed block per
    layer, repeats allowed) equals the reference fed exactly those blocks."""
    K = 3
    base = tiny_cfg(num_layers=K)
    feats, q, k = tiny_inputs(base)
    for layers, blocks in ((1, None), (2, None), (3, (2, 2, 2)), (4, (1, 1, 2, 2))):
        cfg = tiny_cfg(num_layers=layers, cached_blocks=K, layer_blocks=blocks)
        expect = list(range(K - layers, K)) if blocks is None else list(blocks)
        assert list(cfg.layer_blocks) == expect
        model = randomize(EVLDecoder(cfg), seed=layers).double().eval()
        ref = reference_forward(to_reference_layout(model), feats[:, expect], q[:, expect], k[:, expect], cfg.heads, cfg.grid)
        out = model({"feats": feats, "attn": temporal_attention_maps(q, k)})
        torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
        assert DecoderConfig.from_dict(cfg.to_dict()) == cfg


def test_pooled_features_equal_the_reference_on_pooled_inputs():
    """6c: temporal pooling averages frame pairs, spatial pooling 2x2 patches (CLS kept per frame);
    the decoder on the full features equals the reference on features pooled here by hand."""
    cfg0 = tiny_cfg(frames=4, grid=(2, 4), temporal_cross_attention=False)
    feats, _, _ = tiny_inputs(cfg0)
    B, K, T, L, C = feats.shape
    by_time = torch.stack([(feats[:, :, 2 * t] + feats[:, :, 2 * t + 1]) / 2 for t in range(T // 2)], dim=2)
    grid = feats[:, :, :, 1:].reshape(B, K, T, 2, 4, C)
    cells = [(grid[:, :, :, 0, 2 * j] + grid[:, :, :, 0, 2 * j + 1] + grid[:, :, :, 1, 2 * j] + grid[:, :, :, 1, 2 * j + 1]) / 4
             for j in range(2)]
    by_space = torch.cat([feats[:, :, :, :1], torch.stack(cells, dim=3)], dim=3)
    for pool, pooled, ref_grid in (("temporal", by_time, (2, 4)), ("spatial", by_space, (1, 2))):
        cfg = tiny_cfg(frames=4, grid=(2, 4), temporal_cross_attention=False, pool=pool)
        model = randomize(EVLDecoder(cfg), seed=3).double().eval()
        assert (cfg.layer_frames, cfg.layer_grid) == ((2, (2, 4)) if pool == "temporal" else (4, (1, 2)))
        ref = reference_forward(to_reference_layout(model), pooled, None, None, cfg.heads, ref_grid)
        torch.testing.assert_close(model({"feats": feats}), ref, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("kw, words", [
    (dict(num_layers=2, cached_blocks=2, layer_blocks=(0, 2)), "layer_blocks"),
    (dict(num_layers=2, cached_blocks=2, layer_blocks=(0,)), "layer_blocks"),
    (dict(pool="temporal"), "temporal_cross_attention=false"),
    (dict(pool="blur", temporal_cross_attention=False), "pool"),
    (dict(pool="temporal", temporal_cross_attention=False, frames=3), "even frame count"),
])
def test_table6_options_refuse_what_cannot_run(kw, words):
    with pytest.raises(UserError, match=words):
        tiny_cfg(**kw)


def test_store_config_picks_depth_and_blocks():
    """`evl_decoder_config`: model.num_layers below the store's K reads the last blocks; above it
    needs model.layer_blocks."""
    from evl_cache.config import ModelConfig, evl_decoder_config

    attrs = {"blocks": [8, 9, 10, 11], "width": 16, "heads": 2, "frames": 4, "grid": [2, 2],
             "class_names": ["a", "b"], "attention": "maps"}
    assert evl_decoder_config(ModelConfig(), attrs, "s").layer_blocks == (0, 1, 2, 3)
    assert evl_decoder_config(ModelConfig(num_layers=2), attrs, "s").layer_blocks == (2, 3)
    cfg = evl_decoder_config(ModelConfig(layer_blocks=[3, 3, 3, 3, 3, 3]), attrs, "s")
    assert cfg.num_layers == 6 and cfg.cached_blocks == 4
    with pytest.raises(UserError, match="model.layer_blocks"):
        evl_decoder_config(ModelConfig(num_layers=6), attrs, "s")


def test_table6_options_are_refused_on_other_heads_and_resume_old_runs():
    from evl_cache.config import LATER_MODEL_KEYS, ModelConfig
    from evl_cache.heads import check_options, get_head

    with pytest.raises(UserError, match="model.pool applies to the evl head"):
        check_options(ModelConfig(head="linear", pool="temporal"), get_head("linear"))
    check_options(ModelConfig(layer_blocks=[0]), get_head("evl"))
    assert all(getattr(ModelConfig(), k) == v for k, v in LATER_MODEL_KEYS.items())
    from evl_cache.config import evl_decoder_config

    attrs = {"blocks": [1, 2], "width": 16, "heads": 2, "frames": 4, "grid": [2, 2], "class_names": ["a"], "attention": "maps"}
    with pytest.raises(UserError, match="num_layers=0"):
        evl_decoder_config(ModelConfig(num_layers=0), attrs, "s")
    # a run saved before the Table 6 options existed resumes (they were trained at their defaults)
    from pathlib import Path

    from evl_cache.config import RunConfig
    from evl_cache.train import _check_resume

    cfg = RunConfig()
    saved = {"config": cfg.to_dict(), "items_digest": "d"}
    del saved["config"]["model"]["pool"], saved["config"]["model"]["layer_blocks"]
    _check_resume(saved, cfg, "d", Path("run"))
