"""Analytic MAC counts: the paper's per-view reference numbers, and torch's FlopCounterMode."""

import json

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from evl_cache.decoder import DecoderConfig, EVLDecoder
from evl_cache.errors import UserError
from evl_cache.flops import (
    backbone_macs,
    backbone_params,
    decoder_macs,
    model_cost,
    table1,
    vit_dims,
)
from evl_cache.tca import tca_direct, temporal_attention_maps

TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
}


@pytest.mark.parametrize(
    "arch,frames,backbone,decoder",
    [("ViT-B-16", 8, 140.5, 10.8), ("ViT-L-14", 32, 2592.4, 102.5)],
)
def test_reference_per_view_counts_within_1pct(arch, frames, backbone, decoder):
    r = model_cost(arch, frames, views=1)
    assert abs(r.backbone_gmacs_per_view - backbone) / backbone < 0.01
    assert abs(r.decoder_gmacs_per_view - decoder) / decoder < 0.01
    assert r.total_gmacs == pytest.approx(backbone + decoder, rel=0.01)


def test_params_match_paper_and_open_clip():
    assert model_cost("ViT-B-16", 8).trainable_params == pytest.approx(33.2e6, rel=0.002)
    assert model_cost("ViT-L-14", 8).trainable_params == pytest.approx(58.7e6, rel=0.002)
    import open_clip

    with torch.device("meta"):
        for arch in ("ViT-B-16", "ViT-L-14-336"):
            model = open_clip.create_model(arch, pretrained=None, device="meta")
            assert backbone_params(vit_dims(arch)) == sum(p.numel() for p in model.visual.parameters())


def test_decoder_count_equals_flop_counter_mode():
    """FlopCounterMode on a real EVLDecoder (FLOPs = 2 x MACs) equals our count of the same ops."""
    for attention_input in ("qk", "maps"):
        cfg = DecoderConfig(num_layers=2, width=32, heads=4, frames=4, grid=(3, 2), num_classes=5,
                            attention_input=attention_input)
        model = EVLDecoder(cfg).eval()
        B, K, T, L = 2, 2, 4, 7
        q, k = torch.randn(B, K, T, L, 4, 8), torch.randn(B, K, T, L, 4, 8)
        batch = {"feats": torch.randn(B, K, T, L, 32), "q": q, "k": k, "attn": temporal_attention_maps(q, k)}
        grad_mode = torch.enable_grad() if attention_input == "qk" else torch.no_grad()  # both must work
        with grad_mode, FlopCounterMode(display=False) as counter:
            model(batch)
        expected = decoder_macs(cfg, "binned", tca_qk=attention_input == "qk")
        assert counter.get_total_flops() == 2 * B * sum(expected.values())


def test_reference_tca_formula_equals_flop_counter_mode():
    cfg = DecoderConfig(num_layers=1, width=32, heads=4, frames=4, grid=(3, 2), num_classes=5)
    q, k = torch.randn(1, 4, 7, 4, 8), torch.randn(1, 4, 7, 4, 8)
    w = torch.randn(15, 32)
    with FlopCounterMode(display=False) as counter:
        tca_direct(temporal_attention_maps(q, k), w, w, cfg.grid)
    assert counter.get_total_flops() == 2 * decoder_macs(cfg, "reference")["tca"]


def test_backbone_count_equals_flop_counter_mode(tmp_path):
    import open_clip

    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(TINY_CLIP))
    dims = vit_dims(str(path))
    visual = open_clip.model.CLIP(**TINY_CLIP, quick_gelu=True).visual.train()  # train: no fused MHA path
    frames = 3
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        visual(torch.randn(frames, 3, 32, 32))
    proj = frames * 64 * 16  # open_clip runs the final projection; EVL does not, so it is not counted
    assert counter.get_total_flops() == 2 * (sum(backbone_macs(dims, frames).values()) + proj)
    assert backbone_params(dims) == sum(p.numel() for p in visual.parameters())


def test_table1_rows():
    rows = table1()
    assert [(r["model"], r["frames"]) for r in rows] == [
        ("B/16", 8), ("B/16", 16), ("B/16", 32), ("L/14", 8), ("L/14", 16), ("L/14", 32), ("L/14@336", 32)
    ]
    for r in rows[3:6]:  # L/14 rows are counts of the full model
        assert abs(r["diff_pct"]) < 0.5
    for r in rows[:3]:  # B/16 rows equal the count without TCA
        assert abs(r["diff_no_tca_pct"]) < 0.5 and r["diff_pct"] > 2


def test_bad_arch_is_user_error():
    with pytest.raises(UserError, match="unknown architecture"):
        vit_dims("ViT-Q-99")
    with pytest.raises(UserError, match="cannot feed"):
        model_cost("ViT-B-16", 8, decoder_layers=13)


def test_cli_flops():
    from typer.testing import CliRunner

    from evl_cache.cli import app

    out = CliRunner().invoke(app, ["flops", "--arch", "ViT-B-16", "--frames", "8", "--views", "3"])
    assert out.exit_code == 0, out.output
    assert "140.50" in out.output and "10.79" in out.output and "453.9" in out.output and "33.18 M" in out.output
    out = CliRunner().invoke(app, ["flops", "--table1"])
    assert out.exit_code == 0 and "18,196" in out.output and "L/14@336" in out.output
