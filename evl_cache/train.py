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

Data parallel (torchrun, or Ray Train through `evl_cache.distributed`): ``train.batch_size`` stays
the global batch, split over ranks x grad_accum; rank r reads slice r of every global batch of the
one sample stream, DDP averages the gradients, and only rank 0 writes the run directory.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from evl_cache.completeness import require_complete, store_line, video_counts
from evl_cache.config import (
    LATER_MODEL_KEYS, LATER_TRAIN_KEYS, RunConfig, TrainConfig, check_store_pair, decoder_config_for_store, save_config,
)
from evl_cache.data import to_device
from evl_cache.distributed import Dist, env_world_size, join, rank_seed
from evl_cache.errors import UserError
from evl_cache.evaluate import autocast, collect_view_probs, compute_metrics, video_scores
from evl_cache.finetune import InitReport, class_tensors, load_matching, param_groups, write_report
from evl_cache.store import open_store

STATE_FILE = "train_state.pt"
# Settings that may change between an interrupted run and its resume without changing the result.
RESUMABLE_CHANGES = {"checkpoint_every", "eval_every", "log_every", "eval_batch_size", "device"}
# Settings a resume may change that keep the global batch and the sample order but change the float
# summation order (like a different world size): e.g. more accumulation on fewer GPUs.
REGROUPABLE_CHANGES = {"grad_accum"}


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
    world_size: int = 1  # data-parallel processes (torchrun / Ray Train workers)

    def lines(self) -> list[str]:
        where = f" on {self.world_size} processes" if self.world_size > 1 else ""
        out = [f"trained steps {self.start_step}..{self.steps} ({self.samples} clip-views){where} in {self.seconds:.1f} s "
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


# ------------------------------------------------------------------------------- resume state


def _items_digest(videos: np.ndarray, num_views: int) -> str:
    """Identity of what the sampler draws from: the videos (every done one, or a few-shot subset) and
    the view count."""
    return hashlib.sha256(np.asarray(videos, dtype=np.int64).tobytes() + str(num_views).encode()).hexdigest()


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
            if key in RESUMABLE_CHANGES or key in REGROUPABLE_CHANGES:
                continue
            was = old[section].get(key, (LATER_TRAIN_KEYS if section == "train" else LATER_MODEL_KEYS).get(key))
            if was != value:
                raise UserError(f"cannot resume {where}: {section}.{key} was {was!r}, now {value!r}; "
                                f"resume with the original settings or start a new --out")
    if saved["items_digest"] != digest:
        raise UserError(f"cannot resume {where}: the videos the run trains on (the train store's done videos, or the "
                        f"few-shot draw of data.few_shot / few_shot_seed) or its views changed since the run started; "
                        f"resume on the same store and settings or start a new --out")


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


# ------------------------------------------------------------------------------- setup


@dataclass
class Inputs:
    """The checked stores a run trains (and validates) on."""

    attrs: dict[str, Any]
    val_attrs: dict[str, Any] | None
    val_labels: np.ndarray | None
    counts: dict[str, dict[str, int]]  # {"train"/"val": done/failed/pending}
    num_done: int  # videos one epoch visits
    digest: str  # `_items_digest` of the train store, pinned by resume
    dcfg: Any  # the DecoderConfig the train store implies
    videos: np.ndarray | None = None  # what the sampler draws from: the done videos, or a few-shot subset
    few_shot: Any = None  # the `evl_cache.fewshot.FewShot` draw (data.few_shot), else None


def open_inputs(cfg: RunConfig) -> Inputs:
    """Open and check the train (and val) store: shapes, pairing, completeness, labels."""
    from evl_cache.heads import check_store

    if not cfg.data.train_store:
        raise UserError("no training store given; pass --train-store PATH (or data.train_store in the config)")
    store = open_store(cfg.data.train_store)
    attrs = store.attrs
    dcfg = decoder_config_for_store(cfg.model, attrs, cfg.data.train_store)
    partial_flag = "--allow-partial (data.allow_partial: true)"
    counts = {"train": video_counts(store)}
    require_complete(counts["train"], cfg.data.train_store, cfg.data.allow_partial, partial_flag)
    val_attrs, val_labels = None, None
    if cfg.data.val_store:
        val_store = open_store(cfg.data.val_store)
        check_store_pair(attrs, val_store.attrs, cfg.data.val_store)
        check_store(dcfg, val_store.attrs, cfg.data.val_store)  # the val store must hold what the head reads
        counts["val"] = video_counts(val_store)
        require_complete(counts["val"], cfg.data.val_store, cfg.data.allow_partial, partial_flag)
        val_attrs = val_store.attrs
        val_labels = val_store.labels()
    if not 0 <= cfg.data.train_views <= store.num_views:
        raise UserError(f"data.train_views={cfg.data.train_views} but store {cfg.data.train_store} caches "
                        f"{store.num_views} view(s) per video; use 0 (all) up to {store.num_views}")
    done = store.done_indices()
    if len(done) == 0:
        raise UserError(f"store {cfg.data.train_store} has no extracted videos; run `evl-cache extract` to completion first")
    labels = store.labels()[done]
    if labels.min() < 0 or labels.max() >= dcfg.num_classes:
        raise UserError(f"store {cfg.data.train_store} has unlabelled or out-of-range labels "
                        f"({int(labels.min())}..{int(labels.max())} for {dcfg.num_classes} classes); train on a labelled split")
    subset = None
    if cfg.data.few_shot:
        from evl_cache.fewshot import draw

        subset = draw(done, labels, list(attrs["class_names"]), cfg.data.few_shot, cfg.data.few_shot_seed,
                      cfg.data.few_shot_allow_short, cfg.data.train_store)
        done = subset.videos
    return Inputs(attrs, val_attrs, val_labels, counts, len(done), _items_digest(done, store.num_views), dcfg,
                  done, subset)


def split_batch(t: TrainConfig, world_size: int) -> int:
    """Each rank's micro-batch: the global batch split over world_size x grad_accum, or one line refusing it."""
    parts = world_size * t.grad_accum
    if t.batch_size % parts:
        raise UserError(f"train.batch_size={t.batch_size} (the global batch) is not divisible by world size {world_size} "
                        f"x train.grad_accum {t.grad_accum} = {parts}; use a multiple of {parts}, or change the number "
                        f"of processes or train.grad_accum")
    return t.batch_size // parts


def _check_run_dir(out: Path, resume: bool) -> None:
    state_path = out / STATE_FILE
    if state_path.exists() and not resume:
        raise UserError(f"{out} already holds a training run ({STATE_FILE}); pass --resume to continue it or choose a new --out")
    if resume and not state_path.exists():
        raise UserError(f"nothing to resume in {out} (no {STATE_FILE}); drop --resume to start a new run")


def _store_lines(cfg: RunConfig, inputs: Inputs) -> list[str]:
    lines = [store_line("train store", cfg.data.train_store, inputs.counts["train"])]
    if "val" in inputs.counts:
        lines.append(store_line("val store", cfg.data.val_store, inputs.counts["val"]))
    return lines


def preflight(cfg: RunConfig, out: Path, resume: bool, echo: Callable[[str], None] | None = None) -> Inputs:
    """Every refusal a run can meet before it starts (stores, run directory); ``echo`` gets the store lines.
    A launcher (Ray Train's driver) calls it so bad input is one line before any worker starts."""
    inputs = open_inputs(cfg)
    _check_run_dir(out, resume)
    if resume:
        _check_resume(_load_state(out / STATE_FILE), cfg, inputs.digest, out)
    for line in _store_lines(cfg, inputs) if echo is not None else []:
        echo(line)
    return inputs


def _saved_state(out: Path, resume: bool, cfg: RunConfig, digest: str) -> dict[str, Any] | None:
    """The checked resume state of ``out`` (None for a new run); run on rank 0, which owns the run directory."""
    _check_run_dir(out, resume)
    if not resume:
        return None
    saved = _load_state(out / STATE_FILE)
    _check_resume(saved, cfg, digest, out)
    return saved


# ------------------------------------------------------------------------------- model and optimizer


@dataclass
class Parts:
    """What the loop updates. ``model`` is the decoder (saved, evaluated); ``net`` is what a training
    step calls: the decoder itself, or DistributedDataParallel around it. ``init``: what
    ``train.init_from`` loaded (None without it)."""

    model: Any
    net: torch.nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    init: InitReport | None = None


def build_parts(dcfg: Any, t: TrainConfig, device: torch.device, amp: str, dist: Dist,
                class_names: list[str] | None = None) -> Parts:
    """Seeded decoder (then the ``train.init_from`` weights that fit), AdamW, per-step cosine and
    grad scaler (every rank builds the same weights).

    Loading a checkpoint draws no random numbers, so a fresh head is the one a run from scratch
    draws. With ``init_from`` the optimizer has a "new" group at (lr, weight_decay) and a
    "pretrained" group scaled by ``train.pretrained_lr_mult`` / ``pretrained_wd_mult``; the classifier
    stays fresh when the checkpoint's classes are not ``class_names`` (the train store's).

    With several ranks, torch's RNG is then reseeded per rank so each rank draws its own dropout
    masks (dropout therefore depends on the world size; see docs/distributed.md, "Dropout and RNG").
    """
    from evl_cache.heads import build_head

    torch.manual_seed(t.seed)
    np.random.seed(t.seed % 2**32)
    random.seed(t.seed)
    model = build_head(dcfg)
    init = load_matching(model, t.init_from, class_names, class_tensors(model, dcfg)) if t.init_from else None
    model = model.to(device)
    net: torch.nn.Module = model
    if dist.active:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        torch.manual_seed(rank_seed(t.seed, dist.rank))
    params: Any = model.parameters() if init is None else param_groups(
        model, init, t.lr, t.weight_decay, t.pretrained_lr_mult, t.pretrained_wd_mult)
    opt = torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.betas), eps=t.eps, weight_decay=t.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, t.steps, t.warmup_steps, t.min_lr / t.lr if t.lr else 0.0))
    scaler = torch.amp.GradScaler("cuda", enabled=amp == "fp16")
    return Parts(model, net, opt, sched, scaler, init)


def restore(parts: Parts, saved: dict[str, Any], dist: Dist, seed: int) -> int:
    """Load a resume state into ``parts``; returns the step it was saved at.

    Same world size: every rank gets back its own RNG state (exact resume). Another world size: the
    sample order still continues (the sampler position is global), and each rank's dropout stream is
    reseeded from (seed, rank, step).
    """
    parts.model.load_state_dict(saved["model"])
    try:
        parts.opt.load_state_dict(saved["optimizer"])
    except ValueError as err:  # the parameter groups differ: init_from now matches other tensors
        raise UserError(f"cannot resume: the saved optimizer's parameter groups do not fit this run ({err}); "
                        f"the train.init_from checkpoint changed since the run started; restore it or start a new --out") from err
    parts.sched.load_state_dict(saved["scheduler"])
    if saved["scaler"]:
        parts.scaler.load_state_dict(saved["scaler"])
    step = int(saved["step"])
    rngs = saved["rng"] if isinstance(saved["rng"], list) else [saved["rng"]]  # one dict: a 1-process state
    if len(rngs) == dist.world_size:
        set_rng_state(rngs[dist.rank])
    else:
        torch.manual_seed(rank_seed(seed, dist.rank, step))
    return step


class RngSlot:
    """One model's own stream of the global RNGs (torch CPU and CUDA, numpy, python) in a sweep.

    Dropout draws from torch's global generator; swapping each model's state in around everything
    it runs gives it exactly the draws it would make training alone."""

    def __init__(self) -> None:
        self.state = self._capture()

    @staticmethod
    def _capture() -> tuple[Any, ...]:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        return torch.get_rng_state(), cuda, np.random.get_state(), random.getstate()

    @contextmanager
    def active(self) -> Iterator[None]:
        cpu, cuda, np_state, py_state = self.state
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        np.random.set_state(np_state)
        random.setstate(py_state)
        try:
            yield
        finally:
            self.state = self._capture()


# ------------------------------------------------------------------------------- the run directory


class RunDir:
    """The run directory. Only rank 0 holds an enabled one; on other ranks every write is a no-op."""

    def __init__(self, out: Path, enabled: bool) -> None:
        self.out = out
        self.enabled = enabled
        self.metrics_path = out / "metrics.jsonl"
        self.records: list[dict[str, Any]] = []

    def begin(self, cfg: RunConfig, start: int, resume: bool) -> None:
        """config.yaml, and metrics.jsonl cut back to the resumed step (later lines were never checkpointed)."""
        if not self.enabled:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, self.out / "config.yaml")
        self.records = _read_metrics(self.metrics_path, start) if resume else []
        self.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in self.records))

    def log(self, rec: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.records.append(rec)
        with open(self.metrics_path, "a") as fh:
            fh.write(json.dumps(rec) + "\n")

    def save(self, step: int, model: Any, meta: dict[str, Any], state: Callable[[], dict[str, Any]]) -> str | None:
        """Checkpoint ``checkpoints/step_N`` and the resume state; returns the checkpoint path."""
        if not self.enabled:
            return None
        from evl_cache.checkpoints import save_checkpoint

        ck = save_checkpoint(self.out / "checkpoints" / f"step_{step:07d}", model, meta)
        _write_atomic(self.out / STATE_FILE, state())
        return str(ck)

    def finish(self, model: Any, meta: dict[str, Any] | None) -> tuple[str | None, list[str]]:
        """The final decoder (when ``meta``: the schedule ran to its end) and the plots."""
        if not self.enabled:
            return None, []
        from evl_cache.checkpoints import save_checkpoint
        from evl_cache.plots import plot_training

        final = str(save_checkpoint(self.out / "model", model, meta)) if meta is not None else None
        return final, [str(p) for p in plot_training(self.records, self.out / "plots")]

    def write_summary(self, summary: "TrainSummary") -> None:
        if self.enabled:
            (self.out / "summary.json").write_text(json.dumps(summary.__dict__, indent=2) + "\n")


# ------------------------------------------------------------------------------- the loop


class Trainee:
    """One model a run trains: its config, decoder parts, run directory, first step, log window and
    (in a sweep) its own RNG stream. A solo run has one; a sweep one per configuration."""

    def __init__(self, name: str | None, cfg: RunConfig, parts: Parts, run: RunDir, start: int, amp: str,
                 device: torch.device, window: dict[str, Any] | None, rng: RngSlot | None) -> None:
        self.name, self.cfg, self.t, self.parts, self.run_dir = name, cfg, cfg.train, parts, run
        self.start, self.amp, self.rng = start, amp, rng
        self.win_loss = torch.zeros((), device=device)  # running sum of step losses over the log window
        self.win_steps = 0
        if window is not None:
            self.win_loss, self.win_steps = window["loss"].to(device), int(window["steps"])
        self.window_t, self.window_n = 0.0, 0  # samples/s: start and samples of the current window
        self.last_loss: float | None = None
        self.last_val: float | None = None
        self.last_ck: str | None = None

    def scope(self) -> Any:
        """Everything this model runs draws from its own RNG stream (a no-op in a solo run)."""
        return self.rng.active() if self.rng is not None else nullcontext()

    def lr(self) -> float:
        """The base learning rate of the coming step (what a group with multiplier 1.0 uses)."""
        sched = self.parts.sched
        return self.t.lr * sched.lr_lambdas[0](sched.last_epoch)


class Loop:
    """The optimizer-step loop: one global batch per step, fed to every `Trainee` (one, or the
    members of a sweep); each logs, validates and checkpoints on its own schedule.

    Every batch is read and moved to the device once. Every rank runs every method at the same
    steps (they hold collectives); only rank 0's `RunDir`s write. The logged loss is the mean over
    the global batch: each rank's micro-batch loss is a mean, divided by grad_accum, and DDP
    averages the gradients over the ranks (equal local batches).
    """

    def __init__(self, trainees: list[Trainee], inputs: Inputs, dist: Dist, device: torch.device, loader: Any) -> None:
        self.trainees, self.inputs, self.dist, self.device, self.loader = trainees, inputs, dist, device, loader
        self.t = trainees[0].t  # batch_size, grad_accum and steps are shared (evl_cache.sweep)

    def meta(self, m: Trainee, step: int) -> dict[str, Any]:
        meta = checkpoint_meta(self.inputs.attrs, self.inputs.val_attrs, m.cfg.data.train_store, step)
        fs = self.inputs.few_shot
        if fs is not None:  # the checkpoint says it saw K videos per class, not the whole store
            meta["trained"]["few_shot"] = {"k": fs.k, "seed": fs.seed, "videos": int(len(fs.videos))}
        return meta

    def train_step(self, it: Any, active: list[Trainee]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """One optimizer step of each active model over this rank's share of a global batch:
        (global mean loss per model, video ids read)."""
        accum = self.t.grad_accum
        for m in active:
            m.parts.opt.zero_grad(set_to_none=True)
        loss_acc = [torch.zeros((), device=self.device) for _ in active]
        videos = []
        for a in range(accum):
            batch = next(it)
            videos.append(batch.pop("video"))
            batch = to_device(batch, self.device)
            label = batch.pop("label").long()
            for i, m in enumerate(active):
                p = m.parts
                # gradients are all-reduced once per step, on the last micro-batch
                sync = p.net.no_sync() if self.dist.active and a < accum - 1 else nullcontext()
                with m.scope(), sync:
                    with autocast(self.device, m.amp):
                        logits = p.net(batch)
                    loss = F.cross_entropy(logits.float(), label, label_smoothing=m.t.label_smoothing)
                    p.scaler.scale(loss / accum).backward()
                loss_acc[i] += loss.detach() / accum
        for m in active:
            with m.scope():
                m.parts.scaler.step(m.parts.opt)
                m.parts.scaler.update()
                m.parts.sched.step()
        return [self.dist.all_mean_(loss) for loss in loss_acc], videos

    def batch_digest(self, videos: list[torch.Tensor]) -> str:
        """sha256 (16 hex) of the global batch's video ids in global order: which clips a step read."""
        mine = torch.cat(videos).numpy().astype(np.int64)
        return hashlib.sha256(np.concatenate(self.dist.gather(mine)).tobytes()).hexdigest()[:16]

    def validate(self, m: Trainee, step: int) -> dict[str, Any]:
        """Validation metrics of a model's current decoder; the views are scored sharded over the ranks."""
        probs, vids = collect_view_probs(m.parts.model, m.cfg.data.val_store, m.t.eval_batch_size, self.device,
                                         m.cfg.data.num_workers, m.amp, dist=self.dist)
        videos, scores = video_scores(probs, vids)
        metrics = compute_metrics(scores, self.inputs.val_labels[videos].astype(np.int64), list(self.inputs.attrs["class_names"]))
        return {"step": step, "val_top1": metrics["top1"], "val_top5": metrics["top5"],
                "val_mean_class": metrics["mean_class_accuracy"]}

    def save(self, m: Trainee, step: int) -> str | None:
        """Checkpoint and resume state (the RNG states of every rank, gathered to rank 0)."""
        p = m.parts
        rngs = self.dist.gather(rng_state())
        state = lambda: {  # noqa: E731 - built on rank 0 only
            "step": step, "model": p.model.state_dict(), "optimizer": p.opt.state_dict(),
            "scheduler": p.sched.state_dict(), "scaler": p.scaler.state_dict(), "rng": rngs,
            "world_size": self.dist.world_size, "config": m.cfg.to_dict(), "items_digest": self.inputs.digest,
            "window": {"loss": m.win_loss.detach().cpu().clone(), "steps": m.win_steps},
        }
        return m.run_dir.save(step, p.model, self.meta(m, step), state)

    def _pause(self, since: float) -> None:
        """Time spent validating or saving is not training: move every model's samples/s window on."""
        spent = time.perf_counter() - since
        for m in self.trainees:
            m.window_t += spent

    def log(self, m: Trainee, n: int, loss: torch.Tensor, lr: float, digest: str) -> tuple[float, float, float]:
        """One metrics record of model ``m`` after step ``n``; returns (window mean loss, lr, samples/s)."""
        t = m.t
        now = time.perf_counter()
        m.last_loss = float(loss.item())
        mean_loss = float(m.win_loss.item()) / m.win_steps
        sps = m.window_n / max(now - m.window_t, 1e-9)
        m.run_dir.log({"step": n, "loss": m.last_loss, "loss_mean": mean_loss, "lr": lr, "samples_per_s": sps,
                       "epoch": n * t.batch_size / self.inputs.num_done, "batch_digest": digest})
        m.window_t, m.window_n = now, 0
        m.win_loss.zero_()
        m.win_steps = 0
        return mean_loss, lr, sps

    def run(self, start: int, end: int, progress: bool) -> float:
        """Steps ``start``..``end`` (a model whose own start is later joins at it); returns the seconds spent."""
        label = "train" if len(self.trainees) == 1 else f"sweep x{len(self.trainees)}"
        bar = _Bar(progress and self.dist.main, start, end, label)
        for m in self.trainees:
            m.parts.model.train()
        it = iter(self.loader)
        began = time.perf_counter()
        for m in self.trainees:
            m.window_t = began
        try:
            for step in range(start, end):
                active = [m for m in self.trainees if m.start <= step]
                lrs = [m.lr() for m in active]
                losses, videos = self.train_step(it, active)
                n = step + 1
                digest, shown = None, []
                for m, lr, loss in zip(active, lrs, losses):
                    m.window_n += m.t.batch_size
                    m.win_loss += loss
                    m.win_steps += 1
                    if n % m.t.log_every == 0 or n == m.t.steps:  # not at until_step: the window carries over
                        digest = digest or self.batch_digest(videos)
                        shown.append(self.log(m, n, loss, lr, digest))
                if shown:
                    bar.update(n, [s[0] for s in shown], shown[0][1], shown[0][2])
                for m in active:
                    if m.cfg.data.val_store and (n % m.t.eval_every == 0 or n == m.t.steps):
                        since = time.perf_counter()
                        with m.scope():
                            rec = self.validate(m, n)
                        m.last_val = rec["val_top1"]
                        m.run_dir.log(rec)
                        who = f"{m.name}: " if m.name else ""
                        bar.note(f"{who}step {n}: val top-1 " + ("n/a (no labelled videos)" if m.last_val is None
                                                                 else f"{100 * m.last_val:.2f}%"))
                        self._pause(since)  # samples/s measures training, not validation
                    if n % m.t.checkpoint_every == 0 or n == end:
                        since = time.perf_counter()
                        with m.scope():
                            m.last_ck = self.save(m, n)
                        self._pause(since)
        finally:
            bar.close()
            del it
        return time.perf_counter() - began


def train(cfg: RunConfig, out_dir: str | os.PathLike, resume: bool = False, until_step: int | None = None,
          progress: bool = True, echo: Callable[[str], None] | None = None) -> TrainSummary:
    """Train a decoder on ``cfg.data.train_store``, writing the run directory ``out_dir``.

    ``until_step`` stops early (after that many optimizer steps in total) as if interrupted: the
    cosine schedule still spans ``cfg.train.steps``, and `resume` continues from the last state.
    A store with pending videos is refused unless ``cfg.data.allow_partial``; ``echo`` receives one
    line per store with its done/failed/pending counts before training starts.

    Under torchrun (or Ray Train, see `evl_cache.distributed`) this process is one rank of a
    data-parallel run: it reads its share of every global batch and only rank 0 writes ``out_dir``.
    """
    cfg = cfg.validated()
    split_batch(cfg.train, env_world_size())  # refuse before opening a process group
    dist, device = join(cfg.train.device)
    try:
        return _train([(None, cfg)], Path(out_dir), dist, device, resume, until_step, progress, echo)[0]
    finally:
        dist.close()


def train_sweep(members: list[Any], out_dir: str | os.PathLike, resume: bool = False, until_step: int | None = None,
                progress: bool = True, echo: Callable[[str], None] | None = None) -> list[TrainSummary]:
    """Train the members of a sweep (`evl_cache.sweep.members`) in one pass over the store: each
    batch is read once and fed to every model. Member ``name`` writes ``out_dir/name``, laid out as
    a solo run, and its results equal training it alone (same losses, weights and metrics).

    One process only: under torchrun or Ray Train, train each configuration as its own run.
    """
    from evl_cache.sweep import check_shared_stream

    if env_world_size() > 1:
        raise UserError("sweep training runs in one process (no torchrun/Ray Train data parallelism); launch it "
                        "without torchrun, or train each configuration as its own data-parallel run")
    check_shared_stream(members, "sweep")
    cfgs = [(m.name, m.cfg.validated()) for m in members]
    split_batch(cfgs[0][1].train, 1)
    dist, device = join(cfgs[0][1].train.device)
    try:
        return _train(cfgs, Path(out_dir), dist, device, resume, until_step, progress, echo)
    finally:
        dist.close()


def _saved_states(dirs: list[Path], cfgs: list[RunConfig], resume: bool, digest: str, sweep: bool,
                  out: Path) -> list[dict[str, Any] | None]:
    """Each model's checked resume state (None: starts at step 0); run on rank 0, which owns the run
    directories. A resumed sweep continues every member that has a state and starts the others at 0
    (members added since, or interrupted before their first checkpoint)."""
    if not sweep:
        return [_saved_state(dirs[0], resume, cfgs[0], digest)]
    have = [(d / STATE_FILE).exists() for d in dirs]
    if not resume and any(have):
        d = dirs[have.index(True)]
        raise UserError(f"{d} already holds a training run ({STATE_FILE}); pass --resume to continue the sweep "
                        f"or choose a new --out")
    if resume and not any(have):
        raise UserError(f"nothing to resume in {out} (no member directory holds {STATE_FILE}); drop --resume to start the sweep")
    out_states: list[dict[str, Any] | None] = []
    for d, c, h in zip(dirs, cfgs, have):
        saved = _load_state(d / STATE_FILE) if h else None
        if saved is not None:
            _check_resume(saved, c, digest, d)
        out_states.append(saved)
    return out_states


def _train(specs: list[tuple[str | None, RunConfig]], out: Path, dist: Dist, device: torch.device, resume: bool,
           until_step: int | None, progress: bool, echo: Callable[[str], None] | None) -> list[TrainSummary]:
    """`train`'s steps for one model (name None, writing ``out``) or a sweep (writing ``out/name``):
    inputs, resume states, models, run directories, one loader, the loop, final outputs."""
    from evl_cache.data import make_loader, model_needs

    cfg0 = specs[0][1]
    t = cfg0.train
    micro = split_batch(t, dist.world_size)
    inputs = open_inputs(cfg0)
    sweep = specs[0][0] is not None
    dirs = [out / name if name is not None else out for name, _ in specs]
    cfgs = [c for _, c in specs]
    dcfgs = [decoder_config_for_store(c.model, inputs.attrs, c.data.train_store) for c in cfgs]
    saved = dist.from_main(lambda: _saved_states(dirs, cfgs, resume, inputs.digest, sweep, out))
    say = echo if echo is not None and dist.main else (lambda _: None)
    for line in _store_lines(cfg0, inputs):
        say(line)
    if inputs.few_shot is not None:
        fs = inputs.few_shot
        say(f"few-shot: {len(fs.videos)} videos, {fs.k} per class (seed {fs.seed})"
            + (f"; {len(fs.short)} class(es) with fewer (allowed)" if fs.short else ""))
    trainees = []
    for (name, c), d, dcfg, s in zip(specs, dirs, dcfgs, saved):
        amp = resolve_amp(c.train.amp, device)
        parts = build_parts(dcfg, c.train, device, amp, dist,  # seeds the global RNGs: this model's stream
                            class_names=list(inputs.attrs["class_names"]))
        start = restore(parts, s, dist, c.train.seed) if s is not None else 0
        if parts.init is not None:
            for line in parts.init.lines():
                say(f"{name}: {line}" if name else line)
        run = RunDir(d, enabled=dist.main)
        run.begin(c, start, s is not None)
        if inputs.few_shot is not None and dist.main:
            from evl_cache.fewshot import write as write_few_shot

            write_few_shot(d, inputs.few_shot, c.data.train_store, open_store(c.data.train_store).paths())
        if parts.init is not None and dist.main:
            write_report(d, parts.init)
        trainees.append(Trainee(name, c, parts, run, start, amp, device, s.get("window") if s else None,
                                RngSlot() if sweep else None))
    if sweep and dist.main:
        (out / "sweep.json").write_text(json.dumps({"members": [n for n, _ in specs]}, indent=2) + "\n")
    first = min(m.start for m in trainees)
    loader = make_loader(cfg0.data.train_store, micro, train=True, seed=t.seed, start=first * t.batch_size,
                         num_workers=cfg0.data.num_workers, prefetch_factor=cfg0.data.prefetch_factor,
                         pin_memory=cfg0.data.pin_memory and device.type == "cuda",
                         rank=dist.rank, world_size=dist.world_size, block=micro * t.grad_accum,
                         views=cfg0.data.train_views, needs=model_needs(dcfgs), videos=inputs.videos)
    end = t.steps if until_step is None else min(t.steps, until_step)
    loop = Loop(trainees, inputs, dist, device, loader)
    seconds = loop.run(first, end, progress)
    summaries = []
    for m in trainees:
        final, plots = m.run_dir.finish(m.parts.model, loop.meta(m, end) if end == t.steps else None)
        samples = max(0, end - m.start) * t.batch_size
        summary = TrainSummary(out_dir=str(m.run_dir.out), steps=end, start_step=m.start, samples=samples,
                               seconds=seconds, samples_per_s=samples / seconds if seconds > 0 else 0.0,
                               final_loss=m.last_loss, val_top1=m.last_val, checkpoint=final or m.last_ck, plots=plots,
                               store_videos=inputs.counts, world_size=dist.world_size)
        m.run_dir.write_summary(summary)
        summaries.append(summary)
    if sweep and dist.main:
        (out / "sweep.json").write_text(json.dumps({"members": [n for n, _ in specs],
                                                    "summaries": [s.__dict__ for s in summaries]}, indent=2) + "\n")
    return summaries


class _Bar:
    """A rich progress bar showing loss, lr and samples/s (silent when disabled)."""

    def __init__(self, enabled: bool, start: int, end: int, label: str = "train") -> None:
        self.progress = None
        if not enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("lr {task.fields[lr]}"),
            TextColumn("{task.fields[sps]} samples/s"), TimeElapsedColumn(), TimeRemainingColumn(),
        )
        self.progress.start()
        self.task = self.progress.add_task("train", total=end, completed=start, loss="-", lr="-", sps="-")

    def update(self, step: int, losses: list[float], lr: float, sps: float) -> None:
        """``losses``: one model's window mean, or a sweep's (shown as their range)."""
        if self.progress is not None:
            text = f"{losses[0]:.4f}" if len(losses) == 1 else f"{min(losses):.4f}..{max(losses):.4f}"
            self.progress.update(self.task, completed=step, loss=text, lr=f"{lr:.2e}", sps=f"{sps:.1f}")

    def note(self, text: str) -> None:
        if self.progress is not None:
            self.progress.console.print(text)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
