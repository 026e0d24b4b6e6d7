"""Compact cache formats (evl_cache.quant): error against the float32 backbone output and bytes per clip-view.

Run: .venv/bin/python benchmarks/bench_quant.py [--out results/bench/quant] [--tiny-clips 8] [--b16-clips 2]

Sources of real-shaped data (last 4 blocks, one centre view per clip, 8 frames at stride 2):
  tiny     the committed pretrained tiny ViT (evl_cache/assets/tiny_vit) on `evl-cache synth` videos (64 px);
  b16      a RANDOM-INIT ViT-B/16 on synthetic videos rendered and decoded (decord) at 224 px;
  b16+inj  the b16 features with INJECTED outliers: 4 channels x50 and 2% of patch tokens x10, the
           two phenomena of trained CLIP towers that neither a random init nor the tiny ViT shows.
Every format is compared with the float32 output (the float16 row is the baseline's own error).
Attention-map errors are also read through TCA (linear in the maps) with random relative-offset tables.
Also: the channel_token equaliser ablation, how far a channel's range moves between clips (why scales
are per chunk, not per dataset), CPU codec times, and bytes per clip-view of every format from the
schema at ViT-B/16 8f and ViT-L/14 32f. About 70-85 s of CPU on 2 threads (more wall time on a busy machine).
Prints markdown tables and writes quant.json and channel_absmax.png under --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from evl_cache.backbone import BackboneSpec, build_backbone
from evl_cache.quant import (FeatureFormat, MapFormat, decode_features, decode_maps, encode_features, encode_maps,
                             topk_dropped_mass)
from evl_cache.synth import write_synthetic_dataset
from evl_cache.tca import tca_direct
from evl_cache.video import Sampling, ViewSet, build_views

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "evl_cache" / "assets" / "tiny_vit"
FEATURE_FORMATS = ["float16"] + [f"{d}:{g}" for d in ("int8", "float8_e4m3")
                                 for g in ("token", "channel", "group32", "group64", "channel_token")]
TOPK = (8, 16, 32, 64)
MAP_FORMATS = ["float16", "uint8:fixed", "uint8:row", "uint8"] + [f"top{k}{v}" for k in TOPK for v in ("", ":uint8")]
# shapes for the bytes table: (name, T, grid side, width); last 4 blocks, one view
SCHEMA_SHAPES = [("ViT-B/16 8f", 8, 14, 768), ("ViT-L/14 32f", 32, 16, 1024)]
PLOT_TITLES = {"tiny": "tiny ViT (pretrained, committed)", "b16": "ViT-B/16 RANDOM init (no real CLIP weights here)",
               "b16+inj": "ViT-B/16 random init + INJECTED outliers (4 channels x50, 2% tokens x10)"}
OUTLIER_FACTOR = 6.0  # a channel whose absmax exceeds 6x the block's median channel absmax counts as an outlier


# ---------------------------------------------------------------------------------------------
# data


def capture(spec: BackboneSpec, videos: list[Path], size: int) -> dict[str, torch.Tensor]:
    """Last-4-block features (N, K, T, L, C) and maps (N, K, 2, T-1, P, P), float32, one view per clip."""
    backbone = build_backbone(spec, attention="maps")
    sampling, views = Sampling("dense", 8, 2), ViewSet("eval", 1, 1, 1)
    feats, maps = [], []
    for path in videos:
        frames, _ = build_views(str(path), sampling, views, size)
        out = backbone(frames)
        feats.append(out["feats"].float())
        maps.append(out["attn"].float())
    return {"feats": torch.cat(feats), "attn": torch.cat(maps)}


def inject_outliers(feats: torch.Tensor, channels: int = 4, channel_gain: float = 50.0,
                    token_frac: float = 0.02, token_gain: float = 10.0, seed: int = 0) -> tuple[torch.Tensor, list[int]]:
    """A copy of feats with a few huge channels (every token) and a few high-norm patch tokens (every channel).

    The same channels in every block and clip (as in trained CLIP); tokens drawn per (clip, block, frame).
    """
    gen = torch.Generator().manual_seed(seed)
    n, k, t, length, c = feats.shape
    chans = torch.randperm(c, generator=gen)[:channels].sort().values.tolist()
    out = feats.clone()
    out[..., chans] *= channel_gain
    hot = torch.rand(n, k, t, length - 1, generator=gen) < token_frac
    out[..., 1:, :] *= torch.where(hot, token_gain, 1.0).unsqueeze(-1)
    return out, chans


def make_videos(root: Path, size: int, classes: str, per_class: int) -> list[Path]:
    out = root / f"synth{size}"
    write_synthetic_dataset(out, classes=classes, train_per_class=per_class, val_per_class=0, frames=16,
                            size=size, seed=0, force=True, progress=False)
    return sorted(out.glob("train/*/*.mp4"))


# ---------------------------------------------------------------------------------------------
# features


def outlier_mask(x: torch.Tensor) -> torch.Tensor:
    """(1, K, 1, 1, C) True for outlier channels of each block (absmax > OUTLIER_FACTOR x median)."""
    absmax = x.abs().amax(dim=(0, 2, 3))  # (K, C)
    return (absmax > OUTLIER_FACTOR * absmax.median(-1, keepdim=True).values)[None, :, None, None, :]


def feature_metrics(x: torch.Tensor, fmt: FeatureFormat, outliers: torch.Tensor) -> dict[str, float]:
    q = encode_features(x, fmt)
    y = decode_features(q.codes, q.scales, fmt, torch.float32)
    cos = F.cosine_similarity(x, y, dim=-1)
    bulk = ~outliers
    cos_bulk = F.cosine_similarity(x * bulk, y * bulk, dim=-1)
    err = y - x
    chunk = tuple(x.shape[1:])  # one clip-view: (K, T, L, C)
    return {
        "cos_mean": cos.mean().item(), "cos_min": cos.min().item(),
        "bulk_cos_mean": cos_bulk.mean().item(), "bulk_cos_min": cos_bulk.min().item(),
        "max_abs_err": err.abs().max().item(), "max_abs_x": x.abs().max().item(),
        "rel_err": (err.norm() / x.norm()).item(),
        "bytes_per_clip_view": fmt.nbytes(chunk),
        "bytes_per_element": fmt.nbytes(chunk) / float(np.prod(chunk)),
    }


def gaussian_stress(tokens: int, seed: int = 0) -> tuple[torch.Tensor, list[int]]:
    """Synthetic Gaussian features (2 clips, 2 blocks, T=4, L=tokens, C=256) with 4 channels x50 and
    2% of tokens x10 (tests/test_quant.py builds the same kind of data)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 2, 4, tokens, 256, generator=gen)
    chans = [3, 77, 150, 201]
    x[..., chans] *= 50.0
    hot = torch.rand(2, 2, 4, tokens, generator=gen) < 0.02
    return x * torch.where(hot, 10.0, 1.0).unsqueeze(-1), chans


def channel_factor_ablation(x: torch.Tensor, outliers: torch.Tensor) -> dict[str, dict[str, float]]:
    """int8:channel_token with each channel equaliser (decode is the same for all three)."""
    fmt = FeatureFormat.parse("int8:channel_token")
    out = {}
    for stat in ("geomean", "rms", "absmax"):
        q = encode_features(x, fmt, channel_stat=stat)
        y = decode_features(q.codes, q.scales, fmt)
        cos = F.cosine_similarity(x, y, dim=-1)
        bulk = F.cosine_similarity(x * ~outliers, y * ~outliers, dim=-1)
        out[stat] = {"cos_min": cos.min().item(), "cos_mean": cos.mean().item(), "bulk_cos_min": bulk.min().item(),
                     "rel_err": ((y - x).norm() / x.norm()).item()}
    return out


def channel_spread(x: torch.Tensor) -> dict[str, float]:
    """How a channel's range varies across clips: what a dataset-static (calibrated) scale would face."""
    per_clip = x.abs().amax(dim=(2, 3))  # (N, K, C)
    ratio = per_clip.amax(0) / per_clip.amin(0).clamp_min(1e-12)
    clipped = (x[1:].abs() > per_clip[0][None, :, None, None, :]).float().mean().item() if x.shape[0] > 1 else float("nan")
    return {"clips": x.shape[0], "median_max_over_min": ratio.median().item(), "p99_max_over_min": ratio.flatten().quantile(0.99).item(),
            "frac_beyond_clip0_absmax": clipped}


def time_feature_codec(x: torch.Tensor, fmt: FeatureFormat, repeats: int = 3) -> tuple[float, float]:
    """Median ms to encode and to decode one clip-view (K, T, L, C) on this CPU."""
    one = x[0]
    enc, dec = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        q = encode_features(one, fmt)
        t1 = time.perf_counter()
        decode_features(q.codes, q.scales, fmt, torch.float16)
        t2 = time.perf_counter()
        enc.append(t1 - t0)
        dec.append(t2 - t1)
    return 1e3 * float(np.median(enc)), 1e3 * float(np.median(dec))


# ---------------------------------------------------------------------------------------------
# attention maps


def tca_tables(grid: int, width: int, offset: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    r = (2 * grid - 1) ** 2
    return (torch.randn(r, width, generator=gen) + offset, torch.randn(r, width, generator=gen) + offset)


def map_metrics(a: torch.Tensor, fmt: MapFormat, grid: int, tables: dict[str, tuple[torch.Tensor, torch.Tensor]],
                refs: dict[str, torch.Tensor]) -> dict[str, float]:
    """Errors of decoded maps against float32, and of the TCA readout (linear in A) they feed.

    refs: the TCA readout of the float32 maps for each table (maps flattened to one (N*K) batch)."""
    q = encode_maps(a, fmt)
    out: dict[str, float] = {"bytes_per_clip_view": fmt.nbytes(tuple(a.shape[1:]))}
    for renorm in (False, True):
        d = decode_maps(q, fmt, torch.float32, renormalise=renorm)
        tag = "_renorm" if renorm else ""
        out["max_abs_err" + tag] = (d - a).abs().max().item()
        out["row_l1_err" + tag] = (d - a).abs().sum(-1).mean().item()
        out["row_sum_err" + tag] = (d.sum(-1) - 1).abs().mean().item()
        for name, (wp, wn) in tables.items():
            ref = refs[name]
            got = tca_direct(d.flatten(0, 1), wp, wn, (grid, grid))
            out[f"tca_rel_err_{name}{tag}"] = ((got - ref).norm() / ref.norm()).item()
    return out


def dropped_mass(a: torch.Tensor) -> list[dict[str, float]]:
    """Per block and K: mean and max over rows of 1 - kept mass."""
    rows = []
    for b in range(a.shape[1]):
        blk = a[:, b]
        row = {"block": b}
        for k in TOPK:
            m = topk_dropped_mass(blk, k)
            row[f"top{k}_mean"], row[f"top{k}_max"] = m.mean().item(), m.max().item()
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# bytes from the schema


COMBOS = [("float16", "float16"), ("int8:channel", "uint8"), ("int8:channel_token", "uint8"),
          ("float8_e4m3:channel_token", "uint8"), ("int8:group32", "uint8"), ("int8:channel_token", "top32:uint8"),
          ("int8:channel_token", "top16:uint8"), ("int8:channel_token", "top8:uint8")]


def schema_bytes() -> dict[str, list[dict[str, object]]]:
    """Bytes per clip-view of every format at the SCHEMA_SHAPES, from the formats' own byte counts."""
    feats, maps, combos = [], [], []
    for name, t, side, c in SCHEMA_SHAPES:
        p, blocks = side * side, 4
        fshape, mshape = (blocks, t, p + 1, c), (blocks, 2, t - 1, p, p)
        f16, m16 = FeatureFormat("float16").nbytes(fshape), MapFormat("float16").nbytes(mshape)
        for f in ["float32"] + FEATURE_FORMATS:
            b = FeatureFormat.parse(f).nbytes(fshape)
            feats.append({"shape": name, "format": f, "bytes": b, "ratio_vs_fp16": b / f16})
        for f in MAP_FORMATS:
            b = MapFormat.parse(f).nbytes(mshape)
            maps.append({"shape": name, "format": f, "bytes": b, "ratio_vs_fp16": b / m16})
        for ff, mf in COMBOS:
            fb, mb = FeatureFormat.parse(ff).nbytes(fshape), MapFormat.parse(mf).nbytes(mshape)
            combos.append({"shape": name, "features": ff, "maps": mf, "bytes": fb + mb, "ratio_vs_fp16": (fb + mb) / (f16 + m16)})
    return {"features": feats, "maps": maps, "full_layout": combos}


# ---------------------------------------------------------------------------------------------
# output


def md_table(header: list[str], rows: list[list[object]]) -> str:
    def fmt(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e5 else f"{v:,.0f}"
        if isinstance(v, int):
            return f"{v:,}"
        return str(v)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def plot_absmax(sources: dict[str, torch.Tensor], injected: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(sources), 1, figsize=(10, 2.6 * len(sources)), squeeze=False)
    for ax, (name, x) in zip(axes[:, 0], sources.items()):
        absmax = x[:, -1].abs().amax(dim=(0, 1, 2)).numpy()  # last captured block, over all tokens
        ax.bar(np.arange(absmax.size), absmax, width=1.0, color="tab:blue")
        ax.axhline(OUTLIER_FACTOR * np.median(absmax), color="tab:red", lw=0.8, ls="--", label=f"{OUTLIER_FACTOR:g} x median")
        if "inj" in name:
            ax.plot(injected, absmax[injected], "rv", label="injected channels")
        ax.set_yscale("log")
        ax.set_title(f"{PLOT_TITLES.get(name, name)}: per-channel |x| max, last captured block")
        ax.set_xlabel("channel")
        ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results/bench/quant")
    ap.add_argument("--tiny-clips", type=int, default=8, help="tiny-ViT clips (one per class, 64 px)")
    ap.add_argument("--b16-clips", type=int, default=2, help="random ViT-B/16 clips (224 px); 0 skips B/16")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start, cpu_start = time.perf_counter(), time.process_time()
    timings: dict[str, float] = {}

    def lap(name: str, t0: float, c0: float) -> None:
        timings[name + "_s"] = round(time.perf_counter() - t0, 2)
        timings[name + "_cpu_s"] = round(time.process_time() - c0, 2)
    classes = "moving_left,moving_right,moving_up,moving_down,rotating_cw,growing,approaching,static_cross"
    cls = classes.split(",")

    with tempfile.TemporaryDirectory() as tmp:
        t0, c0 = time.perf_counter(), time.process_time()
        tiny = capture(BackboneSpec(str(TINY / "config.json"), str(TINY / "weights.safetensors")),
                       make_videos(Path(tmp), 64, ",".join(cls[: args.tiny_clips]), 1), 64)
        lap("tiny_capture", t0, c0)
        data = {"tiny": tiny}
        if args.b16_clips:
            t0, c0 = time.perf_counter(), time.process_time()
            data["b16"] = capture(BackboneSpec("ViT-B-16", "random", seed=0),
                                  make_videos(Path(tmp), 224, ",".join(cls[: args.b16_clips]), 1), 224)
            lap("b16_capture", t0, c0)
    sources = {name: d["feats"] for name, d in data.items()}
    injected: list[int] = []
    if "b16" in sources:
        sources["b16+inj"], injected = inject_outliers(sources["b16"])

    report: dict[str, object] = {
        "command": " ".join(["benchmarks/bench_quant.py"] + sys.argv[1:]),
        "torch": torch.__version__, "threads": args.threads, "machine": platform.machine(),
        "reference": "float32 backbone output", "injected_channels": injected,
        "shapes": {n: {"feats": list(d["feats"].shape), "attn": list(d["attn"].shape)} for n, d in data.items()},
    }

    # ---- features
    t0, c0 = time.perf_counter(), time.process_time()
    feat_rows, spread, outlier_counts = [], {}, {}
    for name, x in sources.items():
        mask = outlier_mask(x)
        outlier_counts[name] = mask.sum(-1).flatten().tolist()
        spread[name] = channel_spread(x)
        for f in FEATURE_FORMATS:
            m = feature_metrics(x, FeatureFormat.parse(f), mask)
            feat_rows.append({"source": name, "format": f, **m})
    ablation = {name: channel_factor_ablation(x, outlier_mask(x)) for name, x in sources.items()}
    for tokens in (33, 197):
        g, chans = gaussian_stress(tokens)
        mask = torch.zeros(1, 1, 1, 1, g.shape[-1], dtype=torch.bool)
        mask[..., chans] = True
        ablation[f"gauss L={tokens} (synthetic)"] = channel_factor_ablation(g, mask)
    report["channel_token_factor_ablation"] = ablation
    report["features"] = feat_rows
    report["outlier_channels_per_block"] = outlier_counts
    report["channel_range_across_clips"] = spread
    big = "b16" if "b16" in sources else "tiny"
    report["codec_ms_per_clip_view_cpu"] = {f: dict(zip(("encode", "decode_fp16"), time_feature_codec(sources[big], FeatureFormat.parse(f))))
                                            for f in ("int8:channel", "int8:channel_token", "int8:group32", "float8_e4m3:channel_token")}

    lap("features", t0, c0)

    # ---- attention maps
    t0, c0 = time.perf_counter(), time.process_time()
    map_rows, drops = [], {}
    for name, d in data.items():
        a = d["attn"]
        grid = int(round(a.shape[-1] ** 0.5))
        tables = {"w0": tca_tables(grid, 32, 0.0, 1), "w1": tca_tables(grid, 32, 1.0, 2)}
        refs = {n: tca_direct(a.flatten(0, 1), wp, wn, (grid, grid)) for n, (wp, wn) in tables.items()}
        for f in MAP_FORMATS:
            m = map_metrics(a, MapFormat.parse(f), grid, tables, refs)
            map_rows.append({"source": name, "format": f, **m})
        drops[name] = dropped_mass(a)
    lap("maps", t0, c0)
    report["maps"] = map_rows
    report["dropped_mass"] = drops
    report["schema_bytes"] = schema_bytes()
    plot_absmax(sources, injected, out_dir / "channel_absmax.png")
    lap("total", t_start, cpu_start)
    report["timings_s"] = timings
    (out_dir / "quant.json").write_text(json.dumps(report, indent=2) + "\n")

    # ---- print
    print(f"# bench_quant ({report['command']}; torch {torch.__version__}, {args.threads} threads, {timings['total_s']:.0f} s wall, "
          f"{timings['total_cpu_s']:.0f} s CPU)\n")
    sections = [k[:-2] for k in timings if k.endswith("_s") and not k.endswith("_cpu_s")]
    print("Time per section (wall s / CPU s of all threads): " + ", ".join(f"{k} {timings[k + '_s']} / {timings[k + '_cpu_s']}" for k in sections) + "\n")
    print("Shapes: " + "; ".join(f"{n}: feats {s['feats']}, attn {s['attn']}" for n, s in report["shapes"].items()))
    print(f"Injected (b16+inj): channels {injected} x50, 2% of patch tokens x10. Outlier channels found per block "
          f"(absmax > {OUTLIER_FACTOR:g}x median): " + "; ".join(f"{n} {c}" for n, c in outlier_counts.items()) + "\n")
    print("## Features vs float32 (cosine per token over C; bulk = outlier channels excluded)\n")
    print(md_table(["source", "format", "B/elem", "bytes/clip-view", "cos mean", "cos min", "bulk cos mean", "bulk cos min", "max abs err", "max |x|", "rel err"],
                   [[r["source"], r["format"], r["bytes_per_element"], r["bytes_per_clip_view"], r["cos_mean"], r["cos_min"], r["bulk_cos_mean"],
                     r["bulk_cos_min"], r["max_abs_err"], r["max_abs_x"], r["rel_err"]] for r in feat_rows]))
    print("\n## int8:channel_token: which per-channel equaliser (cos min / bulk cos min / rel err; geomean is the default)\n")
    print(md_table(["source", "geomean = sqrt(rms*absmax)", "rms", "absmax"],
                   [[n] + [f"{v[k]['cos_min']:.5f} / {v[k]['bulk_cos_min']:.5f} / {v[k]['rel_err']:.4f}" for k in ("geomean", "rms", "absmax")]
                    for n, v in ablation.items()]))
    print("\n## A channel's absmax across clips (what one dataset-static per-channel scale would face)\n")
    print(md_table(["source", "clips", "median max/min", "p99 max/min", "frac of later clips' values beyond clip 0's absmax"],
                   [[n, s["clips"], s["median_max_over_min"], s["p99_max_over_min"], s["frac_beyond_clip0_absmax"]] for n, s in spread.items()]))
    print(f"\n## Codec time per clip-view on CPU ({big} shape, {args.threads} threads)\n")
    print(md_table(["format", "encode ms", "decode to fp16 ms"], [[f, v["encode"], v["decode_fp16"]] for f, v in report["codec_ms_per_clip_view_cpu"].items()]))
    print("\n## Attention maps vs float32 (TCA rel err: relative L2 error of the TCA readout with random tables; "
          "w0 zero-mean N(0,1), w1 = N(0,1) + 1; 'rn' = rows renormalised to sum 1 at decode; uint8 = sqrt-companded, "
          "uint8:row = linear per-row scale, uint8:fixed = p*255; topK:uint8 values sqrt-companded)\n")
    print(md_table(["source", "format", "bytes/clip-view", "max abs err", "row L1 err", "|row sum-1|", "TCA w0", "TCA w0 rn", "TCA w1", "TCA w1 rn"],
                   [[r["source"], r["format"], r["bytes_per_clip_view"], r["max_abs_err"], r["row_l1_err"], r["row_sum_err"],
                     r["tca_rel_err_w0"], r["tca_rel_err_w0_renorm"], r["tca_rel_err_w1"], r["tca_rel_err_w1_renorm"]] for r in map_rows]))
    print("\n## Top-k dropped probability mass per block (1 - kept mass; mean / max over rows)\n")
    print(md_table(["source", "block"] + [f"top{k}" for k in TOPK],
                   [[n, r["block"]] + [f"{r[f'top{k}_mean']:.4f} / {r[f'top{k}_max']:.4f}" for k in TOPK] for n, rows in drops.items() for r in rows]))
    print("\n## Bytes per clip-view from the schema (last 4 blocks, 1 view)\n")
    print("features = 4 x T x (P+1) x C x code bytes + scales x 2 (float16): token 4*T*(P+1), channel 4*C, group 4*T*(P+1)*C/G, "
          "channel_token 4*(C + T*(P+1)); maps = 4 x 2 x (T-1) x P rows x (P dense | K top-k) x value bytes "
          "+ top-k indices (1 byte for P <= 256, else 2) + uint8 row scales 2 bytes per row\n")
    sb = report["schema_bytes"]
    for part in ("features", "maps"):
        names = list(dict.fromkeys(r["format"] for r in sb[part]))
        shapes = list(dict.fromkeys(r["shape"] for r in sb[part]))
        cell = {(r["shape"], r["format"]): r for r in sb[part]}
        print(f"\n{part}:\n")
        print(md_table(["format"] + [f"{s} {col}" for s in shapes for col in ("bytes", "x fp16")],
                       [[f] + [v for s in shapes for v in (cell[s, f]["bytes"], cell[s, f]["ratio_vs_fp16"])] for f in names]))
    print("\nfull layout (features + maps):\n")
    print(md_table(["shape", "features", "maps", "bytes", "x fp16"],
                   [[r["shape"], r["features"], r["maps"], r["bytes"], r["ratio_vs_fp16"]] for r in sb["full_layout"]]))
    print(f"\nwrote {out_dir / 'quant.json'} and {out_dir / 'channel_absmax.png'}")


if __name__ == "__main__":
    main()
