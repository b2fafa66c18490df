"""The `sparse-db` command line (`python -m sparse_dreambooth` runs the same).

app.py       the Typer app and the one block that registers every command
flags.py     config-schema flags, added to a command by `@with_settings(...)`
train.py     train, sample
export.py    export, import
evaluate.py  evaluate, report, sweep
data.py      data download | list | show
"""

from sparse_dreambooth.cli.app import app, main

__all__ = ["app", "main"]
