"""`sparse-db data ...`: placeholder until the data module lands."""

import typer

data_app = typer.Typer(help="Get and inspect the DreamBooth dataset.", no_args_is_help=True)
