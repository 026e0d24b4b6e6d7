"""The backbone wrapper against an independent recomputation from the raw weights (docs/reference.md)."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from evl_cache.backbone import BackboneSpec, build_backbone, build_visual_tower, file_sha256
from evl_cache.errors import UserError

TINY = str(Path(__file__).parent / "assets" / "tiny_vit.json")


def reference_forward(sd: dict[str, torch.Tensor], frames: torch.Tensor, heads: int, blocks: list[int]) -> dict:
    """Written from the spec with plain tensor ops on the state dict (no open_clip modules).

    ViT: patch conv (no bias) -> [CLS; patches] + pos -> ln_pre -> blocks of
    x + out_proj(MHA(LN1 x)) ; x + c_proj(QuickGELU(c_fc(LN2 x))). Block b's q/k are the
    in-projection (bias included) of LN1(input of block b), split into heads, unscaled.
    """
    b, t = frames.shape[:2]
    x = frames.flatten(0, 1).double()
    w = {k: v.double() for k, v in sd.items()}
    c = w["conv1.weight"].shape[0]
    p = w["conv1.weight"].shape[-1]
    x = F.conv2d(x, w["conv1.weight"], stride=p).flatten(2).transpose(1, 2)
    cls = w["class_embedding"].expand(x.shape[0], 1, c)
    x = torch.cat([cls, x], 1) + w["positional_embedding"]
    x = F.layer_norm(x, (c,), w["ln_pre.weight"], w["ln_pre.bias"])
    d = c // heads
    feats, maps, qs, ks = [], [], [], []
    n_blocks = 1 + max(int(k.split(".")[2]) for k in w if k.startswith("transformer.resblocks."))
    for i in range(n_blocks):
        pre = f"transformer.resblocks.{i}."
        h = F.layer_norm(x, (c,), w[pre + "ln_1.weight"], w[pre + "ln_1.bias"])
        qkv = h @ w[pre + "attn.in_proj_weight"].T + w[pre + "attn.in_proj_bias"]
        q, k, v = qkv.split(c, dim=-1)
        n, length = x.shape[:2]
        q4, k4, v4 = (z.view(n, length, heads, d) for z in (q, k, v))
        att = torch.einsum("nlhd,nmhd->nhlm", q4 / math.sqrt(d), k4).softmax(-1)
        o = torch.einsum("nhlm,nmhd->nlhd", att, v4).reshape(n, length, c)
        x = x + o @ w[pre + "attn.out_proj.weight"].T + w[pre + "attn.out_proj.bias"]
        h2 = F.layer_norm(x, (c,), w[pre + "ln_2.weight"], w[pre + "ln_2.bias"])
        m = h2 @ w[pre + "mlp.c_fc.weight"].T + w[pre + "mlp.c_fc.bias"]
        m = m * torch.sigmoid(1.702 * m)
        x = x + m @ w[pre + "mlp.c_proj.weight"].T + w[pre + "mlp.c_proj.bias"]
        if i in blocks:
            feats.append(x.view(b, t, length, c))
            qv, kv = q4.view(b, t, length, heads, d), k4.view(b, t, length, heads, d)
            qs.append(qv)
            ks.append(kv)
            prev = torch.zeros(b, t - 1, length - 1, length - 1, dtype=torch.float64)
            nxt = torch.zeros_like(prev)
            for bi in range(b):
                for tt in range(1, t):  # A_prev(t), t = 1..T-1
                    for hh in range(heads):
                        s = qv[bi, tt, 1:, hh] @ kv[bi, tt - 1, 1:, hh].T / math.sqrt(d)
                        prev[bi, tt - 1] += s.softmax(-1) / heads
                for tt in range(t - 1):  # A_next(t), t = 0..T-2
                    for hh in range(heads):
                        s = qv[bi, tt, 1:, hh] @ kv[bi, tt + 1, 1:, hh].T / math.sqrt(d)
                        nxt[bi, tt] += s.softmax(-1) / heads
            maps.append(torch.stack([prev, nxt], 1))
    return {"feats": torch.stack(feats, 1), "attn": torch.stack(maps, 1), "q": torch.stack(qs, 1), "k": torch.stack(ks, 1)}


@pytest.fixture(scope="module")
def frames() -> torch.Tensor:
    return torch.randn(2, 3, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("blocks", [None, [0, 2]])
def test_features_maps_and_qk_match_independent_recomputation(frames, blocks):
    spec = BackboneSpec(TINY, "random", seed=7)
    maps_bb = build_backbone(spec, blocks=blocks, attention="maps")
    qk_bb = build_backbone(spec, blocks=blocks, attention="qk")
    ref = reference_forward(maps_bb.visual.state_dict(), frames, maps_bb.heads, maps_bb.blocks)
    out_maps, out_qk = maps_bb(frames), qk_bb(frames)
    assert out_maps["feats"].shape == (2, len(maps_bb.blocks), 3, 17, 64)
    assert out_maps["attn"].shape == (2, len(maps_bb.blocks), 2, 2, 16, 16)
    torch.testing.assert_close(out_maps["feats"].double(), ref["feats"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out_maps["attn"].double(), ref["attn"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out_qk["q"].double(), ref["q"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out_qk["k"].double(), ref["k"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out_qk["feats"], out_maps["feats"])
    # rows of every map are distributions over the key patches
    torch.testing.assert_close(out_maps["attn"].sum(-1), torch.ones_like(out_maps["attn"].sum(-1)))


def test_default_blocks_are_last_four_and_none_mode_has_only_features(frames):
    bb = build_backbone(BackboneSpec(TINY, "random"), attention="none")
    assert bb.blocks == [0, 1, 2]  # a 3-block ViT: "last four" clamps to all three
    out = bb(frames)
    assert set(out) == {"feats"}


def _save_torchscript(visual: nn.Module, path: Path) -> None:
    class OpenAIStyle(nn.Module):
        def __init__(self, visual: nn.Module) -> None:
            super().__init__()
            self.visual = visual
            self.logit_scale = nn.Parameter(torch.ones([]))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.logit_scale

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.trace(OpenAIStyle(visual), torch.randn(2)).save(str(path))


@pytest.mark.parametrize("fmt", ["torchscript", "openclip_ddp", "safetensors", "visual_only"])
def test_weight_files_load_with_sha_recorded(tmp_path, frames, fmt):
    source, _ = build_visual_tower(BackboneSpec(TINY, "random", seed=11))
    sd = source.state_dict()
    path = tmp_path / f"w.{ 'safetensors' if fmt == 'safetensors' else 'pt'}"
    if fmt == "torchscript":
        _save_torchscript(source, path)
    elif fmt == "openclip_ddp":
        torch.save({"epoch": 3, "state_dict": {f"module.visual.{k}": v for k, v in sd.items()} | {"module.logit_scale": torch.ones([])}}, path)
    elif fmt == "safetensors":
        save_file({f"visual.{k}": v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save(sd, path)
    # a TorchScript archive is code: it loads only when trusted (tests/test_trust.py covers refusal)
    loaded = build_backbone(BackboneSpec(TINY, str(path), trust_torchscript=fmt == "torchscript"), attention="maps")
    assert loaded.weights_id == file_sha256(path)
    ref = build_backbone(BackboneSpec(TINY, "random", seed=11), attention="maps")
    torch.testing.assert_close(loaded(frames)["feats"], ref(frames)["feats"])


def test_bad_weights_and_arch_fail_with_one_clear_line(tmp_path):
    with pytest.raises(UserError, match="not found"):
        build_backbone(BackboneSpec(TINY, str(tmp_path / "missing.pt")))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(UserError, match="junk.pt"):
        build_backbone(BackboneSpec(TINY, str(junk)))
    other, _ = build_visual_tower(BackboneSpec(TINY, "random"))
    sd = {k: v for k, v in other.state_dict().items() if "resblocks.2" not in k}
    torch.save(sd, tmp_path / "short.pt")
    with pytest.raises(UserError, match="does not fit architecture"):
        build_backbone(BackboneSpec(TINY, str(tmp_path / "short.pt")))
    with pytest.raises(UserError, match="unknown architecture"):
        build_backbone(BackboneSpec("ViT-Q-99", "random"))
    with pytest.raises(UserError, match="blocks"):
        build_backbone(BackboneSpec(TINY, "random"), blocks=[5])
