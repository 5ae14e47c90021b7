"""The one reader of user YAML (config files, ``--set`` values, sweep grids, a run's ``config.yaml``).

PyYAML's ``safe_load`` runs no code, but it is neither bounded nor strict: aliases expand without
limit (a few hundred bytes can become gigabytes), deep nesting raises ``RecursionError``, duplicate
keys are silently merged, and YAML 1.1 reads ``yes``/``no``/``on``/``off`` as booleans, ``0x10`` and
``010`` as integers and ``2024-01-01`` as a date. This reader refuses or fixes each of those:

- at most ``MAX_BYTES`` (256 KiB) of UTF-8 text; other encodings are refused, not guessed;
- no anchors or aliases (``&a`` / ``*a``): nothing expands, so the data is never larger than the text;
- at most ``MAX_DEPTH`` (20) nested sequences or mappings;
- a key given twice in one mapping is an error naming the key and both lines;
- YAML 1.2 core scalars: only ``true``/``false`` are booleans, only ``null``/``~``/empty is null, numbers
  are decimal (``12``, ``-0.5``, ``1e-3``, ``.inf``, ``.nan``); ``yes``, ``0x10``, ``010``, ``1_000`` and
  dates stay strings, so a typed field refuses them with a clear message;
- only the core tags (``!!str``, ``!!int``, ``!!float``, ``!!bool``, ``!!null``, ``!!seq``, ``!!map``):
  no Python objects, sets, binary, timestamps or merge keys (``<<``).

Every refusal is a ``ConfigError`` (one line, exit code 2) naming the input, the line and the fix.
``shown`` bounds what a message quotes of a user's value.
"""

from __future__ import annotations

import re
import reprlib
from collections.abc import Hashable
from pathlib import Path
from typing import Any

import yaml
from yaml.constructor import ConstructorError, SafeConstructor
from yaml.events import AliasEvent, CollectionStartEvent, NodeEvent
from yaml.nodes import MappingNode, ScalarNode

from .errors import ConfigError

# A config or grid is a few kB (the largest packaged file is under 3 kB). Pure-Python PyYAML reads about
# 150 kB/s on a busy 2-core machine, so 256 KiB bounds the worst file to about 2 s.
MAX_BYTES = 256 * 1024
MAX_DEPTH = 20  # nested sequences/mappings; a config needs 3 (deepspeed.extra a few more)
MAX_NUMBER_CHARS = 100  # digits of one number: far past int64 and float64, far below Python's 4300-digit limit

_INT = re.compile(r"^[-+]?(?:0|[1-9][0-9]*)$")
_FLOAT = re.compile(
    r"^(?:[-+]?(?:(?:0|[1-9][0-9]*)(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?"
    r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
)
_BOOL = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
_NULL = re.compile(r"^(?:~|null|Null|NULL|)$")

_SHOWN = reprlib.Repr()
_SHOWN.maxstring = _SHOWN.maxother = _SHOWN.maxlong = 80
_SHOWN.maxlist = _SHOWN.maxtuple = _SHOWN.maxdict = _SHOWN.maxset = 6
_SHOWN.maxlevel = 3


def clip(text: str, limit: int = 80) -> str:
    """``text`` as it is when short, else its start and end around "...": for names and paths in messages."""
    if len(text) <= limit:
        return text
    half = (limit - 3) // 2
    return text[:half] + "..." + text[-half:]


def shown(value: Any) -> str:
    """``repr(value)`` cut to about 80 characters, so a huge value cannot make a huge message."""
    text = _SHOWN.repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


class YAMLRefused(ConstructorError):
    """Valid YAML that this reader refuses (an alias, too deep, a duplicate key, an unknown tag)."""


class _Resolver(yaml.resolver.BaseResolver):
    """Plain scalars are typed by the YAML 1.2 core schema, less its hex and octal forms, and integers with
    leading zeros stay text (YAML 1.1 read ``010`` as 8). No merge key: ``<<`` is an ordinary key."""

    yaml_implicit_resolvers: dict = {}


for _tag, _regexp, _first in (
    ("tag:yaml.org,2002:bool", _BOOL, "tTfF"),
    ("tag:yaml.org,2002:int", _INT, "-+0123456789"),
    ("tag:yaml.org,2002:float", _FLOAT, "-+0123456789."),
    ("tag:yaml.org,2002:null", _NULL, ["~", "n", "N", ""]),
):
    _Resolver.add_implicit_resolver(_tag, _regexp, list(_first))


class _Loader(
    yaml.reader.Reader, yaml.scanner.Scanner, yaml.parser.Parser, yaml.composer.Composer, SafeConstructor, _Resolver
):
    yaml_constructors: dict = {}

    def __init__(self, stream: str):
        yaml.reader.Reader.__init__(self, stream)
        yaml.scanner.Scanner.__init__(self)
        yaml.parser.Parser.__init__(self)
        yaml.composer.Composer.__init__(self)
        SafeConstructor.__init__(self)
        _Resolver.__init__(self)
        self._depth = 0

    # -- composing: no anchors or aliases, bounded depth ------------------------------------------
    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, AliasEvent):
            raise YAMLRefused(
                None, None, f"found an alias (*{event.anchor}); aliases are not allowed, write the value out",
                event.start_mark,
            )  # fmt: skip
        if isinstance(event, NodeEvent) and event.anchor is not None:
            raise YAMLRefused(
                None, None, f"found an anchor (&{event.anchor}); anchors and aliases are not allowed", event.start_mark
            )
        collection = isinstance(event, CollectionStartEvent)
        if collection:
            self._depth += 1
            if self._depth > MAX_DEPTH:
                raise YAMLRefused(
                    None, None, f"nested deeper than {MAX_DEPTH} levels of lists and mappings", event.start_mark
                )
        try:
            return super().compose_node(parent, index)
        finally:
            if collection:
                self._depth -= 1

    # -- constructing: core scalars only, no duplicate keys ----------------------------------------
    def construct_yaml_bool(self, node):
        value = self.construct_scalar(node)
        if not _BOOL.match(value):
            raise YAMLRefused(None, None, f"{shown(value)} is not a boolean (true or false)", node.start_mark)
        return value.lower() == "true"

    def _number_text(self, node, pattern: re.Pattern, what: str) -> str:
        """The scalar's text, refused if it is too long to be a sane number or not ``what``."""
        value = self.construct_scalar(node)
        if len(value) > MAX_NUMBER_CHARS:
            raise YAMLRefused(
                None, None, f"a number of {len(value)} characters (at most {MAX_NUMBER_CHARS})", node.start_mark
            )
        if not pattern.match(value):
            raise YAMLRefused(None, None, f"{shown(value)} is not {what}", node.start_mark)
        return value

    def construct_yaml_int(self, node):
        return int(self._number_text(node, _INT, "a decimal integer"))

    def construct_yaml_float(self, node):
        value = self._number_text(node, _FLOAT, "a decimal number")
        lowered = value.lower()
        if lowered.endswith(".inf"):
            return float("-inf") if lowered.startswith("-") else float("inf")
        if lowered == ".nan":
            return float("nan")
        return float(value)

    def construct_yaml_null(self, node):
        value = self.construct_scalar(node)
        if not _NULL.match(value):
            raise YAMLRefused(None, None, f"{shown(value)} is not null", node.start_mark)
        return None

    def construct_mapping(self, node, deep=False):
        if not isinstance(node, MappingNode):
            raise YAMLRefused(None, None, f"expected a mapping, found {node.id}", node.start_mark)
        mapping: dict = {}
        lines: dict = {}
        for key_node, value_node in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if not isinstance(key, Hashable):
                raise YAMLRefused(None, None, "a list or mapping cannot be a key", key_node.start_mark)
            if key in mapping:
                raise YAMLRefused(
                    None,
                    None,
                    f"duplicate key {shown(key)} (first on line {lines[key]}); keep one",
                    key_node.start_mark,
                )
            lines[key] = line
            mapping[key] = self.construct_object(value_node, deep=deep)
        return mapping

    def construct_unknown(self, node):
        raise YAMLRefused(
            None,
            None,
            f"the tag {shown(node.tag)} is not allowed (only plain values, lists and mappings)",
            node.start_mark,
        )


for _tag, _constructor in (
    ("tag:yaml.org,2002:null", _Loader.construct_yaml_null),
    ("tag:yaml.org,2002:bool", _Loader.construct_yaml_bool),
    ("tag:yaml.org,2002:int", _Loader.construct_yaml_int),
    ("tag:yaml.org,2002:float", _Loader.construct_yaml_float),
    ("tag:yaml.org,2002:str", SafeConstructor.construct_yaml_str),
    ("tag:yaml.org,2002:seq", SafeConstructor.construct_yaml_seq),
    ("tag:yaml.org,2002:map", SafeConstructor.construct_yaml_map),
    (None, _Loader.construct_unknown),
):
    _Loader.add_constructor(_tag, _constructor)


def _at(mark) -> str:
    return f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""


def describe(exc: yaml.YAMLError) -> str:
    """A YAML error on one bounded line: what is wrong and where, without PyYAML's snippet of the text."""
    if isinstance(exc, yaml.MarkedYAMLError):
        parts = [
            exc.context + _at(exc.context_mark) if exc.context else "",
            (exc.problem or "") + _at(exc.problem_mark),
        ]
        text = "; ".join(p for p in parts if p)
    elif isinstance(exc, yaml.reader.ReaderError):
        text = f"character #x{exc.character:04x} at position {exc.position}: {exc.reason}"
    else:
        text = str(exc)
    text = " ".join(text.split())
    return text if len(text) <= 300 else text[:297] + "..."


def load(text: str, what: str) -> Any:
    """One YAML document of at most ``MAX_BYTES``, read as described in the module docstring.

    Raises ``YAMLRefused`` for what it refuses and ``yaml.YAMLError`` for text that is not YAML; callers that
    want one-line errors use ``load_mapping`` or ``read_file``.
    """
    if len(text) > MAX_BYTES:
        raise ConfigError(f"{what}: {len(text)} characters of YAML; at most {MAX_BYTES} (256 KiB)")
    loader = _Loader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def load_checked(text: str, what: str) -> Any:
    """``load``, with every YAML problem raised as a one-line ``ConfigError`` starting with ``what``."""
    try:
        return load(text, what)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what}: invalid YAML: {describe(exc)}") from None


def load_mapping(text: str, what: str, expected: str) -> dict[str, Any]:
    """A document that must be a mapping (an empty document is an empty mapping)."""
    data = load_checked(text, what)
    if data is None:
        return {}
    if not isinstance(data, dict):
        kind = {bool: "a boolean", list: "a list", str: "a string", int: "a number", float: "a number"}.get(
            type(data), type(data).__name__
        )
        raise ConfigError(
            f"{what}: the top level must be a mapping of {expected}, not {kind} ({shown(data)}); write key: value lines"
        )
    return data


def read_text(path: Path | str, what: str) -> str:
    """A file's text: at most ``MAX_BYTES``, UTF-8 (an optional BOM is dropped), else a one-line error."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{what}: cannot read {path}: {exc.strerror or exc}") from None
    return decode(raw, what)


def decode(raw: bytes, what: str) -> str:
    if len(raw) > MAX_BYTES:
        raise ConfigError(f"{what}: larger than {MAX_BYTES} bytes (256 KiB); a config or grid is a few kB")
    try:
        return raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(
            f"{what}: not UTF-8 (byte 0x{raw[exc.start]:02x} on line {line}); save the file as UTF-8"
        ) from None


def read_mapping(path: Path | str, what: str, expected: str = "keys to values") -> dict[str, Any]:
    """A YAML file that must hold a mapping, read with every limit above."""
    return load_mapping(read_text(path, what), what, expected)


class _Dumper(yaml.SafeDumper):
    """``yaml.safe_dump`` that writes no aliases and quotes every string that either YAML 1.1 or this
    reader would read as something else, so its output reads back the same everywhere."""

    def ignore_aliases(self, data):
        return True

    def resolve(self, kind, value, implicit):
        tag = super().resolve(kind, value, implicit)
        if kind is ScalarNode and implicit[0] and tag == self.DEFAULT_SCALAR_TAG:
            return _RESOLVER.resolve(kind, value, implicit)
        return tag


_RESOLVER = _Resolver()


def dump(data: Any) -> str:
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False)
