"""`make transfer-demo`: the paper's Table 12 fine-tuning, shown offline on the synthetic benchmark.

Table 12 fine-tunes the Kinetics-400 decoder to UCF-101 and HMDB-51 (`make finetune-table12` needs those
datasets). Here the same mechanism runs on generated videos: the benchmark's classes are split into a
SOURCE set and a disjoint TARGET set (configs/synthetic_transfer.yaml says which and why); a decoder is
trained on the source, then three decoders are trained on the target's few videos per class with the same
steps and data, each once per seed of ``pipeline.target_seeds`` (a seed sets the decoder's or head's init
and the batch order; run i of every setting shares it, so settings compare in pairs):
  scratch        a fresh decoder (what training on the small dataset alone gives)
  finetune x0.1  `train.init_from` the source decoder (every weight but the head, which is fresh since the
                 classes differ), the loaded weights at 0.1 x the learning rate, as the paper does
  finetune x1.0  the same at the full learning rate (other `finetune_lr_mults` add rows)
Each run is evaluated on the target's full eval split; results/transfer/table.md, table.json and
transfer.png (top-1 per setting as the mean over seeds with every seed shown, and top-1 against steps
from the runs' metrics.jsonl).

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
SMOKE_STEPS = {"source_steps": 4, "target_steps": 3, "target_eval_every": 3, "target_seeds": [0, 1]}


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


def target_seeds(recipe: dict[str, Any]) -> list[int]:
    """``pipeline.target_seeds`` (default: ``train.seed`` alone): every target setting runs once per seed."""
    seeds = recipe["pipeline"].get("target_seeds", [int(recipe["train"].get("seed", 0))])
    if not isinstance(seeds, list) or not seeds or any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in seeds) \
            or len(set(seeds)) != len(seeds):
        raise UserError(f"{recipe.get('_path', 'recipe')}: pipeline.target_seeds must be a list of distinct integers >= 0, "
                        f"e.g. [0, 1, 2]; got {seeds!r}")
    return seeds


def target_config(recipe: dict[str, Any], setting: Setting, train_store: Path, val_store: Path,
                  source_checkpoint: Path, seed: int) -> Any:
    """The run config of one target setting at one seed: the recipe's model/train/data at ``target_steps``,
    differing between settings only in ``init_from`` and ``pretrained_lr_mult``."""
    p = recipe["pipeline"]
    steps = int(p["target_steps"])
    t: dict[str, Any] = {"steps": steps, "eval_every": int(p.get("target_eval_every", steps)), "checkpoint_every": steps,
                         "seed": seed}
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


def target_run_dirs(work: Path, setting: Setting, seed: int) -> tuple[Path, Path]:
    """(run directory, eval directory) of one target run; the ledger stages are ``train_<run dir name>``
    and ``eval_<run dir name>``."""
    name = f"{setting.name}_seed{seed}"
    return work / "target" / name, work / "target" / f"eval_{name}"


def forget_finetuned_runs(ledger: Ledger, work: Path, runs: list[Setting], seeds: list[int]) -> None:
    """Drop the fine-tuned target runs (ledger stages and folders): they started from an older source decoder."""
    for r in runs:
        for seed in seeds if r.finetuned else ():
            run_dir, eval_dir = target_run_dirs(work, r, seed)
            for stage in (f"train_{run_dir.name}", eval_dir.name):
                ledger.entries.pop(stage, None)
            for path in (run_dir, eval_dir):
                shutil.rmtree(path, ignore_errors=True)


def target_run_result(run_dir: Path, eval_dir: Path, target_classes: list[str], seed: int, steps: int,
                      train: Any, evaluation: Any) -> dict[str, Any]:
    """The numbers of one target run, from its eval metrics, metrics.jsonl and init_from.json."""
    from evl_cache.synth import CLASS_SPECS

    metrics = read_metrics(eval_dir)
    kinds = {n: CLASS_SPECS[n].kind for n in target_classes}
    init = json.loads((run_dir / "init_from.json").read_text()) if (run_dir / "init_from.json").is_file() else None
    return {"seed": seed, "top1": metrics["top1"], "mean_class": metrics["mean_class_accuracy"],
            **split_accuracy(metrics, kinds), "videos": metrics["videos"], "steps": steps,
            "train_s": train.seconds, "eval_s": evaluation.seconds, "curve": val_curve(run_dir),
            "final_loss": train.info.get("final_loss"), "taken": len(init["taken"]) if init else None,
            "fresh": [f[0] for f in init["fresh"]] if init else None}


def summarise_setting(setting: Setting, runs: list[dict[str, Any]], scratch: list[dict[str, Any]] | None) -> dict[str, Any]:
    """One table row from a setting's runs (one per seed, in seed order): the mean of top-1, motion and
    appearance over seeds, their sample standard deviation, the mean validation curve, and, against
    ``scratch`` (the scratch runs at the same seeds), the paired differences in top-1."""
    import statistics

    def mean(key: str) -> float | None:
        vals = [r[key] for r in runs if r[key] is not None]
        return statistics.fmean(vals) if vals else None

    top1 = [r["top1"] for r in runs]
    steps = sorted({s for r in runs for s, _ in r["curve"]})
    curve = [(s, statistics.fmean(v for r in runs for t, v in r["curve"] if t == s)) for s in steps
             if all(any(t == s for t, _ in r["curve"]) for r in runs)]
    paired = None if scratch is None else [a["top1"] - b["top1"] for a, b in zip(runs, scratch, strict=True)]
    first = runs[0]
    return {"name": setting.name, "label": setting.label, "lr_mult": setting.lr_mult,
            "seeds": [r["seed"] for r in runs], "top1": mean("top1"), "top1_sd": statistics.stdev(top1) if len(top1) > 1 else None,
            "motion": mean("motion"), "appearance": mean("appearance"), "mean_class": mean("mean_class"),
            "vs_scratch_paired": paired, "curve": curve, "train_s": statistics.fmean(r["train_s"] for r in runs),
            "videos": first["videos"], "steps": first["steps"], "taken": first["taken"], "fresh": first["fresh"],
            "runs": runs}


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
    runs, seeds = settings(recipe), target_seeds(recipe)
    threads = set_threads(args.threads)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    ledger = Ledger(work)
    arch, weights, note = backbone_choice(recipe, work)
    p = recipe["pipeline"]
    n_steps = 1 + 4 + 2 + 2 * len(runs) * len(seeds)  # datasets, 4 extractions, source train + eval, target runs

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
        forget_finetuned_runs(ledger, work, runs, seeds)
    i += 1
    say(f"[{i}/{n_steps}] evaluate the source decoder on the source classes -> {rel(src_eval)}")
    eval_stage(ledger, "eval_source", src_dir / "model", stores["source", "val"], src_eval)
    i += 1

    rows = []
    for r in runs:
        per_seed = []
        for seed in seeds:
            run_dir, eval_dir = target_run_dirs(work, r, seed)
            cfg = target_config(recipe, r, stores["target", "train"], stores["target", "val"], src_dir / "model", seed)
            say(f"[{i}/{n_steps}] target, {r.label}, seed {seed}: {cfg.train.steps} steps x batch {cfg.train.batch_size} "
                f"-> {rel(run_dir)}")
            t = train_stage(ledger, f"train_{run_dir.name}", cfg, run_dir, progress=not args.no_progress)
            say(f"[{i + 1}/{n_steps}] evaluate on the target eval split -> {rel(eval_dir)}")
            e = eval_stage(ledger, f"eval_{run_dir.name}", run_dir / "model", stores["target", "val"], eval_dir)
            i += 2
            per_seed.append(target_run_result(run_dir, eval_dir, classes["target"], seed, cfg.train.steps, t, e))
        rows.append(summarise_setting(r, per_seed, rows[0]["runs"] if rows else None))

    src_metrics = read_metrics(src_eval)
    stages = {n: res.seconds for n, res in ledger.results.items()}
    return {
        "smoke": args.smoke, "config": rel(args.config), "backbone": note, "threads": threads,
        "machine": platform.processor() or platform.machine(),
        "classes": classes, "kinds": {n: CLASS_SPECS[n].kind for s in SIDES for n in classes[s]},
        "videos": {s: {k: ledger.results[f"synth_{s}"].info[f"{k}_videos"] for k in ("train", "val")} for s in SIDES},
        "source": {"steps": int(p["source_steps"]), "top1": src_metrics["top1"], "videos": src_metrics["videos"]},
        "target_steps": int(p["target_steps"]), "seeds": seeds,
        "batch_size": int(recipe["train"]["batch_size"]), "lr": float(recipe["train"]["lr"]),
        "rows": rows, "stage_seconds": stages, "stage_total_s": sum(stages.values()),
        "wall_s_this_run": time.perf_counter() - began,
        "skipped": sorted(n for n, res in ledger.results.items() if res.skipped),
    }


def paired_text(diffs: list[float] | None) -> str:
    """'+6.2 (3 of 3 seeds ahead)': the mean paired difference to scratch and how many seeds it is ahead in."""
    if diffs is None:
        return "-"
    ahead = sum(d > 0 for d in diffs)
    return f"{100 * sum(diffs) / len(diffs):+.1f} ({ahead} of {len(diffs)} seed{'s' if len(diffs) > 1 else ''} ahead)"


def write_table(out: Path, res: dict[str, Any], command: str) -> None:
    """table.md and table.json: every number comes from ``res`` (this run's ledger and metrics)."""
    out.mkdir(parents=True, exist_ok=True)
    rows = res["rows"]
    tgt, src = res["classes"]["target"], res["classes"]["source"]
    n_motion = sum(res["kinds"][n] == "motion" for n in tgt)
    n = len(res["seeds"])
    table = md_table(
        ["setting", f"top-1 % (mean{' ± sd' if n > 1 else ''} of {n} seed{'s' if n > 1 else ''})", "top-1 % per seed",
         "vs scratch, same seed (points)", f"motion ({n_motion} classes) %", f"appearance ({len(tgt) - n_motion}) %",
         "best mean val top-1 % (step)", "tensors from the source", "train time per run"],
        [[r["label"], pct(r["top1"]) + (f" ± {100 * r['top1_sd']:.1f}" if r["top1_sd"] is not None else ""),
          " / ".join(pct(x["top1"]) for x in r["runs"]), paired_text(r["vs_scratch_paired"]),
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
        f"{res['lr']:g}, the same videos, once per seed ({', '.join(map(str, res['seeds']))}: the seed sets the fresh "
        f"weights and the batch order, the same in every setting); settings differ only in `train.init_from` and "
        f"`train.pretrained_lr_mult` (the head is always fresh and trains at the full lr). One eval video is "
        f"{100 / v['target']['val']:.2f} points.\n",
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
        at = [x + (j - 1) * width for x in xs]
        if key == "top1":
            sd = [100 * (r["top1_sd"] or 0) for r in rows]
            a.bar(at, vals, width, yerr=sd, capsize=3, label=f"{label} (mean ± sd)" if len(res["seeds"]) > 1 else label)
            for x, v, d, r in zip(at, vals, sd, rows):  # the value above its error bar and seed dots, not across them
                top = max([v + d] + [100 * run["top1"] for run in r["runs"]])
                a.annotate(f"{v:.1f}", (x, top), xytext=(0, 4), textcoords="offset points", ha="center", fontsize=8)
            for x, r in zip(at, rows):
                a.plot([x] * len(r["runs"]), [100 * run["top1"] for run in r["runs"]], "k.", markersize=4)
        else:
            a.bar(at, vals, width, label=label)
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
    b.set_title("top-1 against steps (metrics.jsonl" + (f", mean of {len(res['seeds'])} seeds)" if len(res["seeds"]) > 1 else ")"))
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
        say(f"  {r['label']:<34} top-1 {pct(r['top1']):>6}  (per seed {' / '.join(pct(x['top1']) for x in r['runs'])}; "
            f"motion {pct(r['motion'])}, appearance {pct(r['appearance'])}; vs scratch {paired_text(r['vs_scratch_paired'])})")
    say(f"stages {fmt_s(res['stage_total_s'])}; report: {rel(out / 'table.md')}")
    return 0


if __name__ == "__main__":
    os.chdir(ROOT)
    main_guard(main)
