"""`make ablation-table6`: the paper's Table 6 (decoder depth, feature maps fed, pooled features)
trained from ONE cache in one sweep.

Every row reads the same train/eval caches of the last K backbone blocks; the decoder options
(`model.num_layers`, `model.layer_blocks`, `model.pool`; docs/decoder.md, "Table 6 options") choose
what each decoder reads, so no row needs its own extraction:
- 6a, depth: 1..K decoder layers over the last 1..K cached blocks;
- 6b, feature maps fed: K layers reading only the last block, or the last two (two layers each);
- 6c, pooled features: frame pairs or 2x2 patches averaged before the decoder. Temporal cross
  attention reads full-resolution maps, so the three 6c rows run without it (the unpooled one too,
  so that pooling is the only difference).

All rows train in one sweep (`evl_cache.sweep`: each batch read once, fed to every decoder, each equal
to its solo run). Writes results/table6.md, table6.json and table6.png. Default: the synthetic
benchmark with `make demo`'s caches; `--k400` uses the B/16 8-frame Table 1 row's caches.

The paper's Table 6 values are not shipped (they were not available to this project offline);
`--paper-values FILE` (YAML, row tag -> the paper's top-1 in %) adds them as a column beside ours.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from ablation_table8 import K400_ROW_CONFIG, add_cache_arguments, finish_cache_arguments, prepare, sweep_and_evaluate
from common import ROOT, fmt_s, load_recipe, main_guard, md_table, pct, rel, say, set_threads, save_figure, write_text_atomic

from evl_cache.errors import UserError


def rows_for(K: int) -> list[dict[str, Any]]:
    """The Table 6 rows for a cache of K blocks: (part, tag, label, model options)."""
    rows = [{"part": "6a", "tag": f"depth{d}", "label": ("1 layer on the last block" if d == 1 else f"{d} layers on the last {d} blocks")
             + (" (reference)" if d == K else ""), "model": {"num_layers": d}} for d in range(1, K + 1)]
    if K >= 2:
        rows.append({"part": "6b", "tag": "maps1", "label": f"{K} layers on the last block",
                     "model": {"layer_blocks": [K - 1] * K}})
        if K >= 4:
            half = K // 2
            rows.append({"part": "6b", "tag": "maps2", "label": f"{K} layers on the last 2 blocks ({half} each)",
                         "model": {"layer_blocks": [K - 2] * half + [K - 1] * (K - half)}})
    no_tca = {"temporal_cross_attention": False}
    rows += [
        {"part": "6c", "tag": "pool_none", "label": "full resolution, no TCA", "model": dict(no_tca)},
        {"part": "6c", "tag": "pool_time", "label": "frame pairs averaged (T/2), no TCA", "model": {**no_tca, "pool": "temporal"}},
        {"part": "6c", "tag": "pool_space", "label": "2x2 patches averaged, no TCA", "model": {**no_tca, "pool": "spatial"}},
    ]
    return rows


def load_paper_values(path: Path | None, tags: list[str]) -> dict[str, float]:
    """``--paper-values``: a YAML mapping of row tag (depth1..depthK, maps1, maps2, pool_none, pool_time,
    pool_space) to the paper's top-1 in %; rows it leaves out get '-'. Checked before any training."""
    if path is None:
        return {}
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as err:
        raise UserError(f"--paper-values {path}: cannot read it ({err.strerror}); give an existing YAML file") from err
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        raise UserError(f"--paper-values {path}: cannot read it as YAML ({getattr(err, 'problem', None) or type(err).__name__}"
                        f"{f' at line {mark.line + 1}' if mark else ''}); give a file like 'depth4: 82.9'") from err
    if not isinstance(data, dict) or not data:
        raise UserError(f"--paper-values {path}: expected a mapping of row tag to top-1 %, e.g. 'depth4: 82.9'")
    unknown = sorted(set(map(str, data)) - set(tags))
    if unknown:
        raise UserError(f"--paper-values {path}: unknown row tag(s) {', '.join(unknown)}; the rows are {', '.join(tags)}")
    bad = [f"{k}: {v!r}" for k, v in data.items() if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 100]
    if bad:
        raise UserError(f"--paper-values {path}: {'; '.join(bad)} is not a top-1 in % (a number from 0 to 100)")
    return {str(k): float(v) for k, v in data.items()}


def planned_blocks(args: argparse.Namespace) -> int:
    """K of the cache this run reads, from its recipe's ``extract.blocks`` or ``decoder_layers`` (the
    backbone's default is its last 4): the rows, and so the valid ``--paper-values`` tags, are known
    before any extraction or training."""
    from evl_cache.extract import parse_blocks

    recipe = load_recipe(K400_ROW_CONFIG if args.k400 else args.config)
    ex = recipe.get("extract", {})
    blocks = parse_blocks(ex.get("blocks"), ex.get("decoder_layers"))
    return 4 if blocks is None else len(blocks)


def cached_blocks(store: Path) -> int:
    from evl_cache.store import open_store

    return len(open_store(str(store)).attrs["blocks"])


def train_rows(c: dict[str, Any], rows: list[dict[str, Any]], args: argparse.Namespace) -> tuple[list[dict[str, Any]], float, Any]:
    """One sweep over the cache for every row, then each row's evaluation (`sweep_and_evaluate`)."""
    results, tr, train = sweep_and_evaluate(c, rows, args, "table 6", "table6", eval_prefix="table6_")
    return [{**r, **res} for r, res in zip(rows, results)], tr.seconds, train


def write_report(out: Path, results: list[dict[str, Any]], c: dict[str, Any], sweep_s: float, wall: float,
                 steps: Any, paper: dict[str, float], paper_path: Path | None = None) -> None:
    synthetic = bool(c["kinds"])
    header = ["part", "decoder reads", "top-1", "top-5"] + (["motion classes", "appearance classes"] if synthetic else []) \
        + (["paper top-1 (B/16, K400)"] if paper else [])
    rows = []
    for r in results:
        row = [r["part"], r["label"], pct(r["top1"]), pct(r["top5"])]
        if synthetic:
            row += [pct(r["motion"]), pct(r["appearance"])]
        if paper:
            row.append(f"{paper[r['tag']]:.1f}" if r["tag"] in paper else "-")
        rows.append(row)
    about_paper = (f"The paper column comes from `{rel(paper_path)}` (`--paper-values`). " if paper else
                   "The paper's Table 6 values (B/16, Kinetics-400) are not restated here: they were not available to "
                   "this project offline (`--paper-values FILE` adds them as a column). ")
    md = [
        "# EVL Table 6: decoder depth, feature maps fed, pooled features, from one cache\n",
        f"Dataset: **{c['dataset']}**; backbone: {c['backbone']}; every row trained {steps.steps} steps x batch "
        f"{steps.batch_size} from the same caches (`{rel(c['train_store'])}`, `{rel(c['val_store'])}`) in one sweep "
        f"({fmt_s(sweep_s)} for all {len(results)}), then evaluated on the eval cache.\n",
        md_table(header, rows),
        about_paper + ("The synthetic benchmark's values are not comparable to Kinetics' anyway; compare the pattern. "
                       if synthetic else "") + "The 6c rows have temporal cross attention off (it reads full-resolution maps), so compare them "
        "with each other, not with 6a/6b.\n",
        f"Wall time of this invocation: {fmt_s(wall)}.\n",
        "![Table 6](table6.png)\n",
    ]
    write_text_atomic(out / "table6.md", "\n".join(md))
    write_text_atomic(out / "table6.json", json.dumps({"results": results, "sweep_s": sweep_s, "paper": paper}, indent=2) + "\n")


def plot(out: Path, results: list[dict[str, Any]], c: dict[str, Any]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    synthetic = bool(c["kinds"])
    series = [("top-1", "top1")] + ([("motion", "motion"), ("appearance", "appearance")] if synthetic else [])
    fig, ax = plt.subplots(figsize=(11, 4.2), dpi=110)
    x = np.arange(len(results))
    width = 0.8 / len(series)
    for j, (label, key) in enumerate(series):
        ax.bar(x + (j - (len(series) - 1) / 2) * width, [100 * (r[key] or 0) for r in results], width, label=label)
    ax.set_xticks(x, [f"{r['part']}: {r['label']}" for r in results], rotation=25, ha="right", fontsize=7)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 118)
    ax.set_yticks(range(0, 101, 20))
    ax.set_title(f"Table 6 from one cache ({c['dataset']})")
    ax.legend(fontsize=8, loc="upper left", ncol=3)
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, out / "table6.png")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="EVL Table 6: decoder depth, feature maps and pooling from one cache")
    add_cache_arguments(ap)
    ap.add_argument("--paper-values", type=Path, default=None,
                    help="YAML: row tag (depth1..4, maps1, maps2, pool_none, pool_time, pool_space) -> the paper's top-1 %%")
    args = finish_cache_arguments(ap.parse_args(argv))
    paper = load_paper_values(args.paper_values, [r["tag"] for r in rows_for(planned_blocks(args))])  # before any work
    threads = set_threads(args.threads)
    began = time.perf_counter()
    c = prepare(args, threads)
    rows = rows_for(cached_blocks(Path(c["train_store"])))
    results, sweep_s, steps = train_rows(c, rows, args)
    args.out.mkdir(parents=True, exist_ok=True)
    write_report(args.out, results, c, sweep_s, time.perf_counter() - began, steps, paper, args.paper_values)
    plot(args.out, results, c)
    say(f"\nTable 6: {args.out / 'table6.md'}")
    for r in results:
        say(f"  {r['part']} {r['label']:<44} top-1 {pct(r['top1']):>5}  motion {pct(r.get('motion')):>5}  "
            f"appearance {pct(r.get('appearance')):>5}")
    return 0


if __name__ == "__main__":
    os.chdir(ROOT)
    main_guard(main)
