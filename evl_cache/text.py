"""CLIP's text tower and class-name embeddings for zero-shot classification (docs/zero-shot.md).

The tower comes from the same sources as the image tower (`evl_cache.backbone`): an open_clip
model name or model-config JSON for the architecture, and a local weights file (read by the
backbone's own reader, so its trust rules for TorchScript archives apply here too),
``openclip:<tag>`` or ``random``. It is open_clip's own ``TextTransformer``, built by open_clip's
``_build_text_tower``, so its numerics are open_clip's ``CLIP.encode_text``.

Class embeddings follow CLIP's prompt-ensemble recipe: every (class, template) prompt is encoded
and L2-normalised, the template embeddings of a class are averaged, and the mean is normalised
again. They are computed once per identity (weights, architecture, precision, tokenizer, class
list, templates) and kept on disk beside that identity, so a second run loads instead of
re-encoding, and any difference in identity re-encodes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from evl_cache import backbone
from evl_cache.backbone import BackboneSpec, file_sha256, load_model_config
from evl_cache.errors import UserError
from evl_cache.templates import format_prompts, validate_class_names

Tokenizer = Callable[[list[str]], torch.Tensor]

# Top-level keys of the text tower in open_clip's CLIP layout and in OpenAI's released files; open_clip's
# CustomTextCLIP keeps the same names under ``text.``.
_TEXT_KEYS = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")
CACHE_FORMAT = 1


def _quick_gelu(spec: BackboneSpec) -> bool:
    """The activation the image tower is built with, so both towers agree on it."""
    resolve = getattr(backbone, "resolve_quick_gelu", None)  # present once the trust/QuickGELU change is merged
    return bool(resolve(spec)) if resolve is not None else bool(spec.quick_gelu)


def _read_weights(path: Path, spec: BackboneSpec) -> tuple[dict[str, torch.Tensor], str]:
    """(tensors, file sha256) through the backbone's reader, inheriting its TorchScript trust rule."""
    trust = getattr(spec, "trust_torchscript", None)
    out = backbone._read_state_dict(path, trust) if trust is not None else backbone._read_state_dict(path)
    if isinstance(out, tuple):
        return out
    return out, file_sha256(path)


def text_state_dict(sd: dict[str, torch.Tensor], source: str) -> tuple[dict[str, torch.Tensor], float | None]:
    """The text tower's tensors (TextTransformer names) and the raw ``logit_scale`` of a full CLIP state dict.

    Refuses a file without a text tower, such as an image-tower-only checkpoint: its top-level
    ``transformer.*`` keys belong to the image tower, so ``token_embedding.weight`` decides.
    """
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    if "text.token_embedding.weight" in sd:
        text = {k.removeprefix("text."): v for k, v in sd.items() if k.startswith("text.")}
    elif "token_embedding.weight" in sd:
        text = {k: v for k, v in sd.items() if k.startswith(_TEXT_KEYS)}
    else:
        raise UserError(
            f"weights {source} hold no text tower (no token_embedding.weight; it looks like an image-tower-only "
            f"checkpoint); zero-shot needs a full CLIP checkpoint with both towers"
        )
    scale = sd.get("logit_scale")
    return {k: v.float() if v.is_floating_point() else v for k, v in text.items()}, (
        float(scale.float().reshape(-1)[0]) if scale is not None else None
    )


def _config_digest(cfg: dict[str, Any]) -> str:
    """sha256 of what shapes the text embeddings in a model config (embed_dim and text_cfg)."""
    part = {"embed_dim": cfg["embed_dim"], "text_cfg": cfg["text_cfg"]}
    return hashlib.sha256(json.dumps(part, sort_keys=True).encode()).hexdigest()


def _text_cfg(arch: str) -> dict[str, Any]:
    cfg = load_model_config(arch)
    text_cfg = cfg.get("text_cfg")
    if not isinstance(text_cfg, dict):
        raise UserError(f"model config {arch} has no 'text_cfg'; zero-shot needs a CLIP config with a text tower")
    if text_cfg.get("hf_model_name"):
        raise UserError(f"architecture {arch} uses a Hugging Face text encoder ({text_cfg['hf_model_name']}); "
                        f"only CLIP's own text transformer is supported")
    return cfg


def default_tokenizer(arch: str, cfg: dict[str, Any]) -> tuple[Tokenizer, str]:
    """open_clip's tokenizer for ``cfg`` and a string naming it for the cache identity.

    CLIP's BPE tokenizer ships inside open_clip (``bpe_simple_vocab_16e6.txt.gz``), so it works
    offline; a config naming a Hugging Face tokenizer needs it in the local HF cache.
    """
    from open_clip.tokenizer import HFTokenizer, SimpleTokenizer

    text_cfg = cfg["text_cfg"]
    context = int(text_cfg.get("context_length", 77))
    kwargs = dict(text_cfg.get("tokenizer_kwargs") or {})
    hf_name = text_cfg.get("hf_tokenizer_name")
    if not hf_name:
        return SimpleTokenizer(context_length=context, **kwargs), default_tokenizer_id(cfg)
    try:
        tok = HFTokenizer(hf_name, context_length=context, tokenizer_mode=text_cfg.get("tokenizer_mode"), **kwargs)
    except Exception as err:  # noqa: BLE001 - offline or unknown tokenizer
        raise UserError(f"tokenizer '{hf_name}' of architecture {arch} is not available locally ({err.__class__.__name__}); "
                        f"put it in the Hugging Face cache first") from err
    return tok, default_tokenizer_id(cfg)


def default_tokenizer_id(cfg: dict[str, Any]) -> str:
    """Names `default_tokenizer`'s choice for ``cfg`` without loading it (for cache identities)."""
    text_cfg = cfg["text_cfg"]
    context = int(text_cfg.get("context_length", 77))
    kwargs = json.dumps(dict(text_cfg.get("tokenizer_kwargs") or {}), sort_keys=True)
    hf_name = text_cfg.get("hf_tokenizer_name")
    return f"hf:{hf_name}:ctx={context}:{kwargs}" if hf_name else f"clip-bpe:ctx={context}:{kwargs}"


class TextTower(nn.Module):
    """open_clip's text transformer with its tokenizer, the model's logit scale and its identity.

    ``encode_calls`` counts forward passes, so callers (and tests) can tell a cache hit from a
    recomputation without timing.
    """

    def __init__(self, text: nn.Module, tokenizer: Tokenizer, tokenizer_id: str, logit_scale: float,
                 identity: dict[str, Any]) -> None:
        super().__init__()
        self.text = text
        self.tokenizer = tokenizer
        self.tokenizer_id = tokenizer_id
        self.logit_scale = float(logit_scale)
        self._identity = dict(identity, tokenizer=tokenizer_id)
        self.encode_calls = 0

    @property
    def vocab_size(self) -> int:
        return int(self.text.vocab_size)

    @property
    def embed_dim(self) -> int:
        proj = self.text.text_projection
        if proj is None:
            return int(self.text.width)
        return int(proj.out_features if isinstance(proj, nn.Linear) else proj.shape[1])

    @property
    def device(self) -> torch.device:
        return self.text.token_embedding.weight.device

    def identity(self) -> dict[str, Any]:
        """What the text embeddings depend on, besides the prompts (see `text_identity`)."""
        return dict(self._identity)

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Token ids (N, context_length), refused if the tokenizer's ids do not fit the tower's vocabulary."""
        tokens = self.tokenizer(list(texts))
        if tokens.numel() and int(tokens.max()) >= self.vocab_size:
            raise UserError(
                f"the text tower has a {self.vocab_size}-token vocabulary but its tokenizer ({self.tokenizer_id}) "
                f"emits id {int(tokens.max())}; use a config whose text_cfg.vocab_size fits the tokenizer "
                f"(49408 for CLIP's BPE) or pass a tokenizer made for this tower"
            )
        return tokens

    def _pooled_positions(self, tokens: torch.Tensor) -> torch.Tensor | None:
        """Where open_clip's pooling reads each row, when only earlier tokens can reach it, else None.

        With the causal mask, no class token and argmax/eos pooling, the pooled token sees only the
        tokens up to itself; everything after it (padding, mostly) can be cut without changing it.
        """
        text = self.text
        if text.cls_emb is not None or text.attn_mask is None or getattr(text, "use_pad_mask", False):
            return None
        if text.pool_type == "argmax":
            return tokens.argmax(dim=-1)
        if text.pool_type == "eos":
            return (tokens == text.eos_id).int().argmax(dim=-1)
        return None

    @torch.no_grad()
    def encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Unnormalised text embeddings (N, E) in float32: open_clip's ``CLIP.encode_text``.

        Runs only up to the last pooled position of the batch where that is exact (see
        `_pooled_positions`): CLIP prompts use ~10 of 77 positions, so this is several times faster.
        """
        from open_clip.transformer import text_global_pool

        self.encode_calls += 1
        tokens = tokens.to(self.device)
        text = self.text
        positions = self._pooled_positions(tokens)
        if positions is None:
            return text(tokens).float()
        length = int(positions.max()) + 1
        tokens = tokens[:, :length]
        x, _ = text._embeds(tokens)
        x = text.transformer(x, attn_mask=text.attn_mask[:length, :length])
        x = text_global_pool(text.ln_final(x), tokens, text.pool_type, eos_token_id=text.eos_id)
        proj = text.text_projection
        if proj is not None:
            x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
        return x.float()

    def encode(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """Unnormalised embeddings (N, E) of ``texts``, in batches to bound memory."""
        chunks = [self.encode_tokens(self.tokenize(texts[i:i + batch_size])) for i in range(0, len(texts), batch_size)]
        return torch.cat(chunks) if chunks else torch.zeros(0, self.embed_dim)


def _weights_id(spec: BackboneSpec) -> str:
    if spec.weights == "random":
        return f"random:{spec.seed}"
    if spec.weights.startswith("openclip:"):
        return spec.weights
    path = Path(spec.weights)
    if not path.is_file():
        raise UserError(f"weights file {spec.weights} not found; pass a local CLIP checkpoint, openclip:<tag>, or 'random' explicitly")
    return file_sha256(path)


def text_identity(spec: BackboneSpec, device: torch.device | str = "cpu", tokenizer_id: str | None = None) -> dict[str, Any]:
    """The identity of the text tower ``spec`` builds, computed without building it.

    Weights (file sha256, ``openclip:<tag>`` or ``random:<seed>``), the text config's digest, the
    activation, the numeric precision and the tokenizer: everything but the prompts that the
    embeddings depend on.
    """
    cfg = _text_cfg(spec.arch)
    dtype = backbone._resolve_dtype(spec.precision, torch.device(device))
    if tokenizer_id is None:
        tokenizer_id = default_tokenizer_id(cfg)
    return {
        "weights_id": _weights_id(spec),
        "text_config_sha256": _config_digest(cfg),
        "quick_gelu": _quick_gelu(spec),
        "dtype": str(dtype).removeprefix("torch."),
        "tokenizer": tokenizer_id,
    }


def build_text_tower(spec: BackboneSpec, device: torch.device | str = "cpu",
                     tokenizer: Tokenizer | None = None, tokenizer_id: str | None = None) -> TextTower:
    """Build open_clip's text tower for ``spec``, load its weights and the model's logit scale.

    ``tokenizer`` overrides open_clip's tokenizer for the config (a tower with a small vocabulary
    needs its own); it must come with a ``tokenizer_id`` that names it in cache identities.
    """
    import open_clip
    from open_clip.model import _build_text_tower, convert_weights_to_lp

    if tokenizer is not None and not tokenizer_id:
        raise UserError("a custom tokenizer needs a tokenizer_id naming it, so cached embeddings are not mixed up")
    device = torch.device(device)
    dtype = backbone._resolve_dtype(spec.precision, device)
    cfg = _text_cfg(spec.arch)
    quick_gelu = _quick_gelu(spec)
    cast = dtype if dtype != torch.float32 else None
    default_scale = float(cfg.get("init_logit_scale", math.log(1 / 0.07)))
    if spec.weights == "random":
        torch.manual_seed(spec.seed)
        text = _build_text_tower(cfg["embed_dim"], cfg["text_cfg"], quick_gelu=quick_gelu, cast_dtype=cast)
        raw_scale: float | None = default_scale
        weights_id = f"random:{spec.seed}"
    else:
        if spec.weights.startswith("openclip:"):
            tag = spec.weights.split(":", 1)[1]
            try:
                model = open_clip.create_model(spec.arch, pretrained=tag, force_quick_gelu=quick_gelu, device="cpu")
            except Exception as err:  # noqa: BLE001 - offline or unknown tag
                raise UserError(f"open_clip pretrained weights '{spec.arch}/{tag}' are not available locally ({err.__class__.__name__}); "
                                f"download them first or pass --weights FILE") from err
            sd, weights_id = model.state_dict(), spec.weights
        else:
            path = Path(spec.weights)
            if not path.is_file():
                raise UserError(f"weights file {spec.weights} not found; pass a local CLIP checkpoint, openclip:<tag>, or 'random' explicitly")
            sd, weights_id = _read_weights(path, spec)
        text_sd, raw_scale = text_state_dict(sd, spec.weights)
        text = _build_text_tower(cfg["embed_dim"], cfg["text_cfg"], quick_gelu=quick_gelu, cast_dtype=cast)
        try:
            missing, unexpected = text.load_state_dict(text_sd, strict=False)
        except RuntimeError as err:  # shape mismatch
            raise UserError(f"text tower in {spec.weights} does not fit architecture {spec.arch} ({str(err).splitlines()[-1].strip()}); "
                            f"pass the matching --arch") from err
        if missing or unexpected:
            raise UserError(f"text tower in {spec.weights} does not fit architecture {spec.arch} "
                            f"(missing {missing[:3]}, unexpected {unexpected[:3]}); pass the matching --arch")
        if raw_scale is None:
            raise UserError(f"weights {spec.weights} have no logit_scale; zero-shot needs the CLIP model's temperature")
    if dtype != torch.float32:
        convert_weights_to_lp(text, dtype)
    text.to(device).eval().requires_grad_(False)
    if tokenizer is None:
        tokenizer, tokenizer_id = default_tokenizer(spec.arch, cfg)
    identity = {
        "weights_id": weights_id,
        "text_config_sha256": _config_digest(cfg),
        "quick_gelu": quick_gelu,
        "dtype": str(dtype).removeprefix("torch."),
    }
    return TextTower(text, tokenizer, str(tokenizer_id), math.exp(raw_scale), identity)


def ensemble_embeddings(tower: TextTower, class_names: Sequence[str], templates: Sequence[str],
                        batch_size: int = 256) -> torch.Tensor:
    """(C, E) unit rows: per class, the mean of its normalised template embeddings, normalised again."""
    names = validate_class_names(class_names)
    prompts = format_prompts(names, templates)
    emb = F.normalize(tower.encode(prompts, batch_size=batch_size), dim=-1)
    emb = emb.view(len(names), len(templates), -1).mean(dim=1)
    return F.normalize(emb, dim=-1).cpu()


@dataclass
class ClassEmbeddings:
    """Text embeddings of a class list, with what they were computed from.

    emb: (C, E) float32, unit rows. logit_scale: exp of the CLIP model's learned temperature.
    identity: weights, config, precision, tokenizer, classes and templates; key: its sha256.
    source: ``computed`` or ``cache``; path: the cache file, if any.
    """

    emb: torch.Tensor
    logit_scale: float
    identity: dict[str, Any]
    key: str
    source: str
    path: Path | None = None


def embedding_identity(tower_identity: dict[str, Any], class_names: Sequence[str], templates: Sequence[str]) -> tuple[dict[str, Any], str]:
    """The full identity of a class-embedding table and its sha256 (canonical JSON)."""
    identity = {"format": CACHE_FORMAT, **tower_identity, "classes": list(class_names), "templates": list(templates)}
    return identity, hashlib.sha256(json.dumps(identity, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def _cache_paths(cache_dir: Path, key: str) -> tuple[Path, Path]:
    stem = f"text-emb-{key[:24]}"
    return cache_dir / f"{stem}.safetensors", cache_dir / f"{stem}.json"


def _load_cached(cache_dir: Path, identity: dict[str, Any], key: str) -> ClassEmbeddings | None:
    """The cached table if its JSON names exactly this identity and its tensor file is the one recorded."""
    from safetensors.torch import load_file

    tensors, meta_path = _cache_paths(cache_dir, key)
    if not (tensors.is_file() and meta_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if meta.get("key") != key or meta.get("identity") != identity or meta.get("emb_sha256") != file_sha256(tensors):
        return None
    emb = load_file(str(tensors))["emb"]
    if list(emb.shape) != [len(identity["classes"]), meta.get("embed_dim")]:
        return None
    return ClassEmbeddings(emb, float(meta["logit_scale"]), identity, key, "cache", tensors)


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file in the same folder and rename, so no reader sees half a file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _store(cache_dir: Path, result: ClassEmbeddings) -> Path:
    """Tensor file first, then the JSON that vouches for it (the JSON is what makes an entry valid)."""
    from safetensors.torch import save_file

    cache_dir.mkdir(parents=True, exist_ok=True)
    tensors, meta_path = _cache_paths(cache_dir, result.key)
    _atomic_write(tensors, lambda p: save_file({"emb": result.emb.contiguous()}, str(p)))
    meta = {"key": result.key, "identity": result.identity, "logit_scale": result.logit_scale,
            "embed_dim": int(result.emb.shape[1]), "emb_sha256": file_sha256(tensors)}
    _atomic_write(meta_path, lambda p: p.write_text(json.dumps(meta, indent=1, ensure_ascii=False), encoding="utf-8"))
    return tensors


def class_text_embeddings(tower: TextTower | BackboneSpec, class_names: Sequence[str], templates: Sequence[str],
                          cache_dir: str | os.PathLike | None = None, device: torch.device | str = "cpu",
                          batch_size: int = 256) -> ClassEmbeddings:
    """Class embeddings (C, E) for zero-shot, loaded from ``cache_dir`` when its entry has this identity.

    ``tower`` may be a built `TextTower` or a `BackboneSpec`; with a spec, a cache hit never builds
    the tower. A miss, or an entry whose recorded identity or tensor checksum differs, encodes
    the prompts and (re)writes the entry.
    """
    names = validate_class_names(class_names)
    templates = list(templates)
    format_prompts(names[:1], templates)  # refuses bad templates before any work
    tower_id = tower.identity() if isinstance(tower, TextTower) else text_identity(tower, device)
    identity, key = embedding_identity(tower_id, names, templates)
    cache = Path(cache_dir) if cache_dir is not None else None
    if cache is not None:
        hit = _load_cached(cache, identity, key)
        if hit is not None:
            return hit
    built = tower if isinstance(tower, TextTower) else build_text_tower(tower, device)
    emb = ensemble_embeddings(built, names, templates, batch_size=batch_size)
    result = ClassEmbeddings(emb, built.logit_scale, identity, key, "computed")
    if cache is not None:
        result.path = _store(cache, result)
    return result
