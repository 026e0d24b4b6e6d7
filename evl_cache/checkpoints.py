"""Decoder checkpoints: our own format, and import of released EVL checkpoints.

Own format, two files side by side, no pickle anywhere:
  <name>.safetensors  the head's state dict (EVL: decoder + classifier; see evl_cache.heads)
  <name>.json         {"format", "format_version", "decoder": the head's config ("head" names a
                       head other than EVL's DecoderConfig), "weights_sha256",
                       "meta": {backbone spec, blocks, frames, sampling, class_names, ...}}
Both are written to temporary names first and renamed into place, so a crash never leaves a
half-written checkpoint that looks valid; the json pins the weights' sha256 to catch mix-ups.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import Any

import torch

from evl_cache.decoder import DecoderConfig, EVLDecoder
from evl_cache.errors import UserError

FORMAT = "evl-cache-decoder"
FORMAT_VERSION = 1


def checkpoint_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """`run/best`, `run/best.json` or `run/best.safetensors` -> (weights file, json file)."""
    p = Path(path)
    stem = p.with_suffix("") if p.suffix in (".json", ".safetensors") else p
    return stem.parent / (stem.name + ".safetensors"), stem.parent / (stem.name + ".json")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_checkpoint(path: str | os.PathLike, model: torch.nn.Module, meta: dict[str, Any] | None = None) -> Path:
    """Write weights + config atomically; returns the json path. `meta` must be JSON-serialisable."""
    from safetensors.torch import save_file

    weights, config = checkpoint_paths(path)
    meta = dict(meta or {})
    names = meta.get("class_names")
    if names is not None and len(names) != model.cfg.num_classes:
        raise UserError(
            f"checkpoint {config}: {len(names)} class names for a {model.cfg.num_classes}-class head; "
            f"pass exactly one name per class"
        )
    try:
        json.dumps(meta)
    except (TypeError, ValueError) as err:
        raise UserError(f"checkpoint {config}: metadata is not JSON-serialisable ({err}); pass plain values") from err
    weights.parent.mkdir(parents=True, exist_ok=True)
    tmp_w = weights.with_name(weights.name + ".tmp")
    tmp_j = config.with_name(config.name + ".tmp")
    try:
        state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp_w), metadata={"format": FORMAT})
        os.chmod(tmp_w, 0o666 & ~_umask())  # safetensors creates 0600; match the json's permissions
        doc = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "decoder": model.cfg.to_dict(),
            "weights_file": weights.name,
            "weights_sha256": _sha256(tmp_w),
            "meta": meta,
        }
        tmp_j.write_text(json.dumps(doc, indent=2) + "\n")
        os.replace(tmp_w, weights)
        os.replace(tmp_j, config)
    finally:
        for tmp in (tmp_w, tmp_j):
            tmp.unlink(missing_ok=True)
    return config


def read_checkpoint_config(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's json document, validated (format, version, decoder config)."""
    _, config = checkpoint_paths(path)
    if not config.is_file():
        raise UserError(f"checkpoint config {config} not found; pass the path of a checkpoint written by evl-cache "
                        f"(<name>.json beside <name>.safetensors), or import a released one with `evl-cache import-evl`")
    try:
        doc = json.loads(config.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"checkpoint config {config} is not valid JSON ({err}); re-save or re-import the checkpoint") from err
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise UserError(f"{config} is not an evl-cache decoder checkpoint (no \"format\": \"{FORMAT}\"); "
                        f"for a released EVL .pth use `evl-cache import-evl`")
    if doc.get("format_version") != FORMAT_VERSION:
        raise UserError(f"checkpoint {config} has format_version {doc.get('format_version')}, this evl-cache reads "
                        f"{FORMAT_VERSION}; use a matching evl-cache version")
    if not isinstance(doc.get("decoder"), dict):
        raise UserError(f"checkpoint {config} has no 'decoder' config; re-save the checkpoint")
    from evl_cache.heads import head_config_from_dict

    doc["decoder"] = head_config_from_dict(doc["decoder"])  # the head's config (no "head" key: EVL)
    return doc


def load_checkpoint(
    path: str | os.PathLike, expected_classes: int | None = None, device: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """(the head in eval mode, meta) from a checkpoint; safetensors + json only, never unpickles.
    The json's ``decoder`` entry names the head (evl_cache.heads; none: the EVL decoder)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights, config = checkpoint_paths(path)
    doc = read_checkpoint_config(config)
    cfg = doc["decoder"]
    if expected_classes is not None and cfg.num_classes != expected_classes:
        raise UserError(f"checkpoint {config} has a {cfg.num_classes}-class head but {expected_classes} classes "
                        f"are expected here; use a checkpoint trained on this label set")
    if not weights.is_file():
        raise UserError(f"checkpoint weights {weights} not found (config {config} exists); copy both files together")
    sha = doc.get("weights_sha256")
    if sha and _sha256(weights) != sha:
        raise UserError(f"checkpoint weights {weights} do not match the sha256 recorded in {config} (corrupt or "
                        f"replaced file); restore the matching pair")
    try:
        state = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"checkpoint weights {weights} are unreadable ({err}); restore or re-save the checkpoint") from err
    from evl_cache.heads import build_head

    model = build_head(cfg, fresh=False)  # every tensor, derived ones included, comes from the file
    check_state_dict(model, state, str(weights))
    model.load_state_dict(state)
    meta = doc.get("meta") or {}
    names = meta.get("class_names")
    if names is not None and len(names) != cfg.num_classes:
        raise UserError(f"checkpoint {config} lists {len(names)} class names for a {cfg.num_classes}-class head; "
                        f"fix class_names in the json")
    return model.to(device).eval(), meta


def check_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Name the first missing, unexpected or mis-shaped tensor, with the config it contradicts."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise UserError(f"{where}: state dict does not fit the decoder config (missing {missing[:4]}, unexpected "
                        f"{unexpected[:4]}); the temporal-module switches or layer count differ, fix the config")
    for k, v in own.items():
        if tuple(state[k].shape) != tuple(v.shape):
            if k == "head.fc.weight":
                raise UserError(f"{where}: head has {state[k].shape[0]} classes but the config says "
                                f"{v.shape[0]}; fix num_classes")
            raise UserError(f"{where}: tensor {k} has shape {tuple(state[k].shape)}, the config needs "
                            f"{tuple(v.shape)}; fix width/frames/grid/mlp_ratio in the config")


def check_meta_fits(cfg: DecoderConfig, meta: dict[str, Any], where: str) -> None:
    """Refuse metadata (e.g. copied from a cache store) that contradicts the decoder's shapes."""
    facts = {"frames": cfg.frames, "width": cfg.width, "grid": list(cfg.grid), "tokens": cfg.num_tokens}
    for key, value in facts.items():
        if key in meta and (list(meta[key]) if key == "grid" else meta[key]) != value:
            raise UserError(f"{where}: metadata says {key}={meta[key]} but the decoder has {key}={value}; "
                            f"use a store/backbone matching the checkpoint")
    if "blocks" in meta and len(meta["blocks"]) != cfg.cached_blocks:
        raise UserError(f"{where}: metadata lists {len(meta['blocks'])} blocks for a decoder reading {cfg.cached_blocks}; "
                        f"use a store extracted with the last {cfg.cached_blocks} blocks")
    if cfg.temporal_cross_attention and meta.get("attention", cfg.attention_input) != cfg.attention_input:
        raise UserError(f"{where}: metadata has attention {meta['attention']!r} but TCA reads "
                        f"{cfg.attention_input!r}; pass the matching attention input")


# ------------------------------------------------------------------- released EVL checkpoints --
_LAYER = re.compile(r"decoder\.decoder_layers\.(\d+)\.(.+)")


def _released_to_own(key: str) -> str | None:
    """Released EVL key (prefix stripped) -> own EVLDecoder key; None if not a decoder/head key."""
    if key == "decoder.cls_token":
        return "query"
    if m := _LAYER.fullmatch(key):
        return f"layers.{m[1]}.{m[2]}"
    if m := re.fullmatch(r"decoder\.temporal_conv\.(\d+)\.(weight|bias)", key):
        return f"layers.{m[1]}.tconv.{m[2]}"
    if m := re.fullmatch(r"decoder\.temporal_pos_embed\.(\d+)", key):
        return f"layers.{m[1]}.tpos"
    if m := re.fullmatch(r"decoder\.cross_attention\.(\d+)\.(w1|w2)", key):
        return f"layers.{m[1]}.tca." + ("w_prev" if m[2] == "w1" else "w_next")
    if m := re.fullmatch(r"proj\.(0|2)\.(weight|bias)", key):
        return ("head.norm." if m[1] == "0" else "head.fc.") + m[2]
    return None


def _side_from_offsets(n: int, src: str) -> int:
    side = (math.isqrt(n) + 1) // 2
    if (2 * side - 1) ** 2 != n:
        raise UserError(f"{src}: TCA table has {n} rows, not (2h-1)^2 for a square grid; pass grid=(h, w)")
    return side


def released_config(
    state: dict[str, torch.Tensor], src: str, heads: int | None = None, num_frames: int | None = None,
    grid: tuple[int, int] | None = None, attention_input: str = "maps",
) -> DecoderConfig:
    """Infer the DecoderConfig of a released EVL state dict (prefix stripped) from tensor shapes."""
    if "decoder.cls_token" not in state or "proj.2.weight" not in state:
        raise UserError(f"{src}: no decoder.cls_token / proj.2.weight; not a released EVL decoder checkpoint")
    C = state["decoder.cls_token"].shape[-1]
    layers = sorted({int(m[1]) for k in state if (m := _LAYER.fullmatch(k))})
    if not layers or layers != list(range(len(layers))):
        raise UserError(f"{src}: decoder layers {layers} are not 0..K-1; the checkpoint is incomplete")
    has = {name: any(k.startswith(f"decoder.{name}.") for k in state)
           for name in ("temporal_conv", "temporal_pos_embed", "cross_attention")}
    frames = state["decoder.temporal_pos_embed.0"].shape[0] if has["temporal_pos_embed"] else num_frames
    if num_frames is not None and frames != num_frames:
        raise UserError(f"{src}: temporal_pos_embed has {frames} frames but {num_frames} were requested; drop --frames")
    if frames is None:
        raise UserError(f"{src}: the checkpoint has no temporal_pos_embed, so frames cannot be inferred; pass num_frames")
    if grid is None:
        if not has["cross_attention"]:
            raise UserError(f"{src}: the checkpoint has no TCA tables, so the patch grid cannot be inferred; pass grid")
        side = _side_from_offsets(state["decoder.cross_attention.0.w1"].shape[0], src)
        grid = (side, side)
    heads = heads or max(1, C // 64)
    if C % heads:
        raise UserError(f"{src}: width {C} is not divisible by heads={heads}; pass the right head count")
    hidden = state["decoder.decoder_layers.0.mlp.fc1.weight"].shape[0]
    return DecoderConfig(
        num_layers=len(layers), width=C, heads=heads, frames=int(frames), grid=tuple(grid),
        num_classes=state["proj.2.weight"].shape[0], mlp_ratio=hidden / C,
        temporal_conv=has["temporal_conv"], temporal_pos=has["temporal_pos_embed"],
        temporal_cross_attention=has["cross_attention"],
        attention_input=attention_input if has["cross_attention"] else "none",
    )


def read_released_state(src_path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a released EVL .pth (safe torch.load, weights_only), 'model' and DDP prefix removed."""
    src = Path(src_path)
    if not src.is_file():
        raise UserError(f"EVL checkpoint {src} not found; pass the path of the released .pth file")
    try:
        obj = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for bad files
        raise UserError(f"cannot read {src} as a torch checkpoint ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
                        f"pass an EVL .pth (loaded with weights_only=True, no arbitrary pickles)") from err
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{src} holds no state dict (expected {{'model': {{name: tensor}}}}); not an EVL checkpoint")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def import_evl_checkpoint(
    src_path: str | os.PathLike, out_path: str | os.PathLike, num_frames: int | None = None,
    meta: dict[str, Any] | None = None, heads: int | None = None, grid: tuple[int, int] | None = None,
    attention_input: str = "maps",
) -> tuple[EVLDecoder, Path]:
    """Convert a released EVL checkpoint into the own format; returns (model, json path).

    `heads` cannot be read off tensor shapes (default width // 64, the CLIP convention); the grid
    is inferred as square from the TCA table unless given. meta["backbone_layers"] (block count of
    the backbone), if given, records the block indices the decoder reads (the last K). Pass a cache
    store's facts as meta (backbone, blocks, sampling, class_names, ...) to make the import usable
    by `evaluate`/`predict`; they are checked against the inferred config.
    """
    src = str(src_path)
    state = read_released_state(src_path)
    unknown = [k for k in state if _released_to_own(k) is None]
    if unknown:
        raise UserError(f"{src}: {len(unknown)} keys are not EVL decoder/head weights (e.g. {unknown[:3]}); "
                        f"export the decoder and head only")
    cfg = released_config(state, src, heads, num_frames, grid, attention_input)
    own = {_released_to_own(k): v.float() for k, v in state.items()}
    model = EVLDecoder(cfg)
    check_state_dict(model, own, src)
    model.load_state_dict(own)
    h, w = cfg.grid
    full_meta = {
        "frames": cfg.frames,
        "imported_from": {"path": str(Path(src).resolve()), "sha256": _sha256(Path(src)), "layout": "EVL release"},
    }
    full_meta.update(meta or {})
    layers = full_meta.get("backbone_layers")
    if "blocks" not in full_meta and layers:  # EVL reads the last K blocks
        full_meta["blocks"] = list(range(int(layers) - cfg.num_layers, int(layers)))
    check_meta_fits(cfg, full_meta, src)
    out = save_checkpoint(out_path, model, full_meta)
    return model.eval(), out
