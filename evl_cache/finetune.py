"""Fine-tuning: start a decoder from another run's checkpoint (`train.init_from`).

The paper's Table 12 (UCF-101, HMDB-51) fine-tunes the Kinetics-400 decoder: every weight carries
over except the classification head, whose class count differs, and the pretrained weights train
with a 10x smaller learning rate (docs/reference.md). Here every tensor whose name and shape match
is taken; the rest keep the fresh seeded initialisation and form the "new" parameter group.
A head of the same class count is still fresh when the checkpoint's class names differ from the run's:
its rows score other classes (e.g. 7 source classes fine-tuned to 7 others), so loading them would map
each new class onto an unrelated old one.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, is_dataclass, replace
from pathlib import Path
from typing import Any

import torch

from evl_cache.errors import UserError


@dataclass
class InitReport:
    """What `load_matching` took from a checkpoint and what stayed freshly initialised."""

    source: str
    taken: list[str] = field(default_factory=list)  # names copied from the checkpoint
    fresh: list[tuple[str, str]] = field(default_factory=list)  # (name, why it was not taken)
    unused: list[str] = field(default_factory=list)  # checkpoint tensors this decoder has no place for
    values: int = 0  # numbers copied

    def lines(self) -> list[str]:
        total = len(self.taken) + len(self.fresh)
        out = [f"init_from {self.source}: took {len(self.taken)} of {total} tensors ({self.values:,} values)"]
        if self.fresh:
            out.append("  fresh (initialised here): " + ", ".join(f"{n} ({why})" for n, why in self.fresh))
        if self.unused:
            out.append("  unused from the checkpoint: " + ", ".join(self.unused))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "taken": self.taken, "fresh": [list(f) for f in self.fresh],
                "unused": self.unused, "values": self.values}


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of an evl-cache decoder checkpoint (format and sha256 checked; never unpickles)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from evl_cache.checkpoints import _sha256, checkpoint_paths, read_checkpoint_config

    weights, config = checkpoint_paths(path)
    doc = read_checkpoint_config(config)
    if not weights.is_file():
        raise UserError(f"train.init_from: checkpoint weights {weights} not found (config {config} exists); "
                        f"copy both files together")
    sha = doc.get("weights_sha256")
    if sha and _sha256(weights) != sha:
        raise UserError(f"train.init_from: checkpoint weights {weights} do not match the sha256 recorded in {config}; "
                        f"restore the matching pair")
    try:
        return load_file(str(weights), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"train.init_from: checkpoint weights {weights} are unreadable ({err}); restore the file") from err


def checkpoint_class_names(path: str | os.PathLike) -> list[str] | None:
    """The class names a checkpoint was trained on (its ``meta.class_names``), None when it does not say."""
    from evl_cache.checkpoints import read_checkpoint_config

    names = (read_checkpoint_config(path).get("meta") or {}).get("class_names")
    return [str(n) for n in names] if isinstance(names, list) else None


def class_tensors(model: torch.nn.Module, cfg: Any) -> set[str]:
    """Names of ``model``'s tensors whose shape follows the class count (the classifier), found by
    building the same head for one class more on the meta device (no memory, no text tower run) and
    comparing shapes, so every registered head is covered without naming its layers."""
    from evl_cache.heads import build_head

    if not is_dataclass(cfg) or not hasattr(cfg, "num_classes"):
        return set()
    n = int(cfg.num_classes)
    other: dict[str, Any] = {"num_classes": n + 1}
    if len(getattr(cfg, "class_names", None) or []) == n:  # a text-initialised head lists its classes
        other["class_names"] = [*cfg.class_names, "_"]
    with torch.random.fork_rng(devices=[]), torch.device("meta"):  # draws nothing from the run's RNG stream
        bigger = build_head(replace(cfg, **other), fresh=False).state_dict()
    return {name for name, t in model.state_dict().items() if name in bigger and tuple(bigger[name].shape) != tuple(t.shape)}


def load_matching(model: torch.nn.Module, path: str | os.PathLike, class_names: list[str] | None = None,
                  head: set[str] | None = None) -> InitReport:
    """Copy into ``model`` every checkpoint tensor whose name and shape match; refuse when none does.

    With ``class_names`` (the run's) and ``head`` (`class_tensors`): when the checkpoint was trained on other
    classes, the ``head`` tensors stay fresh even where their shapes match."""
    state = read_weights(path)
    own = model.state_dict()
    report = InitReport(str(path))
    theirs_names = checkpoint_class_names(path) if class_names is not None and head else None
    other_classes = theirs_names is not None and theirs_names != list(class_names or [])
    take: dict[str, torch.Tensor] = {}
    for name, mine in own.items():
        theirs = state.get(name)
        if theirs is None:
            report.fresh.append((name, "not in the checkpoint"))
        elif other_classes and name in (head or set()):
            report.fresh.append((name, "classifier of other classes"))
        elif tuple(theirs.shape) != tuple(mine.shape):
            report.fresh.append((name, f"checkpoint {tuple(theirs.shape)}, here {tuple(mine.shape)}"))
        else:
            take[name] = theirs
            report.taken.append(name)
            report.values += theirs.numel()
    report.unused = [n for n in state if n not in own]
    if not take:
        raise UserError(f"train.init_from {path}: no tensor matches this decoder by name and shape (width, layers or "
                        f"frames differ); fine-tune from a checkpoint of the same backbone and decoder shape")
    model.load_state_dict(take, strict=False)
    return report


def param_groups(model: torch.nn.Module, report: InitReport, lr: float, weight_decay: float,
                 lr_mult: float, wd_mult: float) -> list[dict[str, Any]]:
    """AdamW groups: the fresh parameters at (lr, weight_decay), the loaded ones scaled by the
    multipliers; each group keeps the model's parameter order, and an empty group is left out."""
    taken = set(report.taken)
    new = [p for n, p in model.named_parameters() if n not in taken]
    old = [p for n, p in model.named_parameters() if n in taken]
    groups = [{"params": new, "lr": lr, "weight_decay": weight_decay, "group": "new"},
              {"params": old, "lr": lr * lr_mult, "weight_decay": weight_decay * wd_mult, "group": "pretrained"}]
    return [g for g in groups if g["params"]]


def write_report(out: Path, report: InitReport) -> None:
    """``init_from.json`` in the run directory: which tensors came from where."""
    (out / "init_from.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
