"""Linear probes on frozen tiny-ViT frame features of the synthetic benchmark.

Why: shows what the frozen image backbone alone can and cannot do before any EVL decoder is trained.
A linear classifier on frame features MEAN-POOLED over time sees no order, so appearance classes
should be easy and motion classes (pairs that differ only in direction) near chance; the same
features CONCATENATED over a few frames keep the order and bound what a temporal model can recover.

Usage:
  .venv/bin/python pipelines/probe_features.py --data /tmp/synth --backbone evl_cache/assets/tiny_vit
(`--data` is an `evl-cache synth` output folder: train.csv, val.csv, classes.json.)
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pretrain_tiny as pt  # noqa: E402


def read_split(data: Path, split: str, names: list[str]) -> tuple[list[Path], np.ndarray]:
    with open(data / f"{split}.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return [data / r["path"] for r in rows], np.array([names.index(r["label"]) for r in rows])


@torch.no_grad()
def frame_features(visual: torch.nn.Module, paths: list[Path]) -> torch.Tensor:
    """(N, T, 2C): per frame, ln_post of the last block's CLS token and of the mean patch token."""
    import decord

    out = []
    for p in paths:
        vr = decord.VideoReader(str(p))
        frames = vr.get_batch(list(range(len(vr)))).asnumpy()
        x = visual.transformer(visual._embeds(pt.to_input(frames)))
        x = visual.ln_post(x)
        out.append(torch.cat([x[:, 0], x[:, 1:].mean(1)], -1))
    return torch.stack(out)


def fit_linear(xtr: torch.Tensor, ytr: np.ndarray, xva: torch.Tensor, classes: int, epochs: int = 400) -> np.ndarray:
    """Standardised multinomial logistic regression (full batch Adam, L2); returns val predictions."""
    # near-constant feature dimensions (common in a random-init tower) must not blow up to huge
    # values: that made the fit crawl through denormal floats
    mu, sd = xtr.mean(0), xtr.std(0).clamp(min=1e-3)
    xtr, xva = (xtr - mu) / sd, (xva - mu) / sd
    torch.manual_seed(0)
    lin = torch.nn.Linear(xtr.shape[1], classes)
    opt = torch.optim.Adam(lin.parameters(), lr=1e-2, weight_decay=1e-3)
    y = torch.from_numpy(ytr)
    for _ in range(epochs):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(lin(xtr), y).backward()
        opt.step()
    return lin(xva).argmax(-1).numpy()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--backbone", type=Path, default=Path("evl_cache/assets/tiny_vit"))
    ap.add_argument("--frames-concat", type=int, default=4, help="frames (evenly spaced) for the order-aware probe")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None, help="optional JSON file for the results")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    meta = json.loads((args.data / "classes.json").read_text())
    names = [m["name"] for m in meta]
    kind = np.array([m["kind"] for m in meta])
    tr_paths, ytr = read_split(args.data, "train", names)
    va_paths, yva = read_split(args.data, "val", names)
    cfg, trained = pt.load(args.backbone)
    torch.manual_seed(0)
    rand = pt.build_visual(cfg).eval()
    results = {}
    for tag, visual in (("pretrained", trained), ("random_init", rand)):
        t0 = time.perf_counter()
        ftr, fva = frame_features(visual, tr_paths), frame_features(visual, va_paths)
        T = ftr.shape[1]
        idx = np.linspace(0, T - 1, args.frames_concat).round().astype(int)
        for probe, (a, b) in {"mean_pool": (ftr.mean(1), fva.mean(1)),
                              f"concat_{args.frames_concat}_frames": (ftr[:, idx].flatten(1), fva[:, idx].flatten(1))}.items():
            pred = fit_linear(a, ytr, b, len(names))
            hit = pred == yva
            res = {"all": float(hit.mean())}
            for k in ("motion", "appearance"):
                sel = kind[yva] == k
                if sel.any():
                    res[k] = float(hit[sel].mean())
            results[f"{tag}/{probe}"] = res
        print(f"{tag}: features in {time.perf_counter() - t0:.0f} s", flush=True)
    print("| backbone / probe | all | motion | appearance |\n|---|---|---|---|")
    for k, r in results.items():
        print(f"| {k} | {r['all']:.3f} | {r.get('motion', float('nan')):.3f} | {r.get('appearance', float('nan')):.3f} |")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
