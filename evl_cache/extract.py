"""Stage 1: run the frozen backbone once per video and write a cache store, on Ray.

Per shard of S videos: one CPU task per video decodes and builds its views; a backbone actor (one
per GPU, or one CPU actor) turns the shard's views into tensors; one writer task writes the shard's
files whole; then the driver, the only writer of ``videos/*``, marks the shard's videos. A bounded
number of shards is in flight, so memory stays flat and decoding overlaps the backbone. A rerun of
the same command finds the pending shards from ``videos/status`` and redoes exactly those.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from evl_cache.backbone import BackboneSpec, build_backbone, default_device
from evl_cache.errors import UserError
from evl_cache.store import (
    DONE,
    FAILED,
    PENDING,
    CacheStore,
    comparable_attr,
    create_store,
    open_store,
    remove_partial_files,
    shards_of,
    tensor_shapes,
)
from evl_cache.video import Sampling, VideoError, ViewSet, build_views

# Attributes that must match for a rerun to resume into an existing store.
RESUME_KEYS = ("backbone", "blocks", "frames", "sampling", "views", "num_views", "attention", "dtype",
               "class_names", "manifest_sha256", "shard_size", "min_frames", "compressor")


@dataclass
class ExtractConfig:
    """Everything that decides the bytes of a store (plus how to run: Ray address, batch, in-flight)."""

    backbone: BackboneSpec
    sampling: Sampling = field(default_factory=Sampling)
    views: ViewSet = field(default_factory=ViewSet)
    blocks: list[int] | None = None
    attention: str = "maps"
    dtype: str = "float16"
    shard_size: int = 16
    batch_size: int = 8
    min_frames: int | None = None
    compressor: str | None = None
    ray_address: str | None = None
    num_cpus: int | None = None
    max_inflight_shards: int | None = None
    retry_failed: bool = False
    progress: bool = True

    @classmethod
    def from_settings(cls, settings: dict[str, Any]) -> "ExtractConfig":
        """Build from flat settings, as named by `evl-cache extract`'s flags and a recipe's ``extract``
        section (arch, weights, frames, stride, views, blocks or decoder_layers, ...); absent keys take
        the CLI's defaults. ``blocks`` may be a list or a comma-separated string."""
        g = {k: v for k, v in settings.items() if v is not None}
        if "weights" not in g:
            raise UserError("no --weights given; pass a local CLIP file, openclip:<tag>, or 'random' to use random weights on purpose")
        sampling = Sampling(g.get("sampling", "dense"), int(g.get("frames", 8)), int(g.get("stride", 16)))
        return cls(
            backbone=BackboneSpec(arch=g.get("arch", "ViT-B-16"), weights=str(g["weights"]), seed=int(g.get("seed", 0)),
                                  quick_gelu=g.get("quick_gelu"), precision=g.get("precision", "auto"), trust_torchscript=bool(g.get("trust_torchscript", False))),
            sampling=sampling,
            views=ViewSet.parse(g.get("views", "eval"), sampling, seed=int(g.get("view_seed", 0))),
            blocks=parse_blocks(g.get("blocks"), g.get("decoder_layers")),
            attention=g.get("attention", "maps"), dtype=g.get("dtype", "float16"),
            shard_size=int(g.get("shard_size", 16)), batch_size=int(g.get("batch_size", 8)),
            min_frames=g.get("min_frames"), compressor=g.get("compressor"), ray_address=g.get("ray_address"),
            num_cpus=g.get("num_cpus"), retry_failed=bool(g.get("retry_failed", False)),
        )


def parse_blocks(blocks: str | list[int] | None, decoder_layers: int | None) -> list[int] | None:
    """Block indices to cache: explicit (list or "8,9,10,11"), else the last ``decoder_layers``, else
    None (the backbone's default, the last 4)."""
    if isinstance(blocks, str) and blocks.strip():
        try:
            return [int(b) for b in blocks.split(",") if b.strip()]
        except ValueError:
            raise UserError(f"bad --blocks '{blocks}'; give comma-separated block indices, e.g. 8,9,10,11") from None
    if isinstance(blocks, (list, tuple)):
        return [int(b) for b in blocks]
    if decoder_layers:
        return list(range(-int(decoder_layers), 0))
    return None


@dataclass
class ExtractSummary:
    store: str
    total: int
    done: int
    failed: int
    skipped: int
    processed: int
    seconds: float
    clip_views_per_s: float
    bytes_on_disk: int
    failures: list[tuple[int, str, str]]
    first_shard_s: float = 0.0
    steady_clip_views_per_s: float = 0.0

    def lines(self) -> list[str]:
        out = [
            f"store {self.store}: {self.done}/{self.total} done, {self.failed} failed, "
            f"{self.skipped} already done before this run",
            f"processed {self.processed} videos in {self.seconds:.1f} s ({self.clip_views_per_s:.2f} clip-views/s; "
            f"first shard after {self.first_shard_s:.1f} s, then {self.steady_clip_views_per_s:.2f} clip-views/s), "
            f"{self.bytes_on_disk / 2**20:.1f} MiB on disk",
        ]
        for idx, path, err in self.failures[:50]:
            out.append(f"  failed #{idx} {path}: {err}")
        if len(self.failures) > 50:
            out.append(f"  ... and {len(self.failures) - 50} more (see `evl-cache inspect`)")
        return out


# ---------------------------------------------------------------------------------------------
# work units (run inside Ray workers; plain functions so they are testable without Ray)


def decode_video(path: str, key: str, sampling: Sampling, views: ViewSet, size: int, min_frames: int) -> tuple[np.ndarray | None, dict[str, Any]]:
    """Decode one video into its views, or a failure record; never raises for a bad video."""
    try:
        tensor, meta = build_views(path, sampling, views, size, key=key, min_frames=min_frames)
        return tensor.numpy(), {"status": DONE, "error": "", **meta}
    except VideoError as err:
        return None, {"status": FAILED, "error": str(err)}
    except Exception as err:  # noqa: BLE001 - a decoder bug on one file must not stop the run
        return None, {"status": FAILED, "error": f"unexpected {err.__class__.__name__}: {str(err)[:200]}"}


class BackboneRunner:
    """Holds one backbone and turns a shard's decoded views into the store's tensors."""

    def __init__(self, spec: dict[str, Any], blocks: list[int] | None, attention: str, dtype: str,
                 threads: int | None = None, device: str | None = None) -> None:
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.backbone = build_backbone(BackboneSpec.from_dict(spec), blocks=blocks, attention=attention,
                                       device=device or default_device())
        self.dtype = np.dtype(dtype)

    def compute(self, batch_size: int, shapes: dict[str, tuple[int, ...]], num_views: int,
                *decoded: tuple[np.ndarray | None, dict[str, Any]]) -> tuple[dict[str, np.ndarray], list[dict[str, Any]]]:
        """Run the backbone over every view of the shard's decoded videos, batch by batch.

        ``decoded`` arrive as top-level arguments so Ray hands them over already resolved.
        """
        import torch

        n = len(decoded)
        out = {name: np.zeros((n, num_views, *shape), dtype=self.dtype) for name, shape in shapes.items()}
        items = [(i, v) for i, (views, _) in enumerate(decoded) if views is not None for v in range(num_views)]
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            frames = torch.from_numpy(np.stack([decoded[i][0][v] for i, v in chunk]))
            result = self.backbone(frames)
            for kind, tensor in result.items():
                arr = tensor.float().cpu().numpy()
                for j, (i, v) in enumerate(chunk):
                    for kb, block in enumerate(self.backbone.blocks):
                        out[f"{kind}/{block}"][i, v] = arr[j, kb]
        return out, [meta for _, meta in decoded]


def write_shard(store_path: str, shard: int, payload: tuple[dict[str, np.ndarray], list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Write one shard's tensor files (the only writer of that shard); return the per-video records."""
    tensors, records = payload
    open_store(store_path, mode="r+").write_shard(shard, tensors)
    return records


# ---------------------------------------------------------------------------------------------
# the driver


def store_attributes(backbone_desc: dict[str, Any], blocks: list[int], cfg: ExtractConfig, class_names: list[str],
                     manifest_sha: str, manifest_meta: dict[str, Any]) -> dict[str, Any]:
    """The schema attributes a store records (no timestamps: reruns must write identical bytes)."""
    grid = backbone_desc["grid"]
    return {
        "backbone": backbone_desc,
        "blocks": blocks,
        "frames": cfg.sampling.frames,
        "tokens": 1 + grid[0] * grid[1],
        "width": backbone_desc["width"],
        "heads": backbone_desc["heads"],
        "grid": grid,
        "sampling": cfg.sampling.to_dict(),
        "views": cfg.views.to_dict(),
        "num_views": cfg.views.num_views,
        "attention": cfg.attention,
        "dtype": cfg.dtype,
        "min_frames": cfg.min_frames or cfg.sampling.frames,
        "compressor": cfg.compressor,
        "shard_size": cfg.shard_size,
        "class_names": list(class_names),
        "manifest_sha256": manifest_sha,
        "manifest": manifest_meta,
    }


def prepare_store(store_path: str, attrs: dict[str, Any], paths: list[str], labels: list[int], cfg: ExtractConfig) -> CacheStore:
    """Create the store, or reopen it for resuming if it was created by the same configuration."""
    if os.path.exists(store_path):
        store = open_store(store_path, mode="r+")
        for key in RESUME_KEYS:
            if comparable_attr(key, store.attrs.get(key)) != comparable_attr(key, attrs.get(key)):
                raise UserError(
                    f"store {store_path} exists but was created with a different {key} "
                    f"({store.attrs.get(key)!r} vs {attrs.get(key)!r}); pass a new --store path or delete the old store"
                )
        remove_partial_files(store_path)
        return store
    parent = os.path.dirname(os.path.abspath(store_path))
    os.makedirs(parent, exist_ok=True)
    return create_store(store_path, attrs, paths, labels, shard_size=cfg.shard_size, compressor=cfg.compressor)


def extract(manifest: Any, store_path: str, cfg: ExtractConfig) -> ExtractSummary:
    """Extract ``manifest`` (an `evl_cache.datasets.Manifest`) into the store at ``store_path``.

    Safe to rerun after any interruption: finished shards are kept, the rest are redone, and the
    final store is byte-identical to an uninterrupted run.
    """
    if len(manifest.paths) == 0:
        raise UserError("the manifest lists no videos; check --root/--annotations/--split")
    if cfg.dtype not in ("float16", "float32"):
        raise UserError(f"unknown --dtype '{cfg.dtype}'; use float16 or float32")
    probe = build_backbone(cfg.backbone, blocks=cfg.blocks, attention=cfg.attention, device="cpu")
    desc, blocks = probe.describe(), probe.blocks
    if cfg.attention == "maps" and cfg.sampling.frames < 2:
        raise UserError("attention maps need at least 2 frames; use --frames >= 2 or --attention none")
    del probe
    manifest_meta = {"name": getattr(manifest, "name", ""), "root": getattr(manifest, "root", "")}
    attrs = store_attributes(desc, blocks, cfg, manifest.class_names, manifest.sha256(), manifest_meta)
    store = prepare_store(store_path, attrs, list(manifest.paths), list(manifest.labels), cfg)
    status = store.status()
    todo_status = (PENDING, FAILED) if cfg.retry_failed else (PENDING,)
    skipped = int((status == DONE).sum())
    todo = [i for i in range(len(status)) if status[i] in todo_status]
    shards = shards_of(todo, cfg.shard_size)
    started = time.time()
    processed, first_at, first_count = _run_shards(store, store_path, manifest, shards, attrs, blocks, cfg)
    seconds = time.time() - started
    first_shard_s = first_at - started if first_at else 0.0
    steady_s = seconds - first_shard_s
    info = store.info()
    return ExtractSummary(
        store=store_path, total=info.num_videos, done=info.done, failed=info.failed, skipped=skipped,
        processed=processed, seconds=seconds,
        clip_views_per_s=(processed * store.num_views / seconds) if seconds > 0 else 0.0,
        bytes_on_disk=info.bytes_on_disk, failures=info.failures, first_shard_s=first_shard_s,
        steady_clip_views_per_s=((processed - first_count) * store.num_views / steady_s) if steady_s > 0 else 0.0,
    )


def _run_shards(store: CacheStore, store_path: str, manifest: Any, shards: dict[int, list[int]],
                attrs: dict[str, Any], blocks: list[int], cfg: ExtractConfig) -> tuple[int, float, int]:
    """Push shards through decode -> backbone -> write on Ray, marking each as it lands.

    Returns (videos processed, time the first shard landed, videos in that first shard), so the
    summary can separate the one-off start-up (workers importing torch, loading weights) from
    the steady-state rate.
    """
    if not shards:
        return 0, 0.0, 0
    from evl_cache.progress import ExtractProgress
    from evl_cache.ray_runtime import ray_session

    shapes = tensor_shapes(attrs)
    size = attrs["backbone"]["image_size"]
    min_frames = attrs["min_frames"]
    root = getattr(manifest, "root", "") or ""
    total_videos = sum(len(v) for v in shards.values())
    with ray_session(cfg.ray_address, num_cpus=cfg.num_cpus) as ray:
        gpus = int(ray.cluster_resources().get("GPU", 0))
        cpus = int(ray.cluster_resources().get("CPU", 1))
        decode_task = ray.remote(num_cpus=1, max_retries=1)(decode_video)
        writer_task = ray.remote(num_cpus=0, max_retries=2)(write_shard)
        if gpus:
            actor_cls = ray.remote(num_gpus=1, num_cpus=1, max_restarts=2, max_task_retries=2)(BackboneRunner)
            runners = [actor_cls.remote(cfg.backbone.to_dict(), blocks, cfg.attention, cfg.dtype, 4) for _ in range(gpus)]
        else:
            # One CPU actor that may use every core: decode tasks time-share with it, which is what
            # gets a 2-core machine close to the serial bound 1/(1/decode + 1/backbone).
            actor_cls = ray.remote(num_cpus=1, max_restarts=2, max_task_retries=2)(BackboneRunner)
            runners = [actor_cls.remote(cfg.backbone.to_dict(), blocks, cfg.attention, cfg.dtype, cpus, "cpu")]
        max_inflight = cfg.max_inflight_shards or 2 * len(runners) + 1
        queue = sorted(shards)
        inflight: dict[Any, tuple[int, list[Any]]] = {}
        known_failures: dict[int, dict[int, dict[str, Any]]] = {}
        processed, first_at, first_count = 0, 0.0, 0
        with ExtractProgress(total_videos, enabled=cfg.progress, views=store.num_views) as progress:
            turn = 0

            def submit(shard: int) -> None:
                nonlocal turn
                lo = shard * cfg.shard_size
                hi = min(lo + cfg.shard_size, store.num_videos)
                refs = []
                for i in range(lo, hi):
                    if i in known_failures.get(shard, {}):
                        refs.append((None, known_failures[shard][i]))
                        continue
                    path = manifest.paths[i]
                    key = os.path.relpath(path, root) if root else path
                    refs.append(decode_task.remote(path, key, cfg.sampling, store_views(attrs), size, min_frames))
                runner = runners[turn % len(runners)]
                turn += 1
                computed = runner.compute.remote(cfg.batch_size, shapes, store.num_views, *refs)
                inflight[writer_task.remote(store_path, shard, computed)] = (shard, refs)

            while queue or inflight:
                while queue and len(inflight) < max_inflight:
                    submit(queue.pop(0))
                ready, _ = ray.wait(list(inflight), num_returns=1)
                ref = ready[0]
                shard, refs = inflight.pop(ref)
                try:
                    records = ray.get(ref)
                except ray.exceptions.RayError as err:
                    crashed = _crashed_decodes(ray, shard, refs, cfg.shard_size)
                    if not crashed:
                        raise RuntimeError(f"shard {shard} failed outside decoding: {err}") from err
                    known_failures.setdefault(shard, {}).update(crashed)
                    queue.insert(0, shard)
                    continue
                lo = shard * cfg.shard_size
                results = {lo + j: rec for j, rec in enumerate(records)}
                store.mark(results)  # the whole shard was rewritten, so all its records are current
                wanted = [results[i] for i in shards[shard]]
                processed += len(wanted)
                if not first_at:
                    first_at, first_count = time.time(), len(wanted)
                progress.advance(done=sum(r["status"] == DONE for r in wanted),
                                 failed=sum(r["status"] == FAILED for r in wanted))
    return processed, first_at, first_count


def _crashed_decodes(ray: Any, shard: int, refs: list[Any], shard_size: int) -> dict[int, dict[str, Any]]:
    """After a shard failed, find decode tasks whose worker died (e.g. a decoder segfault)."""
    crashed = {}
    lo = shard * shard_size
    for j, ref in enumerate(refs):
        if isinstance(ref, tuple):
            continue
        try:
            ray.get(ref)
        except ray.exceptions.RayError as err:
            crashed[lo + j] = {"status": FAILED, "error": f"decoder process crashed ({err.__class__.__name__})"}
    return crashed


def store_views(attrs: dict[str, Any]) -> ViewSet:
    return ViewSet(**attrs["views"])
