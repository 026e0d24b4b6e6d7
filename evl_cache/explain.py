"""`evl-cache explain`: where the EVL decoder's video-level query looks, beside CLIP's CLS token.

The EVL paper's Figure 4 shows, per frame, the decoder query's attention over patches next to the
backbone CLS token's attention. Here, for one view of one video:

- decoder: the softmax weights of each decoder layer's cross attention (the query over the T x L
  memory tokens of its block, T CLS tokens included), kept during an ordinary forward
  (`CrossAttention.keep_attention`: a read, the logits do not change), averaged over heads, and
  their mean over layers;
- CLS: the tower's last block, softmax over all L tokens of the CLS query, averaged over heads
  (`FrozenCLIPBackbone.cls_attention`, or the store's q/k of that block when it holds them).

Two sources: a video file (the online `predict` path: decode, the checkpoint's eval views, frozen
backbone, decoder) or a cache store's (video, view), whose frames for the overlay are decoded again
from the path and sampling the store recorded. Outputs (written only once everything is computed):
``explain.png`` (rows: frame, CLS, decoder layer 1..K, decoder mean; columns: frames),
``explain.gif``, ``attention.npz`` (the raw maps) and ``summary.txt``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from evl_cache.errors import UserError

TOP_SHARE = 0.10  # the summary's concentration measure: attention mass on the top 10% of patches
PNG, GIF, NPZ, SUMMARY = "explain.png", "explain.gif", "attention.npz", "summary.txt"


@dataclass
class Explanation:
    """Attention maps of one (video, view) and what is needed to draw and describe them.

    ``decoder`` (K, T, L) and ``decoder_heads`` (K, H, T, L): each layer's query attention over its
    memory (sums to 1 over T x L); ``cls`` (T, L) or None: the backbone's last-block CLS attention
    (sums to 1 over L per frame); ``frames`` (T, S, S, 3) uint8 or None: the view the backbone saw.
    """

    decoder_heads: np.ndarray
    cls: np.ndarray | None
    frames: np.ndarray | None
    grid: tuple[int, int]
    blocks: list[int]
    last_block: int
    probs: np.ndarray
    class_names: list[str]
    source: dict[str, Any]
    label: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def decoder(self) -> np.ndarray:
        return self.decoder_heads.mean(axis=1)

    @property
    def decoder_mean(self) -> np.ndarray:
        return self.decoder.mean(axis=0)

    def patches(self, maps: np.ndarray) -> np.ndarray:
        """(..., T, L) -> (..., T, h, w): the patch tokens of each frame (CLS token dropped)."""
        return maps[..., 1:].reshape(*maps.shape[:-1], *self.grid)


# ------------------------------------------------------------------------------------ capture


@contextmanager
def keep_decoder_attention(model: torch.nn.Module) -> Iterator[list[Any]]:
    """Within the block, every decoder layer's cross attention keeps its softmax weights; yields the
    attention modules (read ``.attention`` after a forward). Restores the default on exit."""
    modules = [layer.attn for layer in model.layers]
    for m in modules:
        m.keep_attention, m.attention = True, None
    try:
        yield modules
    finally:
        for m in modules:
            m.keep_attention = False


@torch.no_grad()
def decoder_attention(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (B, classes), attention (B, K, H, T, L) float32): one ordinary forward with capture on."""
    cfg = model.cfg
    if getattr(cfg, "pool", "none") != "none":
        raise UserError(f"the decoder pools its features (model.pool={cfg.pool!r}): its attention is over pooled "
                        "tokens, not the frames' patches; explain a checkpoint trained without pooling")
    with keep_decoder_attention(model) as modules:
        logits = model(batch)
        maps = [m.attention for m in modules]
        for m in modules:
            m.attention = None
    attn = torch.stack([a[:, :, 0] for a in maps], dim=1).float()  # (B, K, H, T*L): one query token
    return logits.float(), attn.view(*attn.shape[:3], cfg.frames, cfg.num_tokens)


def layer_blocks(model: torch.nn.Module, cached: list[int]) -> list[int]:
    """The backbone block each decoder layer read: ``model.layer_blocks`` indexes the cached blocks
    (Table 6 decoders read fewer, or repeated, blocks)."""
    return [cached[b] for b in getattr(model.cfg, "layer_blocks", range(len(cached)))]


def unnormalise(views: torch.Tensor) -> np.ndarray:
    """CLIP-normalised (T, 3, S, S) -> uint8 (T, S, S, 3): the pixels the backbone saw."""
    from evl_cache.video import CLIP_MEAN, CLIP_STD

    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    rgb = (views.float().cpu() * std + mean).clamp(0, 1)
    return (rgb.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()


def _check_view(view: int, count: int, where: str) -> None:
    if not 0 <= view < count:
        raise UserError(f"--view {view} is out of range: {where} has {count} view(s) per video (0..{count - 1})")


# ------------------------------------------------------------------------------------ sources


def explain_video(checkpoint: str | os.PathLike, video: str | os.PathLike, view: int = 0, weights: str | None = None,
                  device: str | None = None, force: bool = False, precision: str | None = None,
                  trust_torchscript: bool = False) -> Explanation:
    """Explain one view of a video file on the online path (the same inputs `predict` scores)."""
    from evl_cache.predict import Predictor
    from evl_cache.video import VideoError, build_views

    if not Path(video).is_file():
        raise UserError(f"video {video} not found; pass an existing video file (or --store S --video N)")
    predictor = Predictor(checkpoint, weights, device, force=force, precision=precision,
                          trust_torchscript=trust_torchscript)
    _check_view(view, predictor.views.num_views, f"checkpoint {checkpoint}'s eval grid")
    try:
        views, _ = build_views(str(video), predictor.sampling, predictor.views, predictor.size,
                               min_frames=predictor.min_frames)
    except VideoError as err:
        raise UserError(f"video {video} cannot be used: {err}; pass a decodable video") from None
    clip = views[view:view + 1]
    model = predictor.model.eval()
    batch = predictor.backbone(clip)
    logits, attn = decoder_attention(model, batch)
    cls = predictor.backbone.cls_attention(clip)[0].cpu().numpy()
    bb = predictor.backbone
    return Explanation(
        decoder_heads=attn[0].cpu().numpy(), cls=cls, frames=unnormalise(clip[0]), grid=bb.grid,
        blocks=layer_blocks(model, list(bb.blocks)), last_block=bb.num_layers - 1, probs=logits.softmax(-1)[0].cpu().numpy(),
        class_names=predictor.class_names,
        source={"video": str(video), "view": view, "checkpoint": str(checkpoint), "path": "online"},
    )


def explain_store(checkpoint: str | os.PathLike, store_path: str, index: int, view: int = 0,
                  device: str | None = None) -> Explanation:
    """Explain a store's (video ``index``, ``view``) from its cached decoder inputs. The CLS map comes
    from the store's q/k of the tower's last block when it holds them (attention ``qk``); frames are
    decoded again from the recorded path and sampling, when the file is still there."""
    from evl_cache.backbone import cls_attention_from_qk, resolve_device
    from evl_cache.checkpoints import load_checkpoint
    from evl_cache.evaluate import check_store_fits
    from evl_cache.store import DONE, STATUS_NAMES, open_store

    dev = resolve_device(device)
    model, meta = load_checkpoint(checkpoint, device=dev)
    store = open_store(store_path)
    attrs = store.attrs
    if not store.blocks:
        raise UserError(f"store {store_path} holds no decoder inputs (an emb-only store, blocks none); explain needs a "
                        f"store extracted with the checkpoint's blocks, or run it on the video file")
    try:
        check_store_fits(meta, attrs, model.cfg.num_classes, store_path)
    except UserError as err:  # the store lacks the decoder inputs this checkpoint reads
        raise UserError(str(err).replace("evaluate on a store", "explain from a store")) from None
    if not 0 <= index < store.num_videos:
        raise UserError(f"--video {index} is out of range: store {store_path} has {store.num_videos} videos (0..{store.num_videos - 1})")
    _check_view(view, store.num_views, f"store {store_path}")
    status = int(store.status()[index])
    if status != DONE:
        raise UserError(f"video {index} of store {store_path} is {STATUS_NAMES.get(status, status)}, not extracted; "
                        f"finish `evl-cache extract` or pick a done video")
    item = store.read(index, view)
    label = int(item.pop("label"))
    batch = {k: v[None].to(dev) for k, v in item.items()}
    logits, attn = decoder_attention(model.eval(), batch)
    layers = int(attrs["backbone"]["layers"])
    notes: list[str] = []
    cls = None
    if attrs["attention"] == "qk" and attrs.get("layout", "full") == "full" and store.blocks[-1] == layers - 1:
        cls = cls_attention_from_qk(item["q"][-1], item["k"][-1]).cpu().numpy()
    else:
        notes.append(f"CLS attention: not in the store (it holds {_holds(attrs)}; the last block's CLS attention needs "
                     f"q/k of block {layers - 1}: extract with --attention qk and block {layers - 1} among --blocks, "
                     f"or explain the video file); decoder maps only")
    path = store.paths()[index]
    frames, note = _store_frames(store, index, view, path)
    if note:
        notes.append(note)
    names = store.class_names
    return Explanation(
        decoder_heads=attn[0].cpu().numpy(), cls=cls, frames=frames, grid=tuple(attrs["grid"]), blocks=layer_blocks(model, list(store.blocks)),
        last_block=layers - 1, probs=logits.softmax(-1)[0].cpu().numpy(), class_names=names,
        source={"store": store_path, "index": index, "view": view, "video": path, "checkpoint": str(checkpoint),
                "path": "store"},
        label=names[label] if 0 <= label < len(names) else None, notes=notes,
    )


def _holds(attrs: dict[str, Any]) -> str:
    if attrs.get("layout", "full") == "prefix":
        return f"the prefix stream entering block {attrs['blocks'][0]}"
    return f"attention '{attrs['attention']}' of blocks {attrs['blocks']}"


def _store_frames(store: Any, index: int, view: int, path: str) -> tuple[np.ndarray | None, str | None]:
    """The view's frames decoded again as extraction decoded them, or (None, why not)."""
    from evl_cache.video import Sampling, VideoError, ViewSet, build_views

    attrs = store.attrs
    if not os.path.isfile(path):
        return None, f"frames: the video file {path} is gone; maps are drawn without frames"
    root = (attrs.get("manifest") or {}).get("root") or ""
    key = os.path.relpath(path, root) if root else path  # the train-view seed key extraction used
    try:
        views, meta = build_views(path, Sampling(**attrs["sampling"]), ViewSet(**attrs["views"]),
                                  int(attrs["backbone"]["image_size"]), key=key, min_frames=int(attrs.get("min_frames", 1)))
    except VideoError as err:
        return None, f"frames: {path} cannot be decoded now ({err}); maps are drawn without frames"
    recorded = float(store.decode_meta()[index][0])
    if recorded and meta["num_frames"] != recorded:
        return None, (f"frames: {path} now has {meta['num_frames']:g} frames but had {recorded:g} at extraction (the "
                      f"file changed); maps are drawn without frames")
    return unnormalise(views[view]), None


# ------------------------------------------------------------------------------------ summary


def top_share(weights: np.ndarray, fraction: float = TOP_SHARE) -> float:
    """Share of the total mass held by the largest ``fraction`` of the entries (uniform: ``fraction``)."""
    flat = np.sort(weights.reshape(-1))[::-1]
    total = float(flat.sum())
    k = max(1, int(np.ceil(fraction * flat.size)))
    return float(flat[:k].sum() / total) if total > 0 else 0.0


def summary_lines(exp: Explanation) -> list[str]:
    """One line per decoder layer, their mean and the CLS map: how concentrated the attention is."""
    t = exp.decoder.shape[1]
    p = exp.grid[0] * exp.grid[1]
    pct = round(100 * TOP_SHARE)
    top = int(np.argmax(exp.probs))
    src = exp.source
    where = (f"store {src['store']} video {src['index']}" if src["path"] == "store" else f"video {src['video']}")
    lines = [f"{where} view {src['view']}: predicted {exp.class_names[top]} ({100 * exp.probs[top]:.1f}%)"
             + (f", label {exp.label}" if exp.label is not None else "")]
    rows = [(f"decoder layer {i + 1} (block {b})", exp.decoder[i]) for i, b in enumerate(exp.blocks)]
    rows.append(("decoder mean of layers", exp.decoder_mean))
    for name, maps in rows:
        patch = maps[:, 1:]
        frame_mass = patch.sum(axis=1)
        best = int(np.argmax(frame_mass))
        lines.append(f"{name}: top {pct}% of the {t}x{p} patch tokens hold {100 * top_share(patch):.1f}% of its patch "
                     f"attention (uniform {pct}%); CLS tokens {100 * maps[:, 0].sum():.1f}%; most on frame {best + 1} "
                     f"({100 * frame_mass[best] / max(frame_mass.sum(), 1e-12):.1f}%)")
    if exp.cls is not None:
        per_frame = [top_share(exp.cls[f, 1:]) for f in range(t)]
        lines.append(f"backbone CLS (block {exp.last_block}): top {pct}% of the {p} patches hold "
                     f"{100 * float(np.mean(per_frame)):.1f}% of its patch attention (mean over frames; uniform {pct}%); "
                     f"on itself {100 * float(exp.cls[:, 0].mean()):.1f}%")
    return lines + exp.notes


# ------------------------------------------------------------------------------------ drawing


def _rows(exp: Explanation) -> list[tuple[str, np.ndarray | None]]:
    """(label, (T, h, w) patch maps or None for the frame row) in display order."""
    rows: list[tuple[str, np.ndarray | None]] = [("frame", None)]
    if exp.cls is not None:
        rows.append((f"CLS, block {exp.last_block}", exp.patches(exp.cls)))
    for i, b in enumerate(exp.blocks):
        rows.append((f"layer {i + 1}, block {b}", exp.patches(exp.decoder[i])))
    rows.append(("decoder mean", exp.patches(exp.decoder_mean)))
    return rows


def _colour(maps: np.ndarray, size: int) -> np.ndarray:
    """(T, h, w) maps, scaled by the row's max, -> (T, size, size, 3) float RGB, each patch a block."""
    import matplotlib

    scaled = maps / max(float(maps.max()), 1e-12)
    rgb = matplotlib.colormaps["inferno"](scaled)[..., :3]
    rep = (size // maps.shape[1], size // maps.shape[2])
    rgb = rgb.repeat(rep[0], axis=1).repeat(rep[1], axis=2)
    pad_h, pad_w = size - rgb.shape[1], size - rgb.shape[2]
    return np.pad(rgb, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")


def _panels(exp: Explanation, size: int) -> list[tuple[str, np.ndarray]]:
    """Every row as (label, (T, size, size, 3) uint8): frames, or heat maps blended onto the frames."""
    frames = None
    if exp.frames is not None:
        idx = (np.arange(size) * exp.frames.shape[1] // size)
        frames = exp.frames[:, idx][:, :, idx].astype(np.float32) / 255.0
    out = []
    for label, maps in _rows(exp):
        if maps is None:
            if frames is None:
                continue
            rgb = frames
        else:
            heat = _colour(maps, size)
            rgb = heat if frames is None else 0.45 * frames + 0.55 * heat
        out.append((label, (np.clip(rgb, 0, 1) * 255).round().astype(np.uint8)))
    return out


def draw_grid(exp: Explanation, path: Path) -> Path:
    """The PNG: one row per map (frame, CLS, decoder layers, mean), one column per frame."""
    from evl_cache.plots import _plt

    plt = _plt()
    panels = _panels(exp, size=max(64, exp.frames.shape[1] if exp.frames is not None else 64))
    t = exp.decoder.shape[1]
    fig, axes = plt.subplots(len(panels), t, figsize=(1.25 * t + 1.4, 1.25 * len(panels) + 0.8), dpi=110, squeeze=False)
    decoder_rows = {f"layer {i + 1}, block {b}": exp.decoder[i] for i, b in enumerate(exp.blocks)}
    decoder_rows["decoder mean"] = exp.decoder_mean
    for r, (label, images) in enumerate(panels):
        shares = decoder_rows.get(label)
        for c in range(t):
            ax = axes[r, c]
            ax.imshow(images[c])
            ax.set_xticks([])
            ax.set_yticks([])
            if shares is not None:  # the frame's share of this layer's patch attention
                mass = shares[:, 1:].sum(axis=1)
                ax.text(0.03, 0.04, f"{100 * mass[c] / max(mass.sum(), 1e-12):.0f}%", transform=ax.transAxes,
                        fontsize=6, color="white", bbox={"facecolor": "black", "alpha": 0.5, "pad": 1, "lw": 0})
            if r == 0:
                ax.set_title(f"frame {c + 1}", fontsize=7)
            if c == 0:
                ax.set_ylabel(label, fontsize=7)
    top = int(np.argmax(exp.probs))
    src = exp.source
    where = f"{Path(src['video']).name}" + (f" (store video {src['index']})" if src["path"] == "store" else "")
    title = f"{where}, view {src['view']}: predicted {exp.class_names[top]} {100 * exp.probs[top]:.0f}%"
    if exp.label is not None:
        title += f", label {exp.label}"
    if exp.frames is None:
        title += " (no frames: see summary.txt)"
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def draw_gif(exp: Explanation, path: Path, size: int = 128, ms_per_frame: int = 500) -> Path:
    """The animation: one GIF frame per video frame, every row side by side, labelled."""
    from PIL import Image, ImageDraw

    panels = _panels(exp, size)
    label_h = 14
    images = []
    for t in range(exp.decoder.shape[1]):
        canvas = Image.new("RGB", (size * len(panels), size + label_h), (0, 0, 0))
        draw = ImageDraw.Draw(canvas)
        for i, (label, rgb) in enumerate(panels):
            canvas.paste(Image.fromarray(rgb[t]), (i * size, label_h))
            draw.text((i * size + 2, 1), label if i else f"{label} {t + 1}", fill=(255, 255, 255))
        images.append(canvas.convert("P", palette=Image.Palette.ADAPTIVE, colors=128))
    images[0].save(path, save_all=True, append_images=images[1:], duration=ms_per_frame, loop=0, optimize=True)
    return path


def save_arrays(exp: Explanation, path: Path) -> Path:
    """attention.npz: every raw map as float32 (no pickles), frames as uint8, and a JSON ``meta``."""
    arrays: dict[str, np.ndarray] = {
        "decoder": exp.decoder.astype(np.float32),
        "decoder_heads": exp.decoder_heads.astype(np.float32),
        "decoder_mean": exp.decoder_mean.astype(np.float32),
        "probs": exp.probs.astype(np.float32),
        "class_names": np.array(exp.class_names, dtype=str),
    }
    if exp.cls is not None:
        arrays["cls"] = exp.cls.astype(np.float32)
    if exp.frames is not None:
        arrays["frames"] = exp.frames
    meta = {"source": exp.source, "grid": list(exp.grid), "blocks": exp.blocks, "cls_block": exp.last_block,
            "label": exp.label, "notes": exp.notes,
            "layout": "decoder: (layers, T, L) query attention over each layer's T x L memory tokens, token 0 of each "
                      "frame its CLS; cls: (T, L) last-block CLS attention over L tokens; both head-averaged"}
    arrays["meta"] = np.array(json.dumps(meta))
    np.savez_compressed(path, **arrays)
    return path


def write_explanation(exp: Explanation, out: str | os.PathLike) -> list[str]:
    """Write the PNG, GIF, npz and summary into ``out`` (built in a temporary sibling folder and moved
    in at the end, so a failure leaves nothing half-written); returns the summary lines."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; pass a folder")
    lines = summary_lines(exp)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        draw_grid(exp, tmp / PNG)
        draw_gif(exp, tmp / GIF)
        save_arrays(exp, tmp / NPZ)
        (tmp / SUMMARY).write_text("\n".join(lines) + "\n")
        if not out.exists():
            os.replace(tmp, out)
        else:
            for name in (PNG, GIF, NPZ, SUMMARY):
                os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return lines


def check_out(out: str | os.PathLike) -> None:
    """Refuse an --out that cannot become the output folder, before any work."""
    if Path(out).exists() and not Path(out).is_dir():
        raise UserError(f"--out {out} is a file; pass a folder")
