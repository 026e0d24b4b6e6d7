"""`make bench-gpu`: the CUDA-only tests, then training and extraction at ViT-B/16 8 frames for every
storage format and the online path, as one table of ratios.

    .venv/bin/python benchmarks/bench_gpu.py                 # on a CUDA machine (random-init B/16, real shapes)
    .venv/bin/python benchmarks/bench_gpu.py --device cpu --toy   # the same logic on the CPU at toy sizes

Without CUDA (and without --device cpu) it says so and exits 0. Steps:
1. tests/test_cuda.py (fp16 AMP + GradScaler exact resume, pinned-memory loading, fp16 extraction vs
   fp32, int8/fp8/uint8/top-k dequantisation on the device equal to the CPU's);
2. benchmarks/bench_train.py --formats all: a training step from a store of every format, and the
   online path (decode + backbone + decoder step), plus each store's serial extraction time;
3. benchmarks/bench_extract.py: the Ray extraction pipeline (fp16) against its decode and backbone halves;
4. `evl-cache plan`'s prediction of each ratio for this GPU kind, beside the measurement;
5. benchmarks/bench_latency.py (the paper's Table 3): inference latency at batch 1 and throughput at the
   largest batch that fits, backbone + decoder, B/16 and L/14 at 8 frames, fp16;
6. benchmarks/bench_step.py (the paper's Table 5): the idealised training step, 64 samples of fake data,
   frozen CLIP + average pooling against frozen CLIP + EVL (and unfrozen CLIP + EVL).
Writes results/bench/gpu.json (and latency.json, latency.png, step.json beside it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def run(cmd: list[str], env: dict[str, str] | None = None) -> int:
    print("$ " + " ".join(str(c) for c in cmd), flush=True)
    return subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}).returncode


def gpu_kind() -> str | None:
    """The plan's device kind for this GPU's name (None: not in plan's table)."""
    import torch

    name = torch.cuda.get_device_name(0).lower()
    return next((k for k in ("h200", "h100", "a100", "v100") if k in name), None)


def predict(kind: str, arch: str, batch: int, frames: int, layers: int, cores: int) -> dict[str, float]:
    """Plan's step seconds for the bench's shapes (the cache in the page cache: disk not the bound)."""
    from evl_cache.plan import PlanInputs, make_plan

    plan = make_plan(PlanInputs(arch=arch, frames=frames, videos=1000, gpu=kind, disk_gbps=1000.0, cpu_cores=cores,
                                batch=batch, decoder_layers=layers, classes=2))
    return {r.name: r.step.seconds for r in plan.rows}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--toy", action="store_true", help="tiny ViT and a handful of steps (to check the script runs)")
    ap.add_argument("--json", default="results/bench/gpu.json")
    ap.add_argument("--skip-tests", action="store_true")
    args = ap.parse_args()
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("bench-gpu: no CUDA device on this machine; skipping (nothing measured). "
              "Run it on a GPU host, or with --device cpu --toy to check the script.")
        return 0
    out = Path(tempfile.mkdtemp(prefix="bench_gpu_"))
    result: dict = {"device": args.device, "toy": args.toy}
    if args.device.startswith("cuda"):
        result["gpu"] = torch.cuda.get_device_name(0)

    if not args.skip_tests:
        code = run([sys.executable, "-m", "pytest", "-q", "tests/test_cuda.py"],
                   env={"EVL_CUDA_TESTS_DEVICE": args.device.split(":")[0]})
        result["cuda_tests"] = "passed" if code == 0 else f"FAILED (pytest exit {code})"

    if args.toy:
        arch, frames, layers = "tests/assets/tiny_vit.json", 4, 2
        train = ["--arch", arch, "--frames", "4", "--layers", "2", "--videos", "4", "--batch", "2", "--steps", "2",
                 "--online-steps", "1", "--workers", "0"]
        extract = ["--videos", "4", "--shard-size", "1", "--num-cpus", "2"]  # several shards: a steady rate
    else:
        arch, frames, layers = "ViT-B-16", 8, 4
        train = ["--arch", arch, "--frames", "8", "--layers", "4", "--videos", "32", "--batch", "32", "--steps", "6",
                 "--online-steps", "4", "--workers", "4", "--threads", "0"]
        extract = ["--arch", arch, "--videos", "32", "--views", "train:1", "--batch-size", "32",
                   "--height", "256", "--width", "340", "--video-frames", "120", "--stride", "16"]
    code = run([sys.executable, "benchmarks/bench_train.py", "--device", args.device, "--formats", "all",
                "--json", str(out / "train.json"), *train])
    result["bench_train_exit"] = code
    code = run([sys.executable, "benchmarks/bench_extract.py", "--json", str(out / "extract.json"), *extract])
    result["bench_extract_exit"] = code
    bench_dir = Path(args.json).parent
    if args.toy:
        latency = ["--arch", "tests/assets/tiny_vit.json", "--frames", "4", "--layers", "2", "--max-batch", "2"]
        step = ["--arch", "tests/assets/tiny_vit.json", "--frames", "4", "--layers", "2", "--batch", "2", "--steps", "1"]
    else:
        latency = ["--arch", "ViT-B-16", "ViT-L-14", "--frames", "8", "--layers", "4", "--repeats", "5"]
        step = ["--arch", "ViT-B-16", "--frames", "8", "--layers", "4", "--batch", "64", "--steps", "5", "--unfrozen"]
    result["bench_latency_exit"] = run([sys.executable, "benchmarks/bench_latency.py", "--device", args.device,
                                        "--out", str(bench_dir), *latency])
    result["bench_step_exit"] = run([sys.executable, "benchmarks/bench_step.py", "--device", args.device,
                                     "--json", str(bench_dir / "step.json"), *step])
    lat_path, step_path = bench_dir / "latency.json", bench_dir / "step.json"
    result["latency"] = json.loads(lat_path.read_text()) if lat_path.is_file() and not result["bench_latency_exit"] else None
    result["step"] = json.loads(step_path.read_text()) if step_path.is_file() and not result["bench_step_exit"] else None
    tr = json.loads((out / "train.json").read_text()) if (out / "train.json").is_file() else None
    ex = json.loads((out / "extract.json").read_text()) if (out / "extract.json").is_file() else None
    result["train"], result["extract"] = tr, ex

    kind = gpu_kind() if args.device.startswith("cuda") else "cpu"
    plan_arch = str(ROOT / arch) if arch.endswith(".json") else arch
    pred = predict(kind, plan_arch, tr["batch"], frames, layers, os.cpu_count() or 1) if tr and kind else {}
    lines = [f"## bench-gpu: {result.get('gpu', args.device)}{' (toy sizes)' if args.toy else ', ViT-B/16 8 frames, random init'}",
             "", f"CUDA-only tests: {result.get('cuda_tests', 'skipped')}", ""]
    if tr:
        wall = tr["median_wall_s"]
        fp16 = min(v for k, v in wall.items() if k.startswith("w") and k[1:].isdigit())
        steps = {"fp16": fp16, **{k[4:]: v for k, v in wall.items() if k.startswith("fmt:")}}
        online = wall["online"]
        lines += [f"| path (batch {tr['batch']}) | bytes / clip-view | extraction clip-views/s (serial) | step s | "
                  "step / fp16 | online / step | plan: online / step |", "|---|---|---|---|---|---|---|"]
        for name, step in steps.items():
            f = tr["formats"].get(name, {})
            rate = f["clip_views"] / f["extract_s"] if f else float("nan")
            p = f"{pred[ONLINE] / pred[name]:.2f}x" if name in pred and ONLINE in pred else "-"
            lines.append(f"| {name} | {f.get('bytes_per_clip_view', 0):,} | {rate:.1f} | {step:.4f} | {step / fp16:.3f} | "
                         f"{online / step:.2f}x | {p} |")
        lines.append(f"| online (decode + backbone + decoder) | - | - | {online:.4f} | {online / fp16:.3f} | 1.00x | 1.00x |")
        result["ratios"] = {name: {"step_s": s, "online_over_step": online / s,
                                   "plan_online_over_step": pred[ONLINE] / pred[name] if name in pred else None}
                            for name, s in steps.items()}
    if args.toy:
        lines += ["", "toy sizes: the steps are fixed per-step overhead, which plan does not model; these figures only "
                      "show that the script runs"]
    if ex:
        lines += ["", f"extraction pipeline (fp16, Ray): {ex['pipeline_clips_per_s']} clip-views/s; decode alone "
                      f"{ex['decode_clips_per_s']}, backbone alone {ex['backbone_clips_per_s']}; ratio {ex['ratio']} "
                      f"({ex['ratio_meaning']})"]
    lines += table3_and_5(result.get("latency"), result.get("step"))
    print("\n".join(lines))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2, default=float))
    failed = [k for k in ("bench_train_exit", "bench_extract_exit", "bench_latency_exit", "bench_step_exit") if result.get(k)] + \
        (["cuda_tests"] if str(result.get("cuda_tests", "")).startswith("FAILED") else [])
    if failed:
        print(f"bench-gpu: failed steps: {', '.join(failed)}")
    return 1 if failed else 0


ONLINE = "online"


def table3_and_5(latency: dict | None, step: dict | None) -> list[str]:
    """The Table 3 and Table 5 lines of the summary (each bench prints its full table itself)."""
    lines = []
    if latency:
        lines += ["", "| Table 3: model | latency, batch 1 | largest batch | throughput |", "|---|---|---|---|"]
        for m in latency["models"]:
            one, top = m["points"][0], max(m["points"], key=lambda q: q["batch"])
            lines.append(f"| {m['arch']} {m['frames']}f {m['precision']} | {one['total_s'] * 1e3:.1f} ms | "
                         f"{top['batch']} ({m['stop_reason']}) | {top['clips_per_s']:.1f} clips/s |")
    if step:
        med = step["median_s"]
        lines += ["", f"Table 5 (batch {step['batch']}): frozen CLIP + average pooling {med['pool']:.3f} s/step, "
                      f"frozen CLIP + EVL {med['evl']:.3f} s/step (x{step['evl_over_pool']:.2f}; paper 1.03 / 0.57 = x1.81)"
                  + (f", unfrozen CLIP + EVL {med['unfrozen']:.3f} s/step (paper 4.41)" if "unfrozen" in med else "")]
    return lines

if __name__ == "__main__":
    sys.exit(main())
