"""Shared plumbing of the recipes in pipelines/: recipe YAMLs, timed stages that are skipped when
already done, the stage calls themselves (synth, extract, train, evaluate) and report helpers.

Why a ledger: every recipe is a chain of long stages. Each finished stage is recorded in
``<work>/stages.json`` with the inputs that decided its output (its "key"), its wall time and what
it produced. A rerun skips a stage whose key is unchanged and whose output is still complete, and
reports the time measured when it ran, so reports stay truthful after resumes. Extraction and
training are themselves resumable, so an interrupted stage simply runs again and picks up there.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import stat
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python pipelines/x.py` from a checkout without `pip install -e`
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import evl_cache  # noqa: E402,F401  (sets the Ray loopback/usage-stats variables before Ray loads)
from evl_cache.errors import UserError  # noqa: E402

TINY_DIR = ROOT / "evl_cache" / "assets" / "tiny_vit"
# model/train/data: the training config (evl_cache.config); extract: the `evl-cache extract` flags;
# pipeline: what only the recipes read (splits, train views, weights variable, published numbers);
# eval/name/description: also accepted by evl_cache.config, so one file serves the CLI and the recipes.
RECIPE_SECTIONS = ("extract", "model", "train", "data", "pipeline", "eval", "name", "description")


def say(msg: str) -> None:
    """Progress line on stdout, flushed (the recipes run for minutes; users watch them)."""
    print(msg, flush=True)


# ------------------------------------------------------------------------------ recipe files


def load_recipe(path: str | os.PathLike) -> dict[str, Any]:
    """A recipe YAML: ``extract`` (the `evl-cache extract` flags), ``model``/``train``/``data`` (the
    training config, also readable by `evl-cache train --config`) and ``pipeline`` (recipe settings,
    with the published numbers under ``pipeline.paper``)."""
    from evl_cache.config import read_yaml

    p = Path(path)
    doc = read_yaml(p)
    unknown = sorted(set(doc) - set(RECIPE_SECTIONS))
    if unknown:
        raise UserError(f"recipe config {p}: unknown section(s) {unknown}; use {', '.join(RECIPE_SECTIONS)}")
    for section in ("extract", "model", "train", "data", "pipeline"):
        doc[section] = dict(doc.get(section) or {})
    doc["_path"] = str(p)
    return doc


def run_config(recipe: dict[str, Any], train_store: str, val_store: str | None, **overrides: dict[str, Any]):
    """The training `RunConfig` of a recipe, pointed at the given stores.

    ``overrides`` maps a section name to keys that replace the recipe's (e.g. the Table 8 switches).
    """
    from evl_cache.config import RunConfig

    d = {s: dict(recipe.get(s) or {}) for s in ("model", "train", "data")}
    for section, values in overrides.items():
        d[section].update(values)
    d["data"].update(train_store=train_store, val_store=val_store)
    return RunConfig.from_dict(d, where=recipe.get("_path", "recipe"))


@dataclass
class ExtractPlan:
    """What one extraction needs besides the manifest: built from a recipe's ``extract`` section."""

    arch: str
    weights: str
    views: str
    frames: int
    stride: int
    sampling: str = "dense"
    blocks: list[int] | None = None
    decoder_layers: int | None = None
    attention: str = "maps"
    dtype: str = "float16"
    attn_dtype: str = "float16"
    attn_topk: int = 0
    layout: str = "full"
    shard_size: int | None = None
    shard_mib: float = 1024
    decode_timeout: float = 120.0
    batch_size: int = 8
    quick_gelu: bool = True
    precision: str = "auto"
    seed: int = 0
    view_seed: int = 0
    min_frames: int | None = None
    compressor: str | None = None
    num_cpus: int | None = None
    emb: bool = False  # also store per-frame CLIP embeddings (`extract --emb`)

    def config(self):
        from evl_cache.extract import ExtractConfig

        return ExtractConfig.from_settings(self.__dict__)

    def key(self) -> dict[str, Any]:
        """The ledger key; ``emb`` only when set, so stores extracted before it existed stay current."""
        key = dict(self.__dict__)
        if not key["emb"]:
            del key["emb"]
        return key


def extract_plan(recipe: dict[str, Any], views: str, **values: Any) -> ExtractPlan:
    """An `ExtractPlan` from the recipe's ``extract`` section, with ``views`` and ``values`` on top."""
    known = set(ExtractPlan.__dataclass_fields__)
    e = {k: v for k, v in recipe["extract"].items() if k in known}
    e.update(values)
    e["views"] = views
    missing = [k for k in ("arch", "weights", "frames", "stride") if e.get(k) is None]
    if missing:
        raise UserError(f"recipe {recipe.get('_path')}: extract section lacks {', '.join(missing)}; add it")
    return ExtractPlan(**e)


# ------------------------------------------------------------------------------ the ledger


@dataclass
class StageResult:
    name: str
    seconds: float
    skipped: bool
    info: dict[str, Any] = field(default_factory=dict)


def portable_key(value: Any, root: Path = ROOT) -> Any:
    """``value`` with every absolute path inside the checkout ``root`` made relative to it, so a
    ledger written from one checkout (or worktree) of the repository still matches in another."""
    if isinstance(value, dict):
        return {k: portable_key(v, root) for k, v in value.items()}
    if isinstance(value, list):
        return [portable_key(v, root) for v in value]
    if isinstance(value, str) and value.startswith(str(root) + os.sep):
        return os.path.relpath(value, root)
    return value


class Ledger:
    """``<work>/stages.json``: per stage, its key, wall seconds and info, written after each stage.
    Keys are stored with checkout-relative paths (`portable_key`), so moving the checkout never
    makes finished work look stale and get removed."""

    def __init__(self, work: str | os.PathLike) -> None:
        self.work = Path(work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.path = self.work / "stages.json"
        self.entries: dict[str, dict[str, Any]] = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.results: dict[str, StageResult] = {}

    def _save(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.entries, indent=2, sort_keys=True, default=str) + "\n")
        os.replace(tmp, self.path)

    def run(self, name: str, key: dict[str, Any], fn: Callable[[], dict[str, Any]],
            complete: Callable[[], bool], outputs: list[Path] | None = None) -> StageResult:
        """Run ``fn`` unless the ledger holds ``name`` with the same key and ``complete()`` holds.

        A changed key means the recorded output is stale: the listed ``outputs`` (inside the work
        dir only) are removed first so the stage starts clean. ``fn`` returns the stage's info dict.
        """
        key = portable_key(json.loads(json.dumps(key, sort_keys=True, default=str)))
        old = self.entries.get(name)
        if old is not None and comparable_key(old.get("key")) == comparable_key(key):
            old = {**old, "key": key}  # the same stage, recorded before a later option or with absolute paths
        if old is not None and old.get("key") == key and old.get("done") and complete():
            say(f"  [skip] {name}: done earlier in {old['seconds']:.1f} s")
            res = StageResult(name, float(old["seconds"]), True, old.get("info", {}))
            self.results[name] = res
            return res
        if old is not None and old.get("key") != key:
            for out in outputs or []:
                self._remove(Path(out))
        # An interrupted-then-resumed stage adds up the time of all its attempts.
        before = float(old.get("seconds", 0.0)) if old is not None and old.get("key") == key and not old.get("done") else 0.0
        started = time.perf_counter()
        try:
            info = fn() or {}
        except BaseException:
            self.entries[name] = {"key": key, "done": False, "seconds": before + time.perf_counter() - started}
            self._save()
            raise
        seconds = before + time.perf_counter() - started
        self.entries[name] = {"key": key, "done": True, "seconds": seconds, "info": info}
        self._save()
        say(f"  [done] {name}: {seconds:.1f} s")
        res = StageResult(name, seconds, False, info)
        self.results[name] = res
        return res

    def _remove(self, path: Path) -> None:
        work = self.work.resolve()
        p = path.resolve()
        if p != work and work in p.parents and p.exists():
            say(f"  [reset] {path}: its inputs changed, removing the old output")
            shutil.rmtree(p) if p.is_dir() else p.unlink()


# ------------------------------------------------------------------------------ the stages


def synth_stage(ledger: Ledger, name: str, out: Path, spec: dict[str, Any]) -> StageResult:
    """Write the synthetic dataset described by ``spec`` (the `write_synthetic_dataset` arguments)."""
    from evl_cache.synth import write_synthetic_dataset

    def fn() -> dict[str, Any]:
        s = write_synthetic_dataset(out, force=True, progress=sys.stdout.isatty(), **spec)
        say(f"  synth: {s['train_videos']} train + {s['val_videos']} val videos, {len(s['classes'])} classes, "
            f"{s['bytes'] / 1e6:.1f} MB")
        return {"train_videos": s["train_videos"], "val_videos": s["val_videos"], "bytes": s["bytes"],
                "classes": s["classes"], "kinds": s["kinds"]}

    return ledger.run(name, {"spec": spec, "out": str(out)}, fn,
                      complete=lambda: (out / "train.csv").is_file() and (out / "val.csv").is_file(), outputs=[out])


def store_complete(path: Path) -> bool:
    from evl_cache.store import open_store

    if not path.exists():
        return False
    try:
        return open_store(str(path)).info().pending == 0
    except Exception:  # noqa: BLE001 - an unreadable store is simply not complete
        return False


def extract_stage(ledger: Ledger, name: str, manifest: Any, store: Path, plan: ExtractPlan) -> StageResult:
    """Extract ``manifest`` into ``store`` (resumes a partial store written with the same plan)."""
    from evl_cache.extract import extract

    def fn() -> dict[str, Any]:
        summary = extract(manifest, str(store), plan.config())
        for line in summary.lines()[:2]:
            say(f"  {line}")
        if summary.done == 0:
            raise UserError(f"extraction into {store} finished with no usable video; see the failures above")
        return {"videos": summary.total, "done": summary.done, "failed": summary.failed,
                "bytes": summary.bytes_on_disk, "clip_views_per_s": summary.clip_views_per_s,
                "failures": [f"{p}: {e}" for _, p, e in summary.failures[:20]]}

    key = {"plan": plan.key(), "manifest": manifest.sha256(), "store": str(store), "weights_file": weights_stamp(plan.weights)}
    upgrade_legacy_weights_stamp(ledger, name, plan.weights, key["weights_file"])
    return ledger.run(name, key, fn, complete=lambda: store_complete(store), outputs=[store])


def weights_stamp(path: str) -> list[str] | None:
    """["sha256", digest] of a weights file: new weights (e.g. `make pretrain-tiny` again) mean a new
    cache, while the same file in another clone or worktree (another mtime) is the same cache."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    return ["sha256", _sha256_of(os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)]


@functools.lru_cache(maxsize=16)
def _sha256_of(path: str, dev: int, ino: int, size: int, mtime_ns: int) -> str:
    """One hash per file version and process: a recipe stamps the same weights for every extraction
    stage, and hashing L/14 (about 900 MB) takes seconds. A rewritten file has a new mtime or inode."""
    from evl_cache.backbone import file_sha256

    return file_sha256(path)


def legacy_weights_stamp(path: str) -> list[float] | None:
    """The (size, mtime) stamp ledgers recorded before `weights_stamp`."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime]


def upgrade_legacy_weights_stamp(ledger: Ledger, name: str, path: str, stamp: list[str] | None) -> None:
    """A stage recorded with the (size, mtime) stamp of this very file (same size, same mtime) gets the
    content stamp instead, so finished extractions are kept; any other old stamp stays and is redone."""
    key = (ledger.entries.get(name) or {}).get("key")
    if isinstance(key, dict) and stamp is not None and key.get("weights_file") == legacy_weights_stamp(path):
        key["weights_file"] = stamp


def train_stage(ledger: Ledger, name: str, cfg: Any, out: Path, progress: bool = True) -> StageResult:
    """Train a decoder into ``out``; resumes an interrupted run of the same config."""
    from evl_cache.train import STATE_FILE, train

    def fn() -> dict[str, Any]:
        resume = (out / STATE_FILE).is_file()
        if resume:
            say(f"  resuming the interrupted run in {out}")
        s = train(cfg, out, resume=resume, progress=progress)
        for line in s.lines()[:2]:
            say(f"  {line}")
        return {"steps": s.steps, "samples_per_s": s.samples_per_s, "final_loss": s.final_loss,
                "val_top1": s.val_top1, "checkpoint": str(out / "model")}

    return ledger.run(name, {"config": config_key(cfg), "out": str(out)}, fn,
                      complete=lambda: (out / "model.json").is_file(), outputs=[out])


def config_key(cfg: Any) -> dict[str, Any]:
    """A run config as a ledger key (compared by `comparable_key`)."""
    return cfg.to_dict()


def comparable_key(value: Any) -> Any:
    """A ledger key as compared: checkout-relative paths (`portable_key`), and in every run config
    (a dict with ``model`` and ``train`` sections) the options added after ledgers were first written
    left out while at their default, so adding an option never makes finished training look stale."""
    from evl_cache.config import LATER_DATA_KEYS, LATER_MODEL_KEYS, LATER_TRAIN_KEYS

    value = portable_key(value)

    def strip(v: Any) -> Any:
        if isinstance(v, list):
            return [strip(x) for x in v]
        if not isinstance(v, dict):
            return v
        out = {k: strip(x) for k, x in v.items()}
        if isinstance(out.get("model"), dict) and isinstance(out.get("train"), dict):
            for section, later in (("model", LATER_MODEL_KEYS), ("train", LATER_TRAIN_KEYS), ("data", LATER_DATA_KEYS)):
                if isinstance(out.get(section), dict):
                    out[section] = {k: x for k, x in out[section].items() if not (k in later and x == later[k])}
        return out

    return strip(value)


def eval_stage(ledger: Ledger, name: str, checkpoint: Path, store: Path, out: Path) -> StageResult:
    """Evaluate a checkpoint on an eval store; metrics.json, predictions.csv, confusion_matrix.png in ``out``."""
    from evl_cache.evaluate import evaluate

    def fn() -> dict[str, Any]:
        m = evaluate(str(checkpoint), str(store), out_dir=str(out))
        say(f"  {m['videos']} videos x {m['views']} views: top-1 {100 * m['top1']:.2f}%, "
            f"top-{m['topk']} {100 * m['top5']:.2f}%")
        return {"top1": m["top1"], "top5": m["top5"], "videos": m["videos"], "views": m["views"]}

    weights = Path(str(checkpoint) + ".safetensors")
    key = {"checkpoint": str(checkpoint), "store": str(store),
           "checkpoint_mtime": weights.stat().st_mtime if weights.exists() else None}
    return ledger.run(name, key, fn, complete=lambda: (out / "metrics.json").is_file(), outputs=[out])


def read_metrics(out: Path) -> dict[str, Any]:
    return json.loads((out / "metrics.json").read_text())


# ------------------------------------------------------------------------------ backbones


def save_figure(fig: Any, path: Path) -> Path:
    """Lay out, write and close a recipe's matplotlib figure (closed, so long recipes do not pile up figures)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def tiny_backbone(work: Path) -> tuple[str, str, str]:
    """(arch, weights, note) of the committed tiny image-pretrained ViT, or loudly random weights.

    The demo never silently runs on random weights: if the committed files are missing it says so
    in a banner and in the report, because a random ViT gives the decoder nothing to learn from.
    """
    cfg, weights = TINY_DIR / "config.json", TINY_DIR / "weights.safetensors"
    if cfg.is_file() and weights.is_file():
        return str(cfg), str(weights), f"committed tiny image-pretrained ViT ({TINY_DIR.relative_to(ROOT)})"
    if cfg.is_file():
        arch = str(cfg)
    else:  # the shape pipelines/pretrain_tiny.py makes by default, so the rest of the recipe is unchanged
        work.mkdir(parents=True, exist_ok=True)
        arch = str(work / "tiny_vit_random.json")
        write_text_atomic(Path(arch), json.dumps(TINY_FALLBACK_CONFIG, indent=1) + "\n")
    banner = "!" * 100
    say(f"{banner}\n!! WARNING: the committed tiny backbone weights {weights.relative_to(ROOT)} are missing.\n"
        f"!! Falling back to RANDOM backbone weights: expect near-chance accuracy (run `make pretrain-tiny`).\n{banner}")
    return arch, "random", "RANDOM-init ViT (committed tiny weights missing; run `make pretrain-tiny`)"


# Shape of the tiny ViT made by pipelines/pretrain_tiny.py (its defaults), for the random fallback.
TINY_FALLBACK_CONFIG = {
    "embed_dim": 64, "quick_gelu": True,
    "vision_cfg": {"image_size": 64, "layers": 5, "width": 128, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 256, "width": 64, "heads": 1, "layers": 1},
}


def clip_backbone_from_env() -> tuple[str, str, str] | None:
    """(arch, weights, note) when EVL_CLIP_WEIGHTS names a real CLIP file, else None."""
    path = os.environ.get("EVL_CLIP_WEIGHTS")
    if not path:
        return None
    if not Path(path).is_file():
        raise UserError(f"EVL_CLIP_WEIGHTS={path} is not a file; point it at a CLIP weights file or unset it")
    arch = os.environ.get("EVL_CLIP_ARCH", "ViT-B-16")
    return arch, path, f"real CLIP weights {path} ({arch}, from EVL_CLIP_WEIGHTS)"


# ------------------------------------------------------------------------------ reports


def rel(path: str | os.PathLike) -> str:
    """A path as the user would type it from the repository root (absolute when outside it)."""
    p = Path(path).resolve()
    try:
        return str(p.relative_to(ROOT))
    except ValueError:
        return str(p)


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return str(n)


def fmt_s(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min"


def pct(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{100 * x:.{digits}f}"


def md_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def class_kinds(dataset_dir: Path) -> dict[str, str]:
    """Synthetic dataset: class name -> "motion" | "appearance" (from its classes.json)."""
    p = dataset_dir / "classes.json"
    if not p.is_file():
        return {}
    return {c["name"]: c["kind"] for c in json.loads(p.read_text())}


def split_accuracy(metrics: dict[str, Any], kinds: dict[str, str]) -> dict[str, float | None]:
    """Accuracy over the videos of motion classes and of appearance classes (support-weighted)."""
    out: dict[str, float | None] = {}
    for kind in ("motion", "appearance"):
        hit = n = 0
        for name, pc in metrics["per_class"].items():
            if kinds.get(name) == kind and pc["support"]:
                hit += pc["accuracy"] * pc["support"]
                n += pc["support"]
        out[kind] = hit / n if n else None
    return out


def copy_into(src: Path, dst_dir: Path, name: str | None = None) -> Path | None:
    """Copy a plot into the report folder so the markdown links stay valid on their own."""
    if not src.is_file():
        return None
    dst_dir.mkdir(parents=True, exist_ok=True)
    dst = dst_dir / (name or src.name)
    shutil.copyfile(src, dst)
    return dst


def write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def set_threads(n: int | None = None) -> int:
    import torch

    n = n or os.cpu_count() or 1
    torch.set_num_threads(n)
    return n


def main_guard(fn: Callable[[], int | None]) -> None:
    """Run a recipe's main: a UserError becomes one line on stderr and exit code 2."""
    try:
        code = fn()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume (finished stages are skipped)", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
