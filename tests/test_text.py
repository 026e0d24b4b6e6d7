"""The text tower against open_clip's own CLIP model, the prompt ensemble against its equations, and the cache."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from safetensors.torch import save_file

from evl_cache.backbone import BackboneSpec, file_sha256
from evl_cache.errors import UserError
from evl_cache.text import build_text_tower, class_text_embeddings, text_identity

TINY = Path(__file__).parent / "assets" / "tiny_vit.json"
TINY_PRETRAINED = Path(__file__).parent.parent / "evl_cache" / "assets" / "tiny_vit"
LOGIT_SCALE = 23.0
HAS_TRUST_RULE = "trust_torchscript" in BackboneSpec.__dataclass_fields__


def clip_model(cfg: dict, seed: int = 0) -> open_clip.model.CLIP:
    """open_clip's own CLIP with every parameter randomised (LayerNorms too) and a distinct logit scale."""
    torch.manual_seed(seed)
    model = open_clip.model.CLIP(cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"], quick_gelu=True)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        model.logit_scale.fill_(math.log(LOGIT_SCALE))
    return model.eval()


def tiny_tokens(vocab: int, context: int, n: int = 5, last_end: int | None = None) -> torch.Tensor:
    """CLIP-shaped token rows for a small vocabulary: ids below vocab-1, the end token (vocab-1, the
    largest id, where open_clip's argmax pooling reads) at a random position up to ``last_end``,
    zeros after it."""
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(1, vocab - 1, (n, context), generator=g)
    for row, end in enumerate(torch.randint(1, (last_end or context - 1) + 1, (n,), generator=g).tolist()):
        tokens[row, end] = vocab - 1
        tokens[row, end + 1:] = 0
    return tokens


@pytest.fixture(scope="module")
def tiny_cfg() -> dict:
    return json.loads(TINY.read_text())


@pytest.fixture(scope="module")
def clip_vocab_cfg(tmp_path_factory) -> tuple[Path, dict]:
    """The tiny image tower with a small text tower over CLIP's full BPE vocabulary (49408 ids)."""
    cfg = json.loads(TINY.read_text())
    cfg["text_cfg"] = {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
    path = tmp_path_factory.mktemp("cfg") / "tiny_clip_bpe.json"
    path.write_text(json.dumps(cfg))
    return path, cfg


@pytest.fixture(scope="module")
def bpe_model_file(clip_vocab_cfg, tmp_path_factory) -> tuple[open_clip.model.CLIP, Path]:
    model = clip_model(clip_vocab_cfg[1], seed=3)
    path = tmp_path_factory.mktemp("w") / "clip_bpe.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model, path


@pytest.mark.parametrize("layout", ["safetensors", "state_dict", "wrapped_ddp"])
def test_text_tower_matches_open_clip_encode_text(tiny_cfg, tmp_path, layout):
    model = clip_model(tiny_cfg)
    sd = model.state_dict()
    if layout == "safetensors":
        path = tmp_path / "w.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    elif layout == "state_dict":
        path = tmp_path / "w.pt"
        torch.save(sd, path)
    else:  # a training checkpoint: {"state_dict": {"module.<key>": ...}}
        path = tmp_path / "w.pt"
        torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}, path)
    tower = build_text_tower(BackboneSpec(arch=str(TINY), weights=str(path)))
    tokens = tiny_tokens(tiny_cfg["text_cfg"]["vocab_size"], tiny_cfg["text_cfg"]["context_length"])
    with torch.no_grad():
        expected = model.encode_text(tokens)
    got = tower.encode_tokens(tokens)
    assert got.shape == (5, tiny_cfg["embed_dim"])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert tower.logit_scale == pytest.approx(LOGIT_SCALE, rel=1e-6)
    assert tower.identity()["weights_id"] == file_sha256(path)


@pytest.mark.parametrize("pool", ["argmax", "eos", "last"])
def test_short_prompts_run_fewer_positions_with_the_same_result(tiny_cfg, tmp_path, pool):
    """Cutting the padding after the pooled token is exact under the causal mask (argmax, eos pooling);
    other pooling runs the full context. Both must equal open_clip's encode_text."""
    cfg = json.loads(json.dumps(tiny_cfg))
    cfg["text_cfg"].update(pool_type=pool, eos_id=63)
    arch = tmp_path / "cfg.json"
    arch.write_text(json.dumps(cfg))
    model = clip_model(cfg, seed=7)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    tower = build_text_tower(BackboneSpec(arch=str(arch), weights=str(path)))
    tokens = tiny_tokens(64, 16, n=6, last_end=6)
    positions = tower._pooled_positions(tokens)
    if pool == "last":
        assert positions is None
    else:
        assert int(positions.max()) == 6  # runs 7 of 16 positions
    with torch.no_grad():
        expected = model.encode_text(tokens)
    torch.testing.assert_close(tower.encode_tokens(tokens), expected, rtol=1e-5, atol=1e-5)


def test_text_tower_from_torchscript_archive(tiny_cfg, tmp_path):
    """OpenAI's released files are TorchScript archives; they go through the backbone's reader."""
    model = clip_model(tiny_cfg, seed=5)
    path = tmp_path / "openai_like.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(model).save(str(path))
    extra = {"trust_torchscript": True} if HAS_TRUST_RULE else {}
    tower = build_text_tower(BackboneSpec(arch=str(TINY), weights=str(path), **extra))
    tokens = tiny_tokens(tiny_cfg["text_cfg"]["vocab_size"], tiny_cfg["text_cfg"]["context_length"])
    with torch.no_grad():
        expected = model.encode_text(tokens)
    torch.testing.assert_close(tower.encode_tokens(tokens), expected, rtol=1e-5, atol=1e-5)
    assert tower.logit_scale == pytest.approx(LOGIT_SCALE, rel=1e-6)


@pytest.mark.skipif(not HAS_TRUST_RULE, reason="the backbone's TorchScript trust rule is not in this tree yet")
def test_untrusted_torchscript_is_refused_for_the_text_tower_too(tiny_cfg, tmp_path):
    path = tmp_path / "unknown.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(clip_model(tiny_cfg)).save(str(path))
    with pytest.raises(UserError, match="TorchScript"):
        build_text_tower(BackboneSpec(arch=str(TINY), weights=str(path)))


def test_random_text_tower_has_open_clip_default_temperature():
    tower = build_text_tower(BackboneSpec(arch=str(TINY), weights="random", seed=4))
    assert tower.logit_scale == pytest.approx(1 / 0.07)
    assert tower.identity()["weights_id"] == "random:4"
    again = build_text_tower(BackboneSpec(arch=str(TINY), weights="random", seed=4))
    tokens = tiny_tokens(64, 16)
    torch.testing.assert_close(tower.encode_tokens(tokens), again.encode_tokens(tokens), rtol=0, atol=0)


def test_image_tower_only_checkpoint_is_refused():
    spec = BackboneSpec(arch=str(TINY_PRETRAINED / "config.json"), weights=str(TINY_PRETRAINED / "weights.safetensors"))
    with pytest.raises(UserError, match="no text tower") as err:
        build_text_tower(spec)
    assert "\n" not in str(err.value)


def test_mismatched_architecture_is_refused(clip_vocab_cfg, tmp_path, tiny_cfg):
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in clip_model(tiny_cfg).state_dict().items()}, str(path))
    with pytest.raises(UserError, match="does not fit architecture"):
        build_text_tower(BackboneSpec(arch=str(clip_vocab_cfg[0]), weights=str(path)))


def test_tokenizer_is_clip_bpe_offline(clip_vocab_cfg):
    import os

    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    tower = build_text_tower(BackboneSpec(arch=str(clip_vocab_cfg[0]), weights="random"))
    tokens = tower.tokenize(["a photo of a dog.", "x " * 40])
    assert tokens.shape == (2, 16)
    # CLIP's BPE ids: <start>=49406, a=320, photo=1125, of=539, dog=1929, .=269, <end>=49407
    assert tokens[0].tolist() == [49406, 320, 1125, 539, 320, 1929, 269, 49407] + [0] * 8
    assert tokens[1, 0] == 49406 and tokens[1, -1] == 49407  # truncated to the context, end token kept
    torch.testing.assert_close(tokens, open_clip.tokenize(["a photo of a dog.", "x " * 40], context_length=16))


def test_tokenizer_that_overflows_a_small_vocabulary_is_refused():
    tower = build_text_tower(BackboneSpec(arch=str(TINY), weights="random"))
    with pytest.raises(UserError, match="64-token vocabulary") as err:
        tower.tokenize(["a dog"])
    assert "\n" not in str(err.value)


def test_ensemble_matches_clip_recipe_computed_independently(bpe_model_file, clip_vocab_cfg):
    model, path = bpe_model_file
    classes = ["juggling balls", "riding a bike", "archery"]
    templates = ["a video of a person {}.", "{}", "a photo of {}, an action."]
    tower = build_text_tower(BackboneSpec(arch=str(clip_vocab_cfg[0]), weights=str(path)))
    got = class_text_embeddings(tower, classes, templates)
    # CLIP's recipe with open_clip's own model and tokenizer: per class, normalise each template's
    # embedding, average over templates, normalise the average.
    expected = []
    for c in classes:
        with torch.no_grad():
            e = model.encode_text(open_clip.tokenize([t.replace("{}", c) for t in templates], context_length=16)).double().numpy()
        e = e / np.linalg.norm(e, axis=1, keepdims=True)
        m = e.mean(axis=0)
        expected.append(m / np.linalg.norm(m))
    np.testing.assert_allclose(got.emb.numpy(), np.stack(expected), rtol=1e-5, atol=1e-6)
    assert got.emb.dtype == torch.float32 and got.source == "computed"
    assert got.logit_scale == pytest.approx(LOGIT_SCALE, rel=1e-6)


def test_cache_is_reused_and_recomputed_when_identity_changes(bpe_model_file, clip_vocab_cfg, tmp_path):
    _, path = bpe_model_file
    spec = BackboneSpec(arch=str(clip_vocab_cfg[0]), weights=str(path))
    tower = build_text_tower(spec)
    classes, templates, cache = ["swimming", "skiing"], ["a video of {}.", "a photo of {}."], tmp_path / "cache"

    first = class_text_embeddings(tower, classes, templates, cache_dir=cache)
    calls = tower.encode_calls
    assert first.source == "computed" and calls > 0 and first.path.is_file()
    stamp = (first.path.stat().st_mtime_ns, first.path.with_suffix(".json").stat().st_mtime_ns)

    second = class_text_embeddings(tower, classes, templates, cache_dir=cache)
    assert second.source == "cache" and tower.encode_calls == calls
    assert (second.path.stat().st_mtime_ns, second.path.with_suffix(".json").stat().st_mtime_ns) == stamp
    assert second.key == first.key and second.identity == first.identity
    torch.testing.assert_close(second.emb, first.emb, rtol=0, atol=0)
    assert second.logit_scale == first.logit_scale

    # a spec has the same identity as the tower it builds, so it hits without building anything
    assert text_identity(spec) == tower.identity()
    assert class_text_embeddings(spec, classes, templates, cache_dir=cache).source == "cache"

    # another class list (or order) is another identity: encoded again, into its own entry
    third = class_text_embeddings(tower, ["skiing", "swimming"], templates, cache_dir=cache)
    assert third.source == "computed" and tower.encode_calls > calls and third.path != first.path
    torch.testing.assert_close(third.emb, first.emb.flip(0), rtol=1e-6, atol=1e-6)

    # an entry whose recorded identity differs from what is asked is not trusted
    meta_path = first.path.with_suffix(".json")
    meta = json.loads(meta_path.read_text())
    meta["identity"]["templates"] = ["a drawing of {}."]
    meta_path.write_text(json.dumps(meta))
    calls = tower.encode_calls
    redo = class_text_embeddings(tower, classes, templates, cache_dir=cache)
    assert redo.source == "computed" and tower.encode_calls > calls
    assert json.loads(meta_path.read_text())["identity"] == first.identity  # rewritten

    # nor is one whose tensor file is not the one recorded
    save_file({"emb": torch.zeros_like(first.emb)}, str(first.path))
    redo = class_text_embeddings(tower, classes, templates, cache_dir=cache)
    assert redo.source == "computed"
    torch.testing.assert_close(redo.emb, first.emb, rtol=0, atol=0)


def test_identity_separates_weights_precision_and_config(clip_vocab_cfg, bpe_model_file):
    base = text_identity(BackboneSpec(arch=str(clip_vocab_cfg[0]), weights=str(bpe_model_file[1])))
    assert text_identity(BackboneSpec(arch=str(clip_vocab_cfg[0]), weights="random")) != base
    assert text_identity(BackboneSpec(arch=str(clip_vocab_cfg[0]), weights=str(bpe_model_file[1]), precision="bf16")) != base
    assert text_identity(BackboneSpec(arch=str(TINY), weights=str(bpe_model_file[1])))["text_config_sha256"] != base["text_config_sha256"]


def test_bad_class_lists_and_templates_are_refused_before_encoding(clip_vocab_cfg):
    tower = build_text_tower(BackboneSpec(arch=str(clip_vocab_cfg[0]), weights="random"))
    for classes, templates, match in [([], ["{}"], "empty"), (["a", "a"], ["{}"], "twice"),
                                      (["a"], ["no placeholder"], "placeholder"), (["a"], [], "no templates")]:
        with pytest.raises(UserError, match=match):
            class_text_embeddings(tower, classes, templates)
    assert tower.encode_calls == 0
