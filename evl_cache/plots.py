"""PNG plots for training runs and evaluations (matplotlib, headless Agg backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _line(path: Path, xs: list[float], ys: list[float], title: str, ylabel: str, logy: bool = False) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    ax.plot(xs, ys, marker="o" if len(xs) <= 30 else None, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if logy and ys and min(ys) > 0:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_training(records: list[dict[str, Any]], out_dir: str | Path) -> list[Path]:
    """loss.png, lr.png and (if validation ran) val_accuracy.png from metrics.jsonl records."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_top1" in r]
    written = []
    if train:
        steps = [r["step"] for r in train]
        plt = _plt()
        fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
        ax.plot(steps, [r["loss"] for r in train], alpha=0.35, label="loss at the logged step")
        if all("loss_mean" in r for r in train):
            ax.plot(steps, [r["loss_mean"] for r in train], label="mean over the log window")
        written.append(_finish(plt, fig, ax, out / "loss.png", "cross-entropy", "training loss"))
        written.append(_line(out / "lr.png", steps, [r["lr"] for r in train], "learning rate", "lr"))
    if val:
        plt = _plt()
        fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
        steps = [r["step"] for r in val]
        ax.plot(steps, [100 * r["val_top1"] for r in val], marker="o", markersize=3, label="top-1")
        if all("val_top5" in r for r in val):
            ax.plot(steps, [100 * r["val_top5"] for r in val], marker="s", markersize=3, label="top-5")
        written.append(_finish(plt, fig, ax, out / "val_accuracy.png", "accuracy (%)", "validation accuracy"))
    return written


def _finish(plt: Any, fig: Any, ax: Any, path: Path, ylabel: str, title: str) -> Path:
    """Label a per-step curve, save it as PNG and free the figure."""
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_confusion(matrix: np.ndarray, class_names: list[str], path: str | Path) -> Path:
    """Row-normalised confusion matrix (rows = true class); labels shown when there are few classes."""
    plt = _plt()
    n = len(class_names)
    rows = matrix.sum(axis=1, keepdims=True)
    norm = np.divide(matrix, rows, out=np.zeros(matrix.shape, dtype=float), where=rows > 0)
    size = min(12.0, 3.0 + 0.3 * n)
    fig, ax = plt.subplots(figsize=(size, size), dpi=110)
    im = ax.imshow(norm, vmin=0, vmax=1, cmap="Blues")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    if n <= 40:
        ax.set_xticks(range(n), class_names, rotation=90, fontsize=7)
        ax.set_yticks(range(n), class_names, fontsize=7)
    if n <= 12:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(int(matrix[i, j])), ha="center", va="center", fontsize=8,
                        color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion matrix (row-normalised)")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_weight_curve(ws: list[float], top1s: list[float], chosen: float, path: str | Path,
                      names: list[str]) -> Path:
    """Validation top-1 of a two-model ensemble against the first model's weight w, the chosen w marked."""
    plt = _plt()
    order = np.argsort(ws)
    xs, ys = np.asarray(ws)[order], 100 * np.asarray(top1s)[order]
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    ax.plot(xs, ys, marker="o", markersize=4)
    best = float(ys[np.flatnonzero(np.isclose(xs, chosen))[0]]) if np.isclose(xs, chosen).any() else None
    if best is not None:
        ax.plot([chosen], [best], marker="*", markersize=14, color="tab:red", linestyle="none",
                label=f"chosen w = {chosen:.1f} ({best:.2f}%)")
        ax.legend()
    ax.set_xlabel(f"w (score = w * {names[0]} + (1 - w) * {names[1]})")
    ax.set_ylabel("validation top-1 (%)")
    ax.set_title("ensemble weight search")
    ax.set_xlim(-0.05, 1.05)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
