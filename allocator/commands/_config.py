"""Config files for `allocate --config` and `allocate tune --config`: read, checked, merged with the flags.

A config file is YAML or JSON (YAML's superset): run arguments at the top level, settings grouped by stage
under ``data``, ``probes``, ``utility``, ``solver``, ``lora`` (and ``tune``), every key named as
:mod:`allocator.commands._options` names it. The resolved value of a key is the flag's if given, else the
file's, else the default; ``--print-config`` prints all of them, and the plan records them
(``provenance["config"]``). Unknown keys and values of the wrong type are one-line errors
(:class:`~allocator.errors.InputError`, exit 2) naming the key (and the closest known one), before any work.
"""

from __future__ import annotations

import argparse
import difflib
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from allocator.commands._options import KEYS, Arg, Group, exposed_fields, field_default, parse_value
from allocator.errors import InputError
from probes.errors import ProbeError

_ARG_HINTS = {"str": str | None, "bool": bool}


@dataclass
class Resolved:
    """Every key's value (dotted keys), the settings objects built from them, and the file they came from."""

    values: dict[str, Any]
    settings: dict[str, Any] = field(default_factory=dict)
    file: str | None = None

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    def nested(self) -> dict[str, Any]:
        """The config-file form: top-level keys, then one mapping per group (tuples as lists)."""
        out: dict[str, Any] = {k: _plain(v) for k, v in self.values.items() if "." not in k}
        for key, value in self.values.items():
            head, _, leaf = key.rpartition(".")
            if head:
                out.setdefault(head, {})[leaf] = _plain(value)
        return out

    def record(self) -> dict[str, Any]:
        """What the plan's provenance keeps: the resolved config and the file it was read from."""
        return {"file": self.file, "values": self.nested()}


def resolve(args: argparse.Namespace, run_args: tuple[Arg, ...], groups: tuple[Group, ...]) -> Resolved:
    """Defaults < the ``--config`` file < flags given, checked; the groups' settings objects built."""
    specs = _specs(run_args, groups)
    values = {key: default for key, (_hint, default) in specs.items()}
    file = getattr(args, "config", None)
    if file is not None:
        values.update(read(file, specs))
    for key, (hint, _default) in specs.items():
        given = getattr(args, key, None)
        if given is None:
            continue
        if isinstance(given, str) and hint not in (str, str | None):
            try:
                given = parse_value(given, hint)
            except (TypeError, ValueError) as exc:
                raise InputError(f"{KEYS.get(key, key)}: {exc}") from None
        values[key] = given
    if getattr(args, "quiet", False) and "probes.progress" in values:
        values["probes.progress"] = False
    resolved = Resolved(values, file=None if file is None else str(file))
    for group in groups:
        resolved.settings[group.key] = _build(group, values)
        for f, _hint in exposed_fields(group):  # normalised as the settings object keeps it
            values[f"{group.key}.{f.name}"] = getattr(resolved.settings[group.key], f.name)
    return resolved


def _specs(run_args: tuple[Arg, ...], groups: tuple[Group, ...]) -> dict[str, tuple[Any, Any]]:
    """Config key -> (type hint, default) of every key a file may hold, in --print-config's order."""
    specs: dict[str, tuple[Any, Any]] = {}
    for arg in run_args:
        if arg.kind != "action":
            specs[arg.key] = (str | int if arg.key == "budget" else _ARG_HINTS.get(arg.kind, str | None),
                              arg.default)
    for group in groups:
        for f, hint in exposed_fields(group):
            specs[f"{group.key}.{f.name}"] = (hint, field_default(f))
    return specs


def _build(group: Group, values: dict[str, Any]) -> Any:
    kwargs = {f.name: values[f"{group.key}.{f.name}"] for f, _hint in exposed_fields(group)}
    try:
        return group.cls(**kwargs)
    except (InputError, ProbeError) as exc:
        raise InputError(str(exc)) from None
    except (TypeError, ValueError) as exc:
        raise InputError(f"{group.key}: {exc}") from None


def read(path: str, specs: dict[str, tuple[Any, Any]]) -> dict[str, Any]:
    """The file's values by dotted key, each checked against its type; InputError on anything else."""
    import yaml  # noqa: PLC0415 - only when a config file is given

    try:
        text = Path(path).expanduser().read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read the config file {path} ({getattr(exc, 'strerror', None) or exc}); "
                         "give a YAML or JSON file") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise InputError(f"{path} is not valid YAML or JSON{line} ({problem})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InputError(f"{path} holds a {type(data).__name__}; a config file is a mapping of keys "
                         "(see --print-config)")
    flat = _flatten(data, path, {k.split(".")[0] for k in specs if "." in k})
    unknown = [k for k in flat if k not in specs]
    if unknown:
        hints = [f"{k} (closest: {_closest(k, specs)})" for k in unknown]
        raise InputError(f"{path}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(hints)}; "
                         "--print-config lists every key")
    return {key: check_type(key, value, specs[key][0], path) for key, value in flat.items()}


def _flatten(data: dict, path: str, groups: set[str]) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        key = str(key)
        if key in groups:
            if not isinstance(value, dict):
                raise InputError(f"{path}: {key} must be a mapping of {key} settings, got "
                                 f"{_kind(value)}")
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return flat


def _closest(key: str, specs: dict[str, Any]) -> str:
    leaf = key.split(".")[-1]
    same_leaf = [k for k in specs if k.split(".")[-1] == leaf]
    if same_leaf:
        return same_leaf[0]
    matches = difflib.get_close_matches(key, list(specs), n=1, cutoff=0.0)
    return matches[0] if matches else "none"


def check_type(key: str, value: Any, hint: Any, path: str) -> Any:
    """``value`` as ``hint`` takes it (a YAML list -> a tuple; a number for a text field -> its text), or an
    InputError naming the key, what it must be and what it is."""
    optional = type(None) in typing.get_args(hint)
    base = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    kind = base[0] if len(base) == 1 else hint
    origin = typing.get_origin(kind)

    def wrong(what: str) -> InputError:
        return InputError(f"{path}: {key} must be {what}, got {_kind(value)}")

    if value is None:
        if optional:
            return None
        raise wrong(_name(kind))
    if kind is bool:
        if not isinstance(value, bool):
            raise wrong("true or false")
        return value
    if kind is int or kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise wrong("an integer" if kind is int else "a number")
        if kind is int and math.isfinite(value) and float(value).is_integer():
            return int(value)
        return value
    if origin in (tuple, list) or origin in (dict,) or str(origin).endswith("Mapping"):
        if isinstance(value, str):
            try:
                return parse_value(value, kind)
            except (TypeError, ValueError) as exc:
                raise wrong(f"{_name(kind)} ({exc})") from None
        if origin in (tuple, list):
            if not isinstance(value, (list, tuple)):
                raise wrong("a list")
            return tuple(value)
        if not isinstance(value, dict):
            raise wrong("a mapping")
        return {str(k): tuple(v) if isinstance(v, list) else v for k, v in value.items()}
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise wrong("a text" if kind is str else "a text or a number")
    return value if isinstance(value, str) or kind is not str else str(value)


def _name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (tuple, list):
        return "a list"
    if origin is dict or str(origin).endswith("Mapping"):
        return "a mapping"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a text"}.get(hint, str(hint))


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return f"{value!r} ({type(value).__name__})" if not isinstance(value, (dict, list)) else type(
        value).__name__


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def dump(resolved: Resolved) -> str:
    """The resolved configuration as YAML, in --print-config's order (run arguments first)."""
    import yaml  # noqa: PLC0415

    class Dumper(yaml.SafeDumper):  # lists on one line ([0, 4, 8]), mappings as blocks
        pass

    Dumper.add_representer(
        list, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True)
    )
    return yaml.dump(resolved.nested(), Dumper=Dumper, sort_keys=False, width=110)
