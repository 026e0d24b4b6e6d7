"""Stage 1: run the frozen backbone once per video and write a cache store, on Ray.

Per shard (S consecutive videos, about 1 GiB per shard file): one CPU task per video that needs
work decodes it into uint8 views; backbone actors (one per GPU, or one CPU actor) finish the views
and run the backbone, one batch of videos per call; one writer task writes those videos' chunks
into the shard files and fsyncs them; then the driver, the only writer of the per-video table,
marks the videos (in memory, flushed every few seconds). A bounded number of shards is in flight,
so memory stays flat and decoding overlaps the backbone. A rerun of the same command redoes
exactly the videos that are not done; a done video is never rewritten.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from evl_cache import location
from evl_cache.backbone import BackboneSpec, build_backbone, default_device
from evl_cache.errors import UserError
from evl_cache.faults import fault_point
from evl_cache.formats import StoreFormats, feature_format, map_format
from evl_cache.store import (
    DEFAULT_SHARD_MIB,
    DONE,
    FAILED,
    PENDING,
    CacheStore,
    StoreDataError,
    VideoTable,
    choose_shard_size,
    comparable_attr,
    create_store,
    data_error_hint,
    open_store,
    remove_partial_files,
    shards_of,
    tensor_shapes,
)
from evl_cache.video import PackedViews, Sampling, VideoError, ViewSet, decode_views, finish_views

# Attributes that must match for a rerun to resume into an existing store.
RESUME_KEYS = ("backbone", "blocks", "frames", "sampling", "views", "num_views", "attention", "dtype", "attn_format", "layout",
               "class_names", "manifest_sha256", "min_frames", "compressor", "emb")
FLUSH_SECONDS = 5.0  # the driver writes its marks at most this often (and at the end)
NODE_LOSS_REQUEUES = 3  # times one shard is redone because a node (or its actor, or its objects) was lost
# Ray errors that mean lost machinery (a node, an actor, an object), not a bad video: the shard is redone.
NODE_LOSS_ERRORS = ("NodeDiedError", "ActorDiedError", "ActorUnavailableError", "ActorUnschedulableError", "ObjectLostError",
                    "ObjectFetchTimedOutError", "OwnerDiedError", "ReferenceCountingAssertionError",
                    "ObjectReconstructionFailedError", "ObjectReconstructionFailedMaxAttemptsExceededError",
                    "ObjectReconstructionFailedLineageEvictedError", "RaySystemError")


@dataclass
class ExtractConfig:
    """Everything that decides the bytes of a store (plus how to run: Ray address, batch, in-flight)."""

    backbone: BackboneSpec
    sampling: Sampling = field(default_factory=Sampling)
    views: ViewSet = field(default_factory=ViewSet)
    blocks: list[int] | None = None
    attention: str = "maps"
    dtype: str = "float16"
    attn_dtype: str = "float16"
    attn_topk: int = 0
    layout: str = "full"
    emb: bool = False  # also store per-frame CLIP embeddings ln_post(CLS) @ proj (`emb`, (T, E) float16)
    shard_size: int | None = None
    shard_mib: float = DEFAULT_SHARD_MIB
    batch_size: int = 8
    min_frames: int | None = None
    compressor: str | None = None
    ray_address: str | None = None
    num_cpus: int | None = None
    max_inflight_shards: int | None = None
    decode_timeout: float = 120.0
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
            attn_dtype=g.get("attn_dtype", "float16"), attn_topk=int(g.get("attn_topk", 0)), layout=g.get("layout", "full"),
            emb=bool(g.get("emb", False)),
            shard_size=int(g["shard_size"]) if g.get("shard_size") else None,
            shard_mib=float(g.get("shard_mib", DEFAULT_SHARD_MIB)), batch_size=int(g.get("batch_size", 8)),
            min_frames=g.get("min_frames"), compressor=g.get("compressor"), ray_address=g.get("ray_address"),
            num_cpus=g.get("num_cpus"), decode_timeout=float(g.get("decode_timeout", 120.0)),
            retry_failed=bool(g.get("retry_failed", False)),
        )


def parse_blocks(blocks: str | list[int] | None, decoder_layers: int | None) -> list[int] | None:
    """Block indices to cache: explicit (list or "8,9,10,11"; "none" = [], for an emb-only store), else
    the last ``decoder_layers``, else None (the backbone's default, the last 4)."""
    if isinstance(blocks, str) and blocks.strip().lower() == "none":
        return []
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
    files: int = 0
    pending: int = 0
    damaged: list[str] = field(default_factory=list)
    nodes: dict[str, dict[str, int]] = field(default_factory=dict)  # node label -> {"decoded": n, "embedded": n}
    lost_nodes: list[str] = field(default_factory=list)
    requeued: int = 0  # shards redone because a node died under them

    def lines(self) -> list[str]:
        out = [
            f"store {self.store}: {self.done}/{self.total} done, {self.failed} failed, {self.pending} pending, "
            f"{self.skipped} already done before this run",
            f"processed {self.processed} videos in {self.seconds:.1f} s ({self.clip_views_per_s:.2f} clip-views/s; "
            f"first batch after {self.first_shard_s:.1f} s, then {self.steady_clip_views_per_s:.2f} clip-views/s), "
            f"{self.bytes_on_disk / 2**20:.1f} MiB on disk in {self.files} files and directories",
        ]
        for idx, path, err in self.failures[:50]:
            out.append(f"  failed #{idx} {path}: {err}")
        if len(self.failures) > 50:
            out.append(f"  ... and {len(self.failures) - 50} more (see `evl-cache inspect`)")
        out += [f"  not written: {msg}" for msg in self.damaged]
        if len(self.nodes) > 1 or self.lost_nodes:
            out.append("videos per node: " + "; ".join(f"{label}: decoded {n.get('decoded', 0)}, embedded {n.get('embedded', 0)}"
                                                       for label, n in sorted(self.nodes.items())))
        if self.lost_nodes:
            out.append(f"nodes lost during the run: {', '.join(self.lost_nodes)}; {self.requeued} shard(s) redone on the others")
        return out


# ---------------------------------------------------------------------------------------------
# work units (run inside Ray workers; plain functions so they are testable without Ray)


def decode_video(path: str, key: str, sampling: Sampling, views: ViewSet, size: int, min_frames: int,
                 timeout: float | None = None) -> tuple[PackedViews | None, dict[str, Any]]:
    """Decode one video into uint8 `PackedViews`, or a failure record; never raises, never hangs.

    The decode runs in a worker thread; after ``timeout`` seconds the video is recorded as failed
    and the thread is abandoned (a C decoder stuck on a damaged stream cannot be interrupted).
    """
    result: list[Any] = []

    def work() -> None:
        try:
            fault_point("decode", key)
            packed, meta = decode_views(path, sampling, views, size, key=key, min_frames=min_frames)
            result.append((packed, {"status": DONE, "error": "", **meta}))
        except VideoError as err:
            result.append((None, {"status": FAILED, "error": str(err)}))
        except Exception as err:  # noqa: BLE001 - a decoder bug on one file must not stop the run
            result.append((None, {"status": FAILED, "error": f"unexpected {err.__class__.__name__}: {str(err)[:200]}"}))

    if not timeout:
        work()
        return result[0]
    import decord  # noqa: F401 - a first import (seconds on a busy worker) must not count against the timeout

    import evl_cache.augment  # noqa: F401
    thread = threading.Thread(target=work, name=f"decode {key}", daemon=True)
    thread.start()
    thread.join(timeout)
    if not result:
        return None, {"status": FAILED, "error": f"decode timed out after {timeout:g} s (--decode-timeout)"}
    return result[0]


def ray_node_id() -> str:
    """The Ray node this process runs on ("" outside a Ray worker): tags who did each video's work."""
    import sys

    if "ray" not in sys.modules:
        return ""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""


def decode_on_node(*args: Any) -> tuple[PackedViews | None, dict[str, Any]]:
    """`decode_video` as a Ray task: the record also names the node that decoded (not stored)."""
    packed, meta = decode_video(*args)
    return packed, {**meta, "decode_node": ray_node_id()}


class BackboneRunner:
    """Holds one backbone; turns decoded videos into the store's arrays (finishing uint8 views and
    encoding the storage formats here, next to the backbone)."""

    def __init__(self, spec: dict[str, Any], blocks: list[int] | None, attention: str, dtype: str,
                 threads: int | None = None, device: str | None = None, attn_format: str = "float16",
                 layout: str = "full", emb: bool = False) -> None:
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.backbone = build_backbone(BackboneSpec.from_dict(spec), blocks=blocks, attention=attention,
                                       device=device or default_device(), emb=emb)
        self.attention, self.dtype, self.attn_format, self.layout = attention, dtype, attn_format, layout

    def formats(self, frames: int) -> StoreFormats:
        desc = self.backbone.describe()
        return StoreFormats({"frames": frames, "tokens": 1 + desc["grid"][0] * desc["grid"][1], "width": desc["width"],
                             "heads": desc["heads"], "blocks": self.backbone.blocks, "attention": self.attention,
                             "dtype": self.dtype, "attn_format": self.attn_format, "layout": self.layout,
                             "emb": self.backbone.emb, "embed_dim": self.backbone.embed_dim})

    def compute(self, batch_size: int, *decoded: tuple[PackedViews | None, dict[str, Any]]
                ) -> tuple[dict[str, np.ndarray], list[dict[str, Any]]]:
        """Run the backbone over every view of the decoded videos that have views.

        Returns the store's arrays for those videos only, each (n_ok, V, *chunk shape), and one
        record per input. ``decoded`` arrive as top-level arguments so Ray hands them over resolved.
        """
        import torch

        ok = [i for i, (packed, _) in enumerate(decoded) if packed is not None]
        views = {i: finish_views(decoded[i][0]) for i in ok}
        items = [(j, v) for j, i in enumerate(ok) for v in range(views[i].shape[0])]
        out: dict[str, np.ndarray] = {}
        if not items:
            return out, [meta for _, meta in decoded]
        formats = self.formats(views[ok[0]].shape[1])
        num_views = max(views[i].shape[0] for i in ok)
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            frames = torch.stack([views[ok[j]][v] for j, v in chunk])
            result = self.backbone.prefix_outputs(frames) if self.layout == "prefix" else self.backbone(frames)
            result = {k: t.float().cpu() for k, t in result.items()}
            for name, values in formats.encode(result).items():
                if name not in out:
                    out[name] = np.empty((len(ok), num_views, *values.shape[1:]), dtype=values.dtype)
                for (j, v), value in zip(chunk, values):
                    out[name][j, v] = value
        return out, [meta for _, meta in decoded]

    def compute_on_node(self, batch_size: int, *decoded: tuple[PackedViews | None, dict[str, Any]]
                        ) -> tuple[dict[str, np.ndarray], list[dict[str, Any]]]:
        """`compute` for the Ray driver: each record also names the node whose actor embedded it."""
        node = ray_node_id()
        fault_point("embed", node)
        out, records = self.compute(batch_size, *decoded)
        return out, [{**rec, "embed_node": node} for rec in records]


def write_batches(store_path: str, shard: int, videos: list[int], keep: list[int],
                  *batches: tuple[dict[str, np.ndarray], list[dict[str, Any]]]) -> dict[int, dict[str, Any]]:
    """Write one shard's recomputed videos (the only writer of that shard), fsync, return their records.

    ``videos`` are the shard's videos that needed work, in the order of the ``batches`` results;
    ``keep`` its done videos, whose chunks are checked and kept byte for byte.
    """
    records = [rec for _, recs in batches for rec in recs]
    ok = [v for v, rec in zip(videos, records) if rec["status"] == DONE]
    tensors: dict[str, np.ndarray] = {}
    for name in {n for tensors_, _ in batches for n in tensors_}:
        tensors[name] = np.concatenate([t[name] for t, _ in batches if name in t and len(t[name])])
    store = open_store(store_path, mode="r+")
    if ok:
        store.write_videos(shard, videos, ok, tensors, keep=keep)
    return dict(zip(videos, records))


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
        "dtype": feature_format(cfg.dtype),
        "attn_format": map_format(cfg.attn_dtype, cfg.attn_topk),
        "layout": cfg.layout,
        "emb": bool(cfg.emb),
        **({"embed_dim": _embed_dim(cfg.backbone.arch)} if cfg.emb else {}),
        "min_frames": cfg.min_frames or cfg.sampling.frames,
        "compressor": cfg.compressor,
        "class_names": list(class_names),
        "manifest_sha256": manifest_sha,
        "manifest": manifest_meta,
    }


def _embed_dim(arch: str) -> int:
    """E of the per-frame embeddings: the model config's ``embed_dim`` (the image projection's width)."""
    from evl_cache.backbone import load_model_config

    return int(load_model_config(arch)["embed_dim"])


def prepare_store(store_path: str, attrs: dict[str, Any], paths: list[str], labels: list[int], cfg: ExtractConfig) -> CacheStore:
    """Create the store, or reopen it for resuming if it was created by the same configuration."""
    if store_exists(store_path):
        store = open_store(store_path, mode="r+")
        for key in RESUME_KEYS:
            if comparable_attr(key, store.attrs.get(key)) != comparable_attr(key, attrs.get(key)):
                if key == "emb":
                    raise UserError(
                        f"store {store_path} was created {'with' if store.attrs.get(key) else 'without'} per-frame "
                        f"embeddings (emb) but this run asks {'for' if attrs.get(key) else 'not to store'} them; "
                        + ("add them with `evl-cache derive-emb` (from the last block) or pass a new --store path"
                           if attrs.get(key) else "pass --emb to resume it"))
                raise UserError(
                    f"store {store_path} exists but was created with a different {key} "
                    f"({store.attrs.get(key)!r} vs {attrs.get(key)!r}); pass a new --store path or delete the old store"
                )
        if cfg.shard_size and cfg.shard_size != store.shard_size:
            raise UserError(f"store {store_path} has {store.shard_size} videos per shard, not --shard-size {cfg.shard_size}; "
                            "drop --shard-size to resume it")
        remove_partial_files(store_path)
        return store
    if not location.is_url(store_path):
        os.makedirs(os.path.dirname(os.path.abspath(store_path)), exist_ok=True)
    shard_size = cfg.shard_size or choose_shard_size(attrs, cfg.shard_mib)
    return create_store(store_path, attrs, paths, labels, shard_size=shard_size, compressor=cfg.compressor)


def store_exists(store_path: str) -> bool:
    """A local path that exists, or a URL prefix holding a root ``zarr.json``."""
    if location.is_url(store_path):
        return location.exists(location.join(store_path, "zarr.json"))
    return os.path.exists(store_path)


def write_tail(store: CacheStore, backbone: Any) -> CacheStore:
    """Put the frozen tail blocks' weights into a prefix-layout store (a file, or an object of a URL
    store), then record their sha256: the record is written only once the weights are whole, so a
    reader never takes a store whose tail write was interrupted for a finished one."""
    from evl_cache.prefix import save_tail

    attrs = dict(store.attrs)
    attrs["tail"] = save_tail(store.path, backbone.visual, backbone.blocks)
    store.group.attrs["evl_cache"] = attrs
    return open_store(store.path, mode="r+")


def resolve_precision(cfg: ExtractConfig) -> BackboneSpec:
    """The backbone spec with ``auto`` precision made explicit for the machines that will run it:
    fp16 when the cluster has GPUs (the actors run there), else fp32. Recorded in the store, so a
    resume on another kind of machine cannot mix precisions in one store."""
    if cfg.backbone.precision != "auto":
        return cfg.backbone
    if cfg.ray_address:
        from evl_cache.ray_runtime import ray_session

        with ray_session(cfg.ray_address) as ray:
            gpus = int(ray.cluster_resources().get("GPU", 0))
    else:
        import torch

        gpus = torch.cuda.device_count()
    return dataclasses.replace(cfg.backbone, precision="fp16" if gpus else "fp32")


def extract(manifest: Any, store_path: str, cfg: ExtractConfig) -> ExtractSummary:
    """Extract ``manifest`` (an `evl_cache.datasets.Manifest`) into the store at ``store_path``.

    Safe to rerun after any interruption: done videos are kept, the rest are redone, and the
    final store is byte-identical to an uninterrupted run.
    """
    if len(manifest.paths) == 0:
        raise UserError("the manifest lists no videos; check --root/--annotations/--split")
    feature_format(cfg.dtype), map_format(cfg.attn_dtype, cfg.attn_topk)  # refuse a bad --dtype / --attn-* now
    if cfg.attention == "maps" and cfg.sampling.frames < 2:
        raise UserError("attention maps need at least 2 frames; use --frames >= 2 or --attention none")
    if cfg.decode_timeout <= 0:
        raise UserError(f"--decode-timeout must be positive seconds (got {cfg.decode_timeout})")
    if cfg.layout not in ("full", "prefix"):
        raise UserError(f"unknown --layout '{cfg.layout}'; use full or prefix")
    if cfg.blocks == [] and not cfg.emb:
        raise UserError("--blocks none caches no block; add --emb for an emb-only store, or name the blocks to cache")
    if cfg.blocks == [] and cfg.layout == "prefix":
        raise UserError("--layout prefix needs cached blocks; drop --blocks none or use --layout full")
    if cfg.blocks == []:  # an emb-only store has no block whose attention could be kept
        cfg = dataclasses.replace(cfg, attention="none")
    cfg = dataclasses.replace(cfg, backbone=resolve_precision(cfg))
    probe = build_backbone(cfg.backbone, blocks=cfg.blocks, attention=cfg.attention, device="cpu", emb=cfg.emb)
    desc, blocks = probe.describe(), probe.blocks
    manifest_meta = {"name": getattr(manifest, "name", ""), "root": getattr(manifest, "root", "")}
    attrs = store_attributes(desc, blocks, cfg, manifest.class_names, manifest.sha256(), manifest_meta)
    if cfg.layout == "prefix":
        from evl_cache.backbone import load_model_config
        from evl_cache.prefix import tail_blocks

        attrs["model_config"] = {k: v for k, v in load_model_config(cfg.backbone.arch).items() if k in ("embed_dim", "vision_cfg")}
        attrs["tail"] = {"file": "tail_weights.safetensors", "blocks": tail_blocks(blocks)}
    fresh = not store_exists(store_path)
    store = prepare_store(store_path, attrs, list(manifest.paths), list(manifest.labels), cfg)
    if cfg.layout == "prefix" and (fresh or "sha256" not in store.attrs.get("tail", {})):
        if cfg.backbone.precision != "fp32":  # the tail is kept in float32; each device casts it as it runs
            probe = build_backbone(dataclasses.replace(cfg.backbone, precision="fp32"), blocks=cfg.blocks,
                                   attention=cfg.attention, device="cpu", emb=cfg.emb)
        store = write_tail(store, probe)
    del probe
    status = store.status()
    todo_status = (PENDING, FAILED) if cfg.retry_failed else (PENDING,)
    skipped = int((status == DONE).sum())
    todo = [i for i in range(len(status)) if status[i] in todo_status]
    started = time.time()
    run = ShardRun(store, manifest, cfg, blocks, status)
    run.execute(shards_of(todo, store.shard_size))
    seconds = time.time() - started
    first_shard_s = run.first_at - started if run.first_at else 0.0
    steady_s = seconds - first_shard_s
    info = open_store(store_path).info()
    return ExtractSummary(
        store=store_path, total=info.num_videos, done=info.done, failed=info.failed, skipped=skipped,
        processed=run.processed, seconds=seconds,
        clip_views_per_s=(run.processed * store.num_views / seconds) if seconds > 0 else 0.0,
        bytes_on_disk=info.bytes_on_disk, failures=info.failures, first_shard_s=first_shard_s,
        steady_clip_views_per_s=((run.processed - run.first_count) * store.num_views / steady_s) if steady_s > 0 else 0.0,
        files=info.files, pending=info.pending, damaged=run.damaged,
        nodes=run.per_node, lost_nodes=run.lost_nodes, requeued=run.requeued,
    )


class ShardRun:
    """Pushes shards through decode -> backbone -> write on Ray and marks each as it lands.

    The steps are methods: `start_workers` (actors that never hold a CPU, so decode tasks always
    get one), `submit` (one shard's decode tasks, backbone batches and writer), `land` (mark a
    written shard, or requeue it with its crashed decodes recorded), and the `execute` loop.
    """

    def __init__(self, store: CacheStore, manifest: Any, cfg: ExtractConfig, blocks: list[int], status: np.ndarray) -> None:
        self.store, self.manifest, self.cfg, self.blocks = store, manifest, cfg, blocks
        self.status = status
        self.attrs = store.attrs
        self.root = getattr(manifest, "root", "") or ""
        self.table = VideoTable(store)
        self.known_failures: dict[int, dict[str, Any]] = {}
        self.processed, self.first_at, self.first_count = 0, 0.0, 0
        self.damaged: list[str] = []
        self.runners: list[Any] = []
        self.turn = 0
        self.node_labels: dict[str, str] = {}  # Ray node id -> "ip id8 (head)", for the summary
        self.start_nodes: set[str] = set()
        self.per_node: dict[str, dict[str, int]] = {}
        self.lost_nodes: list[str] = []
        self.requeues: dict[int, int] = {}
        self.requeued = 0

    # -- steps --------------------------------------------------------------------------------
    def runner_args(self, threads: int, device: str | None) -> tuple[Any, ...]:
        """`BackboneRunner`'s arguments for this store: one place, so a new store option reaches every actor
        (the first, per-node and replacement ones alike)."""
        a = self.attrs
        return (self.cfg.backbone.to_dict(), self.blocks, self.cfg.attention, a["dtype"], threads, device,
                a["attn_format"], a["layout"], bool(a.get("emb")))

    def start_workers(self, ray: Any) -> None:
        resources = ray.cluster_resources()
        cpus, gpus = float(resources.get("CPU", 0)), int(resources.get("GPU", 0))
        if cpus < 1:
            raise UserError(f"the Ray cluster offers {cpus:g} CPUs; decoding needs at least 1: "
                            "raise --num-cpus or add a node with CPUs")
        self.decode_task = ray.remote(num_cpus=1, max_retries=1)(decode_on_node)
        self.writer_task = ray.remote(num_cpus=0, max_retries=2)(write_batches)
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        for n in nodes:
            head = " (head)" if "node:__internal_head__" in n.get("Resources", {}) else ""
            self.node_labels[n["NodeID"]] = f"{n.get('NodeManagerAddress', '?')} {n['NodeID'][:8]}{head}"
        self.start_nodes = set(self.node_labels)
        cpu_nodes = [n for n in nodes if n.get("Resources", {}).get("CPU", 0) >= 1]
        # Actors hold no CPU (num_cpus=0): a CPU reserved for an actor's whole life is one that decode
        # tasks can never get, which hung a run whenever the cluster had no more CPUs than actors.
        if gpus:
            actor = ray.remote(num_gpus=1, num_cpus=0, max_restarts=2, max_task_retries=2)(BackboneRunner)
            self.runners = [actor.remote(*self.runner_args(4, None)) for _ in range(gpus)]
        elif len(cpu_nodes) <= 1:
            # One CPU actor whose threads may use every core: decode tasks time-share with it, which is
            # what gets a 2-core machine close to the serial bound 1/(1/decode + 1/backbone).
            actor = ray.remote(num_cpus=0, max_restarts=2, max_task_retries=2)(BackboneRunner)
            self.runners = [actor.remote(*self.runner_args(max(1, int(cpus)), "cpu"))]
        else:
            # A CPU cluster: one actor per node, using that node's cores. The placement is hard: a soft
            # one let a busy node's actor start on the head instead (measured: the head then embedded
            # everything). An actor whose node dies cannot restart there, dies, and its shards are redone
            # by `land`, which swaps it for a fresh actor on a live node (`replace_dead_runners`).
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            actor = ray.remote(num_cpus=0, max_restarts=2, max_task_retries=2)(BackboneRunner)
            self.runners = [
                actor.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(
                    *self.runner_args(max(1, int(n["Resources"]["CPU"])), "cpu"))
                for n in cpu_nodes]
        self.actor_class = actor

    def submit(self, shard: int, videos: list[int]) -> tuple[Any, list[Any], list[Any]]:
        """Queue one shard: decode tasks, backbone batches (round-robin over actors), the writer."""
        cfg, store = self.cfg, self.store
        size = self.attrs["backbone"]["image_size"]
        views = ViewSet(**self.attrs["views"])
        decodes: list[Any] = []
        for i in videos:
            if i in self.known_failures:
                decodes.append((None, self.known_failures[i]))
                continue
            path = self.manifest.paths[i]
            key = os.path.relpath(path, self.root) if self.root else path
            decodes.append(self.decode_task.remote(path, key, cfg.sampling, views, size, self.attrs["min_frames"],
                                                   cfg.decode_timeout))
        per_batch = max(1, cfg.batch_size // store.num_views)
        batches = []
        for start in range(0, len(decodes), per_batch):
            runner = self.runners[self.turn % len(self.runners)]
            self.turn += 1
            batches.append(runner.compute_on_node.remote(cfg.batch_size, *decodes[start:start + per_batch]))
        lo = shard * store.shard_size
        keep = [i for i in range(lo, min(lo + store.shard_size, store.num_videos)) if self.status[i] == DONE]
        writer = self.writer_task.remote(store.path, shard, videos, keep, *batches)
        return writer, decodes, batches

    def land(self, ray: Any, shard: int, videos: list[int], ref: Any, decodes: list[Any]) -> bool:
        """Mark a finished shard; False if it must be resubmitted (a decode worker crashed)."""
        try:
            records = ray.get(ref)
        except ray.exceptions.RayError as err:
            cause = getattr(err, "cause", None)
            if isinstance(cause, StoreDataError):
                self.damaged.append(data_error_hint(self.store.path, f"shard {shard}: {cause}"))
                return True
            if self.node_lost(ray, err) and self.requeues.get(shard, 0) < NODE_LOSS_REQUEUES:
                # Work lost with a node is redone whole (the writer replaces any file it half wrote);
                # it never counts against the shard's videos.
                self.requeues[shard] = self.requeues.get(shard, 0) + 1
                self.requeued += 1
                self.replace_dead_runners(ray)
                return False
            crashed = _crashed_decodes(ray, videos, decodes)
            if not crashed:
                raise RuntimeError(f"shard {shard} failed outside decoding: {err}") from err
            self.known_failures.update(crashed)
            return False
        fault_point("after_shard_write", shard)
        self.table.mark(records, shard)
        for i, rec in records.items():
            self.status[i] = rec["status"]
            if rec["status"] == DONE:
                for role, key in (("decoded", "decode_node"), ("embedded", "embed_node")):
                    label = self.node_labels.get(rec.get(key, ""), rec.get(key) or "?")
                    counts = self.per_node.setdefault(label, {"decoded": 0, "embedded": 0})
                    counts[role] += 1
        self.processed += len(records)
        if not self.first_at:
            self.first_at, self.first_count = time.time(), len(records)
        return True

    def node_lost(self, ray: Any, err: Exception) -> bool:
        """Whether ``err`` comes from lost machinery: a node of the run is dead, or the error is one of
        Ray's node/actor/object-loss errors (seen before the cluster has marked the node dead)."""
        dead = self.note_lost_nodes(ray)
        names = {cls.__name__ for cls in type(err).__mro__}
        cause = getattr(err, "cause", None)
        if cause is not None:
            names |= {cls.__name__ for cls in type(cause).__mro__}
        return bool(dead) or bool(names & set(NODE_LOSS_ERRORS))

    def note_lost_nodes(self, ray: Any) -> set[str]:
        """Record (for the summary) the nodes of the run that the cluster now reports dead."""
        alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
        dead = self.start_nodes - alive
        for node in sorted(dead):
            label = self.node_labels.get(node, node[:8])
            if label not in self.lost_nodes:
                self.lost_nodes.append(label)
        return dead

    def replace_dead_runners(self, ray: Any) -> None:
        """Swap backbone actors that are dead for good (restarts used up) for fresh ones on live nodes."""
        for k, runner in enumerate(self.runners):
            try:
                ray.get(runner.__ray_ready__.remote(), timeout=120)
            except ray.exceptions.RayError:
                gpu = bool(ray.cluster_resources().get("GPU", 0))
                threads = 4 if gpu else max(1, int(ray.available_resources().get("CPU", 1)))
                self.runners[k] = self.actor_class.remote(*self.runner_args(threads, None if gpu else "cpu"))

    def execute(self, shards: dict[int, list[int]]) -> None:
        if not shards:
            return
        from evl_cache.progress import ExtractProgress
        from evl_cache.ray_runtime import ray_session

        cfg = self.cfg
        total = sum(len(v) for v in shards.values())
        with ray_session(cfg.ray_address, num_cpus=cfg.num_cpus) as ray:
            self.start_workers(ray)
            max_inflight = cfg.max_inflight_shards or 2 * len(self.runners) + 1
            queue = sorted(shards)
            inflight: dict[Any, tuple[int, list[Any]]] = {}
            batches: dict[Any, int] = {}  # backbone batch -> videos in it, for progress
            flushed = time.monotonic()
            with ExtractProgress(total, enabled=cfg.progress, views=self.store.num_views) as progress:
                while queue or inflight:
                    while queue and len(inflight) < max_inflight:
                        shard = queue.pop(0)
                        writer, decodes, refs = self.submit(shard, shards[shard])
                        inflight[writer] = (shard, decodes)
                        per_batch = max(1, cfg.batch_size // self.store.num_views)
                        batches.update({r: min(per_batch, len(shards[shard]) - k * per_batch) for k, r in enumerate(refs)})
                    ready, _ = ray.wait(list(inflight) + list(batches), num_returns=1)
                    ref = ready[0]
                    if ref in batches:
                        videos = batches.pop(ref)
                        if not self.first_at:
                            self.first_at, self.first_count = time.time(), videos
                        progress.advance(done=videos, failed=0)
                        continue
                    shard, decodes = inflight.pop(ref)
                    if not self.land(ray, shard, shards[shard], ref, decodes):
                        queue.insert(0, shard)
                        continue
                    progress.reclassify_failed(int(sum(self.status[i] == FAILED for i in shards[shard])))
                    if time.monotonic() - flushed > FLUSH_SECONDS:
                        self.table.flush()
                        flushed = time.monotonic()
            self.note_lost_nodes(ray)  # also those whose work Ray's own retries redid
        self.table.flush()
        if self.requeued:
            remove_partial_files(self.store.path)  # temp files of writers killed with their node


def _crashed_decodes(ray: Any, videos: list[int], decodes: list[Any]) -> dict[int, dict[str, Any]]:
    """After a shard failed, find decode tasks whose worker died (e.g. a decoder segfault)."""
    crashed = {}
    for i, ref in zip(videos, decodes):
        if isinstance(ref, tuple):
            continue
        try:
            ray.get(ref)
        except ray.exceptions.RayError as err:
            crashed[i] = {"status": FAILED, "error": f"decoder process crashed ({err.__class__.__name__})"}
    return crashed


def extract_serially(store: CacheStore, runner: BackboneRunner, paths: list[str], keys: list[str],
                     batch_size: int = 8) -> None:
    """Extract every pending video of ``store`` in this process, with the same work units as the Ray
    driver (decode, backbone batch, shard write, mark): for tests and benchmarks that measure or
    check the data, not the scheduling."""
    attrs = store.attrs
    views, sampling = ViewSet(**attrs["views"]), Sampling(**attrs["sampling"])
    size = attrs["backbone"]["image_size"]
    status = store.status()
    table = VideoTable(store)
    for shard, videos in shards_of(np.flatnonzero(status != DONE), store.shard_size).items():
        decoded = [decode_video(paths[i], keys[i], sampling, views, size, attrs["min_frames"]) for i in videos]
        lo = shard * store.shard_size
        keep = [i for i in range(lo, min(lo + store.shard_size, store.num_videos)) if status[i] == DONE]
        table.mark(write_batches(store.path, shard, videos, keep, runner.compute(batch_size, *decoded)), shard)
    table.flush()

