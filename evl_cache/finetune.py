"""Fine-tuning: start a decoder from another run's checkpoint (`train.init_from`).

The paper's Table 12 (UCF-101, HMDB-51) fine-tunes the Kinetics-400 decoder: every weight carries
over except the classification head, whose class count differs, and the pretrained weights train
with a 10x smaller learning rate (docs/reference.md). Here every tensor whose name and shape match
is taken; the rest keep the fresh seeded initialisation and form the "new" parameter group.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
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


def load_matching(model: torch.nn.Module, path: str | os.PathLike) -> InitReport:
    """Copy into ``model`` every checkpoint tensor whose name and shape match; refuse when none does."""
    state = read_weights(path)
    own = model.state_dict()
    report = InitReport(str(path))
    take: dict[str, torch.Tensor] = {}
    for name, mine in own.items():
        theirs = state.get(name)
        if theirs is None:
            report.fresh.append((name, "not in the checkpoint"))
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
