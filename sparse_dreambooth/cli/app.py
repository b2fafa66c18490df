"""The `sparse-db` app: every command is registered in the one block below.

Kept import-light: `sparse-db --help` must not import torch, so every command imports the heavy
modules inside its body.
"""

import sys
import warnings
from pathlib import Path

import typer

from sparse_dreambooth import __version__
from sparse_dreambooth.cli.data import data_app
from sparse_dreambooth.cli.evaluate import evaluate_command, report_command, sweep_command
from sparse_dreambooth.cli.export import IMPORT_HELP, export_command, import_command
from sparse_dreambooth.cli.quiet import silence_third_party_output
from sparse_dreambooth.cli.train import TRAIN_HELP, sample_command, train_command
from sparse_dreambooth.errors import UserError

app = typer.Typer(
    name="sparse-db",
    help="DreamBooth for Stable Diffusion XL with sparse adapters (WaveFT, random-sparse, LoRA).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


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


# --- the commands, in the order `sparse-db --help` lists them ---------------------------------
app.command("train", help=TRAIN_HELP, no_args_is_help=True)(train_command)
app.command("sample")(sample_command)
app.command("export", no_args_is_help=True)(export_command)
app.command("import", help=IMPORT_HELP, no_args_is_help=True)(import_command)
app.command("evaluate")(evaluate_command)
app.command("report")(report_command)
app.command("sweep")(sweep_command)
app.add_typer(data_app, name="data")


PACKAGE_DIR = Path(__file__).resolve().parent.parent
_python_format_warning = warnings.formatwarning


def _format_warning(message, category, filename, lineno, line=None) -> str:
    # Our warnings are notes for the user ("skipping 1 non-image file"), not places in our code;
    # other libraries' warnings keep Python's format, which says where they come from.
    if Path(filename).resolve().is_relative_to(PACKAGE_DIR):
        return f"sparse-db: warning: {message}\n"
    return _python_format_warning(message, category, filename, lineno, line)


def main() -> None:
    """Entry point: a `UserError` becomes one line on stderr and exit code 2, with no traceback."""
    silence_third_party_output()
    warnings.formatwarning = _format_warning
    try:
        app()
    except UserError as error:
        print(f"sparse-db: error: {error}", file=sys.stderr)
        sys.exit(2)
