"""The `evl-cache` command line: thin typer wrappers over library functions.

Each command parses flags, calls one library function and prints its summary. Bad input raises
`UserError`, which `main` turns into one red line on stderr and exit code 2.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from evl_cache import __version__
from evl_cache.errors import UserError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Frozen-CLIP video recognition (EVL) trained from a cache of backbone features.",
)


# Every command that opens a store takes the same --storage-options (fsspec options of a URL store).
StorageOptions = Annotated[Path | None, typer.Option(
    "--storage-options", help="JSON/YAML file of fsspec options for a URL store (s3://...); credentials also come "
                              "from AWS_* variables.")]


def use_storage_options(path: Path | None) -> None:
    """Make ``path`` this process's (and its workers') options file for URL stores, checked now."""
    from evl_cache.location import use_options_file

    use_options_file(path)


@app.callback()
def _root() -> None:
    """Frozen-CLIP video recognition (EVL) trained from a cache of backbone features."""


@app.command()
def version() -> None:
    """Print the evl-cache version."""
    typer.echo(__version__)


# --- stage 1: extract / inspect -------------------------------------------------------------


def _config_defaults(config: Path | None, section: str) -> dict:
    """Values from a recipe YAML's ``section``: the CLI flags given explicitly override them."""
    if config is None:
        return {}
    from evl_cache.config import read_yaml

    return dict(read_yaml(config).get(section) or {})


@app.command()
def extract(
    store: str = typer.Option(..., help="Output Zarr v3 store, a path or a URL such as s3://bucket/prefix (created, or "
                                        "resumed if it exists with the same config)."),
    dataset: str = typer.Option(None, help="Manifest adapter: k400, k600, k700, ssv2, ucf101, hmdb51, list."),
    root: Path = typer.Option(None, help="Dataset root folder (video paths are relative to it)."),
    annotations: Path = typer.Option(None, help="Annotation file: K400 CSV, SSv2 JSON, UCF/HMDB split file, or a path,label CSV."),
    split: str = typer.Option(None, help="Split name (train, val, test, train1, ...)."),
    classes: Path = typer.Option(None, help="Class names, one per line, fixing the label order (k400/k600/k700/list)."),
    arch: str = typer.Option(None, help="open_clip ViT name (ViT-B-16, ViT-L-14, ViT-L-14-336) or a model-config JSON."),
    weights: str = typer.Option(None, help="CLIP weights: a local file, openclip:<tag>, or 'random' (explicit)."),
    seed: int = typer.Option(None, help="Seed for --weights random."),
    quick_gelu: bool = typer.Option(None, "--quick-gelu/--no-quick-gelu", help="QuickGELU (OpenAI CLIP) or GELU."),
    precision: str = typer.Option(None, help="auto (fp16 on GPU, fp32 on CPU), fp32, fp16, bf16."),
    trust_torchscript: bool = typer.Option(False, help="Load a TorchScript --weights file (it is code) that is not a known OpenAI CLIP release."),
    blocks: str = typer.Option(None, help="Comma-separated block indices to cache (default: the last --decoder-layers); "
                                          "'none' with --emb: an emb-only store."),
    decoder_layers: int = typer.Option(None, help="Cache the last K blocks (EVL: 4 for K400, all for SSv2)."),
    attention: str = typer.Option(None, help="maps (adjacent-frame attention maps), qk (raw q/k) or none."),
    sampling: str = typer.Option(None, help="dense (stride) or segment (TSN-style)."),
    frames: int = typer.Option(None, help="Frames per clip T."),
    stride: int = typer.Option(None, help="Frame stride for dense sampling."),
    views: str = typer.Option(None, help="train:V (V augmented views), eval (the recipe grid) or eval:TxS."),
    view_seed: int = typer.Option(None, help="Seed of the training-view augmentation."),
    dtype: str = typer.Option(None, help="Feature storage: float16, float32, int8 or float8_e4m3 (per-channel x per-token "
                                         "scales; int8:channel, int8:group32, ... pick other scales)."),
    attn_dtype: str = typer.Option(None, help="Attention-map storage: float16 or uint8 (row-scaled, sqrt companded)."),
    attn_topk: int = typer.Option(None, help="Keep only the K largest probabilities per attention-map row (0: all)."),
    layout: str = typer.Option(None, help="full (cache the decoder's inputs) or prefix (cache the stream entering the first "
                                          "decoder block; stage 2 recomputes the tail blocks, weights kept in the store)."),
    emb: bool = typer.Option(None, "--emb/--no-emb", help="Also store per-frame CLIP image embeddings ln_post(CLS) @ proj "
                                                            "(T x E float16; for `evl-cache zeroshot`)."),
    shard_size: int = typer.Option(None, help="Videos per shard file (default: chosen by --shard-mib)."),
    shard_mib: float = typer.Option(None, help="Target size of one shard file in MiB (default 1024)."),
    decode_timeout: float = typer.Option(None, help="Seconds before a hanging decode is recorded as failed (default 120)."),
    batch_size: int = typer.Option(None, help="Clip-views per backbone forward."),
    min_frames: int = typer.Option(None, help="Videos with fewer frames are recorded as failed (default: T)."),
    compressor: str = typer.Option(None, help="none (default), zstd or blosc."),
    ray_address: str = typer.Option(None, help="Join an existing Ray cluster instead of starting a local one."),
    num_cpus: int = typer.Option(None, help="CPUs for the embedded local Ray (default: all)."),
    retry_failed: bool = typer.Option(False, help="Also redo videos that failed in an earlier run."),
    fail_on_error: bool = typer.Option(False, help="Exit 1 if any video failed."),
    config: Path = typer.Option(None, help="Recipe YAML whose 'extract' section gives defaults for these flags."),
    storage_options: StorageOptions = None,
) -> None:
    """Run the frozen CLIP backbone once per video and cache its features in a Zarr store."""
    use_storage_options(storage_options)
    from evl_cache.datasets import load_manifest
    from evl_cache.extract import ExtractConfig, extract as run_extract

    flags = {
        "dataset": dataset, "root": root, "annotations": annotations, "split": split, "classes": classes,
        "arch": arch, "weights": weights, "seed": seed, "quick_gelu": quick_gelu, "precision": precision,
        "blocks": blocks, "decoder_layers": decoder_layers, "attention": attention, "sampling": sampling,
        "frames": frames, "stride": stride, "views": views, "view_seed": view_seed, "dtype": dtype,
        "attn_dtype": attn_dtype, "attn_topk": attn_topk, "layout": layout, "emb": emb,
        "shard_size": shard_size, "shard_mib": shard_mib, "decode_timeout": decode_timeout, "batch_size": batch_size, "min_frames": min_frames, "compressor": compressor,
        "ray_address": ray_address, "num_cpus": num_cpus, "retry_failed": retry_failed or None,
        "trust_torchscript": trust_torchscript or None,
    }
    settings = {**_config_defaults(config, "extract"), **{k: v for k, v in flags.items() if v is not None}}
    if not settings.get("dataset"):
        raise UserError("no --dataset given; use one of k400, ssv2, ucf101, hmdb51, list (or a --config with extract.dataset)")
    if settings.get("weights") is None:
        raise UserError("no --weights given; pass a local CLIP file, openclip:<tag>, or 'random' to use random weights on purpose")
    extra = {"classes": str(settings["classes"])} if settings.get("classes") else {}
    manifest = load_manifest(settings["dataset"], str(settings.get("root", ".")), settings.get("split", "train"),
                             annotations=str(settings["annotations"]) if settings.get("annotations") else None, **extra)
    cfg = ExtractConfig.from_settings(settings)
    spec = cfg.backbone
    if spec.weights == "random":
        typer.secho("warning: --weights random: features come from a randomly initialised ViT, not CLIP", fg=typer.colors.YELLOW, err=True)
    summary = run_extract(manifest, str(store), cfg)
    for line in summary.lines():
        typer.echo(line)
    if fail_on_error and summary.failed:
        raise typer.Exit(1)


@app.command()
def inspect(store: str = typer.Argument(..., help="A cache store written by `evl-cache extract` (a path or a URL)."),
    storage_options: StorageOptions = None,
) -> None:
    """Print a store's attributes, array shapes, bytes and files on disk, done/failed counts and failures."""
    import json

    use_storage_options(storage_options)
    from evl_cache.store import TABLE_ARRAYS, open_store

    st = open_store(str(store))
    attrs = dict(st.attrs)
    typer.echo(json.dumps(attrs, indent=2, sort_keys=True))
    typer.echo("arrays:")
    for name in [*TABLE_ARRAYS, *st.tensor_names()]:
        arr = st.array(name)
        shards = f" shards={tuple(arr.shards)}" if arr.shards else ""
        typer.echo(f"  {name:<12} shape={tuple(arr.shape)} dtype={arr.dtype} chunks={tuple(arr.chunks)}{shards}")
    info = st.info()
    raw = st.raw_bytes_per_view() * info.done * st.num_views
    typer.echo(f"videos: {info.num_videos} total, {info.done} done, {info.failed} failed, {info.pending} pending")
    typer.echo(f"bytes on disk: {info.bytes_on_disk:,} ({info.bytes_on_disk / 2**20:.1f} MiB) in {info.files} files and "
               f"directories; raw tensor bytes of done videos: {raw:,}")
    per_view = st.raw_bytes_per_view()
    typer.echo(f"bytes per clip-view: {per_view:,} ({per_view / 1e6:.2f} MB; layout {attrs.get('layout', 'full')}, "
               f"features {attrs.get('dtype')}, maps {attrs.get('attn_format', attrs.get('attention'))})")
    for idx, path, err in info.failures:
        typer.echo(f"  failed #{idx} {path}: {err}")


@app.command()
def verify(
    store: str = typer.Argument(..., help="A cache store written by `evl-cache extract` (a path or a URL)."),
    repair: bool = typer.Option(False, "--repair", help="Mark bad videos pending, so rerunning extract redoes just them."),
    quick: bool = typer.Option(False, "--quick", help="Check shard indexes and chunk lengths only, not the data checksums."),
    storage_options: StorageOptions = None,
) -> None:
    """Check that every done (video, view) chunk is present, full length and matches its crc32c."""
    use_storage_options(storage_options)
    from evl_cache.verify import verify_store

    report = verify_store(str(store), repair=repair, quick=quick)
    for line in report.lines():
        typer.echo(line)
    if report.bad and not repair:
        raise typer.Exit(1)


# --- stage 2: train / eval / predict / import-evl -------------------------------------------


@app.command("import-evl")
def import_evl(
    src: Path = typer.Argument(..., help="Released EVL checkpoint (.pth, {'model': DDP state dict}); read with weights_only."),
    out: Path = typer.Argument(..., help="Output checkpoint stem: writes OUT.safetensors and OUT.json."),
    heads: int = typer.Option(None, help="Decoder attention heads (not in the weights' shapes; default width // 64)."),
    classes_file: Path = typer.Option(None, help="Class names, one per line, in label order."),
    frames: int = typer.Option(None, help="Frames T, only needed when the checkpoint has no temporal position embedding."),
    grid: str = typer.Option(None, help="Patch grid HxW, only needed for non-square grids or checkpoints without TCA."),
    arch: str = typer.Option(None, help="Backbone it was trained on (e.g. ViT-B-16), recorded with the last-K block indices."),
    attention_input: str = typer.Option(None, help="What TCA reads from the cache: maps or qk (default: the store's, else maps)."),
    store: str = typer.Option(None, help="A cache store extracted with the same CLIP weights: copies its backbone, "
                                         "blocks, sampling, views and class names so eval/predict can use the import."),
) -> None:
    """Convert a released EVL decoder checkpoint into evl-cache's safetensors + JSON format."""
    from evl_cache.checkpoints import import_evl_checkpoint

    meta: dict = {}
    if store:
        from evl_cache.store import open_store
        from evl_cache.train import checkpoint_meta

        attrs = open_store(store).attrs
        meta = checkpoint_meta(attrs, attrs, store, 0)
        meta.pop("trained", None)
        attention_input = attention_input or attrs["attention"]
    if classes_file is not None:
        if not classes_file.is_file():
            raise UserError(f"classes file {classes_file} not found; pass a text file with one class name per line")
        meta["class_names"] = [ln.strip() for ln in classes_file.read_text().splitlines() if ln.strip()]
    grid_hw = None
    if grid:
        try:
            grid_hw = tuple(int(v) for v in grid.lower().split("x"))
            assert len(grid_hw) == 2
        except (ValueError, AssertionError):
            raise UserError(f"bad --grid {grid!r}; give HxW, e.g. 14x14") from None
    if arch:
        from evl_cache.flops import vit_dims

        meta.update(backbone_arch=arch, backbone_layers=vit_dims(arch).layers)
    model, path = import_evl_checkpoint(src, out, num_frames=frames, meta=meta, heads=heads, grid=grid_hw,
                                        attention_input=attention_input or "maps")
    c = model.cfg
    typer.echo(f"imported {src} -> {path} (+ .safetensors): K={c.num_layers} width={c.width} heads={c.heads} "
               f"frames={c.frames} grid={c.grid[0]}x{c.grid[1]} classes={c.num_classes} "
               f"tconv={c.temporal_conv} tpos={c.temporal_pos} tca={c.temporal_cross_attention}")


@app.command()
def train(
    out: Path = typer.Option(..., help="Run directory (metrics.jsonl, checkpoints/, model.*, plots/, train_state.pt)."),
    config: Path = typer.Option(None, help="Training recipe YAML (see configs/train_default.yaml); defaults = EVL K400 recipe."),
    train_store: str = typer.Option(None, help="Cache store to train on (overrides data.train_store)."),
    val_store: str = typer.Option(None, help="Cache store to validate on at train.eval_every steps."),
    steps: int = typer.Option(None, help="Optimizer steps (train.steps)."),
    batch: int = typer.Option(None, help="Global batch per optimizer step (train.batch_size)."),
    lr: float = typer.Option(None, help="Peak learning rate (train.lr)."),
    workers: int = typer.Option(None, help="DataLoader worker processes (data.num_workers)."),
    amp: str = typer.Option(None, help="auto (fp16 + grad scaler on GPU), bf16, fp16 or off; always off on CPU."),
    device: str = typer.Option(None, help="auto, cpu or cuda[:N]."),
    seed: int = typer.Option(None, help="Seed of initialisation, dropout and sampling (train.seed)."),
    set_: list[str] = typer.Option(None, "--set", help="Dotted override, repeatable: --set train.warmup_steps=500."),
    resume: bool = typer.Option(False, help="Continue the run in --out exactly where its last checkpoint left off."),
    until_step: int = typer.Option(None, help="Stop after this many steps in total (the schedule still spans --steps); resume later."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the progress bar."),
    allow_partial: bool = typer.Option(False, "--allow-partial",
                                       help="Train on stores whose extraction has pending videos (data.allow_partial)."),
    ray_workers: int = typer.Option(None, help="Run data-parallel on N Ray Train workers (TorchTrainer); "
                                               "for torchrun, launch `torchrun ... $(which evl-cache) train` instead."),
    ray_address: str = typer.Option(None, help="With --ray-workers: join this Ray cluster instead of starting a local one."),
    gpus_per_worker: float = typer.Option(0.0, help="With --ray-workers: GPUs per worker (0 = CPU workers, gloo)."),
    sweep: Path = typer.Option(None, help="YAML with a 'sweep:' list of named model:/train: overrides: train them all in "
                                          "one pass over the store, into OUT/<name>/ (a 'sweep:' section in --config works too)."),
    init_from: str = typer.Option(None, help="Start from every matching weight of this checkpoint (train.init_from)."),
    few_shot: int = typer.Option(None, "--few-shot", help="Train on K done videos per class of the train store "
                                                          "(data.few_shot; validation and eval use every video)."),
    few_shot_seed: int = typer.Option(None, "--few-shot-seed", help="Seed of the few-shot draw (data.few_shot_seed)."),
    few_shot_allow_short: bool = typer.Option(False, "--few-shot-allow-short",
                                              help="Use all the videos of a class with fewer than K (data.few_shot_allow_short)."),
    storage_options: StorageOptions = None,
) -> None:
    """Train the EVL decoder by streaming a cache store (one process, torchrun ranks, or Ray Train workers)."""
    import os

    use_storage_options(storage_options)
    from evl_cache.config import load_config
    from evl_cache.train import train as run_train

    import json

    # --init-from joins the overrides before the config is validated: a fine-tuning recipe's
    # pretrained_lr_mult is refused without init_from (configs/ucf101_*.yaml)
    init_override = [f"train.init_from={json.dumps(init_from)}"] if init_from else []
    # the few-shot flags join the overrides too: the config refuses a seed without K
    for key, value in (("few_shot", few_shot), ("few_shot_seed", few_shot_seed),
                       ("few_shot_allow_short", True if few_shot_allow_short else None)):
        if value is not None:
            init_override.append(f"data.{key}={json.dumps(value)}")
    cfg = load_config(config, list(set_ or []) + init_override)
    for section, key, value in (("data", "train_store", train_store), ("data", "val_store", val_store),
                                ("train", "steps", steps), ("train", "batch_size", batch), ("train", "lr", lr),
                                ("data", "num_workers", workers), ("train", "amp", amp),
                                ("train", "device", device), ("train", "seed", seed), ("train", "init_from", init_from)):
        if value is not None:  # explicit flags win over the YAML and --set
            setattr(getattr(cfg, section), key, value)
    if allow_partial:
        cfg.data.allow_partial = True
    if ray_workers is None and (ray_address is not None or gpus_per_worker):
        raise UserError("--ray-address and --gpus-per-worker need --ray-workers N")
    from evl_cache.sweep import members, sweep_spec

    spec = sweep_spec(config, sweep)
    if spec is not None:
        if ray_workers is not None:
            raise UserError("a sweep trains in one process; drop --ray-workers, or train each configuration as its own run")
        from evl_cache.train import train_sweep

        for summary in train_sweep(members(spec[0], cfg.validated(), spec[1]), out, resume=resume, until_step=until_step,
                                   progress=progress, echo=typer.echo):
            typer.echo(f"[{Path(summary.out_dir).name}]")
            for line in summary.lines():
                typer.echo(f"  {line}")
        return
    if ray_workers is not None:
        from evl_cache.distributed import train_on_ray

        summary = train_on_ray(cfg, out, workers=ray_workers, address=ray_address, gpus_per_worker=gpus_per_worker,
                               resume=resume, until_step=until_step, echo=typer.echo)
    else:
        summary = run_train(cfg, out, resume=resume, until_step=until_step, progress=progress, echo=typer.echo)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks for the run
        for line in summary.lines():
            typer.echo(line)


@app.command("eval")
def eval_(
    checkpoint: Path = typer.Option(None, help="Checkpoint written by train (NAME, NAME.json or NAME.safetensors)."),
    store: str = typer.Option(None, help="Cache store with the evaluation views."),
    out: Path = typer.Option(None, help="Write metrics.json, predictions.csv and confusion_matrix.png here."),
    xclip_release: Path = typer.Option(None, "--xclip-release", help="Evaluate a released X-CLIP checkpoint online on "
                                                                     "--dataset (videos decoded, no store); the class names are the prompts."),
    dataset: str = typer.Option(None, help="With --xclip-release: manifest adapter (k400, ucf101, hmdb51, list, ...)."),
    root: Path = typer.Option(None, help="With --xclip-release: dataset root folder."),
    annotations: Path = typer.Option(None, help="With --xclip-release: annotation file (as in extract)."),
    split: str = typer.Option(None, help="With --xclip-release: split name (default val)."),
    classes: Path = typer.Option(None, help="With --xclip-release: class names, one per line (k400/k600/k700/list)."),
    templates: str = typer.Option(None, help="With --xclip-release: prompt templates (default xclip, the bare class name)."),
    class_prompts: Path = typer.Option(None, help="With --xclip-release: the names to prompt with, one per class in label "
                                                  "order (default: the class names; X-CLIP writes HMDB's brush_hair as 'brush hair')."),
    views: str = typer.Option(None, help="With --xclip-release: eval (1x1) or eval:TxS (X-CLIP's published test: eval:4x3)."),
    precision: str = typer.Option(None, help="With --xclip-release: fp32, fp16, bf16 or auto (fp16 on GPU, fp32 on CPU)."),
    trust_torchscript: bool = typer.Option(False, help="With --xclip-release: load a TorchScript file (code)."),
    batch: int = typer.Option(None, help="Clip-views per decoder forward (default 64; with --xclip-release: per model "
                                         "forward, default 4)."),
    workers: int = typer.Option(0, help="DataLoader worker processes."),
    device: str = typer.Option(None, help="cpu or cuda (default: cuda if available)."),
    allow_partial: bool = typer.Option(False, "--allow-partial",
                                       help="Evaluate a store whose extraction has pending videos (on its done ones)."),
    storage_options: StorageOptions = None,
) -> None:
    """Evaluate a checkpoint on a cache store: mean softmax over views, top-1/top-5/per-class accuracy."""
    import os

    release_flags = {"--dataset": dataset, "--root": root, "--annotations": annotations, "--split": split,
                     "--classes": classes, "--templates": templates, "--class-prompts": class_prompts, "--views": views,
                     "--precision": precision,
                     "--trust-torchscript": trust_torchscript or None}
    if xclip_release is not None:
        store_only = {"--workers": workers or None, "--allow-partial": allow_partial or None,
                      "--storage-options": storage_options}
        given = [flag for flag, value in store_only.items() if value is not None]
        if given:
            raise UserError(f"{given[0]} applies to evaluating a --store; --xclip-release decodes the videos itself")
        _eval_release(xclip_release, checkpoint, store, out, dataset, root, annotations, split, classes, templates,
                      class_prompts, views, precision, trust_torchscript, device, batch)
        return
    given = [flag for flag, value in release_flags.items() if value is not None]
    if given:
        raise UserError(f"{given[0]} applies to --xclip-release only (a checkpoint is evaluated on a --store)")
    if checkpoint is None or store is None:
        raise UserError("eval needs --checkpoint and --store (a model written by train and a cache store), "
                        "or --xclip-release FILE --dataset D to evaluate a released X-CLIP model online")

    use_storage_options(storage_options)
    from evl_cache.completeness import counts_text
    from evl_cache.evaluate import evaluate

    m = evaluate(checkpoint, store, out, batch_size=batch or 64, device=device, num_workers=workers, allow_partial=allow_partial)
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 speaks for the run
        return
    mean_class = m["mean_class_accuracy"]
    counts = f"(store: {counts_text(m['store_videos'])})"
    typer.echo(f"{m['videos']} videos x {m['views']} views: top-1 {100 * m['top1']:.2f}%  top-{m['topk']} "
               f"{100 * m['top5']:.2f}%  mean class {100 * mean_class:.2f}% {counts}" if m["top1"] is not None
               else f"{m['videos']} labelled videos: no accuracy to report {counts}")
    if out is not None:
        typer.echo(f"wrote {out}/metrics.json, predictions.csv, scores.npz, confusion_matrix.png")


def _eval_release(release: Path, checkpoint: Path | None, store: str | None, out: Path | None, dataset: str | None,
                  root: Path | None, annotations: Path | None, split: str | None, classes: Path | None,
                  templates: str | None, class_prompts: Path | None, views: str | None, precision: str | None,
                  trust_torchscript: bool, device: str | None, batch: int | None) -> None:
    """`eval --xclip-release`: a released X-CLIP model on a dataset manifest, decoding every video."""
    if checkpoint is not None or store is not None:
        raise UserError("--xclip-release is evaluated online on --dataset, not on --store / --checkpoint; drop those")
    if not dataset:
        raise UserError("--xclip-release needs --dataset (k400, ucf101, hmdb51, list, ...) with --root and its annotations")
    from evl_cache.datasets import load_manifest
    from evl_cache.xclip_release import evaluate_release

    extra = {"classes": str(classes)} if classes else {}
    manifest = load_manifest(dataset, str(root or "."), split or "val",
                             annotations=str(annotations) if annotations else None, **extra)
    m = evaluate_release(release, manifest, out, templates=templates, views=views, device=device, precision=precision,
                         trust_torchscript=trust_torchscript, batch_size=batch or 4, class_prompts=class_prompts)
    failed = m["dataset"]["failed"]
    line = (f"{m['videos']} videos x {m['views']} views: top-1 {100 * m['top1']:.2f}%  top-{m['topk']} "
            f"{100 * m['top5']:.2f}%  mean class {100 * m['mean_class_accuracy']:.2f}%" if m["top1"] is not None
            else f"{m['videos']} labelled videos: no accuracy to report")
    typer.echo(f"{line} (X-CLIP release {Path(release).name}, {m['dataset']['videos']} listed, {failed} undecodable, "
               f"{len(m['per_class'])} classes)")
    if out is not None:
        typer.echo(f"wrote {out}/metrics.json, predictions.csv, scores.npz, confusion_matrix.png")


@app.command()
def ensemble(
    preds: list[Path] = typer.Argument(..., help="Two or more eval output folders (or their scores.npz), one per model."),
    out: Path = typer.Option(..., help="Write metrics.json, predictions.csv, scores.npz, confusion_matrix.png, ensemble.json here."),
    val: list[Path] = typer.Option(None, "--val", help="The same models' predictions on a validation store, one --val per "
                                                       "model in the same order: the weights are searched on them (0.1 grid)."),
    weights: str = typer.Option(None, help="'equal' or one weight per model, e.g. 0.3,0.7 (normalised to sum 1); "
                                           "default: searched with --val, else equal."),
) -> None:
    """Combine several models' video-level probabilities by a weighted mean (weights searched on validation)."""
    from evl_cache.ensemble import ensemble as run_ensemble

    result = run_ensemble(list(preds), out, list(val or []), weights)
    for line in result.warnings:
        typer.secho(f"warning: {line}", fg=typer.colors.YELLOW, err=True)
    for line in result.lines():
        typer.echo(line)


@app.command()
def zeroshot(
    store: str = typer.Option(..., help="Cache store holding per-frame embeddings (extract --emb, or derive-emb)."),
    classes: Path = typer.Option(..., help="Class names, one per line: the store's names (any order, extra names allowed) "
                                           "or exactly the store's classes in label order, reworded."),
    out: Path = typer.Option(..., help="Write metrics.json, predictions.csv, scores.npz and confusion_matrix.png here."),
    templates: str = typer.Option("clip-kinetics700", help="Prompt templates: clip-kinetics700, clip-ucf101, actionclip, "
                                                           "xclip, photo, or a file with one template per line."),
    weights: str = typer.Option(None, help="The CLIP weights the store was extracted with, with its text tower "
                                           "(default: the path the store recorded; its sha256 must match)."),
    arch: str = typer.Option(None, help="open_clip model name or config JSON (default: the store's)."),
    trust_torchscript: bool = typer.Option(False, help="Load a TorchScript --weights file (code) that is not a known OpenAI CLIP release."),
    precision: str = typer.Option(None, help="Text tower precision: auto (fp16 on GPU, fp32 on CPU), fp32, fp16, bf16."),
    text_cache: Path = typer.Option(None, help="Folder of cached class text embeddings (default ~/.cache/evl-cache/text-emb)."),
    device: str = typer.Option(None, help="cpu or cuda (default: cuda if available)."),
    allow_partial: bool = typer.Option(False, "--allow-partial", help="Score a store whose extraction has pending videos."),
    storage_options: StorageOptions = None,
) -> None:
    """CLIP zero-shot classification of a store's videos against any class list, with eval's metrics and outputs."""
    use_storage_options(storage_options)
    from evl_cache.completeness import counts_text
    from evl_cache.zeroshot import zeroshot_store

    m = zeroshot_store(store, str(classes), templates, out, weights=weights, arch=arch, precision=precision,
                       trust_torchscript=trust_torchscript, text_cache=text_cache, device=device, allow_partial=allow_partial)
    z = m["zeroshot"]
    counts = f"(store: {counts_text(m['store_videos'])}; {len(m['per_class'])} classes, {z['num_templates']} templates "
    counts += f"'{z['templates']}', labels matched by {z['label_mapping']}, text embeddings {z['text_source']})"
    typer.echo(f"{m['videos']} videos x {m['views']} views: top-1 {100 * m['top1']:.2f}%  top-{m['topk']} "
               f"{100 * m['top5']:.2f}%  mean class {100 * m['mean_class_accuracy']:.2f}% {counts}" if m["top1"] is not None
               else f"{m['videos']} labelled videos: no accuracy to report {counts}")
    typer.echo(f"wrote {out}/metrics.json, predictions.csv, scores.npz, confusion_matrix.png")


@app.command("derive-emb")
def derive_emb(
    store: str = typer.Argument(..., help="A cache store that holds the last block's features."),
    weights: str = typer.Option(None, help="The CLIP weights the store was extracted with (default: the recorded path; sha256 must match)."),
    arch: str = typer.Option(None, help="open_clip model name or config JSON (default: the store's)."),
    trust_torchscript: bool = typer.Option(False, help="Load a TorchScript --weights file (code) that is not a known OpenAI CLIP release."),
    device: str = typer.Option(None, help="cpu or cuda (default: cuda if available)."),
    storage_options: StorageOptions = None,
) -> None:
    """Add per-frame CLIP embeddings (emb = ln_post(CLS) @ proj) to a store from its cached last block."""
    from evl_cache.derive import derive_emb as run_derive

    use_storage_options(storage_options)

    for line in run_derive(store, weights=weights, arch=arch, trust_torchscript=trust_torchscript, device=device).lines():
        typer.echo(line)


@app.command()
def predict(
    video: Path = typer.Argument(..., help="A video file or a folder of videos."),
    checkpoint: Path = typer.Option(None, help="Checkpoint written by train (not with --zero-shot)."),
    xclip_release: Path = typer.Option(None, "--xclip-release", help="A released X-CLIP checkpoint (.pth or .safetensors): "
                                                                     "zero-shot on --classes with the full model (CCT, MIT, prompts)."),
    zero_shot: bool = typer.Option(False, "--zero-shot", help="CLIP zero-shot against --classes instead of a checkpoint; "
                                                             "the backbone and views come from --arch/--weights/--frames/... as in extract."),
    classes: Path = typer.Option(None, help="With --zero-shot or --xclip-release: class names, one per line."),
    templates: str = typer.Option(None, help="With --zero-shot or --xclip-release: prompt templates, a built-in name or a file "
                                             "(default clip-kinetics700; xclip, the bare class name, with --xclip-release)."),
    arch: str = typer.Option(None, help="With --zero-shot: open_clip model name or config JSON (default ViT-B-16)."),
    seed: int = typer.Option(None, help="With --zero-shot and --weights random: the seed."),
    quick_gelu: bool = typer.Option(None, "--quick-gelu/--no-quick-gelu", help="With --zero-shot: QuickGELU or GELU."),
    sampling: str = typer.Option(None, help="With --zero-shot: dense or segment (default dense)."),
    frames: int = typer.Option(None, help="With --zero-shot: frames per clip (default 8)."),
    stride: int = typer.Option(None, help="With --zero-shot: frame stride for dense sampling (default 16)."),
    views: str = typer.Option(None, help="With --zero-shot: eval (the recipe grid) or eval:TxS; with --xclip-release: "
                                         "eval (X-CLIP's 1x1) or eval:TxS (its published test is eval:4x3)."),
    text_cache: Path = typer.Option(None, help="With --zero-shot: folder of cached class text embeddings."),
    weights: str = typer.Option(None, help="CLIP weights file, overriding the path recorded in the checkpoint "
                                           "(with --zero-shot: the CLIP weights, text tower included)."),
    force: bool = typer.Option(False, help="Use --weights even if its sha256 differs from the recorded one."),
    trust_torchscript: bool = typer.Option(False, help="Load TorchScript backbone weights (code) that are not a known OpenAI CLIP release."),
    device: str = typer.Option(None, help="cpu or cuda (default: cuda if available)."),
    topk: int = typer.Option(5, help="Classes to show per video."),
    precision: str = typer.Option(None, help="Backbone precision: fp32, fp16, bf16 or auto (default: the precision "
                                             "the checkpoint's training store was extracted in)."),
) -> None:
    """Classify videos end to end (decode, eval views, frozen backbone, decoder), no cache needed."""
    from evl_cache.predict import predict as run_predict
    from evl_cache.predict import render

    zs_only = {"--classes": classes, "--templates": templates, "--arch": arch, "--seed": seed, "--quick-gelu": quick_gelu,
               "--sampling": sampling, "--frames": frames, "--stride": stride, "--views": views, "--text-cache": text_cache}
    if xclip_release is not None:
        if checkpoint is not None or zero_shot:
            raise UserError("--xclip-release runs a released X-CLIP model on its own; drop --checkpoint / --zero-shot")
        if classes is None:
            raise UserError("--xclip-release needs --classes FILE (class names, one per line; the prompts are the names)")
        others = {k: v for k, v in zs_only.items() if k not in ("--classes", "--templates", "--views")}
        others.update({"--weights": weights, "--force": force or None})
        given = [flag for flag, value in others.items() if value is not None]
        if given:
            raise UserError(f"{given[0]} does not apply to --xclip-release: the release file fixes the model, its frames "
                            f"and its preprocessing; drop {given[0]}")
        from evl_cache.xclip_release import predict_release

        preds = predict_release(xclip_release, video, str(classes), templates, views, device=device, topk=topk,
                                precision=precision, trust_torchscript=trust_torchscript)
    elif zero_shot:
        if checkpoint is not None:
            raise UserError("--zero-shot classifies with CLIP's text tower, not a checkpoint; drop --checkpoint or --zero-shot")
        if classes is None:
            raise UserError("--zero-shot needs --classes FILE (class names, one per line)")
        if weights is None:
            raise UserError("--zero-shot needs --weights: a CLIP checkpoint with its text tower, or 'random' on purpose")
        from evl_cache.backbone import BackboneSpec
        from evl_cache.predict import predict_zero_shot
        from evl_cache.video import Sampling, ViewSet

        clip = Sampling(sampling or "dense", int(frames or 8), int(stride or 16))
        spec = BackboneSpec(arch=arch or "ViT-B-16", weights=weights, seed=int(seed or 0), quick_gelu=quick_gelu,
                            precision=precision or "auto", trust_torchscript=trust_torchscript)
        preds = predict_zero_shot(video, str(classes), spec, clip, ViewSet.parse(views or "eval", clip), templates,
                                  device=device, topk=topk, text_cache=text_cache)
    else:
        given = [flag for flag, value in zs_only.items() if value is not None]
        if given:
            also = " or --xclip-release FILE" if given[0] in ("--classes", "--templates", "--views") else ""
            raise UserError(f"{given[0]} applies to --zero-shot{also} only; add it or drop {given[0]}")
        if checkpoint is None:
            raise UserError("predict needs --checkpoint (a model written by train), --zero-shot --classes FILE, "
                            "or --xclip-release FILE --classes FILE")
        preds = run_predict(checkpoint, video, weights_override=weights, device=device, topk=topk, force=force,
                            precision=precision, trust_torchscript=trust_torchscript)
    render(preds)
    failed = [p for p in preds if p.error]
    if failed:
        typer.secho(f"{len(failed)} of {len(preds)} videos could not be read", fg=typer.colors.YELLOW, err=True)

@app.command()
def explain(
    video: Path = typer.Argument(None, help="A video file (or use --store S --video N instead)."),
    checkpoint: Path = typer.Option(..., help="Checkpoint written by train."),
    out: Path = typer.Option(..., help="Folder for explain.png, explain.gif, attention.npz and summary.txt."),
    store: str = typer.Option(None, help="Explain a cached video of this store instead of a video file."),
    video_index: int = typer.Option(None, "--video", help="With --store: the video's index in the store."),
    view: int = typer.Option(0, help="Which view: of the checkpoint's eval grid (video file) or of the store's views."),
    weights: str = typer.Option(None, help="Video file: CLIP weights file, overriding the path the checkpoint recorded."),
    force: bool = typer.Option(False, help="Video file: use --weights even if its sha256 differs from the recorded one."),
    trust_torchscript: bool = typer.Option(False, help="Load TorchScript backbone weights (code) that are not a known OpenAI CLIP release."),
    precision: str = typer.Option(None, help="Video file: backbone precision (default: the checkpoint's training store's)."),
    device: str = typer.Option(None, help="cpu or cuda (default: cuda if available)."),
) -> None:
    """Per-frame attention of the decoder's video-level query (each layer and their mean) beside the
    backbone CLS token's, over the frames (the EVL paper's Figure 4)."""
    from evl_cache.explain import check_out, explain_store, explain_video, write_explanation

    if (video is None) == (store is None):
        raise UserError("explain needs a VIDEO file or --store S --video N (one of them, not both)")
    if store is not None and video_index is None:
        raise UserError("--store needs --video N, the index of the video in the store")
    if store is None and video_index is not None:
        raise UserError("--video N picks a video of a --store; for a video file pass its path as VIDEO")
    video_only = {"--weights": weights, "--force": force or None, "--precision": precision,
                  "--trust-torchscript": trust_torchscript or None}
    given = [flag for flag, value in video_only.items() if value is not None]
    if store is not None and given:
        raise UserError(f"{given[0]} applies to a VIDEO file (the backbone runs); a --store holds the features already")
    check_out(out)
    if store is not None:
        exp = explain_store(checkpoint, store, video_index, view=view, device=device)
    else:
        exp = explain_video(checkpoint, video, view=view, weights=weights, device=device, force=force,
                            precision=precision, trust_torchscript=trust_torchscript)
    for line in write_explanation(exp, out):
        typer.echo(line)
    typer.echo(f"wrote {out}/explain.png, explain.gif, attention.npz, summary.txt")


# --- tools: synth / flops ---------------------------------------------------------------------


@app.command()
def synth(
    out: Path = typer.Argument(..., help="Output folder (videos, train.csv, val.csv, classes.txt, classes.json)."),
    classes: str = typer.Option("default", help="Comma-separated class names, 'default' (14) or 'all' (16)."),
    train_per_class: int = typer.Option(60, help="Training videos per class."),
    val_per_class: int = typer.Option(20, help="Validation videos per class."),
    seed: int = typer.Option(0, help="Dataset seed: same seed, byte-identical files."),
    size: int = typer.Option(64, help="Frame side in pixels (even)."),
    frames: int = typer.Option(16, help="Frames per video."),
    fps: int = typer.Option(8, help="Frame rate written into the container."),
    ext: str = typer.Option(".mp4", help=".mp4 (h264), .avi (mpeg4) or .webm (vp9)."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists and is not empty."),
) -> None:
    """Write the synthetic motion benchmark: real videos + `list` manifests, deterministic from the seed."""
    from evl_cache.synth import write_synthetic_dataset

    s = write_synthetic_dataset(out, classes, train_per_class, val_per_class, seed, size, frames, fps, ext, force)
    n_motion = sum(k == "motion" for k in s["kinds"].values())
    typer.echo(f"synth: {s['train_videos']} train + {s['val_videos']} val videos, {len(s['classes'])} classes "
               f"({n_motion} motion, {len(s['classes']) - n_motion} appearance), {frames}x{size}x{size} {ext}, "
               f"{s['bytes'] / 1e6:.2f} MB in {s['seconds']:.1f} s -> {s['out_dir']}/train.csv, val.csv")


@app.command()
def flops(
    arch: str = typer.Option("ViT-B-16", help="open_clip ViT name or a model-config JSON path."),
    frames: int = typer.Option(8, help="Frames per view T."),
    views: int = typer.Option(3, help="Views per video (temporal x spatial)."),
    decoder_layers: int = typer.Option(4, help="Decoder layers K (reads the last K blocks)."),
    classes: int = typer.Option(400, help="Classes of the head."),
    image_size: int = typer.Option(None, help="Input size (default: the architecture's)."),
    tca: str = typer.Option("reference", help="TCA formula counted: reference (paper) or binned (this implementation)."),
    table1: bool = typer.Option(False, "--table1", help="Print every Table 1 row of the paper beside our count."),
) -> None:
    """Multiply-accumulates (the paper's FLOPs) and parameter counts; needs no data and no weights."""
    from rich.console import Console
    from rich.table import Table

    from evl_cache import flops as fl

    console = Console(width=max(Console().width, 100))  # tables stay readable when piped
    if table1:
        t = Table(title="EVL Table 1 (K400, 3 views, K=4): paper GFLOPs vs counted GMACs")
        for col in ("model", "TxV", "top-1", "paper", "ours", "diff", "no TCA", "diff", "paper matches"):
            t.add_column(col, justify="left" if col in ("model", "paper matches") else "right", no_wrap=True)
        for r in fl.table1(tca):
            t.add_row(r["model"], f"{r['frames']}x{r['views']}", f"{r['top1']}", f"{r['paper_gflops']:,}",
                      f"{r['ours_gflops']:,.1f}", f"{r['diff_pct']:+.2f}%", f"{r['ours_no_tca_gflops']:,.1f}",
                      f"{r['diff_no_tca_pct']:+.2f}%", r["note"])
        console.print(t)
        return
    r = fl.model_cost(arch, frames, views, decoder_layers, classes, image_size, tca)
    t = Table(title=f"{arch}@{r.image_size}, {frames} frames x {views} views, K={decoder_layers}, {classes} classes")
    t.add_column("part")
    t.add_column("GMACs / view", justify="right")
    t.add_column(f"GMACs x {views}", justify="right")
    t.add_column("params", justify="right")
    t.add_row("backbone (frozen)", f"{r.backbone_gmacs_per_view:,.2f}", f"{r.backbone_gmacs_per_view * views:,.1f}", f"{r.frozen_params / 1e6:.2f} M")
    t.add_row(f"decoder + head (TCA: {tca})", f"{r.decoder_gmacs_per_view:,.2f}", f"{r.decoder_gmacs_per_view * views:,.1f}", f"{r.trainable_params / 1e6:.2f} M")
    t.add_row("total", f"{r.backbone_gmacs_per_view + r.decoder_gmacs_per_view:,.2f}", f"{r.total_gmacs:,.1f}", "")
    console.print(t)


@app.command()
def plan(
    arch: str = typer.Option("B/16", help="B/16, L/14, L/14@336, an open_clip ViT name or a model-config JSON."),
    frames: int = typer.Option(8, help="Frames per clip T."),
    views: int = typer.Option(1, help="Augmented views cached per video (train:V)."),
    videos: int = typer.Option(240_436, help="Videos in the training set (default: Kinetics-400 train)."),
    gpu: str = typer.Option("h100", help="Device kind: h100, h200, a100, v100 or cpu."),
    gpus: int = typer.Option(1, help="Devices training and extracting together."),
    disk_gbps: float = typer.Option(2.0, help="Disk or network read/write bandwidth, GB/s."),
    cpu_cores: int = typer.Option(32, help="CPU cores for decoding and reading."),
    batch: int = typer.Option(256, help="Clip-views per optimizer step."),
    steps: int = typer.Option(50_000, help="Optimizer steps of the recipe."),
    epochs: float = typer.Option(None, help="Recipe length in epochs instead of --steps (one view per video each)."),
    decoder_layers: int = typer.Option(4, help="Decoder layers K (reads the last K blocks)."),
    classes: int = typer.Option(400, help="Classes of the head."),
    runs: int = typer.Option(1, help="Training runs that share one cache (extraction is paid once)."),
    decode_rate: float = typer.Option(None, help="Measured decode rate, clip-views/s per core (default: calibrated)."),
    json_: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
) -> None:
    """Predict cache bytes, extraction and training time of every storage format and the online path."""
    import json

    from evl_cache.plan import PlanInputs, lines, make_plan

    result = make_plan(PlanInputs(arch=arch, frames=frames, views=views, videos=videos, gpu=gpu.lower(), gpus=gpus,
                                  disk_gbps=disk_gbps, cpu_cores=cpu_cores, batch=batch, steps=steps, epochs=epochs,
                                  decoder_layers=decoder_layers, classes=classes, runs=runs, decode_rate=decode_rate))
    typer.echo(json.dumps(result.to_dict(), indent=2) if json_ else "\n".join(lines(result)))


def main() -> None:
    """Entry point: run the app, turning `UserError` into one clear line and a non-zero exit."""
    try:
        code = app(standalone_mode=False)  # click returns typer.Exit's code instead of exiting
        if isinstance(code, int) and code:
            sys.exit(code)
    except UserError as err:
        message = str(err).strip()
        if "Original Traceback" in message:  # raised in a DataLoader worker: keep the original line
            message = message.splitlines()[-1].split(": ", 1)[-1]
        typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
        sys.exit(2)
    except typer.Abort:
        sys.exit(130)
    except Exception as err:  # click usage errors arrive here in non-standalone mode
        if hasattr(err, "show") and hasattr(err, "exit_code"):
            err.show()
            sys.exit(err.exit_code)
        raise


if __name__ == "__main__":
    main()
