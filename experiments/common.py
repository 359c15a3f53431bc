"""The one command-line harness every experiment's ``main`` uses.

    PRESETS = {"default": MyConfig, "smoke": MyConfig.smoke}

    def run(cfg: MyConfig, out: Path) -> dict:       # writes its plots into out, returns the results
        ...

    def main(argv=None, prog=None) -> int:
        return run_experiment("my_exp", PRESETS, lambda cfg, out, args: run(cfg, out), argv=argv, prog=prog,
                              doc=__doc__)

gives ``--preset`` (the first preset is the default), ``--set key=value`` (repeatable; several pairs
per flag; nested fields dotted, ``optim.lr=3e-4``), ``--list-config`` (print the resolved config as
JSON and exit), ``--out`` (default ``results/<experiment>/<preset>/``), ``--debug`` and, when the
config has a ``model`` field, ``--model SOURCE`` (= ``--set model=SOURCE``). Values are parsed by
the config field's type: lists ``a,b,c`` (or ``[a,b]``), bools ``true/false/1/0/yes/no``, ints,
floats, ``none`` for Optional fields. The run writes ``results.json`` (the returned results) and
``config.json`` (the resolved config) into ``--out`` and ends with the line ``wrote <paths>``.

Every user error (unknown key, a value of the wrong type, a config that fails validation, an
unwritable ``--out``, an unknown model, a missing file) is one line on stderr and exit status 2;
``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import collections.abc
import dataclasses
import difflib
import json
import os
import re
import sys
import tempfile
import time
import traceback
import types
import typing
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

__all__ = ["UsageError", "parse_value", "apply_overrides", "setting_keys", "check_model", "write_json",
           "preset_shortcut", "set_shortcut", "run_experiment"]

TRUE, FALSE, NONE = ("true", "1", "yes"), ("false", "0", "no"), ("none", "null")
# errors a user's input causes; anything else is a bug and keeps its traceback
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


class UsageError(ValueError):
    """A mistake in what was asked for (reported in one line, exit status 2)."""


# ----------------------------------------------------------------------------- typed values


def type_name(tp) -> str:
    """A reader's name for a field type: ``int``, ``list of int``, ``int or none``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("none" if a is type(None) else type_name(a) for a in args)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis or origin in (list, collections.abc.Sequence):
        return f"list of {type_name(args[0]) if args else 'str'} (a,b,c)"
    if origin is tuple:
        return f"{len(args)} comma-separated values ({', '.join(type_name(a) for a in args)})"
    if origin is typing.Literal:
        return "one of " + "/".join(map(str, args))
    if tp is bool:
        return "bool (true/false)"
    return getattr(tp, "__name__", str(tp))


def _items(text: str) -> list[str]:
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):  # [a,b]: the older list syntax
        text = text[1:-1]
    return [v.strip() for v in text.split(",") if v.strip()]


def _scalar(text: str, tp):
    low = text.strip().lower()
    if tp is bool:
        if low in TRUE or low in FALSE:
            return low in TRUE
        raise ValueError(text)
    if tp is int:
        return int(text)
    if tp is float:
        return float(text)
    if tp is str:
        return text
    raise TypeError(f"no command-line syntax for fields of type {tp!r}")


def guess_value(text: str):
    """A value of unknown type (free-form mappings): bool, none, int, float, else the string."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in NONE:
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_value(text: str, tp, key: str = "value"):
    """``text`` as a value of field type ``tp``; ``UsageError`` naming key, expected type and value."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    try:
        if tp is Any:
            return guess_value(text)
        if origin in (typing.Union, types.UnionType):
            if type(None) in args and text.strip().lower() in NONE:
                return None
            for arg in (a for a in args if a is not type(None)):
                try:
                    return parse_value(text, arg, key)
                except UsageError:
                    pass
            raise ValueError(text)
        if origin is typing.Literal:
            match = [a for a in args if str(a) == text]
            if not match:
                raise ValueError(text)
            return match[0]
        if origin in (tuple, list, collections.abc.Sequence):
            items = _items(text)
            if origin is tuple and args and args[-1] is not Ellipsis:  # fixed length, e.g. tuple[int, int]
                if len(items) != len(args):
                    raise ValueError(text)
                return tuple(_scalar(v, a) for v, a in zip(items, args))
            values = [_scalar(v, args[0] if args else str) for v in items]
            return values if origin is list else tuple(values)
        return _scalar(text, tp)
    except ValueError:
        raise UsageError(f"--set {key}={text}: expected {type_name(tp)}, got {text!r}") from None


# ----------------------------------------------------------------------------- dotted overrides


def setting_keys(cfg, prefix: str = "") -> list[str]:
    """Every key ``--set`` accepts for ``cfg`` (nested dataclass fields dotted; mappings as ``name.*``)."""
    keys = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            keys += setting_keys(value, f"{prefix}{f.name}.")
        elif isinstance(value, Mapping):
            keys.append(f"{prefix}{f.name}.*")
        else:
            keys.append(prefix + f.name)
    return keys


def _unknown(key: str, node, prefix: str) -> UsageError:
    valid = setting_keys(node, prefix)
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
    hint = f" (did you mean {' or '.join(close)}?)" if close else ""
    return UsageError(f"unknown key {key!r}{hint}; valid keys: {', '.join(valid)}")


def _apply(node, items: list[tuple[list[str], str]], prefix: str):
    """``node`` with every ``(path, text)`` assignment applied; one ``replace`` per dataclass, so
    ``__post_init__`` validates the finished config, not each step."""
    if isinstance(node, Mapping):  # free-form (e.g. a family's config kwargs): values typed by their text
        out = dict(node)
        for path, text in items:
            out[path[0]] = guess_value(text) if len(path) == 1 else _apply(out.get(path[0], {}), [(path[1:], text)],
                                                                           f"{prefix}{path[0]}.")
        return out
    if not dataclasses.is_dataclass(node):
        raise UsageError(f"{prefix[:-1]!r} is a value, not a section: set it as {prefix[:-1]}=VALUE")
    hints = typing.get_type_hints(type(node))
    names = [f.name for f in dataclasses.fields(node)]
    groups: dict[str, list] = {}
    for path, text in items:
        if path[0] not in names:
            raise _unknown(prefix + ".".join(path), node, prefix)
        groups.setdefault(path[0], []).append((path[1:], text))
    changes = {}
    for name, sub in groups.items():
        leaf = [text for rest, text in sub if not rest]
        current = getattr(node, name)
        if leaf and (dataclasses.is_dataclass(current) or isinstance(current, Mapping)):
            raise UsageError(f"{prefix}{name} is a section; set its fields, e.g. {setting_keys(node, prefix)[0]}=...")
        changes[name] = parse_value(leaf[-1], hints[name], prefix + name) if leaf else \
            _apply(current, sub, f"{prefix}{name}.")
    return dataclasses.replace(node, **changes)


def apply_overrides(cfg, pairs: Sequence[str]):
    """``cfg`` with ``key=value`` / ``a.b=value`` assignments applied (later ones win), typed by the fields."""
    items = []
    for pair in pairs:
        key, eq, text = pair.partition("=")
        if not eq or not key.strip():
            raise UsageError(f"--set {pair!r}: expected KEY=VALUE, e.g. {setting_keys(cfg)[0]}=...")
        items.append((key.strip().split("."), text))
    return _apply(cfg, items, "") if items else cfg


# ----------------------------------------------------------------------------- checks and writes


def check_model(source: str) -> None:
    """Refuse a model source ``ji.load`` cannot read, naming close embedded models; a hub id
    (``org/name``) is fetched here, so being offline is reported before any work starts."""
    from jaxinterp.loading import embedded_models, resolve_source

    names = embedded_models()
    path = Path(source).expanduser()
    if source in names or path.is_dir():
        return
    if path.exists():
        raise UsageError(f"model {source!r} is a file; expected an embedded name ({', '.join(names)}) or a model "
                         f"directory (config.json + *.safetensors)")
    if re.fullmatch(r"[\w.-]+/[\w.-]+", source) and not source.startswith("."):
        try:
            resolve_source(source)
            return
        except FileNotFoundError as err:
            cause = type(err.__cause__).__name__ if err.__cause__ else "not found"
            raise UsageError(f"model {source!r} is not an embedded model ({', '.join(names)}) or a local directory, "
                             f"and fetching it as a hub id failed ({cause}; hub ids need a network)") from None
    if "/" in source or source.startswith((".", "~")):
        raise UsageError(f"model directory {source!r} does not exist (embedded models: {', '.join(names)})")
    close = difflib.get_close_matches(source, names, n=3, cutoff=0.5)
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    raise UsageError(f"unknown model {source!r}: not an embedded model ({', '.join(names)}) nor a local "
                     f"directory{hint}")


def write_json(path: Path, obj) -> Path:
    """Atomic JSON write (temp file + rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str) + "\n")
    os.replace(tmp, path)
    return path


def _jsonable(cfg) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def _output_dir(out: str | None, name: str, preset: str, cfg, base) -> Path:
    """``--out``, or ``results/<name>/<preset>[-<model>]/`` (the model's name added when it is not the
    preset's, so another model never overwrites the preset's results); created and checked writable."""
    if out is None:
        model = getattr(cfg, "model", None) if "model" in _field_names(cfg) else None
        changed = isinstance(model, str) and model != getattr(base, "model")
        out = Path("results") / name / (f"{preset}-{Path(model).name}" if changed else preset)
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()
    except OSError as err:
        raise UsageError(f"cannot write to --out {out}: {err.strerror or err}") from None
    return out


def _field_names(cfg) -> set[str]:
    return {f.name for f in dataclasses.fields(cfg)}


def _get(cfg, key: str):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def preset_shortcut(flag: str, preset: str) -> Callable[[argparse.ArgumentParser], None]:
    """An ``add_arguments`` giving a flag that selects a preset (``--mamba`` = ``--preset facts-mamba``)."""
    def add(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(flag, dest="preset", action="store_const", const=preset, default=argparse.SUPPRESS,
                            help=f"= --preset {preset}")

    return add


class _SetAction(argparse.Action):
    """``--flag VALUE`` = ``--set key=VALUE`` (in command-line order with the other ``--set``)."""

    def __init__(self, option_strings, dest, key: str, **kw):
        super().__init__(option_strings, "sets", default=argparse.SUPPRESS, **kw)
        self.key = key

    def __call__(self, parser, namespace, value, option_string=None):
        setattr(namespace, "sets", [*getattr(namespace, "sets", []), f"{self.key}={value}"])


def set_shortcut(parser: argparse.ArgumentParser, flag: str, key: str, help: str) -> None:
    """Add ``flag VALUE`` meaning ``--set key=VALUE`` (so it is checked, typed and saved like one)."""
    parser.add_argument(flag, action=_SetAction, key=key, metavar=key.split(".")[-1].upper(), help=help)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage + message
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


# ----------------------------------------------------------------------------- the harness


def run_experiment(name: str, presets: Mapping[str, Callable[[], Any]],
                   main_fn: Callable[[Any, Path, argparse.Namespace], dict], *, argv: Sequence[str] | None = None,
                   prog: str | None = None, doc: str | None = None, model_keys: Sequence[str] = ("model",),
                   add_arguments: Callable[[argparse.ArgumentParser], None] | None = None) -> int:
    """Parse the command line, resolve the config, run ``main_fn(cfg, out, args) -> results`` and
    write ``results.json`` + ``config.json``; returns the exit status.

    ``presets``: name -> zero-argument config factory (the first is the default). ``model_keys``:
    dotted config keys holding a ``ji.load`` source, checked before the run. ``add_arguments``:
    the experiment's own flags (run controls that are not part of the config).
    """
    default = next(iter(presets))
    base = presets[default]()
    parser = _Parser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=list(presets), default=default,
                        help=f"named configuration (default {default}; --list-config shows it)")
    parser.add_argument("--set", dest="sets", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override config fields (repeatable): n=8, lists a,b,c, bools true/false, none, "
                             "nested optim.lr=3e-4")
    if "model" in _field_names(base) and isinstance(base.model, str):
        set_shortcut(parser, "--model", "model", f"any ji.load source: embedded name, local HF directory or hub id "
                                                 f"(= --set model=SOURCE; default {base.model})")
    parser.add_argument("--out", help=f"output directory (default results/{name}/<preset>/)")
    parser.add_argument("--list-config", action="store_true", help="print the resolved config as JSON and exit")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    if add_arguments is not None:
        add_arguments(parser)
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help, or an argparse error (already printed)
        return stop.code or 0
    try:
        preset = presets[args.preset]()
        try:
            cfg = apply_overrides(preset, args.sets)
        except ValueError as err:  # the config's own validation: a usage error too
            raise UsageError(str(err)) from err
        if args.list_config:
            print(json.dumps(_jsonable(cfg), indent=2))
            return 0
        for key in model_keys:
            if key.split(".")[0] in _field_names(cfg) and isinstance(_get(cfg, key), str):
                check_model(_get(cfg, key))
        out = _output_dir(args.out, name, args.preset, cfg, preset)
        t0 = time.time()
        results = main_fn(cfg, out, args)
        written = [write_json(out / "results.json", results), write_json(out / "config.json", _jsonable(cfg))]
        written += sorted(p for p in out.iterdir() if p.stat().st_mtime >= int(t0) and p not in written
                          and not p.name.startswith("."))
        print("wrote " + ", ".join(f"{p}/" if p.is_dir() else str(p) for p in written))
        return 0
    except USER_ERRORS as err:
        if args.debug:
            traceback.print_exc()
        message = " ".join(str(err).split()) or type(err).__name__
        hint = "" if isinstance(err, UsageError) or args.debug else " (--debug shows the traceback)"
        print(f"{parser.prog}: error: {message}{hint}", file=sys.stderr)
        return 2
