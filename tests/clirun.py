"""`evl-cache ARGS` run in the test's own process, for the tests that check a command's output."""

from __future__ import annotations

import sys


def run_cli(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `evl-cache ARGS` (main turns a UserError into exit 2)."""
    from evl_cache.cli import main

    monkeypatch.setattr(sys, "argv", ["evl-cache", *map(str, args)])
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err
