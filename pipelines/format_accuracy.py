"""`make formats-table`: the synthetic benchmark trained from every storage format of the cache.

Issue 9 asks whether the compact formats (int8 / float8_e4m3 features, uint8 or top-K attention maps)
cost accuracy. This recipe answers it on the `make demo` benchmark: same synthetic videos, same
backbone, same decoder recipe, seeds and steps (configs/synthetic_demo.yaml). The only thing that
changes from one row to the next is the storage format chosen at extraction, so each format gets its
own train and eval caches, its own training and its own evaluation. Writes results/formats/table.md
(top-1 and its delta against float16 with a pass/fail on "within 1 point", top-5, motion/appearance
split, bytes per clip-view and on disk) and results/formats/top1_vs_bytes.png.

The float16 row IS the demo: it runs in the demo's work folder (runs/demo) under the demo's stage
names, so `make demo` and this recipe share that cache and that training, whichever runs first. The
other formats reuse the demo's synthetic dataset. Every stage goes through the ledger: a rerun
skips what finished and resumes what was interrupted.

  .venv/bin/python pipelines/format_accuracy.py [--smoke] [--formats int8,fp8] [--work runs/formats] [--out results/formats]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import (
    ROOT, eval_stage, fmt_bytes, fmt_s, load_recipe, main_guard, md_table, pct, read_metrics, rel, run_config, say,
    set_threads, split_accuracy, train_stage, save_figure, write_text_atomic,
)

PASS_POINTS = 1.0  # issue 9: top-1 within 1 point of float16


@dataclass(frozen=True)
class Format:
    """One storage format: the `extract:` keys that select it (``evl-cache extract --dtype ...``)."""

    name: str  # short tag: folder name and --formats key
    label: str  # what the table calls it
    dtype: str = "float16"
    attn_dtype: str = "float16"
    attn_topk: int = 0
    layout: str = "full"  # "prefix": only the residual stream entering the first decoded block is cached
    train_views: str | None = None  # None: the recipe's (eval:1x1); "train:V" caches V augmented views per video
    use_views: int = 0  # train on the first N cached views only (data.train_views); 0: all
    cache: str | None = None  # share this folder's caches (and ledger) with the other rows naming it

    def extract_keys(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "attn_dtype": self.attn_dtype, "attn_topk": self.attn_topk, "layout": self.layout}


# The tiny ViT reads 64 px frames in 8 px patches: P = 64 patches per frame, so a map row has 64
# probabilities. Top-8 keeps 1/8 of each row, top-16 a quarter (values float16, indices uint8).
# float32 comes last: it is the one format larger than the baseline, kept to show whether float16
# storage itself costs anything.
FORMATS = (
    Format("float16", "float16 (baseline)"),
    Format("int8", "int8 features", dtype="int8"),
    Format("fp8", "float8_e4m3 features", dtype="float8_e4m3"),
    Format("u8maps", "float16 + uint8 maps", attn_dtype="uint8"),
    Format("top16", "float16 + top-16 maps", attn_topk=16),
    Format("top8", "float16 + top-8 maps", attn_topk=8),
    Format("int8_u8maps", "int8 + uint8 maps", dtype="int8", attn_dtype="uint8"),
    Format("prefix16", "prefix layout, float16", layout="prefix"),
    Format("prefix8", "prefix layout, float8_e4m3", dtype="float8_e4m3", layout="prefix"),
    Format("float32", "float32", dtype="float32"),
    # Issue 9's V experiment: the reference draws a fresh augmentation every epoch, a cache fixes V of them.
    # The prefix layout is what makes V views affordable, so these rows use it (float16, to isolate V).
    # One store caches 8 augmented views per video; the V row trains on its first V views (each view's
    # augmentation is seeded by (seed, video, view), so those are exactly what a V-view extraction caches).
    *(Format(f"views{v}", f"prefix fp16, {v} augmented view{'s' * (v > 1)}", layout="prefix", train_views="train:8",
             use_views=v, cache="views8") for v in (1, 2, 4, 8)),
)
BASELINE = "float16"
# Run order (the table keeps FORMATS order): the baseline, then the compact combination and the
# feature formats, so an interrupted run has the most telling cells first; float32 last.
RUN_ORDER = ("float16", "int8_u8maps", "prefix8", "fp8", "int8", "views1", "views2", "views4", "views8", "top8",
             "u8maps", "prefix16", "top16", "float32")

# --smoke: the same recipe at toy size (every class, 2 train + 1 val videos each, a few steps):
# it tests the recipe end to end, its accuracies mean nothing.
SMOKE_SYNTH = {"train_per_class": 2, "val_per_class": 1}
SMOKE_TRAIN = {"steps": 3, "batch_size": 8, "eval_every": 3, "checkpoint_every": 3, "log_every": 1}


def select_formats(spec: str | None) -> list[Format]:
    """``--formats a,b``: a subset in table order (the baseline is always included: deltas need it)."""
    if not spec:
        return list(FORMATS)
    names = {f.name for f in FORMATS}
    asked = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [s for s in asked if s not in names]
    if unknown:
        from evl_cache.errors import UserError

        raise UserError(f"--formats: unknown format(s) {', '.join(unknown)}; use some of {', '.join(f.name for f in FORMATS)}")
    keep = set(asked) | {BASELINE}
    return [f for f in FORMATS if f.name in keep]


def smoke_recipe(recipe: dict[str, Any]) -> dict[str, Any]:
    r = copy.deepcopy(recipe)
    r["pipeline"]["synth"] = {**r["pipeline"]["synth"], **SMOKE_SYNTH}
    r["train"] = {**r["train"], **SMOKE_TRAIN}
    return r


def format_recipe(recipe: dict[str, Any], fmt: Format) -> dict[str, Any]:
    r = copy.deepcopy(recipe)
    r["extract"] = {**r["extract"], **fmt.extract_keys()}
    if fmt.train_views:
        r["pipeline"] = {**r["pipeline"], "train_views": fmt.train_views}
    return r


def work_dir(fmt: Format, work: Path, baseline_work: Path) -> Path:
    return baseline_work if fmt.name == BASELINE else work / (fmt.cache or fmt.name)


def pending_extractions(formats: list[Format], work: Path, baseline_work: Path) -> bool:
    """True if some format still has an extraction to run (then one Ray session serves them all)."""
    for fmt in formats:
        p = work_dir(fmt, work, baseline_work) / "stages.json"
        entries = json.loads(p.read_text()) if p.is_file() else {}
        if not all(entries.get(n, {}).get("done") for n in ("extract_train", "extract_eval")):
            return True
    return False


def run_format(fmt: Format, recipe: dict[str, Any], work: Path, baseline_work: Path, data_dir: Path | None,
               backbone: tuple[str, str, str], threads: int, progress: bool) -> dict[str, Any]:
    """Extract, train and evaluate one format; returns its row (the stages' numbers)."""
    from demo import prepare_cache
    from evl_cache.store import open_store

    r = format_recipe(recipe, fmt)
    wd = work_dir(fmt, work, baseline_work)
    c = prepare_cache(r, wd, threads, backbone=backbone, data_dir=data_dir)
    # The baseline uses the demo's stage and folder names, so it is the demo's own training.
    cfg = run_config(r, str(c.train_store), str(c.val_store))
    cfg.data.train_views = fmt.use_views
    tag = f"_{fmt.name}" if fmt.cache else ""  # rows sharing a cache folder train and evaluate apart
    run_dir, eval_dir = wd / f"train{tag}", wd / f"eval{tag}"
    say(f"[4/5] {fmt.label}: train {cfg.train.steps} steps x batch {cfg.train.batch_size} -> {rel(run_dir)}")
    tr = train_stage(c.ledger, f"train{tag}", cfg, run_dir, progress=progress)
    say(f"[5/5] {fmt.label}: evaluate -> {rel(eval_dir)}")
    ev = eval_stage(c.ledger, f"eval{tag}", run_dir / "model", c.val_store, eval_dir)
    m = read_metrics(eval_dir)
    st, vs = open_store(str(c.train_store)), open_store(str(c.val_store))
    si, vi = st.info(), vs.info()
    disk = {"train": si.bytes_on_disk, "eval": vi.bytes_on_disk}
    views = si.num_videos * st.num_views + vi.num_videos * vs.num_views
    ex = {n: c.ledger.results[n] for n in ("extract_train", "extract_eval")}
    return {
        "data_dir": str(c.data_dir), "kinds": c.kinds, "backbone": c.note,
        "feature_format": st.attrs["dtype"], "map_format": map_label(fmt), "train_views": fmt.use_views or st.num_views,
        "top1": m["top1"], "top5": m["top5"], "topk": m["topk"], "videos": m["videos"],
        **split_accuracy(m, c.kinds),
        "bytes_per_view": st.raw_bytes_per_view(), "bytes_per_view_eval": vs.raw_bytes_per_view(),
        "disk_bytes": disk["train"] + disk["eval"], "disk_bytes_train": disk["train"], "disk_bytes_eval": disk["eval"],
        "disk_bytes_per_view": (disk["train"] + disk["eval"]) / views if views else None,
        "extract_s": sum(x.seconds for x in ex.values()), "train_s": tr.seconds, "eval_s": ev.seconds,
        "final_loss": tr.info.get("final_loss"), "samples_per_s": tr.info.get("samples_per_s"),
        "train_store": rel(c.train_store), "val_store": rel(c.val_store),
    }


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    from demo import backbone_choice
    from evl_cache.ray_runtime import ray_session

    began = time.perf_counter()
    threads = set_threads(args.threads)
    recipe = load_recipe(args.config)
    if args.smoke:
        recipe = smoke_recipe(recipe)
    formats = select_formats(args.formats)
    work = args.work or ROOT / "runs" / ("formats_smoke" if args.smoke else "formats")
    baseline_work = args.demo_work or (work / BASELINE if args.smoke else ROOT / "runs" / "demo")
    backbone = backbone_choice(recipe, work)
    rows: dict[str, dict[str, Any]] = {}
    data_dir: Path | None = None
    # One Ray session for every extraction (a Ray start costs seconds; the stages only join it).
    session = ray_session(num_cpus=threads) if pending_extractions(formats, work, baseline_work) else None
    if session is not None:
        session.__enter__()
    try:
        for i, fmt in enumerate(sorted(formats, key=lambda f: RUN_ORDER.index(f.name)), 1):
            say(f"\n=== format {i}/{len(formats)}: {fmt.label} (--layout {fmt.layout} --dtype {fmt.dtype}"
                f" --attn-dtype {fmt.attn_dtype} --attn-topk {fmt.attn_topk}) -> {rel(work_dir(fmt, work, baseline_work))}")
            try:
                row = run_format(fmt, recipe, work, baseline_work, data_dir, backbone, threads, not args.no_progress)
            except Exception as err:  # noqa: BLE001 - a crashing format is a failing cell, not the end of the table
                say(f"  FAILED: {fmt.label}: {type(err).__name__}: {err}")
                row = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
                if fmt.name == BASELINE:
                    raise  # without the baseline's dataset and numbers there is no table
            if fmt.name == BASELINE:
                data_dir = Path(row["data_dir"])
            rows[fmt.name] = row
    finally:
        if session is not None:
            session.__exit__(None, None, None)
    return {"rows": rows, "formats": formats, "smoke": args.smoke, "backbone": backbone[2], "threads": threads,
            "wall_s": time.perf_counter() - began, "recipe": recipe, "work": work, "baseline_work": baseline_work}


# ------------------------------------------------------------------------------ report


def verdicts(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per format: top-1 delta vs float16 in points and pass (|within| PASS_POINTS below) or fail."""
    base = result["rows"][BASELINE]
    out = {}
    for fmt in result["formats"]:
        row = result["rows"][fmt.name]
        if "error" in row:
            out[fmt.name] = {"delta": None, "pass": False}
            continue
        delta = 100 * (row["top1"] - base["top1"])
        out[fmt.name] = {"delta": delta, "pass": None if is_views_row(fmt) else delta >= -PASS_POINTS - 1e-9,
                         "bytes_ratio": row["bytes_per_view"] / base["bytes_per_view"]}
    return out


def is_views_row(fmt: Format) -> bool:
    """A row of the V experiment: the same prefix fp16 store trained on its first V augmented views.
    It asks what fixing V augmentations costs against fresh ones, not whether a format is exact, so
    it gets its own table and plot and no pass/fail verdict."""
    return fmt.train_views is not None


def storage_formats(result: dict[str, Any]) -> list[Format]:
    """The rows that compare storage formats (every row but the V experiment's), in table order."""
    return [f for f in result["formats"] if not is_views_row(f)]


def finished_views_rows(result: dict[str, Any]) -> list[Format]:
    """The V rows that trained and evaluated (a crashed one is listed under the failed cells)."""
    return [f for f in result["formats"] if is_views_row(f) and "error" not in result["rows"][f.name]]


def views_section(result: dict[str, Any], v: dict[str, dict[str, Any]]) -> list[str]:
    """The V experiment's table (empty when no V row was run)."""
    rows = result["rows"]
    done = finished_views_rows(result)
    if not done:
        return []
    table = [[str(f.use_views), pct(rows[f.name]["top1"]), f"{v[f.name]['delta']:+.2f}", pct(rows[f.name]["motion"]),
              pct(rows[f.name]["appearance"]), fmt_s(rows[f.name]["train_s"])] for f in done]
    return [
        "## Cached augmented views (V)\n",
        "Not a storage format: every row reads one prefix-layout float16 store holding 8 training-augmented "
        "views per video (RandomResizedCrop and RandAugment, as the reference recipe draws them) and trains on its "
        "first V views; everything else is the baseline's. The reference draws a fresh augmentation every epoch, "
        "a cache fixes V of them. Δ is against the float16 row, trained on one plain (unaugmented) view.\n",
        md_table(["V", "top-1", "Δ top-1 vs float16, plain view (points)", "motion", "appearance", "train"], table),
        "![top-1 against V](top1_vs_views.png)\n",
    ]


def write_table(out: Path, result: dict[str, Any]) -> dict[str, Any]:
    rows, base = result["rows"], result["rows"][BASELINE]
    v = verdicts(result)
    smoke = result["smoke"]
    header = ["format", "features", "maps", "train views", "top-1", "Δ top-1 vs fp16 (points)", "within 1 point", "top-5",
              "motion", "appearance", "bytes / clip-view", "vs fp16", "on disk (train + eval)", "per view on disk",
              "extract", "train"]
    table = []
    for fmt in storage_formats(result):
        r = rows[fmt.name]
        if "error" in r:
            table.append([fmt.label, fmt.dtype, map_label(fmt), str(fmt.use_views or 1), "FAILED", "-", "**fail** (crashed)", "-", "-", "-",
                          "-", "-", "-", "-", "-", "-"])
            continue
        d = v[fmt.name]
        table.append([
            fmt.label, r["feature_format"], r["map_format"], str(r.get("train_views", 1)), pct(r["top1"]),
            "0 (baseline)" if fmt.name == BASELINE else f"{d['delta']:+.2f}",
            "-" if fmt.name == BASELINE else ("pass" if d["pass"] else "**fail**"),
            pct(r["top5"]), pct(r["motion"]), pct(r["appearance"]),
            f"{r['bytes_per_view']:,} ({fmt_bytes(r['bytes_per_view'])})", f"{d['bytes_ratio']:.3f}x",
            fmt_bytes(r["disk_bytes"]), fmt_bytes(r["disk_bytes_per_view"]), fmt_s(r["extract_s"]), fmt_s(r["train_s"]),
        ])
    failures = [f for f in result["formats"] if "error" in rows[f.name]]
    cfg = run_config(result["recipe"], "a", "b").train
    videos = base["videos"]
    title = "# Storage formats vs accuracy (synthetic benchmark)\n"
    if smoke:
        title = ("# SMOKE RUN: storage formats vs accuracy\n\n**SMOKE RUN: a few videos and "
                 f"{cfg.steps} steps; the accuracies below test the recipe, they mean nothing.**\n")
    passed = [f for f in result["formats"] if f.name != BASELINE and v[f.name]["pass"]]
    others = [f for f in storage_formats(result) if f.name != BASELINE]
    md = [
        title,
        f"The `make demo` benchmark (configs/synthetic_demo.yaml, backbone: {result['backbone']}) trained from each "
        f"storage format: same videos, seeds, {cfg.steps} steps x batch {cfg.batch_size}; only the format chosen at "
        f"extraction differs. Evaluated on {videos} validation videos (1 video = {100 / max(videos, 1):.2f} points). "
        f"Pass = top-1 at most {PASS_POINTS:g} point below float16 (issue 9). Bytes per clip-view: "
        "`open_store(...).raw_bytes_per_view()` (codes + scales + indices, uncompressed).\n",
        md_table(header, table),
        f"{len(passed)} of {len(others)} formats within {PASS_POINTS:g} point of float16.\n",
        *views_section(result, v),
    ]
    if failures:
        md.append("## Failed cells\n")
        for f in failures:
            md.append(f"- **{f.label}**: `{rows[f.name]['error']}`\n")
    md += [
        "Run-to-run noise: the same float16 recipe rerun on a loaded machine ended one validation video apart "
        "(docs/recipes.md), so differences of one or two videos are within noise.\n",
        f"Threads: {result['threads']} ({platform.processor() or platform.machine()}); wall time of this invocation "
        f"{fmt_s(result['wall_s'])} (stage times are as measured when each stage ran).\n",
        "Caches: " + ", ".join(f"{f.name}: `{rows[f.name]['train_store']}`" for f in result["formats"]
                               if "error" not in rows[f.name]) + ".\n",
        "![top-1 vs bytes per clip-view](top1_vs_bytes.png)\n",
    ]
    write_text_atomic(out / "table.md", "\n".join(md))
    data = {"smoke": smoke, "backbone": result["backbone"], "steps": cfg.steps, "batch_size": cfg.batch_size,
            "pass_points": PASS_POINTS, "wall_s": result["wall_s"],
            "rows": [{"name": f.name, "label": f.label, **f.extract_keys(), **v[f.name],
                      **{k: x for k, x in rows[f.name].items() if k not in ("kinds", "traceback")}}
                     for f in result["formats"]]}
    write_text_atomic(out / "table.json", json.dumps(data, indent=2, default=str) + "\n")
    return data


def map_label(fmt: Format) -> str:
    if fmt.layout == "prefix":
        return "recomputed (tail blocks)"
    return f"top{fmt.attn_topk}:{fmt.attn_dtype}" if fmt.attn_topk else fmt.attn_dtype


def plot(out: Path, result: dict[str, Any]) -> Path:
    """Top-1 per format (bars, the float16 band of -1 point shaded) beside bytes per clip-view."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    ok = [f for f in storage_formats(result) if "error" not in result["rows"][f.name]]
    rows = result["rows"]
    base = rows[BASELINE]
    x = np.arange(len(ok))
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.6), dpi=110)
    top1 = [100 * rows[f.name]["top1"] for f in ok]
    colors = ["tab:blue" if f.name == BASELINE else ("tab:green" if 100 * (rows[f.name]["top1"] - base["top1"]) >= -PASS_POINTS
                                                     else "tab:red") for f in ok]
    ax.bar(x, top1, color=colors)
    ax.axhspan(100 * base["top1"] - PASS_POINTS, 100 * base["top1"], color="tab:blue", alpha=0.15,
               label=f"within {PASS_POINTS:g} point of float16")
    for xi, t, f in zip(x, top1, ok):
        ax.text(xi, t + 0.3, f"{t:.1f}\n{fmt_bytes(rows[f.name]['bytes_per_view'])}", ha="center", va="bottom", fontsize=7)
    lo = min(top1 + [100 * base["top1"] - PASS_POINTS])
    ax.set_ylim(max(0.0, lo - 10), min(100.0, max(top1) + 8) + 4)
    ax.set_xticks(x, [f.label for f in ok], rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("validation top-1 (%)")
    ax.set_title("top-1 per storage format" + (" (SMOKE: meaningless)" if result["smoke"] else ""))
    ax.legend(fontsize=8, loc="lower left")
    ax.grid(axis="y", alpha=0.3)
    kib = [rows[f.name]["bytes_per_view"] / 1024 for f in ok]
    bx.scatter(kib, top1, c=colors, zorder=3)
    # neighbours in size alternate above/below (int8 and fp8 have equal sizes)
    for j, (k, t, f) in enumerate(sorted(zip(kib, top1, ok), key=lambda p: p[0])):
        bx.annotate(f.name, (k, t), textcoords="offset points", xytext=(4, 5 if j % 2 == 0 else -11), fontsize=7)
    bx.axhspan(100 * base["top1"] - PASS_POINTS, 100 * base["top1"], color="tab:blue", alpha=0.15)
    bx.set_xlabel("stored KiB per clip-view")
    bx.set_ylabel("validation top-1 (%)")
    bx.set_title("top-1 vs bytes per clip-view")
    bx.grid(alpha=0.3)
    return save_figure(fig, out / "top1_vs_bytes.png")


def plot_views(out: Path, result: dict[str, Any]) -> Path | None:
    """Top-1 against the number of cached augmented views V, beside the plain-view float16 baseline."""
    rows = result["rows"]
    done = finished_views_rows(result)
    if not done:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    vs = [f.use_views for f in done]
    for key, label, style in (("top1", "all classes", "o-"), ("motion", "motion classes", "^--"),
                              ("appearance", "appearance classes", "s:")):
        if all(rows[f.name].get(key) is not None for f in done):
            ax.plot(vs, [100 * rows[f.name][key] for f in done], style, label=label)
    ax.axhline(100 * rows[BASELINE]["top1"], color="tab:blue", alpha=0.5, lw=1,
               label=f"float16, one plain view: {100 * rows[BASELINE]['top1']:.1f}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(vs, [str(x) for x in vs])
    ax.set_xlabel("cached augmented views per video (V)")
    ax.set_ylabel("validation top-1 (%)")
    ax.set_title("fixed augmentations: top-1 against V" + (" (SMOKE: meaningless)" if result["smoke"] else ""))
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    return save_figure(fig, out / "top1_vs_views.png")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="The synthetic benchmark trained from every cache storage format")
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "synthetic_demo.yaml")
    ap.add_argument("--work", type=Path, default=None, help="caches and runs (default runs/formats, or runs/formats_smoke)")
    ap.add_argument("--demo-work", type=Path, default=None,
                    help="work folder of the float16 baseline (default runs/demo: shared with `make demo`; "
                         "with --smoke, WORK/float16)")
    ap.add_argument("--out", type=Path, default=None, help="table.md, table.json, top1_vs_bytes.png, top1_vs_views.png (default results/formats)")
    ap.add_argument("--formats", default=None, help=f"comma-separated subset of {','.join(f.name for f in FORMATS)}")
    ap.add_argument("--smoke", action="store_true", help="a few videos and steps: tests the recipe in about a minute")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    out = args.out or ROOT / "results" / ("formats_smoke" if args.smoke else "formats")
    result = run_all(args)
    out.mkdir(parents=True, exist_ok=True)
    data = write_table(out, result)
    plot(out, result)
    plot_views(out, result)
    say(f"\nstorage formats vs accuracy{' (SMOKE)' if args.smoke else ''}: {rel(out / 'table.md')}")
    for r in data["rows"]:
        if "error" in r:
            say(f"  {r['label']:<24} FAILED: {r['error']}")
            continue
        verdict = "baseline" if r["name"] == BASELINE else ("V row" if r["pass"] is None else "pass" if r["pass"] else "FAIL")
        say(f"  {r['label']:<24} top-1 {pct(r['top1']):>5}  delta {r['delta']:+6.2f}  {verdict:<8} "
            f"{fmt_bytes(r['bytes_per_view']):>10}/view ({r['bytes_ratio']:.3f}x)")
    return 1 if any("error" in r for r in data["rows"]) else 0


if __name__ == "__main__":
    os.chdir(ROOT)
    main_guard(main)
