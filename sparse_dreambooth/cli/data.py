"""`sparse-db data ...`: fetch the DreamBooth dataset and look at its subjects.

Nothing heavy is imported here: `sparse-db --help` must stay fast, so each command imports the
data module (PIL, numpy) inside its body.
"""

import typer

data_app = typer.Typer(
    help="Get and inspect the DreamBooth dataset (30 subjects) and the micro subjects rendered offline "
    "(micro/NAME; 'demo' is an alias of micro/robot_toy).",
    no_args_is_help=True,
)

_DATA_ROOT_HELP = (
    "The dataset folder (the one holding prompts_and_classes.txt). Default: $SPARSE_DB_DATA, else "
    "~/.local/share/sparse-dreambooth/dreambooth ($XDG_DATA_HOME is honoured)."
)


@data_app.command("download")
def download(
    data_root: str | None = typer.Option(None, "--data-root", help=_DATA_ROOT_HELP),
    url: str | None = typer.Option(
        None,
        "--url",
        help="Zip to fetch instead of the google/dreambooth GitHub archive, e.g. a mirror or "
        "file:///path/to/dreambooth-main.zip; it must pass the same checksums.",
    ),
) -> None:
    """Download the DreamBooth dataset (about 110 MB, CC BY 4.0), check every file's sha256, unpack it.

    Nothing is left at the destination if the download fails or a checksum does not match. If the
    dataset is already there and intact, nothing is downloaded.
    """
    from sparse_dreambooth import data

    root = data.download_dataset(data.resolve_data_root(data_root), url=url or data.DATASET_URL)
    typer.echo(f"DreamBooth dataset ready at {root}")


@data_app.command("list")
def list_subjects(data_root: str | None = typer.Option(None, "--data-root", help=_DATA_ROOT_HELP)) -> None:
    """List the subjects: name, class, kind (object or live) and number of images.

    The micro subjects (for `--model micro`) are always there; 'demo' is an alias of one of them.
    """
    from sparse_dreambooth import data

    rows = [("SUBJECT", "CLASS", "KIND", "IMAGES", "SOURCE")]
    for subject in [*data.micro_subjects(), data.micro_subject(data.DEMO_SUBJECT)]:
        source = "micro world, rendered offline"
        if subject.name == data.DEMO_SUBJECT:
            source = f"alias of {data.MICRO_PREFIX}{data.DEMO_ALIAS_OF}"
        rows.append((subject.name, subject.class_name, subject.kind, str(len(subject.image_paths)), source))
    root = data.resolve_data_root(data_root)
    dataset_present = (root / data.PROMPTS_FILE).is_file()
    if dataset_present:
        for subject in data.list_subjects(root):
            rows.append((subject.name, subject.class_name, subject.kind, str(len(subject.image_paths)), "DreamBooth"))

    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    for row in rows:
        typer.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)).rstrip())
    if not dataset_present:
        typer.echo(
            f"The 30 DreamBooth subjects are not at {root}: run `sparse-db data download`, or pass --data-root.",
            err=True,
        )


@data_app.command("show")
def show(
    name: str = typer.Argument(..., help="Subject name, e.g. dog6, micro/teal_dog, or 'demo' (= micro/robot_toy)."),
    data_root: str | None = typer.Option(None, "--data-root", help=_DATA_ROOT_HELP),
    token: str = typer.Option("zjw", "--token", help="The rare token that stands for the subject in prompts."),
) -> None:
    """Show one subject: class, kind, image files, training prompt and its 25 evaluation prompts."""
    from sparse_dreambooth import data

    subject = data.find_subject(name, data_root)
    typer.echo(f"subject:  {subject.name}")
    typer.echo(f"class:    {subject.class_name}")
    typer.echo(f"kind:     {subject.kind}")
    typer.echo(f"prompt:   {data.instance_prompt(subject, token)}")
    typer.echo(f"images ({len(subject.image_paths)}):")
    for path in subject.image_paths:
        typer.echo(f"  {path}")
    typer.echo("evaluation prompts:")
    for prompt in data.evaluation_prompts(subject, token):
        typer.echo(f"  {prompt}")
