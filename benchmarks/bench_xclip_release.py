"""What running a released X-CLIP model online costs: file size, load time and seconds per video.

No release can be downloaded here, so the file is generated: random weights in the exact layout
of X-CLIP-B/16 at 8 frames (`evl_cache.xclip_release.release_layout`), saved as X-CLIP saves it
(``{"model": state_dict}``). Speed does not depend on the weights. The video is a generated
320x240 clip of 64 frames.

    .venv/bin/python benchmarks/bench_xclip_release.py                      # CPU, 1x1 and 4x3 views
    .venv/bin/python benchmarks/bench_xclip_release.py --device cuda --views eval eval:4x3
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def main() -> None:
    import media

    from evl_cache.xclip_release import ReleaseConfig, ReleasePredictor, ReleaseViews, release_layout

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--views", nargs="+", default=["eval", "eval:4x3"])
    ap.add_argument("--json", default=None, help="also write the numbers here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = ReleaseConfig(frames=8, image_size=224, patch_size=16, vision_width=768, vision_layers=12, embed_dim=512,
                        mit_layers=1, prompt_layers=2, context_length=77, vocab_size=49408, text_width=512, text_layers=12)
    out: dict = {"device": args.device, "threads": args.threads}
    with tempfile.TemporaryDirectory() as tmp:
        gen = torch.Generator().manual_seed(0)
        sd = {k: 0.02 * torch.randn(s, generator=gen) for k, s in release_layout(cfg).items()}
        out["params"] = sum(v.numel() for v in sd.values())
        path = Path(tmp) / "k400_16_8_generated.pth"
        torch.save({"model": sd}, path)
        del sd
        out["file_mb"] = round(os.path.getsize(path) / 1e6, 1)
        video = media.write_video(Path(tmp) / "v.mp4", media.moving_square_frames(64, 240, 320, seed=1))
        start = time.perf_counter()
        pred = ReleasePredictor(path, ["a", "b", "c"], device=args.device)
        out["load_s"] = round(time.perf_counter() - start, 2)
        for views in args.views:
            pred.views = ReleaseViews.parse(views)
            if pred.device.type == "cuda":
                pred(str(video))  # warm-up: kernel selection and allocator
            start = time.perf_counter()
            pred(str(video))
            out[f"video_s[{views}]"] = round(time.perf_counter() - start, 2)
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
