"""The committed tiny CLIP (evl_cache/assets/tiny_clip, made by pipelines/pretrain_tiny_clip.py).

Its image trunk must stay the tiny ViT's bit for bit (so EVL's cached tensors are the demo's), both
towers must load through the project's builders, and its text tower must name the synthetic shapes
from their words alone (the point of `make demo-text`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
TINY_CLIP = ROOT / "evl_cache" / "assets" / "tiny_clip"
TINY_VIT = ROOT / "evl_cache" / "assets" / "tiny_vit"
TEMPLATES = ROOT / "configs" / "templates" / "synthetic_captions.txt"
TRAINED = ("proj", "ln_post.weight", "ln_post.bias")  # the only image-tower tensors pretraining moved


def spec():
    from evl_cache.backbone import BackboneSpec

    return BackboneSpec(arch=str(TINY_CLIP / "config.json"), weights=str(TINY_CLIP / "weights.safetensors"),
                        quick_gelu=True, precision="fp32")


def test_image_trunk_is_the_tiny_vits_bit_for_bit():
    clip_sd = load_file(str(TINY_CLIP / "weights.safetensors"))
    vit_sd = load_file(str(TINY_VIT / "weights.safetensors"))
    visual = {k.removeprefix("visual."): v for k, v in clip_sd.items() if k.startswith("visual.")}
    assert set(visual) == set(vit_sd)
    for name, tensor in vit_sd.items():
        if name not in TRAINED:
            assert torch.equal(visual[name], tensor), name
    assert not torch.equal(visual["proj"], vit_sd["proj"])
    cfg = json.loads((TINY_CLIP / "config.json").read_text())
    assert cfg["vision_cfg"] == json.loads((TINY_VIT / "config.json").read_text())["vision_cfg"]
    # token rows no caption used are zero, so the file stays compressible
    rows = clip_sd["token_embedding.weight"]
    used = int((rows.abs().sum(1) > 0).sum())
    assert 20 < used < 500 and rows.shape == (49408, cfg["text_cfg"]["width"])
    assert "pretrain_tiny_clip.py" in (TINY_CLIP / "PRETRAIN.md").read_text()


def test_both_towers_load_through_the_project_builders():
    from evl_cache.backbone import build_visual_tower
    from evl_cache.text import build_text_tower

    visual, _ = build_visual_tower(spec())
    tower = build_text_tower(spec())
    emb = tower.encode(["a circle.", "a large red square at the top left."])
    assert emb.shape == (2, visual.proj.shape[1]) and torch.isfinite(emb).all()
    assert 1.0 < tower.logit_scale <= 100.0


def render_static_clips(per_class: int) -> tuple[torch.Tensor, np.ndarray, list[str]]:
    """(N, T, 3, S, S) CLIP-normalised frames of the four appearance classes, from the benchmark's renderer."""
    from evl_cache.synth import CLASS_SPECS, PROMPT_NAMES, clip_rng, render_clip
    from evl_cache.video import normalise

    names = [n for n, s in CLASS_SPECS.items() if s.kind == "appearance"]
    clips, labels = [], []
    for c, name in enumerate(names):
        for i in range(per_class):
            frames, _ = render_clip(name, clip_rng(7, "val", name, i), frames=4, size=64)
            clips.append(frames)
            labels.append(c)
    frames = normalise(torch.from_numpy(np.stack(clips)).permute(0, 1, 4, 2, 3))
    return frames, np.array(labels), [PROMPT_NAMES[n] for n in names]


def test_text_tower_names_the_shapes_zero_shot(tmp_path):
    """Zero-shot on the appearance classes from their names: far above chance (0.25). The model is
    committed and the clips are seeded, so the number is fixed; docs/fewshot.md reports it."""
    from evl_cache.backbone import build_visual_tower
    from evl_cache.templates import read_template_file
    from evl_cache.text import class_text_embeddings
    from evl_cache.zeroshot import frame_embeddings, video_embeddings

    frames, labels, names = render_static_clips(per_class=12)
    visual, _ = build_visual_tower(spec())
    video = video_embeddings(frame_embeddings(visual, frames))
    text = class_text_embeddings(spec(), names, read_template_file(TEMPLATES), cache_dir=tmp_path)
    acc = float(((video @ text.emb.T).argmax(1).numpy() == labels).mean())
    assert acc >= 0.6, acc
