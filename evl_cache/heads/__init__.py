"""Heads trained from a cache store, by name: ``model.head: evl | xclip | attentive_probe | linear``.

A small registry in the style of timm's: each head registers a `HeadSpec` that says which cached
tensors it reads (`NEEDS`), which ``model.*`` options are its own, how its config follows from a
store, and how its module is built. The training loop, evaluation, predict and checkpoints only
talk to this module, so they stay one code path for every head (docs/heads.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from evl_cache.errors import UserError

# ModelConfig keys that belong to one head only (None = unset); setting one for another head is refused.
HEAD_OPTIONS = ("mit_layers", "prompt_layers", "prompt_alpha", "text_templates", "text_weights", "linear_norm",
                "linear_init", "class_prompts")


def _layers(attrs: dict[str, Any]) -> int | None:
    layers = (attrs.get("backbone") or {}).get("layers")
    return int(layers) if layers is not None else None


def has_last_block(attrs: dict[str, Any]) -> bool:
    """Whether the store caches the ViT's last block (the tokens ``ln_post`` reads in CLIP)."""
    blocks = [int(b) for b in attrs.get("blocks") or []]
    layers = _layers(attrs)
    if not blocks:
        return False
    return layers is None or blocks[-1] in (layers - 1, -1)


def _last_block_fix(attrs: dict[str, Any], where: str) -> str:
    layers = _layers(attrs)
    last = layers - 1 if layers is not None else "N-1"
    return f"extract with the ViT's last block among the cached ones (e.g. --blocks {last}, or --decoder-layers K)"


def _emb_fix(attrs: dict[str, Any], where: str) -> str:
    if has_last_block(attrs):
        return f"add them with `evl-cache derive-emb {where}`, or extract with --emb"
    return "extract with --emb"


@dataclass(frozen=True)
class Need:
    """One cached tensor kind a head reads: its description, how a store shows it, the fix."""

    what: str
    present: Callable[[dict[str, Any]], bool]
    fix: Callable[[dict[str, Any], str], str]


NEEDS: dict[str, Need] = {
    "blocks": Need("block features (feats)", lambda a: bool(a.get("blocks")),
                   lambda a, w: "extract with --decoder-layers K (or --blocks i,j,...), not an emb-only store"),
    "last_block": Need("the last block's tokens (feats of the ViT's last block)", has_last_block, _last_block_fix),
    "emb": Need("per-frame embeddings (emb)", lambda a: bool(a.get("emb")), _emb_fix),
    "attention": Need("attention input (maps or q/k)", lambda a: a.get("attention", "none") != "none",
                      lambda a, w: "extract with --attention maps, or set model.temporal_cross_attention=false"),
}


def check_needs(head: str, needs: tuple[str, ...], attrs: dict[str, Any], where: str) -> None:
    """Refuse, in one line naming the extract flag that adds it, the first tensor ``needs`` lacks."""
    for key in needs:
        need = NEEDS[key]
        if not need.present(attrs):
            raise UserError(f"store {where} has no {need.what}, which the {head} head reads; {need.fix(attrs, where)}")


class HeadSpec:
    """What the registry knows of one head. Subclasses fill in the methods."""

    name = ""
    options: tuple[str, ...] = ()  # the HEAD_OPTIONS this head reads

    def needs(self, cfg: Any) -> tuple[str, ...]:
        """Cached tensor kinds (`NEEDS` keys) a model with ``cfg`` reads."""
        raise NotImplementedError

    def config_for_store(self, model: Any, attrs: dict[str, Any], where: str) -> Any:
        """The head's config from a ``ModelConfig`` and a store's attributes (refusing what does not fit)."""
        raise NotImplementedError

    def config_from_dict(self, d: dict[str, Any]) -> Any:
        raise NotImplementedError

    def build(self, cfg: Any, fresh: bool = True) -> nn.Module:
        """The module. ``fresh``: a new model (compute what is derived, e.g. text embeddings);
        otherwise the weights come from a checkpoint next."""
        raise NotImplementedError

    def backbone_outputs(self, cfg: Any, meta: dict[str, Any]) -> dict[str, Any]:
        """What the online backbone must produce for this head: blocks, attention mode, emb."""
        raise NotImplementedError


REGISTRY: dict[str, HeadSpec] = {}


def register_head(spec: HeadSpec) -> HeadSpec:
    if spec.name in REGISTRY:
        raise ValueError(f"head {spec.name!r} registered twice")
    REGISTRY[spec.name] = spec
    return spec


def head_names() -> list[str]:
    _load()
    return list(REGISTRY)


def get_head(name: str | None) -> HeadSpec:
    _load()
    name = name or "evl"
    if name not in REGISTRY:
        raise UserError(f"model.head={name!r} is not a known head; use one of {list(REGISTRY)}")
    return REGISTRY[name]


def head_of(cfg: Any) -> HeadSpec:
    """The spec of a built config (EVL's `DecoderConfig` has no head field)."""
    return get_head(getattr(cfg, "head", None) or "evl")


def check_options(model: Any, spec: HeadSpec) -> None:
    stray = [k for k in HEAD_OPTIONS if getattr(model, k, None) is not None and k not in spec.options]
    if stray:
        owners = {k: [n for n, s in REGISTRY.items() if k in s.options] for k in stray}
        raise UserError(f"model.{stray[0]} applies to the {' / '.join(owners[stray[0]])} head, not model.head={spec.name}; "
                        f"remove it or change model.head")
    evl_only = [k for k, off in (("layer_blocks", None), ("pool", "none")) if getattr(model, k, off) != off]
    if evl_only and spec.name != "evl":
        raise UserError(f"model.{evl_only[0]} applies to the evl head, not model.head={spec.name}; remove it or change model.head")


def head_config_for_store(model: Any, attrs: dict[str, Any], where: str) -> Any:
    """The config of ``model.head`` for a store: its needs checked first, before any batch is read."""
    spec = get_head(getattr(model, "head", None))
    check_options(model, spec)
    return spec.config_for_store(model, attrs, where)


def head_config_from_dict(d: dict[str, Any]) -> Any:
    """A checkpoint's ``decoder`` entry -> config (no ``head`` key: an EVL decoder)."""
    d = dict(d)
    return get_head(d.pop("head", None) or "evl").config_from_dict(d)


def build_head(cfg: Any, fresh: bool = True) -> nn.Module:
    """The model for ``cfg`` (what train, eval and predict call instead of naming a class)."""
    return head_of(cfg).build(cfg, fresh)


def check_store(cfg: Any, attrs: dict[str, Any], where: str) -> None:
    """Refuse a store lacking the tensors a built head reads (eval, validation)."""
    spec = head_of(cfg)
    check_needs(spec.name, spec.needs(cfg), attrs, where)


def backbone_outputs(cfg: Any, meta: dict[str, Any]) -> dict[str, Any]:
    return head_of(cfg).backbone_outputs(cfg, meta)


def expect(batch: dict[str, Any], key: str, head: str, fix: str) -> Any:
    """``batch[key]``, or one line saying the store does not hold what the head reads."""
    if key not in batch:
        raise UserError(f"the {head} head reads {key!r} but the batch has {sorted(batch)}; {fix}")
    return batch[key]


def _load() -> None:
    """Import the head modules (each registers itself; a second import is a no-op)."""
    from evl_cache.heads import evl, probes, xclip  # noqa: F401
