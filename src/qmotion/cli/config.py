"""Configuration files of the services: ``/etc/qmotion/manager.toml`` and ``agent.toml``.

Every flag of ``qmotion server`` and ``qmotion agent`` has a key of the same name (``-`` or
``_`` alike: ``token-file`` or ``token_file``); a flag given on the command line overrides the
file. The file is read by the standard library's TOML parser before the other options, so its
values become their defaults (click's ``default_map``); an unknown key or a value of the wrong
type is refused naming the key.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import typer

ETC = Path("/etc/qmotion")


def _norm(key: str) -> str:
    return key.replace("-", "_")


def load(path: Path, params: Mapping[str, Any]) -> dict[str, Any]:
    """``params``: the command's parameters by name (click's, as Typer bundles it)."""
    """The file's keys as the command's parameter names; refuses unknown keys and types."""
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise typer.BadParameter(
            f"cannot read {path}: {exc.strerror}", param_hint="--config"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise typer.BadParameter(
            f"{path} is not valid TOML: {exc}", param_hint="--config"
        ) from None
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = _norm(key)
        param = params.get(name)
        if param is None or name == "config":
            known = ", ".join(sorted(k.replace("_", "-") for k in params if k != "config"))
            raise typer.BadParameter(
                f"{path}: unknown key {key!r} (keys: {known})", param_hint="--config"
            )
        if param.multiple and not (isinstance(value, list) and all(_scalar(v) for v in value)):
            raise typer.BadParameter(
                f'{path}: {key} must be a list, e.g. {key} = ["..."]', param_hint="--config"
            )
        if not param.multiple and not _scalar(value):
            raise typer.BadParameter(
                f"{path}: {key} must be a string, number or boolean", param_hint="--config"
            )
        # Click converts defaults like command-line text: a path or a size as a string.
        out[name] = [str(v) for v in value] if param.multiple else value
    return out


def _scalar(value: object) -> bool:
    return isinstance(value, str | int | float | bool)


def option(default: Path | None, what: str) -> Any:
    """The ``--config`` option: eager, so the file is read before every other option."""

    def read(ctx: typer.Context, param: typer.CallbackParam, value: Path | None) -> Path | None:
        path = value if value is not None else default
        if path is None or (value is None and not path.exists()):
            return value  # the default file is optional; a named one must exist
        params = {p.name: p for p in ctx.command.params if p.name}
        ctx.default_map = {**(ctx.default_map or {}), **load(path, params)}
        return path

    return typer.Option(
        None,
        "--config",
        help=f"TOML file of {what}'s settings, one key per flag (default: {default}, if it "
        "exists); flags override it.",
        callback=read,
        is_eager=True,
    )


def dump(values: Mapping[str, str | int | float | bool | list[str]], header: str = "") -> str:
    """A flat TOML document (what ``agent join`` writes)."""
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    for key, value in values.items():
        lines.append(f"{key.replace('_', '-')} = {_toml(value)}")
    return "\n".join(lines) + "\n"


def _toml(value: str | int | float | bool | list[str]) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'
