"""`evl-cache plan`'s prediction beside bench_train.py's measurement, on this machine.

    .venv/bin/python benchmarks/bench_plan.py            # ~2-3 min on 2 busy cores
    .venv/bin/python benchmarks/bench_plan.py --json results/bench/plan.json

Runs benchmarks/bench_train.py (its default shapes: width-192 ViT-12 @224, T=8, K=4, batch 4, CPU,
1 torch thread, an fp16 store and a prefix-fp16 store) in a subprocess, then asks `make_plan` for the
same shapes on `--gpu cpu --cpu-cores 2`, with the disk at the page-cache rate bench_train measured.
Prints both, the cached / online step-time ratios and their error. Target (issue 9): the predicted
cached / online ratio within 25% of the measured one.
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

from evl_cache.plan import PlanInputs, lines, make_plan  # noqa: E402

TARGET = 0.25


def measure(args: argparse.Namespace, out: Path) -> dict:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_train.py"), "--json", str(out), "--batch", str(args.batch),
           "--videos", str(args.videos), "--steps", str(args.steps), "--online-steps", str(args.online_steps),
           "--workers", *map(str, args.workers), "--formats", "prefix fp16", "--device", "cpu"]
    print("$ " + " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return json.loads(out.read_text())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--videos", type=int, default=12)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--online-steps", type=int, default=4)
    ap.add_argument("--workers", type=int, nargs="+", default=[0])
    ap.add_argument("--cores", type=int, default=2, help="cores told to plan (the ratio does not depend on it on CPU)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_train import VIT_W192

    with tempfile.TemporaryDirectory(prefix="bench_plan_") as tmp:
        measured = measure(args, Path(tmp) / "train.json")
        arch = Path(tmp) / "vit_w192.json"
        arch.write_text(json.dumps(VIT_W192))
        disk = measured["readers"]["plain file reads of the shard files"]["mb_per_s"] / 1e3
        plan = make_plan(PlanInputs(arch=str(arch), frames=8, views=1, videos=args.videos, gpu="cpu", disk_gbps=disk,
                                    cpu_cores=args.cores, batch=args.batch, steps=args.steps, classes=2))
    print("\n".join(lines(plan)).replace(str(arch), "width-192 ViT-12 @224"))

    wall, cpu = measured["median_wall_s"], measured["median_cpu_s"]
    a_keys = [k for k in wall if k.startswith("w") and k[1:].isdigit()]
    a_wall = min(wall[k] for k in a_keys)
    a_cpu = cpu["w0"] if "w0" in cpu else cpu[min(a_keys, key=wall.get)]
    online = plan.row("online").step.seconds
    rows = [("cached fp16 / online", plan.row("fp16").step.seconds / online, a_wall / wall["online"], a_cpu / cpu["online"])]
    if "fmt:prefix fp16" in wall:
        rows.append(("cached prefix fp16 / online", plan.row("prefix fp16").step.seconds / online,
                     wall["fmt:prefix fp16"] / wall["online"], cpu["fmt:prefix fp16"] / cpu["online"]))
    table = ["", "| step-time ratio | predicted | measured (wall) | error | measured (CPU) | error | target |",
             "|---|---|---|---|---|---|---|"]
    result = {"load_average_end": os.getloadavg(), "measured": measured, "predicted_step_s": {r.name: r.step.seconds for r in plan.rows},
              "ratios": {}}
    for name, pred, mw, mc in rows:
        ew, ec = pred / mw - 1, pred / mc - 1
        table.append(f"| {name} | {pred:.3f} | {mw:.3f} | {ew:+.1%} | {mc:.3f} | {ec:+.1%} | within {TARGET:.0%} |")
        result["ratios"][name] = {"predicted": pred, "measured_wall": mw, "measured_cpu": mc, "error_wall": ew, "error_cpu": ec}
    steps = ["", f"| per step, batch {args.batch} | predicted core-s ({args.cores} cores x s) | measured CPU s (1 thread) "
                 "| measured wall s |", "|---|---|---|---|"]
    for name, key in (("cached fp16", a_keys[0]), ("prefix fp16", "fmt:prefix fp16"), ("online", "online")):
        if key in wall:
            steps.append(f"| {name} | {args.cores * plan.row(name if name != 'cached fp16' else 'fp16').step.seconds:.3f} | "
                         f"{cpu[key]:.3f} | {wall[key]:.3f} |")
    print("\n".join(table + steps))
    print(f"\non CPU the predicted ratio does not depend on the core count; load average at the end "
          f"{os.getloadavg()[0]:.1f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
