"""Pretrain the tiny frozen backbone: a small open_clip ViT trained on SINGLE synthetic frames.

Why: EVL needs a frozen IMAGE model whose multi-layer patch features describe the objects and whose
attention follows them; a randomly initialised ViT has neither (near-uniform attention), so the
offline demo learned nothing. CLIP cannot be downloaded here, so this script makes a stand-in the
same way CLIP is made: from still images only, no temporal signal at all. Frames come from the
benchmark's renderer (evl_cache.synth.random_scene): 1-2 random shapes on a random background.

Objectives (all on one frame):
  * image level, on the pooled CLS output: which shapes are present (multi-label), the shape when
    there is one object (4-way), object count, background colour;
  * patch level, on every block's patch tokens (deep supervision, so every layer EVL may read is
    object-aware): which of the patch's pixels belong to an object, shape under the patch (or
    background), and for object patches the object's colour, size, orientation and the patch's
    offset to the object centre;
  * attention: in every block, the head-averaged softmax(q.k/sqrt(D)) over patch keys (CLS
    excluded, exactly what temporal cross attention consumes) of an object patch should put its
    mass on the same object, most on nearby parts (a Gaussian of the patch distance).

Usage:
  .venv/bin/python pipelines/pretrain_tiny.py --out evl_cache/assets/tiny_vit --seed 0 --minutes 15
  .venv/bin/python pipelines/pretrain_tiny.py --out evl_cache/assets/tiny_vit --eval-only   # re-measure
Writes config.json, weights.safetensors (visual tower state_dict, open_clip keys) and PRETRAIN.md.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evl_cache.synth import CLASS_SPECS, SHAPES, SYMMETRY, clip_rng, random_scene, render, render_clip  # noqa: E402

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
N_SHAPES = len(SHAPES)


def model_config(image_size: int, patch: int, width: int, layers: int, head_width: int, embed_dim: int) -> dict:
    """open_clip model config; text_cfg is a minimal tower only so open_clip's CLIP accepts the file."""
    return {
        "embed_dim": embed_dim,
        "quick_gelu": True,
        "vision_cfg": {"image_size": image_size, "layers": layers, "width": width, "patch_size": patch,
                       "head_width": head_width},
        "text_cfg": {"context_length": 16, "vocab_size": 256, "width": 64, "heads": 1, "layers": 1},
    }


def build_visual(cfg: dict) -> nn.Module:
    from open_clip.model import _build_vision_tower

    return _build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"], quick_gelu=True, cast_dtype=None)


# --- data -------------------------------------------------------------------------------------


def frame_targets(size: int, patch: int, bg, objs, sigma: float) -> dict:
    """Render one scene and derive every target; coverage decides which object owns a patch."""
    frame, masks = render(size, bg, objs)
    g = size // patch
    cov = np.stack([m.reshape(g, patch, g, patch).mean(axis=(1, 3)).reshape(-1) for m in masks])  # (n_obj, P)
    owner = np.where(cov.max(0) >= 0.25, cov.argmax(0), -1)
    P = g * g
    rows, cols = np.divmod(np.arange(P), g)
    pcx, pcy = (cols + 0.5) * patch, (rows + 0.5) * patch
    patch_shape = np.zeros(P, np.int64)
    reg = np.zeros((P, 9), np.float32)  # colour(3) size(1) offset(2) orient(2) alpha(1)
    reg_mask = np.zeros((P, 9), np.float32)
    attn = np.zeros((P, P), np.float32)
    for p in np.nonzero(owner >= 0)[0]:
        o = objs[owner[p]]
        patch_shape[p] = 1 + o.shape
        k = SYMMETRY[SHAPES[o.shape]]
        reg[p, :3] = np.asarray(o.colour) / 255.0
        reg[p, 3] = o.radius / size * 4
        reg[p, 4] = (o.cx - pcx[p]) / patch
        reg[p, 5] = (o.cy - pcy[p]) / patch
        reg[p, 6:8] = (math.cos(k * o.angle), math.sin(k * o.angle))
        reg[p, 8] = o.alpha
        reg_mask[p] = 1.0
        if k == 0:
            reg_mask[p, 6:8] = 0.0
        same = owner == owner[p]
        w = np.exp(-((rows - rows[p]) ** 2 + (cols - cols[p]) ** 2) / (2 * sigma**2)) * same
        attn[p] = w / w.sum()
    union = np.any(np.stack(masks), axis=0) if masks else np.zeros((size, size), bool)
    pix = union.reshape(g, patch, g, patch).transpose(0, 2, 1, 3).reshape(P, patch * patch).astype(np.float32)
    visible = [m.sum() >= 6 and o.alpha > 0.2 for m, o in zip(masks, objs)]
    present = np.zeros(N_SHAPES, np.float32)
    for o, v in zip(objs, visible):
        if v:
            present[o.shape] = 1.0
    return {
        "image": frame, "patch_shape": patch_shape, "pix": pix, "reg": reg, "reg_mask": reg_mask, "attn": attn,
        "attn_rows": (owner >= 0).astype(np.float32), "present": present,
        "count": np.int64(sum(visible) - 1 if sum(visible) > 0 else 0), "bg": np.asarray(bg, np.float32) / 255.0,
        "single_shape": np.int64(objs[0].shape if len(objs) == 1 and visible[0] else -1),
    }


def to_input(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> CLIP-normalised float (B, 3, H, W), as the backbone wrapper feeds CLIP."""
    x = torch.from_numpy(images).float().div_(255.0).permute(0, 3, 1, 2)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def make_batch(rng: np.random.Generator, n: int, size: int, patch: int, sigma: float) -> dict:
    items = [frame_targets(size, patch, *random_scene(rng, size), sigma=sigma) for _ in range(n)]
    batch = {k: torch.from_numpy(np.stack([it[k] for it in items])) for k in items[0] if k != "image"}
    batch["image"] = to_input(np.stack([it["image"] for it in items]))
    return batch


# --- model with heads ---------------------------------------------------------------------------


def block_forward(blk: nn.Module, x: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One open_clip ResidualAttentionBlock, written out so q and k (in-projection with bias, before
    the 1/sqrt(D) scale, from LN1 of the block input) are available; returns (out, q, k) with q, k
    of shape (B, H, L, D). Checked against open_clip's own forward in `check_manual_forward`."""
    B, L, C = x.shape
    D = C // heads
    h = blk.ln_1(x)
    qkv = F.linear(h, blk.attn.in_proj_weight, blk.attn.in_proj_bias)
    q, k, v = (t.reshape(B, L, heads, D).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
    a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, L, C)
    x = x + blk.ls_1(blk.attn.out_proj(a))
    x = x + blk.ls_2(blk.mlp(blk.ln_2(x)))
    return x, q, k


def patch_attention(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Head-averaged softmax over patch keys of q.k/sqrt(D), CLS excluded: (B, P, P) as TCA uses it."""
    D = q.shape[-1]
    logits = q[:, :, 1:] @ k[:, :, 1:].transpose(-1, -2) / math.sqrt(D)
    return logits.softmax(-1).mean(1)


class Pretrainer(nn.Module):
    """Frozen-to-be visual tower plus throw-away heads (only `visual` is saved)."""

    def __init__(self, cfg: dict):
        super().__init__()
        self.visual = build_visual(cfg)
        v = cfg["vision_cfg"]
        self.heads = v["width"] // v["head_width"]
        W, E = v["width"], cfg["embed_dim"]
        n_blocks = v["layers"]
        pp = v["patch_size"] ** 2
        self.patch_heads = nn.ModuleList([nn.Sequential(nn.LayerNorm(W), nn.Linear(W, 1 + N_SHAPES + 9 + pp)) for _ in range(n_blocks)])
        self.image_head = nn.Linear(E, N_SHAPES + 2 + 3)

    def forward(self, x: torch.Tensor) -> dict:
        vis = self.visual
        x = vis._embeds(x)
        outs, attns = [], []
        for blk in vis.transformer.resblocks:
            x, q, k = block_forward(blk, x, self.heads)
            outs.append(x)
            attns.append(patch_attention(q, k))
        pooled = vis.ln_post(x[:, 0]) @ vis.proj
        return {"image": self.image_head(pooled), "patch": [h(o[:, 1:]) for h, o in zip(self.patch_heads, outs)],
                "attn": attns, "pooled": pooled}


def check_manual_forward(model: Pretrainer, size: int) -> None:
    """The written-out block must be open_clip's block: compare pooled outputs on random input."""
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        ref = model.visual(x)
        got = model(x)["pooled"]
    if not torch.allclose(ref, got, atol=1e-5, rtol=1e-4):
        raise RuntimeError(f"manual block forward differs from open_clip by {(ref - got).abs().max():.2e}")


def losses(out: dict, b: dict, attn_weight: float, obj_weight: float = 4.0) -> dict:
    img = out["image"]
    single = b["single_shape"] >= 0
    L = {
        "present": F.binary_cross_entropy_with_logits(img[:, :N_SHAPES], b["present"]),
        # frames with one visible object: a plain 4-way shape CE, a stronger signal than the BCE
        "shape": F.cross_entropy(img[single, :N_SHAPES], b["single_shape"][single]) if single.any() else img.sum() * 0,
        "count": F.cross_entropy(img[:, N_SHAPES:N_SHAPES + 2], b["count"]),
        "bg": F.mse_loss(img[:, N_SHAPES + 2:].sigmoid(), b["bg"]) * 10,
    }
    n_blocks = len(out["patch"])
    shape_l, reg_l, attn_l, pix_l = 0.0, 0.0, 0.0, 0.0
    rows = b["attn_rows"]
    for i, (ph, A) in enumerate(zip(out["patch"], out["attn"])):
        w = 1.0 if i == n_blocks - 1 else 0.3  # deep supervision, lighter on earlier blocks
        # object patches are few (about 1 in 8): weight them up so "all background" is no easy minimum
        ce = F.cross_entropy(ph[..., :1 + N_SHAPES].reshape(-1, 1 + N_SHAPES), b["patch_shape"].reshape(-1), reduction="none")
        pw = 1.0 + (obj_weight - 1.0) * (b["patch_shape"].reshape(-1) > 0).float()
        shape_l = shape_l + w * (ce * pw).sum() / pw.sum()
        reg = ph[..., 1 + N_SHAPES:1 + N_SHAPES + 9]
        # which pixels of the patch belong to an object: a dense, colour-invariant stepping stone to shape
        pix_l = pix_l + w * F.binary_cross_entropy_with_logits(ph[..., 1 + N_SHAPES + 9:], b["pix"])
        m = b["reg_mask"]
        reg_l = reg_l + w * (F.smooth_l1_loss(reg, b["reg"], reduction="none", beta=0.2) * m).sum() / m.sum().clamp(min=1)
        ce = -(b["attn"] * torch.log(A + 1e-6)).sum(-1)  # (B, P), only object rows count
        attn_l = attn_l + (ce * rows).sum() / rows.sum().clamp(min=1)
    L["patch_shape"] = shape_l
    L["patch_reg"] = reg_l
    L["patch_pixels"] = pix_l
    L["attn"] = attn_weight * attn_l / n_blocks
    L["total"] = sum(L.values())
    return L


# --- evaluation -------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model: Pretrainer, batch: dict, chunk: int = 256) -> dict:
    model.eval()
    outs = [model(batch["image"][i:i + chunk]) for i in range(0, len(batch["image"]), chunk)]
    img = torch.cat([o["image"] for o in outs])
    ph = torch.cat([o["patch"][-1] for o in outs])
    A = [torch.cat([o["attn"][j] for o in outs]) for j in range(len(outs[0]["attn"]))]
    single = batch["single_shape"] >= 0
    shape_pred = img[:, :N_SHAPES].argmax(-1)
    present_pred = (img[:, :N_SHAPES] > 0).float()
    obj = batch["patch_shape"] > 0
    pshape = ph[..., :1 + N_SHAPES].argmax(-1)
    reg = ph[..., 1 + N_SHAPES:1 + N_SHAPES + 9]
    pix_acc = ((ph[..., 1 + N_SHAPES + 9:] > 0).float() == batch["pix"]).float().mean().item()
    m = batch["reg_mask"] > 0
    err = (reg - batch["reg"]).abs()
    ang = torch.atan2(reg[..., 7], reg[..., 6]) - torch.atan2(batch["reg"][..., 7], batch["reg"][..., 6])
    ang = torch.remainder(ang + math.pi, 2 * math.pi) - math.pi  # error of k*angle
    rows = batch["attn_rows"] > 0
    same_obj = [(Ab * (batch["attn"] > 0)).sum(-1)[rows].mean().item() for Ab in A]
    model.train()
    return {
        "shape_acc_single_object": (shape_pred[single] == batch["single_shape"][single]).float().mean().item(),
        "present_exact_match": (present_pred == batch["present"]).all(-1).float().mean().item(),
        "count_acc": (img[:, N_SHAPES:N_SHAPES + 2].argmax(-1) == batch["count"]).float().mean().item(),
        "bg_colour_mae_255": ((img[:, N_SHAPES + 2:].sigmoid() - batch["bg"]).abs().mean() * 255).item(),
        "patch_shape_acc_object": (pshape[obj] == batch["patch_shape"][obj]).float().mean().item(),
        "patch_shape_acc_background": (pshape[~obj] == 0).float().mean().item(),
        "patch_pixel_mask_acc": pix_acc,
        "patch_colour_mae_255": (err[..., :3][m[..., :3]].mean() * 255).item(),
        "patch_size_mae_px": (err[..., 3][m[..., 3]].mean() / 4 * 64).item(),
        "patch_offset_mae_px": (err[..., 4:6][m[..., 4:6]].mean() * 8).item(),
        "orientation_mae_deg": (ang[m[..., 6]].abs().mean().rad2deg()).item(),
        "same_frame_attn_on_same_object_per_block": [round(s, 3) for s in same_obj],
    }


# --- attention statistics on synthetic video frames --------------------------------------------


@torch.no_grad()
def video_attention_stats(visual: nn.Module, heads: int, size: int, patch: int, clips_per_class: int = 6,
                          frames: int = 16, seed: int = 1234) -> dict:
    """Cross-frame attention exactly as TCA computes it: A = mean_h softmax_k(q_t . k_{t+1} / sqrt(D))
    over patch keys (CLS excluded), q from frame t and k from frame t+1, both from LN1 of the block
    input. Reported per block, averaged over object patches of frame t of every adjacent pair:
      obj_mass: attention mass on patches of frame t+1 covered by an object (uniform: |obj|/P);
      max_w: largest weight of the row (uniform: 1/P); max_w_all: the same over all rows;
      local_mass: mass within +-1 patch of the query position;
      dir_acc: for moving_{left,right,up,down}, fraction of clips where the attention-weighted mean key
      position moves the true way (4-way, chance 25%) when the keys come from frame t+1 instead of
      frame t (averaged over object rows and frame pairs)."""
    g = size // patch
    P = g * g
    rows, cols = np.divmod(np.arange(P), g)
    near = torch.from_numpy((np.abs(rows[:, None] - rows[None]) <= 1) & (np.abs(cols[:, None] - cols[None]) <= 1)).float()
    disp = torch.from_numpy(np.stack([cols[None] - cols[:, None], rows[None] - rows[:, None]], -1)).float()  # (P, P, 2) key - query
    true_dir = {"moving_left": (-1, 0), "moving_right": (1, 0), "moving_up": (0, -1), "moving_down": (0, 1)}
    n_blocks = len(visual.transformer.resblocks)
    acc = {k: [[] for _ in range(n_blocks)] for k in ("obj_mass", "uniform_obj_mass", "max_w", "max_w_all", "local_mass")}
    dir_hits = [[] for _ in range(n_blocks)]
    for name in CLASS_SPECS:
        for i in range(clips_per_class):
            video, masks = render_clip(name, clip_rng(seed, "val", name, i), frames, size)
            cov = np.stack([np.sum(m, axis=0).reshape(g, patch, g, patch).mean(axis=(1, 3)).reshape(-1) for m in masks])
            objp = torch.from_numpy(cov >= 0.25)  # (T, P) patches covered by any object
            x = visual._embeds(to_input(video))
            for bi, blk in enumerate(visual.transformer.resblocks):
                x_next, q, k = block_forward(blk, x, heads)
                D = q.shape[-1]
                A = ((q[:-1, :, 1:] @ k[1:, :, 1:].transpose(-1, -2)) / math.sqrt(D)).softmax(-1).mean(1)  # (T-1, P, P)
                A0 = ((q[:-1, :, 1:] @ k[:-1, :, 1:].transpose(-1, -2)) / math.sqrt(D)).softmax(-1).mean(1)  # same frame
                vec = []
                for t in range(frames - 1):
                    r, nxt = objp[t], objp[t + 1]
                    if r.sum() == 0 or nxt.sum() == 0:
                        continue
                    At = A[t][r]
                    acc["obj_mass"][bi].append(At[:, nxt].sum(-1).mean().item())
                    acc["uniform_obj_mass"][bi].append(nxt.float().mean().item())
                    acc["max_w"][bi].append(At.max(-1).values.mean().item())
                    acc["local_mass"][bi].append((At * near[r]).sum(-1).mean().item())
                    # shift of the attended position when the keys come from the next frame instead of
                    # the same one: cancels the pull towards the frame centre that any map has
                    vec.append(((At - A0[t][r])[..., None] * disp[r]).sum(1).mean(0))
                acc["max_w_all"][bi].append(A.max(-1).values.mean().item())
                if name in true_dir and vec:
                    v = torch.stack(vec).mean(0)
                    guess = (int(torch.sign(v[0])), 0) if v[0].abs() >= v[1].abs() else (0, int(torch.sign(v[1])))
                    dir_hits[bi].append(float(guess == true_dir[name]))
                x = x_next
    out = {k: [round(float(np.mean(v)), 4) for v in vals] for k, vals in acc.items()}
    out["dir_acc"] = [round(float(np.mean(h)), 3) if h else None for h in dir_hits]
    out["uniform_max_w"] = round(1.0 / P, 4)
    return out


# --- residual-stream scale --------------------------------------------------------------------


def _patch_rms(block_out: torch.Tensor) -> float:
    return float(block_out[:, 1:].pow(2).mean().sqrt())


@torch.no_grad()
def last_block_rms(visual: nn.Module, images: torch.Tensor) -> float:
    """RMS per element of the last block's patch-token outputs: the scale EVL's decoder reads."""
    x = visual._embeds(images)
    for blk in visual.transformer.resblocks:
        x = blk(x)
    return _patch_rms(x)


@torch.no_grad()
def rescale_residual_stream(visual: nn.Module, factor: float) -> None:
    """Multiply the residual stream by ``factor`` everywhere, without changing what the tower computes.

    Why: the decoder's zero-initialised temporal modules (Tpos, the TCA tables) add to the block
    outputs, so how fast they can matter depends on the outputs' scale. Free training on synthetic
    frames lets the stream grow to RMS ~8 per element, where a few hundred AdamW steps leave those
    modules a few per cent of the features and they add nothing (measured: Tpos alone and TCA alone
    equal no temporal module). At RMS 1 they add tens of points, as in the paper's Table 8.
    Every LayerNorm input scales by ``factor`` (ln_pre's output, each block's attention and MLP
    output projections), and LayerNorm is scale-invariant, so LN outputs, q, k, attention maps and the
    pooled embedding are unchanged up to LayerNorm's eps; every block output is multiplied by
    ``factor``.
    """
    visual.ln_pre.weight.mul_(factor)
    visual.ln_pre.bias.mul_(factor)
    for blk in visual.transformer.resblocks:
        if not (isinstance(blk.ls_1, nn.Identity) and isinstance(blk.ls_2, nn.Identity)):
            raise ValueError("layer scale is not supported by rescale_residual_stream")
        for lin in (blk.attn.out_proj, blk.mlp.c_proj):
            lin.weight.mul_(factor)
            lin.bias.mul_(factor)


@torch.no_grad()
def _maps_and_outputs(visual: nn.Module, images: torch.Tensor, heads: int) -> tuple[list, list]:
    x, maps, outs = visual._embeds(images), [], []
    for blk in visual.transformer.resblocks:
        x, q, k = block_forward(blk, x, heads)
        maps.append(patch_attention(q, k))
        outs.append(x)
    return maps, outs


def normalise_stream(visual: nn.Module, images: torch.Tensor, heads: int, target_rms: float = 1.0) -> dict:
    """Rescale so the last block's patch tokens have per-element RMS ``target_rms``; returns the record,
    with how far the rescaled tower strays from an exact rescale (LayerNorm's eps is not rescaled)."""
    if target_rms <= 0:
        raise ValueError(f"target_rms must be positive, got {target_rms}")
    maps0, outs0 = _maps_and_outputs(visual, images, heads)
    before = _patch_rms(outs0[-1])
    factor = target_rms / before
    rescale_residual_stream(visual, factor)
    maps1, outs1 = _maps_and_outputs(visual, images, heads)
    map_diff = max(float((a - b).abs().max()) for a, b in zip(maps0, maps1))
    out_err = max(float((b - a * factor).abs().max() / (a * factor).abs().max()) for a, b in zip(outs0, outs1))
    return {"rms_before": round(before, 4), "factor": factor, "rms_after": round(_patch_rms(outs1[-1]), 4),
            "target_rms": target_rms, "frames": int(images.shape[0]),
            "max_attention_change": round(map_diff, 5), "max_output_rel_error": round(out_err, 5)}


# --- main ---------------------------------------------------------------------------------------


def save(visual: nn.Module, cfg: dict, out: Path) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    sd = {k: v.detach().contiguous().clone() for k, v in visual.state_dict().items()}
    save_file(sd, str(out / "weights.safetensors"), metadata={"format": "pt", "source": "pipelines/pretrain_tiny.py"})


def load(out: Path) -> tuple[dict, nn.Module]:
    from safetensors.torch import load_file

    cfg = json.loads((out / "config.json").read_text())
    visual = build_visual(cfg)
    visual.load_state_dict(load_file(str(out / "weights.safetensors")))
    return cfg, visual.eval()


def fmt_stats(stats: dict) -> str:
    n = len(stats["obj_mass"])
    lines = ["| block | obj mass | uniform obj mass | max weight (obj rows) | max weight (all rows) | +-1 patch mass | motion dir acc |",
             "|---|---|---|---|---|---|---|"]
    for b in range(n):
        d = stats["dir_acc"][b]
        lines.append(f"| {b} | {stats['obj_mass'][b]:.3f} | {stats['uniform_obj_mass'][b]:.3f} | {stats['max_w'][b]:.3f} | "
                     f"{stats['max_w_all'][b]:.3f} | {stats['local_mass'][b]:.3f} | {'-' if d is None else f'{d:.2f}'} |")
    return "\n".join(lines)


def write_report(out: Path, args: argparse.Namespace, cfg: dict, info: dict, train_m: dict, val_m: dict,
                 stats: dict, rand_stats: dict, history: list) -> None:
    P = (cfg["vision_cfg"]["image_size"] // cfg["vision_cfg"]["patch_size"]) ** 2
    size_mb = (out / "weights.safetensors").stat().st_size / 1e6
    stage_lines = "\n".join(
        f"  {i + 1}. `{st['command']}`: {st['steps']} steps, {st['train_seconds'] / 60:.1f} min, schedule on {st['schedule']}.\n"
        f"     Same data stream, init and step count with a step-based schedule: `{st['reproduce']}`"
        for i, st in enumerate(info.get("stages", [])))
    def mrow(k: str) -> str:
        return f"| {k} | {train_m[k]:.3f} | {val_m[k]:.3f} |"
    keys = [k for k in val_m if not isinstance(val_m[k], list)]
    st = info.get("stream")
    stream_line = "" if not st else (
        f"- Residual stream rescaled after training by {st['factor']:.5f} (`rescale_residual_stream`): the last block's\n"
        f"  patch tokens had RMS {st['rms_before']} per element on {st['frames']} val frames, now {st['rms_after']}. The change is\n"
        f"  function-preserving up to LayerNorm's eps (ln_pre and every attention/MLP output projection scaled;\n"
        f"  LayerNorm undoes it): attention maps moved by at most {st['max_attention_change']}, block outputs are the scaled\n"
        f"  originals within {st['max_output_rel_error']:.2%} of their largest value, so the head metrics below (measured\n"
        f"  before the rescale; the heads are not kept) still describe this tower. Why: the decoder's\n"
        f"  zero-initialised Tpos and TCA tables add to these outputs and stayed negligible beside RMS-8 features.\n")
    text = f"""# Tiny pretrained ViT (open_clip format) for the offline demo

Made by `pipelines/pretrain_tiny.py` on single synthetic frames (no video, no temporal signal).

- Commands that made it (stage 2 continues from stage 1's tower with fresh heads and a fresh data
  stream, when there are two; a wall-time schedule depends on how fast each step ran, the step-based
  command beside it reproduces the same steps up to that spread):
{stage_lines}
- Seed {args.seed}; {info['steps']} steps x batch {args.batch} = {info['steps'] * args.batch:,} frames in all; AdamW (peak lr
  in each stage's command, default 2e-3), betas (0.9, 0.98), weight decay 0.05 on matrices, gradient
  clipping at norm 1, linear warmup over {info['warmup']} then cosine to 0; torch {torch.__version__},
  {args.threads} CPU threads on a 2-core machine shared with other jobs.
- Wall time: {info['train_seconds'] / 60:.1f} min training in all, {info['eval_seconds']:.0f} s measuring.
- Model: `config.json` (image {cfg['vision_cfg']['image_size']}, patch {cfg['vision_cfg']['patch_size']} -> P = {P} patches,
  width {cfg['vision_cfg']['width']}, {cfg['vision_cfg']['layers']} blocks, {cfg['vision_cfg']['width'] // cfg['vision_cfg']['head_width']} heads of
  {cfg['vision_cfg']['head_width']}, embed {cfg['embed_dim']}, QuickGELU); `weights.safetensors` = the visual tower's
  `state_dict()` (open_clip keys, fp32, {info['params'] / 1e6:.2f} M parameters, {size_mb:.2f} MB). Build with
  `open_clip.model._build_vision_tower(embed_dim, vision_cfg, quick_gelu=True)`.
- Input: RGB frames scaled to [0, 1] and normalised with CLIP's mean/std.
{stream_line}- Objectives: image level (pooled CLS): shapes present (multi-label BCE), the shape on one-object
  frames (4-way CE), object count, background colour; patch level on every block (deep supervision, weight 1 on the last block, 0.3 before):
  the patch's 8x8 object/background pixel mask, shape under the patch or background (object patches weighted {args.obj_weight}x), and for object patches colour, size, offset to the object
  centre, orientation (cos/sin of k x angle, k the shape's symmetry) and opacity; attention: in every
  block, cross-entropy between the head-averaged patch-to-patch attention of object patches and a
  Gaussian (sigma {args.sigma} patch) over the patches of the same object (weight {args.attn_weight}).

## Final metrics (train: {args.eval_frames} fresh frames from the training stream; val: {args.eval_frames} frames from a held-out seed)

| metric | train | val |
|---|---|---|
""" + "\n".join(mrow(k) for k in keys) + f"""
| same-frame attention on same object, per block | {train_m['same_frame_attn_on_same_object_per_block']} | {val_m['same_frame_attn_on_same_object_per_block']} |

`shape_acc_single_object` is the image-level shape accuracy on frames holding one visible object
(chance 25%; the first trial reached 29%).

## Attention of the frozen model on synthetic VIDEO frames (what temporal cross attention sees)

A = mean over heads of softmax over patch keys of q_t . k_{{t+1}} / sqrt(D) (CLS excluded; q, k from
the block's LN1 input with its in_proj weights and bias), on {stats['n_clips']} clips ({stats['clips_per_class']} of each of the
{len(CLASS_SPECS)} classes, 16 frames, rendered without a codec). Rows = patches of frame t covered >= 25% by an object.
"obj mass" = attention mass landing on object patches of frame t+1; a uniform map gives the
"uniform obj mass" column (|objects| / P), and a uniform largest weight is 1/P = {1 / P:.4f}. "motion dir
acc": on moving_left/right/up/down clips, how often the attention-weighted mean key position shifts
the true way when the keys come from frame t+1 instead of frame t (4-way, chance 0.25).

### This model (pretrained)

{fmt_stats(stats)}

### Same config, random init (open_clip's init, torch seed {args.seed})

{fmt_stats(rand_stats)}

## Training curve (val)

| step | loss | shape acc (single object) | patch shape acc (object patches) | last-block attention on same object |
|---|---|---|---|---|
""" + "\n".join(f"| {h['step']} | {h['loss']:.3f} | {h['shape_acc_single_object']:.3f} | {h['patch_shape_acc_object']:.3f} | "
                f"{h['same_frame_attn_on_same_object_per_block'][-1]:.3f} |" for h in history) + "\n"
    (out / "PRETRAIN.md").write_text(text)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("evl_cache/assets/tiny_vit"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--minutes", type=float, default=15.0, help="training time budget; sets --steps from measured speed")
    ap.add_argument("--steps", type=int, default=0, help="fixed number of steps (overrides --minutes; exact reproduction)")
    ap.add_argument("--batch", type=int, default=48)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--attn-weight", type=float, default=0.5)
    ap.add_argument("--obj-weight", type=float, default=4.0, help="patch shape CE: weight of object patches vs background")
    ap.add_argument("--sigma", type=float, default=0.75, help="attention target: Gaussian width in patches")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--patch", type=int, default=8)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--layers", type=int, default=5)
    ap.add_argument("--head-width", type=int, default=32)
    ap.add_argument("--embed-dim", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-frames", type=int, default=512)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--init", type=Path, default=None,
                    help="continue from a saved tower (config.json + weights.safetensors); heads start fresh")
    ap.add_argument("--eval-only", action="store_true",
                    help="re-measure the saved tower's attention statistics and rewrite PRETRAIN.md (head metrics are kept)")
    ap.add_argument("--stream-rms", type=float, default=1.0,
                    help="rescale the finished tower's residual stream to this per-element RMS (function-preserving; 0: keep)")
    ap.add_argument("--rescale-only", action="store_true",
                    help="rescale the saved tower's residual stream to --stream-rms, save it, re-measure and rewrite PRETRAIN.md")
    args = ap.parse_args(argv)
    if args.rescale_only and args.stream_rms <= 0:
        ap.error("--rescale-only needs a positive --stream-rms")
    command = ".venv/bin/python pipelines/pretrain_tiny.py " + " ".join(argv if argv is not None else sys.argv[1:])
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    cfg = model_config(args.image_size, args.patch, args.width, args.layers, args.head_width, args.embed_dim)
    model = Pretrainer(cfg)
    check_manual_forward(model, args.image_size)
    rand_visual = build_visual(cfg).eval()  # same shape, never trained: the baseline for the stats
    rand_visual.load_state_dict(model.visual.state_dict())
    params = sum(p.numel() for p in model.visual.parameters())
    print(f"visual tower: {params / 1e6:.2f} M parameters; heads {model.heads}", flush=True)

    val = make_batch(np.random.default_rng([args.seed, 1]), args.eval_frames, args.image_size, args.patch, args.sigma)
    history: list = []
    info = {"params": params, "steps": 0, "warmup": 0, "train_seconds": 0.0, "command": command}
    if args.eval_only or args.rescale_only:
        cfg, visual = load(args.out)
        model.visual = visual
        state_path = args.out / "pretrain_state.json"
        saved: dict = {}
        if state_path.exists():
            saved = json.loads(state_path.read_text())
            info, history = saved["info"], saved["history"]
        if args.rescale_only:
            info["stream"] = normalise_stream(model.visual, val["image"], model.heads, args.stream_rms)
            save(model.visual, cfg, args.out)
            state_path.write_text(json.dumps({**saved, "info": info, "history": history}) + "\n")
            print(f"residual stream rescaled: {info['stream']}", flush=True)
    else:
        stages: list = []
        if args.init is not None:
            _, init_visual = load(args.init)
            model.visual.load_state_dict(init_visual.state_dict())
            state_path = args.init / "pretrain_state.json"
            if state_path.exists():
                saved = json.loads(state_path.read_text())
                old = saved["info"]
                stages, history = old.get("stages", []), saved["history"]
                if not stages and old.get("command"):  # a state file from before stages were recorded
                    stages = [{"command": old["command"], "steps": old["steps"], "train_seconds": round(old["train_seconds"], 1),
                               "schedule": old.get("schedule", "wall time"),
                               "reproduce": old["command"].split(" --minutes")[0] + f" --steps {old['steps']}"}]
        offset = sum(st["steps"] for st in stages)
        # a fresh data stream per stage, so a continued run never sees the same frames again
        rng = np.random.default_rng([args.seed, 0, len(stages)] if stages else [args.seed, 0])
        decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
        no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                                lr=args.lr, betas=(0.9, 0.98))
        # --steps N: a step-based schedule (exact reproduction). Otherwise the schedule runs on wall
        # time, so a shared, slower machine still finishes in --minutes with the lr decayed to 0.
        budget = args.minutes * 60
        warmup_frac = 0.03
        t0 = time.perf_counter()
        step, train_time = 0, 0.0
        while True:
            progress = step / args.steps if args.steps else train_time / budget
            if progress >= 1:
                break
            lr = args.lr * min(1.0, (progress + 1e-9) / warmup_frac) if progress < warmup_frac else \
                args.lr * 0.5 * (1 + math.cos(math.pi * (progress - warmup_frac) / (1 - warmup_frac)))
            for gparam in opt.param_groups:
                gparam["lr"] = lr
            ts = time.perf_counter()
            b = make_batch(rng, args.batch, args.image_size, args.patch, args.sigma)
            L = losses(model(b["image"]), b, args.attn_weight, args.obj_weight)
            opt.zero_grad(set_to_none=True)
            L["total"].backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            train_time += time.perf_counter() - ts  # evaluation time does not count against the budget
            if step % 50 == 0:
                print(f"step {step} lr {lr:.2e} {time.perf_counter() - t0:.0f}s " +
                      " ".join(f"{k}={v.item():.3f}" for k, v in L.items()), flush=True)
            if step % args.eval_every == 0:
                m = evaluate(model, val)
                with torch.no_grad():
                    vl = sum(losses(model(val["image"][:256]), {k: v[:256] for k, v in val.items()}, args.attn_weight, args.obj_weight)["total"].item()
                             for _ in range(1))
                history.append({"step": offset + step, "loss": vl, **m})
                print(f"  val step {step}: shape {m['shape_acc_single_object']:.3f} patch {m['patch_shape_acc_object']:.3f} "
                      f"attn {m['same_frame_attn_on_same_object_per_block']}", flush=True)
        repro = (f".venv/bin/python pipelines/pretrain_tiny.py --out {args.out} --seed {args.seed} --steps {step} "
                 f"--batch {args.batch} --lr {args.lr} --attn-weight {args.attn_weight} --obj-weight {args.obj_weight}"
                 + (f" --init {args.init}" if args.init is not None else ""))
        stages.append({"command": command, "steps": step, "train_seconds": round(train_time, 1),
                       "schedule": "steps" if args.steps else "wall time", "reproduce": repro})
        info.update(steps=offset + step, warmup=f"{warmup_frac:.0%} of each stage's schedule",
                    train_seconds=sum(st["train_seconds"] for st in stages), stages=stages)
        if args.stream_rms > 0:
            info["stream"] = normalise_stream(model.visual, val["image"], model.heads, args.stream_rms)
        save(model.visual, cfg, args.out)
        (args.out / "pretrain_state.json").write_text(json.dumps({"info": info, "history": history}) + "\n")
        # reload from disk so every number below is measured on the saved artefact
        cfg, visual = load(args.out)
        model.visual = visual

    t1 = time.perf_counter()
    state_path = args.out / "pretrain_state.json"
    state = json.loads(state_path.read_text())
    if args.eval_only or args.rescale_only:
        # the heads are not saved (only the tower is), so head metrics come from the training run
        if "final_metrics" not in state:
            raise SystemExit(f"{state_path} holds no final metrics; re-run the training to measure them")
        train_m, val_m = state["final_metrics"]["train"], state["final_metrics"]["val"]
    else:
        train_m = evaluate(model, make_batch(np.random.default_rng([args.seed, 0, 99]), args.eval_frames, args.image_size,
                                             args.patch, args.sigma))
        val_m = evaluate(model, val)
        state["final_metrics"] = {"train": train_m, "val": val_m}
        state_path.write_text(json.dumps(state) + "\n")
    heads = cfg["vision_cfg"]["width"] // cfg["vision_cfg"]["head_width"]
    stats = video_attention_stats(model.visual, heads, args.image_size, args.patch)
    rand_stats = video_attention_stats(rand_visual, heads, args.image_size, args.patch)
    for s in (stats, rand_stats):
        s["clips_per_class"] = 6
        s["n_clips"] = 6 * len(CLASS_SPECS)
    info["eval_seconds"] = time.perf_counter() - t1
    write_report(args.out, args, cfg, info, train_m, val_m, stats, rand_stats, history)
    print(json.dumps({"val": val_m, "attn_pretrained": stats, "attn_random": rand_stats}, indent=1))


if __name__ == "__main__":
    main()
