"""Manifest adapters: turn a dataset's official annotation files into (paths, labels, class names).

A `Manifest` is the only thing the extractor needs from a dataset, so every dataset format is
parsed here and nowhere else. Adapters are registered by name (like open_clip's model factory):
`load_manifest("k400", root, split)`. Missing video files are deliberately not errors here: the
extractor records each one as a failed video and carries on. Broken annotation files are errors
(`UserError` naming the file, the line and the fix), because nothing useful can run from them.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from evl_cache.errors import UserError

VIDEO_EXTS = (".mp4", ".mkv", ".webm", ".avi")


@dataclass
class Manifest:
    """Videos of one dataset split in a fixed order: absolute paths, labels (-1 unlabeled), class names."""

    paths: list[str]
    labels: list[int]
    class_names: list[str]
    root: str
    name: str
    split: str = ""
    extra: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.paths)

    def sha256(self) -> str:
        """Hash of paths (relative to root), labels and class names: stable across machines and mounts."""
        rel = [Path(os.path.relpath(p, self.root)).as_posix() for p in self.paths]
        blob = json.dumps({"paths": rel, "labels": [int(x) for x in self.labels],
                           "class_names": list(self.class_names)}, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()


# ------------------------------------------------------------------------------------ registry

_REGISTRY: dict[str, Callable[..., Manifest]] = {}


def register_dataset(*names: str) -> Callable:
    """Decorator: register an adapter `fn(root, split, annotations, **kw) -> Manifest` under names."""

    def deco(fn: Callable[..., Manifest]) -> Callable[..., Manifest]:
        for n in names:
            _REGISTRY[n] = fn
        return fn

    return deco


def list_datasets() -> list[str]:
    """Names accepted by `load_manifest` (and the CLI's --dataset)."""
    return sorted(_REGISTRY)


def load_manifest(dataset: str, root: str, split: str, annotations: str | None = None, **kw) -> Manifest:
    """Build the manifest of `split` of `dataset` whose videos live under `root`.

    `annotations` points at the official annotation file or folder (defaults per dataset, see
    each adapter). Raises `UserError` for an unknown dataset or an unusable annotation file.
    """
    if dataset not in _REGISTRY:
        raise UserError(f"unknown dataset {dataset!r}; valid names: {', '.join(list_datasets())}")
    root_abs = os.path.abspath(os.path.expanduser(str(root)))
    ann = os.path.abspath(os.path.expanduser(str(annotations))) if annotations else None
    m = _REGISTRY[dataset](root_abs, split, ann, **kw)
    m.name, m.split = dataset, split
    return m


# ------------------------------------------------------------------------------------- helpers


def _resolve(root: str, p: str) -> str:
    return os.path.normpath(p if os.path.isabs(p) else os.path.join(root, p))


def _need_file(path: str, what: str, fix: str) -> str:
    if not os.path.isfile(path):
        raise UserError(f"{what} not found: {path}; {fix}")
    return path


def _first_existing(candidates: list[str], what: str, fix: str) -> str:
    for c in candidates:
        if os.path.isfile(c):
            return c
    raise UserError(f"{what} not found (looked for {', '.join(candidates)}); {fix}")


def _read_lines(path: str) -> list[str]:
    """Lines without their endings (official UCF/HMDB lists use CRLF); empty lines kept for numbering."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            return f.read().splitlines()
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e}); pass the annotation file itself") from None


def _read_classes_file(path: str) -> list[str]:
    names = [ln.strip() for ln in _read_lines(_need_file(path, "classes file", "pass an existing file, one class name per line"))]
    names = [n for n in names if n]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})[0]
        raise UserError(f"{path}: class {dup!r} listed twice; keep each class name once")
    if not names:
        raise UserError(f"{path}: no class names; write one class name per line")
    return names


def _index_videos(folder: str, depth: int = 2) -> dict[str, str]:
    """stem -> path of every video file under folder (itself and `depth-1` levels of subfolders).

    One directory listing instead of a stat per candidate name: cheap on network filesystems with
    hundreds of thousands of clips. On duplicate stems the preferred extension (VIDEO_EXTS order) wins.
    """
    found: dict[str, str] = {}
    rank = {e: i for i, e in enumerate(VIDEO_EXTS)}

    def walk(d: str, level: int) -> None:
        try:
            entries = list(os.scandir(d))
        except OSError:
            return
        for e in entries:
            if e.is_dir():
                if level < depth:
                    walk(e.path, level + 1)
                continue
            stem, ext = os.path.splitext(e.name)
            ext = ext.lower()
            if ext in rank and (stem not in found or rank[ext] < rank[os.path.splitext(found[stem])[1].lower()]):
                found[stem] = e.path

    walk(folder, 1)
    return found


def _csv_rows(path: str, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> list[tuple[int, dict]]:
    """(line number, row) pairs of a headed CSV, checking the header names the required columns."""
    text = _read_lines(path)
    if not text or not text[0].strip():
        raise UserError(f"{path}:1: empty file or missing header; the first line must be '{','.join(required + optional)}'")
    header = [h.strip() for h in next(csv.reader([text[0]]))]
    missing = [c for c in required if c not in header]
    if missing:
        raise UserError(f"{path}:1: header {','.join(header)!r} lacks column(s) {', '.join(missing)}; "
                        f"the first line must be '{','.join(required + optional)}'")
    rows = []
    for lineno, values in enumerate(csv.reader(text[1:]), start=2):
        if not values or all(not v.strip() for v in values):
            continue
        if len(values) != len(header):
            raise UserError(f"{path}:{lineno}: {len(values)} fields but the header has {len(header)}; "
                            f"quote fields that contain commas")
        rows.append((lineno, {h: v.strip() for h, v in zip(header, values)}))
    return rows


def _split_file(annotations: str | None, default_dirs: list[str], split: str, ext: str, what: str) -> str:
    """The annotation file for `split`: `annotations` itself if a file, else `<dir>/<split><ext>`."""
    if annotations and os.path.isfile(annotations):
        return annotations
    dirs = [annotations] if annotations else default_dirs
    if annotations and not os.path.isdir(annotations):
        raise UserError(f"{what}: --annotations {annotations} does not exist; pass the {split}{ext} file or its folder")
    names = [split] + (["validate", "validation"] if split == "val" else [])  # Kinetics ships val.csv or validate.csv
    cands = [os.path.join(d, n + ext) for d in dirs for n in names]
    for c in cands:
        if os.path.isfile(c):
            return c
    have = sorted({f[: -len(ext)] for d in dirs if os.path.isdir(d) for f in os.listdir(d) if f.endswith(ext)})
    hint = f"splits found there: {', '.join(have)}" if have else f"pass --annotations <file{ext} or folder>"
    raise UserError(f"{what}: no annotation file for split {split!r} (looked for {', '.join(cands)}); {hint}")


# ------------------------------------------------------------------------------ kinetics family


def _kinetics_rows(path: str) -> list[tuple[int, dict]]:
    # K600/K700 test CSVs have no label column; K400's do.
    return _csv_rows(path, ("youtube_id", "time_start", "time_end"), ("label", "split"))


@register_dataset("k400", "k600", "k700")
def kinetics(root: str, split: str, annotations: str | None, classes: str | None = None,
             videos: str | None = None, **_) -> Manifest:
    """Kinetics-400/600/700 from the official CSVs (`label,youtube_id,time_start,time_end,split`).

    Annotation file: `annotations` (a CSV, or a folder holding `<split>.csv`); default
    `<root>/annotations/<split>.csv` or `<root>/<split>.csv` (split `val` also finds `validate.csv`
    or `validation.csv`, the names some Kinetics releases use). Clips: `<videos>/<youtube_id>_<start:06d>_<end:06d>.<ext>`
    with `videos` defaulting to `<root>/<split>`, found directly there or one class folder deeper,
    ext among .mp4/.mkv/.webm/.avi (a clip found nowhere gets the .mp4 name so the extractor records it missing).
    Class index = alphabetical order of class names from `train.csv` beside the split's CSV when that
    exists (so val/test share train's indices), else from the split's own CSV; a `classes` file fixes it instead.
    """
    what = "kinetics annotations"
    csv_path = _split_file(annotations, [os.path.join(root, "annotations"), root], split, ".csv", what)
    rows = _kinetics_rows(csv_path)
    if classes:
        class_names = _read_classes_file(classes)
    else:
        train_csv = os.path.join(os.path.dirname(csv_path), "train.csv")
        src = os.path.abspath(train_csv if os.path.isfile(train_csv) else csv_path)
        src_rows = rows if src == os.path.abspath(csv_path) else _kinetics_rows(src)
        class_names = sorted({r["label"] for _, r in src_rows if r.get("label")})
    index = {c: i for i, c in enumerate(class_names)}
    vdir = os.path.abspath(videos) if videos else os.path.join(root, split)
    found = _index_videos(vdir, depth=2)
    paths, labels = [], []
    for lineno, r in rows:
        try:
            start, end = int(float(r["time_start"])), int(float(r["time_end"]))
        except ValueError:
            raise UserError(f"{csv_path}:{lineno}: time_start/time_end {r['time_start']!r},{r['time_end']!r} "
                            f"are not numbers; fix or delete the line") from None
        stem = f"{r['youtube_id']}_{start:06d}_{end:06d}"
        paths.append(found.get(stem, os.path.join(vdir, stem + ".mp4")))
        name = r.get("label", "")
        if not name:
            labels.append(-1)
        elif name in index:
            labels.append(index[name])
        else:
            raise UserError(f"{csv_path}:{lineno}: class {name!r} is not among the {len(class_names)} training classes; "
                            f"fix the label or pass a classes file (--classes) that lists it")
    return Manifest(paths, labels, class_names, root, "kinetics", extra={"annotations": csv_path})


# ------------------------------------------------------------------------------------- ssv2

_SSV2_SPLITS = {"train": "train", "val": "validation", "validation": "validation", "test": "test"}


def _load_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: invalid JSON ({e.msg}); re-download the official annotation file") from None


@register_dataset("ssv2")
def ssv2(root: str, split: str, annotations: str | None, **_) -> Manifest:
    """Something-Something v2 from the official JSON lists.

    Annotation folder: `annotations`, default `<root>/labels` then `<root>`, holding
    `something-something-v2-{train,validation,test}.json` and `something-something-v2-labels.json`
    (the short names `train.json`/`validation.json`/`test.json`/`labels.json` also work).
    Split: train, validation (or val), test (unlabeled). Videos: `<root>/<id>.webm`.
    Label: the entry's template with brackets removed, looked up in the labels file.
    """
    if split not in _SSV2_SPLITS:
        raise UserError(f"ssv2: unknown split {split!r}; use one of train, validation (val), test")
    sname = _SSV2_SPLITS[split]
    if annotations and os.path.isfile(annotations):
        list_path, adir = annotations, os.path.dirname(annotations)
    else:
        if annotations and not os.path.isdir(annotations):
            raise UserError(f"ssv2: --annotations {annotations} does not exist; pass the folder with the official JSON files")
        dirs = [annotations] if annotations else [os.path.join(root, "labels"), root]
        fix = "pass --annotations <folder with the official something-something-v2 JSON files>"
        list_path = _first_existing([os.path.join(d, n) for d in dirs for n in (f"something-something-v2-{sname}.json", f"{sname}.json")],
                                    f"ssv2 {sname} list", fix)
        adir = os.path.dirname(list_path)
    labels_path = _first_existing([os.path.join(adir, n) for n in ("something-something-v2-labels.json", "labels.json")],
                                  "ssv2 labels file", "put something-something-v2-labels.json beside the split list")
    label_map = _load_json(labels_path)
    if not isinstance(label_map, dict):
        raise UserError(f"{labels_path}: expected a JSON object {{class name: index}}; use the official labels file")
    try:
        by_index = sorted((int(v), k) for k, v in label_map.items())
    except (TypeError, ValueError):
        raise UserError(f"{labels_path}: class indices must be integers; use the official labels file") from None
    if [i for i, _ in by_index] != list(range(len(by_index))):
        raise UserError(f"{labels_path}: class indices are not 0..{len(by_index) - 1} without gaps; use the official labels file")
    class_names = [k for _, k in by_index]
    lookup = {k: int(v) for k, v in label_map.items()}
    folded = {k.lower(): v for k, v in lookup.items()}
    entries = _load_json(list_path)
    if not isinstance(entries, list):
        raise UserError(f"{list_path}: expected a JSON list of {{id, template, ...}} entries; use the official split list")
    paths, labels = [], []
    for i, e in enumerate(entries):
        where = f"{list_path}: entry {i}"
        if not isinstance(e, dict) or "id" not in e:
            raise UserError(f"{where}: no 'id' field; use the official split list")
        paths.append(os.path.join(root, f"{e['id']}.webm"))
        if "template" not in e:
            labels.append(-1)  # the test list carries ids only
            continue
        key = str(e["template"]).replace("[", "").replace("]", "")
        idx = lookup.get(key, folded.get(key.lower()))
        if idx is None:
            raise UserError(f"{where} (id {e['id']}): template {key!r} is not in {labels_path}; "
                            f"use the labels file that came with this split list")
        labels.append(idx)
    return Manifest(paths, labels, class_names, root, "ssv2", extra={"annotations": list_path})


# ----------------------------------------------------------------------------------- ucf101

_UCF_SPLIT = re.compile(r"^(train|test)([123])$")


@register_dataset("ucf101")
def ucf101(root: str, split: str, annotations: str | None, **_) -> Manifest:
    """UCF-101 from the official `ucfTrainTestlist` files.

    Annotation folder: `annotations`, default `<root>/ucfTrainTestlist`, holding `classInd.txt`
    (`1 ApplyEyeMakeup`), `trainlist0N.txt` (`ApplyEyeMakeup/v_..._g08_c01.avi 1`, 1-based) and
    `testlist0N.txt` (no label: taken from the folder via classInd). Split: train1..3, test1..3.
    Videos: `<root>/<Class>/<file>.avi` (the official UCF-101 folder).
    """
    m = _UCF_SPLIT.match(split)
    if not m:
        raise UserError(f"ucf101: unknown split {split!r}; use train1, train2, train3, test1, test2 or test3")
    kind, n = m.groups()
    adir = annotations or os.path.join(root, "ucfTrainTestlist")
    if os.path.isfile(adir):
        adir = os.path.dirname(adir)
    fix = "pass --annotations <the ucfTrainTestlist folder>"
    ind_path = _need_file(os.path.join(adir, "classInd.txt"), "ucf101 classInd.txt", fix)
    list_path = _need_file(os.path.join(adir, f"{kind}list0{n}.txt"), f"ucf101 {kind}list0{n}.txt", fix)
    pairs = []
    for lineno, ln in enumerate(_read_lines(ind_path), start=1):
        if not ln.strip():
            continue
        parts = ln.split()
        if len(parts) != 2 or not parts[0].isdigit():
            raise UserError(f"{ind_path}:{lineno}: expected '<index> <ClassName>', got {ln.strip()!r}; use the official classInd.txt")
        pairs.append((int(parts[0]), parts[1]))
    pairs.sort()
    if [i for i, _ in pairs] != list(range(1, len(pairs) + 1)):
        raise UserError(f"{ind_path}: class indices are not 1..{len(pairs)} without gaps; use the official classInd.txt")
    class_names = [c for _, c in pairs]
    index = {c: i for i, c in enumerate(class_names)}
    folded = {c.lower(): i for c, i in index.items()}
    paths, labels = [], []
    for lineno, ln in enumerate(_read_lines(list_path), start=1):
        parts = ln.split()
        if not parts:
            continue
        rel = parts[0]
        if kind == "train":
            if len(parts) != 2 or not parts[1].isdigit() or not 1 <= int(parts[1]) <= len(class_names):
                raise UserError(f"{list_path}:{lineno}: expected '<Class>/<file>.avi <1..{len(class_names)}>', got {ln.strip()!r}; "
                                f"use the official trainlist")
            label = int(parts[1]) - 1
        else:
            folder = rel.split("/")[0]
            label = index.get(folder, folded.get(folder.lower(), -2))
            if label == -2:
                raise UserError(f"{list_path}:{lineno}: folder {folder!r} is not a class in {ind_path}; "
                                f"use the classInd.txt from the same ucfTrainTestlist")
        paths.append(_resolve(root, rel))
        labels.append(label)
    return Manifest(paths, labels, class_names, root, "ucf101", extra={"annotations": list_path})


# ----------------------------------------------------------------------------------- hmdb51

_HMDB_SPLIT = re.compile(r"^(train|test)([123])$")
_HMDB_FILE = re.compile(r"^(.+)_test_split([123])\.txt$")


@register_dataset("hmdb51")
def hmdb51(root: str, split: str, annotations: str | None, **_) -> Manifest:
    """HMDB-51 from the official `testTrainMulti_7030_splits` files.

    Annotation folder: `annotations`, default `<root>/testTrainMulti_7030_splits`, holding
    `<class>_test_split<N>.txt` with lines `<video>.avi <0|1|2>` (1 train, 2 test, 0 unused).
    Split: train1..3, test1..3. Videos: `<root>/<class>/<video>.avi`. Class index = alphabetical order.
    """
    m = _HMDB_SPLIT.match(split)
    if not m:
        raise UserError(f"hmdb51: unknown split {split!r}; use train1, train2, train3, test1, test2 or test3")
    kind, n = m.groups()
    want = "1" if kind == "train" else "2"
    adir = annotations or os.path.join(root, "testTrainMulti_7030_splits")
    if not os.path.isdir(adir):
        raise UserError(f"hmdb51: split folder {adir} not found; pass --annotations <the testTrainMulti_7030_splits folder>")
    files = {}
    for f in sorted(os.listdir(adir)):
        mm = _HMDB_FILE.match(f)
        if mm and mm.group(2) == n:
            files[mm.group(1)] = os.path.join(adir, f)
    if not files:
        raise UserError(f"hmdb51: no '<class>_test_split{n}.txt' files in {adir}; "
                        f"pass --annotations <the testTrainMulti_7030_splits folder>")
    class_names = sorted(files)
    paths, labels = [], []
    for ci, cname in enumerate(class_names):
        fpath = files[cname]
        for lineno, ln in enumerate(_read_lines(fpath), start=1):
            parts = ln.split()
            if not parts:
                continue
            if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
                raise UserError(f"{fpath}:{lineno}: expected '<video>.avi <0|1|2>', got {ln.strip()!r}; use the official split file")
            if parts[1] == want:
                paths.append(os.path.join(root, cname, parts[0]))
                labels.append(ci)
    return Manifest(paths, labels, class_names, root, "hmdb51", extra={"annotations": adir})


# ------------------------------------------------------------------------------------- list


@register_dataset("list")
def list_csv(root: str, split: str, annotations: str | None, classes: str | None = None, **_) -> Manifest:
    """A generic CSV with header `path,label` (label: a class name, an integer, or empty for unlabeled).

    File: `annotations` (a CSV, or a folder with `<split>.csv`), default `<root>/<split>.csv`.
    Paths are relative to `root` (absolute paths allowed). Classes: the `classes` file (one name per
    line) if given, else `classes.txt` beside the CSV if present; otherwise integer labels give names
    "0".."max" and name labels are indexed in alphabetical order.
    """
    csv_path = _split_file(annotations, [root], split, ".csv", "list manifest")
    rows = _csv_rows(csv_path, ("path",), ("label",))
    if classes is None:
        beside = os.path.join(os.path.dirname(csv_path), "classes.txt")
        classes = beside if os.path.isfile(beside) else None
    raw = [r.get("label", "") for _, r in rows]
    if classes:
        class_names = _read_classes_file(classes)
    elif all(re.fullmatch(r"-?\d+", x) for x in raw if x):
        ints = [int(x) for x in raw if x]
        top = max([i for i in ints if i >= 0], default=-1)
        class_names = [str(i) for i in range(top + 1)]
    else:
        class_names = sorted({x for x in raw if x})
    index = {c: i for i, c in enumerate(class_names)}
    paths, labels = [], []
    for lineno, r in rows:
        if not r["path"]:
            raise UserError(f"{csv_path}:{lineno}: empty path; give each video's path relative to {root}")
        x = r.get("label", "")
        if not x or x == "-1":
            label = -1
        elif x in index:
            label = index[x]
        elif re.fullmatch(r"\d+", x) and int(x) < len(class_names):
            label = int(x)
        else:
            src = f"the classes file {classes}" if classes else "the label column"
            raise UserError(f"{csv_path}:{lineno}: label {x!r} is neither a class name nor an index < {len(class_names)} "
                            f"(classes from {src}); fix the label or the classes file")
        paths.append(_resolve(root, r["path"]))
        labels.append(label)
    return Manifest(paths, labels, class_names, root, "list", extra={"annotations": csv_path})
