"""The EVL decoder (evl_cache.decoder) as a registered head: it reads the last K blocks' features
and, with temporal cross attention, the attention maps or q/k of those blocks."""

from __future__ import annotations

from typing import Any

from torch import nn

from evl_cache.heads import HeadSpec, check_needs, register_head


class EVLSpec(HeadSpec):
    name = "evl"

    def needs(self, cfg: Any) -> tuple[str, ...]:
        return ("blocks", "attention") if cfg.temporal_cross_attention else ("blocks",)

    def config_for_store(self, model: Any, attrs: dict[str, Any], where: str) -> Any:
        from evl_cache.config import evl_decoder_config

        check_needs(self.name, ("blocks",), attrs, where)  # an emb-only store, before its shapes are read
        return evl_decoder_config(model, attrs, where)  # refuses attention 'none' with TCA on, in its own words

    def config_from_dict(self, d: dict[str, Any]) -> Any:
        from evl_cache.decoder import DecoderConfig

        return DecoderConfig.from_dict(d)

    def build(self, cfg: Any, fresh: bool = True) -> nn.Module:
        from evl_cache.decoder import EVLDecoder

        return EVLDecoder(cfg)

    def backbone_outputs(self, cfg: Any, meta: dict[str, Any]) -> dict[str, Any]:
        attention = meta["attention"] if cfg.temporal_cross_attention else "none"
        return {"blocks": list(meta["blocks"]), "attention": attention, "emb": False}


register_head(EVLSpec())
