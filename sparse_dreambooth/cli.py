"""The `sparse-db` command line.

Kept thin and import-light: `sparse-db --help` must not import torch, so every command imports
the heavy modules inside its body.
"""

import sys

import typer

from sparse_dreambooth import __version__
from sparse_dreambooth.cli_data import data_app
from sparse_dreambooth.errors import UserError

app = typer.Typer(
    name="sparse-db",
    help="DreamBooth for Stable Diffusion XL with sparse adapters (WaveFT, random-sparse, LoRA).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(data_app, name="data")


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"sparse-db {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_show_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """DreamBooth for Stable Diffusion XL with sparse adapters (WaveFT, random-sparse, LoRA)."""


def main() -> None:
    """Entry point: a `UserError` becomes one line on stderr and exit code 2, with no traceback."""
    try:
        app()
    except UserError as error:
        print(f"sparse-db: error: {error}", file=sys.stderr)
        sys.exit(2)
