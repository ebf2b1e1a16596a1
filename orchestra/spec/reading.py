"""Spec files and text read safely: size, depth and number limits before
any field is looked at, then the JobSpec's own rules.

A spec is JSON, or YAML when its file ends in `.yaml`/`.yml`. YAML is read
as plain data under the same limits, and more: no tags (`!!python/...`
would build objects), no anchors or aliases (an alias bomb expands a few
lines into gigabytes), one document, string keys only, no key twice, and
only JSON's scalars (`true`/`false`, `null`, decimal numbers; `1e-4` is a
number, `no`, `on` and `2024-01-01` stay strings), as YAML 1.2 reads them.

`--set path=value` overrides (`apply_overrides`) change the parsed
document before it is checked, so an override is checked like the file."""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import re
import stat
from pathlib import Path
from typing import Any, Sequence

from pydantic import BaseModel, ValidationError

from orchestra.errors import SpecError, close_match, printable
from orchestra.spec._base import _text_problem
from orchestra.spec.job import JobSpec
from orchestra.spec.problems import problems_of

MAX_SPEC_BYTES = 1_000_000
MAX_SPEC_DEPTH = 12
MAX_SPEC_INT = 2**53  # what every JSON reader represents exactly


YAML_SUFFIXES = (".yaml", ".yml")


def parse_spec(text: str, source: str = "spec", *, yaml: bool = False, overrides: Sequence[str] = ()) -> JobSpec:
    """Parse JSON (or, with `yaml`, YAML) text into a JobSpec, raising
    SpecError with every problem. Beyond the fields' own rules: at most
    1 MB, nested at most 12 deep, no NaN or infinity, integers within
    ±2**53, no key twice. `overrides` are `path=value` strings applied
    before the checks (see `apply_overrides`)."""
    if len(text) > MAX_SPEC_BYTES:
        raise SpecError([("(file)", f"is {len(text)} characters; a spec is at most {MAX_SPEC_BYTES}")], source)
    raw = _yaml_document(text, source) if yaml else _json_document(text, source)
    if not isinstance(raw, dict):
        raise SpecError([("(spec)", f"must be a {'YAML mapping' if yaml else 'JSON object'} of sections")], source)
    raw = apply_overrides(raw, overrides, source)
    problems = list(_unsafe_values(raw, ()))
    if problems:
        raise SpecError(problems, source)
    try:
        return JobSpec.model_validate(raw)
    except ValidationError as exc:
        raise SpecError(problems_of(exc, JobSpec), source) from None


def _json_document(text: str, source: str) -> Any:
    try:
        return json.loads(text, object_pairs_hook=_unique_keys, parse_int=_bounded_int)
    except _DuplicateKey as exc:
        raise SpecError([("(spec)", f"the key '{printable(exc.key)}' appears twice in one object; "
                                    "give each field once")], source) from None
    except json.JSONDecodeError as exc:
        raise SpecError([(f"line {exc.lineno} column {exc.colno}", f"malformed JSON: {exc.msg}")], source) from None
    except (ValueError, RecursionError) as exc:  # an integer of thousands of digits; nesting past Python's stack
        raise SpecError([("(spec)", f"malformed JSON: {str(exc)[:100] or type(exc).__name__}")], source) from None


class _HugeInt(int):
    """An integer written with more digits than any spec field takes, kept
    as its digit count: Python refuses to read past 4300 digits, and the
    field it sits in is named by `_unsafe_values`."""


def _bounded_int(digits: str) -> int:
    return int(digits, 10) if len(digits.lstrip("+-")) <= 30 else _HugeInt(len(digits.lstrip("+-")))


class _DuplicateKey(Exception):
    def __init__(self, key: str):
        self.key = key[:64]


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object, refused when a key appears twice (JSON would keep the last silently)."""
    found: dict[str, Any] = {}
    for key, value in pairs:
        if key in found:
            raise _DuplicateKey(key)
        found[key] = value
    return found


def _yaml_document(text: str, source: str) -> Any:
    """A YAML document as plain data (dicts, lists, str, int, float, bool, None)."""
    import yaml

    try:
        _check_yaml_events(yaml.parse(text, Loader=_yaml_loader()))
        return yaml.load(text, Loader=_yaml_loader())
    except _YamlRefused as exc:
        raise SpecError([(exc.where, exc.message)], source) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1} column {mark.column + 1}" if mark is not None else "(spec)"
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SpecError([(where, f"malformed YAML: {problem}")], source) from None
    except (ValueError, RecursionError) as exc:  # an integer of thousands of digits
        raise SpecError([("(spec)", f"malformed YAML: {str(exc)[:100] or type(exc).__name__}")], source) from None


class _YamlRefused(Exception):
    def __init__(self, mark: Any, message: str):
        self.where = f"line {mark.line + 1} column {mark.column + 1}" if mark is not None else "(spec)"
        self.message = message


def _check_yaml_events(events) -> None:
    """Refuse, from the parser's events and before anything is built: tags,
    anchors, aliases, a second document, nesting past MAX_SPEC_DEPTH."""
    import yaml

    depth = documents = 0
    for event in events:
        mark = event.start_mark
        if isinstance(event, yaml.DocumentStartEvent):
            documents += 1
            if documents > 1:
                raise _YamlRefused(mark, "holds a second YAML document ('---'); a spec is one document")
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise _YamlRefused(mark, "YAML anchors and aliases (&name, *name) are not allowed in a spec; "
                                     "write the value out")
        tag = getattr(event, "tag", None)
        if tag is not None:
            shown = tag.replace("tag:yaml.org,2002:", "!!")
            raise _YamlRefused(mark, f"the YAML tag '{printable(shown[:80])}' is not allowed: a spec holds "
                                     "plain values only (quote a string that starts with '!')")
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_SPEC_DEPTH + 1:
                raise _YamlRefused(mark, f"nested deeper than {MAX_SPEC_DEPTH} levels")
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


@functools.cache
def _yaml_loader():
    """A SafeLoader that reads scalars as JSON (YAML 1.2's core schema)
    would, and refuses non-string and repeated keys."""
    import yaml

    class SpecLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # libyaml's parser when there: 10x faster
        yaml_implicit_resolvers: dict = {}  # none of YAML 1.1's: `no` is no boolean, `1_0` no number

        def construct_mapping(self, node, deep=False):
            seen: dict[str, Any] = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                if not isinstance(key, str):
                    raise _YamlRefused(key_node.start_mark, f"the key {printable(repr(key)[:64])} is not a string; "
                                                             "quote it")
                if key in seen:
                    raise _YamlRefused(key_node.start_mark, f"the key '{printable(key[:64])}' appears twice "
                                                             f"in one mapping (first on line {seen[key] + 1}); "
                                                             "give each field once")
                seen[key] = key_node.start_mark.line
            return super().construct_mapping(node, deep=deep)

    core = "tag:yaml.org,2002:"
    SpecLoader.add_implicit_resolver(core + "bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                     list("tTfF"))
    SpecLoader.add_implicit_resolver(core + "null", re.compile(r"^(?:~|null|Null|NULL|)$"), ["~", "n", "N", ""])
    SpecLoader.add_implicit_resolver(core + "int", re.compile(r"^[-+]?[0-9]+$"), list("-+0123456789"))
    SpecLoader.add_implicit_resolver(
        core + "float",
        re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)"
                   r"|\.(?:nan|NaN|NAN))$"),
        list("-+0123456789."))
    SpecLoader.add_constructor(core + "bool", lambda loader, node: node.value.lower() == "true")
    SpecLoader.add_constructor(core + "int", lambda loader, node: _bounded_int(node.value))
    SpecLoader.add_constructor(core + "float", lambda loader, node: float(node.value.lower().replace(".inf", "inf")
                                                                          .replace(".nan", "nan")))
    return SpecLoader


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str], source: str = "spec") -> dict[str, Any]:
    """A copy of the parsed spec `raw` with each `path=value` of
    `overrides` set: the path is dotted field names and list indices
    (`callbacks.0.config.patience`), checked against the spec's fields as
    far as they are fixed; the value is read as JSON when it parses as
    JSON (`5`, `1e-4`, `true`, `null`, `{"class_name": "Adam"}`), else
    taken as a string. Missing objects on the way are made.

        >>> apply_overrides({"fit": {"epochs": 10}}, ["fit.epochs=5", "data.source=mnist"])
        {'fit': {'epochs': 5}, 'data': {'source': 'mnist'}}
    """
    if not overrides:
        return raw
    if sum(len(item) for item in overrides) > MAX_SPEC_BYTES:
        raise SpecError([("--set", f"the overrides hold more than {MAX_SPEC_BYTES} characters, the most a spec may")],
                        source)
    raw = copy.deepcopy(raw)
    for item in overrides:
        path, sep, text = item.partition("=")
        parts = path.strip().split(".")
        if not sep or not all(parts):
            raise SpecError([("--set", f"'{printable(item[:80])}' is not path=value, e.g. fit.epochs=5")], source)
        try:
            value = _override_value(text)
        except _DuplicateKey as exc:
            raise SpecError([(f"--set {printable(path.strip()[:80])}", f"the key '{printable(exc.key)}' appears "
                                                                     "twice in one object; give each field once")],
                            source) from None
        except _MalformedValue as exc:
            raise SpecError([(f"--set {printable(path.strip()[:80])}", str(exc))], source) from None
        _set_path(raw, parts, value, source)
    return raw


_INDEX = re.compile(r"[0-9]+")  # ASCII digits only: str.isdigit() takes '¹', which int() does not


def _override_value(text: str) -> Any:
    """`text` read as JSON, else as a string; an object or list that does
    not parse is an error, not a string (it was meant as JSON)."""
    try:
        return json.loads(text, object_pairs_hook=_unique_keys, parse_int=_bounded_int)
    except json.JSONDecodeError as exc:
        if text.lstrip()[:1] in ("{", "["):
            raise _MalformedValue(f"looks like JSON but is not: {exc.msg} at character {exc.pos}") from None
        return text
    except (ValueError, RecursionError):
        return text


class _MalformedValue(ValueError):
    """An override's value that starts as JSON and does not parse."""


def _set_path(node: Any, parts: list[str], value: Any, source: str) -> None:
    # The spec class at this point of the path (None past where the schema fixes it) and its annotation.
    model: Any = JobSpec
    annotation: Any = JobSpec
    for depth, part in enumerate(parts):
        here, path = ".".join(parts[:depth]) or "(spec)", ".".join(parts[:depth + 1])

        def refuse(message: str, at: str = path) -> None:
            raise SpecError([(f"--set {printable(at)}", message)], source)

        if isinstance(node, list):
            if not _INDEX.fullmatch(part) or int(part) >= len(node):
                refuse(f"{here} is a list of {len(node)}: give an index "
                       + (f"from 0 to {len(node) - 1}" if node else "of an entry it has (it has none)"))
            key: Any = int(part)
            annotation = _item_annotation(annotation)
            model = _only_model(annotation)
        elif isinstance(node, dict):
            key = part
            if model is not None:
                fields = {field.alias or name: field for name, field in model.model_fields.items()}
                if part not in fields:
                    close = close_match(part, list(fields))
                    hint = f"; did you mean '{close}'?" if close else ""
                    refuse(f"unknown field; allowed: {', '.join(fields)}{hint}")
                annotation = fields[part].annotation
            else:
                annotation = None
            model = _only_model(annotation)
        else:
            refuse(f"is {printable(repr(node)[:60])}, not an object or a list: set {here} as a whole, "
                   f"e.g. --set '{here}={{...}}'", here)
        if depth == len(parts) - 1:
            node[key] = value
            return
        child = node[key] if isinstance(node, list) else node.get(key)
        if child is None:
            if _INDEX.fullmatch(parts[depth + 1]):
                refuse(f"has no list to index: set {path} as a whole, e.g. --set '{path}=[...]'")
            child = node[key] = {}
        node = child


def _only_model(annotation: Any) -> type[BaseModel] | None:
    """The one spec class a field's value can be, else None (a plain value,
    a free dict, or a choice of forms: then the final check decides)."""
    found = [arg for arg in _flat_args(annotation) if isinstance(arg, type) and issubclass(arg, BaseModel)]
    if len(found) != 1 or _has_dict(annotation) or found[0].model_config.get("extra") != "forbid":
        return None  # a free mapping (a layer's Keras arguments, say) is checked by the spec itself
    return found[0]


def _item_annotation(annotation: Any) -> Any:
    for arg in _flat_args(annotation):
        if getattr(arg, "__origin__", None) is list:
            return arg.__args__[0]
    return None


def _has_dict(annotation: Any) -> bool:
    return any(arg is dict or getattr(arg, "__origin__", None) is dict for arg in _flat_args(annotation))


def _flat_args(annotation: Any) -> list[Any]:
    """An annotation's members: Optional, Union and Annotated unwrapped."""
    if annotation is None:
        return []
    origin = getattr(annotation, "__origin__", None)
    if getattr(annotation, "__metadata__", None) is not None:  # Annotated[X, ...]
        return _flat_args(origin)
    args = getattr(annotation, "__args__", None)
    if args and origin not in (list, dict) and not (isinstance(annotation, type)):
        return [flat for arg in args for flat in _flat_args(arg)]
    return [annotation]


def _unsafe_values(value: Any, path: tuple) -> Any:
    """(field path, message) for every value no spec field may hold."""
    where = ".".join(str(part) for part in path) or "(spec)"
    if len(path) > MAX_SPEC_DEPTH:
        yield where, f"nested deeper than {MAX_SPEC_DEPTH} levels"
    elif isinstance(value, float) and not math.isfinite(value):
        yield where, f"{value} is not allowed: numbers must be finite"
    elif isinstance(value, _HugeInt):
        yield where, f"an integer of {int(value)} digits is out of range (at most 2**53 in magnitude)"
    elif isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_SPEC_INT:
        yield where, f"{value:.3g} is out of range (at most 2**53 in magnitude)"
    elif isinstance(value, str) and _text_problem(value):
        yield where, _text_problem(value)
    elif isinstance(value, dict):
        for key, item in value.items():
            if _text_problem(key):
                yield where, f"a key {_text_problem(key)}"
                continue
            yield from _unsafe_values(item, (*path, key[:64]))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _unsafe_values(item, (*path, index))


def read_spec_text(path: str | os.PathLike) -> str:
    """The text of a spec file, read safely: a regular file only (a FIFO,
    a device such as /dev/zero or a folder is refused without reading),
    at most MAX_SPEC_BYTES read, decoded as UTF-8. Raises SpecError."""
    path = Path(path)
    source = str(path)
    try:
        # O_NONBLOCK: opening a FIFO with no writer returns at once instead of waiting for one.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    except (OSError, ValueError) as exc:  # ValueError: a NUL in the path
        reason = exc.strerror if isinstance(exc, OSError) else "the path holds a NUL character"
        raise SpecError([("(file)", f"cannot read {printable(source)}: {reason}")], source) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise SpecError([("(file)", "is not a regular file (a folder, FIFO or device is never read as a spec)")],
                            source)
        raw = b""
        while len(raw) <= MAX_SPEC_BYTES:
            chunk = os.read(fd, MAX_SPEC_BYTES + 1 - len(raw))
            if not chunk:
                break
            raw += chunk
    except OSError as exc:
        raise SpecError([("(file)", f"cannot read {printable(source)}: {exc.strerror}")], source) from None
    finally:
        os.close(fd)
    if len(raw) > MAX_SPEC_BYTES:
        raise SpecError([("(file)", f"is larger than {MAX_SPEC_BYTES} bytes, the most a spec may be")], source)
    try:
        return raw.decode("utf-8").removeprefix("\ufeff")  # a byte-order mark, as some editors write
    except UnicodeDecodeError as exc:
        raise SpecError([("(file)", f"is not UTF-8 text (byte {exc.start}: {raw[exc.start:exc.start + 1]!r}); "
                                    "save the spec as UTF-8 text")], source) from None


def load_spec(path: str | os.PathLike, overrides: Sequence[str] = ()) -> JobSpec:
    """Read and validate a spec file, JSON or (`.yaml`, `.yml`) YAML, with
    `path=value` overrides applied; the name defaults to the file's stem."""
    path = Path(path)
    spec = parse_spec(read_spec_text(path), str(path), yaml=path.suffix.lower() in YAML_SUFFIXES,
                      overrides=overrides)
    if "name" not in spec.model_fields_set:
        spec = spec.model_copy(update={"name": _safe_name(path.stem)})
    return spec


def _safe_name(stem: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "_.-" else "-" for c in stem).strip("-.") or "job"
    return cleaned[:64]


def json_schema() -> dict[str, Any]:
    return JobSpec.model_json_schema()
