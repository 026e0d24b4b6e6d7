"""Zero-shot scores against an independent numpy computation; per-frame embeddings against open_clip and the raw weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from safetensors.torch import load_file, save_file

from evl_cache.backbone import BackboneSpec, build_backbone, build_visual_tower
from evl_cache.errors import UserError
from evl_cache.zeroshot import embeddings_from_last_block, frame_embeddings, zero_shot_scores

TINY = Path(__file__).parent / "assets" / "tiny_vit.json"


def numpy_scores(frames: np.ndarray, text: np.ndarray, scale: float) -> np.ndarray:
    """From the equations: unit frames, mean over T, unit video; scale * cosine; softmax over C; mean over V."""
    f = frames / np.linalg.norm(frames, axis=-1, keepdims=True)
    v = f.mean(axis=2)
    v = v / np.linalg.norm(v, axis=-1, keepdims=True)
    t = text / np.linalg.norm(text, axis=-1, keepdims=True)
    logits = scale * np.einsum("nve,ce->nvc", v, t)
    p = np.exp(logits - logits.max(axis=-1, keepdims=True))
    p = p / p.sum(axis=-1, keepdims=True)
    return p.mean(axis=1)


def test_zero_shot_scores_match_numpy():
    g = np.random.default_rng(0)
    frames = g.normal(size=(4, 3, 5, 16)) * g.uniform(0.5, 3, size=(4, 3, 5, 1))  # frame norms differ
    text = g.normal(size=(7, 16))
    got = zero_shot_scores(torch.from_numpy(frames).half(), torch.from_numpy(text).float(), 42.0)
    expected = numpy_scores(frames.astype(np.float16).astype(np.float64), text, 42.0)
    assert got.shape == (4, 7) and got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got.sum(dim=1).numpy(), 1.0, atol=1e-6)


def test_zero_shot_refuses_mismatched_shapes_and_scale():
    with pytest.raises(UserError, match="dimension 16"):
        zero_shot_scores(torch.zeros(1, 1, 2, 16), torch.zeros(3, 8), 10.0)
    with pytest.raises(UserError, match="videos, views, frames, dim"):
        zero_shot_scores(torch.zeros(1, 2, 16), torch.zeros(3, 16), 10.0)
    with pytest.raises(UserError, match="positive"):
        zero_shot_scores(torch.ones(1, 1, 2, 16), torch.ones(3, 16), 0.0)


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory):
    cfg = json.loads(TINY.read_text())
    torch.manual_seed(0)
    model = open_clip.model.CLIP(cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"], quick_gelu=True).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("w") / "clip.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model, path


def test_frame_embeddings_are_open_clip_encode_image(clip_file):
    model, path = clip_file
    visual, _ = build_visual_tower(BackboneSpec(arch=str(TINY), weights=str(path)))
    frames = torch.randn(2, 3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    got = frame_embeddings(visual, frames)
    with torch.no_grad():
        expected = model.encode_image(frames.flatten(0, 1)).view(2, 3, -1)
    assert got.shape == (2, 3, 32)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_embeddings_from_cached_last_block(clip_file):
    """What a store holding the last block yields: ln_post(CLS) @ proj, recomputed from the raw weights."""
    _, path = clip_file
    spec = BackboneSpec(arch=str(TINY), weights=str(path))
    bb = build_backbone(spec, blocks=[-1], attention="none")
    frames = torch.randn(2, 3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    last = bb(frames)["feats"][:, 0]  # (B, T, L, C)
    got = embeddings_from_last_block(bb.visual, last)
    w = {k: v.double() for k, v in load_file(str(path)).items()}
    cls = last[..., 0, :].double()
    mu, var = cls.mean(-1, keepdim=True), cls.var(-1, unbiased=False, keepdim=True)
    ln = (cls - mu) / torch.sqrt(var + 1e-5) * w["visual.ln_post.weight"] + w["visual.ln_post.bias"]
    expected = (ln @ w["visual.proj"]).float()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, frame_embeddings(bb.visual, frames), rtol=1e-5, atol=1e-5)
