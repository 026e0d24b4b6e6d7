"""`evl-cache plan`: what each storage format (and the online path) costs for a dataset and a machine.

For every format: cache bytes, extraction time, training time per epoch and for the recipe, the
bound of each (GPU, disk, decode) and a recommendation. Everything is arithmetic on three things:
- bytes per clip-view from the store schema itself (`StoreFormats.bytes_per_view`);
- multiply-accumulates from `evl_cache.flops` (backbone, tail blocks, decoder; 1 MAC = 2 FLOPs);
- the throughput table `DEVICES` / `HOST` below, the one place the calibration constants live, each
  with its source. GPU rows are published peak figures times an achieved-utilisation assumption;
  the CPU row is measured on the development machine. docs/plan.md states the formula and the check.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from evl_cache.errors import UserError

# --------------------------------------------------------------------------- calibration (one place)


@dataclass(frozen=True)
class Device:
    """One compute device's achieved rates. GPUs: peak dense fp16/bf16 tensor TFLOPS x utilisation.
    CPU: measured GMAC/s per core (forward of the frozen ViT, and a decoder training step)."""

    name: str
    peak_tflops: float | None  # dense fp16/bf16 tensor-core peak, FLOPs (None: CPU)
    forward_util: float = 0.0  # achieved share of peak on the frozen ViT forward (assumption)
    train_util: float = 0.0  # achieved share of peak on the decoder's forward + backward (assumption)
    forward_gmacs_per_core: float = 0.0  # CPU only, measured
    train_gmacs_per_core: float = 0.0  # CPU only, measured (forward + backward + AdamW, counted as 3 x forward MACs)
    source: str = ""

    @property
    def is_cpu(self) -> bool:
        return self.peak_tflops is None

    def seconds(self, gmacs: float, kind: str, count: int, cores: int) -> float:
        """Seconds for ``gmacs`` of ``kind`` work ("forward" | "train") on ``count`` devices."""
        if self.is_cpu:
            rate = self.forward_gmacs_per_core if kind == "forward" else self.train_gmacs_per_core
            return gmacs / (rate * cores)
        util = self.forward_util if kind == "forward" else self.train_util
        return 2 * gmacs * 1e9 / (self.peak_tflops * 1e12 * util * count)


# Achieved utilisation of peak: an assumption until GPU figures are measured here (docs/plan.md).
# The frozen ViT forward is large dense matmuls (B/16: 197 tokens x 768); the decoder step has
# smaller matmuls, TCA gathers and an optimizer, so it is set lower.
FORWARD_UTIL, TRAIN_UTIL = 0.45, 0.30

# The CPU row: bench_train.py's recorded run (docs/benchmarks.md, "Stage 2", CPU-time column, batch 4,
# 1 torch thread, width-192 ViT-12 @224, T=8, K=4): frozen backbone forward 1.423 CPU s for 4 clips of
# 10.028 GMAC; decoder forward + backward + AdamW 0.570 CPU s for 4 clips of 3 x 2.0086 GMAC
# (binned TCA, maps cached).
CPU_FORWARD_GMACS_PER_CORE = 4 * 10.028 / 1.423  # 28.2
CPU_TRAIN_GMACS_PER_CORE = 4 * 3 * 2.0086 / 0.570  # 42.3

DEVICES: dict[str, Device] = {
    "h100": Device("NVIDIA H100 SXM", 989.4, FORWARD_UTIL, TRAIN_UTIL,
                   source="NVIDIA H100 datasheet: FP16/BF16 tensor 1,979 TFLOPS with sparsity = 989 dense"),
    "h200": Device("NVIDIA H200 SXM", 989.4, FORWARD_UTIL, TRAIN_UTIL,
                   source="NVIDIA H200 datasheet: same FP16/BF16 tensor figure as H100 SXM (1,979 sparse)"),
    "a100": Device("NVIDIA A100 SXM", 312.0, FORWARD_UTIL, TRAIN_UTIL,
                   source="NVIDIA A100 datasheet: FP16/BF16 tensor 312 TFLOPS dense (624 sparse)"),
    "v100": Device("NVIDIA V100 SXM2", 125.0, FORWARD_UTIL, TRAIN_UTIL,
                   source="NVIDIA V100 datasheet: tensor 125 TFLOPS"),
    "cpu": Device("CPU", None, forward_gmacs_per_core=CPU_FORWARD_GMACS_PER_CORE,
                  train_gmacs_per_core=CPU_TRAIN_GMACS_PER_CORE,
                  source="measured: bench_train.py recorded run, docs/benchmarks.md (CPU seconds per step)"),
}


@dataclass(frozen=True)
class Host:
    """The CPU side of a machine, per core: decoding clips and reading the cache."""

    decode_clip_views_per_s_per_core: float = 37.15 / 2
    decode_source: str = ("bench_extract.py recorded run (docs/benchmarks.md, Stage 1): decode + view building "
                          "37.15 clip-views/s on 2 cores (170x128 mp4, 8 frames)")
    reader_cpu_s_per_gb: float = 1.39
    reader_source: str = ("bench_reader.py recorded run (docs/benchmarks.md, Reader throughput): DataLoader "
                          "batch 16, 0 workers, hot, fp16: 1.39 CPU s per GB")
    video_mb: float = 0.55
    video_source: str = "Kinetics-400 at 340x256 short side: ~132 GB for ~240k videos (an estimate)"


HOST = Host()

ARCHES = {"B/16": "ViT-B-16", "L/14": "ViT-L-14", "L/14@336": "ViT-L-14-336"}

# (label, feature dtype, map format, layout)
FORMATS = [
    ("fp16", "float16", "float16", "full"),
    ("fp16 + uint8 maps", "float16", "uint8", "full"),
    ("int8", "int8", "float16", "full"),
    ("int8 + uint8 maps", "int8", "uint8", "full"),
    ("fp8 + uint8 maps", "float8_e4m3", "uint8", "full"),
    ("int8 + top16 uint8 maps", "int8", "top16:uint8", "full"),
    ("prefix fp16", "float16", "float16", "prefix"),
    ("prefix fp8", "float8_e4m3", "float16", "prefix"),
]
ONLINE = "online"


# --------------------------------------------------------------------------------------- inputs


@dataclass
class PlanInputs:
    arch: str = "B/16"
    frames: int = 8
    views: int = 1  # cached augmented views per video (train:V)
    videos: int = 240_436
    gpu: str = "h100"
    gpus: int = 1
    disk_gbps: float = 2.0
    cpu_cores: int = 32
    batch: int = 256
    steps: int = 50_000
    epochs: float | None = None  # if given, replaces steps: epochs x ceil(videos / batch)
    decoder_layers: int = 4
    classes: int = 400
    runs: int = 1  # training runs sharing one cache (ablations): extraction is paid once
    decode_rate: float | None = None  # clip-views/s per core; default HOST's

    def check(self) -> None:
        if self.gpu not in DEVICES:
            raise UserError(f"unknown --gpu {self.gpu!r}; use one of {', '.join(DEVICES)}")
        for name in ("frames", "views", "videos", "gpus", "cpu_cores", "batch", "steps", "decoder_layers", "classes", "runs"):
            if int(getattr(self, name)) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(self, name)})")
        for name in ("disk_gbps", "epochs", "decode_rate"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise UserError(f"--{name.replace('_', '-')} must be > 0 (got {value})")
        if self.frames < 2:
            raise UserError(f"--frames must be >= 2 for the temporal decoder (got {self.frames})")


# --------------------------------------------------------------------------------------- result


@dataclass
class Bound:
    seconds: float
    parts: dict[str, float]  # GPU / disk / decode (CPU) seconds
    bound: str


@dataclass
class Row:
    name: str
    bytes_per_clip_view: int
    cache_bytes: int
    extraction: Bound | None
    step: Bound
    epoch_s: float
    recipe_s: float
    total_s: float  # extraction + runs x recipe


@dataclass
class Plan:
    inputs: PlanInputs
    assumptions: dict[str, Any]
    gmacs: dict[str, float]
    steps: int
    steps_per_epoch: int
    rows: list[Row] = field(default_factory=list)
    recommendation: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def row(self, name: str) -> Row:
        return next(r for r in self.rows if r.name == name)


# --------------------------------------------------------------------------------------- the model


def resolve_arch(arch: str) -> str:
    """B/16, L/14, L/14@336 -> open_clip names; other names and config JSON paths pass through."""
    return ARCHES.get(arch, arch)


def store_attrs(arch: str, frames: int, layers: int, dtype: str, attn: str, layout: str) -> dict[str, Any]:
    """The schema attributes `StoreFormats` needs, for a store `extract` would write at these shapes."""
    from evl_cache.flops import vit_dims
    from evl_cache.formats import feature_format, map_format

    d = vit_dims(resolve_arch(arch))
    return {"frames": frames, "tokens": d.tokens, "width": d.width, "heads": d.heads,
            "blocks": list(range(d.layers - layers, d.layers)), "attention": "maps",
            "dtype": feature_format(dtype), "attn_format": map_format(attn), "layout": layout}


def bytes_per_clip_view(arch: str, frames: int, layers: int, dtype: str, attn: str, layout: str) -> int:
    """From the project's own schema code, so plan and stores cannot disagree."""
    from evl_cache.formats import StoreFormats

    return StoreFormats(store_attrs(arch, frames, layers, dtype, attn, layout)).bytes_per_view()


def model_gmacs(arch: str, frames: int, layers: int, classes: int) -> dict[str, float]:
    """Per clip-view GMACs: whole frozen backbone, its prefix (blocks before the first read one), the
    tail (the read blocks), and the decoder's forward as this implementation runs it (binned TCA,
    maps cached), plus the tail's parameters (the prefix store carries them)."""
    from evl_cache.flops import backbone_macs, decoder_config_for, decoder_macs, vit_dims

    d = vit_dims(resolve_arch(arch))
    if layers > d.layers:
        raise UserError(f"{arch} has {d.layers} blocks, cannot feed {layers} decoder layers")
    first = d.layers - layers
    full = sum(backbone_macs(d, frames).values())
    prefix = sum(backbone_macs(d, frames, last_block=first - 1).values())  # first = 0: the patch embedding only
    cfg = decoder_config_for(d, frames, layers, classes)
    hidden = int(d.width * d.mlp_ratio)
    block_params = 4 * d.width + 4 * d.width * d.width + 4 * d.width + 2 * d.width * hidden + hidden + d.width
    return {"backbone": full / 1e9, "prefix": prefix / 1e9, "tail": (full - prefix) / 1e9,
            "decoder_forward": sum(decoder_macs(cfg, "binned", tca_qk=False).values()) / 1e9,
            "tail_weight_bytes": float(4 * layers * block_params)}


def _bound(parts: dict[str, float], cpu_device: bool) -> Bound:
    """Pipelined parts overlap: the slowest bounds. On a CPU-only machine compute and decode share
    the cores, so they add; the disk still overlaps."""
    if cpu_device:
        parts = dict(parts)
        cores = parts.pop("compute") + parts.pop("decode")
        merged = {"CPU (compute + decode)": cores, "disk": parts["disk"]}
        name = max(merged, key=merged.get)
        return Bound(merged[name], merged, name)
    named = {"GPU": parts["compute"], "disk": parts["disk"], "decode": parts["decode"]}
    name = max(named, key=named.get)
    return Bound(named[name], named, name)


def make_plan(inp: PlanInputs) -> Plan:
    inp.check()
    dev = DEVICES[inp.gpu]
    decode_rate = inp.decode_rate or HOST.decode_clip_views_per_s_per_core
    g = model_gmacs(inp.arch, inp.frames, inp.decoder_layers, inp.classes)
    train_gmacs = 3 * g["decoder_forward"]  # forward + backward ~ 3 x forward
    per_epoch = math.ceil(inp.videos / inp.batch)  # one view of every video per epoch
    steps = math.ceil(inp.epochs * per_epoch) if inp.epochs else inp.steps
    cores, count, disk = inp.cpu_cores, inp.gpus, inp.disk_gbps * 1e9
    clip_views = inp.videos * inp.views

    def compute(gmacs_fwd: float, gmacs_train: float, n: int) -> float:
        return dev.seconds(n * gmacs_fwd, "forward", count, cores) + dev.seconds(n * gmacs_train, "train", count, cores)

    rows = []
    for name, dtype, attn, layout in FORMATS:
        per_view = bytes_per_clip_view(inp.arch, inp.frames, inp.decoder_layers, dtype, attn, layout)
        cache = per_view * clip_views + (int(g["tail_weight_bytes"]) if layout == "prefix" else 0)
        ext_fwd = g["prefix"] if layout == "prefix" else g["backbone"]
        extraction = _bound({"compute": compute(ext_fwd, 0.0, clip_views), "disk": cache / disk,
                             "decode": clip_views / (decode_rate * cores)}, dev.is_cpu)
        tail = g["tail"] if layout == "prefix" else 0.0
        step = _bound({"compute": compute(tail, train_gmacs, inp.batch), "disk": inp.batch * per_view / disk,
                       "decode": inp.batch * per_view / 1e9 * HOST.reader_cpu_s_per_gb / cores}, dev.is_cpu)
        recipe = steps * step.seconds
        rows.append(Row(name, per_view, cache, extraction, step, per_epoch * step.seconds, recipe,
                        extraction.seconds + inp.runs * recipe))
    online = _bound({"compute": compute(g["backbone"], train_gmacs, inp.batch),
                     "disk": inp.batch * HOST.video_mb * 1e6 / disk,
                     "decode": inp.batch / (decode_rate * cores)}, dev.is_cpu)
    rows.append(Row(ONLINE, 0, 0, None, online, per_epoch * online.seconds, steps * online.seconds,
                    inp.runs * steps * online.seconds))

    assumptions = {
        "device": f"{dev.name} x {count}" if not dev.is_cpu else f"CPU, {cores} cores",
        "device_rate": (f"{dev.peak_tflops} TFLOPS peak dense fp16; utilisation {dev.forward_util:.0%} forward, "
                        f"{dev.train_util:.0%} decoder training" if not dev.is_cpu else
                        f"{dev.forward_gmacs_per_core:.1f} GMAC/s/core forward, {dev.train_gmacs_per_core:.1f} "
                        f"GMAC/s/core decoder training"),
        "device_source": dev.source,
        "decode": f"{decode_rate:.2f} clip-views/s per core" + ("" if inp.decode_rate else f" ({HOST.decode_source})"),
        "reader": f"{HOST.reader_cpu_s_per_gb} CPU s per GB read ({HOST.reader_source})",
        "online_video_bytes": f"{HOST.video_mb} MB per clip read from disk ({HOST.video_source})",
        "disk": f"{inp.disk_gbps} GB/s, the cache read from disk every epoch (no page cache)",
        "training_macs": "decoder forward + backward = 3 x forward MACs (binned TCA, maps cached); prefix adds the "
                         "tail blocks' forward; online adds the whole backbone's forward",
        "overlap": ("decode, disk and GPU overlap (pipelined loader): the slowest bounds" if not dev.is_cpu else
                    "compute and decode share the CPU cores (they add); the disk overlaps"),
        "epoch": f"one view of every video: ceil({inp.videos} / {inp.batch}) = {per_epoch} steps",
        "recipe": f"{steps} steps of {inp.batch} clip-views" + (f" ({inp.epochs} epochs)" if inp.epochs else ""),
        "extraction": f"{inp.videos} videos x {inp.views} cached views; GPU runs the backbone (prefix: up to "
                      "the first read block), CPU decodes, the disk takes the writes",
        "runs": f"{inp.runs} training run(s) share one extraction",
        "not modelled": "fixed per-step overhead (Python, kernel launches, optimizer bookkeeping): tiny models or "
                        "small batches run slower than predicted; reading and dequantising compact formats on the device",
        "accuracy": "not modelled: per-format accuracy is measured by `make formats-table`; a cache fixes "
                    f"{inp.views} augmented view(s) per video, the online path draws fresh ones every epoch",
    }
    plan = Plan(inp, assumptions, g, steps, per_epoch, rows)
    plan.recommendation = recommend(plan)
    return plan


def recommend(plan: Plan) -> str:
    """The format with the least extraction + training time (fewer bytes on ties within 5%), against
    the online path."""
    cached = [r for r in plan.rows if r.name != ONLINE]
    best_time = min(r.total_s for r in cached)
    best = min((r for r in cached if r.total_s <= 1.05 * best_time), key=lambda r: r.bytes_per_clip_view)
    online = plan.row(ONLINE)
    if online.total_s < best.total_s:
        return (f"online: {fmt_s(online.total_s)} beats the best cache ({best.name}, {fmt_s(best.total_s)} including "
                f"extraction); the cached step is bound by {best.step.bound}")
    return (f"{best.name}: {fmt_s(best.total_s)} including extraction, {online.total_s / best.total_s:.1f}x faster than "
            f"online ({fmt_s(online.total_s)}); its step is bound by {best.step.bound}, cache {fmt_bytes(best.cache_bytes)}")


# --------------------------------------------------------------------------------------- printing


def fmt_s(seconds: float) -> str:
    if seconds >= 86400:
        return f"{seconds / 86400:.1f} d"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.3g} s"


def fmt_bytes(n: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def lines(plan: Plan) -> list[str]:
    """The plan as markdown: assumptions, then one row per format and the online path."""
    i = plan.inputs
    out = [f"# plan: {i.arch}, {i.frames} frames, K={i.decoder_layers}, {i.videos:,} videos x {i.views} view(s)", "",
           "assumptions:"]
    out += [f"- {k}: {v}" for k, v in plan.assumptions.items()]
    g = plan.gmacs
    out += [f"- GMACs per clip-view: backbone {g['backbone']:.2f}, prefix {g['prefix']:.2f}, tail {g['tail']:.2f}, "
            f"decoder forward {g['decoder_forward']:.2f} (evl_cache.flops)", "",
            "| path | bytes / clip-view | cache | extraction (bound) | step (bound) | epoch | recipe |",
            "|---|---|---|---|---|---|---|"]
    for r in plan.rows:
        ext = f"{fmt_s(r.extraction.seconds)} ({r.extraction.bound})" if r.extraction else "-"
        out.append(f"| {r.name} | {r.bytes_per_clip_view:,} | {fmt_bytes(r.cache_bytes) if r.cache_bytes else '-'} | {ext} | "
                   f"{r.step.seconds:.3g} s ({r.step.bound}) | {fmt_s(r.epoch_s)} | {fmt_s(r.recipe_s)} |")
    out += ["", f"recommendation: {plan.recommendation}"]
    return out
