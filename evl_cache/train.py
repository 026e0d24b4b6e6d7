"""Stage 2: train the EVL decoder by streaming a cache store (no video decoding, no backbone).

Step-based loop (nanoGPT-style): AdamW with weight decay on every parameter, per-step cosine (after
an optional warmup), autocast on GPU (fp16 with a GradScaler, or bf16), gradient accumulation.

Run directory layout::

    config.yaml            the resolved recipe
    metrics.jsonl          one JSON object per log step (loss, lr, samples/s) and per validation
    checkpoints/step_N.*   decoder checkpoints (safetensors + json) every N steps
    model.safetensors/json the final decoder, with everything `predict` needs in its meta
    train_state.pt         resume state: weights, optimizer, scheduler, scaler, RNG, step
    plots/*.png            loss, lr and validation accuracy curves

``train_state.pt`` holds only tensors and plain Python values and is read with
``torch.load(weights_only=True)``; `--resume` continues the loss sequence bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from evl_cache.backbone import resolve_device
from evl_cache.completeness import require_complete, store_line, video_counts
from evl_cache.config import RunConfig, check_store_pair, decoder_config_for_store, save_config
from evl_cache.errors import UserError
from evl_cache.store import open_store

STATE_FILE = "train_state.pt"
# Settings that may change between an interrupted run and its resume without changing the result.
RESUMABLE_CHANGES = {"checkpoint_every", "eval_every", "log_every", "eval_batch_size", "device"}


@dataclass
class TrainSummary:
    out_dir: str
    steps: int
    start_step: int
    samples: int
    seconds: float
    samples_per_s: float
    final_loss: float | None
    val_top1: float | None
    checkpoint: str | None
    plots: list[str] = field(default_factory=list)
    store_videos: dict[str, dict[str, int]] = field(default_factory=dict)  # {"train"/"val": done/failed/pending}

    def lines(self) -> list[str]:
        out = [f"trained steps {self.start_step}..{self.steps} ({self.samples} clip-views) in {self.seconds:.1f} s "
               f"({self.samples_per_s:.1f} samples/s); final loss {self.final_loss if self.final_loss is None else round(self.final_loss, 4)}"]
        if self.val_top1 is not None:
            out.append(f"validation top-1 {100 * self.val_top1:.2f}%")
        if self.checkpoint:
            out.append(f"checkpoint {self.checkpoint}")
        out.append(f"run directory {self.out_dir} (metrics.jsonl, plots/)")
        return out


def lr_factor(step: int, steps: int, warmup: int, min_ratio: float) -> float:
    """Multiplier of the base lr for optimizer step ``step`` (0-based): linear warmup, then cosine to min."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def resolve_amp(amp: str, device: torch.device) -> str:
    """auto = fp16 with a grad scaler on CUDA (the reference recipe); always off on CPU."""
    if device.type != "cuda":
        return "off"
    if amp == "auto":
        return "fp16"
    if amp == "bf16" and not torch.cuda.is_bf16_supported():
        raise UserError("train.amp=bf16 but this GPU has no bf16 support; use fp16 or off")
    return amp


def checkpoint_meta(attrs: dict[str, Any], val_attrs: dict[str, Any] | None, store_path: str, step: int) -> dict[str, Any]:
    """Everything `predict`/`evaluate` need besides the weights: backbone, blocks, sampling, views, classes."""
    from evl_cache.video import Sampling, default_eval_grid

    if val_attrs is not None and val_attrs["views"]["kind"] == "eval":
        grid = [int(val_attrs["views"]["temporal"]), int(val_attrs["views"]["spatial"])]
    else:
        grid = list(default_eval_grid(Sampling(**attrs["sampling"])))
    return {
        "backbone": attrs["backbone"],
        "blocks": list(attrs["blocks"]),
        "frames": attrs["frames"],
        "tokens": attrs["tokens"],
        "width": attrs["width"],
        "heads": attrs["heads"],
        "grid": list(attrs["grid"]),
        "attention": attrs["attention"],
        "sampling": attrs["sampling"],
        "eval_views": {"temporal": grid[0], "spatial": grid[1]},
        "min_frames": attrs.get("min_frames", attrs["frames"]),
        "class_names": list(attrs["class_names"]),
        "trained": {"step": step, "train_store": store_path, "manifest_sha256": attrs.get("manifest_sha256")},
    }


# ------------------------------------------------------------------------------- RNG state


def rng_state() -> dict[str, Any]:
    """Torch (CPU, CUDA), numpy and python RNG states as tensors and plain values (weights_only-safe)."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "python": {"version": int(py_version), "internal": torch.tensor(py_internal, dtype=torch.int64),
                   "gauss": py_gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["internal"].tolist()), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------- the loop


def _items_digest(store: Any) -> str:
    """Identity of what the sampler draws from: the done videos and the view count."""
    done = store.done_indices().astype(np.int64)
    return hashlib.sha256(done.tobytes() + str(store.num_views).encode()).hexdigest()


def _load_state(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure means a corrupt or foreign file
        raise UserError(f"training state {path} is unreadable ({err.__class__.__name__}); "
                        f"start a new run with a fresh --out, or restore the file") from err


def _check_resume(saved: dict[str, Any], cfg: RunConfig, digest: str, where: Path) -> None:
    old = saved["config"]
    new = cfg.to_dict()
    for section in ("model", "train"):
        for key, value in new[section].items():
            if key in RESUMABLE_CHANGES:
                continue
            if old[section].get(key) != value:
                raise UserError(f"cannot resume {where}: {section}.{key} was {old[section].get(key)!r}, now {value!r}; "
                                f"resume with the original settings or start a new --out")
    if saved["items_digest"] != digest:
        raise UserError(f"cannot resume {where}: the train store's done videos or views changed since the run started; "
                        f"resume on the same store or start a new --out")


def _write_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _read_metrics(path: Path, upto: int) -> list[dict[str, Any]]:
    """Records logged at or before ``upto``; later ones belong to an interrupted stretch and are dropped."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            if rec.get("step", 0) <= upto:
                out.append(rec)
    return out


def train(cfg: RunConfig, out_dir: str | os.PathLike, resume: bool = False, until_step: int | None = None,
          progress: bool = True, echo: Callable[[str], None] | None = None) -> TrainSummary:
    """Train a decoder on ``cfg.data.train_store``, writing the run directory ``out_dir``.

    ``until_step`` stops early (after that many optimizer steps in total) as if interrupted: the
    cosine schedule still spans ``cfg.train.steps``, and `resume` continues from the last state.
    A store with pending videos is refused unless ``cfg.data.allow_partial``; ``echo`` receives one
    line per store with its done/failed/pending counts before training starts.
    """
    from evl_cache.checkpoints import save_checkpoint
    from evl_cache.data import make_loader, to_device
    from evl_cache.decoder import EVLDecoder
    from evl_cache.evaluate import autocast, collect_view_probs, compute_metrics, video_scores
    from evl_cache.plots import plot_training

    cfg = cfg.validated()
    t = cfg.train
    out = Path(out_dir)
    if not cfg.data.train_store:
        raise UserError("no training store given; pass --train-store PATH (or data.train_store in the config)")
    store = open_store(cfg.data.train_store)
    attrs = store.attrs
    dcfg = decoder_config_for_store(cfg.model, attrs, cfg.data.train_store)
    partial_flag = "--allow-partial (data.allow_partial: true)"
    counts = {"train": video_counts(store)}
    require_complete(counts["train"], cfg.data.train_store, cfg.data.allow_partial, partial_flag)
    val_attrs = None
    if cfg.data.val_store:
        val_store = open_store(cfg.data.val_store)
        check_store_pair(attrs, val_store.attrs, cfg.data.val_store)
        counts["val"] = video_counts(val_store)
        require_complete(counts["val"], cfg.data.val_store, cfg.data.allow_partial, partial_flag)
        val_attrs = val_store.attrs
        val_labels = val_store.labels()
    done = store.done_indices()
    if len(done) == 0:
        raise UserError(f"store {cfg.data.train_store} has no extracted videos; run `evl-cache extract` to completion first")
    labels = store.labels()[done]
    if labels.min() < 0 or labels.max() >= dcfg.num_classes:
        raise UserError(f"store {cfg.data.train_store} has unlabelled or out-of-range labels "
                        f"({int(labels.min())}..{int(labels.max())} for {dcfg.num_classes} classes); train on a labelled split")
    digest = _items_digest(store)
    state_path = out / STATE_FILE
    if state_path.exists() and not resume:
        raise UserError(f"{out} already holds a training run ({STATE_FILE}); pass --resume to continue it or choose a new --out")
    if resume and not state_path.exists():
        raise UserError(f"nothing to resume in {out} (no {STATE_FILE}); drop --resume to start a new run")
    saved = _load_state(state_path) if resume else None
    if saved is not None:
        _check_resume(saved, cfg, digest, out)
    if echo is not None:
        echo(store_line("train store", cfg.data.train_store, counts["train"]))
        if "val" in counts:
            echo(store_line("val store", cfg.data.val_store, counts["val"]))

    device = resolve_device(t.device)
    amp = resolve_amp(t.amp, device)
    torch.manual_seed(t.seed)
    np.random.seed(t.seed % 2**32)
    random.seed(t.seed)
    model = EVLDecoder(dcfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=tuple(t.betas), eps=t.eps, weight_decay=t.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, t.steps, t.warmup_steps, t.min_lr / t.lr if t.lr else 0.0))
    scaler = torch.amp.GradScaler("cuda", enabled=amp == "fp16")
    start = 0
    if saved is not None:
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        if saved["scaler"]:
            scaler.load_state_dict(saved["scaler"])
        start = int(saved["step"])
        set_rng_state(saved["rng"])

    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    metrics_path = out / "metrics.jsonl"
    records = _read_metrics(metrics_path, start) if resume else []
    metrics_path.write_text("".join(json.dumps(r) + "\n" for r in records))
    meta_fn = lambda step: checkpoint_meta(attrs, val_attrs, cfg.data.train_store, step)  # noqa: E731

    micro = t.batch_size // t.grad_accum
    loader = make_loader(cfg.data.train_store, micro, train=True, seed=t.seed, start=start * t.batch_size,
                         num_workers=cfg.data.num_workers, prefetch_factor=cfg.data.prefetch_factor,
                         pin_memory=cfg.data.pin_memory and device.type == "cuda")
    end = t.steps if until_step is None else min(t.steps, until_step)

    def save_state(step: int) -> str:
        ck = save_checkpoint(out / "checkpoints" / f"step_{step:07d}", model, meta_fn(step))
        _write_atomic(state_path, {
            "step": step, "model": model.state_dict(), "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(), "scaler": scaler.state_dict(), "rng": rng_state(),
            "config": cfg.to_dict(), "items_digest": digest,
            "window": {"loss": win_loss.detach().cpu().clone(), "steps": win_steps},
        })
        return str(ck)

    def validate(step: int) -> dict[str, Any]:
        probs, vids = collect_view_probs(model, cfg.data.val_store, t.eval_batch_size, device,
                                         cfg.data.num_workers, amp)
        videos, scores = video_scores(probs, vids)
        m = compute_metrics(scores, val_labels[videos].astype(np.int64), list(attrs["class_names"]))
        return {"step": step, "val_top1": m["top1"], "val_top5": m["top5"], "val_mean_class": m["mean_class_accuracy"]}

    def log(rec: dict[str, Any]) -> None:
        records.append(rec)
        with open(metrics_path, "a") as fh:
            fh.write(json.dumps(rec) + "\n")

    bar = _Bar(progress, start, end)
    model.train()
    it = iter(loader)
    began = time.perf_counter()
    window_t, window_n = began, 0
    last_loss, last_val, last_ck = None, None, None
    loss_acc = torch.zeros((), device=device)  # this step's loss (mean over its micro-batches)
    win_loss, win_steps = torch.zeros((), device=device), 0  # running sum over the current log window
    if saved is not None and "window" in saved:
        win_loss, win_steps = saved["window"]["loss"].to(device), int(saved["window"]["steps"])
    try:
        for step in range(start, end):
            lr = sched.get_last_lr()[0]
            opt.zero_grad(set_to_none=True)
            for _ in range(t.grad_accum):
                batch = to_device(next(it), device)
                label = batch.pop("label").long()
                batch.pop("video")
                with autocast(device, amp):
                    logits = model(batch)
                loss = F.cross_entropy(logits.float(), label, label_smoothing=t.label_smoothing)
                scaler.scale(loss / t.grad_accum).backward()
                loss_acc += loss.detach() / t.grad_accum
            scaler.step(opt)
            scaler.update()
            sched.step()
            n = step + 1
            window_n += t.batch_size
            win_loss += loss_acc
            win_steps += 1
            if n % t.log_every == 0 or n == t.steps:  # not at until_step: the window carries over
                now = time.perf_counter()
                last_loss = float(loss_acc.item())
                mean_loss = float(win_loss.item()) / win_steps
                sps = window_n / max(now - window_t, 1e-9)
                log({"step": n, "loss": last_loss, "loss_mean": mean_loss, "lr": lr, "samples_per_s": sps,
                     "epoch": n * t.batch_size / len(done)})
                bar.update(n, mean_loss, lr, sps)
                window_t, window_n = now, 0
                win_loss.zero_()
                win_steps = 0
            loss_acc.zero_()
            if cfg.data.val_store and (n % t.eval_every == 0 or n == t.steps):
                rec = validate(n)
                last_val = rec["val_top1"]
                log(rec)
                bar.note(f"step {n}: val top-1 " + ("n/a (no labelled videos)" if last_val is None else f"{100 * last_val:.2f}%"))
                window_t = time.perf_counter()  # samples/s measures training, not validation
            if n % t.checkpoint_every == 0 or n == end:
                last_ck = save_state(n)
                window_t = time.perf_counter()
    finally:
        bar.close()
        del it
    seconds = time.perf_counter() - began
    if end == t.steps:
        final = save_checkpoint(out / "model", model, meta_fn(end))
        last_ck = str(final)
    plots = [str(p) for p in plot_training(records, out / "plots")]
    samples = (end - start) * t.batch_size
    summary = TrainSummary(out_dir=str(out), steps=end, start_step=start, samples=samples, seconds=seconds,
                           samples_per_s=samples / seconds if seconds > 0 else 0.0, final_loss=last_loss,
                           val_top1=last_val, checkpoint=last_ck, plots=plots, store_videos=counts)
    (out / "summary.json").write_text(json.dumps(summary.__dict__, indent=2) + "\n")
    return summary


class _Bar:
    """A rich progress bar showing loss, lr and samples/s (silent when disabled)."""

    def __init__(self, enabled: bool, start: int, end: int) -> None:
        self.progress = None
        if not enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("lr {task.fields[lr]}"),
            TextColumn("{task.fields[sps]} samples/s"), TimeElapsedColumn(), TimeRemainingColumn(),
        )
        self.progress.start()
        self.task = self.progress.add_task("train", total=end, completed=start, loss="-", lr="-", sps="-")

    def update(self, step: int, loss: float, lr: float, sps: float) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=step, loss=f"{loss:.4f}", lr=f"{lr:.2e}", sps=f"{sps:.1f}")

    def note(self, text: str) -> None:
        if self.progress is not None:
            self.progress.console.print(text)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
