"""`make fewshot-table`: top-1 against K videos per class for the X-CLIP head, a text-initialised linear
head and the EVL head, trained from one cache store pair (issue 11, few-shot; docs/fewshot.md).

X-CLIP's few-shot protocol: K in {2, 4, 8, 16} videos per class drawn with a seed from the training
split, training, and evaluation on the whole test split. Here the draw is `data.few_shot` /
`data.few_shot_seed` of `evl-cache train` (evl_cache/fewshot.py), so every head at one K trains on
the same videos, and K's videos are inside every larger K's. Each (head, K) trains for
``epochs`` passes over its subset (default 50, as X-CLIP's HMDB-51/UCF-101 configs), at least ``min_steps``
steps, with the recipe's train section otherwise; each is evaluated on the full eval store. The
text-initialised linear head at K = 0 is CLIP zero-shot (`evl-cache zeroshot`), reported as its own point.

One store pair serves the three heads when it holds the last 4 blocks with attention maps (EVL), the
last block (X-CLIP's prompts) and per-frame embeddings (X-CLIP's MIT, the linear head): the recipe
extracts its config's store with `emb: true` added, or takes an existing pair (--train-store/--val-store).
The text heads need CLIP weights with a text tower. The demo's tiny ViT (configs/synthetic_demo.yaml)
has none: then those heads are reported as not run, with the reason, and the EVL head still runs.
--smoke swaps in a RANDOM tiny CLIP with both towers for such a backbone, so every head's path runs.
`make demo-text` runs this recipe with configs/synthetic_text_demo.yaml: the committed tiny CLIP
(evl_cache/assets/tiny_clip), K = 1, 2, 4, 8, plain class names (`class_prompts: synthetic`) and top-1
per kind of class, to show where text helps on the synthetic benchmark and where it cannot.

  .venv/bin/python pipelines/fewshot.py [--config configs/synthetic_demo.yaml] [--shots 2,4,8,16] [--seed 0]
      [--heads xclip,linear_text,evl] [--train-store S --val-store S] [--smoke] [--work runs/fewshot] [--out results/fewshot]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import (
    ROOT, Ledger, eval_stage, fmt_s, load_recipe, main_guard, md_table, pct, read_metrics, rel, say, set_threads,
    train_stage, save_figure, write_text_atomic,
)

from evl_cache.errors import UserError


@dataclass(frozen=True)
class Head:
    """One curve of the table: the ``model`` keys that select the head, and whether it needs the text tower."""

    name: str
    label: str
    model: dict[str, Any]
    text: bool
    use_recipe_model: bool = False  # EVL: the recipe's model section (its decoder options)


HEADS = {
    "xclip": Head("xclip", "X-CLIP head (MIT + prompts)", {"head": "xclip"}, text=True),
    "linear_text": Head("linear_text", "linear, text-initialised", {"head": "linear", "linear_init": "text"}, text=True),
    "evl": Head("evl", "EVL decoder", {}, text=False, use_recipe_model=True),
    "linear": Head("linear", "linear, default init", {"head": "linear"}, text=False),  # a baseline, on request
}
DEFAULT_HEADS = ("xclip", "linear_text", "evl")
DEFAULTS = {"shots": [2, 4, 8, 16], "seed": 0, "epochs": 50, "min_steps": 20}

# --smoke: the recipe at toy size (it tests the recipe end to end; its accuracies mean nothing).
SMOKE_SYNTH = {"train_per_class": 2, "val_per_class": 1}
SMOKE = {"shots": [1, 2], "epochs": 1, "min_steps": 2}
SMOKE_TRAIN = {"batch_size": 8, "log_every": 1}
# A RANDOM tiny CLIP with both towers (CLIP's BPE vocabulary), for --smoke when the config's backbone has no text tower.
SMOKE_CLIP = {
    "embed_dim": 32, "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 4, "width": 64, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@dataclass
class Plan:
    """Everything the run does, resolved from the recipe and the flags."""

    shots: list[int]
    seed: int
    epochs: float
    min_steps: int
    heads: list[Head]
    templates: str | None = None  # the linear head's and zero-shot's (default clip-kinetics700)
    class_prompts: str | None = None  # a names file (label order) or "synthetic" (evl_cache.synth.PROMPT_NAMES)
    head_train: dict[str, dict[str, Any]] = field(default_factory=dict)  # per-head train: overrides
    head_model: dict[str, dict[str, Any]] = field(default_factory=dict)  # per-head model: overrides
    allow_short: bool = False


def parse_list(spec: str | None, what: str) -> list[str] | None:
    if spec is None:
        return None
    items = [s.strip() for s in spec.split(",") if s.strip()]
    if not items:
        raise UserError(f"--{what}: give a comma-separated list")
    return items


def make_plan(recipe: dict[str, Any], args: argparse.Namespace) -> Plan:
    """``pipeline.fewshot`` of the recipe (shots, seed, epochs, min_steps, heads, templates, train), then the flags."""
    fs = dict(recipe["pipeline"].get("fewshot") or {})
    keys = {"shots", "seed", "epochs", "min_steps", "heads", "templates", "class_prompts", "train", "model"}
    unknown = sorted(set(fs) - keys)
    if unknown:
        raise UserError(f"recipe {recipe.get('_path')}: pipeline.fewshot has unknown key(s) {unknown}; "
                        f"use {', '.join(sorted(keys))}")
    values = {**DEFAULTS, **{k: v for k, v in fs.items() if k in DEFAULTS}, **(SMOKE if args.smoke else {})}
    shots = parse_list(args.shots, "shots") or values["shots"]
    try:
        shots = sorted({int(k) for k in shots})
    except (TypeError, ValueError):
        raise UserError(f"--shots: {shots} must be whole numbers, e.g. 2,4,8,16") from None
    if not shots or shots[0] < 1:
        raise UserError(f"--shots: {shots} must be positive numbers of videos per class")
    names = parse_list(args.heads, "heads") or list(fs.get("heads") or DEFAULT_HEADS)
    bad = [n for n in names if n not in HEADS]
    if bad:
        raise UserError(f"--heads: unknown head(s) {bad}; use some of {', '.join(HEADS)}")
    head_train, head_model = dict(fs.get("train") or {}), dict(fs.get("model") or {})
    for section, per_head in (("train", head_train), ("model", head_model)):
        stray = sorted(set(per_head) - set(HEADS))
        if stray:
            raise UserError(f"recipe {recipe.get('_path')}: pipeline.fewshot.{section} names unknown head(s) {stray}; "
                            f"use {list(HEADS)}")
    return Plan(shots=shots, seed=int(args.seed if args.seed is not None else values["seed"]),
                epochs=float(args.epochs if args.epochs is not None else values["epochs"]),
                min_steps=int(values["min_steps"]), heads=[HEADS[n] for n in names], templates=fs.get("templates"),
                class_prompts=fs.get("class_prompts"),
                head_train={k: dict(v or {}) for k, v in head_train.items()},
                head_model={k: dict(v or {}) for k, v in head_model.items()}, allow_short=args.allow_short)


def smoke_recipe(recipe: dict[str, Any]) -> dict[str, Any]:
    r = copy.deepcopy(recipe)
    if "synth" in r["pipeline"]:  # a recipe used with given stores may have no dataset section
        r["pipeline"]["synth"] = {**r["pipeline"]["synth"], **SMOKE_SYNTH}
    r["train"] = {**r["train"], **SMOKE_TRAIN}
    return r


# ------------------------------------------------------------------------------ the store pair


def text_problem(spec: Any) -> str | None:
    """Why CLIP weights ``spec`` (a `BackboneSpec`) cannot encode class names, or None if they can."""
    from evl_cache.text import build_text_tower

    try:
        build_text_tower(spec, "cpu").tokenize(["a video"])
    except UserError as err:
        return str(err)
    return None


def backbone_spec(arch: str, weights: str, recipe: dict[str, Any]) -> Any:
    from evl_cache.backbone import BackboneSpec

    e = recipe["extract"]
    return BackboneSpec(arch=arch, weights=weights, seed=int(e.get("seed", 0)), quick_gelu=e.get("quick_gelu", True),
                        precision="fp32")


@dataclass
class Stores:
    ledger: Ledger
    train: Path
    val: Path
    note: str
    kinds: dict[str, str] = field(default_factory=dict)


def prepare_stores(recipe: dict[str, Any], args: argparse.Namespace, work: Path, threads: int, need_text: bool) -> Stores:
    """The given store pair, or the recipe's synthetic dataset extracted with per-frame embeddings."""
    if args.train_store or args.val_store:
        if not (args.train_store and args.val_store):
            raise UserError("--train-store and --val-store go together: pass both, or neither to extract the recipe's data")
        for flag, p in (("--train-store", args.train_store), ("--val-store", args.val_store)):
            if not Path(p).exists():
                raise UserError(f"{flag}: store {p} not found; pass an extracted store (evl-cache extract ... --emb)")
        say(f"[1-3/5] given stores: {rel(args.train_store)} (train), {rel(args.val_store)} (eval)")
        return Stores(Ledger(work), Path(args.train_store), Path(args.val_store), "the given stores' backbone")
    from demo import backbone_choice, prepare_cache

    arch, weights, note = backbone_choice(recipe, work)
    if args.smoke and need_text and text_problem(backbone_spec(arch, weights, recipe)) is not None:
        arch = str(work / "smoke_clip.json")
        write_text_atomic(Path(arch), json.dumps(SMOKE_CLIP, indent=1) + "\n")
        weights, note = "random", "RANDOM tiny CLIP with a text tower (--smoke: the config's backbone has none)"
        say(f"smoke: the config's backbone has no usable text tower; using a {note.split(' (')[0]}")
    r = copy.deepcopy(recipe)
    r["extract"]["emb"] = True  # the X-CLIP and linear heads read per-frame embeddings
    c = prepare_cache(r, work, threads, steps_total=5, backbone=(arch, weights, note))
    return Stores(c.ledger, c.train_store, c.val_store, note, c.kinds)


# ------------------------------------------------------------------------------ training and evaluation


def run_config(recipe: dict[str, Any], plan: Plan, head: Head, k: int, steps: int, train_store: Path,
               class_prompts: Path | None = None) -> Any:
    """The `RunConfig` of one (head, K): the head's model keys, the recipe's train section with ``steps``."""
    from evl_cache.config import RunConfig

    model = dict(recipe["model"]) if head.use_recipe_model else dict(head.model)
    if head.name in ("linear_text",) and plan.templates:
        model["text_templates"] = plan.templates
    if head.text and class_prompts is not None:
        model["class_prompts"] = str(class_prompts)
    model.update(plan.head_model.get(head.name, {}))
    train = {**recipe["train"], "steps": steps, "eval_every": steps, "checkpoint_every": steps,
             **plan.head_train.get(head.name, {})}
    if int(train.get("warmup_steps", 0)) >= steps:
        train["warmup_steps"] = 0
    data = {**recipe["data"], "train_store": str(train_store), "val_store": None, "few_shot": k,
            "few_shot_seed": plan.seed, "few_shot_allow_short": plan.allow_short}
    return RunConfig.from_dict({"model": model, "train": train, "data": data}, where=recipe.get("_path", "recipe"))


def class_prompts_file(plan: Plan, names: list[str], work: Path) -> Path | None:
    """The names file the text heads and zero-shot prompt with: the recipe's file, or for "synthetic" one
    written from `evl_cache.synth.PROMPT_NAMES` in the store's label order; None: the store's names."""
    from evl_cache.synth import PROMPT_NAMES

    if plan.class_prompts is None:
        return None
    if plan.class_prompts != "synthetic":
        return Path(plan.class_prompts)
    missing = [n for n in names if n not in PROMPT_NAMES]
    if missing:
        raise UserError(f"pipeline.fewshot.class_prompts: synthetic names only synthetic classes, and the store has "
                        f"{missing[0]!r}; give a names file instead")
    path = work / "class_prompts.txt"
    write_text_atomic(path, "\n".join(PROMPT_NAMES[n] for n in names) + "\n")
    return path


def synthetic_kinds(names: list[str]) -> list[str] | None:
    """Each class's kind ("motion" | "appearance") when every class is a synthetic benchmark class."""
    from evl_cache.synth import CLASS_SPECS

    return [CLASS_SPECS[n].kind for n in names] if all(n in CLASS_SPECS for n in names) else None


def top1_by_kind(eval_dir: Path, kinds: list[str]) -> dict[str, dict[str, float]]:
    """Per kind of class, from eval's scores.npz: top-1 over all classes, and within the kind's classes only.

    Why: on the synthetic benchmark the text tower knows the appearance classes' names and nothing about
    motion, so one overall number hides where text helps."""
    import numpy as np

    from evl_cache.ensemble import load_predictions

    pred = load_predictions(eval_dir)  # eval's own reader: a damaged or partial scores file is refused
    scores, labels = pred.scores, pred.labels
    kind_of = np.array(kinds)
    out = {}
    for kind in sorted(set(kinds)):
        rows = (labels >= 0) & (kind_of[np.clip(labels, 0, None)] == kind)
        cols = np.flatnonzero(kind_of == kind)
        within = cols[scores[rows][:, cols].argmax(1)]
        out[kind] = {"top1": float((scores[rows].argmax(1) == labels[rows]).mean()),
                     "top1_within": float((within == labels[rows]).mean()), "classes": int(len(cols)),
                     "videos": int(rows.sum())}
    return out


def steps_for(plan: Plan, videos: int, batch: int) -> int:
    """``epochs`` passes over the subset at the global batch, at least ``min_steps``."""
    return max(plan.min_steps, math.ceil(plan.epochs * videos / batch))


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    from evl_cache.fewshot import draw_from_store
    from evl_cache.store import open_store
    from evl_cache.zeroshot import spec_like_store

    began = time.perf_counter()
    threads = set_threads(args.threads)
    recipe = load_recipe(args.config)
    if args.smoke:
        recipe = smoke_recipe(recipe)
    plan = make_plan(recipe, args)
    work = args.work or ROOT / "runs" / ("fewshot_smoke" if args.smoke else "fewshot")
    stores = prepare_stores(recipe, args, work, threads, any(h.text for h in plan.heads))
    train_st = open_store(str(stores.train))
    names = list(train_st.class_names)
    subsets = {k: draw_from_store(train_st, k, plan.seed, plan.allow_short, rel(stores.train)) for k in plan.shots}
    unavailable: dict[str, str] = {}
    if any(h.text for h in plan.heads):
        problem = text_problem(spec_like_store(train_st.attrs, str(stores.train), precision="fp32"))
        if problem is not None:
            banner = "!" * 100
            say(f"{banner}\n!! the store's CLIP weights cannot encode class names: {problem}\n"
                f"!! the text heads are not run; pass --config with a CLIP that has a text tower\n{banner}")
            unavailable = {h.name: problem for h in plan.heads if h.text}
    prompts = class_prompts_file(plan, names, work) if not unavailable else None
    kinds = synthetic_kinds(names)
    batch = int(recipe["train"].get("batch_size", 256))
    cells: dict[str, dict[int, dict[str, Any]]] = {h.name: {} for h in plan.heads}
    total = sum(1 for h in plan.heads if h.name not in unavailable) * len(plan.shots)
    i = 0
    for k in plan.shots:
        n = len(subsets[k].videos)
        for head in plan.heads:
            if head.name in unavailable:
                continue
            i += 1
            hb = int(plan.head_train.get(head.name, {}).get("batch_size", batch))
            steps = steps_for(plan, n, hb)
            cfg = run_config(recipe, plan, head, k, steps, stores.train, prompts if head.text else None)
            run_dir, eval_dir = work / "runs" / f"{head.name}_k{k}", work / "eval" / f"{head.name}_k{k}"
            say(f"[4/5] ({i}/{total}) {head.label}, K = {k} ({n} videos): {steps} steps x batch {hb} -> {rel(run_dir)}")
            tr = train_stage(stores.ledger, f"train_{head.name}_k{k}", cfg, run_dir, progress=not args.no_progress)
            ev = eval_stage(stores.ledger, f"eval_{head.name}_k{k}", run_dir / "model", stores.val, eval_dir)
            m = read_metrics(eval_dir)
            cells[head.name][k] = {"top1": m["top1"], "top5": m["top5"], "topk": m["topk"], "videos": n, "steps": steps,
                                   "batch_size": hb, "train_s": tr.seconds, "eval_s": ev.seconds,
                                   "eval_videos": m["videos"], "final_loss": tr.info.get("final_loss"),
                                   "run_dir": rel(run_dir)}
            if kinds:
                cells[head.name][k]["by_kind"] = top1_by_kind(eval_dir, kinds)
    zeroshot = None
    if "linear_text" in cells and "linear_text" not in unavailable:
        zeroshot = zeroshot_point(stores, names, plan, work, prompts)
        if kinds:
            zeroshot["by_kind"] = top1_by_kind(work / "eval" / "zeroshot", kinds)
    return {"plan": plan, "cells": cells, "unavailable": unavailable, "zeroshot": zeroshot, "smoke": args.smoke,
            "backbone": stores.note, "train_store": rel(stores.train), "val_store": rel(stores.val),
            "subsets": {k: {"videos": len(s.videos), "short": s.short} for k, s in subsets.items()},
            "classes": len(names), "kinds": kinds, "class_prompts": rel(prompts) if prompts else None, "threads": threads, "wall_s": time.perf_counter() - began, "work": work}


def zeroshot_point(stores: Stores, names: list[str], plan: Plan, work: Path, prompts: Path | None = None) -> dict[str, Any]:
    """K = 0 of the text-initialised linear head: `evl-cache zeroshot` on the eval store, same templates
    and class names (``prompts``, matched to the store's labels by position, else the store's own)."""
    from evl_cache.templates import read_class_names
    from evl_cache.zeroshot import DEFAULT_TEMPLATES, zeroshot_store

    classes = work / "classes.txt"
    prompt_names = read_class_names(prompts) if prompts else names
    write_text_atomic(classes, "\n".join(prompt_names) + "\n")
    out = work / "eval" / "zeroshot"
    templates = plan.templates or DEFAULT_TEMPLATES

    def fn() -> dict[str, Any]:
        m = zeroshot_store(str(stores.val), str(classes), templates, out, text_cache=work / "text-cache", device="cpu")
        say(f"  zero-shot: {m['videos']} videos: top-1 {100 * m['top1']:.2f}%")
        return {"top1": m["top1"], "top5": m["top5"]}

    say(f"[5/5] zero-shot (K = 0) on {rel(stores.val)} with templates {templates}")
    res = stores.ledger.run("zeroshot", {"store": str(stores.val), "classes": prompt_names, "templates": templates}, fn,
                            complete=lambda: (out / "metrics.json").is_file(), outputs=[out])
    m = read_metrics(out)
    return {"top1": m["top1"], "top5": m["top5"], "topk": m["topk"], "eval_videos": m["videos"], "seconds": res.seconds,
            "templates": templates}


# ------------------------------------------------------------------------------ report


def write_table(out: Path, result: dict[str, Any]) -> dict[str, Any]:
    plan: Plan = result["plan"]
    cells, zs, smoke = result["cells"], result["zeroshot"], result["smoke"]
    header = ["head"] + (["K = 0 (zero-shot)"] if zs else []) + [f"K = {k}" for k in plan.shots]
    rows = []
    for h in plan.heads:
        if h.name in result["unavailable"]:
            rows.append([h.label] + (["-"] if zs else []) + ["not run (no text tower)"] * len(plan.shots))
            continue
        first = ([pct(zs["top1"]) if h.name == "linear_text" else "-"] if zs else [])
        rows.append([h.label] + first + [pct(cells[h.name][k]["top1"]) for k in plan.shots])
    detail = [[h.label, str(k), str(c["videos"]), f"{c['steps']} x {c['batch_size']}", pct(c["top1"]), pct(c["top5"]),
               fmt_s(c["train_s"]), fmt_s(c["eval_s"])]
              for h in plan.heads for k, c in sorted(cells.get(h.name, {}).items())]
    eval_videos = next((c["eval_videos"] for h in cells.values() for c in h.values()), zs["eval_videos"] if zs else 0)
    title = "# Few-shot top-1 against K videos per class\n"
    if smoke:
        title = ("# SMOKE RUN: few-shot top-1 against K\n\n**SMOKE RUN: a few videos and steps; the accuracies below "
                 "test the recipe, they mean nothing.**\n")
    md = [
        title,
        f"K videos per class drawn with seed {plan.seed} from `{result['train_store']}` ({result['classes']} classes; "
        f"each K's videos are inside every larger K's), trained from the cache for {plan.epochs:g} "
        f"epoch{'s' * (plan.epochs != 1)} of the subset "
        f"(at least {plan.min_steps} steps), evaluated on all {eval_videos} videos of `{result['val_store']}` "
        f"(1 video = {100 / max(eval_videos, 1):.2f} points). Backbone: {result['backbone']}.\n",
        md_table(header, rows),
    ]
    if zs:
        md.append(f"K = 0 is CLIP zero-shot (`evl-cache zeroshot`, templates `{zs['templates']}`): the text-initialised "
                  "linear head's weights before any step.\n")
    for name, why in result["unavailable"].items():
        md.append(f"- **{HEADS[name].label}: not run.** {why}\n")
    if result.get("kinds"):
        md.append(by_kind_section(plan, cells, zs, result["kinds"]))
    md += ["## Runs\n", md_table(["head", "K", "videos", "steps x batch", "top-1", "top-5", "train", "eval"], detail),
           f"Threads: {result['threads']} ({platform.processor() or platform.machine()}); wall time of this invocation "
           f"{fmt_s(result['wall_s'])} (stage times are as measured when each stage ran).\n",
           "![top-1 vs K](top1_vs_k.png)\n"] + (["![top-1 by kind](top1_by_kind.png)\n"] if result.get("kinds") else [])
    write_text_atomic(out / "table.md", "\n".join(md))
    data = {"smoke": smoke, "backbone": result["backbone"], "shots": plan.shots, "seed": plan.seed, "epochs": plan.epochs,
            "min_steps": plan.min_steps, "train_store": result["train_store"], "val_store": result["val_store"],
            "classes": result["classes"], "subsets": {str(k): v for k, v in result["subsets"].items()},
            "zeroshot": zs, "unavailable": result["unavailable"], "wall_s": result["wall_s"],
            "rows": [{"head": h.name, "label": h.label, "k": k, **c} for h in plan.heads
                     for k, c in sorted(cells.get(h.name, {}).items())]}
    write_text_atomic(out / "table.json", json.dumps(data, indent=2, default=str) + "\n")
    return data


def by_kind_section(plan: Plan, cells: dict[str, dict[int, dict[str, Any]]], zs: dict[str, Any] | None,
                    kinds: list[str]) -> str:
    """Top-1 on each kind of synthetic class: over all classes, and within that kind's classes only."""
    order = sorted(set(kinds))
    counts = {kind: kinds.count(kind) for kind in order}
    header = ["head", "K"] + [f"{kind} ({counts[kind]} classes): all / within" for kind in order]

    def row(label: str, k: str, by_kind: dict[str, Any]) -> list[str]:
        return [label, k] + [f"{pct(by_kind[kind]['top1'])} / {pct(by_kind[kind]['top1_within'])}" for kind in order]

    rows = [row("zero-shot (text only)", "0", zs["by_kind"])] if zs and "by_kind" in zs else []
    rows += [row(h.label, str(k), c["by_kind"]) for h in plan.heads for k, c in sorted(cells.get(h.name, {}).items())
             if "by_kind" in c]
    return ("## By kind of class\n\nTop-1 on the eval videos of each kind: \"all\" picks among every class, "
            "\"within\" only among that kind's classes (chance: 1 / classes).\n\n" + md_table(header, rows))


def plot(out: Path, result: dict[str, Any]) -> Path:
    """Top-1 against K, one line per head; K = 0 (zero-shot) on the text-initialised linear head's line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plan: Plan = result["plan"]
    zs = result["zeroshot"]
    ks = ([0] if zs else []) + plan.shots
    pos = {k: i for i, k in enumerate(ks)}  # evenly spaced: K doubles from one tick to the next
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=110)
    styles = [("o", "-"), ("s", "--"), ("^", "-."), ("D", ":")]  # heads stay visible where their lines coincide
    for j, h in enumerate(plan.heads):
        pts = sorted(result["cells"].get(h.name, {}).items())
        if not pts:
            continue
        xs, ys = [pos[k] for k, _ in pts], [100 * c["top1"] for _, c in pts]
        if h.name == "linear_text" and zs:
            xs, ys = [pos[0]] + xs, [100 * zs["top1"]] + ys
        marker, line = styles[j % len(styles)]
        ax.plot(xs, ys, marker=marker, linestyle=line, markersize=8 - 1.5 * j, label=h.label)
    ax.set_xticks(range(len(ks)), ["0\n(zero-shot)" if k == 0 else str(k) for k in ks])
    ax.set_xlabel("K (videos per class)")
    ax.set_ylabel("top-1 on the eval store (%)")
    ax.set_title("few-shot top-1" + (" (SMOKE: meaningless)" if result["smoke"] else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, out / "top1_vs_k.png")


def plot_by_kind(out: Path, result: dict[str, Any]) -> Path | None:
    """One panel per kind of synthetic class: top-1 within the kind's classes against K, one line per head."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds, plan, zs = result.get("kinds"), result["plan"], result["zeroshot"]
    if not kinds:
        return None
    order = sorted(set(kinds))
    ks = ([0] if zs and "by_kind" in zs else []) + plan.shots
    pos = {k: i for i, k in enumerate(ks)}
    fig, axes = plt.subplots(1, len(order), figsize=(5.2 * len(order), 4.2), dpi=110, sharey=True)
    styles = [("o", "-"), ("s", "--"), ("^", "-."), ("D", ":")]
    for ax, kind in zip(axes if len(order) > 1 else [axes], order):
        for j, h in enumerate(plan.heads):
            pts = [(k, c["by_kind"][kind]["top1_within"]) for k, c in sorted(result["cells"].get(h.name, {}).items())
                   if "by_kind" in c]
            if h.name == "linear_text" and zs and "by_kind" in zs:
                pts = [(0, zs["by_kind"][kind]["top1_within"])] + pts
            if pts:
                marker, line = styles[j % len(styles)]
                ax.plot([pos[k] for k, _ in pts], [100 * v for _, v in pts], marker=marker, linestyle=line,
                        markersize=8 - 1.5 * j, label=h.label)
        n = kinds.count(kind)
        ax.axhline(100 / n, color="grey", linewidth=0.8, linestyle=":")  # chance
        ax.set_xticks(range(len(ks)), ["0\n(zero-shot)" if k == 0 else str(k) for k in ks])
        ax.set_xlabel("K (videos per class)")
        ax.set_title(f"{kind} classes ({n}): top-1 among them (chance {100 / n:.0f}%, dotted)")
        ax.grid(alpha=0.3)
    (axes[0] if len(order) > 1 else axes).set_ylabel("top-1 (%)")
    (axes[-1] if len(order) > 1 else axes).legend(fontsize=8)
    return save_figure(fig, out / "top1_by_kind.png")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Few-shot top-1 against K for the X-CLIP, text-initialised linear and EVL heads")
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "synthetic_demo.yaml")
    ap.add_argument("--shots", default=None, help="comma-separated K values (default 2,4,8,16)")
    ap.add_argument("--seed", type=int, default=None, help="seed of the few-shot draw (default 0)")
    ap.add_argument("--epochs", type=float, default=None, help="passes over each subset (default 50, X-CLIP's)")
    ap.add_argument("--heads", default=None, help=f"comma-separated subset of {','.join(HEADS)} (default {','.join(DEFAULT_HEADS)})")
    ap.add_argument("--allow-short", action="store_true", help="train on all the videos of a class with fewer than K")
    ap.add_argument("--train-store", default=None, help="an extracted train store to draw from (with --val-store)")
    ap.add_argument("--val-store", default=None, help="the eval store, every video of which is evaluated")
    ap.add_argument("--work", type=Path, default=None, help="caches and runs (default runs/fewshot, or runs/fewshot_smoke)")
    ap.add_argument("--out", type=Path, default=None, help="table.md, table.json, top1_vs_k.png (default results/fewshot)")
    ap.add_argument("--smoke", action="store_true", help="a few videos and steps: tests the recipe end to end")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    out = args.out or ROOT / "results" / ("fewshot_smoke" if args.smoke else "fewshot")
    result = run_all(args)
    out.mkdir(parents=True, exist_ok=True)
    data = write_table(out, result)
    plot(out, result)
    plot_by_kind(out, result)
    say(f"\nfew-shot top-1{' (SMOKE)' if args.smoke else ''}: {rel(out / 'table.md')}")
    if data["zeroshot"]:
        say(f"  {'zero-shot (K = 0)':<30} {pct(data['zeroshot']['top1']):>6}")
    for r in data["rows"]:
        say(f"  {r['label']:<30} K = {r['k']:<3} top-1 {pct(r['top1']):>6}  ({r['videos']} videos, {r['steps']} steps)")
    return 0


if __name__ == "__main__":
    os.chdir(ROOT)
    main_guard(main)
