"""Fill a frozen config dataclass from defaults, a YAML file, environment variables and CLI flags.

Each component (balancer, worker, cluster) declares its settings once, as a frozen dataclass whose fields
carry their help text (`setting(...)`); this module derives the argparse CLI, the YAML keys and the
environment variable names from it, so a default or a name is never written twice. Precedence, lowest first:
dataclass default < YAML (`--config FILE`) < environment (`PREFIX_FIELD_NAME`) < explicit CLI flag.

This module is dependency-free apart from PyYAML and knows nothing of the balancer: `workers` imports it too
(the one exception to "lb and workers meet over HTTP only", because a config loader is not behaviour).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

C = TypeVar("C")


class ConfigError(ValueError):
    """A setting is unknown or has a bad value; the message names the key."""


def setting(
    default: Any, help: str, *, choices: Sequence[str] | None = None, metavar: str | None = None
) -> Any:
    """A dataclass field that also describes its CLI flag. Tuples are stored as immutable defaults."""
    metadata = {"help": help, "choices": tuple(choices) if choices else None, "metavar": metavar}
    return dataclasses.field(default=default, metadata=metadata)


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def _base_type(annotation: Any) -> tuple[Any, bool]:
    """(the type without `| None`, whether None is allowed)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return annotation, False


def _is_tuple_of_str(tp: Any) -> bool:
    return typing.get_origin(tp) is tuple


def coerce(key: str, value: Any, annotation: Any) -> Any:
    """Convert a YAML, env or CLI value to the field's type, or raise ConfigError naming the key."""
    tp, optional = _base_type(annotation)
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and optional):
        if optional:
            return None
        raise ConfigError(f"{key}: a value is required")
    try:
        if _is_tuple_of_str(tp):
            items = value if isinstance(value, list | tuple) else [value]
            parts: list[str] = []
            for item in items:
                parts.extend(p.strip() for p in str(item).split(",") if p.strip())
            return tuple(parts)
        if tp is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"not a boolean: {value!r}")
        if tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(f"not an integer: {value!r}")
            return int(value)
        if tp is float:
            if isinstance(value, bool):
                raise ValueError(f"not a number: {value!r}")
            return float(value)
        if tp is str:
            if isinstance(value, dict | list):
                raise ValueError(f"not a string: {value!r}")
            return str(value)
    except ValueError as exc:
        raise ConfigError(f"{key}: {exc}") from None
    return value


def _fields(cls: type[Any]) -> dict[str, tuple[dataclasses.Field[Any], Any]]:
    hints = typing.get_type_hints(cls)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(cls) if f.init}


def build_parser(cls: type[Any], prog: str, description: str) -> argparse.ArgumentParser:
    """One long flag per field, with the field's help and its default shown."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", metavar="FILE", help="YAML file whose keys are these flags' names")
    for name, (field, annotation) in _fields(cls).items():
        tp, _ = _base_type(annotation)
        meta = field.metadata
        default = field.default if field.default is not dataclasses.MISSING else None
        kwargs: dict[str, Any] = {
            "dest": name,
            "default": argparse.SUPPRESS,
            "help": (meta.get("help") or "")
            + (f" (default: {default!r})" if default not in (None, ()) else ""),
        }
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif _is_tuple_of_str(tp):
            kwargs["action"] = "append"
            kwargs["metavar"] = meta.get("metavar") or "VALUE"
        else:
            if meta.get("choices"):
                kwargs["choices"] = meta["choices"]
            kwargs["metavar"] = meta.get("metavar") or (None if meta.get("choices") else name.upper())
        parser.add_argument(flag_name(name), **kwargs)
    return parser


def read_yaml(path: str | Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of settings")
    return data


def from_mapping(cls: type[C], values: Mapping[str, Any], source: str = "config") -> C:
    """Build `cls` from a mapping whose keys are field names (dashes or underscores). Unknown keys fail."""
    return _construct(cls, coerce_mapping(cls, values, source))


def coerce_mapping(cls: type[Any], values: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Validate the keys of a partial mapping of settings and coerce its values, without building `cls`."""
    fields = _fields(cls)
    out: dict[str, Any] = {}
    for raw_key, value in values.items():
        key = str(raw_key).lstrip("-").replace("-", "_")
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"unknown key {raw_key!r} in {source}; known keys: {known}")
        out[key] = coerce(key, value, fields[key][1])
    return out


def _construct(cls: type[C], kwargs: dict[str, Any]) -> C:
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(str(exc)) from None


def load_config(
    cls: type[C],
    argv: Sequence[str] | None,
    *,
    prog: str,
    description: str,
    env_prefix: str,
    environ: Mapping[str, str] | None = None,
    translate_yaml: Callable[[dict[str, Any], str], Mapping[str, Any]] | None = None,
    sources: dict[str, str] | None = None,
) -> C:
    """Parse argv (exits with usage on --help or a bad flag), merge YAML and env, validate, return `cls`.

    `translate_yaml(data, source)` rewrites the YAML mapping into field names first, for a component that also
    reads another file format (the launcher reads the seed's cluster YAML). `sources`, when given, is filled
    with where each set field came from ("config file F", "environment VAR", "flag --name"); a field
    missing from it kept its default.
    """
    origin: dict[str, str] = {} if sources is None else sources
    parser = build_parser(cls, prog, description)
    args = vars(parser.parse_args(argv))
    fields = _fields(cls)
    merged: dict[str, Any] = {}
    config_path = args.pop("config", None)
    if config_path:
        source = f"config file {config_path}"
        yaml_values = read_yaml(config_path)
        if translate_yaml is not None:
            yaml_values = dict(translate_yaml(yaml_values, source))
        from_yaml = coerce_mapping(cls, yaml_values, source)
        merged.update(from_yaml)
        origin.update(dict.fromkeys(from_yaml, source))
    env = os.environ if environ is None else environ
    for name, (_, annotation) in fields.items():
        env_key = env_prefix + name.upper()
        if env_key in env:
            merged[name] = coerce(env_key, env[env_key], annotation)
            origin[name] = f"environment {env_key}"
    for name, value in args.items():
        merged[name] = coerce(flag_name(name), value, fields[name][1])
        origin[name] = f"flag {flag_name(name)}"
    return _construct(cls, merged)
