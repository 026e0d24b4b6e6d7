"""Sweeps: N decoder configurations trained in one pass over the cache (`evl-cache train --sweep`).

A sweep is a list of named members, each a set of overrides of the run config's ``model:`` and
``train:`` keys::

    sweep:
      - name: none
        model: {temporal_conv: false, temporal_pos: false, temporal_cross_attention: false}
      - name: all
        train: {lr: 5.0e-4}

(or a mapping ``name: {model: ..., train: ...}``). Every member reads the same batches, so what
decides the sample stream (the store, batch size, seed, steps, micro-batching, device) must be the
same for all of them; a member that changes it is refused. Everything else (decoder switches,
dropout, optimizer, schedule shape, logging and checkpoint cadence, init_from) is per member.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evl_cache.config import SWEEP_SECTION, RunConfig, read_yaml
from evl_cache.errors import UserError

# train keys that decide which clips form each batch (or where it is computed): shared by all members.
SHARED_TRAIN_KEYS = ("batch_size", "seed", "steps", "grad_accum", "device")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+=-]*$")


@dataclass
class Member:
    """One configuration of a sweep: its name (= its run directory under OUT) and resolved config."""

    name: str
    cfg: RunConfig
    overrides: dict[str, dict[str, Any]]


def sweep_spec(config: str | Path | None, sweep: str | Path | None) -> tuple[Any, str] | None:
    """The raw sweep list and where it came from: ``--sweep FILE`` (its ``sweep:`` section), else the
    run config's ``sweep:`` section, else None (a single run)."""
    if sweep is not None:
        data = read_yaml(sweep)
        if SWEEP_SECTION not in data:
            raise UserError(f"sweep file {sweep} has no '{SWEEP_SECTION}:' section; list the configurations under "
                            f"'{SWEEP_SECTION}:' (see docs/recipes.md, sweeps)")
        other = sorted(set(data) - {SWEEP_SECTION, "name", "description"})
        if other:
            raise UserError(f"sweep file {sweep} also holds {other}; it lists only the configurations, put the shared "
                            f"settings in --config (or move the '{SWEEP_SECTION}:' section into the --config file)")
        return data[SWEEP_SECTION], str(sweep)
    if config is not None:
        data = read_yaml(config)
        if SWEEP_SECTION in data:
            return data[SWEEP_SECTION], str(config)
    return None


def members(spec: Any, base: RunConfig, where: str) -> list[Member]:
    """Resolve each member's overrides on top of ``base`` and check they can share one sample stream."""
    entries = _entries(spec, where)
    out: list[Member] = []
    for name, overrides in entries:
        d = base.to_dict()
        for section, values in overrides.items():
            d[section].update(values)
        cfg = RunConfig.from_dict(d, where=f"{where}: sweep member {name!r}")
        out.append(Member(name, cfg, overrides))
    check_shared_stream(out, where)
    return out


def _entries(spec: Any, where: str) -> list[tuple[str, dict[str, dict[str, Any]]]]:
    if isinstance(spec, dict):
        spec = [{"name": k, **(v or {})} if isinstance(v, dict) or v is None else {"name": k, "_bad": v}
                for k, v in spec.items()]
    if not isinstance(spec, list) or not spec:
        raise UserError(f"{where}: '{SWEEP_SECTION}' must be a non-empty list of {{name, model, train}} entries")
    seen: set[str] = set()
    entries = []
    for i, item in enumerate(spec):
        if not isinstance(item, dict) or "_bad" in item:
            raise UserError(f"{where}: sweep entry {i + 1} must be a mapping with name, model and/or train")
        name = str(item.get("name", ""))
        if not NAME.match(name) or name in (".", ".."):
            raise UserError(f"{where}: sweep entry {i + 1} needs a name usable as a directory "
                            f"(letters, digits, _ . + = -), got {item.get('name')!r}")
        if name in seen:
            raise UserError(f"{where}: sweep member name {name!r} appears twice; names are run directories, make them unique")
        seen.add(name)
        extra = sorted(set(item) - {"name", "model", "train"})
        if extra:
            raise UserError(f"{where}: sweep member {name!r} sets {extra}; a member overrides only model: and train: "
                            f"keys (the data: section is shared by the whole sweep)")
        overrides = {}
        for section in ("model", "train"):
            values = item.get(section) or {}
            if not isinstance(values, dict):
                raise UserError(f"{where}: sweep member {name!r}: {section} must be a mapping of keys to values")
            overrides[section] = dict(values)
        entries.append((name, overrides))
    return entries


def check_shared_stream(ms: list[Member], where: str) -> None:
    """Refuse members that would need another sample stream than the first member's."""
    first = ms[0]
    for m in ms[1:]:
        for key in SHARED_TRAIN_KEYS:
            a, b = getattr(first.cfg.train, key), getattr(m.cfg.train, key)
            if a != b:
                raise UserError(
                    f"{where}: sweep member {m.name!r} has train.{key}={b!r} but {first.name!r} has {a!r}; the members "
                    f"of a sweep share every batch, so train.{', train.'.join(SHARED_TRAIN_KEYS)} must be equal: "
                    f"set it for the whole sweep, or train that configuration in its own run")
