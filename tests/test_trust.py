"""Trusted weights only: a TorchScript archive (code) is run only if it is a known OpenAI CLIP release
or the user passes --trust-torchscript; state dicts and safetensors never run code."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

from evl_cache import known_weights
from evl_cache.backbone import BackboneSpec, build_backbone, build_visual_tower, file_sha256, is_torchscript_archive
from evl_cache.errors import UserError
from test_backbone import TINY, _save_torchscript

SEED = 11


def _refuse_jit_load(*args, **kwargs):
    raise AssertionError("torch.jit.load was called: the archive's code would have run")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """The same tiny tower saved as a TorchScript archive and as a plain torch state dict."""
    root = tmp_path_factory.mktemp("trust")
    source, _ = build_visual_tower(BackboneSpec(TINY, "random", seed=SEED))
    out = {"torchscript": root / "script.pt", "state_dict": root / "state.pt"}
    _save_torchscript(source, out["torchscript"])
    torch.save(source.state_dict(), out["state_dict"])
    return out


@pytest.fixture(scope="module")
def frames() -> torch.Tensor:
    return torch.randn(1, 2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_archive_is_recognised_from_the_zip_directory_alone(files, tmp_path):
    assert is_torchscript_archive(files["torchscript"])
    assert not is_torchscript_archive(files["state_dict"])  # torch.save is a zip too, without code/
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a zip")
    assert not is_torchscript_archive(junk)


def test_unknown_torchscript_is_refused_before_it_runs(files, monkeypatch):
    monkeypatch.setattr(torch.jit, "load", _refuse_jit_load)
    with pytest.raises(UserError) as err:
        build_backbone(BackboneSpec(TINY, str(files["torchscript"])))
    msg = str(err.value)
    assert "\n" not in msg
    assert "TorchScript" in msg and "not a known OpenAI CLIP release" in msg
    assert "--trust-torchscript" in msg and "safetensors" in msg
    assert file_sha256(files["torchscript"])[:16] in msg


def test_state_dict_loads_without_touching_torchscript(files, frames, monkeypatch):
    monkeypatch.setattr(torch.jit, "load", _refuse_jit_load)
    loaded = build_backbone(BackboneSpec(TINY, str(files["state_dict"])))
    ref = build_backbone(BackboneSpec(TINY, "random", seed=SEED))
    torch.testing.assert_close(loaded(frames)["feats"], ref(frames)["feats"])


def test_trust_flag_loads_the_archive(files, frames):
    loaded = build_backbone(BackboneSpec(TINY, str(files["torchscript"]), trust_torchscript=True))
    assert loaded.weights_id == file_sha256(files["torchscript"])
    ref = build_backbone(BackboneSpec(TINY, "random", seed=SEED))
    torch.testing.assert_close(loaded(frames)["feats"], ref(frames)["feats"])


def test_known_release_hash_is_trusted_without_the_flag(files, frames, monkeypatch):
    sha = file_sha256(files["torchscript"])
    monkeypatch.setitem(known_weights.OPENAI_CLIP_RELEASES, "Test-Tiny.pt", sha)
    loaded = build_backbone(BackboneSpec(TINY, str(files["torchscript"])))
    assert loaded.weights_id == sha
    ref = build_backbone(BackboneSpec(TINY, "random", seed=SEED))
    torch.testing.assert_close(loaded(frames)["feats"], ref(frames)["feats"])


def test_known_table_matches_the_openai_download_urls():
    """Each URL OpenAI publishes its CLIP files under carries the file's sha256 as a path segment."""
    import open_clip

    table = known_weights.OPENAI_CLIP_RELEASES
    assert all(re.fullmatch(r"[0-9a-f]{64}", sha) for sha in table.values())
    assert len(set(table.values())) == len(table) == 9
    archs = ("RN50", "RN101", "RN50x4", "RN50x16", "RN50x64", "ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336")
    for arch in archs:
        url = open_clip.get_pretrained_url(arch, "openai")
        name, sha = url.rsplit("/", 2)[2], url.rsplit("/", 2)[1]
        assert table[name] == sha, arch
        assert known_weights.known_release(sha.upper()) == name


def test_trust_is_not_part_of_the_weights_identity(files):
    """A store made with --trust-torchscript resumes without it: describe() never records the flag."""
    sha = file_sha256(files["torchscript"])
    trusted = build_backbone(BackboneSpec(TINY, str(files["torchscript"]), trust_torchscript=True))
    assert "trust_torchscript" not in trusted.describe()
    assert BackboneSpec.from_dict(trusted.spec.to_dict()).trust_torchscript is True  # reaches the Ray actors
    plain = build_backbone(BackboneSpec(TINY, str(files["state_dict"])))
    same = {k: v for k, v in trusted.describe().items() if k not in ("weights", "weights_id")}
    assert same == {k: v for k, v in plain.describe().items() if k not in ("weights", "weights_id")}
    assert trusted.describe()["weights_id"] == sha


def test_extract_settings_carry_the_flag():
    from evl_cache.extract import ExtractConfig

    cfg = ExtractConfig.from_settings({"arch": TINY, "weights": "x.pt", "trust_torchscript": True})
    assert cfg.backbone.trust_torchscript is True
    assert ExtractConfig.from_settings({"arch": TINY, "weights": "x.pt"}).backbone.trust_torchscript is False


# --- predict: the weights path a checkpoint names goes through the same rule -------------------------


@pytest.fixture(scope="module")
def scripted_checkpoint(files, tmp_path_factory):
    """A checkpoint trained on a store extracted (with trust) from the TorchScript file."""
    from test_predict import EVAL, random_decoder
    from test_train import build_store, write_videos

    from evl_cache.checkpoints import save_checkpoint
    from evl_cache.store import open_store
    from evl_cache.train import checkpoint_meta

    root = tmp_path_factory.mktemp("trusted_ck")
    paths, labels = write_videos(root / "videos", 2)
    spec = BackboneSpec(TINY, str(files["torchscript"]), trust_torchscript=True)
    store = build_store(root / "s.zarr", paths, labels, EVAL, dtype="float32", spec=spec)
    attrs = open_store(store).attrs
    assert attrs["backbone"]["weights_id"] == file_sha256(files["torchscript"])
    ck = save_checkpoint(root / "ck", random_decoder(attrs), checkpoint_meta(attrs, attrs, store, 0))
    return {"ck": ck, "paths": paths, "store": store}


def test_predict_applies_the_trust_rule_to_the_recorded_weights(scripted_checkpoint, monkeypatch):
    from evl_cache.predict import Predictor

    real_load = torch.jit.load
    monkeypatch.setattr(torch.jit, "load", _refuse_jit_load)
    with pytest.raises(UserError, match="--trust-torchscript"):
        Predictor(scripted_checkpoint["ck"], device="cpu")
    monkeypatch.setattr(torch.jit, "load", real_load)
    predictor = Predictor(scripted_checkpoint["ck"], device="cpu", trust_torchscript=True)
    assert predictor.backbone.weights_id == file_sha256(predictor.backbone.spec.weights)


def test_predict_checks_the_recorded_sha256_before_reading_the_file(scripted_checkpoint, files, tmp_path, monkeypatch):
    """A --weights file that is not the one the checkpoint recorded is refused without being loaded."""
    from evl_cache.predict import Predictor

    other, _ = build_visual_tower(BackboneSpec(TINY, "random", seed=SEED + 1))
    swapped = tmp_path / "swapped.pt"
    _save_torchscript(other, swapped)
    monkeypatch.setattr(torch.jit, "load", _refuse_jit_load)
    with pytest.raises(UserError, match="--force"):
        Predictor(scripted_checkpoint["ck"], weights=str(swapped), device="cpu", trust_torchscript=True)


def _run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    from evl_cache.cli import main

    monkeypatch.setattr(sys, "argv", ["evl-cache", *args])
    with pytest.raises(SystemExit) as code:
        main()
    return code.value.code, capsys.readouterr().err


def test_cli_refuses_untrusted_torchscript_with_exit_2(scripted_checkpoint, files, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.jit, "load", _refuse_jit_load)
    video = scripted_checkpoint["paths"][0]
    rc, err = _run_cli(monkeypatch, capsys, "predict", "--checkpoint", str(scripted_checkpoint["ck"]), video)
    assert rc == 2 and err.count("\n") == 1 and "--trust-torchscript" in err

    csv_path = tmp_path / "list.csv"
    csv_path.write_text(f"path,label\n{video},left\n")
    store = tmp_path / "store.zarr"
    rc, err = _run_cli(monkeypatch, capsys, "extract", "--dataset", "list", "--root", "/", "--annotations",
                       str(csv_path), "--store", str(store), "--arch", TINY, "--weights", str(files["torchscript"]),
                       "--frames", "4", "--stride", "2")
    assert rc == 2 and err.count("\n") == 1 and "--trust-torchscript" in err
    assert not store.exists()


def test_cli_predict_with_trust_flag_runs(scripted_checkpoint, monkeypatch, capsys):
    from evl_cache.cli import main

    video = scripted_checkpoint["paths"][0]
    monkeypatch.setattr(sys, "argv", ["evl-cache", "predict", "--checkpoint", str(scripted_checkpoint["ck"]),
                                      "--trust-torchscript", "--device", "cpu", video])
    main()  # returns normally: exit 0
    out = capsys.readouterr().out
    assert "left" in out and "right" in out
