"""`make transfer-demo`: the paper's Table 12 fine-tuning, shown offline on the synthetic benchmark.

Table 12 fine-tunes the Kinetics-400 decoder to UCF-101 and HMDB-51 (`make finetune-table12` needs those
datasets). Here the same mechanism runs on generated videos: the benchmark's classes are split into a
SOURCE set and a disjoint TARGET set (configs/synthetic_transfer.yaml says which and why); a decoder is
trained on the source, then three decoders are trained on the target's few videos per class with the same
steps, seed and data:
  scratch        a fresh decoder (what training on the small dataset alone gives)
  finetune x0.1  `train.init_from` the source decoder (every weight but the head, which is fresh since the
                 classes differ), the loaded weights at 0.1 x the learning rate, as the paper does
  finetune x1.0  the same at the full learning rate (other `finetune_lr_mults` add rows)
Each is evaluated on the target's full eval split; results/transfer/table.md, table.json and
transfer.png (top-1 per setting, and top-1 against steps from each run's metrics.jsonl).

Stores are separate per class set (the generator's ``classes=``), extracted with the committed tiny ViT
like `make demo`. Finished stages are skipped on rerun; retraining the source redoes the fine-tuned runs.
`--smoke` runs the whole recipe on a few videos and steps: it tests the recipe, not transfer.

  .venv/bin/python pipelines/transfer_synthetic.py [--config configs/synthetic_transfer.yaml]
      [--work runs/transfer] [--out results/transfer] [--smoke] [--threads N] [--no-progress]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import (
    ROOT, Ledger, eval_stage, extract_plan, extract_stage, fmt_s, load_recipe, main_guard, md_table, pct,
    read_metrics, rel, run_config, save_figure, say, set_threads, split_accuracy, synth_stage, train_stage,
    write_text_atomic,
)
from demo import _maybe_ray, backbone_choice

from evl_cache.errors import UserError

SIDES = ("source", "target")
# --smoke: every class, a few videos and steps (tests the recipe end to end in a couple of minutes).
SMOKE_SYNTH = {"source": {"train_per_class": 2, "val_per_class": 1}, "target": {"train_per_class": 2, "val_per_class": 1}}
SMOKE_STEPS = {"source_steps": 4, "target_steps": 3, "target_eval_every": 3}


@dataclass(frozen=True)
class Setting:
    """One target run: from scratch (``lr_mult`` None) or `init_from` the source at ``lr_mult``."""

    name: str
    label: str
    lr_mult: float | None = None

    @property
    def finetuned(self) -> bool:
        return self.lr_mult is not None


def split_classes(recipe: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(source, target) class names from ``pipeline.source_classes`` / ``target_classes``: known
    synthetic classes, each side non-empty and the two disjoint (else the target is not new classes)."""
    from evl_cache.synth import parse_classes

    p, where = recipe["pipeline"], recipe.get("_path", "recipe")
    sides = []
    for side in SIDES:
        names = p.get(f"{side}_classes")
        if not names:
            raise UserError(f"{where}: pipeline.{side}_classes is missing or empty; list the {side} classes")
        try:
            sides.append(parse_classes(names))
        except UserError as err:
            raise UserError(f"{where}: pipeline.{side}_classes: {err}") from err
    both = sorted(set(sides[0]) & set(sides[1]))
    if both:
        raise UserError(f"{where}: {', '.join(both)} in both pipeline.source_classes and target_classes; "
                        f"the target must be classes the source decoder never saw")
    return sides[0], sides[1]


def settings(recipe: dict[str, Any]) -> list[Setting]:
    """Scratch first, then one fine-tuned run per ``pipeline.finetune_lr_mults`` value (default the paper's 0.1)."""
    mults = recipe["pipeline"].get("finetune_lr_mults", [0.1])
    if not isinstance(mults, list) or not mults or any(not isinstance(m, (int, float)) or m < 0 for m in mults):
        raise UserError(f"{recipe.get('_path', 'recipe')}: pipeline.finetune_lr_mults must be a list of numbers >= 0, "
                        f"e.g. [0.1, 1.0]; got {mults!r}")
    out = [Setting("scratch", "from scratch")]
    for m in dict.fromkeys(float(x) for x in mults):
        out.append(Setting(f"finetune_lr{m:g}", f"fine-tuned, pretrained lr x{m:g}", m))
    return out


def target_config(recipe: dict[str, Any], setting: Setting, train_store: Path, val_store: Path,
                  source_checkpoint: Path) -> Any:
    """The run config of one target setting: the recipe's model/train/data at ``target_steps``, differing
    between settings only in ``init_from`` and ``pretrained_lr_mult``."""
    p = recipe["pipeline"]
    steps = int(p["target_steps"])
    t: dict[str, Any] = {"steps": steps, "eval_every": int(p.get("target_eval_every", steps)), "checkpoint_every": steps}
    if setting.finetuned:
        t.update(init_from=str(source_checkpoint), pretrained_lr_mult=setting.lr_mult)
    return run_config(recipe, str(train_store), str(val_store), train=t)


def source_config(recipe: dict[str, Any], train_store: Path, val_store: Path) -> Any:
    steps = int(recipe["pipeline"]["source_steps"])
    every = max(1, steps // 4)
    return run_config(recipe, str(train_store), str(val_store),
                      train={"steps": steps, "eval_every": every, "checkpoint_every": steps})


def val_curve(run_dir: Path) -> list[tuple[int, float]]:
    """(step, validation top-1) from a run's metrics.jsonl, in step order."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return sorted((int(r["step"]), float(r["val_top1"])) for r in rows if "val_top1" in r)


def smoke_recipe(recipe: dict[str, Any]) -> dict[str, Any]:
    r = copy.deepcopy(recipe)
    for side in SIDES:
        r["pipeline"][side] = {**r["pipeline"][side], **SMOKE_SYNTH[side]}
    r["pipeline"].update(SMOKE_STEPS)
    r["train"]["eval_batch_size"] = 8
    return r


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    """Every stage (skipping finished ones); returns the numbers the table is made of."""
    from evl_cache.datasets import load_manifest
    from evl_cache.ray_runtime import ray_session
    from evl_cache.synth import CLASS_SPECS

    began = time.perf_counter()
    recipe = load_recipe(args.config)
    if args.smoke:
        recipe = smoke_recipe(recipe)
    classes = dict(zip(SIDES, split_classes(recipe)))
    runs = settings(recipe)
    threads = set_threads(args.threads)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    ledger = Ledger(work)
    arch, weights, note = backbone_choice(recipe, work)
    p = recipe["pipeline"]
    n_steps = 4 + 2 * 2 + 2 * len(runs)

    data = {s: work / s / "synth" for s in SIDES}
    stores = {(s, split): work / s / "cache" / f"{split}.zarr" for s in SIDES for split in ("train", "val")}
    say(f"[1/{n_steps}] synthetic datasets: source {len(classes['source'])} classes, target {len(classes['target'])}")
    for s in SIDES:
        synth_stage(ledger, f"synth_{s}", data[s], {**p[s], "classes": ",".join(classes[s])})
    plans = {"train": extract_plan(recipe, p.get("train_views", "eval:1x1"), arch=arch, weights=weights, num_cpus=threads),
             "val": extract_plan(recipe, recipe["extract"].get("views", "eval:1x1"), arch=arch, weights=weights, num_cpus=threads)}
    names = [f"extract_{s}_{split}" for s in SIDES for split in ("train", "val")]
    pending = [n for n in names if not ledger.entries.get(n, {}).get("done")]
    with _maybe_ray(bool(pending), threads, ray_session):  # one Ray start for the four extractions
        i = 2
        for s in SIDES:
            for split in ("train", "val"):
                say(f"[{i}/{n_steps}] extract {s} {split} ({plans[split].views}) -> {rel(stores[s, split])}")
                manifest = load_manifest("list", str(data[s]), split)
                extract_stage(ledger, f"extract_{s}_{split}", manifest, stores[s, split], plans[split])
                i += 1

    src_dir, src_eval = work / "source" / "train", work / "source" / "eval"
    cfg = source_config(recipe, stores["source", "train"], stores["source", "val"])
    say(f"[{i}/{n_steps}] train the source decoder: {cfg.train.steps} steps x batch {cfg.train.batch_size} -> {rel(src_dir)}")
    src = train_stage(ledger, "train_source", cfg, src_dir, progress=not args.no_progress)
    if not src.skipped:  # a new source decoder: runs fine-tuned from the old one are stale
        for r in runs:
            if r.finetuned:
                for stage, path in ((f"train_{r.name}", work / "target" / r.name), (f"eval_{r.name}", work / "target" / f"eval_{r.name}")):
                    ledger.entries.pop(stage, None)
                    shutil.rmtree(path, ignore_errors=True)
    i += 1
    say(f"[{i}/{n_steps}] evaluate the source decoder on the source classes -> {rel(src_eval)}")
    eval_stage(ledger, "eval_source", src_dir / "model", stores["source", "val"], src_eval)
    i += 1

    rows = []
    for r in runs:
        run_dir, eval_dir = work / "target" / r.name, work / "target" / f"eval_{r.name}"
        cfg = target_config(recipe, r, stores["target", "train"], stores["target", "val"], src_dir / "model")
        say(f"[{i}/{n_steps}] target, {r.label}: {cfg.train.steps} steps x batch {cfg.train.batch_size} -> {rel(run_dir)}")
        t = train_stage(ledger, f"train_{r.name}", cfg, run_dir, progress=not args.no_progress)
        say(f"[{i + 1}/{n_steps}] evaluate on the target eval split -> {rel(eval_dir)}")
        e = eval_stage(ledger, f"eval_{r.name}", run_dir / "model", stores["target", "val"], eval_dir)
        i += 2
        metrics = read_metrics(eval_dir)
        kinds = {n: CLASS_SPECS[n].kind for n in classes["target"]}
        init = json.loads((run_dir / "init_from.json").read_text()) if (run_dir / "init_from.json").is_file() else None
        rows.append({"name": r.name, "label": r.label, "lr_mult": r.lr_mult, "top1": metrics["top1"],
                     "mean_class": metrics["mean_class_accuracy"], **split_accuracy(metrics, kinds),
                     "videos": metrics["videos"], "steps": cfg.train.steps, "train_s": t.seconds, "eval_s": e.seconds,
                     "curve": val_curve(run_dir), "final_loss": t.info.get("final_loss"),
                     "taken": len(init["taken"]) if init else None,
                     "fresh": [f[0] for f in init["fresh"]] if init else None})

    src_metrics = read_metrics(src_eval)
    stages = {n: res.seconds for n, res in ledger.results.items()}
    return {
        "smoke": args.smoke, "config": rel(args.config), "backbone": note, "threads": threads,
        "machine": platform.processor() or platform.machine(),
        "classes": classes, "kinds": {n: CLASS_SPECS[n].kind for s in SIDES for n in classes[s]},
        "videos": {s: {k: ledger.results[f"synth_{s}"].info[f"{k}_videos"] for k in ("train", "val")} for s in SIDES},
        "source": {"steps": int(p["source_steps"]), "top1": src_metrics["top1"], "videos": src_metrics["videos"]},
        "target_steps": int(p["target_steps"]), "seed": int(recipe["train"].get("seed", 0)),
        "batch_size": int(recipe["train"]["batch_size"]), "lr": float(recipe["train"]["lr"]),
        "rows": rows, "stage_seconds": stages, "stage_total_s": sum(stages.values()),
        "wall_s_this_run": time.perf_counter() - began,
        "skipped": sorted(n for n, res in ledger.results.items() if res.skipped),
    }


def write_table(out: Path, res: dict[str, Any], command: str) -> None:
    """table.md and table.json: every number comes from ``res`` (this run's ledger and metrics)."""
    out.mkdir(parents=True, exist_ok=True)
    rows = res["rows"]
    scratch = next(r for r in rows if r["name"] == "scratch")
    tgt, src = res["classes"]["target"], res["classes"]["source"]
    n_motion = sum(res["kinds"][n] == "motion" for n in tgt)
    table = md_table(
        ["setting", "top-1 %", "vs scratch (points)", f"motion ({n_motion} classes) %", f"appearance ({len(tgt) - n_motion}) %",
         "best val top-1 % (step)", "tensors from the source", "train time"],
        [[r["label"], pct(r["top1"]), "-" if r is scratch else f"{100 * (r['top1'] - scratch['top1']):+.1f}",
          pct(r["motion"]), pct(r["appearance"]),
          (lambda b: f"{pct(b[1])} ({b[0]})")(max(r["curve"], key=lambda c: c[1])) if r["curve"] else "-",
          "-" if r["taken"] is None else f"{r['taken']} (fresh: {', '.join(r['fresh'])})", fmt_s(r["train_s"])]
         for r in rows])
    v = res["videos"]
    md = [
        "# Fine-tuning to new classes on the synthetic benchmark (Table 12, offline)\n",
        *(["**SMOKE RUN**: a few videos and steps; it tests the recipe, the numbers mean nothing.\n"] if res["smoke"] else []),
        f"Backbone: {res['backbone']}, frozen; its features are cached once per class set. Source decoder: "
        f"{len(src)} classes ({', '.join(src)}), {v['source']['train']} training videos, {res['source']['steps']} steps; "
        f"top-1 on its own classes {pct(res['source']['top1'])}% ({res['source']['videos']} eval videos).\n",
        f"Target: {len(tgt)} other classes ({', '.join(tgt)}), **{v['target']['train'] // len(tgt)} training videos per "
        f"class** ({v['target']['train']} in all), evaluated on {v['target']['val']} eval videos (chance "
        f"{100 / len(tgt):.1f}%). Every target run: {res['target_steps']} steps x batch {res['batch_size']}, lr "
        f"{res['lr']:g}, seed {res['seed']}, the same videos; they differ only in `train.init_from` and "
        f"`train.pretrained_lr_mult` (the head is always fresh and trains at the full lr).\n",
        table,
        "![top-1 per setting and against steps](transfer.png)\n",
        f"Wall time: {fmt_s(res['stage_total_s'])} for all stages as measured when each ran "
        f"({fmt_s(res['wall_s_this_run'])} for this invocation{', which skipped finished stages' if res['skipped'] else ''}), "
        f"{res['threads']} CPU thread(s) ({res['machine']}). Command: `{command}`.\n",
        "## Time per stage\n",
        md_table(["stage", "wall time"], [[n, fmt_s(s)] for n, s in res["stage_seconds"].items()]),
    ]
    write_text_atomic(out / "table.md", "\n".join(md))
    write_text_atomic(out / "table.json", json.dumps({**res, "command": command}, indent=2, default=str) + "\n")


def plot(out: Path, res: dict[str, Any]) -> Path:
    """transfer.png: top-1 per setting (bars, split by kind of class) and validation top-1 against steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["rows"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    width = 0.27
    xs = range(len(rows))
    for j, (key, label) in enumerate((("top1", "all"), ("motion", "motion classes"), ("appearance", "appearance classes"))):
        vals = [100 * (r[key] or 0) for r in rows]
        bars = a.bar([x + (j - 1) * width for x in xs], vals, width, label=label)
        if key == "top1":
            a.bar_label(bars, fmt="%.1f", fontsize=8)
    a.axhline(100 / len(res["classes"]["target"]), color="grey", ls=":", lw=1, label="chance")
    a.set_xticks(list(xs), [r["label"].replace(", ", ",\n") for r in rows], fontsize=8)
    a.set_ylabel("top-1 on the target eval split (%)")
    a.set_ylim(0, 105)
    a.set_title(f"{res['videos']['target']['train'] // len(res['classes']['target'])} videos per target class")
    a.legend(fontsize=7, loc="lower right")
    for r in rows:
        if r["curve"]:
            b.plot([c[0] for c in r["curve"]], [100 * c[1] for c in r["curve"]], marker="o", markersize=3, label=r["label"])
    b.set_xlabel("training step")
    b.set_ylabel("validation top-1 (%)")
    b.set_title("top-1 against steps (metrics.jsonl)")
    b.set_ylim(0, 105)
    b.grid(alpha=0.3)
    b.legend(fontsize=7, loc="lower right")
    return save_figure(fig, out / "transfer.png")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Fine-tune a decoder trained on some synthetic classes to the others, "
                                             "against training from scratch (Table 12 offline)")
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "synthetic_transfer.yaml")
    ap.add_argument("--work", type=Path, default=None, help="datasets, caches and runs (default runs/transfer)")
    ap.add_argument("--out", type=Path, default=None, help="table.md, table.json, transfer.png (default results/transfer)")
    ap.add_argument("--smoke", action="store_true", help="a few videos and steps: tests the recipe end to end")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    suffix = "_smoke" if args.smoke else ""
    args.work = args.work or ROOT / "runs" / f"transfer{suffix}"
    out = args.out or ROOT / "results" / f"transfer{suffix}"
    res = run_all(args)
    command = "python pipelines/transfer_synthetic.py" + (" --smoke" if args.smoke else "") + \
        (f" --config {rel(args.config)}" if args.config.resolve() != (ROOT / "configs" / "synthetic_transfer.yaml").resolve() else "")
    write_table(out, res, command)
    plot(out, res)
    say(f"\ntransfer{' (SMOKE)' if args.smoke else ''}: source decoder {pct(res['source']['top1'])}% on its own classes; "
        f"target, {res['videos']['target']['train'] // len(res['classes']['target'])} videos per class:")
    for r in res["rows"]:
        say(f"  {r['label']:<34} top-1 {pct(r['top1']):>6}  (motion {pct(r['motion'])}, appearance {pct(r['appearance'])})")
    say(f"stages {fmt_s(res['stage_total_s'])}; report: {rel(out / 'table.md')}")
    return 0


if __name__ == "__main__":
    os.chdir(ROOT)
    main_guard(main)
