"""Table 5 of the EVL paper as a benchmark: the idealised training step time.

Fake data (random frames and labels, already on the device, so no loading or decoding is in it),
the same batch for every step, and per step, as the paper measures:
- "frozen CLIP + average pooling": the frozen backbone's forward under no_grad (every block, to its
  CLIP embedding ``ln_post(CLS) @ proj`` per frame), the mean over frames, a linear head; forward,
  backward and AdamW on the head;
- "frozen CLIP + EVL": the frozen backbone's forward under no_grad (the last K blocks captured, with
  the adjacent-frame attention maps), the EVL decoder and head; forward, backward and AdamW;
- with --unfrozen, "unfrozen CLIP + EVL": the same with the backbone trained too (fp32 master
  weights, autocast on CUDA).
fp16 autocast with a gradient scaler on CUDA, fp32 on the CPU (docs/reference.md, "Training").
The paper's numbers (docs/reference.md, "Published numbers": V100, 64 samples, K = 4): 1.03 s,
0.57 s and 4.41 s per step.

    .venv/bin/python benchmarks/bench_step.py --batch 2 --threads 1   # CPU: a smaller batch (see docs/benchmarks.md)
    .venv/bin/python benchmarks/bench_step.py --device cuda --unfrozen # 64 samples, ViT-B/16 8 frames
Writes results/bench/step.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from evl_cache.backbone import BackboneSpec, FrozenCLIPBackbone, build_backbone, build_visual_tower  # noqa: E402
from evl_cache.decoder import EVLDecoder, count_parameters  # noqa: E402
from evl_cache.flops import decoder_config_for, vit_dims  # noqa: E402

PAPER_S = {"pool": 0.57, "evl": 1.03, "unfrozen": 4.41}  # docs/reference.md, "Published numbers" (Table 5)
NAMES = {"pool": "frozen CLIP + average pooling", "evl": "frozen CLIP + EVL", "unfrozen": "unfrozen CLIP + EVL"}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Trainer:
    """One optimizer step: fp16 autocast + GradScaler on CUDA (the reference's recipe), fp32 on the CPU."""

    def __init__(self, params: list[nn.Parameter], device: torch.device) -> None:
        self.opt = torch.optim.AdamW(params, lr=4e-4, weight_decay=0.05)
        self.device = device
        self.scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")

    def autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.float16)
        return torch.autocast("cpu", enabled=False)

    def step(self, logits_fn: Callable[[], torch.Tensor], labels: torch.Tensor) -> float:
        self.opt.zero_grad(set_to_none=True)
        with self.autocast():
            logits = logits_fn()
        loss = F.cross_entropy(logits.float(), labels)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        return float(loss.detach())


def build_setups(arch: str, frames: int, layers: int, classes: int, device: torch.device, unfrozen: bool) -> dict:
    """name -> (step function of (frames, labels), trainable parameter count)."""
    dims = vit_dims(arch)
    precision = "fp16" if device.type == "cuda" else "fp32"
    spec = BackboneSpec(arch=arch, weights="random", seed=0, precision=precision)
    blocks = list(range(dims.layers - layers, dims.layers))
    cfg = decoder_config_for(dims, frames, layers, classes)
    setups = {}

    pool_bb = build_backbone(spec, blocks=[], attention="none", device=device, emb=True)
    torch.manual_seed(0)
    head = nn.Linear(pool_bb.embed_dim, classes).to(device)
    t_pool = Trainer(list(head.parameters()), device)

    def pool_step(x: torch.Tensor, y: torch.Tensor) -> float:
        def logits() -> torch.Tensor:
            with torch.no_grad():
                emb = pool_bb(x)["emb"]  # (B, T, E), frozen, no graph
            return head(emb.float().mean(dim=1))
        return t_pool.step(logits, y)

    setups["pool"] = (pool_step, count_parameters(head))

    evl_bb = build_backbone(spec, blocks=blocks, attention="maps", device=device)
    torch.manual_seed(0)
    decoder = EVLDecoder(cfg).to(device).train()
    t_evl = Trainer(list(decoder.parameters()), device)

    def evl_step(x: torch.Tensor, y: torch.Tensor) -> float:
        def logits() -> torch.Tensor:
            with torch.no_grad():
                feats = evl_bb(x)
            return decoder(feats)
        return t_evl.step(logits, y)

    setups["evl"] = (evl_step, count_parameters(decoder))

    if unfrozen:
        visual, ident = build_visual_tower(BackboneSpec(arch=arch, weights="random", seed=0, precision="fp32"), device)
        visual.train().requires_grad_(True)
        live = FrozenCLIPBackbone(visual, blocks=blocks, attention="maps", weights_id=ident)
        torch.manual_seed(0)
        dec2 = EVLDecoder(cfg).to(device).train()
        t_un = Trainer(list(visual.parameters()) + list(dec2.parameters()), device)

        def unfrozen_step(x: torch.Tensor, y: torch.Tensor) -> float:
            def logits() -> torch.Tensor:
                b, t = x.shape[:2]
                tokens = visual._embeds(x.flatten(0, 1).float())
                return dec2(live.run_blocks(tokens, b, t, start=0))  # with a graph through the backbone
            return t_un.step(logits, y)

        setups["unfrozen"] = (unfrozen_step, count_parameters(visual) + count_parameters(dec2))
    return setups


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__)
    ap.add_argument("--arch", default="ViT-B-16", help="open_clip name or config JSON")
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--layers", type=int, default=4, help="decoder layers K (reads the last K blocks)")
    ap.add_argument("--classes", type=int, default=400)
    ap.add_argument("--batch", type=int, default=64, help="samples per step (the paper: 64)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per setup (the median is reported)")
    ap.add_argument("--unfrozen", action="store_true", help="also time unfrozen CLIP + EVL (backbone trained)")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--json", type=Path, default=ROOT / "results" / "bench" / "step.json")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_step: --device cuda but CUDA is not available; use --device cpu", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    dims = vit_dims(args.arch)
    print(f"# bench_step: {args.arch}, {args.frames} frames, K={args.layers}, batch {args.batch}, {device}, "
          f"torch threads {torch.get_num_threads()}", flush=True)
    setups = build_setups(args.arch, args.frames, args.layers, args.classes, device, args.unfrozen)
    g = torch.Generator().manual_seed(0)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    x = torch.randn(args.batch, args.frames, 3, dims.image_size, dims.image_size, generator=g).to(device, dtype)
    y = torch.randint(0, args.classes, (args.batch,), generator=g).to(device)
    times: dict[str, list[float]] = {k: [] for k in setups}
    cpu: dict[str, list[float]] = {k: [] for k in setups}  # process CPU seconds: the step's own cost on a shared CPU
    # interleaved round by round, so that load from other processes hits every setup alike
    for r in range(args.warmup + args.steps):
        for name, (fn, _) in setups.items():
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            loss = fn(x, y)
            sync(device)
            if r >= args.warmup:
                times[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
            assert loss == loss, f"{name}: loss is NaN"
        print(f"  round {r + 1}/{args.warmup + args.steps}: " +
              ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items() if v), flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    ratio = med["evl"] / med["pool"]
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs visible"
    lines = [f"| setup ({args.arch}, {args.frames} frames, K={args.layers}, batch {args.batch}, {device}) | "
             "trainable params | s / step (median) | process CPU s / step | / average pooling | paper s / step (V100, 64) | "
             "paper ratio |",
             "|---|---|---|---|---|---|---|"]
    for name, (_, n) in setups.items():
        lines.append(f"| {NAMES[name]} | {n / 1e6:.2f} M | {med[name]:.3f} | {med_cpu[name]:.3f} | {med[name] / med['pool']:.2f}x | "
                     f"{PAPER_S[name]} | {PAPER_S[name] / PAPER_S['pool']:.2f}x |")
    print("\n" + "\n".join(lines) + f"\n\n{where}; median of {args.steps} steps after {args.warmup} warm-up; "
          f"load average {os.getloadavg()[0]:.1f} at the end")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "arch": args.arch, "frames": args.frames, "layers": args.layers, "batch": args.batch, "device": str(device),
        "where": where, "median_s": med, "all_s": times, "median_cpu_s": med_cpu, "evl_over_pool": ratio,
        "trainable_params": {k: n for k, (_, n) in setups.items()}, "paper_s": PAPER_S}, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
