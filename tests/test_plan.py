"""`evl-cache plan`: bytes from the schema, the step-time arithmetic on hand-computed cases, which
bound it names (GPU, disk, decode), and one-line errors for bad input."""

from __future__ import annotations

import json
import sys

import pytest

from evl_cache.cli import main
from evl_cache.errors import UserError
from evl_cache.plan import DEVICES, FORMATS, HOST, PlanInputs, bytes_per_clip_view, make_plan

B16 = dict(arch="B/16", frames=8, views=1, videos=1000, batch=256, steps=10, classes=400)


def test_bytes_per_clip_view_come_from_the_schema():
    # B/16 8f, K=4, fp16: feats 4*8*197*768*2 + maps 4*2*7*196*196*2 = 13,985,536 bytes (13.99 MB)
    assert 4 * 8 * 197 * 768 * 2 + 4 * 2 * 7 * 196 * 196 * 2 == 13_985_536
    assert bytes_per_clip_view("B/16", 8, 4, "float16", "float16", "full") == 13_985_536
    assert bytes_per_clip_view("ViT-B-16", 8, 4, "float16", "float16", "prefix") == 8 * 197 * 768 * 2
    plan = make_plan(PlanInputs(**B16))
    assert plan.row("fp16").bytes_per_clip_view == 13_985_536
    assert plan.row("fp16").cache_bytes == 1000 * 13_985_536
    assert plan.row("int8 + uint8 maps").bytes_per_clip_view <= 0.52 * 13_985_536
    assert plan.row("prefix fp8").bytes_per_clip_view <= 0.10 * 13_985_536
    assert [r.name for r in plan.rows] == [f[0] for f in FORMATS] + ["online"]


def test_step_times_by_hand_and_the_bound_named():
    inp = PlanInputs(**B16, gpu="h100", gpus=1, disk_gbps=2.0, cpu_cores=32)
    plan = make_plan(inp)
    g = plan.gmacs
    assert g["backbone"] == pytest.approx(140.50, abs=0.01) and g["tail"] == pytest.approx(46.53, abs=0.01)
    h100 = 989.4e12
    forward = 256 * 2 * 140.50e9 / (h100 * 0.45)  # 0.1616 s
    train = 256 * 2 * 3 * g["decoder_forward"] * 1e9 / (h100 * 0.30)
    decode = 256 / (37.15 / 2 * 32)  # 0.4307 s
    online = plan.row("online").step
    assert online.parts["GPU"] == pytest.approx(forward + train, rel=1e-3)
    assert online.parts["decode"] == pytest.approx(decode, rel=1e-6)
    assert online.bound == "decode" and online.seconds == pytest.approx(0.4307, abs=1e-3)
    fp16 = plan.row("fp16").step  # 256 x 13.99 MB at 2 GB/s
    assert fp16.bound == "disk" and fp16.seconds == pytest.approx(256 * 13_985_536 / 2e9)
    assert plan.row("fp16").epoch_s == pytest.approx(4 * fp16.seconds)  # ceil(1000 / 256) steps
    assert plan.row("fp16").recipe_s == pytest.approx(10 * fp16.seconds)
    # extraction of the fp16 store: 1000 clip-views; GPU 1000 x 140.5 GMAC, decode 1000 / (18.575 x 32), write 14 GB / 2 GB/s
    ext = plan.row("fp16").extraction
    assert ext.bound == "disk" and ext.seconds == pytest.approx(1000 * 13_985_536 / 2e9)

    # a fast disk and many cores: both paths become GPU-bound, the cached step is the decoder alone
    fast = make_plan(PlanInputs(**B16, gpu="h100", disk_gbps=100.0, cpu_cores=512))
    assert fast.row("online").step.bound == "GPU" and fast.row("fp16").step.bound == "GPU"
    assert fast.row("fp16").step.seconds == pytest.approx(train, rel=1e-3)
    assert fast.row("prefix fp16").step.seconds == pytest.approx(train + 256 * 2 * 46.53e9 / (h100 * 0.45), rel=1e-3)
    # equal times (GPU-bound): the fewest bytes wins; a slow disk: the smallest cache; one step: no cache pays off
    assert fast.recommendation.startswith("int8 + top16 uint8 maps: ") and "bound by GPU" in fast.recommendation
    assert plan.recommendation.startswith("prefix fp8: ") and "bound by disk" in plan.recommendation
    assert make_plan(PlanInputs(**{**B16, "steps": 1})).recommendation.startswith("online: ")
    # two GPUs halve the GPU part; A100 is 312 TFLOPS
    assert make_plan(PlanInputs(**B16, gpu="h100", gpus=2, disk_gbps=100.0, cpu_cores=512)).row("online").step.seconds \
        == pytest.approx(fast.row("online").step.seconds / 2)
    a100 = make_plan(PlanInputs(**B16, gpu="a100", disk_gbps=100.0, cpu_cores=512)).row("online").step.seconds
    assert a100 == pytest.approx(fast.row("online").step.seconds * 989.4 / 312)


def test_cpu_device_adds_compute_and_decode():
    plan = make_plan(PlanInputs(**B16, gpu="cpu", cpu_cores=2, disk_gbps=100.0))
    cpu = DEVICES["cpu"]
    g = plan.gmacs
    online = plan.row("online").step
    expected = 256 * (g["backbone"] / cpu.forward_gmacs_per_core + 3 * g["decoder_forward"] / cpu.train_gmacs_per_core) / 2 \
        + 256 / (HOST.decode_clip_views_per_s_per_core * 2)
    assert online.bound == "CPU (compute + decode)" and online.seconds == pytest.approx(expected)
    assert plan.recommendation  # whatever wins, a sentence names it


def run_plan(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["evl-cache", "plan", *args])
    try:
        main()
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_prints_assumptions_and_json(monkeypatch, capsys):
    code, out, _ = run_plan(monkeypatch, capsys, "--arch", "B/16", "--videos", "1000", "--steps", "10")
    assert code == 0 and "assumptions:" in out and "989.4 TFLOPS" in out and "recommendation:" in out
    assert "| fp16 | 13,985,536 |" in out and "| online |" in out
    code, out, _ = run_plan(monkeypatch, capsys, "--json", "--gpu", "cpu", "--cpu-cores", "2")
    data = json.loads(out)
    assert code == 0 and data["inputs"]["gpu"] == "cpu" and len(data["rows"]) == len(FORMATS) + 1


@pytest.mark.parametrize("args, needle", [
    (("--gpu", "tpu"), "unknown --gpu 'tpu'"),
    (("--arch", "ViT-X"), "unknown architecture 'ViT-X'"),
    (("--videos", "0"), "--videos must be >= 1"),
    (("--disk-gbps", "0"), "--disk-gbps must be > 0"),
    (("--frames", "1"), "--frames must be >= 2"),
    (("--decoder-layers", "13"), "cannot feed 13 decoder layers"),
])
def test_cli_bad_input_is_one_line_and_exit_2(monkeypatch, capsys, args, needle):
    code, out, err = run_plan(monkeypatch, capsys, *args)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and needle in lines[0] and out == "", (args, err)
    with pytest.raises(UserError):
        make_plan(PlanInputs(gpu="tpu"))
