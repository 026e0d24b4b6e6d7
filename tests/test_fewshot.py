"""Few-shot training subsets (data.few_shot, evl_cache/fewshot.py) and the text-initialised linear head
(model.linear_init=text): the draw's determinism and refusals, full batches from a subset smaller than
the batch, training on the subset while validation and eval read every video, and a linear head whose
step-0 scores are `evl-cache zeroshot`'s on the tiny text-capable CLIP of the zero-shot tests."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.utils.data import BatchSampler

import media
from evl_cache.config import RunConfig
from evl_cache.data import EpochSampler, make_loader
from evl_cache.errors import UserError
from evl_cache.fewshot import draw
from evl_cache.store import open_store
from evl_cache.train import train
from test_zeroshot_cli import LOGIT_SCALE, TINY_CLIP, build, hand_scores, make_weights, run_cli


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("fewshot")
    videos, labels = [], []
    for i in range(6):  # 3 videos of each class
        frames = media.moving_square_frames(12, seed=40 + i)
        if i % 2:
            frames = np.ascontiguousarray(frames[:, :, ::-1])
        videos.append(str(media.write_video(root / f"v{i}.mp4", frames)))
        labels.append(i % 2)
    weights = make_weights(root / "clip.safetensors")
    full = build(root / "full.zarr", videos, labels, weights, [1, 2], emb=True)  # every head's tensors
    classes = root / "classes.txt"
    classes.write_text("left\nright\n")  # the store's class names, in its order
    return {"root": root, "videos": videos, "labels": labels, "weights": weights, "full": full, "classes": classes}


def run_cfg(store: str, steps: int = 4, batch: int = 4, lr: float = 3e-3, model: dict | None = None,
            **data) -> RunConfig:
    return RunConfig.from_dict({
        "model": model or {"head": "linear"},
        "train": {"steps": steps, "batch_size": batch, "lr": lr, "weight_decay": 0.0, "checkpoint_every": steps,
                  "eval_every": steps, "log_every": 1, "eval_batch_size": 4},
        "data": {"train_store": store, "num_workers": 0, **data},
    })


# ------------------------------------------------------------------------------------ the draw


def test_draw_is_seeded_per_class_and_nested_in_k():
    done = np.array([0, 2, 3, 5, 6, 7, 9, 10, 11, 12, 14, 15])  # store indices; 1, 4, 8, 13 not done
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2])
    names = ["a", "b", "c"]
    two = draw(done, labels, names, 2, seed=7, allow_short=False, where="S")
    assert draw(done, labels, names, 2, seed=7, allow_short=False, where="S").per_class == two.per_class  # deterministic
    assert {n: len(v) for n, v in two.per_class.items()} == {"a": 2, "b": 2, "c": 2}
    for c, name in enumerate(names):
        assert set(two.per_class[name]) <= set(done[labels == c].tolist())  # only done videos of that class
    assert two.videos.tolist() == sorted(v for idx in two.per_class.values() for v in idx)
    four = draw(done, labels, names, 4, seed=7, allow_short=False, where="S")
    assert all(set(two.per_class[n]) <= set(four.per_class[n]) for n in names)  # K=2 inside K=4
    seeds = {tuple(draw(done, labels, names, 2, seed=s, allow_short=False, where="S").videos) for s in range(8)}
    assert len(seeds) > 1  # the seed matters
    # one class's draw does not depend on another's videos
    fewer = labels != 2
    assert draw(done[fewer], labels[fewer], names[:2], 2, 7, False, "S").per_class == {n: two.per_class[n] for n in "ab"}


def test_a_class_short_of_k_is_refused_in_one_line_unless_allowed():
    done = np.arange(7)
    labels = np.array([0, 0, 0, 1, 1, 2, 2])
    with pytest.raises(UserError) as err:
        draw(done, labels, ["a", "b", "c"], 3, 0, allow_short=False, where="train.zarr")
    msg = str(err.value)
    assert "\n" not in msg
    assert "class 'b' has 2 done videos in store train.zarr, fewer than 3 (and 1 more class)" in msg
    assert "--few-shot-allow-short" in msg
    fs = draw(done, labels, ["a", "b", "c"], 3, 0, allow_short=True, where="train.zarr")
    assert fs.short == {"b": 2, "c": 2} and len(fs.videos) == 7


def test_config_refuses_a_seed_without_k():
    with pytest.raises(UserError, match="few_shot_seed .* apply to a few-shot run"):
        RunConfig.from_dict({"data": {"few_shot_seed": 3}})
    with pytest.raises(UserError, match="data.few_shot=-1 must be >= 0"):
        RunConfig.from_dict({"data": {"few_shot": -1}})


# ------------------------------------------------------------------------------------ full batches from a small subset


def test_a_subset_smaller_than_the_batch_still_gives_full_batches_cycling_epochs():
    subset = np.array([3, 8, 11])
    sampler = EpochSampler(subset, num_views=2, seed=5)
    batches = BatchSampler(sampler, 8, drop_last=True)
    it = iter(batches)
    stream = [next(it) for _ in range(6)]
    assert all(len(b) == 8 for b in stream)
    items = np.concatenate(stream)
    videos, views = np.divmod(items, 2)
    for e in range(len(items) // 3):  # every run of 3 is one epoch: each subset video exactly once
        assert sorted(videos[3 * e:3 * e + 3].tolist()) == subset.tolist()
    assert set(views.tolist()) == {0, 1}
    # the data-parallel split of that stream: rank r's blocks of the same global batches
    from itertools import islice

    ranks = [list(islice(iter(EpochSampler(subset, 2, seed=5, rank=r, world_size=2, block=4)), 24)) for r in (0, 1)]
    got = [it for g in range(6) for r in (0, 1) for it in [ranks[r][i] for i in range(4 * g, 4 * g + 4)]]
    assert got == items.tolist()


def test_loader_restricted_to_the_subset_reads_only_its_videos(env):
    loader = make_loader(env["full"], 8, train=True, seed=0, videos=np.array([1, 4]))
    it = iter(loader)
    for _ in range(3):
        batch = next(it)
        assert batch["video"].shape == (8,) and set(batch["video"].tolist()) == {1, 4}
        assert batch["emb"].shape[0] == 8


# ------------------------------------------------------------------------------------ training on a subset


def test_few_shot_training_writes_its_draw_and_validates_on_every_video(env, tmp_path):
    from evl_cache.evaluate import evaluate

    out = tmp_path / "run"
    cfg = run_cfg(env["full"], steps=3, batch=8, few_shot=2, few_shot_seed=1)
    cfg.data.val_store = env["full"]
    summary = train(cfg, out, progress=False)
    doc = json.loads((out / "few_shot.json").read_text())
    assert doc["k"] == 2 and doc["seed"] == 1 and doc["videos"] == 4
    want = draw(np.arange(6), np.array(env["labels"]), ["left", "right"], 2, 1, False, "S").per_class
    assert doc["per_class"] == want and doc["available"] == {"left": 3, "right": 3}
    assert doc["paths"]["left"] == [open_store(env["full"]).paths()[i] for i in want["left"]]
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in recs if "loss" in r] == [2.0, 4.0, 6.0]  # 8 clip-views a step over 4 videos
    assert any("val_top1" in r for r in recs)
    meta = json.loads((out / "model.json").read_text())
    assert meta["meta"]["trained"]["few_shot"] == {"k": 2, "seed": 1, "videos": 4}
    assert evaluate(summary.checkpoint, env["full"])["videos"] == 6  # eval reads the whole store


def test_resume_with_another_draw_is_refused(env, tmp_path):
    out = tmp_path / "run"
    train(run_cfg(env["full"], steps=4, few_shot=1, few_shot_seed=0), out, progress=False, until_step=2)
    seeds = [s for s in range(1, 20) if draw(np.arange(6), np.array(env["labels"]), ["left", "right"], 1, s, False, "S")
             .videos.tolist() != draw(np.arange(6), np.array(env["labels"]), ["left", "right"], 1, 0, False, "S").videos.tolist()]
    with pytest.raises(UserError, match="cannot resume .* videos the run trains on"):
        train(run_cfg(env["full"], steps=4, few_shot=1, few_shot_seed=seeds[0]), out, progress=False, resume=True)
    train(run_cfg(env["full"], steps=4, few_shot=1, few_shot_seed=0), out, progress=False, resume=True)


def test_cli_few_shot_flags(env, tmp_path, monkeypatch, capsys):
    base = ["train", "--train-store", env["full"], "--steps", "1", "--batch", "4", "--workers", "0", "--no-progress",
            "--set", "model.head=linear"]
    code, _, err = run_cli(monkeypatch, capsys, *base, "--out", str(tmp_path / "a"), "--few-shot", "4")
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and "class 'left' has 3 done videos" in lines[0] and "fewer than 4" in lines[0]
    assert not (tmp_path / "a").exists()
    code, _, err = run_cli(monkeypatch, capsys, *base, "--out", str(tmp_path / "b"), "--few-shot-seed", "2")
    assert code == 2 and "data.few_shot" in err
    code, out, err = run_cli(monkeypatch, capsys, *base, "--out", str(tmp_path / "c"), "--few-shot", "4",
                             "--few-shot-seed", "2", "--few-shot-allow-short")
    assert code == 0, err
    assert "few-shot: 6 videos, 4 per class (seed 2); 2 class(es) with fewer (allowed)" in out
    assert json.loads((tmp_path / "c" / "few_shot.json").read_text())["short"] == {"left": 3, "right": 3}


# ------------------------------------------------------------------------------------ text-initialised linear head


def test_text_initialised_linear_head_is_the_zero_shot_classifier_at_step_0(env, tmp_path, monkeypatch):
    """Its logits on every stored view equal the zero-shot logits, s * cos(video, class text), computed
    here with the zero-shot module's pieces; no step has run."""
    from evl_cache.config import ModelConfig
    from evl_cache.heads import build_head, head_config_for_store
    from evl_cache.text import class_text_embeddings
    from evl_cache.zeroshot import DEFAULT_TEMPLATES, read_embeddings, spec_like_store, video_embeddings
    from evl_cache.templates import resolve_templates

    monkeypatch.setenv("EVL_CACHE_TEXT_CACHE", str(tmp_path / "text"))
    store = open_store(env["full"])
    cfg = head_config_for_store(ModelConfig(head="linear", linear_init="text"), store.attrs, env["full"])
    assert cfg.init == "text" and cfg.template_set == DEFAULT_TEMPLATES and cfg.class_names == ["left", "right"]
    torch.manual_seed(0)
    model = build_head(cfg)
    emb = read_embeddings(store, np.arange(6))  # (6, V, T, E) float16
    got = model({"emb": emb.flatten(0, 1)}).view(6, 2, 2)
    spec = spec_like_store(store.attrs, env["full"], precision="fp32")
    text = class_text_embeddings(spec, ["left", "right"], resolve_templates(DEFAULT_TEMPLATES)[1])
    want = text.logit_scale * video_embeddings(emb) @ text.emb.T
    assert text.logit_scale == pytest.approx(LOGIT_SCALE, rel=1e-5)
    assert float(want.abs().max()) > 1  # not a degenerate comparison
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not model.fc.bias.any()
    # the text tower's build did not move the run's RNG stream
    torch.manual_seed(0)
    build_head(head_config_for_store(ModelConfig(head="linear"), store.attrs, env["full"]))
    after_default = torch.rand(1)
    torch.manual_seed(0)
    build_head(cfg)
    assert torch.equal(torch.rand(1), after_default)


def test_step_0_scores_through_the_cli_equal_evl_cache_zeroshot(env, tmp_path, monkeypatch, capsys):
    """`train` (one step at lr 0: the initial weights), then `eval`, against `zeroshot` on the same store
    and against the scores computed from the equations with open_clip's own CLIP."""
    monkeypatch.setenv("EVL_CACHE_TEXT_CACHE", str(tmp_path / "text"))
    run = tmp_path / "run"
    code, _, err = run_cli(monkeypatch, capsys, "train", "--train-store", env["full"], "--out", str(run), "--steps", "1",
                           "--batch", "4", "--lr", "0", "--workers", "0", "--no-progress", "--set", "model.head=linear",
                           "--set", "model.linear_init=text", "--set", "model.text_templates=photo")
    assert code == 0, err
    code, _, err = run_cli(monkeypatch, capsys, "eval", "--checkpoint", str(run / "model"), "--store", env["full"],
                           "--out", str(tmp_path / "ev"), "--device", "cpu")
    assert code == 0, err
    code, _, err = run_cli(monkeypatch, capsys, "zeroshot", "--store", env["full"], "--classes", str(env["classes"]),
                           "--templates", "photo", "--out", str(tmp_path / "zs"), "--device", "cpu")
    assert code == 0, err
    with np.load(tmp_path / "ev" / "scores.npz") as a, np.load(tmp_path / "zs" / "scores.npz") as b:
        linear, zeroshot = a["scores"], b["scores"]
    assert linear.shape == (6, 2) and float(np.abs(linear - 0.5).max()) > 1e-3  # not a flat answer
    np.testing.assert_allclose(linear, zeroshot, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(linear, hand_scores(env, env["full"], ["left", "right"], ["a photo of a {}."]),
                               rtol=1e-4, atol=1e-6)
    doc = json.loads((run / "model.json").read_text())["decoder"]
    assert doc["init"] == "text" and doc["templates"] == ["a photo of a {}."] and doc["text"]["weights_id"]


def test_text_init_refusals(env, tmp_path, monkeypatch):
    monkeypatch.setenv("EVL_CACHE_TEXT_CACHE", str(tmp_path / "text"))
    cases = [
        ({"head": "linear", "text_templates": "photo"}, "model.text_templates applies to the linear head only with model.linear_init=text"),
        ({"head": "linear", "linear_init": "text", "linear_norm": False}, "reads the normalised video embedding"),
        ({"head": "linear", "linear_init": "zeros"}, r"model.linear_init='zeros' must be one of"),
        ({"head": "xclip", "linear_init": "text"}, "model.linear_init applies to the linear head, not model.head=xclip"),
        ({"head": "linear", "linear_init": "text", "text_weights": str(tmp_path / "none.pt")}, r"model.text_weights: .* not found"),
    ]
    for model, needle in cases:
        with pytest.raises(UserError) as err:
            train(run_cfg(env["full"], model=model), tmp_path / "r", progress=False)
        assert needle in str(err.value) or __import__("re").search(needle, str(err.value)), str(err.value)
        assert "\n" not in str(err.value)
    image_only = make_weights(tmp_path / "image_only.safetensors", text=False)
    visual = build(tmp_path / "vis.zarr", [env["videos"][0], env["videos"][1]], [0, 1], image_only, [], emb=True,
                   attention="none")
    with pytest.raises(UserError, match="no text tower"):
        train(run_cfg(visual, model={"head": "linear", "linear_init": "text"}), tmp_path / "r", progress=False)
    assert not (tmp_path / "r").exists()


def test_class_prompts_rename_the_classes_for_the_text_heads(env, tmp_path, monkeypatch):
    """model.class_prompts: the linear head starts from the prompts' text embeddings (not the store's names),
    X-CLIP's text side encodes them too; the checkpoint's class names stay the store's."""
    from evl_cache.config import ModelConfig
    from evl_cache.heads import build_head, head_config_for_store
    from evl_cache.text import class_text_embeddings
    from evl_cache.templates import resolve_templates
    from evl_cache.zeroshot import DEFAULT_TEMPLATES, spec_like_store

    monkeypatch.setenv("EVL_CACHE_TEXT_CACHE", str(tmp_path / "text"))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# label order\nsquare going left\nsquare going right\n")
    store = open_store(env["full"])
    cfg = head_config_for_store(ModelConfig(head="linear", linear_init="text", class_prompts=str(prompts)),
                                store.attrs, env["full"])
    assert cfg.class_names == ["square going left", "square going right"]
    model = build_head(cfg)
    spec = spec_like_store(store.attrs, env["full"], precision="fp32")
    templates = resolve_templates(DEFAULT_TEMPLATES)[1]
    want = class_text_embeddings(spec, cfg.class_names, templates)
    plain = class_text_embeddings(spec, ["left", "right"], templates)
    torch.testing.assert_close(model.fc.weight, want.logit_scale * torch.nn.functional.normalize(want.emb, dim=-1))
    assert not torch.allclose(want.emb, plain.emb, atol=1e-3)  # the prompts made a difference
    xcfg = head_config_for_store(ModelConfig(head="xclip", class_prompts=str(prompts)), store.attrs, env["full"])
    assert xcfg.class_names == ["square going left", "square going right"]
    run = tmp_path / "run"
    train(run_cfg(env["full"], steps=1, model={"head": "linear", "linear_init": "text", "class_prompts": str(prompts)}),
          run, progress=False)
    doc = json.loads((run / "model.json").read_text())
    assert doc["decoder"]["class_names"] == ["square going left", "square going right"]
    assert doc["meta"]["class_names"] == ["left", "right"]


def test_class_prompts_refusals(env, tmp_path, monkeypatch):
    monkeypatch.setenv("EVL_CACHE_TEXT_CACHE", str(tmp_path / "text"))
    three = tmp_path / "three.txt"
    three.write_text("a\nb\nc\n")
    cases = [
        ({"head": "linear", "linear_init": "text", "class_prompts": str(three)},
         "model.class_prompts: .*three.txt has 3 names but store .* has 2 classes"),
        ({"head": "linear", "linear_init": "text", "class_prompts": str(tmp_path / "none.txt")},
         "model.class_prompts: class file .*none.txt not found"),
        ({"head": "linear", "class_prompts": str(three)}, "model.class_prompts applies to the linear head only with"),
        ({"class_prompts": str(three)}, "model.class_prompts applies to"),
    ]
    for model, needle in cases:
        with pytest.raises(UserError, match=needle) as err:
            train(run_cfg(env["full"], model=model), tmp_path / "r", progress=False)
        assert "\n" not in str(err.value)
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------------------------ the recipe (pipelines/fewshot.py)


def _recipe(tmp_path, heads: str | None = None) -> str:
    import yaml

    p = tmp_path / "recipe.yaml"
    fewshot = {"templates": "photo", **({"heads": heads.split(",")} if heads else {})}
    p.write_text(yaml.safe_dump({
        "model": {"num_layers": 2},
        "train": {"batch_size": 4, "lr": 1.0e-3, "weight_decay": 0.0, "seed": 0, "log_every": 1, "eval_batch_size": 4},
        "data": {"num_workers": 0},
        "pipeline": {"fewshot": fewshot},
    }))
    return str(p)


def _fewshot_main(*args: str) -> int:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pipelines"))
    import fewshot as recipe

    return recipe.main(["--no-progress", "--threads", "1", *args])


def test_recipe_smoke_on_a_given_store_pair(env, tmp_path, capsys):
    """--smoke on given stores: every head at K = 1 and 2 plus zero-shot, a table, a plot; a rerun skips everything."""
    args = ("--smoke", "--config", _recipe(tmp_path), "--train-store", env["full"], "--val-store", env["full"],
            "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out"))
    assert _fewshot_main(*args) == 0
    out = tmp_path / "out"
    md = (out / "table.md").read_text()
    assert "SMOKE RUN" in md and "K = 0 (zero-shot)" in md and (out / "top1_vs_k.png").stat().st_size > 5_000
    data = json.loads((out / "table.json").read_text())
    assert data["shots"] == [1, 2] and not data["unavailable"]
    assert [(r["head"], r["k"]) for r in data["rows"]] == [(h, k) for h in ("xclip", "linear_text", "evl") for k in (1, 2)]
    for r in data["rows"]:
        assert r["videos"] == 2 * r["k"] and r["eval_videos"] == 6 and 0 <= r["top1"] <= 1
        assert f"| {r['label']} |" in md
    # every head at one K trained on the same draw; K = 1's videos are inside K = 2's
    draws = {(h, k): json.loads((tmp_path / "work" / "runs" / f"{h}_k{k}" / "few_shot.json").read_text())["per_class"]
             for h in ("xclip", "linear_text", "evl") for k in (1, 2)}
    for k in (1, 2):
        assert draws[("xclip", k)] == draws[("linear_text", k)] == draws[("evl", k)]
    assert all(set(draws[("evl", 1)][c]) <= set(draws[("evl", 2)][c]) for c in ("left", "right"))
    # K = 0 is `evl-cache zeroshot` with the linear head's templates
    zs = json.loads((tmp_path / "work" / "eval" / "zeroshot" / "metrics.json").read_text())
    assert data["zeroshot"]["top1"] == zs["top1"] and zs["zeroshot"]["templates"] == "photo"
    capsys.readouterr()
    assert _fewshot_main(*args) == 0
    again = capsys.readouterr().out
    assert again.count("[skip]") == 2 * 6 + 1 and "[done]" not in again


def test_recipe_reports_text_heads_as_not_run_without_a_text_tower(env, tmp_path):
    image_only = make_weights(tmp_path / "image_only.safetensors", text=False)
    store = build(tmp_path / "vis.zarr", env["videos"], env["labels"], image_only, [], emb=True, attention="none")
    args = ("--smoke", "--config", _recipe(tmp_path, "linear_text,linear"), "--train-store", store, "--val-store", store,
            "--shots", "1", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out"))
    assert _fewshot_main(*args) == 0
    data = json.loads((tmp_path / "out" / "table.json").read_text())
    assert "no text tower" in data["unavailable"]["linear_text"] and data["zeroshot"] is None
    assert [(r["head"], r["k"]) for r in data["rows"]] == [("linear", 1)]
    assert "not run (no text tower)" in (tmp_path / "out" / "table.md").read_text()


def test_recipe_refuses_a_k_beyond_the_store_in_one_line(env, tmp_path):
    from evl_cache.errors import UserError

    with pytest.raises(UserError, match=r"data.few_shot=4: class 'left' has 3 done videos") as err:
        _fewshot_main("--config", _recipe(tmp_path), "--train-store", env["full"], "--val-store", env["full"],
                      "--shots", "2,4", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out"))
    assert "\n" not in str(err.value) and not (tmp_path / "work" / "runs").exists()
    with pytest.raises(UserError, match="--heads: unknown head"):
        _fewshot_main("--config", _recipe(tmp_path), "--heads", "mlp", "--train-store", env["full"], "--val-store",
                      env["full"], "--work", str(tmp_path / "work"))


def test_recipe_prompts_with_class_prompts_and_per_head_model_keys(env, tmp_path):
    """pipeline.fewshot.class_prompts renames the classes for the text heads and zero-shot (by position);
    pipeline.fewshot.model sets a head's model keys (here X-CLIP's templates)."""
    import yaml

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("square going left\nsquare going right\n")
    recipe = yaml.safe_load(open(_recipe(tmp_path, "xclip,linear_text")))
    recipe["pipeline"]["fewshot"].update(class_prompts=str(prompts), model={"xclip": {"text_templates": "photo"}})
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    args = ("--smoke", "--config", str(tmp_path / "recipe.yaml"), "--train-store", env["full"], "--val-store", env["full"],
            "--shots", "1", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out"))
    assert _fewshot_main(*args) == 0
    for head in ("xclip", "linear_text"):
        doc = json.loads((tmp_path / "work" / "runs" / f"{head}_k1" / "model.json").read_text())
        assert doc["decoder"]["class_names"] == ["square going left", "square going right"], head
    xclip = json.loads((tmp_path / "work" / "runs" / "xclip_k1" / "model.json").read_text())
    assert xclip["decoder"]["templates"] == ["a photo of a {}."]
    assert (tmp_path / "work" / "classes.txt").read_text().splitlines() == ["square going left", "square going right"]
    with np.load(tmp_path / "work" / "eval" / "zeroshot" / "scores.npz") as z:
        assert list(z["class_names"]) == ["square going left", "square going right"]


def test_top1_by_kind_scores_each_kind_over_all_classes_and_within_its_own(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pipelines"))
    import fewshot as recipe

    kinds = ["motion", "motion", "appearance", "appearance"]
    scores = np.array([[0.6, 0.1, 0.2, 0.1],   # motion 0: right
                       [0.1, 0.2, 0.6, 0.1],   # motion 1: wrong overall (an appearance class), right within motion
                       [0.1, 0.1, 0.7, 0.1],   # appearance 2: right
                       [0.5, 0.1, 0.3, 0.1]],  # appearance 3: wrong overall and within
                      dtype=np.float32)
    from evl_cache.evaluate import write_scores

    write_scores(tmp_path / "scores.npz", {}, scores, np.arange(4), np.array([0, 1, 2, 3]),
                 [f"v{i}.mp4" for i in range(4)], ["m0", "m1", "a0", "a1"])
    got = recipe.top1_by_kind(tmp_path, kinds)
    assert got["motion"] == {"top1": 0.5, "top1_within": 1.0, "classes": 2, "videos": 2}
    assert got["appearance"] == {"top1": 0.5, "top1_within": 0.5, "classes": 2, "videos": 2}
    assert recipe.synthetic_kinds(["moving_left", "static_circle"]) == ["motion", "appearance"]
    assert recipe.synthetic_kinds(["left", "right"]) is None


def test_demo_text_config_names_the_tiny_clip_and_plain_class_names():
    """`make demo-text`'s recipe: the committed tiny CLIP, K = 1..8, synthetic class names, files that exist."""
    import argparse
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "pipelines"))
    import fewshot as recipe
    from common import load_recipe
    from demo import recipe_backbone

    cfg = load_recipe(root / "configs" / "synthetic_text_demo.yaml")
    args = argparse.Namespace(smoke=False, shots=None, heads=None, seed=None, epochs=None, allow_short=False)
    plan = recipe.make_plan(cfg, args)
    assert plan.shots == [1, 2, 4, 8] and [h.name for h in plan.heads] == ["xclip", "linear_text", "evl"]
    assert plan.class_prompts == "synthetic"
    assert (root / plan.templates).is_file() and (root / plan.head_model["xclip"]["text_templates"]).is_file()
    arch, weights, _ = recipe_backbone(cfg)
    assert Path(weights) == root / "evl_cache" / "assets" / "tiny_clip" / "weights.safetensors" and Path(arch).is_file()
    names = recipe.class_prompts_file(plan, ["moving_left", "static_circle"], Path(__import__("tempfile").mkdtemp()))
    assert names.read_text().splitlines() == ["moving left", "circle"]
