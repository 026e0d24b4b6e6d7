"""The training recipe as dataclasses: YAML in and out, dotted overrides from the command line.

Defaults are the EVL Kinetics-400 recipe (docs/reference.md, "Training"). The decoder's shape (K
layers, width, heads, frames, grid, classes, attention input) is not chosen here: it comes from the
cache store the model trains on. The ``model`` section may restate those values, and a store that
disagrees with a restated value is refused (see `decoder_config_for_store`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from evl_cache.errors import UserError
from evl_cache.store import comparable_attr

AMP_MODES = ("auto", "bf16", "fp16", "off")
HEADS = ("evl", "xclip", "attentive_probe", "linear")  # evl_cache.heads registers one spec for each
# Sections of a recipe YAML that belong to other stages (e.g. `extract` for `evl-cache extract`).
OTHER_SECTIONS = {"extract", "eval", "pipeline", "name", "description"}
# The section listing the decoder configurations `evl-cache train` trains in one pass (evl_cache/sweep.py).
SWEEP_SECTION = "sweep"


@dataclass
class ModelConfig:
    """Decoder options. ``None`` shape fields are taken from the store; set ones must match it."""

    num_layers: int | None = None
    width: int | None = None
    heads: int | None = None
    frames: int | None = None
    grid: list[int] | None = None
    num_classes: int | None = None
    attention_input: str | None = None
    mlp_ratio: float = 4.0
    mlp_dropout: float = 0.5
    head_dropout: float = 0.5
    temporal_conv: bool = True
    temporal_pos: bool = True
    temporal_cross_attention: bool = True
    # Table 6 (evl head): the cached block each decoder layer reads (indices into the store's blocks;
    # default: the last num_layers of them, so num_layers below the store's K is 6a) and feature pooling
    # ("none" | "temporal" | "spatial", 6c). See docs/decoder.md, "Table 6 options".
    layer_blocks: list[int] | None = None
    pool: str = "none"
    # Which head trains (docs/heads.md): evl (default, None) | xclip | attentive_probe | linear.
    # The options below belong to one head each; None keeps that head's default (and old runs resumable).
    head: str | None = None
    mit_layers: int | None = None  # xclip: MIT blocks (X-CLIP's default 1)
    prompt_layers: int | None = None  # xclip: prompt-generator layers (X-CLIP's default 2)
    prompt_alpha: float | None = None  # xclip: initial prompt scale alpha (X-CLIP's default 0.1)
    text_templates: str | None = None  # xclip / linear (text init): template set name or file (xclip's default "xclip")
    text_weights: str | None = None  # xclip / linear (text init): CLIP weights for the text tower (default: the store's)
    linear_norm: bool | None = None  # linear: L2-normalise frame and video embeddings (default true)
    # linear: "default" (PyTorch's init) or "text": start from CLIP's zero-shot classifier (logit scale x unit
    # class text embeddings, bias 0), with model.text_templates (default clip-kinetics700) and model.text_weights
    linear_init: str | None = None
    # xclip / linear (text init): a file naming each class for the text tower, one per line in label order
    # (for folder names such as "ApplyEyeMakeup" or "static_circle"); default: the store's class names
    class_prompts: str | None = None


@dataclass
class TrainConfig:
    """Optimisation. ``batch_size`` is the global batch per optimizer step (split into
    ``grad_accum`` micro-batches); ``lr`` follows a per-step cosine to ``min_lr`` after warmup."""

    steps: int = 50_000
    batch_size: int = 256
    lr: float = 4e-4
    min_lr: float = 0.0
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_steps: int = 0
    label_smoothing: float = 0.0
    grad_accum: int = 1
    amp: str = "auto"
    seed: int = 0
    device: str = "auto"
    checkpoint_every: int = 1000
    eval_every: int = 1000
    log_every: int = 10
    eval_batch_size: int = 64
    # Fine-tuning: start from every decoder weight of this checkpoint whose name and shape match
    # (a head of another class count stays freshly initialised); the loaded weights train with the
    # learning rate and weight decay scaled by these multipliers, the fresh ones at 1.0.
    init_from: str | None = None
    pretrained_lr_mult: float = 1.0
    pretrained_wd_mult: float = 1.0


# TrainConfig keys added after runs were first recorded: a resume state without them holds their default.
LATER_TRAIN_KEYS = {"init_from": None, "pretrained_lr_mult": 1.0, "pretrained_wd_mult": 1.0}
# The same for ModelConfig (Table 6 options): a saved config without them trained at these values.
LATER_MODEL_KEYS = {"layer_blocks": None, "pool": "none", "linear_init": None, "class_prompts": None}
# And for DataConfig (few-shot): recipes' ledgers compare run configs without them at these values.
LATER_DATA_KEYS = {"few_shot": 0, "few_shot_seed": 0, "few_shot_allow_short": False}


@dataclass
class DataConfig:
    """Where the cached tensors come from and how they are streamed."""

    train_store: str | None = None
    val_store: str | None = None
    num_workers: int = 4
    prefetch_factor: int = 2
    pin_memory: bool = True
    allow_partial: bool = False  # use a store whose extraction has pending videos (see completeness.py)
    train_views: int = 0  # train on the first N cached views of each video only (0: all): a V-view cache from a larger one
    # Few-shot (evl_cache/fewshot.py): train on K done videos per class drawn with few_shot_seed (0: every video);
    # a class with fewer than K is refused unless few_shot_allow_short (then all of its videos are used).
    few_shot: int = 0
    few_shot_seed: int = 0
    few_shot_allow_short: bool = False


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "config") -> "RunConfig":
        if not isinstance(d, dict):
            raise UserError(f"{where} must be a mapping with sections model/train/data")
        unknown = sorted(set(d) - {"model", "train", "data", SWEEP_SECTION} - OTHER_SECTIONS)
        if unknown:
            raise UserError(f"{where}: unknown section(s) {unknown}; training reads model, train and data "
                            f"(a recipe may also hold {sorted(OTHER_SECTIONS | {SWEEP_SECTION})})")
        return cls(
            model=_section(ModelConfig, d.get("model"), f"{where}: model"),
            train=_section(TrainConfig, d.get("train"), f"{where}: train"),
            data=_section(DataConfig, d.get("data"), f"{where}: data"),
        ).validated(where)

    def validated(self, where: str = "config") -> "RunConfig":
        t = self.train
        problems = []
        if t.steps < 1:
            problems.append(f"train.steps={t.steps} must be >= 1")
        if t.batch_size < 1 or t.grad_accum < 1 or t.batch_size % t.grad_accum:
            problems.append(f"train.batch_size={t.batch_size} must be a positive multiple of train.grad_accum={t.grad_accum}")
        if t.amp not in AMP_MODES:
            problems.append(f"train.amp={t.amp!r} must be one of {AMP_MODES}")
        if not 0 <= t.label_smoothing < 1:
            problems.append(f"train.label_smoothing={t.label_smoothing} must be in [0, 1)")
        if t.warmup_steps < 0 or (t.warmup_steps > 0 and t.warmup_steps >= t.steps):
            problems.append(f"train.warmup_steps={t.warmup_steps} must be in [0, steps)")
        if len(t.betas) != 2:
            problems.append(f"train.betas={t.betas} must be two numbers")
        for name in ("checkpoint_every", "eval_every", "log_every", "eval_batch_size"):
            if getattr(t, name) < 1:
                problems.append(f"train.{name} must be >= 1")
        for name in ("pretrained_lr_mult", "pretrained_wd_mult"):
            mult = getattr(t, name)
            if mult < 0:
                problems.append(f"train.{name}={mult} must be >= 0")
            elif mult != 1.0 and not t.init_from:
                problems.append(f"train.{name}={mult} scales the weights loaded by train.init_from, which is not set; "
                                f"set train.init_from (--init-from) or drop train.{name}")
        if self.model.head is not None and self.model.head not in HEADS:
            problems.append(f"model.head={self.model.head!r} must be one of {HEADS}")
        if self.data.num_workers < 0:
            problems.append("data.num_workers must be >= 0")
        if self.data.few_shot < 0:
            problems.append(f"data.few_shot={self.data.few_shot} must be >= 0 (0: train on every video)")
        elif not self.data.few_shot and (self.data.few_shot_seed or self.data.few_shot_allow_short):
            problems.append("data.few_shot_seed and data.few_shot_allow_short apply to a few-shot run; set data.few_shot "
                            "(--few-shot K) or drop them")
        if problems:
            raise UserError(f"bad {where}: " + "; ".join(problems))
        return self


def _section(cls: type, d: Any, where: str) -> Any:
    d = {} if d is None else d
    if not isinstance(d, dict):
        raise UserError(f"{where} must be a mapping, got {type(d).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise UserError(f"{where}: unknown key(s) {unknown}; known keys: {sorted(known)}")
    return cls(**{k: _coerce(v, known[k], f"{where}.{k}") for k, v in d.items()})


def _coerce(value: Any, f: dataclasses.Field, where: str) -> Any:
    """Light type checking so that `steps: ten` fails here with a clear line, not deep in training."""
    kind = str(f.type)
    if value is None:
        if "None" in kind:
            return None
        raise UserError(f"{where} may not be null")
    try:
        if kind.startswith("int"):
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if kind.startswith("float"):
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if kind.startswith("bool"):
            if not isinstance(value, bool):
                raise ValueError
            return value
        if kind.startswith("str"):
            if not isinstance(value, str):
                raise ValueError
            return value
        if kind.startswith("list"):
            if not isinstance(value, (list, tuple)):
                raise ValueError
            return [float(v) if "float" in kind else int(v) for v in value]
    except (TypeError, ValueError):
        raise UserError(f"{where}={value!r} has the wrong type (expected {kind})") from None
    return value


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A recipe YAML as a dict, or one clear line saying why it cannot be used."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file {p} not found; pass an existing YAML (see configs/)")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"config file {p} is not valid YAML ({err.__class__.__name__}); fix the file") from err
    if not isinstance(data, dict):
        raise UserError(f"config file {p} must hold a mapping of sections (extract/model/train/data)")
    return data


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a recipe YAML (or the defaults when ``path`` is None) and apply ``a.b=value`` overrides."""
    data: dict[str, Any] = {}
    where = "defaults"
    if path is not None:
        where = str(path)
        data = read_yaml(path)
    for item in overrides or []:
        apply_override(data, item)
    return RunConfig.from_dict(data, where)


def apply_override(data: dict[str, Any], item: str) -> None:
    """``train.lr=1e-3`` -> data["train"]["lr"] = 1e-3 (value parsed as YAML)."""
    key, sep, raw = item.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) != 2 or not all(parts):
        raise UserError(f"bad override '{item}'; use section.key=value, e.g. train.lr=1e-3")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        raise UserError(f"bad override value in '{item}'; give a YAML scalar or list") from None
    section = data.setdefault(parts[0], {})
    if not isinstance(section, dict):
        raise UserError(f"bad override '{item}': {parts[0]} is not a section")
    section[parts[1]] = value


def save_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


# -------------------------------------------------------------------- the decoder from the store


def decoder_config_for_store(model: ModelConfig, attrs: dict[str, Any], where: str):
    """The config of the head ``model.head`` (default the EVL decoder's `DecoderConfig`) a store
    implies, after checking that the store holds the tensors the head reads and every value the
    config restates; refused in one line before any batch is read (evl_cache.heads)."""
    from evl_cache.heads import head_config_for_store

    return head_config_for_store(model, attrs, where)


def check_restated(model: ModelConfig, implied: dict[str, Any], where: str) -> None:
    """Refuse a ``model.*`` shape value that disagrees with what the store implies."""
    for key, value in implied.items():
        stated = getattr(model, key, None)
        if stated is not None and (list(stated) if key == "grid" else stated) != value:
            raise UserError(
                f"store {where} has {key}={value} but the config says model.{key}={stated}; "
                f"remove model.{key} from the config or use a store extracted for it"
            )
    if implied.get("num_classes", 1) < 1:
        raise UserError(f"store {where} lists no class names; extract it from a labelled manifest")


def evl_decoder_config(model: ModelConfig, attrs: dict[str, Any], where: str):
    """The EVL `DecoderConfig` a store implies (the store's block features are checked by the caller)."""
    from evl_cache.decoder import DecoderConfig

    implied = {
        "cached_blocks": len(attrs["blocks"]),
        "width": int(attrs["width"]),
        "heads": int(attrs["heads"]),
        "frames": int(attrs["frames"]),
        "grid": [int(g) for g in attrs["grid"]],
        "num_classes": len(attrs["class_names"]),
        "attention_input": attrs["attention"],
    }
    check_restated(model, implied, where)
    if model.temporal_cross_attention and implied["attention_input"] == "none":
        raise UserError(
            f"store {where} has attention 'none' but temporal cross attention is on; "
            f"set model.temporal_cross_attention=false or extract with --attention maps"
        )
    # shape from the store, every other option (dropouts, module switches, ...) from the model section
    from evl_cache.heads import HEAD_OPTIONS

    skip = set(implied) | set(HEAD_OPTIONS) | {"head", "num_layers"}
    options = {f.name: getattr(model, f.name) for f in fields(model) if f.name not in skip}
    # depth: as stated, else one layer per listed block, else one per cached block (the reference)
    K = implied["cached_blocks"]
    layers = model.num_layers if model.num_layers is not None else (len(model.layer_blocks) if model.layer_blocks else K)
    if model.layer_blocks is None and layers > K:
        raise UserError(f"store {where} holds {K} blocks but model.num_layers={layers}; lower it, list the block each "
                        f"layer reads in model.layer_blocks, or extract more blocks (--decoder-layers)")

    try:
        return DecoderConfig(num_layers=layers, **implied, **options)
    except UserError as err:
        raise UserError(f"store {where}: {err}") from None


# Attributes a validation/eval store must share with the training store (views may differ).
PAIR_KEYS = ("backbone", "blocks", "frames", "tokens", "width", "grid", "attention", "sampling")


def backbone_difference(mine: Any, theirs: Any, keys: list[str] | None = None) -> tuple[str, Any, Any] | None:
    """The first backbone field two records disagree on, as (field, mine, theirs), or None.

    Compared as `comparable_attr` does (the weights path is not compared). ``precision`` is the
    resolved fp32/fp16/bf16 the features were computed in; a record without it (written before it
    was recorded) is unknown there and not refused. ``keys`` limits the comparison (a checkpoint that
    records only part of the backbone).
    """
    a, b = comparable_attr("backbone", mine), comparable_attr("backbone", theirs)
    if not isinstance(a, dict) or not isinstance(b, dict):
        return None if a == b else ("", a, b)
    names = list(keys) if keys is not None else list(a) + [k for k in b if k not in a]
    for name in names:
        if name == "weights":
            continue
        if name == "precision" and (a.get(name) is None or b.get(name) is None):
            continue
        if a.get(name) != b.get(name):
            return name, a.get(name), b.get(name)
    return None


def check_store_pair(train_attrs: dict[str, Any], other: dict[str, Any], where: str, what: str = "train store") -> None:
    """Refuse an eval/val store that was not extracted like the training store, naming the difference."""
    for key in PAIR_KEYS:
        if key == "backbone":
            diff = backbone_difference(train_attrs.get(key), other.get(key))
            if diff is not None:
                name, a, b = diff
                fix = ("extract both stores with the same --precision (features of different precision differ)"
                       if name == "precision" else "extract the store with the same backbone (arch, weights, quick_gelu)")
                field_name = f"backbone.{name}" if name else "backbone"
                raise UserError(f"store {where} has {field_name}={b!r} but the {what} has {field_name}={a!r}; {fix}")
            continue
        a, b = comparable_attr(key, train_attrs.get(key)), comparable_attr(key, other.get(key))
        if a != b:
            raise UserError(
                f"store {where} has {key}={b!r} but the {what} has {key}={a!r}; "
                f"extract the store with the same backbone/blocks/frames/attention/sampling"
            )
    if list(train_attrs["class_names"]) != list(other["class_names"]):
        n, m = len(other["class_names"]), len(train_attrs["class_names"])
        detail = f"{n} classes vs {m}" if n != m else "the same number of classes in a different order/naming"
        raise UserError(f"store {where} has different class names than the {what} ({detail}); "
                        f"extract it with the same label set")
