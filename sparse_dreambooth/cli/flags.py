"""Typer options generated from the config schema, so each setting is declared once (config.py).

Torch-free: the CLI imports this at start-up.
"""

import dataclasses
import functools
import inspect
import typing

import typer

from sparse_dreambooth.config import SECTIONS


def _unwrap_optional(annotation):
    arguments = [argument for argument in typing.get_args(annotation) if argument is not type(None)]
    return arguments[0] if arguments else annotation


def _fields(sections):
    return [setting for section in sections for setting in dataclasses.fields(SECTIONS[section])]


def list_settings(sections=tuple(SECTIONS)) -> set[str]:
    """The keys of `sections` the schema types as lists (given on the command line comma-separated)."""
    return {setting.name for setting in _fields(sections) if setting.type is list}


def setting_options(sections=tuple(SECTIONS)) -> list[inspect.Parameter]:
    """One --flag per config key of `sections`, typed and documented from the schema.

    Every flag defaults to None (not given), so the caller can tell it from a YAML value. Lists
    are comma-separated strings; booleans get --key/--no-key.
    """
    parameters = []
    for section in sections:
        for setting in dataclasses.fields(SECTIONS[section]):
            is_list = setting.type is list
            value_type = str if is_list else _unwrap_optional(setting.type)
            declaration = f"--{setting.name.replace('_', '-')}"
            if value_type is bool:
                declaration = f"{declaration}/--no-{setting.name.replace('_', '-')}"
            help_text = setting.metadata["help"] + (" (comma-separated)" if is_list else "")
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


def split_lists(flags: dict, list_keys: set[str]) -> dict:
    """Comma-separated values of the list-typed keys as lists; other values unchanged."""
    return {
        key: [item.strip() for item in value.split(",") if item.strip()]
        if key in list_keys and value is not None
        else value
        for key, value in flags.items()
    }


def with_settings(*sections: str):
    """Decorate a command `f(own options..., **settings)` with one flag per config key of `sections`.

    The command declares its own options in an ordinary typed signature; the schema's flags are
    appended after them, and the command receives those as `settings` (None when not given, list
    keys already split into lists).
    """

    def decorate(command):
        own = [
            parameter
            for parameter in inspect.signature(command).parameters.values()
            if parameter.kind is not inspect.Parameter.VAR_KEYWORD
        ]
        options = setting_options(sections)
        names, list_keys = {option.name for option in options}, list_settings(sections)

        @functools.wraps(command)
        def wrapper(*args, **kwargs):
            settings = {name: kwargs.pop(name) for name in list(kwargs) if name in names}
            return command(*args, **kwargs, **split_lists(settings, list_keys))

        parameters = own + options
        wrapper.__signature__ = inspect.Signature(parameters)
        hints = typing.get_type_hints(command)
        wrapper.__annotations__ = {
            parameter.name: hints.get(parameter.name, parameter.annotation) for parameter in parameters
        }
        return wrapper

    return decorate
