"""The frozen CLIP image tower, run per frame, returning what the EVL decoder reads.

Built through open_clip's own config path (named architectures or a model-config JSON), so any ViT
open_clip can build works. The wrapper calls open_clip's blocks unchanged for the block outputs;
for the captured blocks it additionally projects LN1(input) with the block's own in-projection to
get q and k, which is exactly what that block's self-attention computes (docs/reference.md).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from evl_cache.errors import UserError
from evl_cache.known_weights import known_release

ATTENTION_MODES = ("maps", "qk", "none")


@dataclass
class BackboneSpec:
    """How to build the frozen image tower: architecture, weights and numeric precision.

    arch: an open_clip model name (``ViT-B-16``, ``ViT-L-14``, ``ViT-L-14-336``) or a path to an
        open_clip model-config JSON (``{"embed_dim": .., "vision_cfg": {..}}``) for small/custom ViTs.
    weights: a local file (``.safetensors``, open_clip/state-dict ``.pt``/``.bin``, or a TorchScript
        ``.pt`` that is a known OpenAI CLIP release or explicitly trusted), ``openclip:<tag>`` for
        weights already in open_clip's local cache, or ``random`` (an explicit choice, seeded by
        ``seed``; never a silent fallback).
    quick_gelu: None = resolve it (`resolve_quick_gelu`): from open_clip's pretrained config for
        ``openclip:<tag>``, on (OpenAI CLIP's activation) otherwise. True/False is the user's choice.
    precision: ``auto`` = fp16 on CUDA, fp32 on CPU; or ``fp32`` / ``fp16`` / ``bf16``.
    trust_torchscript: load a TorchScript archive that is not a known OpenAI release (it is code).
        A permission, not part of the weights' identity, so stores and checkpoints never record it.
    """

    arch: str
    weights: str
    seed: int = 0
    quick_gelu: bool | None = None
    precision: str = "auto"
    trust_torchscript: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BackboneSpec":
        keys = ("arch", "weights", "seed", "quick_gelu", "precision", "trust_torchscript")
        return cls(**{k: d[k] for k in keys if k in d})


def openclip_quick_gelu(arch: str, tag: str) -> bool:
    """Whether open_clip's pretrained weights ``arch``/``tag`` were trained with QuickGELU.

    Read from open_clip's pretrained config (no download): a listed tag says so itself (absent
    means GELU, as open_clip treats it); an unlisted one falls back to the model config's flag.
    """
    import open_clip

    pretrained = open_clip.get_pretrained_cfg(arch, tag)
    if pretrained:
        return bool(pretrained.get("quick_gelu", False))
    return bool(load_model_config(arch).get("quick_gelu", False))


def resolve_quick_gelu(spec: BackboneSpec) -> bool:
    """The activation the tower is built with: the user's explicit choice, else the weights' own."""
    if spec.quick_gelu is not None:
        return bool(spec.quick_gelu)
    if spec.weights.startswith("openclip:"):
        return openclip_quick_gelu(spec.arch, spec.weights.split(":", 1)[1])
    return True  # local files and random towers default to OpenAI CLIP's QuickGELU


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, streamed, so stores and checkpoints can pin the exact weights."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_model_config(arch: str) -> dict[str, Any]:
    """The open_clip model config for a name or a JSON file path."""
    import open_clip

    if arch.endswith(".json") or os.path.sep in arch:
        path = Path(arch)
        if not path.is_file():
            raise UserError(f"model config {arch} not found; pass an open_clip model name or an existing JSON file")
        try:
            cfg = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise UserError(f"model config {arch} is not valid JSON ({err}); fix the file") from err
    else:
        cfg = open_clip.get_model_config(arch)
        if cfg is None:
            names = ", ".join(n for n in open_clip.list_models() if n.startswith("ViT"))[:300]
            raise UserError(f"unknown architecture '{arch}'; use an open_clip ViT name ({names}, ...) or a config JSON path")
    if "vision_cfg" not in cfg or "embed_dim" not in cfg:
        raise UserError(f"model config {arch} has no 'vision_cfg'/'embed_dim'; use open_clip's model-config format")
    vision = cfg["vision_cfg"]
    if isinstance(vision.get("layers"), (list, tuple)) or vision.get("timm_model_name"):
        raise UserError(f"architecture {arch} is not a plain ViT; EVL needs open_clip's VisionTransformer")
    return cfg


PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    if precision == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision '{precision}'; use auto, fp32, fp16 or bf16")
    return PRECISIONS[precision]


def is_torchscript_archive(path: Path) -> bool:
    """True if ``path`` is a TorchScript archive, judged from the zip directory alone (nothing is
    unpickled or run): TorchScript zips carry ``<name>/code/`` and ``<name>/constants.pkl``, which a
    ``torch.save`` zip does not."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    for name in names:
        parts = name.split("/")
        if len(parts) >= 2 and (parts[1] == "code" or parts[1:] == ["constants.pkl"]):
            return True
    return False


def _read_torchscript(path: Path, trust: bool) -> tuple[dict[str, torch.Tensor], str]:
    """State dict and sha256 of a TorchScript archive, loaded only if trusted.

    The bytes are hashed and loaded from one in-memory copy, so the file that is run is exactly
    the file that was checked.
    """
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if not trust and known_release(digest) is None:
        raise UserError(
            f"weights file {path} is a TorchScript archive (code, not only weights) and its sha256 "
            f"{digest[:16]}... is not a known OpenAI CLIP release; pass --trust-torchscript if you trust "
            f"its source, or convert it to safetensors or a torch state dict"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        try:
            module = torch.jit.load(io.BytesIO(data), map_location="cpu")
        except (RuntimeError, ValueError) as err:
            raise UserError(f"weights file {path} is a damaged TorchScript archive ({err.__class__.__name__}); "
                            f"re-download it or convert it to safetensors") from err
    return module.state_dict(), digest


def _read_state_dict(path: Path, trust_torchscript: bool = False) -> tuple[dict[str, torch.Tensor], str]:
    """(tensors, file sha256) from a safetensors file, a torch state dict or a trusted TorchScript archive.

    safetensors and state dicts never run code (``weights_only=True``); a TorchScript archive does,
    so it is detected without loading and refused unless it is a known OpenAI CLIP release
    (`evl_cache.known_weights`) or ``trust_torchscript`` is set.
    """
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path)), file_sha256(path)
        except (SafetensorError, OSError, ValueError) as err:
            raise UserError(f"weights file {path} is not a readable safetensors file ({err}); check the path") from err
    if is_torchscript_archive(path):
        return _read_torchscript(path, trust_torchscript)
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure here means an unreadable file
        raise UserError(f"weights file {path} is not a safetensors, torch state-dict or TorchScript file ({err.__class__.__name__}); check the path") from err
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise UserError(f"weights file {path} holds no state dict; save `model.state_dict()` or use the OpenAI .pt file")
    return obj, file_sha256(path)


def _visual_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keep the image tower's tensors, with DDP and CLIP prefixes removed."""
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    if any(k.startswith("visual.") for k in sd):
        sd = {k.removeprefix("visual."): v for k, v in sd.items() if k.startswith("visual.")}
    return sd


def build_visual_tower(spec: BackboneSpec, device: torch.device | str = "cpu") -> tuple[nn.Module, str]:
    """Build open_clip's VisionTransformer for ``spec`` and load its weights.

    Returns the tower (eval mode, requires_grad off) and the weights' identity: the file sha256,
    ``openclip:<tag>`` or ``random:<seed>``.
    """
    import open_clip
    from open_clip.model import _build_vision_tower, convert_weights_to_lp

    device = torch.device(device)
    dtype = _resolve_dtype(spec.precision, device)
    cfg = load_model_config(spec.arch)
    cast = dtype if dtype != torch.float32 else None
    quick_gelu = resolve_quick_gelu(spec)
    if spec.weights == "random":
        torch.manual_seed(spec.seed)
        identity = f"random:{spec.seed}"
        visual = _build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"], quick_gelu=quick_gelu, cast_dtype=cast)
    elif spec.weights.startswith("openclip:"):
        tag = spec.weights.split(":", 1)[1]
        try:
            model = open_clip.create_model(spec.arch, pretrained=tag, force_quick_gelu=quick_gelu, device="cpu")
        except Exception as err:  # noqa: BLE001 - offline or unknown tag
            raise UserError(f"open_clip pretrained weights '{spec.arch}/{tag}' are not available locally ({err.__class__.__name__}); download them first or pass --weights FILE") from err
        visual = _build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"], quick_gelu=quick_gelu, cast_dtype=cast)
        visual.load_state_dict(model.visual.state_dict())
        identity = spec.weights
    else:
        path = Path(spec.weights)
        if not path.is_file():
            raise UserError(f"weights file {spec.weights} not found; pass a local CLIP checkpoint, openclip:<tag>, or 'random' explicitly")
        visual = _build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"], quick_gelu=quick_gelu, cast_dtype=cast)
        raw, identity = _read_state_dict(path, spec.trust_torchscript)
        sd = _visual_state_dict(raw)
        sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
        missing, unexpected = visual.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise UserError(
                f"weights file {path} does not fit architecture {spec.arch} "
                f"(missing {missing[:3]}, unexpected {unexpected[:3]}); pass the matching --arch"
            )
    if dtype != torch.float32:
        convert_weights_to_lp(visual, dtype)
    visual.to(device).eval().requires_grad_(False)
    return visual, identity


class FrozenCLIPBackbone(nn.Module):
    """Runs the image tower on every frame and captures the decoder's inputs for chosen blocks.

    forward(frames (B, T, 3, S, S) normalised) returns a dict:
      ``feats`` (B, K, T, L, C): outputs of the K captured blocks, CLS token at index 0;
      attention ``maps``: ``attn`` (B, K, 2, T-1, P, P): [.., 0, j] = A_prev of frame j+1,
      [.., 1, j] = A_next of frame j (softmax over patch keys of q.k/sqrt(D), head-averaged);
      attention ``qk``: ``q``, ``k`` (B, K, T, L, H, D), after the in-projection, unscaled;
      with ``emb``: ``emb`` (B, T, E), the per-frame CLIP image embedding ``ln_post(CLS) @ proj``
      (what open_clip's ``encode_image`` returns), for which every block runs, not only up to the
      last captured one. ``blocks=[]`` with ``emb`` captures no block: an emb-only store.
    """

    def __init__(self, visual: nn.Module, blocks: list[int] | None = None, attention: str = "maps",
                 spec: BackboneSpec | None = None, weights_id: str = "", emb: bool = False) -> None:
        super().__init__()
        if attention not in ATTENTION_MODES:
            raise UserError(f"unknown attention mode '{attention}'; use one of {', '.join(ATTENTION_MODES)}")
        self.visual = visual
        self.spec = spec
        self.weights_id = weights_id
        resblocks = visual.transformer.resblocks
        self.num_layers = len(resblocks)
        blocks = list(range(max(0, self.num_layers - 4), self.num_layers)) if blocks is None else [int(b) for b in blocks]
        blocks = [b + self.num_layers if b < 0 else b for b in blocks]
        self.emb = bool(emb)
        if self.emb:
            check_token_pooled(visual)
        if (not blocks and not self.emb) or any(b < 0 or b >= self.num_layers for b in blocks) or blocks != sorted(set(blocks)):
            raise UserError(f"blocks {blocks} invalid for a {self.num_layers}-block ViT; give increasing indices in 0..{self.num_layers - 1}")
        self.blocks = blocks
        self.attention = attention
        self.width = visual.transformer.width
        self.heads = resblocks[0].attn.num_heads
        self.head_dim = self.width // self.heads
        self.image_size = int(visual.image_size[0])
        self.patch_size = int(visual.patch_size[0])
        self.grid = (int(visual.grid_size[0]), int(visual.grid_size[1]))
        self.num_patches = self.grid[0] * self.grid[1]
        self.num_tokens = 1 + self.num_patches
        self.embed_dim = int(visual.proj.shape[1]) if getattr(visual, "proj", None) is not None else 0

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.conv1.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.visual.conv1.weight.device

    def describe(self) -> dict[str, Any]:
        """The facts a cache store records so training can refuse a mismatched store."""
        return {
            "arch": self.spec.arch if self.spec else "custom",
            "weights": self.spec.weights if self.spec else "",
            "weights_id": self.weights_id,
            "quick_gelu": resolve_quick_gelu(self.spec) if self.spec else True,
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "width": self.width,
            "heads": self.heads,
            "layers": self.num_layers,
            "grid": list(self.grid),
            "precision": {v: k for k, v in PRECISIONS.items()}[self.dtype],
        }

    def _qk(self, block: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q and k of ``block``'s self-attention for input x (N, L, C): in-projection of LN1(x)."""
        attn = block.attn
        c = self.width
        qk = F.linear(block.ln_1(x), attn.in_proj_weight[: 2 * c], attn.in_proj_bias[: 2 * c])
        n, length, _ = x.shape
        q, k = qk.view(n, length, 2, self.heads, self.head_dim).unbind(2)
        return q, k

    def adjacent_maps(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Head-averaged adjacent-frame attention over patch tokens: (B, T, L, H, D) -> (B, 2, T-1, P, P).

        The same function the decoder uses on cached q/k, so ``maps`` and ``qk`` stores agree exactly.
        """
        from evl_cache.tca import temporal_attention_maps

        return temporal_attention_maps(q, k)

    @torch.no_grad()
    def cls_attention(self, frames: torch.Tensor) -> torch.Tensor:
        """The last block's CLS-token attention, head-averaged, over all L tokens: frames (B, T, 3, S, S)
        -> (B, T, L) float32 (the CLS map the EVL paper's Figure 4 shows; `evl-cache explain`).

        Runs every block, whatever the captured ones, and takes q and k of the tower's last block as
        its self-attention computes them (`_qk`); `forward` is untouched.
        """
        b, t = frames.shape[:2]
        x = self.visual._embeds(frames.flatten(0, 1).to(device=self.device, dtype=self.dtype))
        resblocks = self.visual.transformer.resblocks
        for block in resblocks[:-1]:
            x = block(x)
        return cls_attention_from_qk(*self._qk(resblocks[-1], x)).view(b, t, -1)

    @torch.no_grad()
    def forward(self, frames: torch.Tensor) -> dict[str, torch.Tensor]:
        b, t = frames.shape[:2]
        x = frames.flatten(0, 1).to(device=self.device, dtype=self.dtype)
        return self.run_blocks(self.visual._embeds(x), b, t, start=0)

    @torch.no_grad()
    def prefix(self, frames: torch.Tensor) -> torch.Tensor:
        """The residual stream entering the first captured block, (B, T, L, C): all the prefix layout
        caches. Blocks from there on are recomputed in stage 2 (`forward_from`)."""
        b, t = frames.shape[:2]
        x = self.visual._embeds(frames.flatten(0, 1).to(device=self.device, dtype=self.dtype))
        for block in self.visual.transformer.resblocks[: self.blocks[0]]:
            x = block(x)
        return x.view(b, t, *x.shape[1:])

    @torch.no_grad()
    def prefix_outputs(self, frames: torch.Tensor) -> dict[str, torch.Tensor]:
        """What a prefix-layout store caches: ``prefix`` (B, T, L, C), plus ``emb`` (B, T, E) when
        asked for, computed by running the remaining blocks on the same stream."""
        prefix = self.prefix(frames)
        if not self.emb:
            return {"prefix": prefix}
        b, t = prefix.shape[:2]
        x = prefix.flatten(0, 1)
        for block in self.visual.transformer.resblocks[self.blocks[0]:]:
            x = block(x)
        return {"prefix": prefix, "emb": self.embed_tokens(x).view(b, t, -1)}

    def embed_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The last block's output (N, L, C) -> CLIP image embeddings (N, E): ``ln_post(CLS) @ proj``."""
        return self.visual.ln_post(x[:, 0]) @ self.visual.proj

    @torch.no_grad()
    def forward_from(self, prefix: torch.Tensor) -> dict[str, torch.Tensor]:
        """What `forward` returns, from the residual stream entering the first captured block (B, T, L, C)."""
        b, t = prefix.shape[:2]
        x = prefix.flatten(0, 1).to(device=self.device, dtype=self.dtype)
        return self.run_blocks(x, b, t, start=self.blocks[0])

    def run_blocks(self, x: torch.Tensor, b: int, t: int, start: int) -> dict[str, torch.Tensor]:
        """Run blocks ``start`` .. the last captured one (the last block with ``emb``) on x (B*T, L, C),
        capturing feats and attention."""
        capture = set(self.blocks)
        feats, qs, ks, maps = [], [], [], []
        stop = self.num_layers if self.emb else self.blocks[-1] + 1
        for i in range(start, stop):
            block = self.visual.transformer.resblocks[i]
            if i in capture and self.attention != "none":
                q, k = self._qk(block, x)
                q = q.view(b, t, *q.shape[1:])
                k = k.view(b, t, *k.shape[1:])
                if self.attention == "qk":
                    qs.append(q)
                    ks.append(k)
                else:
                    maps.append(self.adjacent_maps(q, k))
            x = block(x)
            if i in capture:
                feats.append(x.view(b, t, *x.shape[1:]))
        out = {"feats": torch.stack(feats, dim=1)} if feats else {}
        if self.emb:
            out["emb"] = self.embed_tokens(x).view(b, t, -1)
        if not feats:
            return out
        if self.attention == "qk":
            out["q"] = torch.stack(qs, dim=1)
            out["k"] = torch.stack(ks, dim=1)
        elif self.attention == "maps":
            out["attn"] = torch.stack(maps, dim=1)
        return out


def cls_attention_from_qk(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """q, k (..., L, H, D) of one block -> (..., L) float32: softmax over keys of the CLS query's
    q.k/sqrt(D) per head, then the mean over heads (CLS key included, so each row sums to 1)."""
    d = q.shape[-1]
    logits = torch.einsum("...hd,...lhd->...hl", q[..., 0, :, :].float(), k.float()) / d ** 0.5
    return logits.softmax(-1).mean(-2)


def check_token_pooled(visual: nn.Module) -> None:
    """Refuse towers whose image embedding is not ``ln_post(CLS) @ proj`` (attention or mean pooling, no projection)."""
    if getattr(visual, "attn_pool", None) is not None or getattr(visual, "pool_type", "tok") != "tok":
        raise UserError("this image tower pools with attention or a token mean, not the CLS token; "
                        "per-frame embeddings (emb) need a CLIP ViT that pools its CLS token")
    if getattr(visual, "proj", None) is None:
        raise UserError("this image tower has no output projection, so it has no CLIP embedding space; use a CLIP checkpoint")


def build_backbone(spec: BackboneSpec, blocks: list[int] | None = None, attention: str = "maps",
                   device: torch.device | str = "cpu", emb: bool = False) -> FrozenCLIPBackbone:
    """Build the frozen backbone wrapper from a spec (the library entry point used by extract and predict)."""
    visual, identity = build_visual_tower(spec, device)
    return FrozenCLIPBackbone(visual, blocks=blocks, attention=attention, spec=spec, weights_id=identity, emb=emb)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(name: str | None) -> torch.device:
    """A user's --device (auto/None, cpu, cuda[:N]) as a torch device, refusing CUDA where there is none."""
    if name in (None, "", "auto"):
        return default_device()
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device '{name}'; use auto, cpu or cuda[:N]") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name} requested but CUDA is not available; use --device cpu")
    return dev
