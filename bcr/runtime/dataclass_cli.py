"""Configuration as plain data: a dataclass filled from a YAML file, then ``key=value`` overrides.

Used by every ``bcr`` command::

    cfg = parse_cli(BCRConfig, ["--config", "cfg.yaml", "learning_rate=1e-5", "n_problems={2: 1, 3: 1}"])

Values are parsed as YAML scalars/collections, so ``3``, ``1e-5``, ``true``, ``[1, 2, 4]`` and
``{2: 0.5, 3: 0.5}`` mean what they look like. Help text for a field comes from
``field(metadata={"help": ...})``.

``check_fields(obj)`` (called by each config's ``__post_init__``) holds every value to its field's
annotation, so a config class states its types once and gets the same errors everywhere: ``int``
takes whole numbers only (``1.5`` is refused, ``2.0`` and ``"3"`` become ints), ``float`` takes
finite numbers only (NaN and inf are refused), a list or mapping where a scalar belongs is refused
with the option's name, a single value where a list belongs is checked as one item (the class
decides whether one item may stand for the list), and ``None`` (also written ``None`` on the
command line) is taken only by ``X | None`` fields.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence, TypeVar

import yaml

T = TypeVar("T")


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-4`` (no dot) as a string; configs mean a float, so resolve it as one."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _yaml_load(text: str):
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


class ConfigError(ValueError):
    """A configuration the user wrote cannot be used; the message names the key and the fix."""


def _kind_name(value: Any) -> str:
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    return f"a {type(value).__name__}"


def _to_int(name: str, value: Any) -> int:
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ConfigError(f"{name}={value!r}: expected an integer") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name}={value!r}: expected an integer, not {_kind_name(value)}")
    if not (math.isfinite(value) and float(value).is_integer()):
        raise ConfigError(f"{name}={value!r}: expected an integer")
    return int(value)


def _to_float(name: str, value: Any) -> float:
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ConfigError(f"{name}={value!r}: expected a number") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name}={value!r}: expected a number, not {_kind_name(value)}")
    if not math.isfinite(value):
        raise ConfigError(f"{name}={value!r}: expected a finite number")
    return float(value)


def _to_str(name: str, value: Any) -> str:
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise ConfigError(f"{name}={value!r}: expected a string, not {_kind_name(value)}")
    return value


def _to_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{name}={value!r}: expected true or false")
    return value


_SCALARS = {"int": _to_int, "float": _to_float, "str": _to_str, "bool": _to_bool}


def _to_list(name: str, value: Any, item: str | None) -> Any:
    if isinstance(value, Mapping):
        raise ConfigError(f"{name}={value!r}: expected a list, not a mapping")
    convert = _SCALARS.get(item or "")
    if not isinstance(value, (list, tuple)):  # one item: checked, and left to the class to wrap (or refuse)
        return convert(name, value) if convert else value
    return [convert(name, v) for v in value] if convert else list(value)


def _coerce(name: str, value: Any, annotation: str) -> Any:
    kinds = [k.strip() for k in annotation.split("|")]
    optional = "None" in kinds
    kinds = [k for k in kinds if k != "None"]
    if len(kinds) != 1:  # e.g. ``int | dict``: the config checks such a field itself
        return value
    if optional and (value is None or value == "None"):
        return None
    if value is None:
        raise ConfigError(f"{name}=None: a value is required")
    kind = kinds[0]
    if kind in _SCALARS:
        return _SCALARS[kind](name, value)
    if kind == "list" or kind.startswith("list["):
        return _to_list(name, value, kind[5:-1] if kind.startswith("list[") else None)
    if kind == "dict" or kind.startswith("dict["):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{name}={value!r}: expected a mapping such as {{key: value}}")
        return dict(value)
    return value


def check_fields(obj) -> None:
    """Hold every field of the dataclass ``obj`` to its annotation (see the module docstring);
    converts in place and raises ``ConfigError`` naming the field."""
    for f in dataclasses.fields(obj):
        annotation = f.type.__name__ if isinstance(f.type, type) else str(f.type)
        setattr(obj, f.name, _coerce(f.name, getattr(obj, f.name), annotation))


def _field_names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _check_keys(cls, keys, where: str) -> None:
    names = _field_names(cls)
    for key in keys:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"unknown option {key!r} in {where} for {cls.__name__}.{hint}")


def parse_override(text: str) -> tuple[str, Any]:
    """``"key=value"`` -> ``(key, yaml-parsed value)``."""
    if "=" not in text:
        raise ConfigError(f"expected key=value, got {text!r}")
    key, raw = text.split("=", 1)
    key = key.strip().lstrip("-").replace("-", "_")
    try:
        value = _yaml_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def load_dataclass(cls: type[T], config_path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Build ``cls`` from an optional YAML mapping, then apply ``key=value`` overrides in order."""
    values: dict[str, Any] = {}
    if config_path is not None:
        path = Path(config_path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist; pass an existing YAML file to --config")
        try:
            loaded = _yaml_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path} is not valid YAML: {err}") from err
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path} must hold a mapping of option: value, got {type(loaded).__name__}")
        _check_keys(cls, loaded, str(path))
        values.update(loaded)
    for text in overrides:
        key, value = parse_override(text)
        _check_keys(cls, [key.partition(".")[0]], "the command line")
        values[key] = value
    return cls(**nested_options(cls, values))


def nested_options(cls: type, values: Mapping[str, Any], current: Any = None,
                   where: str = "the configuration") -> dict[str, Any]:
    """The keyword arguments of ``cls`` from ``values``, in which an option that holds a dataclass
    (say ``rl``, a ``BCRConfig``) may be set field by field: by a dotted key (``rl.learning_rate=1e-3``)
    or by a mapping of some of its fields (``rl: {learning_rate: 1e-3}`` in YAML). Its other fields
    keep their values in ``current`` (an instance of ``cls``), else the option's default; keys are
    checked at every level."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    out: dict[str, Any] = {}
    for key, value in values.items():
        name, dot, rest = key.partition(".")
        _check_keys(cls, [name], where)
        if name in out:
            inner = out[name]
        elif current is not None:
            inner = getattr(current, name)
        elif fields[name].default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            inner = fields[name].default_factory()  # type: ignore[misc]
        else:
            inner = fields[name].default
        if dot:
            value = {rest: value}
        if dataclasses.is_dataclass(inner) and isinstance(value, Mapping):
            kwargs = nested_options(type(inner), value, inner, f"section {name!r}")
            try:
                value = dataclasses.replace(inner, **kwargs)
            except ConfigError as err:  # "temperature=nan: ..." -> "rl.temperature=nan: ..."
                text = str(err)
                raise ConfigError(text if text.startswith(f"{name}.") else f"{name}.{text}") from None
        elif dot:
            raise ConfigError(f"option {name!r} of {cls.__name__} has no sub-options; write {name}=VALUE")
        out[name] = value
    return out


def dataclass_help(cls, prog: str = "") -> str:
    """One line per option: name, default and help text."""
    lines = [f"usage: {prog} [--config FILE.yaml] [key=value ...]", "", "options (key=value):"]
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = "(required)"
        help_text = f.metadata.get("help", "")
        lines.append(f"  {f.name} = {default!r}" + (f"\n      {help_text}" if help_text else ""))
    return "\n".join(lines)


def parse_cli(cls: type[T], argv: Sequence[str], prog: str) -> T | None:
    """Parse ``[--config FILE] [key=value ...]``; prints help and returns None for ``--help``."""
    argv = list(argv)
    if "-h" in argv or "--help" in argv:
        print(dataclass_help(cls, prog))
        return None
    config_path = None
    overrides = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("--config", "-c"):
            if i + 1 >= len(argv):
                raise ConfigError("--config needs a file path")
            config_path = argv[i + 1]
            i += 2
            continue
        if arg.startswith("--config="):
            config_path = arg.split("=", 1)[1]
        elif arg.startswith("--") and "=" not in arg and i + 1 < len(argv) and "=" not in argv[i + 1]:
            overrides.append(f"{arg[2:]}={argv[i + 1]}")  # --key value
            i += 2
            continue
        else:
            overrides.append(arg)
        i += 1
    return load_dataclass(cls, config_path, overrides)


def to_yaml(obj) -> str:
    """Dump a config dataclass as YAML that ``load_dataclass`` reads back."""
    return yaml.safe_dump(dataclasses.asdict(obj), sort_keys=False)
