"""Typer options generated from the config schema, so each setting is declared once (config.py).

Torch-free: the CLI modules import this at start-up.
"""

import dataclasses
import inspect
import typing

import typer

from sparse_dreambooth.config import SECTIONS


def _unwrap_optional(annotation):
    arguments = [argument for argument in typing.get_args(annotation) if argument is not type(None)]
    return arguments[0] if arguments else annotation


def setting_options(sections=tuple(SECTIONS)) -> list[inspect.Parameter]:
    """One --flag per config key of `sections`, typed and documented from the schema.

    Every flag defaults to None (not given), so the caller can tell it from a YAML value. Lists
    are comma-separated strings; booleans get --key/--no-key.
    """
    parameters = []
    for section in sections:
        for setting in dataclasses.fields(SECTIONS[section]):
            value_type = str if setting.type is list else _unwrap_optional(setting.type)
            declaration = f"--{setting.name.replace('_', '-')}"
            if value_type is bool:
                declaration = f"{declaration}/--no-{setting.name.replace('_', '-')}"
            help_text = setting.metadata["help"] + (" (comma-separated)" if setting.type is list else "")
            parameters.append(
                inspect.Parameter(
                    setting.name,
                    inspect.Parameter.KEYWORD_ONLY,
                    default=typer.Option(
                        None, declaration, help=help_text, rich_help_panel=f"{section} settings", show_default=False
                    ),
                    annotation=value_type | None,
                )
            )
    return parameters


def split_lists(flags: dict) -> dict:
    """Comma-separated list flags (targets) as lists; other values unchanged."""
    return {
        key: [item.strip() for item in value.split(",") if item.strip()]
        if key == "targets" and value is not None
        else value
        for key, value in flags.items()
    }


def with_parameters(command, parameters: list[inspect.Parameter]):
    """Give `command(**kwargs)` an explicit signature Typer reads its options from."""
    command.__signature__ = inspect.Signature(parameters)
    command.__annotations__ = {parameter.name: parameter.annotation for parameter in parameters}
    return command
