"""`make demo`: the whole EVL path on a fresh machine, offline, in minutes on a laptop CPU.

synthetic motion videos -> frozen tiny image-pretrained ViT on a local Ray -> train + eval caches
-> EVL decoder trained from the cache -> evaluation -> results/demo/report.md with plots.

The backbone is the committed tiny ViT (evl_cache/assets/tiny_vit, made by `make pretrain-tiny`),
or a real CLIP when EVL_CLIP_WEIGHTS names a local file (arch from EVL_CLIP_ARCH, default
ViT-B-16; slow on CPU). If the tiny weights are missing it runs on random weights and says so loudly.
Rerunning skips finished stages; an interrupted stage resumes.

  .venv/bin/python pipelines/demo.py [--config configs/synthetic_demo.yaml] [--work runs/demo] [--out results/demo]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import (
    ROOT, Ledger, class_kinds, clip_backbone_from_env, copy_into, eval_stage, extract_plan, extract_stage, fmt_bytes,
    fmt_s, load_recipe, rel, main_guard, md_table, pct, read_metrics, run_config, say, set_threads, split_accuracy,
    TINY_DIR, synth_stage, tiny_backbone, train_stage, write_text_atomic,
)

from evl_cache.errors import UserError


def recipe_backbone(recipe: dict[str, Any]) -> tuple[str, str, str] | None:
    """The recipe's own ``extract.arch``/``extract.weights`` when they name another model than the tiny ViT
    (e.g. the tiny CLIP of configs/synthetic_text_demo.yaml); None for the tiny ViT and its fallback."""
    e = recipe.get("extract") or {}
    if not e.get("weights") or e["weights"] == "random":
        return None
    weights, arch = ROOT / e["weights"], ROOT / e.get("arch", "")
    if weights.resolve() == (TINY_DIR / "weights.safetensors").resolve():
        return None
    if not weights.is_file() or not arch.is_file():
        missing = weights if not weights.is_file() else arch
        raise UserError(f"recipe {recipe.get('_path', 'config')}: extract.arch/extract.weights {rel(missing)} not found; "
                        f"make it first (e.g. `make pretrain-tiny-clip` for evl_cache/assets/tiny_clip) or fix the path")
    return str(arch), str(weights), f"the recipe's backbone {rel(weights.parent)}"


def backbone_choice(recipe: dict[str, Any], work: Path) -> tuple[str, str, str]:
    """(arch, weights, note): real CLIP from the environment, else the recipe's own model, else the committed tiny ViT."""
    clip = clip_backbone_from_env()
    if clip is not None:
        say(f"backbone: {clip[2]} -- real CLIP on CPU is slow (about 17 GMACs per frame for B/16)")
        return clip
    arch, weights, note = recipe_backbone(recipe) or tiny_backbone(work)
    say(f"backbone: {note}")
    return arch, weights, note


@dataclass
class Cache:
    """The synthetic dataset and its train/eval caches, as the demo and the Table 8 recipe share them."""

    ledger: Ledger
    data_dir: Path
    train_store: Path
    val_store: Path
    kinds: dict[str, str]
    note: str
    arch: str


def prepare_cache(recipe: dict[str, Any], work: Path, threads: int, steps_total: int = 5,
                  backbone: tuple[str, str, str] | None = None, data_dir: Path | None = None) -> Cache:
    """Stages 1-3: synthetic videos, then train and eval caches (skipped when already done).

    ``backbone`` (arch, weights, note) overrides the choice from the environment; ``data_dir`` reuses a
    dataset another work folder already generated (e.g. the random-init baseline of the Table 8 recipe).
    """
    from evl_cache.datasets import load_manifest
    from evl_cache.ray_runtime import ray_session

    work.mkdir(parents=True, exist_ok=True)
    ledger = Ledger(work)
    arch, weights, note = backbone or backbone_choice(recipe, work)
    r = recipe["pipeline"]
    train_store, val_store = work / "cache" / "train.zarr", work / "cache" / "val.zarr"
    if data_dir is None:
        data_dir = work / "synth"
        say(f"[1/{steps_total}] synthetic dataset -> {rel(data_dir)}")
        synth_stage(ledger, "synth", data_dir, dict(r["synth"]))
    else:
        say(f"[1/{steps_total}] synthetic dataset: reusing {rel(data_dir)}")
    train_plan = extract_plan(recipe, r.get("train_views", "train:2"), arch=arch, weights=weights, num_cpus=threads)
    eval_plan = extract_plan(recipe, recipe["extract"].get("views", "eval"), arch=arch, weights=weights, num_cpus=threads)
    manifests = {s: load_manifest("list", str(data_dir), s) for s in ("train", "val")}
    pending = [n for n in ("extract_train", "extract_eval") if not ledger.entries.get(n, {}).get("done")]
    with _maybe_ray(bool(pending), threads, ray_session):  # one Ray start for both extractions
        say(f"[2/{steps_total}] extract train views ({train_plan.views}) -> {rel(train_store)}")
        extract_stage(ledger, "extract_train", manifests["train"], train_store, train_plan)
        say(f"[3/{steps_total}] extract eval views ({eval_plan.views}) -> {rel(val_store)}")
        extract_stage(ledger, "extract_eval", manifests["val"], val_store, eval_plan)
    return Cache(ledger, data_dir, train_store, val_store, class_kinds(data_dir), note, arch)


def run_demo(config: Path, work: Path, out: Path, threads: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) every stage and write the report; returns the report's numbers."""
    began = time.perf_counter()
    recipe = load_recipe(config)
    threads = set_threads(threads)
    c = prepare_cache(recipe, work, threads)
    run_dir, eval_dir = work / "train", work / "eval"
    cfg = run_config(recipe, str(c.train_store), str(c.val_store))
    say(f"[4/5] train the EVL decoder: {cfg.train.steps} steps x batch {cfg.train.batch_size} -> {rel(run_dir)}")
    train_stage(c.ledger, "train", cfg, run_dir, progress=progress)
    say(f"[5/5] evaluate -> {rel(eval_dir)}")
    eval_stage(c.ledger, "eval", run_dir / "model", c.val_store, eval_dir)

    metrics = read_metrics(eval_dir)
    numbers = write_report(out, c.ledger, metrics, c.kinds, c.note, c.arch, run_dir, eval_dir, c.train_store,
                           c.val_store, time.perf_counter() - began, threads, cfg)
    say(f"\ndemo finished: top-1 {pct(numbers['top1'])}%  top-{numbers['topk']} {pct(numbers['top5'])}%  "
        f"(motion classes {pct(numbers['motion'])}%, appearance {pct(numbers['appearance'])}%)")
    say("stage times: " + ", ".join(f"{k} {fmt_s(v)}" for k, v in numbers["stage_seconds"].items()) +
        f"; total {fmt_s(numbers['stage_total_s'])}; cache {fmt_bytes(numbers['cache_bytes'])}")
    say(f"report: {rel(out / 'report.md')}")
    return numbers


class _maybe_ray:
    """Hold one Ray session across both extractions (saves a Ray start), only if one will run."""

    def __init__(self, needed: bool, threads: int, session: Any) -> None:
        self.cm = session(num_cpus=threads) if needed else None

    def __enter__(self) -> None:
        if self.cm is not None:
            self.cm.__enter__()

    def __exit__(self, *exc: Any) -> None:
        if self.cm is not None:
            self.cm.__exit__(*exc)


def write_report(out: Path, ledger: Ledger, metrics: dict[str, Any], kinds: dict[str, str], note: str, arch: str,
                 run_dir: Path, eval_dir: Path, train_store: Path, val_store: Path, wall: float, threads: int,
                 cfg: Any) -> dict[str, Any]:
    from evl_cache.store import count_entries, open_store

    out.mkdir(parents=True, exist_ok=True)
    split = split_accuracy(metrics, kinds)
    stages = {name: res.seconds for name, res in ledger.results.items()}
    cache = {"train": count_entries(str(train_store))[1], "eval": count_entries(str(val_store))[1]}
    st = open_store(str(train_store))
    vs = open_store(str(val_store))
    plots = {}
    for src, name in [(run_dir / "plots" / "loss.png", "loss.png"), (run_dir / "plots" / "val_accuracy.png", "val_accuracy.png"),
                      (run_dir / "plots" / "lr.png", "lr.png"), (eval_dir / "confusion_matrix.png", "confusion_matrix.png")]:
        if copy_into(src, out, name):
            plots[name] = name
    rows = []
    for name, pc in metrics["per_class"].items():
        rows.append([name, kinds.get(name, "-"), pc["support"], pct(pc["accuracy"])])
    stage_rows = [[name, fmt_s(sec), "skipped (done earlier)" if ledger.results[name].skipped else "ran now"]
                  for name, sec in stages.items()]
    train_info = ledger.results["train"].info
    numbers = {
        "top1": metrics["top1"], "top5": metrics["top5"], "topk": metrics["topk"],
        "mean_class": metrics["mean_class_accuracy"], "motion": split["motion"], "appearance": split["appearance"],
        "videos": metrics["videos"], "views": metrics["views"], "stage_seconds": stages,
        "stage_total_s": sum(stages.values()), "wall_s_this_run": wall, "cache_bytes": sum(cache.values()),
        "cache_bytes_train": cache["train"], "cache_bytes_eval": cache["eval"], "backbone": note, "threads": threads,
        "train_samples_per_s": train_info.get("samples_per_s"),
    }
    md = [
        "# evl-cache demo report\n",
        f"Synthetic motion benchmark (evl_cache/synth.py), backbone: **{note}**, "
        f"decoder trained from the cache for {cfg.train.steps} steps x batch {cfg.train.batch_size} on "
        f"{threads} CPU thread(s) ({platform.processor() or platform.machine()}).\n",
        "## Accuracy\n",
        md_table(["metric", "value"], [
            ["top-1", f"{pct(metrics['top1'])}%"], [f"top-{metrics['topk']}", f"{pct(metrics['top5'])}%"],
            ["mean class accuracy", f"{pct(metrics['mean_class_accuracy'])}%"],
            ["motion classes (need temporal order)", f"{pct(split['motion'])}%"],
            ["appearance classes (one frame suffices)", f"{pct(split['appearance'])}%"],
            ["chance", f"{100 / max(1, len(metrics['per_class'])):.1f}%"],
            ["eval videos x views", f"{metrics['videos']} x {metrics['views']}"],
        ]),
        "## Per-class accuracy\n",
        md_table(["class", "kind", "videos", "top-1 %"], rows),
        "## Time per stage\n",
        md_table(["stage", "wall time", "this run"], stage_rows),
        f"Sum of stages: {fmt_s(numbers['stage_total_s'])} (wall time of this invocation: {fmt_s(wall)}). "
        f"Training speed {train_info.get('samples_per_s') or 0:.1f} clip-views/s.\n",
        "## Cache\n",
        md_table(["store", "videos x views", "bytes on disk", "per view (raw)", "blocks", "attention"], [
            [rel(train_store), f"{st.info().done} x {st.num_views}", f"{cache['train']:,} ({fmt_bytes(cache['train'])})",
             fmt_bytes(st.raw_bytes_per_view()), st.blocks, st.attention],
            [rel(val_store), f"{vs.info().done} x {vs.num_views}", f"{cache['eval']:,} ({fmt_bytes(cache['eval'])})",
             fmt_bytes(vs.raw_bytes_per_view()), vs.blocks, vs.attention],
        ]),
        "## Plots\n",
    ]
    for title, name in [("Training loss", "loss.png"), ("Validation accuracy", "val_accuracy.png"),
                        ("Learning rate", "lr.png"), ("Confusion matrix", "confusion_matrix.png")]:
        if name in plots:
            md.append(f"![{title}]({name})\n")
    md.append(f"\nRun directory: `{rel(run_dir)}`; predictions: `{rel(eval_dir / 'predictions.csv')}`. "
              f"Rerun `make demo` to reuse every finished stage.\n")
    write_text_atomic(out / "report.md", "\n".join(md))
    write_text_atomic(out / "report.json", json.dumps(numbers, indent=2, default=str) + "\n")
    return numbers


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="evl-cache demo: synthetic videos -> cache -> decoder -> report")
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "synthetic_demo.yaml")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "demo", help="datasets, caches and runs")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "demo", help="report.md and plots")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    ap.add_argument("--min-top1", type=float, default=None,
                    help="exit 1 if top-1 ends below this fraction (CI: the demo must still learn, not just run)")
    args = ap.parse_args(argv)
    numbers = run_demo(args.config, args.work, args.out, args.threads, progress=not args.no_progress)
    if args.min_top1 is not None and numbers["top1"] < args.min_top1:
        print(f"error: demo top-1 {pct(numbers['top1'])}% is below --min-top1 {pct(args.min_top1)}%; "
              f"see {rel(args.out / 'report.md')}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    os.chdir(ROOT)
    main_guard(main)
