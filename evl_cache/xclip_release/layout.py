"""The state-dict layout of a released X-CLIP checkpoint, the config its shapes imply, and reading the file.

X-CLIP's training script saves ``{"model": state_dict, "optimizer": ..., "lr_scheduler": ...,
"max_accuracy": ..., "epoch": ..., "config": <yacs CfgNode>}`` (microsoft/VideoX, X-CLIP,
``utils/tools.py``), and the released ``.pth`` files are read as ``torch.load(f)["model"]``. The
state dict holds the whole model under these prefixes (docs/heads.md, "Released X-CLIP models"):

    visual.*                 the image tower with CCT: CLIP's ViT plus, in every block,
                             message_fc / message_ln / message_attn (the cross-frame message token)
    mit.*                    the multi-frame integration transformer (positional_embedding (1, T, E))
    prompts_generator.*      the video-specific prompt generator (norm, decoder.N.*, alpha)
    prompts_visual_ln.*, prompts_visual_proj   LayerNorm(C) and (C, E) before the prompt generator
    transformer.*, token_embedding.weight, positional_embedding, ln_final.*, text_projection
                             CLIP's text tower (frozen in X-CLIP's default recipe)
    logit_scale              CLIP's raw temperature (logits use exp(logit_scale))

No size is stored besides the shapes, so the config is read from them. Head counts are not in
any shape: X-CLIP sets every one of them to width // 64 (vision, text, MIT, prompts), and so
does this reader.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from evl_cache.errors import UserError

Shape = tuple[int, ...]


@dataclass(frozen=True)
class ReleaseConfig:
    """Sizes of a released X-CLIP model, all read from its tensor shapes (`infer_config`)."""

    frames: int  # T: MIT's position embedding, also the CCT's frame count
    image_size: int
    patch_size: int
    vision_width: int  # C
    vision_layers: int
    embed_dim: int  # E
    mit_layers: int
    prompt_layers: int
    context_length: int
    vocab_size: int
    text_width: int
    text_layers: int

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def tokens(self) -> int:
        """L = 1 + patches per frame."""
        return self.grid * self.grid + 1

    @property
    def vision_heads(self) -> int:
        return self.vision_width // 64

    @property
    def text_heads(self) -> int:
        return self.text_width // 64

    @property
    def embed_heads(self) -> int:
        """Heads of MIT and of the prompt generator's cross-attention."""
        return self.embed_dim // 64

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _attention(prefix: str, width: int) -> dict[str, Shape]:
    """nn.MultiheadAttention's parameters (fused in-projection)."""
    return {f"{prefix}.in_proj_weight": (3 * width, width), f"{prefix}.in_proj_bias": (3 * width,),
            f"{prefix}.out_proj.weight": (width, width), f"{prefix}.out_proj.bias": (width,)}


def _norm(prefix: str, width: int) -> dict[str, Shape]:
    return {f"{prefix}.weight": (width,), f"{prefix}.bias": (width,)}


def _residual_block(prefix: str, width: int) -> dict[str, Shape]:
    """CLIP's pre-LN block: attn, ln_1, mlp.c_fc, mlp.c_proj, ln_2."""
    return {**_attention(f"{prefix}.attn", width), **_norm(f"{prefix}.ln_1", width),
            f"{prefix}.mlp.c_fc.weight": (4 * width, width), f"{prefix}.mlp.c_fc.bias": (4 * width,),
            f"{prefix}.mlp.c_proj.weight": (width, 4 * width), f"{prefix}.mlp.c_proj.bias": (width,),
            **_norm(f"{prefix}.ln_2", width)}


def release_layout(cfg: ReleaseConfig) -> dict[str, Shape]:
    """Every key of a release's ``model`` state dict with its shape."""
    C, E, W = cfg.vision_width, cfg.embed_dim, cfg.text_width
    out: dict[str, Shape] = {
        "positional_embedding": (cfg.context_length, W),
        "text_projection": (W, E),
        "logit_scale": (),
        "prompts_visual_proj": (C, E),
        "prompts_generator.alpha": (E,),
        **_norm("prompts_generator.norm", E),
    }
    for j in range(cfg.prompt_layers):
        p = f"prompts_generator.decoder.{j}"
        out.update({f"{p}.cross_attn.{n}_proj.weight": (E, E) for n in ("q", "k", "v")})
        out.update({f"{p}.cross_attn.proj.weight": (E, E), f"{p}.cross_attn.proj.bias": (E,),
                    **_norm(f"{p}.norm1", E), **_norm(f"{p}.norm3", E),
                    f"{p}.mlp.0.weight": (4 * E, E), f"{p}.mlp.0.bias": (4 * E,),
                    f"{p}.mlp.3.weight": (E, 4 * E), f"{p}.mlp.3.bias": (E,)})
    out["mit.positional_embedding"] = (1, cfg.frames, E)
    for i in range(cfg.mit_layers):
        out.update(_residual_block(f"mit.resblocks.{i}", E))
    out.update({"visual.class_embedding": (C,), "visual.positional_embedding": (cfg.tokens, C),
                "visual.proj": (C, E), "visual.conv1.weight": (C, 3, cfg.patch_size, cfg.patch_size),
                **_norm("visual.ln_pre", C)})
    for i in range(cfg.vision_layers):
        p = f"visual.transformer.resblocks.{i}"
        out.update({f"{p}.message_fc.weight": (C, C), f"{p}.message_fc.bias": (C,),
                    **_norm(f"{p}.message_ln", C), **_attention(f"{p}.message_attn", C),
                    **_residual_block(p, C)})
    out.update(_norm("visual.ln_post", C))
    for i in range(cfg.text_layers):
        out.update(_residual_block(f"transformer.resblocks.{i}", W))
    out["token_embedding.weight"] = (cfg.vocab_size, W)
    out.update(_norm("ln_final", W))
    out.update(_norm("prompts_visual_ln", C))
    return out


def _count(sd: dict[str, Any], pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in sd if (m := rx.fullmatch(k))})


def _shape(sd: dict[str, torch.Tensor], key: str, source: str, what: str) -> Shape:
    if key not in sd:
        raise UserError(f"{source} has no {key} ({what}), so it is not a released X-CLIP model; "
                        f"pass an X-CLIP .pth (microsoft/VideoX, X-CLIP model zoo) or its state dict")
    return tuple(sd[key].shape)


def infer_config(sd: dict[str, torch.Tensor], source: str) -> ReleaseConfig:
    """The model's sizes from the shapes of a release state dict; refuses what is not an X-CLIP release."""
    if "visual.conv1.weight" in sd and "visual.transformer.resblocks.0.message_fc.weight" not in sd:
        raise UserError(f"{source} is a CLIP ViT without X-CLIP's message tokens (no visual.transformer.resblocks.0."
                        f"message_fc.weight); for plain CLIP zero-shot use `predict --zero-shot --weights {source}`")
    conv = _shape(sd, "visual.conv1.weight", source, "the patch embedding")
    pos = _shape(sd, "visual.positional_embedding", source, "the image position embedding")
    mit_pos = _shape(sd, "mit.positional_embedding", source, "MIT's frame position embedding")
    proj = _shape(sd, "text_projection", source, "the text projection; X-CLIP releases carry CLIP's text tower")
    text_pos = _shape(sd, "positional_embedding", source, "the text position embedding")
    vocab = _shape(sd, "token_embedding.weight", source, "the token embedding")
    _shape(sd, "prompts_generator.alpha", source, "the prompt generator")
    grid = round((pos[0] - 1) ** 0.5)
    if len(conv) != 4 or len(mit_pos) != 3 or grid * grid + 1 != pos[0]:
        raise UserError(f"{source}: visual.conv1.weight {conv}, visual.positional_embedding {pos} and "
                        f"mit.positional_embedding {mit_pos} do not describe a square-grid X-CLIP ViT")
    cfg = ReleaseConfig(
        frames=int(mit_pos[1]), image_size=int(conv[-1]) * grid, patch_size=int(conv[-1]), vision_width=int(conv[0]),
        vision_layers=_count(sd, r"visual\.transformer\.resblocks\.(\d+)\.attn\.in_proj_weight"),
        embed_dim=int(proj[1]), mit_layers=_count(sd, r"mit\.resblocks\.(\d+)\.attn\.in_proj_weight"),
        prompt_layers=_count(sd, r"prompts_generator\.decoder\.(\d+)\.cross_attn\.q_proj\.weight"),
        context_length=int(text_pos[0]), vocab_size=int(vocab[0]), text_width=int(vocab[1]),
        text_layers=_count(sd, r"transformer\.resblocks\.(\d+)\.attn\.in_proj_weight"),
    )
    odd = {n: w for n, w in (("vision width", cfg.vision_width), ("text width", cfg.text_width),
                             ("embed dim", cfg.embed_dim)) if w < 64 or w % 64}
    if odd:
        raise UserError(f"{source}: {', '.join(f'{n} {w}' for n, w in odd.items())} is not a multiple of 64, and "
                        f"X-CLIP's head count is width // 64; this file is not an X-CLIP release")
    return cfg


def check_layout(sd: dict[str, torch.Tensor], cfg: ReleaseConfig, source: str) -> None:
    """Refuse a state dict whose keys or shapes differ from the release layout of ``cfg``."""
    want = release_layout(cfg)
    missing = [k for k in want if k not in sd]
    extra = [k for k in sd if k not in want]
    wrong = [f"{k} {tuple(sd[k].shape)} (expected {want[k]})" for k in want if k in sd and tuple(sd[k].shape) != want[k]]
    if missing or extra or wrong:
        parts = ([f"missing {missing[:3]}"] if missing else []) + ([f"unexpected {extra[:3]}"] if extra else []) + \
                ([f"wrong shapes {wrong[:3]}"] if wrong else [])
        raise UserError(f"{source} does not have the layout of an X-CLIP release ({'; '.join(parts)}); "
                        f"pass an unmodified X-CLIP checkpoint")


# yacs' CfgNode (the ``config`` entry of X-CLIP's saved files) is read as a plain OrderedDict: the
# restricted (weights-only) unpickler fills it with the node's items and attributes and runs no
# code. The config is never used; yacs is neither needed nor trusted here.
_STAND_INS = [(OrderedDict, "yacs.config.CfgNode")]


def _unwrap(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    for key in ("model", "state_dict", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{path} holds no state dict of tensors (X-CLIP releases keep it under 'model'); "
                        f"check the file")
    return {str(k).removeprefix("module."): v for k, v in obj.items()}


def read_release(path: str | Path, trust_torchscript: bool = False) -> tuple[dict[str, torch.Tensor], str]:
    """(state dict, file sha256) of a released X-CLIP checkpoint, without running code from it.

    A ``.pth`` is read with ``torch.load(weights_only=True)``; the yacs config inside X-CLIP's
    saved files is replaced by an inert dict. safetensors and TorchScript files go through the
    backbone's reader, with its trust rule for TorchScript (code).
    """
    from evl_cache import backbone

    path = Path(path)
    if not path.is_file():
        raise UserError(f"X-CLIP release file {path} not found; pass a downloaded X-CLIP checkpoint (.pth or .safetensors)")
    if path.suffix == ".safetensors" or backbone.is_torchscript_archive(path):
        sd, digest = backbone._read_state_dict(path, trust_torchscript)
        return _unwrap(sd, path), digest
    try:
        with torch.serialization.safe_globals(_STAND_INS):
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure means the file cannot be read safely
        unsafe = []
        try:
            unsafe = [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
                      if g != "yacs.config.CfgNode"]
        except Exception:  # noqa: BLE001 - not a zip checkpoint at all
            pass
        if unsafe:
            raise UserError(f"{path} needs code to unpickle ({', '.join(unsafe[:3])}), which a weights-only load refuses; "
                            f"save its 'model' state dict alone (or as safetensors) and pass that") from None
        raise UserError(f"{path} is not a readable torch checkpoint ({err.__class__.__name__}); check the file") from None
    return _unwrap(obj, path), backbone.file_sha256(path)
