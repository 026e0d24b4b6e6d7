"""Fidelity to the reference: the eval resize floors the long side; QuickGELU follows the weights."""

from __future__ import annotations

import pytest
import torch

from evl_cache.backbone import (BackboneSpec, FrozenCLIPBackbone, build_backbone, build_visual_tower,
                                openclip_quick_gelu, resolve_quick_gelu)
from evl_cache.extract import ExtractConfig
from evl_cache.video import resize_short_side
from test_backbone import TINY


@pytest.mark.parametrize("h, w, out", [
    (256, 340, (224, 297)),  # 340 * 224 / 256 = 297.5: the reference floors to 297 (rounding gave 298)
    (340, 256, (297, 224)),  # portrait: the same rule on the other side
    (240, 320, (224, 298)),  # 298.67 floors to 298 (rounding gave 299)
    (100, 100, (224, 224)),
    (224, 500, (224, 500)),  # short side already at size: untouched
])
def test_resize_short_side_floors_the_long_side(h, w, out):
    frames = torch.rand(2, 3, h, w)
    got = resize_short_side(frames, 224)
    assert tuple(got.shape[-2:]) == out
    assert tuple(got.shape[-2:]) == ((224, w * 224 // h) if h <= w else (h * 224 // w, 224))


def test_resize_is_bilinear_to_the_floored_size():
    frames = torch.rand(1, 3, 256, 340, generator=torch.Generator().manual_seed(0))
    ref = torch.nn.functional.interpolate(frames, size=(224, 297), mode="bilinear", align_corners=False)
    torch.testing.assert_close(resize_short_side(frames, 224), ref, rtol=0, atol=0)


def test_openclip_quick_gelu_comes_from_the_pretrained_config():
    import open_clip

    tags = open_clip.list_pretrained_tags_by_model("ViT-B-16")
    assert "laion2b_s34b_b88k" in tags and "openai" in tags
    assert openclip_quick_gelu("ViT-B-16", "laion2b_s34b_b88k") is False  # trained with GELU
    assert openclip_quick_gelu("ViT-B-16", "openai") is True
    assert openclip_quick_gelu("ViT-B-16", "metaclip_400m") is True  # non-OpenAI, QuickGELU-trained
    assert openclip_quick_gelu("ViT-L-14", "laion2b_s32b_b82k") is False


def test_resolve_quick_gelu_default_and_explicit_choice():
    laion = "openclip:laion2b_s34b_b88k"
    assert resolve_quick_gelu(BackboneSpec("ViT-B-16", laion)) is False
    assert resolve_quick_gelu(BackboneSpec("ViT-B-16", "openclip:openai")) is True
    assert resolve_quick_gelu(BackboneSpec("ViT-B-16", laion, quick_gelu=True)) is True  # the user wins
    assert resolve_quick_gelu(BackboneSpec("ViT-B-16", "openclip:openai", quick_gelu=False)) is False
    assert resolve_quick_gelu(BackboneSpec("ViT-B-16", "/some/ViT-B-16.pt")) is True  # local file: OpenAI
    assert resolve_quick_gelu(BackboneSpec(TINY, "random")) is True


def test_describe_records_the_resolved_activation():
    visual, _ = build_visual_tower(BackboneSpec(TINY, "random"))
    laion = FrozenCLIPBackbone(visual, spec=BackboneSpec("ViT-B-16", "openclip:laion2b_s34b_b88k"))
    assert laion.describe()["quick_gelu"] is False
    assert build_backbone(BackboneSpec(TINY, "random")).describe()["quick_gelu"] is True
    assert build_backbone(BackboneSpec(TINY, "random", quick_gelu=False)).describe()["quick_gelu"] is False


def test_quick_gelu_choice_changes_the_tower():
    """The resolved flag reaches the built tower (GELU and QuickGELU give different features)."""
    frames = torch.randn(1, 2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    quick = build_backbone(BackboneSpec(TINY, "random", seed=3), attention="none")
    gelu = build_backbone(BackboneSpec(TINY, "random", seed=3, quick_gelu=False), attention="none")
    assert not torch.allclose(quick(frames)["feats"], gelu(frames)["feats"])


def test_extract_settings_leave_quick_gelu_unset_unless_given():
    base = {"arch": "ViT-B-16", "weights": "openclip:laion2b_s34b_b88k"}
    assert ExtractConfig.from_settings(base).backbone.quick_gelu is None
    assert resolve_quick_gelu(ExtractConfig.from_settings(base).backbone) is False
    assert ExtractConfig.from_settings({**base, "quick_gelu": True}).backbone.quick_gelu is True
    assert ExtractConfig.from_settings({**base, "quick_gelu": False}).backbone.quick_gelu is False
