"""The `evl-cache` command line: thin typer wrappers over library functions.

Each command parses flags, calls one library function and prints its summary. Bad input raises
`UserError`, which `main` turns into one red line on stderr and exit code 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from evl_cache import __version__
from evl_cache.errors import UserError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Frozen-CLIP video recognition (EVL) trained from a cache of backbone features.",
)


@app.callback()
def _root() -> None:
    """Frozen-CLIP video recognition (EVL) trained from a cache of backbone features."""


@app.command()
def version() -> None:
    """Print the evl-cache version."""
    typer.echo(__version__)


# --- stage 1: extract / inspect -------------------------------------------------------------


def _parse_blocks(blocks: str | None, decoder_layers: int | None) -> list[int] | None:
    if blocks:
        try:
            return [int(b) for b in blocks.split(",") if b.strip()]
        except ValueError:
            raise UserError(f"bad --blocks '{blocks}'; give comma-separated block indices, e.g. 8,9,10,11") from None
    if decoder_layers:
        return list(range(-decoder_layers, 0))
    return None


def _config_defaults(config: Path | None, section: str) -> dict:
    """Values from a recipe YAML's ``section``: the CLI flags given explicitly override them."""
    if config is None:
        return {}
    import yaml

    if not config.is_file():
        raise UserError(f"config file {config} not found; pass an existing YAML (see configs/)")
    try:
        data = yaml.safe_load(config.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"config file {config} is not valid YAML ({err.__class__.__name__}); fix the file") from err
    return dict(data.get(section) or {})


@app.command()
def extract(
    store: Path = typer.Option(..., help="Output Zarr v3 store (created, or resumed if it exists with the same config)."),
    dataset: str = typer.Option(None, help="Manifest adapter: k400, k600, k700, ssv2, ucf101, hmdb51, list."),
    root: Path = typer.Option(None, help="Dataset root folder (video paths are relative to it)."),
    annotations: Path = typer.Option(None, help="Annotation file: K400 CSV, SSv2 JSON, UCF/HMDB split file, or a path,label CSV."),
    split: str = typer.Option(None, help="Split name (train, val, test, train1, ...)."),
    arch: str = typer.Option(None, help="open_clip ViT name (ViT-B-16, ViT-L-14, ViT-L-14-336) or a model-config JSON."),
    weights: str = typer.Option(None, help="CLIP weights: a local file, openclip:<tag>, or 'random' (explicit)."),
    seed: int = typer.Option(None, help="Seed for --weights random."),
    quick_gelu: bool = typer.Option(None, "--quick-gelu/--no-quick-gelu", help="QuickGELU (OpenAI CLIP) or GELU."),
    precision: str = typer.Option(None, help="auto (fp16 on GPU, fp32 on CPU), fp32, fp16, bf16."),
    blocks: str = typer.Option(None, help="Comma-separated block indices to cache (default: the last --decoder-layers)."),
    decoder_layers: int = typer.Option(None, help="Cache the last K blocks (EVL: 4 for K400, all for SSv2)."),
    attention: str = typer.Option(None, help="maps (adjacent-frame attention maps), qk (raw q/k) or none."),
    sampling: str = typer.Option(None, help="dense (stride) or segment (TSN-style)."),
    frames: int = typer.Option(None, help="Frames per clip T."),
    stride: int = typer.Option(None, help="Frame stride for dense sampling."),
    views: str = typer.Option(None, help="train:V (V augmented views), eval (the recipe grid) or eval:TxS."),
    view_seed: int = typer.Option(None, help="Seed of the training-view augmentation."),
    dtype: str = typer.Option(None, help="Storage dtype: float16 or float32."),
    shard_size: int = typer.Option(None, help="Videos per shard file."),
    batch_size: int = typer.Option(None, help="Clip-views per backbone forward."),
    min_frames: int = typer.Option(None, help="Videos with fewer frames are recorded as failed (default: T)."),
    compressor: str = typer.Option(None, help="none (default), zstd or blosc."),
    ray_address: str = typer.Option(None, help="Join an existing Ray cluster instead of starting a local one."),
    num_cpus: int = typer.Option(None, help="CPUs for the embedded local Ray (default: all)."),
    retry_failed: bool = typer.Option(False, help="Also redo videos that failed in an earlier run."),
    fail_on_error: bool = typer.Option(False, help="Exit 1 if any video failed."),
    config: Path = typer.Option(None, help="Recipe YAML whose 'extract' section gives defaults for these flags."),
) -> None:
    """Run the frozen CLIP backbone once per video and cache its features in a Zarr store."""
    from evl_cache.backbone import BackboneSpec
    from evl_cache.datasets import load_manifest
    from evl_cache.extract import ExtractConfig, extract as run_extract
    from evl_cache.video import Sampling, ViewSet

    d = _config_defaults(config, "extract")

    def pick(value, key, default=None):
        return value if value is not None else d.get(key, default)

    dataset_name = pick(dataset, "dataset")
    if not dataset_name:
        raise UserError("no --dataset given; use one of k400, ssv2, ucf101, hmdb51, list (or a --config with extract.dataset)")
    if pick(weights, "weights") is None:
        raise UserError("no --weights given; pass a local CLIP file, openclip:<tag>, or 'random' to use random weights on purpose")
    manifest = load_manifest(dataset_name, str(pick(root, "root", ".")), pick(split, "split", "train"),
                             annotations=str(pick(annotations, "annotations")) if pick(annotations, "annotations") else None)
    sample = Sampling(pick(sampling, "sampling", "dense"), int(pick(frames, "frames", 8)), int(pick(stride, "stride", 16)))
    view_set = ViewSet.parse(pick(views, "views", "eval"), sample, seed=int(pick(view_seed, "view_seed", 0)))
    spec = BackboneSpec(arch=pick(arch, "arch", "ViT-B-16"), weights=str(pick(weights, "weights")), seed=int(pick(seed, "seed", 0)),
                        quick_gelu=bool(pick(quick_gelu, "quick_gelu", True)), precision=pick(precision, "precision", "auto"))
    cfg = ExtractConfig(
        backbone=spec, sampling=sample, views=view_set,
        blocks=_parse_blocks(pick(blocks, "blocks"), pick(decoder_layers, "decoder_layers")) if not isinstance(d.get("blocks"), list) or blocks else d["blocks"],
        attention=pick(attention, "attention", "maps"), dtype=pick(dtype, "dtype", "float16"),
        shard_size=int(pick(shard_size, "shard_size", 16)), batch_size=int(pick(batch_size, "batch_size", 8)),
        min_frames=pick(min_frames, "min_frames"), compressor=pick(compressor, "compressor"),
        ray_address=pick(ray_address, "ray_address"), num_cpus=pick(num_cpus, "num_cpus"), retry_failed=retry_failed,
    )
    if spec.weights == "random":
        typer.secho("warning: --weights random: features come from a randomly initialised ViT, not CLIP", fg=typer.colors.YELLOW, err=True)
    summary = run_extract(manifest, str(store), cfg)
    for line in summary.lines():
        typer.echo(line)
    if fail_on_error and summary.failed:
        raise typer.Exit(1)


@app.command()
def inspect(store: Path = typer.Argument(..., help="A cache store written by `evl-cache extract`.")) -> None:
    """Print a store's attributes, array shapes, bytes on disk, done/failed counts and failures."""
    import json

    from evl_cache.store import open_store

    st = open_store(str(store))
    attrs = dict(st.attrs)
    typer.echo(json.dumps(attrs, indent=2, sort_keys=True))
    typer.echo("arrays:")
    for name in ["videos/path", "videos/label", "videos/status", "videos/error", *st.tensor_names()]:
        arr = st.array(name)
        typer.echo(f"  {name:<16} shape={tuple(arr.shape)} dtype={arr.dtype} chunks={tuple(arr.chunks)}")
    info = st.info()
    raw = st.raw_bytes_per_view() * info.done * st.num_views
    typer.echo(f"videos: {info.num_videos} total, {info.done} done, {info.failed} failed, {info.pending} pending")
    typer.echo(f"bytes on disk: {info.bytes_on_disk:,} ({info.bytes_on_disk / 2**20:.1f} MiB); raw tensor bytes of done videos: {raw:,}")
    for idx, path, err in info.failures:
        typer.echo(f"  failed #{idx} {path}: {err}")

# --- stage 2: train / eval / predict / import-evl -------------------------------------------

# --- tools: synth / flops ---------------------------------------------------------------------


def main() -> None:
    """Entry point: run the app, turning `UserError` into one clear line and a non-zero exit."""
    try:
        app(standalone_mode=False)
    except UserError as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
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
