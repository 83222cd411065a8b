"""The command-line vocabulary of `allocate` and `allocate tune`, generated from the settings dataclasses.

One rule maps a flag to the API and to a config file (docs/cli.md has the whole table):

- a field ``F`` of a settings group is ``--PREFIX-F`` and ``GROUP.F`` in a config file (``_`` -> ``-``):
  ``data`` (:class:`~probes.settings.DataSettings`, ``--data-``), ``probes`` (``ProbeSettings``,
  ``--probe-``), ``utility`` (``UtilitySettings``, ``--utility-``), ``solver`` (``SolverSettings``,
  ``--solver-``), ``tune`` (``TuneSettings``, ``--tune-``) and ``lora`` (``LoraSettings``, no prefix: these
  are ``allocate``'s keyword arguments ``alpha_ratio``, ``use_rslora``, ``init``);
- a run argument of ``allocator.allocate`` / ``allocator.tune`` is ``--NAME`` and a top-level key (``-o`` is
  ``--out-dir``); the data sources keep their names, ``--data``, ``--eval-data``, ``--retention-data``,
  ``--init-data``, and sit in the ``data`` group as ``source``, ``eval_source``, ``retention_source``,
  ``init_source``;
- a boolean is a switch, ``--x`` / ``--no-x`` (``argparse.BooleanOptionalAction``).

The field's ``metadata["help"]`` is its only documentation. Old names (:data:`DEPRECATED`) keep working for
one release, with one note each naming the new flag. Error messages that name a settings field
(``ProbeSettings.max_rank``, ``ProbeSettings(skip_nonfinite=True)``) or an API argument (``retention_data``)
are rewritten by :func:`cli_message` to the flag a command-line user types.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import textwrap
import typing
from dataclasses import dataclass
from typing import Any

import allocator
from allocator.output.settings import LoraSettings
from allocator.scoring.utility import UtilitySettings
from allocator.solver.settings import SolverSettings
from allocator.tuning.settings import TuneSettings
from probes.settings import DataSettings, ProbeSettings

# (settings class name, field name) -> flag, and API argument name -> flag, of the parser built last
FLAGS: dict[tuple[str, str], str] = {}
ARGUMENTS: dict[str, str] = {}
KEYS: dict[str, str] = {}  # config key -> flag, of the parser built last
_SWITCHES: set[str] = set()  # boolean flags of the parser built last: cli_message writes --x / --no-x
_FIELD = re.compile(r"\b([A-Z]\w*Settings)\.(\w+)\b")
_CALL = re.compile(r"\b([A-Z]\w*Settings)\((\w+)=([^)]*)\)")
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


@dataclass(frozen=True)
class Group:
    """A settings dataclass as the CLI and config files see it."""

    key: str  # config-file key
    prefix: str  # flag prefix ('' = none)
    cls: type
    title: str
    skip: tuple[str, ...] = ()  # fields the command does not take


@dataclass(frozen=True)
class Arg:
    """A run argument (not a settings field): its config key, flags and the API keyword it becomes."""

    key: str  # 'budget', 'data.source'; 'model' is the positional MODEL
    flags: tuple[str, ...]
    help: str
    default: Any = None
    kind: str = "str"  # str | bool (a switch) | action (store_true; never in a config file) | positional
    api: str = ""  # the API keyword, where it differs from the key's last part
    metavar: str | None = None


GROUPS = {
    "data": Group("data", "data", DataSettings, "calibration data (config: data)"),
    "lora": Group("lora", "", LoraSettings, "LoRA (config: lora)"),
    "solver": Group("solver", "solver", SolverSettings, "solver (config: solver)"),
    "utility": Group("utility", "utility", UtilitySettings,
                     "utility: how probe signals become rank values (config: utility)"),
    "probes": Group("probes", "probe", ProbeSettings, "probes (config: probes)"),
    "tune": Group("tune", "tune", TuneSettings, "study and search space (config: tune)"),
}

MODEL = Arg("model", (), "hub id, local folder, or omitted for the built-in reference model",
            kind="positional")
REVISION = Arg("revision", ("--revision",), "hub revision of MODEL: a branch, tag or commit hash (default: "
                                            "the main branch; the plan records the commit)")
FUSED = Arg("fused_kernels", ("--fused-kernels",), "training runs with fused Mamba kernels: adapters on "
            "modules they bypass do nothing (--no-fused-kernels: a CPU or kernel-free run)", True, "bool")
REMOTE = Arg("trust_remote_code", ("--trust-remote-code",), "allow the model's own code from its folder or "
             "the hub (runs it with your rights)", False, "bool")
QUIET = Arg("quiet", ("-q", "--quiet"), "no progress bars: neither ours nor the libraries' (weight loading, "
            "downloads), and no kernel-fallback notices", False, "action")
CHAT_TEMPLATE = Arg("chat_template", ("--chat-template",), "a Jinja chat template file for chat (messages) "
                    "records when the model's tokenizer has none, or to replace its own", metavar="FILE")
DATA_FORMS = (".txt, .jsonl (text, chat messages, prompt + completion or response records), a datasets "
              "folder, 'builtin' (general text) or 'builtin-facts' (the demo task: facts to store)")
# what the library says to an API user -> what a command-line user types (cli_message)
_PHRASES = {"set tokenizer.chat_template": "give --chat-template FILE"}
OVERWRITE = Arg("overwrite", ("--overwrite",), "replace the files this tool wrote in the output folder "
                "(other files are kept)", False, "action")

DEPRECATED_COMMON = {"--output": "--out-dir", "--rslora": "--use-rslora"}
DEPRECATED = {
    "allocate": {
        **DEPRECATED_COMMON,
        **{f"--{n}": f"--data-{n}" for n in ("seq-len", "samples", "batch-size", "seed", "text-field",
                                               "encoding")},
        **{f"--{n}": f"--solver-{n}" for n in ("granularity", "ranks", "align", "required", "include",
                                                 "exclude", "time-limit", "mip-rel-gap", "presolve",
                                                 "reduce")},
        "--share": "--solver-share-bounds",
    },
    "tune": {
        **DEPRECATED_COMMON,
        "--study": "--study-name",
        **{f"--{f.name.replace('_', '-')}": f"--tune-{f.name.replace('_', '-')}"
           for f in dataclasses.fields(TuneSettings)},
    },
}


def cli_message(text: str) -> str:
    """``text`` as a command-line user reads it: settings fields and API arguments the current parser exposes
    become their flags (``ProbeSettings.max_rank`` -> ``--probe-max-rank``;
    ``ProbeSettings(skip_nonfinite=True)`` -> ``--probe-skip-nonfinite``; ``retention_data`` ->
    ``--retention-data``). Unknown names stay."""

    def call(m: re.Match) -> str:
        flag = FLAGS.get((m[1], m[2]))
        if flag is None:
            return m[0]
        value = m[3].strip().strip(chr(39))
        if flag in _SWITCHES and value.lower() in _TRUE + _FALSE:
            return flag if value.lower() in _TRUE else f"--no-{flag[2:]}"
        return f"{flag} {value.lower()}"

    text = _FIELD.sub(lambda m: FLAGS.get((m[1], m[2]), m[0]), _CALL.sub(call, text))
    for phrase, flag_phrase in _PHRASES.items():
        if flag_phrase.split()[1] in ARGUMENTS.values():
            text = text.replace(phrase, flag_phrase)
    if ARGUMENTS:
        names = "|".join(sorted(map(re.escape, ARGUMENTS), key=len, reverse=True))
        text = re.sub(rf"(?<![\w.-])({names})(?![\w-]|\.\w)", lambda m: ARGUMENTS[m[1]], text)
    return text


class Parser(argparse.ArgumentParser):
    """argparse with one ``error:`` line (naming ``--help``) for a usage error, like every other failure
    (exit 2), and the deprecated names of :data:`DEPRECATED` rewritten to the new ones with a note."""

    deprecated: dict[str, str] = {}

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"error: {message}; see {self.prog} --help\n")

    # type: ignore[override]
    def parse_args(self, args: Any = None, namespace: Any = None) -> argparse.Namespace:
        argv = list(sys.argv[1:] if args is None else args)
        switches = {s for a in self._actions if isinstance(a, argparse.BooleanOptionalAction)
                    for s in a.option_strings}
        return super().parse_args(modernise(argv, self.deprecated, switches), namespace)


def modernise(argv: list[str], deprecated: dict[str, str], switches: set[str]) -> list[str]:
    """``argv`` with old flag names replaced by new ones and ``--switch true|false`` by ``--switch`` /
    ``--no-switch``; one ``note:`` line on stderr for each old form used."""
    out: list[str] = []
    noted: set[str] = set()

    def note(old: str, new: str) -> None:
        if old not in noted:
            noted.add(old)
            print(f"note: {old} is deprecated and goes in the next release; use {new}", file=sys.stderr)

    i = 0
    while i < len(argv):
        token = argv[i]
        if token == "--":
            out += argv[i:]
            break
        old, eq, value = token.partition("=")
        name = deprecated.get(old, old)
        if name in switches and not name.startswith("--no-"):
            given = value if eq else (argv[i + 1] if i + 1 < len(argv) else "")
            if given.lower() in _TRUE + _FALSE and (eq or not given.startswith("-")):
                new = name if given.lower() in _TRUE else f"--no-{name[2:]}"
                note(f"{old} {given}", new)
                out.append(new)
                i += 1 if eq else 2
                continue
        if name != old:
            note(old, name)
        out.append(name + eq + value)
        i += 1
    return out


def flag_of(group: Group, name: str) -> str:
    return f"--{group.prefix + '-' if group.prefix else ''}{name.replace('_', '-')}"


def exposed_fields(group: Group) -> list[tuple[dataclasses.Field, Any]]:
    """(field, type hint) of every documented field the command takes, in declaration order."""
    hints = typing.get_type_hints(group.cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(group.cls)
            if f.metadata.get("help") and f.init and f.name not in group.skip]


def field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


def make_parser(prog: str, args: tuple[Arg, ...], groups: tuple[Group, ...], main: tuple[str, ...], *,
                 usage: str, description: str, epilog: str) -> Parser:
    """The parser: ``main`` (config keys) first under "most used options", then one heading per group;
    ``--config``, ``--print-config``, ``--version`` and ``-h`` in every config command."""
    parser = Parser(prog=prog, usage=usage, description=textwrap.fill(description, 110), epilog=epilog,
                    add_help=False, allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.deprecated = DEPRECATED.get(prog.split()[-1], {})
    FLAGS.clear()
    ARGUMENTS.clear()
    KEYS.clear()
    _SWITCHES.clear()
    first = parser.add_argument_group("most used options")
    rest = parser.add_argument_group("run")
    headings = {g.key: parser.add_argument_group(g.title) for g in groups}
    for arg in args:
        target = first if arg.key in main else headings.get(arg.key.split(".")[0], rest)
        _add_arg(target, arg)
    for group in groups:
        for f, hint in exposed_fields(group):
            key = f"{group.key}.{f.name}"
            _add_field(first if key in main else headings[group.key], group, f, hint)
    first.add_argument("--config", metavar="FILE", help="read settings from a YAML or JSON file, keys as "
                       "--print-config writes them; flags given here override it")
    first.add_argument("--print-config", action="store_true", help="print the full resolved configuration "
                       "(defaults < --config file < flags) as YAML and exit")
    rest.add_argument("--version", action="version", version=f"%(prog)s {allocator.__version__}",
                      help="print the version and exit")
    first.add_argument("-h", "--help", action="help", help="show this help and exit")
    return parser


def _add_arg(target: Any, arg: Arg) -> None:
    if arg.kind == "positional":
        target.add_argument(arg.key, nargs="?", default=None, help=arg.help)
        return
    shown = "" if arg.default is None or arg.kind == "action" else f" (default: {_shown(arg.default)})"
    kwargs: dict[str, Any] = {"dest": arg.key, "help": (arg.help + shown).replace("%", "%%")}
    if arg.kind == "action":
        kwargs.update(action="store_true", default=False)
    elif arg.kind == "bool":
        kwargs.update(action=argparse.BooleanOptionalAction, default=None)
        _SWITCHES.add(arg.flags[-1])
    else:
        kwargs.update(default=None, metavar=arg.metavar or arg.key.split(".")[-1].upper())
    target.add_argument(*arg.flags, **kwargs)
    KEYS[arg.key] = arg.flags[-1]
    api = arg.api or arg.key.split(".")[-1]
    if "_" in api:  # plain words (data, budget, storage) stay words in messages
        ARGUMENTS[api] = arg.flags[-1]


def _add_field(target: Any, group: Group, f: dataclasses.Field, hint: Any) -> None:
    flag = flag_of(group, f.name)
    FLAGS[(group.cls.__name__, f.name)] = KEYS[f"{group.key}.{f.name}"] = flag
    if not group.prefix:  # the lora group: allocate()'s own keyword arguments
        ARGUMENTS[f.name] = flag
    spec = f.metadata.get("range")
    text = f"{f.metadata['help']} (default: {_shown(field_default(f))}" + (f"; {spec}" if spec else "") + ")"
    kwargs: dict[str, Any] = {"dest": f"{group.key}.{f.name}", "default": None,
                              "help": text.replace("%", "%%")}
    if hint is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
        _SWITCHES.add(flag)
    else:
        kwargs["metavar"] = f.name.upper()
    target.add_argument(flag, **kwargs)


def _shown(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "none"
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items()) or "none"
    return "''" if value == "" else str(value)


def parse_value(text: str, hint: Any) -> Any:
    """A flag's text as the field's type: ``"0,4,8"`` -> ``(0, 4, 8)``; ``"attention=0.1:0.5"`` ->
    ``{"attention": (0.1, 0.5)}``; ValueError naming what was expected."""
    hint = _base_type(hint)
    origin = typing.get_origin(hint)
    if hint is bool:
        if text.lower() in _TRUE + _FALSE:
            return text.lower() in _TRUE
        raise ValueError(f"expected true/false, got {text!r}")
    if hint in (int, float, str):
        return hint(text)
    if origin in (tuple, list):
        inner = [a for a in typing.get_args(hint) if a is not Ellipsis] or [str]
        return tuple(parse_value(t, inner[0]) for t in text.replace(" ", "").split(",") if t)
    if origin in (dict, typing.Mapping) or hint is dict or str(origin).endswith("Mapping"):
        out: dict[str, Any] = {}  # family=lo:hi,other=v
        for item in filter(str.strip, text.split(",")):
            if "=" not in item:
                raise ValueError(f"expected KEY=VALUE items separated by commas, got {item!r}")
            key, value = item.split("=", 1)
            lo, colon, hi = value.partition(":")
            out[key.strip()] = (float(lo), float(hi)) if colon else float(value)
        return out
    return text


def _base_type(hint: Any) -> Any:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    union = typing.get_origin(hint) in (typing.Union, getattr(__import__("types"), "UnionType", None))
    return _base_type(args[0]) if union and len(args) == 1 else hint
