"""`sparse-db export` and `sparse-db import`: adapters to and from diffusers, PEFT, kohya/ComfyUI.

Imports nothing heavy: `sparse-db --help` must not import torch, so the commands import
sparse_dreambooth.export inside their bodies.
"""

from pathlib import Path

import typer

from sparse_dreambooth.cli.flags import with_settings

FORMATS_HELP = (
    "diffusers (LoRA file for load_lora_weights) | peft (adapter folder for PeftModel.from_pretrained) | "
    "kohya (A1111/ComfyUI file: LoRA; a sparse adapter needs --rank or --full-diff) | merged (diffusers UNet folder)"
)


def export_command(
    run: Path = typer.Option(..., "--run", help="run folder written by `sparse-db train` (or `sparse-db import`)"),
    format: str = typer.Option(..., "--format", help=FORMATS_HELP),
    out: Path = typer.Option(
        ..., "--out", help="file (diffusers, kohya: .safetensors) or folder (peft, merged) to write"
    ),
    rank: int | None = typer.Option(
        None, "--rank", help="diffusers/kohya: export a sparse adapter as its rank-R SVD approximation (error reported)"
    ),
    full_diff: bool = typer.Option(
        False, "--full-diff", help="kohya: export a sparse adapter as exact dense weight differences (large file)"
    ),
    dtype: str = typer.Option("fp32", "--dtype", help="fp32 | fp16 | bf16 weights for diffusers, kohya and merged"),
    pipeline: bool = typer.Option(False, "--pipeline", help="merged: write the whole SDXL pipeline, not only the UNet"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace --out if it exists"),
) -> None:
    """Write a run's adapter for diffusers, PEFT, kohya/A1111/ComfyUI, or merged into a diffusers UNet."""
    from sparse_dreambooth.export import export_adapter

    result = export_adapter(
        run,
        format,
        out,
        rank=rank,
        full_diff=full_diff,
        dtype=dtype,
        pipeline=pipeline,
        overwrite=overwrite,
        notify=typer.echo,
    )
    typer.echo(result.summary)


@with_settings("model", "data")
def import_command(
    source: Path = typer.Argument(..., help="PEFT adapter folder (adapter_config.json + adapter_model.safetensors)"),
    output: Path = typer.Option(
        ..., "--output", help="run folder to create (config.yaml, adapter.safetensors, run.json)"
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an adapter already in --output"),
    **settings,
) -> None:
    from sparse_dreambooth.export import import_adapter

    given = {key: value for key, value in settings.items() if value is not None}
    run = import_adapter(source, output, overwrite=overwrite, **given)
    typer.echo(f"imported {source} into {run}; render it with `sparse-db sample --run {run}`")


IMPORT_HELP = (
    "Bring a PEFT WaveFT or LoRA adapter into a run folder, so sample and evaluate work on it. "
    "Name the base model (--model) and the subject (--subject, or --instance-dir with --class-name)."
)
