"""CLI options generated from settings dataclasses: the field's ``metadata["help"]`` is its only
documentation.

``add_settings_options(parser, ProbeSettings, prefix="probe")`` adds ``--probe-max-rank`` etc.;
``settings_from_args(args, ProbeSettings, prefix="probe")`` builds the settings object from what the user gave
(defaults stay the dataclass's own). Only scalar, tuple and mapping fields with a ``help`` are exposed.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import typing
from typing import Any

from allocator.errors import InputError

# (settings class name, field name) -> the option string of the parser built last; lets error messages that
# name
# a settings field (``SolverSettings.ranks``, ``ProbeSettings(skip_nonfinite=True)``) name the flag instead
FLAGS: dict[tuple[str, str], str] = {}
# argument names with an underscore (``alpha_ratio``, ``retention_data``) -> their flag, from the parser built
# last
ARGUMENTS: dict[str, str] = {}
_FIELD = re.compile(r"\b([A-Z]\w*Settings)\.(\w+)\b")
_CALL = re.compile(r"\b([A-Z]\w*Settings)\((\w+)=([^)]*)\)")


def cli_message(text: str) -> str:
    """``text`` as a command-line user reads it: settings fields the current parser exposes become their flags
    (``ProbeSettings.max_rank`` -> ``--probe-max-rank``; ``ProbeSettings(skip_nonfinite=True)`` ->
    ``--probe-skip-nonfinite true``). Unknown names stay as they are."""

    def call(m: re.Match) -> str:
        flag = FLAGS.get((m[1], m[2]))
        return m[0] if flag is None else f"{flag} {m[3].strip().strip(chr(39)).lower()}"

    def field(m: re.Match) -> str:
        return FLAGS.get((m[1], m[2]), m[0])

    text = _FIELD.sub(field, _CALL.sub(call, text))
    if ARGUMENTS:
        names = "|".join(sorted(map(re.escape, ARGUMENTS), key=len, reverse=True))
        text = re.sub(rf"(?<![\w.-])({names})(?![\w-])", lambda m: ARGUMENTS[m[1]], text)
    return text


class Parser(argparse.ArgumentParser):
    """argparse with one ``error:`` line (naming ``--help``) for a usage error, like every other failure;
    exit 2.

    Building one also registers its underscored argument names for :func:`cli_message`.
    """

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"error: {message}; see {self.prog} --help\n")

    # type: ignore[override]
    def parse_args(self, args: Any = None, namespace: Any = None) -> argparse.Namespace:
        ARGUMENTS.clear()
        for action in self._actions:
            longs = [o for o in action.option_strings if o.startswith("--")]
            if longs and "_" in action.dest:
                ARGUMENTS[action.dest] = longs[0]
        return super().parse_args(args, namespace)


def _option(prefix: str, name: str) -> str:
    return f"--{prefix + '-' if prefix else ''}{name.replace('_', '-')}"


def _dest(prefix: str, name: str) -> str:
    return f"{prefix + '_' if prefix else ''}{name}"


def _base_type(hint: Any) -> Any:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if (
        typing.get_origin(hint) in (typing.Union, getattr(__import__("types"), "UnionType", None))
        and len(args) == 1
    ):
        return _base_type(args[0])
    return hint


def _parse_value(text: str, hint: Any) -> Any:
    hint = _base_type(hint)
    origin = typing.get_origin(hint)
    if hint is bool:
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected true/false, got {text!r}")
    if hint in (int, float, str):
        return hint(text)
    if origin in (tuple, list):
        inner = [a for a in typing.get_args(hint) if a is not Ellipsis] or [str]
        items = [t for t in text.replace(" ", "").split(",") if t]
        return tuple(_parse_value(t, inner[0]) for t in items)
    if origin in (dict, typing.Mapping) or hint in (dict,) or str(origin).endswith("Mapping"):
        # family=lo:hi,other=lo:hi  ->  {"family": (lo, hi)}
        out: dict[str, Any] = {}
        for item in text.split(","):
            if not item.strip():
                continue
            if "=" not in item:
                raise ValueError(f"expected KEY=VALUE items separated by commas, got {item!r}")
            key, value = item.split("=", 1)
            if ":" in value:
                lo, hi = value.split(":", 1)
                out[key.strip()] = (float(lo), float(hi))
            else:
                out[key.strip()] = float(value)
        return out
    return text


def _exposed_fields(cls: type) -> list[tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls) if f.metadata.get("help") and f.init]


def add_settings_options(
    parser: argparse.ArgumentParser,
    cls: type,
    *,
    prefix: str = "",
    title: str = "",
    aliases: dict[str, str] | None = None,
) -> None:
    """Add one option per documented field; ``aliases`` maps a field name to an extra, shorter flag."""
    aliases = aliases or {}
    group = parser.add_argument_group(title or f"{cls.__name__} options")
    for f, _hint in _exposed_fields(cls):
        default = (
            f.default
            if f.default is not dataclasses.MISSING
            else (f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        )
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        flags = [_option(prefix, f.name)] + ([aliases[f.name]] if f.name in aliases else [])
        FLAGS[(cls.__name__, f.name)] = flags[-1]
        spec = f.metadata.get("range")
        group.add_argument(
            *flags,
            dest=_dest(prefix, f.name),
            default=None,
            metavar=f.name.upper(),
            help=(
                f"{f.metadata['help']} (default: {shown}" + (f"; {spec}" if spec is not None else "") + ")"
            ).replace("%", "%%"),  # argparse formats help with %
        )


def settings_from_args(args: argparse.Namespace, cls: type, *, prefix: str = "", **overrides: Any) -> Any:
    kwargs: dict[str, Any] = {}
    for f, hint in _exposed_fields(cls):
        text = getattr(args, _dest(prefix, f.name), None)
        if text is None:
            continue
        try:
            kwargs[f.name] = _parse_value(text, hint)
        except ValueError as exc:
            raise InputError(f"{_option(prefix, f.name)}: {exc}") from None
    kwargs.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return cls(**kwargs)
    except InputError:
        raise
    except (TypeError, ValueError) as exc:
        raise InputError(str(exc)) from None
