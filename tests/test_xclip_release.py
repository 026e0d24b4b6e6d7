"""Released X-CLIP models (evl_cache.xclip_release): layout, file reading, numerics, predict and eval online.

No release file can be downloaded here, so every file is generated: with the key names and shapes
of X-CLIP's modules (microsoft/VideoX, X-CLIP: models/xclip.py, cct.py, mit.py, prompt.py and
clip/model.py), written out in this file; full size (ViT-B/16, 8 frames) on the meta device, and
small widths for the files that are run. The forward is checked against one written here from
X-CLIP's equations with plain torch ops, in X-CLIP's sequence-first layout.
"""

from __future__ import annotations

import json
import math
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import media
from evl_cache.errors import UserError

# ------------------------------------------------------------------ the release layout, spelled out


def clip_block(p: str, d: int) -> dict[str, tuple]:
    """clip/model.py ResidualAttentionBlock (and mit.py's): MHA, ln_1, mlp.c_fc, mlp.c_proj, ln_2."""
    return {f"{p}.attn.in_proj_weight": (3 * d, d), f"{p}.attn.in_proj_bias": (3 * d,),
            f"{p}.attn.out_proj.weight": (d, d), f"{p}.attn.out_proj.bias": (d,),
            f"{p}.ln_1.weight": (d,), f"{p}.ln_1.bias": (d,),
            f"{p}.mlp.c_fc.weight": (4 * d, d), f"{p}.mlp.c_fc.bias": (4 * d,),
            f"{p}.mlp.c_proj.weight": (d, 4 * d), f"{p}.mlp.c_proj.bias": (d,),
            f"{p}.ln_2.weight": (d,), f"{p}.ln_2.bias": (d,)}


def release_table(C: int, layers: int, patch: int, image: int, E: int, T: int, W: int, text_layers: int,
                  ctx: int = 77, vocab: int = 49408, mit_layers: int = 1, prompt_layers: int = 2) -> dict[str, tuple]:
    """Keys and shapes of XCLIP.state_dict() for these sizes, module by module."""
    t: dict[str, tuple] = {}
    # XCLIP's own parameters
    t.update({"positional_embedding": (ctx, W), "text_projection": (W, E), "logit_scale": (), "prompts_visual_proj": (C, E)})
    # prompt.py VideoSpecificPrompt
    t.update({"prompts_generator.alpha": (E,), "prompts_generator.norm.weight": (E,), "prompts_generator.norm.bias": (E,)})
    for j in range(prompt_layers):
        p = f"prompts_generator.decoder.{j}"
        t.update({f"{p}.cross_attn.q_proj.weight": (E, E), f"{p}.cross_attn.k_proj.weight": (E, E),
                  f"{p}.cross_attn.v_proj.weight": (E, E), f"{p}.cross_attn.proj.weight": (E, E),
                  f"{p}.cross_attn.proj.bias": (E,), f"{p}.norm1.weight": (E,), f"{p}.norm1.bias": (E,),
                  f"{p}.norm3.weight": (E,), f"{p}.norm3.bias": (E,), f"{p}.mlp.0.weight": (4 * E, E),
                  f"{p}.mlp.0.bias": (4 * E,), f"{p}.mlp.3.weight": (E, 4 * E), f"{p}.mlp.3.bias": (E,)})
    # mit.py
    t["mit.positional_embedding"] = (1, T, E)
    for i in range(mit_layers):
        t.update(clip_block(f"mit.resblocks.{i}", E))
    # cct.py CrossFrameCommunicationTransformer
    g = image // patch
    t.update({"visual.class_embedding": (C,), "visual.positional_embedding": (g * g + 1, C), "visual.proj": (C, E),
              "visual.conv1.weight": (C, 3, patch, patch), "visual.ln_pre.weight": (C,), "visual.ln_pre.bias": (C,),
              "visual.ln_post.weight": (C,), "visual.ln_post.bias": (C,)})
    for i in range(layers):
        p = f"visual.transformer.resblocks.{i}"
        t.update({f"{p}.message_fc.weight": (C, C), f"{p}.message_fc.bias": (C,), f"{p}.message_ln.weight": (C,),
                  f"{p}.message_ln.bias": (C,), f"{p}.message_attn.in_proj_weight": (3 * C, C),
                  f"{p}.message_attn.in_proj_bias": (3 * C,), f"{p}.message_attn.out_proj.weight": (C, C),
                  f"{p}.message_attn.out_proj.bias": (C,)})
        t.update(clip_block(p, C))
    # CLIP's text tower
    for i in range(text_layers):
        t.update(clip_block(f"transformer.resblocks.{i}", W))
    t.update({"token_embedding.weight": (vocab, W), "ln_final.weight": (W,), "ln_final.bias": (W,),
              "prompts_visual_ln.weight": (C,), "prompts_visual_ln.bias": (C,)})
    return t


def b16_8f_literal() -> dict[str, tuple]:
    """The X-CLIP-B/16 8-frame release (k400_16_8.pth) with its numbers written out: ViT-B/16 at 224
    (width 768, 12 blocks, 197 tokens), E = 512, text width 512 x 12 blocks, context 77, vocab 49408."""
    t: dict[str, tuple] = {"positional_embedding": (77, 512), "text_projection": (512, 512), "logit_scale": (),
                           "prompts_visual_proj": (768, 512), "prompts_visual_ln.weight": (768,),
                           "prompts_visual_ln.bias": (768,), "token_embedding.weight": (49408, 512),
                           "ln_final.weight": (512,), "ln_final.bias": (512,), "mit.positional_embedding": (1, 8, 512),
                           "visual.class_embedding": (768,), "visual.positional_embedding": (197, 768),
                           "visual.proj": (768, 512), "visual.conv1.weight": (768, 3, 16, 16),
                           "visual.ln_pre.weight": (768,), "visual.ln_pre.bias": (768,),
                           "visual.ln_post.weight": (768,), "visual.ln_post.bias": (768,),
                           "prompts_generator.alpha": (512,), "prompts_generator.norm.weight": (512,),
                           "prompts_generator.norm.bias": (512,)}
    for j in (0, 1):
        p = f"prompts_generator.decoder.{j}"
        t.update({f"{p}.cross_attn.{n}_proj.weight": (512, 512) for n in "qkv"})
        t.update({f"{p}.cross_attn.proj.weight": (512, 512), f"{p}.cross_attn.proj.bias": (512,),
                  f"{p}.norm1.weight": (512,), f"{p}.norm1.bias": (512,), f"{p}.norm3.weight": (512,),
                  f"{p}.norm3.bias": (512,), f"{p}.mlp.0.weight": (2048, 512), f"{p}.mlp.0.bias": (2048,),
                  f"{p}.mlp.3.weight": (512, 2048), f"{p}.mlp.3.bias": (512,)})
    blocks = [("mit.resblocks.0", 512)] + [(f"visual.transformer.resblocks.{i}", 768) for i in range(12)] + \
             [(f"transformer.resblocks.{i}", 512) for i in range(12)]
    for p, d in blocks:
        t.update({f"{p}.attn.in_proj_weight": (3 * d, d), f"{p}.attn.in_proj_bias": (3 * d,),
                  f"{p}.attn.out_proj.weight": (d, d), f"{p}.attn.out_proj.bias": (d,), f"{p}.ln_1.weight": (d,),
                  f"{p}.ln_1.bias": (d,), f"{p}.mlp.c_fc.weight": (4 * d, d), f"{p}.mlp.c_fc.bias": (4 * d,),
                  f"{p}.mlp.c_proj.weight": (d, 4 * d), f"{p}.mlp.c_proj.bias": (d,), f"{p}.ln_2.weight": (d,),
                  f"{p}.ln_2.bias": (d,)})
    for i in range(12):
        p = f"visual.transformer.resblocks.{i}"
        t.update({f"{p}.message_fc.weight": (768, 768), f"{p}.message_fc.bias": (768,),
                  f"{p}.message_ln.weight": (768,), f"{p}.message_ln.bias": (768,),
                  f"{p}.message_attn.in_proj_weight": (2304, 768), f"{p}.message_attn.in_proj_bias": (2304,),
                  f"{p}.message_attn.out_proj.weight": (768, 768), f"{p}.message_attn.out_proj.bias": (768,)})
    return t


B16_8F = dict(C=768, layers=12, patch=16, image=224, E=512, T=8, W=512, text_layers=12)
# small enough to run in a test: heads = width // 64 = 2 (vision), 1 (E, text)
SMALL = dict(C=128, layers=2, patch=8, image=32, E=64, T=4, W=64, text_layers=2)
LOGIT_SCALE = math.log(50.0)


def small_config():
    from evl_cache.xclip_release import ReleaseConfig

    s = SMALL
    return ReleaseConfig(frames=s["T"], image_size=s["image"], patch_size=s["patch"], vision_width=s["C"],
                         vision_layers=s["layers"], embed_dim=s["E"], mit_layers=1, prompt_layers=2, context_length=77,
                         vocab_size=49408, text_width=s["W"], text_layers=s["text_layers"])


def random_release(table: dict[str, tuple], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in the release layout, scaled like a trained CLIP so nothing saturates."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in table.items():
        if k == "logit_scale":
            sd[k] = torch.tensor(LOGIT_SCALE)
        elif k.endswith("alpha"):
            sd[k] = 0.1 + 0.05 * torch.randn(shape, generator=g)
        elif len(shape) == 1 and k.endswith(".weight") and ("ln" in k or "norm" in k):
            sd[k] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif k.endswith("bias"):
            sd[k] = 0.02 * torch.randn(shape, generator=g)
        elif k in ("visual.proj", "text_projection", "prompts_visual_proj"):
            sd[k] = torch.randn(shape, generator=g) / math.sqrt(shape[0])
        else:
            sd[k] = (0.05 if "embedding" in k else 0.08) * torch.randn(shape, generator=g)
    return sd


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A small release (.pth in X-CLIP's saved layout) and its weights."""
    d = tmp_path_factory.mktemp("xrel")
    sd = random_release(release_table(**SMALL))
    path = d / "xclip_small.pth"
    torch.save({"model": sd, "epoch": 29, "max_accuracy": 12.5}, path)
    return {"dir": d, "path": path, "sd": sd}


# ------------------------------------------------------------------------------ layout and config


def test_b16_8f_release_layout_and_modules_match_the_release_table():
    """The layout the reader expects, and the modules it builds (on the meta device), are exactly
    the key names and shapes of a B/16 8-frame X-CLIP release."""
    from open_clip.model import _build_text_tower

    from evl_cache.xclip_release import ReleaseConfig, check_layout, infer_config, release_layout
    from evl_cache.xclip_release.model import ReleasedXCLIP

    literal = b16_8f_literal()
    assert release_table(**B16_8F) == literal
    meta = {k: torch.empty(s, device="meta") for k, s in literal.items()}
    cfg = infer_config(meta, "k400_16_8.pth")
    assert cfg == ReleaseConfig(frames=8, image_size=224, patch_size=16, vision_width=768, vision_layers=12,
                                embed_dim=512, mit_layers=1, prompt_layers=2, context_length=77, vocab_size=49408,
                                text_width=512, text_layers=12)
    assert (cfg.vision_heads, cfg.text_heads, cfg.embed_heads, cfg.tokens) == (12, 8, 8, 197)
    assert release_layout(cfg) == literal
    check_layout(meta, cfg, "k400_16_8.pth")

    with torch.device("meta"):
        model = ReleasedXCLIP(cfg, ["a", "b"])
        text = _build_text_tower(512, {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8,
                                       "layers": 12}, quick_gelu=True)
    built = {"logit_scale": ()}
    for k, v in model.state_dict().items():
        if k not in ("head.text_emb", "head.logit_scale"):
            built[k.removeprefix("head.")] = tuple(v.shape)
    built.update({k: tuple(v.shape) for k, v in text.state_dict().items()})
    assert built == literal
    params = sum(math.prod(s) for s in literal.values())
    assert 190e6 < params < 200e6, params  # ~195M: CLIP B/16 (~150M) + message tokens (~35M) + MIT/prompts (~10M)


def test_config_follows_the_shapes_and_bad_layouts_are_refused(small):
    from evl_cache.xclip_release import check_layout, infer_config

    cfg = infer_config(small["sd"], "f")
    assert cfg == small_config()
    check_layout(small["sd"], cfg, "f")
    sd = dict(small["sd"])
    del sd["visual.transformer.resblocks.1.message_attn.in_proj_bias"]
    with pytest.raises(UserError, match="missing .*message_attn.in_proj_bias"):
        check_layout(sd, infer_config(sd, "f"), "f")
    sd = dict(small["sd"], **{"mit.resblocks.0.mlp.c_fc.bias": torch.zeros(7)})
    with pytest.raises(UserError, match="wrong shapes"):
        check_layout(sd, cfg, "f")
    sd = dict(small["sd"], extra_head=torch.zeros(3))
    with pytest.raises(UserError, match="unexpected .*extra_head"):
        check_layout(sd, cfg, "f")
    plain = {k: v for k, v in small["sd"].items() if ".message_" not in k}
    with pytest.raises(UserError, match="without X-CLIP's message tokens"):
        infer_config(plain, "f")
    odd = dict(small["sd"], **{"mit.positional_embedding": torch.zeros(1, 4, 64)})
    odd["text_projection"] = torch.zeros(64, 96)
    with pytest.raises(UserError, match="embed dim 96 is not a multiple of 64"):
        infer_config(odd, "f")


# ------------------------------------------------------------------------------ reading the file


def _fake_yacs(monkeypatch) -> type:
    """A stand-in for yacs' CfgNode, registered as yacs.config only while the file is written."""
    pkg, mod = types.ModuleType("yacs"), types.ModuleType("yacs.config")

    class CfgNode(dict):
        def __init__(self, init=None):
            super().__init__(init or {})
            self.__dict__["__immutable__"] = True
            self.__dict__["__deprecated_keys__"] = set()
            self.__dict__["__renamed_keys__"] = {}
            self.__dict__["__new_allowed__"] = False

    CfgNode.__module__, CfgNode.__qualname__ = "yacs.config", "CfgNode"
    mod.CfgNode, pkg.config = CfgNode, mod
    monkeypatch.setitem(sys.modules, "yacs", pkg)
    monkeypatch.setitem(sys.modules, "yacs.config", mod)
    return CfgNode


def test_reads_xclip_training_save_with_yacs_config_and_optimizer(small, tmp_path, monkeypatch):
    """X-CLIP's epoch_saving layout: the model under 'model', beside the optimizer, scheduler and a
    yacs config, read weights-only without yacs installed."""
    from evl_cache.xclip_release import read_release

    CfgNode = _fake_yacs(monkeypatch)
    cfg = CfgNode({"DATA": CfgNode({"NUM_FRAMES": 4, "INPUT_SIZE": 32}), "MODEL": CfgNode({"ARCH": "ViT-B/16"})})
    ddp = {f"module.{k}": v for k, v in small["sd"].items()}
    save = {"model": ddp, "optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(2)}},
                                         "param_groups": [{"lr": 8e-6, "betas": (0.9, 0.98), "params": [0]}]},
            "lr_scheduler": {"t_initial": 30, "warmup_t": 5}, "max_accuracy": 83.8, "epoch": 29, "config": cfg}
    path = tmp_path / "k400_small.pth"
    torch.save(save, path)
    monkeypatch.delitem(sys.modules, "yacs.config")
    monkeypatch.delitem(sys.modules, "yacs")
    sd, digest = read_release(path)
    assert "yacs" not in sys.modules and len(digest) == 64
    assert sd.keys() == small["sd"].keys()
    assert all(torch.equal(sd[k], small["sd"][k]) for k in sd)


def test_a_pickle_that_needs_code_is_refused_without_running_it(small, tmp_path):
    from evl_cache.xclip_release import read_release

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pth"
    torch.save({"model": small["sd"], "extra": Payload()}, path)
    with pytest.raises(UserError, match="needs code to unpickle .*system"):
        read_release(path)
    assert not marker.exists()
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a readable torch checkpoint"):
        read_release(tmp_path / "junk.pth")


# ------------------------------------------------------------------------- the independent forward


def _ln(x, sd, p):
    return F.layer_norm(x, x.shape[-1:], sd[f"{p}.weight"], sd[f"{p}.bias"], 1e-5)


def _mha_seq_first(q_in, kv_in, sd, p, heads, mask=None):
    """nn.MultiheadAttention's math on sequence-first (Lq, N, C) / (Lk, N, C) inputs."""
    C = q_in.shape[-1]
    W, b = sd[f"{p}.in_proj_weight"], sd[f"{p}.in_proj_bias"]
    q, k, v = q_in @ W[:C].T + b[:C], kv_in @ W[C:2 * C].T + b[C:2 * C], kv_in @ W[2 * C:].T + b[2 * C:]
    Lq, N, D = q.shape[0], q.shape[1], C // heads

    def heads_of(t):  # (L, N, C) -> (N, H, L, D)
        return t.reshape(t.shape[0], N, heads, D).permute(1, 2, 0, 3)

    att = heads_of(q) @ heads_of(k).transpose(-1, -2) / math.sqrt(D)
    if mask is not None:
        att = att + mask
    out = (att.softmax(-1) @ heads_of(v)).permute(2, 0, 1, 3).reshape(Lq, N, C)
    return out @ sd[f"{p}.out_proj.weight"].T + sd[f"{p}.out_proj.bias"]


def _mlp(x, sd, w1, w2):
    h = x @ sd[f"{w1}.weight"].T + sd[f"{w1}.bias"]
    return (h * torch.sigmoid(1.702 * h)) @ sd[f"{w2}.weight"].T + sd[f"{w2}.bias"]


def _clip_block(x, sd, p, heads, mask=None):
    h = _ln(x, sd, f"{p}.ln_1")
    x = x + _mha_seq_first(h, h, sd, f"{p}.attn", heads, mask)
    return x + _mlp(_ln(x, sd, f"{p}.ln_2"), sd, f"{p}.mlp.c_fc", f"{p}.mlp.c_proj")


def reference_text(sd, tokens, heads):
    """CLIP's encode_text: (K, ctx) tokens -> (K, E) unnormalised."""
    ctx = tokens.shape[1]
    x = (sd["token_embedding.weight"][tokens] + sd["positional_embedding"]).permute(1, 0, 2)
    mask = torch.full((ctx, ctx), float("-inf")).triu_(1)
    i = 0
    while f"transformer.resblocks.{i}.ln_1.weight" in sd:
        x = _clip_block(x, sd, f"transformer.resblocks.{i}", heads, mask)
        i += 1
    x = _ln(x.permute(1, 0, 2), sd, "ln_final")
    return x[torch.arange(x.shape[0]), tokens.argmax(-1)] @ sd["text_projection"]


def reference_logits(sd, frames, text, T, patch, vheads, eheads):
    """X-CLIP's forward (cct.py, mit.py, prompt.py, xclip.py) for frames (B, T, 3, S, S) and class text (K, E)."""
    B = frames.shape[0]
    x = F.conv2d(frames.reshape(B * T, *frames.shape[2:]), sd["visual.conv1.weight"], stride=patch)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    cls = sd["visual.class_embedding"] + torch.zeros(x.shape[0], 1, x.shape[-1])
    x = _ln(torch.cat([cls, x], 1) + sd["visual.positional_embedding"], sd, "visual.ln_pre").permute(1, 0, 2)
    L, _, C = x.shape  # sequence-first (L, B*T, C), B*T ordered video-major
    i = 0
    while f"visual.transformer.resblocks.{i}.ln_1.weight" in sd:
        p = f"visual.transformer.resblocks.{i}"
        m = x[0] @ sd[f"{p}.message_fc.weight"].T + sd[f"{p}.message_fc.bias"]  # (B*T, C)
        m = m.reshape(B, T, C).permute(1, 0, 2)  # (T, B, C): the T messages of each video attend each other
        h = _ln(m, sd, f"{p}.message_ln")
        m = m + _mha_seq_first(h, h, sd, f"{p}.message_attn", vheads)
        m = m.permute(1, 0, 2).reshape(1, B * T, C)
        y = torch.cat([x, m], 0)
        h = _ln(y, sd, f"{p}.ln_1")
        y = (y + _mha_seq_first(h, h, sd, f"{p}.attn", vheads))[:L]
        x = y + _mlp(_ln(y, sd, f"{p}.ln_2"), sd, f"{p}.mlp.c_fc", f"{p}.mlp.c_proj")
        i += 1
    x = x.permute(1, 0, 2)  # (B*T, L, C)
    cls_emb = (_ln(x[:, 0], sd, "visual.ln_post") @ sd["visual.proj"]).reshape(B, T, -1)
    img = (_ln(x[:, 1:], sd, "prompts_visual_ln") @ sd["prompts_visual_proj"]).reshape(B, T, L - 1, -1).mean(1)
    # MIT
    v = (cls_emb + sd["mit.positional_embedding"]).permute(1, 0, 2)
    v = _clip_block(v, sd, "mit.resblocks.0", eheads).permute(1, 0, 2)
    video = (v + cls_emb).mean(1)
    # prompts
    vis = _ln(img, sd, "prompts_generator.norm")
    t0 = text.unsqueeze(0).expand(B, -1, -1)
    u = t0
    for j in range(2):
        p = f"prompts_generator.decoder.{j}"
        q = _ln(u, sd, f"{p}.norm1")
        E, D = q.shape[-1], q.shape[-1] // eheads
        qh = (q @ sd[f"{p}.cross_attn.q_proj.weight"].T).reshape(B, -1, eheads, D).transpose(1, 2)
        kh = (vis @ sd[f"{p}.cross_attn.k_proj.weight"].T).reshape(B, -1, eheads, D).transpose(1, 2)
        vh = (vis @ sd[f"{p}.cross_attn.v_proj.weight"].T).reshape(B, -1, eheads, D).transpose(1, 2)
        a = ((qh @ kh.transpose(-2, -1)) * D ** -0.5).softmax(-1)
        o = (a @ vh).transpose(1, 2).reshape(B, -1, E)
        u = u + o @ sd[f"{p}.cross_attn.proj.weight"].T + sd[f"{p}.cross_attn.proj.bias"]
        u = u + _mlp(_ln(u, sd, f"{p}.norm3"), sd, f"{p}.mlp.0", f"{p}.mlp.3")
    t = t0 + sd["prompts_generator.alpha"] * u
    video = video / video.norm(dim=-1, keepdim=True)
    t = t / t.norm(dim=-1, keepdim=True)
    return torch.einsum("bd,bkd->bk", video, sd["logit_scale"].exp() * t)


CLASSES = ["juggling balls", "riding a bike", "playing guitar"]


def test_full_model_matches_an_independent_forward_from_the_equations(small):
    """Text embeddings and logits of the module equal X-CLIP's equations written here (fp32)."""
    from open_clip.tokenizer import SimpleTokenizer

    from evl_cache.xclip_release import ReleasePredictor

    sd = small["sd"]
    pred = ReleasePredictor(small["path"], CLASSES, device="cpu", precision="fp32")
    tokens = SimpleTokenizer(context_length=77)(CLASSES)  # X-CLIP's prompt: the bare class name
    text = reference_text(sd, tokens, heads=1)
    assert torch.allclose(pred.model.head.text_emb, text, rtol=1e-5, atol=1e-5)
    frames = torch.randn(3, SMALL["T"], 3, SMALL["image"], SMALL["image"], generator=torch.Generator().manual_seed(1))
    want = reference_logits(sd, frames, text, SMALL["T"], SMALL["patch"], vheads=2, eheads=1)
    got = pred.logits(frames)
    assert got.shape == (3, 3)
    assert want.std() > 0.5  # the classes are told apart, so a wrong term would show
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max())), (got - want).abs().max()
    # every part takes part: without the message tokens or the prompts the logits move
    no_msg = {k: (torch.zeros_like(v) if ".message_fc." in k else v) for k, v in sd.items()}
    no_prompt = dict(sd, **{"prompts_generator.alpha": torch.zeros_like(sd["prompts_generator.alpha"])})
    for other in (no_msg, no_prompt):
        assert (reference_logits(other, frames, text, SMALL["T"], SMALL["patch"], 2, 1) - want).abs().max() > 1e-3


def test_safetensors_release_gives_the_same_model(small, tmp_path):
    from safetensors.torch import save_file

    from evl_cache.xclip_release import ReleasePredictor

    st = tmp_path / "release.safetensors"
    save_file({k: v.contiguous() for k, v in small["sd"].items()}, str(st))
    frames = torch.randn(1, SMALL["T"], 3, SMALL["image"], SMALL["image"])
    a = ReleasePredictor(small["path"], CLASSES, device="cpu", precision="fp32").logits(frames)
    b = ReleasePredictor(st, CLASSES, device="cpu", precision="fp32").logits(frames)
    assert torch.equal(a, b)


# ------------------------------------------------------------------------------ preprocessing


def test_frames_are_x_clip_segment_centres(tmp_path):
    """30 frames, T = 4: X-CLIP's test offsets int(7.5 i + 3.75) = 3, 11, 18, 26; two clips take
    fractions 1/4 and 3/4 of each segment. Each frame is painted with its own grey level."""
    from evl_cache.xclip_release.run import ReleaseViews, frame_indices, release_views

    assert frame_indices(30, 4) == [[3, 11, 18, 26]]
    assert frame_indices(30, 4, 2) == [[1, 9, 16, 24], [5, 13, 20, 28]]
    assert frame_indices(3, 4) == [[0, 1, 1, 2]]  # shorter than T: frames repeat, as X-CLIP's sampler does
    grey = np.stack([np.full((48, 64, 3), 20 + 8 * i, np.uint8) for i in range(30)])
    path = media.write_video(tmp_path / "grey.mp4", grey)
    views = release_views(str(path), 4, 32, ReleaseViews(2, 1))
    level = views[:, :, 0].mean(dim=(-1, -2)) * 58.395 + 123.675  # undo the red channel's normalisation
    want = torch.tensor([[20 + 8 * i for i in clip] for clip in ([1, 9, 16, 24], [5, 13, 20, 28])], dtype=torch.float32)
    assert torch.allclose(level, want, atol=2.0), level


def test_views_are_resized_cropped_and_imagenet_normalised(tmp_path):
    """48x64 frames, S = 32: one crop resizes to 36x48 (short side int(256/224*32) = 36) and cuts
    rows 2..34, columns 8..40; three crops resize to 32x43 and cut columns 0, 5 and 10."""
    import decord

    from evl_cache.xclip_release.run import ReleaseViews, release_views

    path = media.write_video(tmp_path / "v.mp4", media.moving_square_frames(16, 48, 64, seed=2))
    raw = decord.VideoReader(str(path)).get_batch([2, 6, 10, 14]).asnumpy()  # 16 / 4 = 4: 4 i + 2
    x = torch.from_numpy(raw).permute(0, 3, 1, 2).float()
    mean = torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1)
    std = torch.tensor([58.395, 57.12, 57.375]).view(3, 1, 1)
    one = F.interpolate(x, size=(36, 48), mode="bilinear", align_corners=False).round().clamp(0, 255)
    want = ((one[..., 2:34, 8:40] - mean) / std).unsqueeze(0)
    got = release_views(str(path), 4, 32, ReleaseViews(1, 1))
    assert got.shape == (1, 4, 3, 32, 32) and torch.allclose(got, want, atol=1e-5)
    three = F.interpolate(x, size=(32, 43), mode="bilinear", align_corners=False).round().clamp(0, 255)
    want3 = torch.stack([(three[..., :, o:o + 32] - mean) / std for o in (0, 5, 10)])
    assert torch.allclose(release_views(str(path), 4, 32, ReleaseViews(1, 3)), want3, atol=1e-5)


# ------------------------------------------------------------------------------ CLI: predict and eval


from clirun import run_cli  # noqa: E402,F401  (shared with the other CLI tests)


@pytest.fixture(scope="module")
def videos(small):
    d = small["dir"] / "videos"
    paths = [media.write_video(d / f"v{i}.mp4", media.moving_square_frames(12 + 4 * i, 48, 64, seed=i)) for i in range(3)]
    media.corrupt_random(d / "broken.mp4")
    classes = small["dir"] / "classes.txt"
    classes.write_text("\n".join(CLASSES) + "\n")
    return {"dir": d, "paths": [str(p) for p in paths], "classes": classes}


def test_cli_predict_with_a_release_file(small, videos, monkeypatch, capsys):
    from evl_cache.xclip_release import ReleasePredictor, predict_release

    code, out, err = run_cli(monkeypatch, capsys, "predict", "--xclip-release", small["path"], "--classes",
                             videos["classes"], videos["paths"][0], "--device", "cpu", "--views", "eval:2x3")
    assert code == 0, err
    preds = predict_release(small["path"], videos["paths"][0], str(videos["classes"]), views="eval:2x3", device="cpu")
    direct = ReleasePredictor(small["path"], CLASSES, device="cpu", views=None)
    top_name, top_p = preds[0].top[0]
    assert f"{top_name}" in out and f"{top_p:.4f}" in out
    assert abs(sum(p for _, p in preds[0].top) - 1.0) < 1e-5
    # the 2x3 grid scores differ from the 1x1 default: the grid is used
    assert not np.allclose(direct.scores(videos["paths"][0]).numpy(), preds[0].probs)


def test_cli_eval_online_on_a_list_manifest(small, videos, tmp_path, monkeypatch, capsys):
    from evl_cache.xclip_release import ReleasePredictor

    root = videos["dir"]
    (root / "val.csv").write_text("path,label\n" + "".join(f"{Path(p).name},{CLASSES[i]}\n" for i, p in enumerate(videos["paths"]))
                                  + "broken.mp4,riding a bike\n")
    out = tmp_path / "ev"
    code, stdout, err = run_cli(monkeypatch, capsys, "eval", "--xclip-release", small["path"], "--dataset", "list",
                                "--root", root, "--annotations", root / "val.csv", "--classes", videos["classes"],
                                "--out", out, "--device", "cpu")
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    pred = ReleasePredictor(small["path"], CLASSES, device="cpu")
    scores = np.stack([pred.scores(p).numpy() for p in videos["paths"]])
    top1 = float(np.mean(scores.argmax(1) == np.arange(3)))
    assert metrics["videos"] == 3 and metrics["top1"] == pytest.approx(top1)
    assert metrics["dataset"]["failed"] == 1 and metrics["failed"][0]["path"].endswith("broken.mp4")
    assert metrics["xclip_release"]["config"]["frames"] == SMALL["T"] and metrics["views"] == 1
    saved = np.load(out / "scores.npz", allow_pickle=False)
    assert np.allclose(saved["scores"], scores, atol=1e-6)
    assert f"top-1 {100 * top1:.2f}%" in stdout and "1 undecodable" in stdout
    assert len((out / "predictions.csv").read_text().splitlines()) == 4


def test_eval_prompts_with_reworded_class_names(small, videos, tmp_path):
    """--class-prompts: the model is prompted with other names (X-CLIP's 'brush hair' for HMDB's
    brush_hair); the metrics keep the manifest's names."""
    from evl_cache.datasets import load_manifest
    from evl_cache.xclip_release import ReleasePredictor, evaluate_release

    root = videos["dir"]
    (root / "snake.csv").write_text("path,label\n" + "".join(f"{Path(p).name},{i}\n" for i, p in enumerate(videos["paths"])))
    snake = root / "snake.txt"
    snake.write_text("\n".join(c.replace(" ", "_") for c in CLASSES) + "\n")
    manifest = load_manifest("list", str(root), "val", annotations=str(root / "snake.csv"), classes=str(snake))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(CLASSES) + "\n")
    m = evaluate_release(small["path"], manifest, tmp_path / "ev", device="cpu", class_prompts=prompts)
    assert m["xclip_release"]["prompts"] == CLASSES and list(m["per_class"]) == [c.replace(" ", "_") for c in CLASSES]
    want = ReleasePredictor(small["path"], CLASSES, device="cpu")
    saved = np.load(tmp_path / "ev" / "scores.npz", allow_pickle=False)
    assert np.allclose(saved["scores"][0], want.scores(videos["paths"][0]).numpy(), atol=1e-6)
    plain = ReleasePredictor(small["path"], [c.replace(" ", "_") for c in CLASSES], device="cpu")
    assert not np.allclose(saved["scores"][0], plain.scores(videos["paths"][0]).numpy(), atol=1e-4)
    prompts.write_text("one\ntwo\n")
    with pytest.raises(UserError, match="has 2 names but the list manifest has 3 classes"):
        evaluate_release(small["path"], manifest, tmp_path / "ev2", device="cpu", class_prompts=prompts)
    assert not (tmp_path / "ev2").exists()


def test_cli_refusals_are_one_line(small, videos, tmp_path, monkeypatch, capsys):
    clip_only = tmp_path / "clip.pth"
    torch.save({k: v for k, v in small["sd"].items() if ".message_" not in k}, clip_only)
    v, c = videos["paths"][0], videos["classes"]
    cases = {
        "without X-CLIP's message tokens": ["predict", "--xclip-release", clip_only, "--classes", c, v],
        "--weights does not apply to --xclip-release": ["predict", "--xclip-release", small["path"], "--classes", c,
                                                        "--weights", "x.pt", v],
        "--frames does not apply": ["predict", "--xclip-release", small["path"], "--classes", c, "--frames", "8", v],
        "needs --classes": ["predict", "--xclip-release", small["path"], v],
        "drop --checkpoint": ["predict", "--xclip-release", small["path"], "--checkpoint", "m", "--classes", c, v],
        "not found": ["predict", "--xclip-release", tmp_path / "nope.pth", "--classes", c, v],
        "bad --views": ["predict", "--xclip-release", small["path"], "--classes", c, "--views", "train:2", v],
        "needs --dataset": ["eval", "--xclip-release", small["path"], "--out", tmp_path / "o"],
        "not on --store": ["eval", "--xclip-release", small["path"], "--store", "s", "--dataset", "list"],
        "--dataset applies to --xclip-release only": ["eval", "--checkpoint", "m", "--store", "s", "--dataset", "list"],
        "eval needs --checkpoint and --store": ["eval", "--store", "s"],
        "--workers applies to evaluating a --store": ["eval", "--xclip-release", small["path"], "--dataset", "list",
                                                      "--workers", "2"],
        "--classes applies to --zero-shot or --xclip-release FILE only": ["predict", "--classes", c, v],
    }
    for needle, args in cases.items():
        code, _, err = run_cli(monkeypatch, capsys, *args, "--device", "cpu")
        assert code == 2 and err.count("\n") == 1 and needle in err, (needle, err)
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------ full size (slow)


@pytest.mark.slow
def test_b16_8f_release_file_loads_and_predicts(tmp_path, videos):
    """A full-size generated k400_16_8.pth (~780 MB of fp32): read, checked, built and run on a video."""
    from evl_cache.xclip_release import ReleasePredictor

    path = tmp_path / "k400_16_8.pth"
    torch.save({"model": random_release(release_table(**B16_8F))}, path)
    pred = ReleasePredictor(path, CLASSES, device="cpu", precision="fp32")
    assert pred.config.frames == 8 and pred.config.image_size == 224 and pred.config.vision_layers == 12
    p = pred(videos["paths"][1])
    assert p.error is None and abs(float(p.probs.sum()) - 1) < 1e-5
