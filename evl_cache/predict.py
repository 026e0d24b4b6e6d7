"""Online inference on video files: decode -> eval views -> frozen backbone -> decoder, no cache.

Everything about the input pipeline comes from the checkpoint's meta (written by `train`): the
backbone (architecture, weights identity, QuickGELU, the precision its features were computed in),
the cached blocks and attention mode, the frame sampling and the evaluation view grid. The same
`build_views` and backbone wrapper as extraction are used, so a video's logits here equal those of
extract-then-decoder (up to the store's storage dtype). Video score = mean over views of softmax(logits).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from evl_cache.errors import UserError

VIDEO_EXTENSIONS = {".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv", ".3gp", ".ogv"}


@dataclass
class Prediction:
    path: str
    top: list[tuple[str, float]] = field(default_factory=list)
    probs: np.ndarray | None = None  # (classes,) mean of per-view softmax
    logits: torch.Tensor | None = None  # (views, classes)
    error: str | None = None


class Predictor:
    """A loaded checkpoint plus the frozen backbone it was trained on, ready to score videos."""

    def __init__(self, checkpoint: str | os.PathLike, weights: str | None = None, device: str | None = None,
                 force: bool = False, batch_size: int = 8, precision: str | None = None,
                 trust_torchscript: bool = False) -> None:
        """The checkpoint's json names the backbone weights; a local file is checked against the
        recorded sha256 before anything is read from it, and a TorchScript file must pass the same
        trust rule as in extraction (a known OpenAI release, or ``trust_torchscript``)."""
        from evl_cache.backbone import BackboneSpec, build_backbone, file_sha256, resolve_device
        from evl_cache.checkpoints import load_checkpoint
        from evl_cache.video import Sampling, ViewSet

        self.device = resolve_device(device)
        self.model, self.meta = load_checkpoint(checkpoint, device=self.device)
        meta = self.meta
        for key in ("backbone", "blocks", "sampling", "attention", "class_names"):
            if key not in meta:
                raise UserError(f"checkpoint {checkpoint} records no '{key}' (e.g. an imported release without "
                                f"backbone meta); predict needs a checkpoint written by `evl-cache train`")
        bb = meta["backbone"]
        recorded = str(bb.get("weights_id", ""))
        if recorded.startswith("random:"):
            source, seed = "random", int(recorded.split(":", 1)[1])
        else:
            source, seed = str(bb.get("weights", "")), 0
        if weights is not None:
            if not Path(weights).is_file():
                raise UserError(f"weights file {weights} not found; pass the CLIP weights the checkpoint was trained with")
            source = weights
        elif not (source == "random" or source.startswith("openclip:") or Path(source).is_file()):
            raise UserError(f"the checkpoint's backbone weights {source} are not on this machine; "
                            f"pass --weights FILE (sha256 {recorded[:12]}...)")
        local = source != "random" and not source.startswith("openclip:")
        actual = file_sha256(source) if local and not force else recorded
        if actual != recorded:
            raise UserError(f"weights {source} have sha256 {actual[:16]} but the checkpoint was trained on "
                            f"{recorded[:16]}; pass the matching --weights FILE (or --force to use these anyway)")
        spec = BackboneSpec(arch=bb["arch"], weights=source, seed=seed, quick_gelu=bool(bb.get("quick_gelu", True)),
                            precision=backbone_precision(bb, precision), trust_torchscript=trust_torchscript)
        from evl_cache.heads import backbone_outputs

        wants = backbone_outputs(self.model.cfg, meta)  # the blocks, attention and emb this head reads
        self.backbone = build_backbone(spec, blocks=wants["blocks"], attention=wants["attention"], device=self.device,
                                       emb=wants["emb"])
        self.precision = spec.precision
        if self.backbone.weights_id != recorded and not force:
            raise UserError(f"weights {source} have identity {self.backbone.weights_id[:16]} but the checkpoint was "
                            f"trained on {recorded[:16]}; pass the matching --weights FILE (or --force to use these anyway)")
        self.sampling = Sampling(**meta["sampling"])
        grid = meta.get("eval_views") or {}
        from evl_cache.video import default_eval_grid

        t, s = (grid["temporal"], grid["spatial"]) if grid else default_eval_grid(self.sampling)
        self.views = ViewSet("eval", count=t * s, temporal=t, spatial=s)
        self.size = int(bb["image_size"])
        self.min_frames = int(meta.get("min_frames", self.sampling.frames))
        self.class_names = list(meta["class_names"])
        self.batch_size = batch_size

    @torch.no_grad()
    def logits(self, views: torch.Tensor) -> torch.Tensor:
        """(V, T, 3, S, S) normalised views -> (V, classes) logits (backbone in chunks of batch_size views)."""
        parts: dict[str, list[torch.Tensor]] = {}
        for i in range(0, views.shape[0], self.batch_size):
            for k, v in self.backbone(views[i:i + self.batch_size]).items():
                parts.setdefault(k, []).append(v)
        batch = {k: torch.cat(v) for k, v in parts.items()}
        return self.model(batch).float()

    def __call__(self, path: str, topk: int = 5) -> Prediction:
        from evl_cache.video import VideoError, build_views

        try:
            views, _ = build_views(path, self.sampling, self.views, self.size, min_frames=self.min_frames)
        except VideoError as err:
            return Prediction(path=path, error=str(err))
        logits = self.logits(views).cpu()
        probs = logits.softmax(-1).mean(0).numpy()
        order = np.argsort(-probs, kind="stable")[:min(topk, len(probs))]
        return Prediction(path=path, top=[(self.class_names[c], float(probs[c])) for c in order], probs=probs, logits=logits)


class ZeroShotPredictor:
    """CLIP zero-shot on video files, no checkpoint and no cache: the same eval views, backbone
    wrapper (run to the last block for ``emb``) and scores as `evl-cache zeroshot` on a store
    extracted with the same settings (docs/zero-shot.md)."""

    def __init__(self, classes_file: str, spec: Any, sampling: Any, views: Any, templates: str | None = None,
                 device: str | None = None, text_cache: str | os.PathLike | None = None, batch_size: int = 8,
                 min_frames: int | None = None) -> None:
        from evl_cache.backbone import build_backbone, resolve_device
        from evl_cache.templates import read_class_names, resolve_templates
        from evl_cache.text import class_text_embeddings
        from evl_cache.zeroshot import DEFAULT_TEMPLATES, default_text_cache, with_flag

        self.class_names = with_flag("--classes", read_class_names, classes_file)
        self.templates, template_list = with_flag("--templates", resolve_templates, templates or DEFAULT_TEMPLATES)
        if views.kind != "eval":
            raise UserError(f"--views {views.kind}: zero-shot prediction scores the evaluation views; use eval or eval:TxS")
        self.device = resolve_device(device)
        self.backbone = with_flag("--weights", build_backbone, spec, blocks=[], attention="none", device=self.device, emb=True)
        cache = Path(text_cache) if text_cache is not None else default_text_cache()
        self.text = with_flag("--weights", class_text_embeddings, spec, self.class_names, template_list,
                              cache_dir=cache, device=self.device)
        self.sampling, self.views, self.batch_size = sampling, views, batch_size
        self.size = self.backbone.image_size
        self.min_frames = int(min_frames or sampling.frames)

    @torch.no_grad()
    def embeddings(self, views: torch.Tensor) -> torch.Tensor:
        """(V, T, 3, S, S) normalised views -> (V, T, E) per-frame embeddings, float32."""
        return torch.cat([self.backbone(views[i:i + self.batch_size])["emb"].float()
                          for i in range(0, views.shape[0], self.batch_size)])

    def __call__(self, path: str, topk: int = 5) -> Prediction:
        from evl_cache.video import VideoError, build_views
        from evl_cache.zeroshot import zero_shot_scores

        try:
            views, _ = build_views(path, self.sampling, self.views, self.size, min_frames=self.min_frames)
        except VideoError as err:
            return Prediction(path=path, error=str(err))
        emb = self.embeddings(views)
        probs = zero_shot_scores(emb[None], self.text.emb.to(emb.device), self.text.logit_scale)[0].cpu().numpy()
        order = np.argsort(-probs, kind="stable")[:min(topk, len(probs))]
        return Prediction(path=path, top=[(self.class_names[c], float(probs[c])) for c in order], probs=probs)


def predict_zero_shot(video_path_or_folder: str | os.PathLike, classes_file: str, spec: Any, sampling: Any, views: Any,
                      templates: str | None = None, device: str | None = None, topk: int = 5,
                      text_cache: str | os.PathLike | None = None, batch_size: int = 8) -> list[Prediction]:
    """Zero-shot top-k classes for a video or every video in a folder (undecodable ones get ``error``)."""
    videos = list_videos(video_path_or_folder)
    predictor = ZeroShotPredictor(classes_file, spec, sampling, views, templates, device, text_cache, batch_size)
    return [predictor(v, topk) for v in videos]


def backbone_precision(backbone: dict[str, Any], override: str | None) -> str:
    """The user's choice, else the precision the training store's features were computed in (the
    decoder saw those numerics), else ``auto`` for checkpoints that predate recording it."""
    if override is not None:
        return override
    return str(backbone.get("precision") or "auto")


def list_videos(path: str | os.PathLike) -> list[str]:
    """A video file, or every video file under a folder (sorted)."""
    p = Path(path)
    if p.is_file():
        return [str(p)]
    if p.is_dir():
        found = sorted(str(f) for f in p.rglob("*") if f.is_file() and f.suffix.lower() in VIDEO_EXTENSIONS)
        if not found:
            raise UserError(f"no video files ({', '.join(sorted(VIDEO_EXTENSIONS))}) under {p}")
        return found
    raise UserError(f"{p} not found; pass a video file or a folder of videos")


def predict(checkpoint: str | os.PathLike, video_path_or_folder: str | os.PathLike, weights_override: str | None = None,
            device: str | None = None, topk: int = 5, force: bool = False, batch_size: int = 8,
            precision: str | None = None, trust_torchscript: bool = False) -> list[Prediction]:
    """Top-k classes (mean softmax over the checkpoint's eval views) for a video or every video in a folder.

    A video that cannot be decoded gets a `Prediction` with ``error`` set; the others still run.
    """
    videos = list_videos(video_path_or_folder)
    predictor = Predictor(checkpoint, weights_override, device, force=force, batch_size=batch_size, precision=precision,
                          trust_torchscript=trust_torchscript)
    return [predictor(v, topk) for v in videos]


def render(predictions: list[Prediction], console: Any = None) -> None:
    """Print one rich table per video: rank, class, probability."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    for p in predictions:
        if p.error:
            console.print(f"[red]{p.path}: {p.error}[/red]")
            continue
        table = Table(title=p.path, title_justify="left")
        table.add_column("#", justify="right")
        table.add_column("class")
        table.add_column("probability", justify="right")
        for i, (name, prob) in enumerate(p.top, 1):
            table.add_row(str(i), name, f"{prob:.4f}")
        console.print(table)
