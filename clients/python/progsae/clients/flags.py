"""Command-line flags generated from a dataclass: a flag, its default and its help are written once.

    @dataclass
    class Options:
        out: str
        '''Directory to write.'''                    ->  --out OUT                (required)
        batch_size: int = 4096
        '''Rows per step.'''                         ->  --batch-size BATCH_SIZE  (default: 4096)

    options = add_dataclass(parser, Options)        # a Bound[Options]
    opts = options.build(parser.parse_args())       # an Options

One field, one flag `--field-name`; its help is the string literal under the field (read once per
class from its source), followed by the default. The annotation gives the type:

    int, float, str         the type itself
    bool                    `--x` (store_true) when the default is False, `--no-x` when it is True
    Literal["a", "b"]       choices
    tuple[int, ...]         comma-separated (`--granularities 256,512`); tuple[float, float] also checks
                            the count; a positional tuple takes one or more words instead
    dict[str, Any]          a JSON object
    X | None                X, default None (the flag absent)
    a class with a `parse(text)` classmethod   parsed by it, its default shown with str()

A field without a default is a required flag, or a required positional argument with
`metadata={"positional": True}`. Other metadata (in the field, or per call through `meta=` for a
class this command does not own): `"flags"` replaces the flag's spelling (`("-g", "--granularity")`),
`"metavar"`, and `"one_of"`: fields naming the same group form a required mutually exclusive group.

`Parser` is an ArgumentParser whose errors are one line, `PROG: error: MESSAGE`, exit status 2,
like every other user error of the `progsae` command.

This module lives in `progsae.clients` although the `progsae` command package (`progsae.cli`)
uses it for every subcommand: the light client distribution (clients/python) ships
`progsae.clients` and `progsae.v1` only, and its own `progsae client` builds its flags with it
too. Standard library only.

Why not tyro or simple-parsing (both read field docstrings): measured with tyro 1.0.17, a
`tuple[int, ...]` field takes space-separated words only, so every documented command
(`--granularities 256,512,1024`, `--by mean_sq,freq`, `--k-grid 4,8,16,32`) would change, and its
errors are multi-line boxed panels where ours are the one line `progsae: error: MESSAGE` (tested);
both would also add dependencies (docstring-parser, typeguard) to the light client, which promises
grpcio, protobuf and numpy only.
"""

from __future__ import annotations

import argparse
import ast
import functools
import inspect
import json
import textwrap
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import MISSING, Field, dataclass, fields, is_dataclass
from typing import Any, Generic, Literal, TypeVar, get_args, get_origin

T = TypeVar("T")

META_KEYS = frozenset({"positional", "flags", "metavar", "one_of"})


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors print one line, `PROG: error: MESSAGE`, and exit with status 2."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


@dataclass(frozen=True)
class Bound(Generic[T]):
    """The flags `add_dataclass` gave one dataclass; `build` makes an instance from parsed arguments."""

    cls: type[T]
    names: tuple[str, ...]
    """Fields that have a flag (their argparse dest is the field name)."""

    def build(self, args: argparse.Namespace, **overrides: Any) -> T:
        """`cls(**flags, **overrides)`; fields with no flag and no override keep their defaults."""
        kw = {n: _tuple_of_list(getattr(args, n)) for n in self.names}
        kw.update(overrides)
        return self.cls(**kw)


def _tuple_of_list(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v  # a positional tuple arrives as argparse's list


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """{field: its docstring} of a class and its bases: the string literal right under each field."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__[:-1]):
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue  # no source (e.g. a class built at run time): no help
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for stmt, nxt in zip(body, body[1:]):
            if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                    and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)):
                docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


def add_dataclass(parser: argparse.ArgumentParser, cls: type[T], *, only: Iterable[str] | None = None,
                  exclude: Iterable[str] = (), meta: Mapping[str, Mapping[str, Any]] | None = None) -> Bound[T]:
    """Add a flag (or positional argument) per field of dataclass `cls` to `parser`.

    `only` / `exclude` pick the fields (those left out keep their defaults, or come as `build`
    overrides); `meta` adds metadata to fields by name, for classes defined elsewhere.
    """
    if not (isinstance(cls, type) and is_dataclass(cls)):
        raise TypeError(f"{cls!r} is not a dataclass")
    all_fields = {f.name: f for f in fields(cls) if f.init}
    only_set, excluded, meta = (None if only is None else set(only)), set(exclude), dict(meta or {})
    unknown = ((only_set or set()) | excluded | set(meta)) - set(all_fields)
    if unknown:
        raise ValueError(f"{cls.__name__} has no field(s) {', '.join(sorted(unknown))}")
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    groups: dict[str, argparse._MutuallyExclusiveGroup] = {}
    names = []
    for name, f in all_fields.items():
        if name in excluded or (only_set is not None and name not in only_set):
            continue
        m = {**f.metadata, **meta.get(name, {})}
        bad = set(m) - META_KEYS
        if bad:
            raise ValueError(f"{cls.__name__}.{name}: unknown flag metadata {', '.join(sorted(bad))}")
        flags, kw = _argument(name, hints[name], f, m, docs.get(name, ""))
        target: Any = parser
        if "one_of" in m:
            group = m["one_of"]
            if group not in groups:
                groups[group] = parser.add_mutually_exclusive_group(required=True)
            target = groups[group]
        target.add_argument(*flags, **kw)
        names.append(name)
    return Bound(cls, tuple(names))


def _default(f: Field) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING


def _argument(name: str, tp: Any, f: Field, m: Mapping[str, Any], doc: str) -> tuple[list[str], dict[str, Any]]:
    """(option strings, add_argument keywords) of one field."""
    default = _default(f)
    required = default is MISSING
    positional = bool(m.get("positional"))
    tp = _unwrap_optional(tp)
    kw: dict[str, Any] = {}
    flag = "--" + name.replace("_", "-")
    if tp is bool:
        if positional or required:
            raise TypeError(f"{name}: a bool field needs a default (it becomes --x or --no-x)")
        if default:
            flags = [_negated(s) for s in _spellings(m, flag)]
            return flags, {"dest": name, "action": "store_false", "help": _help(_turned_off(doc), None)}
        return _spellings(m, flag), {"dest": name, "action": "store_true", "help": _help(doc, None)}
    origin = get_origin(tp)
    if origin is tuple and positional:
        kw.update(nargs="+" if required else "*", type=_scalar(get_args(tp)[0], name))
    else:
        kw.update(_converter(tp, name))
    if "metavar" in m:
        kw["metavar"] = m["metavar"]
    if positional:
        if not required:
            kw.setdefault("nargs", "?")
            kw["default"] = default
        kw["help"] = _help(doc, None)
        return [name], kw
    kw["dest"] = name
    if required:
        kw["required"] = True
    else:
        kw["default"] = default
    kw["help"] = _help(doc, None if required else default)
    spellings = _spellings(m, flag)
    if "metavar" not in kw and spellings != [flag]:  # argparse would show the field name
        kw["metavar"] = max(spellings, key=len).lstrip("-").replace("-", "_").upper()
    return spellings, kw


def _spellings(m: Mapping[str, Any], flag: str) -> list[str]:
    given = m.get("flags")
    return [given] if isinstance(given, str) else list(given) if given else [flag]


def _turned_off(doc: str) -> str:
    """The help of `--no-x`, from x's docstring (which says what x does)."""
    if not doc:
        return ""
    if doc[:1].isupper() and doc[1:2].islower():
        doc = doc[0].lower() + doc[1:]
    return f"turn off: {doc}"


def _negated(flag: str) -> str:
    return "--no-" + flag[2:] if flag.startswith("--") else flag


def _unwrap_optional(tp: Any) -> Any:
    """X of `X | None` (the flag absent gives the field's default, None); other types as they are."""
    if get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return args[0]
        raise TypeError(f"unsupported union {tp!r}: only X | None")
    return tp


def _converter(tp: Any, name: str) -> dict[str, Any]:
    origin = get_origin(tp)
    if origin is Literal:
        choices = get_args(tp)
        return {"choices": choices, "type": type(choices[0])}
    if origin is tuple:
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return {"type": _comma(_scalar(args[0], name), None, args[0])}
        if args and len(set(args)) == 1:
            return {"type": _comma(_scalar(args[0], name), len(args), args[0])}
        raise TypeError(f"{name}: unsupported tuple {tp!r}")
    if tp is dict or origin is dict:
        return {"type": _json_object, "metavar": "JSON"}
    return {"type": _scalar(tp, name)}


def _scalar(tp: Any, name: str) -> Callable[[str], Any]:
    if tp in (int, float, str):
        return tp
    parse = getattr(tp, "parse", None)
    if isinstance(tp, type) and callable(parse):
        return _user_error(parse)
    raise TypeError(f"{name}: no flag for type {tp!r} (exclude the field, or give the type a parse(text) classmethod)")


def _user_error(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """argparse reports a ValueError of a type function as "invalid <name> value"; keep our message."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return convert


_NOUN = {int: "integers", float: "numbers", str: "words"}


def _comma(item: Callable[[str], Any], count: int | None, tp: Any) -> Callable[[str], tuple[Any, ...]]:
    def parse(text: str) -> tuple[Any, ...]:
        try:
            out = tuple(item(v.strip()) for v in text.split(",") if v.strip())
        except (ValueError, argparse.ArgumentTypeError):
            raise argparse.ArgumentTypeError(
                f"expected comma-separated {_NOUN.get(tp, 'values')}, got {text!r}") from None
        if count is not None and len(out) != count:
            raise argparse.ArgumentTypeError(f"expected {count} comma-separated values, got {text!r}")
        return out

    return parse


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e.msg}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def _help(doc: str, default: Any) -> str:
    text = doc.replace("%", "%%")  # argparse formats help with %-interpolation
    if default is None or default is MISSING or default in ("", ()):
        return text
    shown = ",".join(map(str, default)) if isinstance(default, tuple) else str(default)
    return f"{text} (default: {shown.replace('%', '%%')})" if text else f"default: {shown.replace('%', '%%')}"
