"""Prompt templates that turn class names into sentences for CLIP's text tower (docs/zero-shot.md).

Built-in sets (the strings are data, reproduced from their published sources):

- ``clip-kinetics700``: the 28 templates CLIP's authors used for Kinetics-700 zero-shot
  (openai/CLIP, ``data/prompts.md``, section Kinetics700).
- ``clip-ucf101``: the 48 templates they used for UCF-101 (same file, section UCF101).
- ``actionclip``: the 16 text augmentations of ActionCLIP (sallymmx/ActionCLIP,
  ``utils/Text_Prompt.py``). Often called "X-CLIP's 16 templates", but X-CLIP's released code
  does not use them.
- ``xclip``: what X-CLIP's released code feeds its text encoder: the bare class name
  (microsoft/VideoX, ``X-CLIP/utils/tools.py``, ``generate_text``).
- ``photo``: the single ``a photo of a {}.``.

A user file holds one template per line, each with exactly one ``{}`` where the class name goes;
blank lines and lines starting with ``#`` are skipped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from evl_cache.errors import UserError

_NOUNS = ("photo", "video", "example", "demonstration")  # "a example" is as published
_K700_PERSON = ("", "a person ", "a person using ", "a person doing ", "a person during ",
                "a person performing ", "a person practicing ")
_UCF_VERBS = ("", "using ", "doing ", "during ", "performing ", "practicing ")

CLIP_KINETICS700 = tuple(f"a {noun} of {who}{{}}." for noun in _NOUNS for who in _K700_PERSON)
CLIP_UCF101 = tuple(f"a {noun} of {article} person {verb}{{}}."
                    for verb in _UCF_VERBS for article in ("a", "the") for noun in _NOUNS)
ACTIONCLIP = (
    "a photo of action {}", "a picture of action {}", "Human action of {}", "{}, an action",
    "{} this is an action", "{}, a video of action", "Playing action of {}", "{}",
    "Playing a kind of action, {}", "Doing a kind of action, {}", "Look, the human is {}",
    "Can you recognize the action of {}?", "Video classification of {}", "A video of {}",
    "The man is {}", "The woman is {}",
)
XCLIP = ("{}",)
PHOTO = ("a photo of a {}.",)

TEMPLATE_SETS: dict[str, tuple[str, ...]] = {
    "clip-kinetics700": CLIP_KINETICS700,
    "clip-ucf101": CLIP_UCF101,
    "actionclip": ACTIONCLIP,
    "xclip": XCLIP,
    "photo": PHOTO,
}


def template_problem(template: str) -> str | None:
    """Why ``template`` cannot take a class name, or None if it can."""
    if not template.strip():
        return "is empty"
    if template.count("{}") != 1:
        return f"has {template.count('{}')} '{{}}' placeholders; it needs exactly one, where the class name goes"
    if "{" in template.replace("{}", "") or "}" in template.replace("{}", ""):
        return "has a brace besides its '{}' placeholder"
    if "\n" in template or "\r" in template:
        return "spans more than one line"
    return None


def read_template_file(path: str | Path) -> list[str]:
    """Templates from a user file, one per line; any bad line is refused with its line number."""
    path = Path(path)
    if not path.is_file():
        names = ", ".join(TEMPLATE_SETS)
        raise UserError(f"templates '{path}' is neither a built-in set ({names}) nor an existing file; check the name or path")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise UserError(f"template file {path} is not UTF-8 text (byte {err.start}); save it as UTF-8") from err
    templates: list[str] = []
    seen: dict[str, int] = {}
    for number, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        problem = template_problem(line)
        if problem:
            raise UserError(f"template file {path} line {number} ('{line[:60]}') {problem}; write one template per line like 'a video of {{}}.'")
        if line in seen:
            raise UserError(f"template file {path} line {number} repeats line {seen[line]}; a repeated template would count twice in the ensemble, remove it")
        seen[line] = number
        templates.append(line)
    if not templates:
        raise UserError(f"template file {path} has no templates; write one per line, each with '{{}}' for the class name")
    return templates


def resolve_templates(name_or_path: str) -> tuple[str, list[str]]:
    """(label, templates) for a built-in set name or a template file path; a built-in name wins."""
    if name_or_path in TEMPLATE_SETS:
        return name_or_path, list(TEMPLATE_SETS[name_or_path])
    return str(name_or_path), read_template_file(name_or_path)


def validate_class_names(class_names: Sequence[str]) -> list[str]:
    """Class names as a list, refusing an empty list, blank or multi-line names and repeats."""
    names = [str(n) for n in class_names]
    if not names:
        raise UserError("the class list is empty; give at least one class name")
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if not name.strip() or "\n" in name or "\r" in name:
            raise UserError(f"class {i} ({name!r}) is blank or spans lines; give one non-empty name per class")
        if name in seen:
            raise UserError(f"class name '{name}' appears twice (classes {seen[name]} and {i}); class names must be distinct")
        seen[name] = i
    return names


def read_class_names(path: str | Path) -> list[str]:
    """Class names from a file, one per line in label order; blank lines and ``#`` lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"class file {path} not found; give a text file with one class name per line")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise UserError(f"class file {path} is not UTF-8 text (byte {err.start}); save it as UTF-8") from err
    names = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    try:
        return validate_class_names(names)
    except UserError as err:
        raise UserError(f"class file {path}: {err}") from None


def format_prompts(class_names: Sequence[str], templates: Sequence[str]) -> list[str]:
    """Prompts in class-major order: all templates of class 0, then of class 1, ..."""
    if not templates:
        raise UserError("no templates given; use a built-in set or a file with one template per line")
    for i, template in enumerate(templates):
        problem = template_problem(template)
        if problem:
            raise UserError(f"template {i} ('{template[:60]}') {problem}")
    return [template.replace("{}", name) for name in class_names for template in templates]
