"""Settings layers shared by ``medgemma-serve`` and ``medgemma-loadtest``: defaults -> YAML
file -> environment (one prefix) -> command-line flags.

Guarantees:
- One ``--flag`` per settings field, its description as the help text.
- ``load_layered`` validates field by field and raises ``SettingsError`` whose message names
  the flag and the environment variable of every field that is wrong.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from pydantic_settings import BaseSettings


class SettingsError(ValueError):
    """Settings that cannot start a server; the message says what to fix."""


def add_setting_flags(
    parser, settings_cls: type[BaseSettings], *, skip=frozenset(), repeated=frozenset()
) -> None:
    """One ``--flag`` per settings field, its description as the help text (shared by
    ``medgemma-serve`` and ``medgemma-loadtest``). ``repeated`` fields take the flag
    several times; booleans get ``--x/--no-x``; unset flags stay None (lower layers win)."""
    import argparse

    for name, field in settings_cls.model_fields.items():
        if name in skip:
            continue
        flag = "--" + name.replace("_", "-")
        annotation = field.annotation
        if name in repeated:
            parser.add_argument(flag, dest=name, action="append", default=None, help=field.description)
            continue
        if annotation in (bool, bool | None):
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None,
                                help=field.description)  # fmt: skip
            continue
        kind: Any = str
        if annotation in (int, int | None):
            kind = int
        elif annotation in (float, float | None):
            kind = float
        parser.add_argument(flag, dest=name, type=kind, default=None, help=field.description)


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError as exc:
        raise SettingsError(f"config file {path} does not exist") from exc
    except yaml.YAMLError as exc:
        raise SettingsError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise SettingsError(f"config file {path} must hold a mapping of setting: value")
    return {key.replace("-", "_"): value for key, value in data.items()}


def load_layered(
    settings_cls: type[BaseSettings],
    env_prefix: str,
    flags: dict[str, Any] | None,
    config_file: str | os.PathLike | None,
    *,
    what: str = "settings",
):
    """defaults -> YAML file -> environment -> flags, validated field by field (shared by
    ``medgemma-serve`` and ``medgemma-loadtest``); errors name the flag and variable."""
    layered: dict[str, Any] = read_yaml(config_file) if config_file else {}
    for name in settings_cls.model_fields:  # the environment beats the file
        if f"{env_prefix}{name}".upper() in os.environ:
            layered.pop(name, None)
    layered.update({k: v for k, v in (flags or {}).items() if v is not None})
    try:
        return settings_cls(**layered)
    except ValidationError as exc:
        raise SettingsError(explain_validation(exc, settings_cls, env_prefix, what)) from None


def explain_validation(exc: ValidationError, settings_cls: type[BaseSettings], env_prefix: str, what: str) -> str:
    lines = [f"invalid {what}:"]
    for error in exc.errors():
        where = ".".join(str(p) for p in error["loc"]) or what
        field = str(error["loc"][0]) if error["loc"] else ""
        hint = ""
        if field in settings_cls.model_fields:
            hint = f" (flag --{field.replace('_', '-')}, env {env_prefix}{field.upper()})"
        lines.append(f"  {where}: {error['msg']}{hint}")
    return "\n".join(lines)
