"""The command-line harness of every experiment:

    main = experiment_main("my_exp", {"default": MyConfig, "smoke": MyConfig.smoke}, run, doc=__doc__)
    # run(cfg, out) -> results: writes its plots into out; main(argv=None) -> exit status

gives ``--preset`` (the first is the default), ``--set key=value`` (repeatable; typed by the config
field: lists ``a,b,c`` or ``[a,b]``, bools ``true/false/1/0/yes/no``, ``none`` for Optional fields,
nested fields dotted ``optim.lr=3e-4``), ``--list-config``, ``--out`` (default
``results/<experiment>/<preset>/``), ``--debug`` and ``--model`` when the config has a ``model``.
A run writes ``results.json`` and ``config.json`` and ends with the line ``wrote <paths>``. Every
user error is one line on stderr and exit status 2 (``--debug``: with the traceback).
"""

from __future__ import annotations

import argparse
import collections.abc
import contextlib
import dataclasses
import difflib
import json
import re
import sys
import tempfile
import time
import traceback
import types
import typing
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

__all__ = ["UsageError", "parse_value", "apply_overrides", "setting_keys", "check_model", "write_json", "pyplot",
           "save_figure", "experiment_main"]

TRUE, FALSE, NONE = ("true", "1", "yes"), ("false", "0", "no"), ("none", "null")
# errors a user's input causes; anything else is a bug and keeps its traceback
USER_ERRORS = (ValueError, OSError)
SEQUENCES = (tuple, list, collections.abc.Sequence)


class UsageError(ValueError):
    """A mistake in what was asked for (reported in one line, exit status 2)."""


def type_name(tp) -> str:
    """A reader's name for a field type: ``int``, ``list of int (a,b,c)``, ``int or none``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("none" if a is type(None) else type_name(a) for a in args)
    if origin is tuple and args and args[-1] is not Ellipsis:
        return f"{len(args)} comma-separated values ({', '.join(map(type_name, args))})"
    if origin in SEQUENCES:
        return f"list of {type_name(args[0]) if args else 'str'} (a,b,c)"
    return "bool (true/false)" if tp is bool else getattr(tp, "__name__", str(tp))


def guess_value(text: str):
    """A value of unknown type (free-form mappings): int, float, bool, none, else the string."""
    for cast in (int, float):
        with contextlib.suppress(ValueError):
            return cast(text)
    return {"true": True, "false": False, "none": None, "null": None}.get(text.strip().lower(), text)


def parse_value(text: str, tp, key: str = "value"):
    """``text`` as a value of field type ``tp``; a ``UsageError`` names key, expected type and value."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    try:
        if origin in (typing.Union, types.UnionType):
            if type(None) in args and text.strip().lower() in NONE:
                return None
            for arg in (a for a in args if a is not type(None)):
                with contextlib.suppress(UsageError):
                    return parse_value(text, arg, key)
        elif origin in SEQUENCES:
            items = [v.strip() for v in text.strip().strip("[]").split(",") if v.strip()]  # a,b or [a,b]
            fixed = origin is tuple and args and args[-1] is not Ellipsis  # e.g. tuple[int, int]
            types_ = args if fixed else [(args or (str,))[0]] * len(items)
            if len(items) == len(types_):
                values = [parse_value(v, a, key) for v, a in zip(items, types_)]
                return values if origin is list else tuple(values)
        elif tp is bool and text.strip().lower() in TRUE + FALSE:
            return text.strip().lower() in TRUE
        elif tp in (int, float, str):
            return tp(text)
        elif tp is Any:
            return guess_value(text)
        raise ValueError(text)
    except ValueError:  # also an item's UsageError: reported for the whole value
        raise UsageError(f"--set {key}={text}: expected {type_name(tp)}, got {text!r}") from None


def setting_keys(cfg, prefix: str = "") -> list[str]:
    """Every key ``--set`` accepts (nested dataclass fields dotted; a free-form mapping as ``name.*``)."""
    keys = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        keys += setting_keys(value, f"{prefix}{f.name}.") if dataclasses.is_dataclass(value) else \
            [f"{prefix}{f.name}" + (".*" if isinstance(value, Mapping) else "")]
    return keys


def _apply(node, items: list[tuple[list[str], str]], prefix: str):
    """``node`` with the ``(path, text)`` assignments applied: one ``replace`` per dataclass, so
    ``__post_init__`` validates the finished config, not each step."""
    if isinstance(node, Mapping):  # free-form (a family's config kwargs): values typed by their text
        out = dict(node)
        for path, text in items:
            out[path[0]] = guess_value(text) if len(path) == 1 else \
                _apply(out.get(path[0], {}), [(path[1:], text)], f"{prefix}{path[0]}.")
        return out
    if not dataclasses.is_dataclass(node):
        raise UsageError(f"{prefix[:-1]!r} is a value, not a section: set it as {prefix[:-1]}=VALUE")
    groups: dict[str, list] = {}
    for path, text in items:
        if path[0] not in {f.name for f in dataclasses.fields(node)}:
            valid = setting_keys(node, prefix)
            close = difflib.get_close_matches(prefix + ".".join(path), valid, n=3, cutoff=0.6)
            hint = f" (did you mean {' or '.join(close)}?)" if close else ""
            raise UsageError(f"unknown key {prefix + '.'.join(path)!r}{hint}; valid keys: {', '.join(valid)}")
        groups.setdefault(path[0], []).append((path[1:], text))
    hints, changes = typing.get_type_hints(type(node)), {}
    for name, sub in groups.items():
        leaf, current = [text for rest, text in sub if not rest], getattr(node, name)
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


def check_model(source: str) -> None:
    """Refuse a source ``ji.load`` cannot read, naming close embedded models; a hub id (``org/name``)
    is fetched now, so being offline is reported before any work starts."""
    from jaxinterp.loading import embedded_models, resolve_source

    names = embedded_models()
    if source in names or Path(source).expanduser().exists():  # a file is refused by ji.load, in one line
        return
    if re.fullmatch(r"[\w-][\w.-]*/[\w.-]+", source):
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
    raise UsageError(f"unknown model {source!r}: not an embedded model ({', '.join(names)}) nor a local directory"
                     + (f"; did you mean {' or '.join(close)}?" if close else ""))


def write_json(path: Path, obj) -> Path:
    """Atomic JSON write (temp file + rename)."""
    from jaxinterp.checkpoint import write_atomic  # (orbax: imported only when a run writes)

    write_atomic(path, json.dumps(obj, indent=1, default=str) + "\n")
    return path


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, png: Path) -> None:
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    pyplot().close(fig)


def _output_dir(out: str | None, name: str, preset: str, cfg, base) -> Path:
    """``--out``, else ``results/<name>/<preset>/`` (``<preset>-<model>`` when the model is not the
    preset's, so another model never overwrites the preset's results); created, checked writable."""
    if out is None:
        model = _get(cfg, "model")
        changed = isinstance(model, str) and model != base.model
        out = Path("results", name, f"{preset}-{Path(model).name}" if changed else preset)
    try:
        Path(out).mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()
    except OSError as err:
        raise UsageError(f"cannot write to --out {out}: {err.strerror or err}") from None
    return Path(out)


def _get(cfg, key: str):
    """The value at a dotted key, or None where the config has no such field."""
    for part in key.split("."):
        if not dataclasses.is_dataclass(cfg) or part not in {f.name for f in dataclasses.fields(cfg)}:
            return None
        cfg = getattr(cfg, part)
    return cfg


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage + message
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def experiment_main(name: str, presets: Mapping[str, Callable[[], Any]], run: Callable[..., dict], *,
                    doc: str | None = None, model_keys: Sequence[str] = ("model",),
                    shortcuts: Mapping[str, str] | None = None,
                    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None):
    """An experiment's ``main(argv=None, prog=None) -> exit status``. ``presets``: name -> config factory
    (the first is the default); ``run(cfg, out, **own_flags) -> results``; ``model_keys``: dotted keys
    holding a ``ji.load`` source, checked first; ``shortcuts``: ``{"--flag": key}``, ``--flag V`` =
    ``--set key=V`` (``--model`` is one where the config has a ``model``); ``add_arguments``: the
    experiment's own flags (run controls outside the config), passed to ``run`` by name."""

    def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
        default, base = next(iter(presets)), next(iter(presets.values()))()
        parser = _Parser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
        parser.add_argument("--preset", choices=list(presets), default=default, help=f"default {default}")
        parser.add_argument("--set", dest="sets", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                            help="override config fields: n=8, lists a,b,c, true/false, none, optim.lr=3e-4")
        flags = {**({"--model": "model"} if isinstance(_get(base, "model"), str) else {}), **(shortcuts or {})}
        for flag, key in flags.items():
            parser.add_argument(flag, dest=f"set:{key}", metavar="SOURCE" if key in model_keys else "VALUE",
                                help=f"= --set {key}=..." + (" (any ji.load source)" if key in model_keys else ""))
        parser.add_argument("--out", help=f"output directory (default results/{name}/<preset>/)")
        parser.add_argument("--list-config", action="store_true", help="print the resolved config as JSON and exit")
        parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
        harness_flags = set(vars(parser.parse_args([])))
        if add_arguments is not None:
            add_arguments(parser)
        try:
            args = parser.parse_args(argv)
        except SystemExit as stop:  # --help, or an argparse error (already printed)
            return stop.code or 0
        own = {k: v for k, v in vars(args).items() if k not in harness_flags}
        args.sets = [f"{k[4:]}={v}" for k, v in vars(args).items() if k.startswith("set:") and v] + args.sets
        try:
            return _run(name, presets[args.preset](), args, lambda cfg, out: run(cfg, out, **own), model_keys)
        except USER_ERRORS as err:
            if args.debug:
                traceback.print_exc()
            hint = "" if isinstance(err, UsageError) or args.debug else " (--debug shows the traceback)"
            print(f"{parser.prog}: error: {' '.join(str(err).split()) or type(err).__name__}{hint}", file=sys.stderr)
            return 2

    return main


def _run(name: str, preset, args: argparse.Namespace, run: Callable[[Any, Path], dict], model_keys) -> int:
    """Resolve and check the config; ``--list-config``, or run and write results.json + config.json."""
    try:
        cfg = apply_overrides(preset, args.sets)
    except ValueError as err:  # the config's own validation: a usage error too
        raise UsageError(str(err)) from err
    config = json.loads(json.dumps(dataclasses.asdict(cfg), default=str))
    if args.list_config:
        print(json.dumps(config, indent=2))
        return 0
    for source in (_get(cfg, key) for key in model_keys):
        if isinstance(source, str):
            check_model(source)
    out = _output_dir(args.out, name, args.preset, cfg, preset)
    t0 = int(time.time())
    from jaxinterp.checkpoint import OutputLock  # (orbax: imported only when a run starts)

    with OutputLock(out):  # a second run on this --out is refused (ValueError naming the PID holding it)
        written = [write_json(out / "results.json", run(cfg, out)), write_json(out / "config.json", config)]
    written += sorted(p for p in out.iterdir() if p.stat().st_mtime >= t0 and p not in written
                      and not p.name.startswith("."))
    print("wrote " + ", ".join(f"{p}/" if p.is_dir() else str(p) for p in written))
    return 0
