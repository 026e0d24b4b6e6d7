"""`make finetune-table12`: the paper's Table 12, UCF-101 and HMDB-51 fine-tuned from Kinetics-400.

Per row (configs/{ucf101,hmdb51}_vitl14*_32f.yaml) and per official split 1..3: extract the
split's training videos (augmented train views) and test videos (2 temporal x 3 spatial eval views)
into caches, fine-tune the decoder from the K400 checkpoint (`train.init_from`, every weight but the
head; the loaded weights at `pretrained_lr_mult` x the learning rate), evaluate; then the mean over
the 3 splits, as the paper reports it, in results/table12.md (+ table12.json, table12_splits.png).
Finished stages are skipped on rerun, interrupted ones resume.

Inputs (environment variables, or the same names as Make variables):
  UCF101_ROOT, UCF101_ANN    UCF-101 videos (<root>/<Class>/<file>.avi) and the ucfTrainTestlist folder
                             (default <root>/ucfTrainTestlist)
  HMDB51_ROOT, HMDB51_ANN    HMDB-51 videos (<root>/<class>/<file>.avi) and the testTrainMulti_7030_splits
                             folder (default <root>/testTrainMulti_7030_splits)
  CLIP_L14, CLIP_L14_336     local CLIP weight files
  K400_CKPT_L14, K400_CKPT_L14_336   the K400 decoder checkpoints (e.g. runs/table1/k400_vitl14_32f/train/model
                             from `make reproduce-table1`)
A row runs when its dataset root is set; rows given by --rows must have every input.

`--smoke` runs the recipe end to end on generated videos laid out exactly like UCF-101 and HMDB-51
(class folders of .avi files and the official split-file formats), with a tiny random-init ViT, a
"K400" decoder pretrained for a few steps on other synthetic videos, 8 frames at stride 2 and a few
steps. It tests the recipe, not accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

from common import (
    ROOT, Ledger, UserError, eval_stage, extract_plan, extract_stage, fmt_s, load_recipe, main_guard, md_table, pct,
    read_metrics, run_config, say, set_threads, synth_stage, train_stage, save_figure, write_text_atomic,
)

ROWS = ["ucf101_vitl14_32f", "ucf101_vitl14_336_32f", "hmdb51_vitl14_32f", "hmdb51_vitl14_336_32f"]
SMOKE_ROWS = ["ucf101_vitl14_32f", "hmdb51_vitl14_32f"]
INPUT_VARS = ("UCF101_ROOT", "UCF101_ANN", "HMDB51_ROOT", "HMDB51_ANN", "CLIP_L14", "CLIP_L14_336",
              "K400_CKPT_L14", "K400_CKPT_L14_336")
HINT = ("run `make finetune-table12 UCF101_ROOT=/data/UCF-101 UCF101_ANN=/data/ucfTrainTestlist HMDB51_ROOT=/data/hmdb51 "
        "HMDB51_ANN=/data/testTrainMulti_7030_splits CLIP_L14=ViT-L-14.pt K400_CKPT_L14=runs/table1/k400_vitl14_32f/train/model` "
        "(and CLIP_L14_336, K400_CKPT_L14_336 for the 336 px rows), or `make finetune-table12 SMOKE=1` for the generated-data smoke run")

# Smoke scale: 4 classes x 3 videos per class (split n tests video n of each class), 8 frames at stride 2.
SMOKE_CLASSES = ["moving_left", "moving_right", "static_circle", "static_square"]
SMOKE_VIDEO = {"size": 32, "frames": 20, "fps": 8}
SMOKE_PRETRAIN = {"classes": "moving_up,moving_down,rotating_cw", "train_per_class": 3, "val_per_class": 1,
                  "seed": 1, "size": 32, "frames": 20, "fps": 8}
SMOKE_FRAMES, SMOKE_STRIDE = 8, 2
SMOKE_TRAIN = {"steps": 3, "batch_size": 4, "grad_accum": 1, "log_every": 1, "eval_every": 3, "checkpoint_every": 3,
               "eval_batch_size": 8}


def env(name: str, given: str | None) -> str | None:
    value = given if given is not None else os.environ.get(name)
    return value or None


def check_inputs(args: argparse.Namespace, names: list[str] | None) -> tuple[list[str], dict[str, str]]:
    """(rows to run, inputs): fail in one line naming the first missing variable or path, before any work."""
    got = {k: env(k, getattr(args, k.lower())) for k in INPUT_VARS}
    if names is None:
        names = [n for n in ROWS if got[dataset_vars(n)[0]]]
        if not names:
            raise UserError(f"finetune-table12 needs UCF-101 or HMDB-51: neither UCF101_ROOT nor HMDB51_ROOT is set "
                            f"(plus the split folders, CLIP weights and K400 checkpoints); {HINT}")
    for name in names:
        recipe = load_recipe(ROOT / "configs" / f"{name}.yaml")
        p = recipe["pipeline"]
        root_var, ann_var = p["dataset_var"], p["annotations_var"]
        if not got[root_var]:
            raise UserError(f"row {name} needs {root_var} (the dataset root); {HINT}")
        if not Path(got[root_var]).is_dir():
            raise UserError(f"{root_var}={got[root_var]} is not a directory; point it at the videos' root folder")
        if got[ann_var] and not Path(got[ann_var]).is_dir():
            raise UserError(f"{ann_var}={got[ann_var]} is not a directory; point it at the official split folder")
        for var, what in ((p["weights_var"], "a CLIP weights file"), (p["init_var"], "a K400 checkpoint")):
            if not got[var]:
                raise UserError(f"row {name} needs {what}: {var} is not set; {HINT}")
        if not Path(got[p["weights_var"]]).is_file():
            raise UserError(f"{p['weights_var']}={got[p['weights_var']]} is not a file; point it at the local CLIP weights")
        ckpt = got[p["init_var"]]
        if not (Path(ckpt + ".json").is_file() or Path(ckpt).with_suffix(".json").is_file()):
            raise UserError(f"{p['init_var']}={ckpt} is not an evl-cache checkpoint (no {ckpt}.json); "
                            f"point it at the K400 run's model, e.g. runs/table1/{p['k400_row']}/train/model")
        for split in p["splits"]:  # annotation problems surface now, before any work starts
            for kind in ("train", "test"):
                manifest(recipe, got, f"{kind}{split}")
    return names, {k: v for k, v in got.items() if v}


def dataset_vars(name: str) -> tuple[str, str]:
    return ("UCF101_ROOT", "UCF101_ANN") if name.startswith("ucf101") else ("HMDB51_ROOT", "HMDB51_ANN")


def manifest(recipe: dict[str, Any], inputs: dict[str, str | None], split: str) -> Any:
    from evl_cache.datasets import load_manifest

    p, ds = recipe["pipeline"], recipe["extract"]["dataset"]
    root, ann = inputs.get(p["dataset_var"]), inputs.get(p["annotations_var"])
    try:
        return load_manifest(ds, root, split, annotations=ann)
    except UserError as err:
        raise UserError(f"{ds} {split} ({p['dataset_var']}={root}, {p['annotations_var']}={ann or 'unset'}): {err}") from None


# ------------------------------------------------------------------------------ smoke data


def write_ucf_like(out: Path) -> None:
    """Generated videos in UCF-101's layout: <Class>/v_<Class>_g0N_c01.avi, classInd.txt, train/testlist0N.txt."""
    from evl_cache.synth import clip_rng, encode_video, render_clip

    ann = out / "ucfTrainTestlist"
    ann.mkdir(parents=True, exist_ok=True)
    names = [c.title().replace("_", "") for c in SMOKE_CLASSES]
    (ann / "classInd.txt").write_text("".join(f"{i + 1} {n}\r\n" for i, n in enumerate(names)))
    lists = {f"{k}list0{s}.txt": [] for k in ("train", "test") for s in (1, 2, 3)}
    for ci, (cls, name) in enumerate(zip(SMOKE_CLASSES, names)):
        for g in (1, 2, 3):
            rel = f"{name}/v_{name}_g0{g}_c01.avi"
            (out / name).mkdir(exist_ok=True)
            video, _ = render_clip(cls, clip_rng(0, "train", cls, g), SMOKE_VIDEO["frames"], SMOKE_VIDEO["size"])
            encode_video(video, out / rel, SMOKE_VIDEO["fps"], ".avi")
            for s in (1, 2, 3):
                if g == s:
                    lists[f"testlist0{s}.txt"].append(f"{rel}\r\n")
                else:
                    lists[f"trainlist0{s}.txt"].append(f"{rel} {ci + 1}\r\n")
    for fname, lines in lists.items():
        (ann / fname).write_text("".join(lines))


def write_hmdb_like(out: Path) -> None:
    """Generated videos in HMDB-51's layout: <class>/<name>.avi and <class>_test_split<N>.txt (1 train, 2 test)."""
    from evl_cache.synth import clip_rng, encode_video, render_clip

    ann = out / "testTrainMulti_7030_splits"
    ann.mkdir(parents=True, exist_ok=True)
    for cls in SMOKE_CLASSES:
        (out / cls).mkdir(exist_ok=True)
        vids = [f"{cls}_clip_{i}.avi" for i in (1, 2, 3)]
        for i, v in enumerate(vids, start=1):
            video, _ = render_clip(cls, clip_rng(0, "val", cls, i), SMOKE_VIDEO["frames"], SMOKE_VIDEO["size"])
            encode_video(video, out / cls / v, SMOKE_VIDEO["fps"], ".avi")
        for s in (1, 2, 3):
            (ann / f"{cls}_test_split{s}.txt").write_text("".join(f"{v} {2 if i == s else 1} \n" for i, v in enumerate(vids, start=1)))


def smoke_inputs(work: Path, threads: int) -> dict[str, str]:
    """Generated UCF/HMDB-like data, the tiny arch and a "K400" checkpoint trained on other synthetic classes."""
    from evl_cache.datasets import load_manifest
    from reproduce_table1 import smoke_arch

    ledger = Ledger(work)
    data = work / "data"

    def make_data() -> dict[str, Any]:
        write_ucf_like(data / "ucf101")
        write_hmdb_like(data / "hmdb51")
        return {}

    ledger.run("smoke_data", {"classes": SMOKE_CLASSES, "video": SMOKE_VIDEO}, make_data,
               complete=lambda: (data / "hmdb51" / "testTrainMulti_7030_splits").is_dir(), outputs=[data])
    arch = work / "smoke_arch.json"
    write_text_atomic(arch, json.dumps(smoke_arch("ViT-L-14"), indent=1) + "\n")
    synth_stage(ledger, "k400_synth", work / "k400_synth", dict(SMOKE_PRETRAIN))
    recipe = load_recipe(ROOT / "configs" / "ucf101_vitl14_32f.yaml")
    plan = extract_plan(recipe, "train:1", **smoke_plan(arch, threads))
    store = work / "k400" / "train.zarr"
    extract_stage(ledger, "k400_extract", load_manifest("list", str(work / "k400_synth"), "train"), store, plan)
    cfg = run_config({"model": recipe["model"], "train": {**recipe["train"], **SMOKE_TRAIN, "pretrained_lr_mult": 1.0},
                      "data": {"num_workers": 0}}, str(store), None)
    train_stage(ledger, "k400_train", cfg, work / "k400" / "train", progress=False)
    ckpt = str(work / "k400" / "train" / "model")
    return {"UCF101_ROOT": str(data / "ucf101"), "HMDB51_ROOT": str(data / "hmdb51"), "CLIP_L14": "random",
            "K400_CKPT_L14": ckpt, "_smoke_arch": str(arch)}


def smoke_plan(arch: Path, threads: int) -> dict[str, Any]:
    return {"arch": str(arch), "weights": "random", "frames": SMOKE_FRAMES, "stride": SMOKE_STRIDE, "precision": "fp32",
            "num_cpus": threads, "batch_size": 16}


# ------------------------------------------------------------------------------ the recipe


def run_split(name: str, recipe: dict[str, Any], split: int, work: Path, inputs: dict[str, str], smoke: bool,
              threads: int, progress: bool) -> dict[str, Any]:
    """Extract, fine-tune from K400 and evaluate one official split; returns its metrics and stage times."""
    p, e = recipe["pipeline"], recipe["extract"]
    sdir = work / name / f"split{split}"
    ledger = Ledger(sdir)
    say(f"== {name} split {split}: {p['label']} {e['frames']} frames at stride {e['stride']}, eval {e['views']}"
        + (" [SMOKE]" if smoke else ""))
    plan_kw = smoke_plan(Path(inputs["_smoke_arch"]), threads) if smoke else {"weights": inputs[p["weights_var"]]}
    train_m, test_m = manifest(recipe, inputs, f"train{split}"), manifest(recipe, inputs, f"test{split}")
    train_store, eval_store = sdir / "cache" / "train.zarr", sdir / "cache" / "eval.zarr"
    s_tr = extract_stage(ledger, "extract_train", train_m, train_store, extract_plan(recipe, p["train_views"], **plan_kw))
    s_ev = extract_stage(ledger, "extract_eval", test_m, eval_store, extract_plan(recipe, e["views"], **plan_kw))
    train_over = {"init_from": inputs[p["init_var"]]}
    over: dict[str, dict[str, Any]] = {"train": train_over}
    if smoke:
        train_over.update(SMOKE_TRAIN)
        over["data"] = {"num_workers": 0}
    cfg = run_config(recipe, str(train_store), str(eval_store), **over)
    s_train = train_stage(ledger, "train", cfg, sdir / "train", progress=progress)
    s_eval = eval_stage(ledger, "eval", sdir / "train" / "model", eval_store, sdir / "eval")
    m = read_metrics(sdir / "eval")
    init = json.loads((sdir / "train" / "init_from.json").read_text())
    return {"split": split, "top1": m["top1"], "top5": m["top5"], "videos": m["videos"], "views": m["views"],
            "train_videos": len(train_m), "init_taken": len(init["taken"]), "init_fresh": [f[0] for f in init["fresh"]],
            "stages": {n: s.seconds for n, s in (("extract_train", s_tr), ("extract_eval", s_ev), ("train", s_train),
                                                  ("eval", s_eval))}}


def write_report(out: Path, rows: list[dict[str, Any]], smoke: bool, wall: float) -> Path:
    tag = "SMOKE " if smoke else ""
    header = ["dataset", "model", "frames x views", "steps", *[f"{tag}split {s} top-1" for s in (1, 2, 3)],
              f"{tag}mean top-1", f"{tag}mean top-5", "paper top-1", "time (extract + train + eval)"]
    body = []
    for r in rows:
        by = {s["split"]: s for s in r["splits"]}
        secs = sum(sum(s["stages"].values()) for s in r["splits"])
        paper = r["paper"].get("top1")
        body.append([r["dataset"], r["label"], f"{r['frames']} x {r['views']}", r["steps"],
                     *[pct(by[s]["top1"]) if s in by else "-" for s in (1, 2, 3)], pct(r["mean_top1"]), pct(r["mean_top5"]),
                     paper if paper is not None else "not in docs/reference.md", fmt_s(secs)])
    md = ["# EVL Table 12 (UCF-101, HMDB-51, fine-tuned from Kinetics-400): paper vs evl-cache\n"]
    if smoke:
        md.append("**SMOKE RUN: NOT UCF-101 or HMDB-51.** Generated videos laid out like the two datasets (4 classes, "
                  "3 videos each, the official split-file formats), a tiny random-init ViT, a decoder \"pretrained\" for "
                  "a few steps on other synthetic classes, 8 frames at stride 2, a few fine-tuning steps. It tests the "
                  "recipe, not accuracy.\n")
    md += [md_table(header, body),
           "Mean over the official splits that ran, as the paper reports it. Each split fine-tunes the K400 decoder "
           "(`train.init_from`: every tensor but the head, at `pretrained_lr_mult` x the learning rate) on the split's "
           f"training list and evaluates its test list. Total wall time of this invocation: {fmt_s(wall)}.\n",
           "![per-split top-1](table12_splits.png)\n"]
    path = out / "table12.md"
    write_text_atomic(path, "\n".join(md))
    write_text_atomic(out / "table12.json", json.dumps({"smoke": smoke, "rows": rows}, indent=2, default=str) + "\n")
    return path


def plot(out: Path, rows: list[dict[str, Any]], smoke: bool) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    width = 0.8 / 4
    for i, r in enumerate(rows):
        tops = {s["split"]: 100 * s["top1"] for s in r["splits"]}
        xs = [i + (j - 1.5) * width for j in range(4)]
        vals = [tops.get(s, 0.0) for s in (1, 2, 3)] + [100 * r["mean_top1"]]
        ax.bar(xs, vals, width, color=["tab:blue"] * 3 + ["tab:orange"])
        if r["paper"].get("top1") is not None:
            ax.plot([i - 0.4, i + 0.4], [r["paper"]["top1"]] * 2, "k--")
    ax.bar([], [], color="tab:blue", label="splits 1, 2, 3")
    ax.bar([], [], color="tab:orange", label="mean")
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([f"{r['dataset']}\n{r['label']}" for r in rows], fontsize=8)
    ax.set_ylabel(("SMOKE top-1 on generated videos (%)" if smoke else "top-1 (%)"))
    ax.set_ylim(0, 100)
    ax.set_title("EVL Table 12: fine-tuned from K400" + (" [SMOKE RUN]" if smoke else ""))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    return save_figure(fig, out / "table12_splits.png")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="EVL Table 12: UCF-101 / HMDB-51 fine-tuned from K400, 3 splits, the mean")
    ap.add_argument("--smoke", action="store_true", help="the whole recipe on generated UCF/HMDB-like videos, tiny scale")
    for var in INPUT_VARS:
        ap.add_argument(f"--{var.lower().replace('_', '-')}", dest=var.lower(), default=None, help=f"overrides ${var}")
    ap.add_argument("--rows", default=None, help=f"comma-separated subset of {','.join(ROWS)}")
    ap.add_argument("--splits", default="1,2,3", help="official splits to run (the paper: all 3)")
    ap.add_argument("--work", type=Path, default=None, help="caches and runs (default runs/table12 or runs/table12_smoke)")
    ap.add_argument("--out", type=Path, default=ROOT / "results", help="table12.md, table12.json and the figure go here")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    names = None if not args.rows else [n.strip() for n in args.rows.split(",") if n.strip()]
    bad = [n for n in names or [] if n not in ROWS]
    if bad:
        raise UserError(f"unknown --rows {','.join(bad)}; choose from {','.join(ROWS)}")
    try:
        splits = sorted({int(s) for s in args.splits.split(",") if s.strip()})
    except ValueError:
        splits = []
    if not splits or any(s not in (1, 2, 3) for s in splits):
        raise UserError(f"bad --splits {args.splits!r}; give a comma-separated subset of 1,2,3")
    if args.smoke:
        names = names or list(SMOKE_ROWS)
        missing = [n for n in names if n not in SMOKE_ROWS]
        if missing:
            raise UserError(f"--smoke runs the L/14 rows only ({','.join(SMOKE_ROWS)}), not {','.join(missing)}")
        inputs: dict[str, str] = {}
    else:
        names, inputs = check_inputs(args, names)
    work = args.work or ROOT / "runs" / ("table12_smoke" if args.smoke else "table12")
    threads = set_threads(args.threads)
    began = time.perf_counter()
    rows = []
    from evl_cache.ray_runtime import ray_session

    with ray_session(num_cpus=threads):  # one Ray for every extraction
        if args.smoke:
            inputs = smoke_inputs(work, threads)
        for name in names:
            recipe = load_recipe(ROOT / "configs" / f"{name}.yaml")
            e = recipe["extract"]
            results = [run_split(name, recipe, s, work, inputs, args.smoke, threads, not args.no_progress) for s in splits]
            rows.append({"name": name, "dataset": {"ucf101": "UCF-101", "hmdb51": "HMDB-51"}[e["dataset"]],
                         "label": recipe["pipeline"]["label"], "frames": SMOKE_FRAMES if args.smoke else int(e["frames"]),
                         "views": int(recipe["pipeline"]["paper"]["views"]),
                         "steps": SMOKE_TRAIN["steps"] if args.smoke else int(recipe["train"]["steps"]),
                         "paper": recipe["pipeline"]["paper"], "splits": results,
                         "mean_top1": statistics.mean(r["top1"] for r in results),
                         "mean_top5": statistics.mean(r["top5"] for r in results)})
    wall = time.perf_counter() - began
    args.out.mkdir(parents=True, exist_ok=True)
    report = write_report(args.out, rows, args.smoke, wall)
    fig = plot(args.out, rows, args.smoke)
    say(f"\n{'SMOKE ' if args.smoke else ''}Table 12 done in {fmt_s(wall)}: {report} and {fig}")
    for r in rows:
        say(f"  {r['dataset']:<8} {r['label']:<9} mean of {len(r['splits'])} split(s): top-1 {pct(r['mean_top1'])}  "
            f"paper {r['paper'].get('top1') if r['paper'].get('top1') is not None else 'not in docs/reference.md'}")
    return 0


if __name__ == "__main__":
    os.chdir(ROOT)
    main_guard(main)
