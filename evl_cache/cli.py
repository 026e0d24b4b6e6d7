"""The `evl-cache` command line: thin typer wrappers over library functions.

Each command parses flags, calls one library function and prints its summary. Bad input raises
`UserError`, which `main` turns into one red line on stderr and exit code 2.
"""

from __future__ import annotations

import sys

import typer

from evl_cache import __version__
from evl_cache.errors import UserError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Frozen-CLIP video recognition (EVL) trained from a cache of backbone features.",
)


@app.callback()
def _root() -> None:
    """Frozen-CLIP video recognition (EVL) trained from a cache of backbone features."""


@app.command()
def version() -> None:
    """Print the evl-cache version."""
    typer.echo(__version__)


# --- stage 1: extract / inspect -------------------------------------------------------------

# --- stage 2: train / eval / predict / import-evl -------------------------------------------

# --- tools: synth / flops ---------------------------------------------------------------------


def main() -> None:
    """Entry point: run the app, turning `UserError` into one clear line and a non-zero exit."""
    try:
        app(standalone_mode=False)
    except UserError as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        sys.exit(2)
    except typer.Abort:
        sys.exit(130)
    except Exception as err:  # click usage errors arrive here in non-standalone mode
        if hasattr(err, "show") and hasattr(err, "exit_code"):
            err.show()
            sys.exit(err.exit_code)
        raise


if __name__ == "__main__":
    main()
