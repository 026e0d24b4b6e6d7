"""Make the tiny CLIP: the demo's tiny ViT given a text tower by contrastive image-caption pretraining.

Why: zero-shot, text-initialised heads and X-CLIP's text matching need CLIP's two towers, and no
real CLIP can be downloaded here. This script makes a stand-in the way CLIP is made, from still
images and their captions only, with no video and no motion word anywhere:

  * images: single frames from the benchmark's renderer (`evl_cache.synth.random_scene`), 1-2 shapes;
  * captions: generated from each frame's scene parameters (count, shape, colour name, size, position,
    background colour), with random wording and attributes left out at random, so short phrases such
    as "a circle." occur as often as long ones;
  * objective: CLIP's symmetric InfoNCE over the batch with a learned temperature;
  * towers: the image trunk is the committed tiny ViT (evl_cache/assets/tiny_vit), LOCKED, as in LiT
    (Zhai et al., "LiT: Zero-Shot Transfer with Locked-image text Tuning", CVPR 2022); only its
    ``ln_post`` and ``proj`` are trained beside a text transformer trained from scratch.

Keeping the trunk bit for bit means every block's tokens and attention maps, everything EVL caches,
are the demo's; only the per-frame embedding ``emb`` (ln_post(CLS) @ proj) is new.

The text tower uses CLIP's own BPE tokenizer (shipped inside open_clip, so ``evl-cache zeroshot``
needs nothing else). Token-embedding rows of tokens that never occur in a caption are zeroed
before saving: they had no signal, and zeros keep the committed file compressible.

Usage:
  .venv/bin/python pipelines/pretrain_tiny_clip.py --out evl_cache/assets/tiny_clip --seed 0
  .venv/bin/python pipelines/pretrain_tiny_clip.py --out evl_cache/assets/tiny_clip --eval-only
Writes config.json, weights.safetensors (open_clip CLIP state_dict: visual.*, text tower, logit_scale)
and PRETRAIN.md with the commands and metrics.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evl_cache.synth import SHAPES, Obj, random_scene, render  # noqa: E402
from evl_cache.video import normalise  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY_VIT = ROOT / "evl_cache" / "assets" / "tiny_vit"
TEXT_CFG = {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 3}

# Colour names by nearest RGB anchor: coarse, as people name colours.
COLOUR_NAMES: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35), "orange": (240, 140, 25), "yellow": (235, 220, 40), "green": (45, 165, 50),
    "cyan": (50, 205, 215), "blue": (35, 70, 215), "purple": (130, 50, 170), "pink": (240, 135, 190),
    "brown": (125, 80, 35), "white": (240, 240, 240), "gray": (128, 128, 128), "black": (20, 20, 20),
}
_ANCHORS = np.array(list(COLOUR_NAMES.values()), dtype=np.float64)
_NAMES = list(COLOUR_NAMES)


def colour_name(rgb) -> str:
    return _NAMES[int(np.argmin(((_ANCHORS - np.asarray(rgb, dtype=np.float64)) ** 2).sum(1)))]


def size_word(obj: Obj, size: int) -> str:
    """random_scene draws radii in [0.07, 0.24] x size: thirds of that range."""
    r = obj.radius / size
    return "small" if r < 0.127 else "large" if r > 0.183 else "medium"


def position_phrase(obj: Obj, size: int) -> str:
    col = "left" if obj.cx < size / 3 else "right" if obj.cx > 2 * size / 3 else ""
    row = "top" if obj.cy < size / 3 else "bottom" if obj.cy > 2 * size / 3 else ""
    if row and col:
        return f"at the {row} {col}"
    if row:
        return f"at the {row}"
    if col:
        return f"on the {col}"
    return "in the middle"


def object_phrase(obj: Obj, size: int, rng: np.random.Generator, p_keep: float) -> str:
    words = []
    if rng.random() < p_keep:
        words.append(size_word(obj, size))
    if rng.random() < p_keep:
        words.append(colour_name(obj.colour))
    words.append(SHAPES[obj.shape])
    phrase = " ".join(words)
    if rng.random() < p_keep * 0.6:
        phrase += " " + position_phrase(obj, size)
    return phrase


def article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def caption(bg, objs: list[Obj], size: int, rng: np.random.Generator) -> str:
    """One random description of a scene; each attribute is left out with some probability."""
    p_keep = float(rng.uniform(0.2, 1.0))
    parts = [article(object_phrase(o, size, rng, p_keep)) for o in objs]
    body = parts[0] if len(parts) == 1 else f"{parts[0]} and {parts[1]}"
    if rng.random() < 0.4:
        body = ("one shape: " if len(objs) == 1 else "two shapes: ") + body
    if rng.random() < p_keep * 0.5:
        body += f" on a {colour_name(bg)} background"
    return body + "."


# --- data -----------------------------------------------------------------------------------------


@dataclass
class FramePool:
    """Rendered frames' frozen-trunk CLS tokens and the scenes they came from (captions are re-drawn each step)."""

    cls: torch.Tensor  # (N, width): the last block's CLS token, before ln_post
    scenes: list[tuple]  # (background, objs) per frame


def to_input(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> CLIP-normalised float (B, 3, H, W), as extraction feeds CLIP."""
    return normalise(torch.from_numpy(images).permute(0, 3, 1, 2))


@torch.no_grad()
def trunk_cls(visual: nn.Module, images: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """The CLS token after the last block (the input of ln_post), in chunks."""
    out = []
    for i in range(0, len(images), chunk):
        x = visual._embeds(images[i:i + chunk])
        x = visual.transformer(x)
        out.append(x[:, 0])
    return torch.cat(out)


def make_pool(visual: nn.Module, n: int, size: int, seed: int) -> FramePool:
    rng = np.random.default_rng(seed)
    scenes, frames = [], []
    for _ in range(n):
        bg, objs = random_scene(rng, size)
        frames.append(render(size, bg, objs)[0])
        scenes.append((bg, objs))
    return FramePool(trunk_cls(visual, to_input(np.stack(frames))), scenes)


# --- model ----------------------------------------------------------------------------------------


def model_config() -> dict:
    cfg = json.loads((TINY_VIT / "config.json").read_text())
    return {"embed_dim": cfg["embed_dim"], "quick_gelu": True, "vision_cfg": cfg["vision_cfg"], "text_cfg": dict(TEXT_CFG)}


def build_model(cfg: dict) -> nn.Module:
    """open_clip's CLIP with the tiny ViT's weights in its image tower; all but ln_post/proj locked."""
    from open_clip.model import CLIP
    from safetensors.torch import load_file

    model = CLIP(cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"], quick_gelu=True)
    model.visual.load_state_dict(load_file(str(TINY_VIT / "weights.safetensors")))
    for name, p in model.visual.named_parameters():
        p.requires_grad_(name in ("proj", "ln_post.weight", "ln_post.bias"))
    return model


def image_embeddings(model: nn.Module, cls: torch.Tensor) -> torch.Tensor:
    return F.normalize(model.visual.ln_post(cls) @ model.visual.proj, dim=-1)


def text_embeddings(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    return F.normalize(model.encode_text(tokens), dim=-1)


# --- evaluation: zero-shot probes on held-out frames ----------------------------------------------


@torch.no_grad()
def probe(model: nn.Module, tokenizer, emb: torch.Tensor, labels: np.ndarray, names: list[str],
          templates: list[str]) -> float:
    """Zero-shot accuracy: the class whose prompt-ensemble text embedding is nearest."""
    text = torch.stack([F.normalize(text_embeddings(model, tokenizer([t.format(n) for t in templates])).mean(0), dim=-1)
                        for n in names])
    pred = (emb @ text.T).argmax(1).numpy()
    return float((pred == labels).mean())


@torch.no_grad()
def evaluate(model: nn.Module, tokenizer, pool: FramePool, size: int, seed: int) -> dict:
    """Retrieval within batches of 256 and attribute probes from prompts alone."""
    model.eval()
    rng = np.random.default_rng(seed)
    emb = image_embeddings(model, pool.cls)
    caps = [caption(bg, objs, size, rng) for bg, objs in pool.scenes]
    r_i2t, r_t2i = [], []
    for i in range(0, len(caps) - 255, 256):
        t = text_embeddings(model, tokenizer(caps[i:i + 256]))
        sim = emb[i:i + 256] @ t.T
        target = torch.arange(len(t))
        r_i2t.append(float((sim.argmax(1) == target).float().mean()))
        r_t2i.append(float((sim.argmax(0) == target).float().mean()))
    single = np.array([len(objs) == 1 for _, objs in pool.scenes])
    obj0 = [objs[0] for _, objs in pool.scenes]
    m = {
        "retrieval_image_to_text_top1_in_256": float(np.mean(r_i2t)),
        "retrieval_text_to_image_top1_in_256": float(np.mean(r_t2i)),
        "zeroshot_shape_single_object": probe(model, tokenizer, emb[single], np.array([o.shape for o in obj0])[single],
                                              list(SHAPES), ["a {}.", "one shape: a {}."]),
        "zeroshot_count": probe(model, tokenizer, emb, np.array([len(objs) - 1 for _, objs in pool.scenes]),
                                ["one shape", "two shapes"], ["{}."]),
        "zeroshot_background_colour": probe(
            model, tokenizer, emb, np.array([_NAMES.index(colour_name(bg)) for bg, _ in pool.scenes]), _NAMES,
            ["a shape on a {} background."]),
        "frames": len(caps),
        "single_object_frames": int(single.sum()),
    }
    # colour probe: any shape word averages out the shape, so prompt with each shape and average
    colour_labels = np.array([_NAMES.index(colour_name(o.colour)) for o in obj0])[single]
    text = torch.stack([F.normalize(torch.cat([text_embeddings(model, tokenizer([f"a {c} {s}."]))
                                               for s in SHAPES]).mean(0), dim=-1) for c in _NAMES])
    m["zeroshot_colour_single_object"] = float(((emb[single] @ text.T).argmax(1).numpy() == colour_labels).mean())
    m["chance"] = {"retrieval_image_to_text_top1_in_256": 1 / 256, "retrieval_text_to_image_top1_in_256": 1 / 256,
                   "zeroshot_shape_single_object": 1 / len(SHAPES), "zeroshot_count": 0.5,
                   "zeroshot_background_colour": 1 / len(_NAMES), "zeroshot_colour_single_object": 1 / len(_NAMES)}
    model.train()
    return m


# --- training -------------------------------------------------------------------------------------


def cosine_lr(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def train(model: nn.Module, tokenizer, pool: FramePool, args: argparse.Namespace, size: int) -> dict:
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.98), eps=1e-6)
    rng = np.random.default_rng([args.seed, 1])
    gen = torch.Generator().manual_seed(args.seed)
    seen = torch.zeros(TEXT_CFG["vocab_size"], dtype=torch.bool)
    t0, log = time.time(), []
    model.train()
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, args.steps, args.lr, max(1, args.steps // 20))
        idx = torch.randperm(len(pool.cls), generator=gen)[: args.batch]
        tokens = tokenizer([caption(*pool.scenes[i], size, rng) for i in idx.tolist()])
        seen[tokens.unique()] = True
        img = image_embeddings(model, pool.cls[idx])
        txt = text_embeddings(model, tokens)
        logits = model.logit_scale.exp() * img @ txt.T
        target = torch.arange(len(idx))
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step % args.log_every == 0 or step == args.steps - 1:
            log.append({"step": step, "loss": float(loss.detach()), "logit_scale": float(model.logit_scale.detach().exp())})
            print(f"step {step:5d}/{args.steps} loss {float(loss.detach()):.4f} scale {float(model.logit_scale.detach().exp()):.1f} "
                  f"{time.time() - t0:.0f}s", flush=True)
    return {"seconds": time.time() - t0, "log": log, "seen_tokens": seen}


def zero_unseen_rows(model: nn.Module, seen: torch.Tensor) -> int:
    """Zero the token-embedding rows no caption used (their values are the random init, no signal)."""
    with torch.no_grad():
        model.token_embedding.weight[~seen] = 0
    return int(seen.sum())


def save(model: nn.Module, cfg: dict, out: Path) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    sd = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items() if k != "attn_mask"}
    save_file(sd, str(out / "weights.safetensors"), metadata={"format": "pt", "source": "pipelines/pretrain_tiny_clip.py"})


def load(out: Path) -> tuple[dict, nn.Module]:
    from open_clip.model import CLIP
    from safetensors.torch import load_file

    cfg = json.loads((out / "config.json").read_text())
    model = CLIP(cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"], quick_gelu=True)
    missing, unexpected = model.load_state_dict(load_file(str(out / "weights.safetensors")), strict=False)
    assert not unexpected and set(missing) <= {"attn_mask"}, (missing, unexpected)
    return cfg, model.eval()


def write_report(out: Path, args: argparse.Namespace, cfg: dict, info: dict, metrics: dict) -> None:
    chance = metrics["chance"]
    table = "\n".join(f"| {k} | {v:.3f} | {chance[k]:.3f} |" for k, v in metrics.items() if k in chance)
    n_params = info["trainable_params"]
    text = f"""# Tiny CLIP (open_clip format): the demo's tiny ViT with a text tower

Made by `pipelines/pretrain_tiny_clip.py` from single synthetic frames and generated captions (no video,
no motion word in any caption).

- Command: `.venv/bin/python pipelines/pretrain_tiny_clip.py --out {args.out_rel} --seed {args.seed} --steps {args.steps} --batch {args.batch} --lr {args.lr} --frames {args.frames}`
- Image tower: `evl_cache/assets/tiny_vit`, trunk LOCKED (LiT-style): every block's tokens and
  attention maps are the tiny ViT's bit for bit; `ln_post` and `proj` were trained, so the per-frame
  embedding `emb` differs from the tiny ViT's.
- Text tower: open_clip's text transformer, {TEXT_CFG['layers']} blocks, width {TEXT_CFG['width']}, {TEXT_CFG['heads']} heads,
  context {TEXT_CFG['context_length']}, CLIP's BPE tokenizer (vocabulary {TEXT_CFG['vocab_size']}), trained from scratch.
  {info['seen_tokens']} distinct tokens occur in the captions; the other rows of the token embedding are zero.
- Trainable parameters: {n_params:,}. Objective: CLIP's symmetric InfoNCE, learned temperature
  (clamped at 100), batch {args.batch}, AdamW (peak lr {args.lr}, betas 0.9/0.98, weight decay 0.1 on
  matrices), 5% warmup then cosine, gradient clipping at norm 1.
- Data: {args.frames:,} frames from `random_scene` (seed {args.seed}), each re-captioned at random at every
  draw: count, shape, colour name (nearest of {len(COLOUR_NAMES)} anchors), size (small/medium/large), position
  (thirds of the frame), background colour; each attribute is left out with a random probability.
- Wall time: {info['pool_seconds']:.0f} s rendering and encoding frames, {info['train_seconds']:.0f} s training;
  torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}.
- Final logit scale: {info['logit_scale']:.2f}.

## Metrics on {metrics['frames']} held-out frames (seed {args.seed + 1000})

Zero-shot probes classify frames from prompts alone: shape ("a {{}}." and "one shape: a {{}}.", one-object
frames, chance 0.25), colour of the one object ("a {{colour}} {{shape}}." averaged over shapes, chance
1/{len(COLOUR_NAMES)}), count ("one shape." / "two shapes.", chance 0.5), background colour.

| metric | value | chance |
|---|---|---|
{table}

{metrics['frames']} frames, {metrics['single_object_frames']} with one object.
"""
    (out / "PRETRAIN.md").write_text(text)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "evl_cache" / "assets" / "tiny_clip")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--frames", type=int, default=20000, help="training frames rendered once (captions re-drawn)")
    ap.add_argument("--val-frames", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--log-every", type=int, default=100)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--eval-only", action="store_true", help="re-measure a saved model")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        args.out_rel = str(args.out.resolve().relative_to(ROOT))
    except ValueError:
        args.out_rel = str(args.out)
    from open_clip.tokenizer import SimpleTokenizer

    tokenizer = SimpleTokenizer(context_length=TEXT_CFG["context_length"])
    size = int(json.loads((TINY_VIT / "config.json").read_text())["vision_cfg"]["image_size"])
    torch.manual_seed(args.seed)
    if args.eval_only:
        cfg, model = load(args.out)
        val = make_pool(model.visual, args.val_frames, size, args.seed + 1000)
        print(json.dumps(evaluate(model, tokenizer, val, size, args.seed + 1000), indent=1))
        return
    cfg = model_config()
    model = build_model(cfg)
    t0 = time.time()
    pool = make_pool(model.visual, args.frames, size, args.seed)
    val = make_pool(model.visual, args.val_frames, size, args.seed + 1000)
    pool_s = time.time() - t0
    print(f"rendered and encoded {args.frames + args.val_frames} frames in {pool_s:.0f}s", flush=True)
    result = train(model, tokenizer, pool, args, size)
    seen = zero_unseen_rows(model, result["seen_tokens"])
    metrics = evaluate(model, tokenizer, val, size, args.seed + 1000)
    print(json.dumps(metrics, indent=1))
    save(model, cfg, args.out)
    info = {"pool_seconds": pool_s, "train_seconds": result["seconds"], "seen_tokens": seen,
            "logit_scale": float(model.logit_scale.exp()),
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    write_report(args.out, args, cfg, info, metrics)
    (args.out / "pretrain_log.json").write_text(json.dumps({"log": result["log"], "metrics": metrics}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
