"""`make reproduce-table1`: every EVL row of the paper's Table 1 (Kinetics-400), end to end.

Per row (configs/k400_*.yaml): extract train views and eval views into caches, train the decoder with
the reference recipe, evaluate, count FLOPs; then results/table1.md (paper vs ours) and
results/table1_accuracy_vs_gflops.png (the paper's Figure 1 style). Finished stages are skipped on
rerun, interrupted ones resume.

Inputs (environment variables, or the same names as Make variables):
  K400_ROOT     Kinetics-400 root (videos under <root>/train, <root>/val)
  K400_ANN      annotation folder or the folder of train.csv/val.csv (default: <root>/annotations)
  CLIP_B16, CLIP_L14, CLIP_L14_336   local CLIP weight files (OpenAI .pt or open_clip state dicts)

`--smoke` (`make reproduce-table1 SMOKE=1`) runs every row at tiny scale on the synthetic dataset
instead: a random-init tiny ViT per row whose shape mimics the row (frames, stride ratio, eval views,
K = 4 blocks; more blocks and a larger image for L/14 and 336 px), a few steps. It tests the recipe,
not accuracy: its accuracy column is synthetic, and labelled so.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from common import (
    ROOT, Ledger, UserError, eval_stage, extract_plan, extract_stage, fmt_bytes, fmt_s, load_recipe, main_guard,
    md_table, pct, read_metrics, run_config, say, set_threads, synth_stage, train_stage, save_figure, write_text_atomic,
)

ROWS = ["k400_vitb16_8f", "k400_vitb16_16f", "k400_vitb16_32f", "k400_vitl14_8f", "k400_vitl14_16f",
        "k400_vitl14_32f", "k400_vitl14_336_32f"]
INPUT_VARS = ("K400_ROOT", "K400_ANN", "CLIP_B16", "CLIP_L14", "CLIP_L14_336")

# Smoke scale: the synthetic dataset with 32-frame clips, and per row a tiny ViT mimicking its shape.
SMOKE_SYNTH = {"classes": "moving_left,moving_right,static_circle,static_square", "train_per_class": 3,
               "val_per_class": 2, "seed": 0, "size": 32, "frames": 32, "fps": 8}
SMOKE_TRAIN = {"steps": 3, "batch_size": 4, "log_every": 1, "eval_every": 3, "checkpoint_every": 3,
               "eval_batch_size": 8}


def smoke_arch(arch: str) -> dict[str, Any]:
    """A tiny open_clip config mimicking ``arch``: B/16 -> 6 blocks at 32 px; L/14 -> 8 blocks; @336 -> 48 px."""
    layers = 8 if "L-14" in arch else 6
    image = 48 if arch.endswith("336") else 32
    return {"embed_dim": 32, "quick_gelu": True,
            "vision_cfg": {"image_size": image, "layers": layers, "width": 64, "patch_size": 8, "head_width": 16},
            "text_cfg": {"context_length": 16, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}}


def smoke_stride(frames: int, video_frames: int) -> int:
    """Dense stride that keeps a smoke clip inside the short synthetic video (the rows' 16/8 scaled down)."""
    return max(1, video_frames // frames)


def env(name: str, given: str | None) -> str | None:
    value = given if given is not None else os.environ.get(name)
    return value or None


def check_inputs(args: argparse.Namespace, rows: list[dict[str, Any]]) -> dict[str, str]:
    """Fail fast, with one line naming the first missing variable or path, before any work starts."""
    hint = ("run `make reproduce-table1 K400_ROOT=/data/k400 K400_ANN=/data/k400/annotations CLIP_B16=ViT-B-16.pt "
            "CLIP_L14=ViT-L-14.pt CLIP_L14_336=ViT-L-14-336px.pt`, or `make reproduce-table1 SMOKE=1` for the synthetic smoke run")
    got = {k: env(k, getattr(args, k.lower())) for k in INPUT_VARS}
    if not got["K400_ROOT"]:
        raise UserError(f"reproduce-table1 needs Kinetics-400: K400_ROOT is not set; {hint}")
    if not Path(got["K400_ROOT"]).is_dir():
        raise UserError(f"K400_ROOT={got['K400_ROOT']} is not a directory; point it at the Kinetics-400 root (videos in train/, val/)")
    if got["K400_ANN"] and not Path(got["K400_ANN"]).exists():
        raise UserError(f"K400_ANN={got['K400_ANN']} does not exist; point it at the folder holding train.csv and val.csv")
    for row in rows:
        var = row["recipe"]["pipeline"]["weights_var"]
        if not got.get(var):
            raise UserError(f"row {row['name']} needs CLIP weights: {var} is not set; {hint}")
        if not Path(got[var]).is_file():
            raise UserError(f"{var}={got[var]} is not a file; point it at the local CLIP weights for {row['recipe']['pipeline']['label']}")
    inputs = {k: v for k, v in got.items() if v}
    for split in sorted({row["recipe"]["pipeline"].get(k, d) for row in rows for k, d in (("train_split", "train"), ("eval_split", "val"))}):
        k400_manifest(inputs, split)  # annotation problems surface now, before any work starts
    return inputs


def prepare_row(row: dict[str, Any], work: Path, inputs: dict[str, str], smoke: bool, threads: int) -> dict[str, Any]:
    """Extract one row's train and eval caches (skipped when done); shared with the Table 8 recipe."""
    from evl_cache.datasets import load_manifest

    name, recipe = row["name"], row["recipe"]
    r, e = recipe["pipeline"], recipe["extract"]
    rdir = work / name
    ledger = Ledger(rdir)
    say(f"== {name}: {r['label']} {e['frames']} frames, eval views {e['views']}" + (" [SMOKE]" if smoke else ""))
    if smoke:
        arch_path = rdir / "smoke_arch.json"
        write_text_atomic(arch_path, json.dumps(smoke_arch(e["arch"]), indent=1) + "\n")
        data = work / "synth"
        plan_kw = {"arch": str(arch_path), "weights": "random", "stride": smoke_stride(int(e["frames"]), SMOKE_SYNTH["frames"]),
                   "precision": "fp32", "num_cpus": threads, "batch_size": 16}
        manifests = {"train": load_manifest("list", str(data), "train"), "eval": load_manifest("list", str(data), "val")}
        overrides = {"train": dict(SMOKE_TRAIN), "data": {"num_workers": 0}}
    else:
        plan_kw = {"weights": inputs[r["weights_var"]]}
        manifests = {"train": k400_manifest(inputs, r.get("train_split", "train")),
                     "eval": k400_manifest(inputs, r.get("eval_split", "val"))}
        overrides = {}
    train_plan = extract_plan(recipe, r.get("train_views", "train:2"), **plan_kw)
    eval_plan = extract_plan(recipe, e["views"], **plan_kw)
    train_store, eval_store = rdir / "cache" / "train.zarr", rdir / "cache" / "eval.zarr"
    s_tr = extract_stage(ledger, "extract_train", manifests["train"], train_store, train_plan)
    s_ev = extract_stage(ledger, "extract_eval", manifests["eval"], eval_store, eval_plan)
    return {"dir": rdir, "ledger": ledger, "train_store": train_store, "eval_store": eval_store, "overrides": overrides,
            "train_plan": train_plan, "classes": len(manifests["eval"].class_names), "stages": (s_tr, s_ev)}


_MANIFESTS: dict[tuple, Any] = {}


def k400_manifest(inputs: dict[str, str], split: str) -> Any:
    """The Kinetics-400 manifest of a split, read once per run (every row shares it)."""
    from evl_cache.datasets import load_manifest

    key = (inputs["K400_ROOT"], inputs.get("K400_ANN"), split)
    if key not in _MANIFESTS:
        try:
            _MANIFESTS[key] = load_manifest("k400", inputs["K400_ROOT"], split, annotations=inputs.get("K400_ANN"))
        except UserError as err:
            raise UserError(f"Kinetics-400 {split} manifest (K400_ROOT={inputs['K400_ROOT']}, "
                            f"K400_ANN={inputs.get('K400_ANN') or 'unset'}): {err} (set K400_ANN to the folder of "
                            f"train.csv and val.csv)") from None
    return _MANIFESTS[key]


def run_row(row: dict[str, Any], work: Path, inputs: dict[str, str], smoke: bool, threads: int,
            progress: bool) -> dict[str, Any]:
    """Extract, train, evaluate and count one row; returns its table entry."""
    from evl_cache.flops import model_cost

    p = prepare_row(row, work, inputs, smoke, threads)
    name, recipe = row["name"], row["recipe"]
    r, e = recipe["pipeline"], recipe["extract"]
    rdir, ledger, (s_tr, s_ev) = p["dir"], p["ledger"], p["stages"]
    cfg = run_config(recipe, str(p["train_store"]), str(p["eval_store"]), **p["overrides"])
    s_train = train_stage(ledger, "train", cfg, rdir / "train", progress=progress)
    s_eval = eval_stage(ledger, "eval", rdir / "train" / "model", p["eval_store"], rdir / "eval")
    metrics = read_metrics(rdir / "eval")

    views = int(recipe["pipeline"]["paper"]["views"])
    k = int(recipe["model"].get("num_layers") or e["decoder_layers"])
    full = model_cost(e["arch"], int(e["frames"]), views, k, 400)
    ran = model_cost(p["train_plan"].arch, int(e["frames"]), views, k, p["classes"]) if smoke else full
    from evl_cache.checkpoints import read_checkpoint_config
    from evl_cache.flops import decoder_params

    trained_params = decoder_params(read_checkpoint_config(rdir / "train" / "model.json")["decoder"])
    return {
        "name": name, "label": r["label"], "frames": int(e["frames"]), "views": views, "grid": e["views"],
        "paper": recipe["pipeline"]["paper"], "top1": metrics["top1"], "top5": metrics["top5"], "topk": metrics["topk"],
        "counted_gflops": full.total_gmacs, "counted_params": full.trainable_params,
        "ran_gflops": ran.total_gmacs, "trained_params": trained_params,
        "stages": {n: {"seconds": s.seconds, **({"bytes": s.info.get("bytes")} if "bytes" in s.info else {})}
                   for n, s in (("extract_train", s_tr), ("extract_eval", s_ev), ("train", s_train), ("eval", s_eval))},
    }


def write_table(out: Path, results: list[dict[str, Any]], smoke: bool, wall: float) -> Path:
    tag = "SMOKE " if smoke else ""
    header = ["model", "frames x views", "paper top-1", f"{tag}top-1", f"{tag}top-5", "paper GFLOPs",
              "counted GFLOPs", "paper params", "counted params", "extract train", "extract eval", "train", "eval"]
    if smoke:
        header.insert(7, "ran GFLOPs (tiny)")
    rows = []
    for x in results:
        st = x["stages"]
        p = x["paper"]
        row = [x["label"], f"{x['frames']} x {x['views']} ({x['grid'].split(':')[-1]})", p["top1"],
               pct(x["top1"]), pct(x["top5"]), f"{p['gflops']:,}", f"{x['counted_gflops']:,.0f}"]
        if smoke:
            row.append(f"{x['ran_gflops']:.3f}")
        row += [f"{p['trainable_params_m']} M" if p.get("trainable_params_m") else "-", f"{x['counted_params'] / 1e6:.1f} M",
                f"{fmt_s(st['extract_train']['seconds'])}, {fmt_bytes(st['extract_train'].get('bytes'))}",
                f"{fmt_s(st['extract_eval']['seconds'])}, {fmt_bytes(st['extract_eval'].get('bytes'))}",
                fmt_s(st["train"]["seconds"]), fmt_s(st["eval"]["seconds"])]
        rows.append(row)
    md = ["# EVL Table 1 (Kinetics-400): paper vs evl-cache\n"]
    if smoke:
        md.append("**SMOKE RUN: the top-1/top-5 columns are NOT Kinetics-400.** Every row ran end to end at tiny "
                  "scale on the synthetic dataset (4 classes, a few training steps) with a random-init tiny ViT "
                  "shaped like the row (same frames, eval views and K = 4); it tests the recipe, not accuracy. "
                  "\"ran GFLOPs\" is the tiny model's cost; \"counted\" columns are our count of the real model. "
                  "Run with K400_ROOT and the CLIP weights for the real table.\n")
    md += [md_table(header, rows),
           "GFLOPs are multiply-accumulates over all views (the paper's convention), counted by `evl_cache.flops` "
           "for the real architecture (`evl-cache flops --table1` explains where the paper's own numbers differ). "
           "Trainable params: the decoder and head (400 classes). Stage cells: wall time, bytes on disk. "
           f"Total wall time of this invocation: {fmt_s(wall)}.\n",
           "![accuracy vs GFLOPs](table1_accuracy_vs_gflops.png)\n"]
    path = out / "table1.md"
    write_text_atomic(path, "\n".join(md))
    write_text_atomic(out / "table1.json", json.dumps({"smoke": smoke, "rows": results}, indent=2, default=str) + "\n")
    return path


def plot_figure1(out: Path, results: list[dict[str, Any]], smoke: bool) -> Path:
    """Top-1 vs GFLOPs (log x) like the paper's Figure 1: paper curves per backbone, ours as markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from evl_cache.flops import TABLE1

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    colours = {"B/16": "tab:blue", "L/14": "tab:orange", "L/14@336": "tab:red"}
    for label in colours:
        pts = [(g, t) for lab, _, _, g, t in TABLE1 if lab == label]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "-o", color=colours[label], label=f"EVL {label} (paper)")
    ours = [x for x in results if x["top1"] is not None]
    target = ax.twinx() if smoke else ax
    for x in ours:
        target.scatter([x["counted_gflops"]], [100 * x["top1"]], marker="*", s=140, zorder=5,
                       facecolors="none" if smoke else colours.get(x["label"], "k"),
                       edgecolors=colours.get(x["label"], "k"))
        target.annotate(f"{x['frames']}f", (x["counted_gflops"], 100 * x["top1"]), textcoords="offset points",
                        xytext=(5, -10), fontsize=7)
    ax.scatter([], [], marker="*", s=140, color="gray", facecolors="none" if smoke else "gray",
               label="evl-cache (SMOKE, synthetic data, right axis)" if smoke else "evl-cache (ours)")
    if smoke:
        target.set_ylabel("SMOKE top-1 on synthetic data (%), NOT Kinetics-400")
        target.set_ylim(0, 100)
    ax.set_xscale("log")
    ax.set_xlabel("GFLOPs (multiply-accumulates, all views)")
    ax.set_ylabel("Kinetics-400 top-1 (%)")
    ax.set_title("EVL accuracy vs inference cost" + (" [SMOKE RUN]" if smoke else ""))
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="upper left", fontsize=8)
    return save_figure(fig, out / "table1_accuracy_vs_gflops.png")


def apply_overrides(recipe: dict[str, Any], items: list[str]) -> None:
    """``train.steps=1000`` style overrides of a recipe's model/train/data sections."""
    from evl_cache.config import apply_override

    for item in items:
        if item.partition(".")[0] not in ("model", "train", "data"):
            raise UserError(f"bad --set '{item}'; only model.*, train.* and data.* values can be overridden")
        apply_override(recipe, item)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Reproduce EVL Table 1 (Kinetics-400), or --smoke on synthetic data")
    ap.add_argument("--smoke", action="store_true", help="every row at tiny scale on the synthetic dataset")
    for var in INPUT_VARS:
        ap.add_argument(f"--{var.lower().replace('_', '-')}", dest=var.lower(), default=None, help=f"overrides ${var}")
    ap.add_argument("--rows", default=None, help=f"comma-separated subset of {','.join(ROWS)}")
    ap.add_argument("--work", type=Path, default=None, help="caches and runs (default runs/table1 or runs/table1_smoke)")
    ap.add_argument("--out", type=Path, default=ROOT / "results", help="table1.md and the figure go here")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override a model/train/data value in every row, e.g. --set train.steps=1000 (repeatable)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    names = ROWS if not args.rows else [n.strip() for n in args.rows.split(",") if n.strip()]
    bad = [n for n in names if n not in ROWS]
    if bad:
        raise UserError(f"unknown --rows {','.join(bad)}; choose from {','.join(ROWS)}")
    rows = [{"name": n, "recipe": load_recipe(ROOT / "configs" / f"{n}.yaml")} for n in names]
    for row in rows:
        apply_overrides(row["recipe"], args.overrides)
    inputs = {} if args.smoke else check_inputs(args, rows)
    work = args.work or ROOT / "runs" / ("table1_smoke" if args.smoke else "table1")
    threads = set_threads(args.threads)
    began = time.perf_counter()
    results = []
    from evl_cache.ray_runtime import ray_session

    with ray_session(num_cpus=threads):  # one Ray for every extraction of every row
        if args.smoke:
            say(f"SMOKE: synthetic dataset -> {work / 'synth'}")
            synth_stage(Ledger(work), "synth", work / "synth", dict(SMOKE_SYNTH))
        for row in rows:
            results.append(run_row(row, work, inputs, args.smoke, threads, not args.no_progress))
    wall = time.perf_counter() - began
    args.out.mkdir(parents=True, exist_ok=True)
    table = write_table(args.out, results, args.smoke, wall)
    fig = plot_figure1(args.out, results, args.smoke)
    say(f"\n{'SMOKE ' if args.smoke else ''}Table 1 done in {fmt_s(wall)}: {table} and {fig}")
    for x in results:
        say(f"  {x['label']:<9} {x['frames']:>2} x {x['views']}: paper {x['paper']['top1']}  "
            f"{'smoke' if args.smoke else 'ours'} {pct(x['top1'])}  GFLOPs paper {x['paper']['gflops']:,} "
            f"counted {x['counted_gflops']:,.0f}")
    return 0


if __name__ == "__main__":
    os.chdir(ROOT)
    main_guard(main)
