"""`sparse-db evaluate | report | sweep`: metrics, paper tables and figures, and whole sweeps.

Torch-free at import (so `sparse-db --help` stays fast): each command imports its module inside
its body.
"""

from pathlib import Path

import typer

from sparse_dreambooth.errors import UserError

_MODELS_PANEL = "metric models"


def _int_list(option: str, text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"{option} takes comma-separated integers, e.g. 0,6,12,18; got {text!r}") from None


def evaluate_command(
    run: list[Path] | None = typer.Option(None, "--run", help="run folder (scores RUN/samples); repeatable"),
    samples: list[Path] | None = typer.Option(
        None, "--samples", help="folder of prompt_XX_sample_K_seed_S.png (+ samples.json); repeatable"
    ),
    subject: str | None = typer.Option(
        None, "--subject", help="subject of --samples folders that belong to no run (e.g. dog6, micro/teal_dog)"
    ),
    data_root: str | None = typer.Option(
        None, "--data-root", help="DreamBooth dataset folder (default: $SPARSE_DB_DATA)"
    ),
    instance_dir: str | None = typer.Option(
        None, "--instance-dir", help="real images of your own subject (with --class-name)"
    ),
    class_name: str | None = typer.Option(None, "--class-name", help="class of the --instance-dir subject, e.g. dog"),
    token: str | None = typer.Option(
        None, "--token", help="rare token removed from prompts for CLIP-T (default: the run's, else zjw)"
    ),
    metric_models: str = typer.Option(
        "paper",
        "--metric-models",
        help="the set of networks: 'paper' (DINO ViT-S/16, CLIP ViT-B/32 and ViT-L/14-336, LPIPS alex) or "
        "'micro' (the encoders trained in the micro world, shipped with the package; for --model micro runs "
        "and micro/ subjects); --dino/--clip/--cmmd/--lpips override single ones",
        rich_help_panel=_MODELS_PANEL,
    ),
    dino: str | None = typer.Option(
        None,
        "--dino",
        help="DINO model: Hub id, local folder, 'tiny' or 'micro' (default: the --metric-models set's)",
        rich_help_panel=_MODELS_PANEL,
    ),
    clip: str | None = typer.Option(
        None,
        "--clip",
        help="CLIP for CLIP-I/CLIP-T: Hub id, folder, 'tiny' or 'micro'",
        rich_help_panel=_MODELS_PANEL,
    ),
    cmmd: str | None = typer.Option(
        None,
        "--cmmd",
        help="CLIP for CMMD: Hub id, folder, 'tiny', 'micro' or 'none'",
        rich_help_panel=_MODELS_PANEL,
    ),
    lpips: str | None = typer.Option(
        None,
        "--lpips",
        help="LPIPS weights: 'alex'/'vgg' (made by scripts/convert_lpips.py), a .safetensors file, "
        "folder or Hub repo, 'tiny', 'micro' or 'none'",
        rich_help_panel=_MODELS_PANEL,
    ),
    device: str | None = typer.Option(None, "--device", help="torch device (default: cuda when available, else cpu)"),
    batch_size: int = typer.Option(16, "--batch-size", help="images per model call"),
    lpips_resolution: int | None = typer.Option(
        None, "--lpips-resolution", help="resize samples to this square for LPIPS (default: as rendered)"
    ),
    cmmd_estimator: str = typer.Option(
        "unbiased", "--cmmd-estimator", help="unbiased (U-statistic) or biased (google-research/cmmd's code)"
    ),
) -> None:
    """Score samples against the subject's real images: DINO, CLIP-I, CLIP-T, LPIPS diversity, CMMD.

    Writes metrics.json and metrics_per_image.csv into each samples folder.
    """
    if cmmd_estimator not in ("unbiased", "biased"):
        raise UserError(f"--cmmd-estimator must be 'unbiased' or 'biased', got {cmmd_estimator!r}")
    from sparse_dreambooth.evaluate import evaluate

    results = evaluate(
        runs=run,
        samples=samples,
        subject=subject,
        data_root=data_root,
        instance_dir=instance_dir,
        class_name=class_name,
        token=token,
        cmmd_unbiased=cmmd_estimator == "unbiased",
        metric_models=metric_models,
        dino=dino,
        clip=clip,
        cmmd=cmmd,
        lpips=lpips,
        device=device,
        batch_size=batch_size,
        lpips_resolution=lpips_resolution,
    )
    for result in results:
        shown = ", ".join(f"{name} {value:.4f}" for name, value in result["metrics"].items() if value is not None)
        typer.echo(f"{result['samples']}: {shown}")


def report_command(
    runs: list[Path] = typer.Argument(
        ..., help="run folders, samples folders, metrics.json files, or folders to search"
    ),
    out: Path = typer.Option(..., "--out", help="folder for report.md/.csv, the PNG plots and grids/"),
    resamples: int = typer.Option(10_000, "--resamples", help="bootstrap resamples"),
    confidence: float = typer.Option(0.95, "--confidence", help="bootstrap interval level"),
    seed: int = typer.Option(0, "--seed", help="bootstrap seed"),
    rank_shapes: str = typer.Option(
        "sdxl", "--rank-shapes", help="rank-vs-p plot shapes: 'sdxl', 'none' or OUTxIN,OUTxIN"
    ),
    grid_budget: str | None = typer.Option(
        None, "--grid-budget", help="budget of the grid rows, e.g. 2x (default: 1x when present)"
    ),
    grid_prompts: str | None = typer.Option(
        None, "--grid-prompts", help="prompt indices of the grid columns, e.g. 0,6,12,18"
    ),
    grid_columns: int = typer.Option(4, "--grid-columns", help="prompts per grid when --grid-prompts is not given"),
) -> None:
    """Table (Markdown + CSV, mean and bootstrap interval over subjects), plots and image grids."""
    from sparse_dreambooth.report import report

    outputs = report(
        runs,
        out,
        n_resamples=resamples,
        confidence=confidence,
        seed=seed,
        rank_shapes=rank_shapes,
        grid_budget=grid_budget,
        grid_prompts=_int_list("--grid-prompts", grid_prompts),
        grid_columns=grid_columns,
    )
    typer.echo(f"{outputs['records']} evaluated sample sets, {len(outputs['rows'])} table rows -> {out}")


def sweep_command(
    grid: Path = typer.Argument(..., help="sweep YAML (see configs/sweeps/)"),
    shard: str | None = typer.Option(
        None, "--shard", help="run only shard i of n (i/n, i from 0), e.g. $SLURM_ARRAY_TASK_ID/40"
    ),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="print the sparse-db commands of the unfinished stages; run nothing"
    ),
    report: bool = typer.Option(
        True, "--report/--no-report", help="write the report when the whole sweep ran in this process"
    ),
    report_only: bool = typer.Option(
        False, "--report-only", help="only write the report (after every shard has finished)"
    ),
    until: str = typer.Option(
        "evaluate",
        "--until",
        help="last stage to run: train, sample or evaluate (e.g. train on one cluster, evaluate on another)",
    ),
) -> None:
    """Train, sample and evaluate every subject x grid point of a YAML sweep, then report.

    Finished stages are skipped and unfinished training resumes, so the same command continues an
    interrupted sweep.
    """
    from sparse_dreambooth.sweep import run_sweep

    result = run_sweep(
        grid,
        shard_text=shard,
        dry_run=dry_run,
        make_report=report,
        report_only=report_only,
        until=until,
        log=typer.echo,
    )
    if result.report is not None:
        typer.echo(f"report written to {result.report['table'].parent}")
    if result.failed:
        for key, message in result.failed:
            typer.echo(f"FAILED {key}: {message}", err=True)
        typer.echo(
            f"{len(result.failed)} of {len(result.jobs)} jobs failed; fix them and run the same command again", err=True
        )
        raise typer.Exit(1)
