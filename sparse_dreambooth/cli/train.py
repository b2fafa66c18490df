"""`sparse-db train` and `sparse-db sample`.

Torch-free at import: each command imports its module inside its body.
"""

from pathlib import Path

import typer

from sparse_dreambooth.cli.flags import with_settings
from sparse_dreambooth.config import merge_settings, read_yaml
from sparse_dreambooth.errors import UserError

TRAIN_HELP = "Train an adapter on a subject. Settings: defaults < --config FILE < flags; every config key is a flag."


@with_settings("model", "data", "adapter", "train")
def train_command(
    config: Path | None = typer.Option(None, "--config", help="YAML recipe (see configs/); flags override it"),
    resume: str | None = typer.Option(None, "--resume", help="continue from 'latest' or a checkpoints/step-N folder"),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="replace a finished or unfinished run in the output folder"
    ),
    **settings,
) -> None:
    merged = merge_settings(read_yaml(config) if config else None, settings)
    from sparse_dreambooth.train import train

    train(merged, resume=resume, overwrite=overwrite)


@with_settings("model")
def sample_command(
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
        None, "--output", help="folder for the PNGs (default: RUN/samples, RUN/samples-base or RUN/samples-ema)"
    ),
    ema: bool = typer.Option(
        False, "--ema", help="use the adapter's moving average (adapter-ema.safetensors, from --ema-decay)"
    ),
    **model_settings,
) -> None:
    """Render the subject's DreamBooth prompts x seeds with the run's adapter merged in.

    The base model is the run's; the model flags replace it, e.g. --model DIR for a model folder
    that moved since training (the adapter still checks that it is the same model)."""
    if method not in ("adapter", "base"):
        raise UserError(f"--method must be 'adapter' or 'base', got {method!r}")
    try:
        seed_list = [int(seed) for seed in seeds.split(",") if seed.strip()]
    except ValueError:
        raise UserError(f"--seeds takes comma-separated integers, got {seeds!r}") from None
    if not seed_list:
        raise UserError("--seeds names no seed; pass comma-separated integers, e.g. 42,43")
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
        ema=ema,
        model_settings=model_settings,
    )
