"""The `sparse-db` command line.

Kept thin and import-light: `sparse-db --help` must not import torch, so every command imports
the heavy modules inside its body.
"""

import importlib.abc
import importlib.machinery
import inspect
import os
import sys
import warnings
from pathlib import Path

import typer

from sparse_dreambooth import __version__
from sparse_dreambooth.cli_data import data_app
from sparse_dreambooth.cli_eval import register as register_eval
from sparse_dreambooth.cli_export import register as register_export
from sparse_dreambooth.cli_flags import setting_options, split_lists, with_parameters
from sparse_dreambooth.config import merge_settings, read_yaml
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


PACKAGE_DIR = Path(__file__).resolve().parent
_python_format_warning = warnings.formatwarning


def _format_warning(message, category, filename, lineno, line=None) -> str:
    # Our warnings are notes for the user ("skipping 1 non-image file"), not places in our code;
    # other libraries' warnings keep Python's format, which says where they come from.
    if Path(filename).resolve().is_relative_to(PACKAGE_DIR):
        return f"sparse-db: warning: {message}\n"
    return _python_format_warning(message, category, filename, lineno, line)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs `actions[name](module)` right after module `name` is first imported, then steps aside."""

    def __init__(self, actions: dict) -> None:
        self.actions = dict(actions)

    def find_spec(self, name, path, target=None):
        if name not in self.actions:
            return None
        action = self.actions.pop(name)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            load = spec.loader.exec_module

            def load_then_act(module) -> None:
                load(module)
                action(module)

            spec.loader.exec_module = load_then_act
        return spec


def _silence_third_party_output() -> None:
    """Our progress bars and messages only. diffusers' and transformers' own bars ("Loading pipeline
    components", "Loading weights", "Writing model shards") go, and so do transformers' notes about
    optional backends we never use (torchvision); diffusers' warnings and Hub download bars stay.

    For the command line only: importing the package changes no one's logging. The bar switches live
    in the libraries' logging modules, and importing diffusers imports torch, which `sparse-db --help`
    must not; so each switch is flipped as its module loads. A TRANSFORMERS_VERBOSITY set by the user wins.
    """
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    bars_off = {name: lambda logging: logging.disable_progress_bar() for name in _LIBRARY_LOGGING}
    sys.meta_path.insert(0, _AfterImport(bars_off))


_LIBRARY_LOGGING = ("diffusers.utils.logging", "transformers.utils.logging")


def main() -> None:
    """Entry point: a `UserError` becomes one line on stderr and exit code 2, with no traceback."""
    _silence_third_party_output()
    warnings.formatwarning = _format_warning
    try:
        app()
    except UserError as error:
        print(f"sparse-db: error: {error}", file=sys.stderr)
        sys.exit(2)


def _train(config: Path | None, resume: str | None, overwrite: bool, **flags) -> None:
    settings = merge_settings(read_yaml(config) if config else None, split_lists(flags))
    from sparse_dreambooth.train import train

    train(settings, resume=resume, overwrite=overwrite)


with_parameters(
    _train,
    [
        inspect.Parameter(
            "config",
            inspect.Parameter.KEYWORD_ONLY,
            default=typer.Option(None, "--config", help="YAML recipe (see configs/); flags override it"),
            annotation=Path | None,
        ),
        inspect.Parameter(
            "resume",
            inspect.Parameter.KEYWORD_ONLY,
            default=typer.Option(None, "--resume", help="continue from 'latest' or a checkpoints/step-N folder"),
            annotation=str | None,
        ),
        inspect.Parameter(
            "overwrite",
            inspect.Parameter.KEYWORD_ONLY,
            default=typer.Option(
                False, "--overwrite", help="replace a finished or unfinished run in the output folder"
            ),
            annotation=bool,
        ),
        *setting_options(),
    ],
)
app.command(
    "train",
    help="Train an adapter on a subject. Settings: defaults < --config FILE < flags; every config key is a flag.",
    no_args_is_help=True,
)(_train)


@app.command("sample")
def _sample(
    run: Path = typer.Option(..., "--run", help="run folder written by `sparse-db train`"),
    method: str = typer.Option(
        "adapter", "--method", help="'adapter' (the run's) or 'base' (no adapter, for reference)"
    ),
    prompt: list[str] | None = typer.Option(
        None, "--prompt", help="render this prompt instead of the 25 evaluation prompts (repeatable)"
    ),
    seeds: str = typer.Option("42,43,44,45", "--seeds", help="comma-separated seeds: one image per seed per prompt"),
    num_steps: int = typer.Option(30, "--num-steps", help="DPM-Solver++ steps"),
    guidance: float = typer.Option(7.5, "--guidance", help="classifier-free guidance scale"),
    batch_size: int = typer.Option(1, "--batch-size", help="images per pipeline call"),
    negative_prompt: str | None = typer.Option(None, "--negative-prompt", help="negative prompt for every image"),
    resolution: int | None = typer.Option(None, "--resolution", help="image side in pixels (default: the run's)"),
    output: Path | None = typer.Option(
        None, "--output", help="folder for the PNGs (default: RUN/samples or RUN/samples-base)"
    ),
) -> None:
    """Render the subject's DreamBooth prompts x seeds with the run's adapter merged in."""
    if method not in ("adapter", "base"):
        raise UserError(f"--method must be 'adapter' or 'base', got {method!r}")
    try:
        seed_list = [int(seed) for seed in seeds.split(",") if seed.strip()]
    except ValueError:
        raise UserError(f"--seeds takes comma-separated integers, got {seeds!r}") from None
    from sparse_dreambooth.sample import sample

    sample(
        run,
        base=method == "base",
        prompts=prompt,
        seeds=seed_list,
        num_steps=num_steps,
        guidance=guidance,
        batch_size=batch_size,
        negative_prompt=negative_prompt,
        resolution=resolution,
        output=output,
    )


# Commands defined in other modules register themselves here (each module stays torch-free at import).
register_export(app)
register_eval(app)
