"""Sweep training (N configurations on one read of each batch) and fine-tuning (`train.init_from`).

A sweep member must be indistinguishable from training it alone: same loss sequence, weights,
validation metrics and checkpoints, including after an interrupted sweep is resumed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from evl_cache.config import RunConfig
from evl_cache.errors import UserError
from evl_cache.sweep import members
from evl_cache.train import STATE_FILE, train, train_sweep
from evl_cache.video import ViewSet
from test_train import build_store, open_state, stores, tiny_cfg  # noqa: F401 - `stores` is a fixture

# Three members that differ in what a solo run would draw and compute: dropout (the RNG stream),
# which modules exist, the optimizer and the log/eval/checkpoint cadence.
SPEC = [
    {"name": "base"},
    {"name": "no_tca", "model": {"temporal_cross_attention": False, "mlp_dropout": 0.2}},
    {"name": "fast", "train": {"lr": 3e-3, "label_smoothing": 0.1, "log_every": 2, "eval_every": 2,
                               "checkpoint_every": 2, "weight_decay": 0.0}},
]


def base_cfg(stores) -> RunConfig:
    cfg = tiny_cfg(stores)  # 6 steps x batch 4, dropout 0.5, validation every 3 steps
    cfg.data.val_store = stores["val"]
    return cfg


def records(run: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock field (samples/s is timing, not a result)."""
    out = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        rec.pop("samples_per_s", None)
        out.append(rec)
    return out


def same_weights(a: Path, b: Path) -> bool:
    x, y = open_state(a), open_state(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def assert_same_run(a: Path, b: Path, cut: bool = False) -> None:
    """``b`` is ``a``'s run again; ``cut``: interrupted and resumed, so it also holds the cut's checkpoint."""
    assert records(a) == records(b)  # exact floats: losses, lr, validation metrics, batch digests
    assert same_weights(a / "model.safetensors", b / "model.safetensors")
    cks = sorted(p.name for p in (a / "checkpoints").iterdir())
    theirs = sorted(p.name for p in (b / "checkpoints").iterdir())
    assert set(cks) <= set(theirs) if cut else cks == theirs
    for name in cks:
        if name.endswith(".safetensors"):
            assert same_weights(a / "checkpoints" / name, b / "checkpoints" / name), name


@pytest.fixture(scope="module")
def full_sweep(stores, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "full"
    summaries = train_sweep(members(SPEC, base_cfg(stores), "test"), out, progress=False)
    return out, summaries


def test_each_member_equals_training_it_alone(stores, full_sweep, tmp_path):
    out, summaries = full_sweep
    assert [Path(s.out_dir).name for s in summaries] == ["base", "no_tca", "fast"]
    for m in members(SPEC, base_cfg(stores), "test"):
        solo = train(m.cfg, tmp_path / m.name, progress=False)
        assert_same_run(out / m.name, tmp_path / m.name)
        s = summaries[[Path(x.out_dir).name for x in summaries].index(m.name)]
        assert (s.final_loss, s.val_top1, s.steps) == (solo.final_loss, solo.val_top1, solo.steps)
    # the members really differ (else equality above would prove little)
    assert records(out / "base") != records(out / "no_tca")
    assert json.loads((out / "sweep.json").read_text())["members"] == ["base", "no_tca", "fast"]
    # each member directory is a run directory eval works on unchanged
    from evl_cache.evaluate import evaluate

    m = evaluate(str(out / "fast" / "model"), stores["val"], out_dir=str(tmp_path / "ev"))
    assert m["videos"] == 4


def test_resumed_sweep_equals_uninterrupted(stores, full_sweep, tmp_path):
    out, _ = full_sweep
    ms = members(SPEC, base_cfg(stores), "test")
    cut = tmp_path / "cut"
    train_sweep(ms, cut, until_step=3, progress=False)
    with pytest.raises(UserError, match="--resume"):
        train_sweep(ms, cut, progress=False)
    # one member lost its state (interrupted before its checkpoint): it restarts at 0, the others at 3
    (cut / "no_tca" / STATE_FILE).unlink()
    summaries = train_sweep(ms, cut, resume=True, progress=False)
    assert [s.start_step for s in summaries] == [3, 0, 3]
    for m in ms:
        assert_same_run(out / m.name, cut / m.name, cut=True)
    with pytest.raises(UserError, match="nothing to resume"):
        train_sweep(ms, tmp_path / "empty", resume=True, progress=False)


def test_incompatible_sweeps_are_refused(stores, tmp_path):
    base = base_cfg(stores)
    for key, value in (("batch_size", 8), ("seed", 1), ("steps", 7), ("grad_accum", 2)):
        with pytest.raises(UserError, match=f"sweep member 'b' has train.{key}={value} but 'a' has"):
            members([{"name": "a"}, {"name": "b", "train": {key: value}}], base, "s.yaml")
    with pytest.raises(UserError, match="appears twice"):
        members([{"name": "a"}, {"name": "a"}], base, "s.yaml")
    with pytest.raises(UserError, match="overrides only model: and train:"):
        members([{"name": "a", "data": {"num_workers": 1}}], base, "s.yaml")
    with pytest.raises(UserError, match="name usable as a directory"):
        members([{"name": "../x"}], base, "s.yaml")
    with pytest.raises(UserError, match="unknown key"):
        members({"a": {"model": {"temporal_conv": True, "tconv": 1}}}, base, "s.yaml")
    # the command line: one line, exit code 2, nothing written
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("sweep:\n  - name: a\n  - name: b\n    train: {batch_size: 2}\n")
    proc = subprocess.run([sys.executable, "-m", "evl_cache.cli", "train", "--train-store", stores["train"],
                           "--out", str(tmp_path / "x"), "--sweep", str(sweep)], capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "train.batch_size=2 but 'a' has 256" in lines[0], proc.stderr
    assert not (tmp_path / "x").exists()


def test_cli_sweep_section_in_the_config(stores, tmp_path):
    from typer.testing import CliRunner

    from evl_cache.cli import app

    cfg = tmp_path / "recipe.yaml"
    cfg.write_text("train: {steps: 2, batch_size: 4, log_every: 1}\n"
                   "sweep:\n  tpos: {model: {temporal_pos: true}}\n  no_tpos: {model: {temporal_pos: false}}\n")
    res = CliRunner().invoke(app, ["train", "--config", str(cfg), "--train-store", stores["train"], "--workers", "0",
                                   "--out", str(tmp_path / "run"), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "[tpos]" in res.output and "[no_tpos]" in res.output and "trained steps 0..2" in res.output
    for name in ("tpos", "no_tpos"):
        assert (tmp_path / "run" / name / "model.json").is_file()
    doc = json.loads((tmp_path / "run" / "no_tpos" / "model.json").read_text())
    assert doc["decoder"]["temporal_pos"] is False


# ------------------------------------------------------------------------------------ init_from


def three_class_store(stores, root: Path) -> str:
    labels = [0, 1, 2, 0, 1, 2]
    return build_store(root / "three.zarr", stores["paths"][:6], labels, ViewSet("train", count=1, temporal=1, spatial=1),
                       class_names=("a", "b", "c"))


def source_checkpoint(stores, path: Path, class_names: list[str] | None = None, **model) -> Path:
    """A 2-class decoder checkpoint of the fixture stores' shape (seed 7, so it differs from a seed-0 init),
    recording ``class_names`` as the classes it was trained on when given."""
    from evl_cache.checkpoints import save_checkpoint
    from evl_cache.config import decoder_config_for_store, load_config
    from evl_cache.decoder import EVLDecoder
    from evl_cache.store import open_store

    cfg = load_config(None)
    for k, v in model.items():
        setattr(cfg.model, k, v)
    torch.manual_seed(7)
    dcfg = decoder_config_for_store(cfg.model, open_store(stores["train"]).attrs, "s")
    save_checkpoint(path, EVLDecoder(dcfg), meta={"class_names": class_names} if class_names else None)
    return path


def test_init_from_takes_matching_weights_and_gives_a_fresh_head(stores, tmp_path):
    from evl_cache.config import decoder_config_for_store
    from evl_cache.distributed import Dist
    from evl_cache.store import open_store
    from evl_cache.train import build_parts

    src = source_checkpoint(stores, tmp_path / "src")
    three = three_class_store(stores, tmp_path)
    cfg = tiny_cfg(stores, steps=2, init_from=str(src), pretrained_lr_mult=0.1, pretrained_wd_mult=0.5)
    cfg.data.train_store = three
    dcfg = decoder_config_for_store(cfg.model, open_store(three).attrs, three)
    parts = build_parts(dcfg, cfg.train, torch.device("cpu"), "off", Dist())
    source = open_state(tmp_path / "src.safetensors")
    mine = parts.model.state_dict()
    assert sorted(parts.init.taken) == sorted(k for k in mine if not k.startswith("head.fc."))
    assert all(torch.equal(mine[k], source[k]) for k in parts.init.taken)
    assert [n for n, _ in parts.init.fresh] == ["head.fc.weight", "head.fc.bias"]
    # the fresh head is the one a run from scratch draws (loading draws no random numbers)
    scratch = build_parts(dcfg, tiny_cfg(stores, steps=2).train, torch.device("cpu"), "off", Dist()).model.state_dict()
    assert torch.equal(mine["head.fc.weight"], scratch["head.fc.weight"])
    groups = {g["group"]: g for g in parts.opt.param_groups}
    assert (groups["new"]["lr"], groups["new"]["weight_decay"]) == (1e-3, 0.05)
    assert groups["pretrained"]["lr"] == pytest.approx(1e-4) and groups["pretrained"]["weight_decay"] == pytest.approx(0.025)
    assert len(groups["new"]["params"]) == 2
    # a checkpoint without the temporal conv: those tensors stay fresh, and it says so
    src2 = source_checkpoint(stores, tmp_path / "src2", temporal_conv=False)
    lines: list[str] = []
    cfg2 = tiny_cfg(stores, steps=1, init_from=str(src2))
    train(cfg2, tmp_path / "run2", progress=False, echo=lines.append)
    took = [x for x in lines if x.startswith("init_from")]
    assert len(took) == 1 and "took" in took[0]
    fresh = next(x for x in lines if "fresh (initialised here)" in x)
    assert "layers.0.tconv.weight (not in the checkpoint)" in fresh
    report = json.loads((tmp_path / "run2" / "init_from.json").read_text())
    assert "layers.1.tconv.bias" in [n for n, _ in report["fresh"]] and "head.fc.weight" in report["taken"]


def test_same_class_count_but_other_classes_gives_a_fresh_head(stores, tmp_path):
    """Fine-tuning 2 classes to 2 others (the synthetic transfer recipe: 7 to 7): the head's shapes match,
    but its rows score the checkpoint's classes, so it must be fresh; with the same classes it is taken."""
    from evl_cache.config import decoder_config_for_store
    from evl_cache.distributed import Dist
    from evl_cache.store import open_store
    from evl_cache.train import build_parts

    attrs = open_store(stores["train"]).attrs
    assert list(attrs["class_names"]) == ["left", "right"]
    cfg = tiny_cfg(stores, steps=2)
    dcfg = decoder_config_for_store(cfg.model, attrs, stores["train"])
    scratch = build_parts(dcfg, cfg.train, torch.device("cpu"), "off", Dist()).model.state_dict()
    for names, head_taken in ((["up", "down"], False), (["left", "right"], True), (["right", "left"], False)):
        src = source_checkpoint(stores, tmp_path / f"src_{names[0]}", class_names=names)
        t = tiny_cfg(stores, steps=2, init_from=str(src)).train
        parts = build_parts(dcfg, t, torch.device("cpu"), "off", Dist(), class_names=list(attrs["class_names"]))
        mine, source = parts.model.state_dict(), open_state(Path(str(src) + ".safetensors"))
        head = ["head.fc.weight", "head.fc.bias"]
        if head_taken:
            assert not parts.init.fresh and all(torch.equal(mine[k], source[k]) for k in head)
        else:
            assert parts.init.fresh == [(k, "classifier of other classes") for k in head]
            assert all(torch.equal(mine[k], scratch[k]) for k in head)  # the head a run from scratch draws
            assert sorted(parts.init.taken) == sorted(k for k in mine if k not in head)
        # train() passes the store's class names: the same outcome end to end
    run = tmp_path / "run"
    train(tiny_cfg(stores, steps=1, init_from=str(tmp_path / "src_up")), run, progress=False)
    report = json.loads((run / "init_from.json").read_text())
    assert [n for n, _ in report["fresh"]] == ["head.fc.weight", "head.fc.bias"]


def test_class_tensors_finds_each_heads_classifier(stores):
    """The class-count-dependent tensors, found without naming layers: EVL's head.fc, the linear probe's fc."""
    from evl_cache.config import load_config
    from evl_cache.finetune import class_tensors
    from evl_cache.heads import build_head, head_config_for_store
    from evl_cache.store import open_store

    attrs = open_store(stores["train"]).attrs
    found = {}
    for head in ("evl", "linear", "attentive_probe"):
        m = load_config(None).model
        m.head = head
        try:
            hcfg = head_config_for_store(m, attrs, stores["train"])
        except UserError:
            continue  # this fixture store lacks what the head reads (e.g. emb)
        found[head] = class_tensors(build_head(hcfg), hcfg)
    assert found["evl"] == {"head.fc.weight", "head.fc.bias"}
    assert all(v and all("weight" in n or "bias" in n for n in v) for v in found.values()), found


def test_pretrained_lr_mult_scales_the_loaded_weights_only(stores, tmp_path):
    src = source_checkpoint(stores, tmp_path / "src")
    three = three_class_store(stores, tmp_path)
    cfg = tiny_cfg(stores, steps=3, init_from=str(src), pretrained_lr_mult=0.0)
    cfg.data.train_store = three
    train(cfg, tmp_path / "cut", until_step=1, progress=False)
    train(cfg, tmp_path / "cut", resume=True, progress=False)  # the parameter groups resume too
    source, after = open_state(tmp_path / "src.safetensors"), open_state(tmp_path / "cut" / "model.safetensors")
    frozen = [k for k in after if not k.startswith("head.fc.")]
    assert frozen and all(torch.equal(after[k], source[k]) for k in frozen)  # lr x 0: untouched
    first = open_state(tmp_path / "cut" / "checkpoints" / "step_0000001.safetensors")
    assert not torch.equal(after["head.fc.weight"], first["head.fc.weight"])  # the new head trains at 1.0
    with pytest.raises(UserError, match="pretrained_lr_mult=0.1 scales the weights loaded by train.init_from"):
        tiny_cfg(stores, pretrained_lr_mult=0.1)
    with pytest.raises(UserError, match="no tensor matches"):
        other = tmp_path / "wide"
        from evl_cache.checkpoints import save_checkpoint
        from evl_cache.decoder import DecoderConfig, EVLDecoder

        save_checkpoint(other, EVLDecoder(DecoderConfig(num_layers=1, width=32, heads=2, frames=4, grid=(4, 4),
                                                        num_classes=5, temporal_cross_attention=False)))
        train(tiny_cfg(stores, steps=1, init_from=str(other)), tmp_path / "w", progress=False)
