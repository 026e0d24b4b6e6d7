"""Built-in template sets are the published lists; user template and class files refuse bad lines in one line."""

from __future__ import annotations

import hashlib

import pytest

from evl_cache.errors import UserError
from evl_cache.templates import (ACTIONCLIP, CLIP_KINETICS700, CLIP_UCF101, TEMPLATE_SETS, format_prompts,
                                 read_class_names, read_template_file, resolve_templates)


def digest(templates) -> str:
    return hashlib.sha256("\n".join(templates).encode()).hexdigest()


# sha256 of the published lists joined by newlines, computed from the sources named in
# evl_cache/templates.py: openai/CLIP data/prompts.md at d05afc436d78f1c48dc0dbf8e5980a9d471f35f6
# (sections Kinetics700 and UCF101) and sallymmx/ActionCLIP utils/Text_Prompt.py at
# 31c34df17dce917d67127b7fb155922c4744f680 (text_aug, f-string braces undone).
@pytest.mark.parametrize("templates, count, first, last, sha", [
    (CLIP_KINETICS700, 28, "a photo of {}.", "a demonstration of a person practicing {}.",
     "820c23cc30bda2e5c3e9f8a477edd75d2a9e0f01e7c6240afa6f0644ef5e93ca"),
    (CLIP_UCF101, 48, "a photo of a person {}.", "a demonstration of the person practicing {}.",
     "d1fceafd76c54a5f54628fbdaa23bacedaf21a2adbb6eb4589aa51f8fe2d5a13"),
    (ACTIONCLIP, 16, "a photo of action {}", "The woman is {}",
     "3c15b373c88d8d5cb41f58faca1b072e49f566b0882d6eceda6a902577d26afb"),
])
def test_builtin_sets_are_the_published_lists(templates, count, first, last, sha):
    assert len(templates) == count == len(set(templates))
    assert templates[0] == first and templates[-1] == last
    assert digest(templates) == sha


def test_named_sets_resolve():
    assert resolve_templates("clip-kinetics700") == ("clip-kinetics700", list(CLIP_KINETICS700))
    assert resolve_templates("xclip")[1] == ["{}"]
    assert resolve_templates("photo")[1] == ["a photo of a {}."]
    assert set(TEMPLATE_SETS) == {"clip-kinetics700", "clip-ucf101", "actionclip", "xclip", "photo"}


def test_user_file_with_comments_and_blank_lines(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("# my prompts\n\na clip of {}.\n  someone doing {}  \n", encoding="utf-8")
    assert resolve_templates(str(path)) == (str(path), ["a clip of {}.", "someone doing {}"])
    assert format_prompts(["x", "y"], ["a {}.", "{}!"]) == ["a x.", "x!", "a y.", "y!"]


@pytest.mark.parametrize("content, match", [
    ("a video of someone\n", "line 1 .*0 '\\{\\}' placeholders"),
    ("ok {}\n{} and {}\n", "line 2 .*2 '\\{\\}' placeholders"),
    ("a {label} of {}\n", "line 1 .*brace"),
    ("# only a comment\n\n", "has no templates"),
    ("a {}\nb {}\na {}\n", "line 3 repeats line 1"),
])
def test_bad_template_file_is_one_line_user_error(tmp_path, content, match):
    path = tmp_path / "t.txt"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(UserError, match=match) as err:
        resolve_templates(str(path))
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_missing_or_binary_template_file(tmp_path):
    with pytest.raises(UserError, match="neither a built-in set .* nor an existing file"):
        resolve_templates(str(tmp_path / "nope.txt"))
    path = tmp_path / "bin.txt"
    path.write_bytes(b"a \xff{}\n")
    with pytest.raises(UserError, match="not UTF-8"):
        read_template_file(path)


def test_class_file(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text("# label order\nabseiling\n\nair drumming\n", encoding="utf-8")
    assert read_class_names(path) == ["abseiling", "air drumming"]
    path.write_text("a\nb\na\n", encoding="utf-8")
    with pytest.raises(UserError, match="appears twice") as err:
        read_class_names(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(UserError, match="not found"):
        read_class_names(tmp_path / "missing.txt")
