"""Spec files and text read safely: size, depth and number limits before
any field is looked at, then the JobSpec's own rules."""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from orchestra.errors import SpecError, printable
from orchestra.spec._base import _text_problem
from orchestra.spec.job import JobSpec
from orchestra.spec.problems import problems_of

MAX_SPEC_BYTES = 1_000_000
MAX_SPEC_DEPTH = 12
MAX_SPEC_INT = 2**53  # what every JSON reader represents exactly


def parse_spec(text: str, source: str = "spec") -> JobSpec:
    """Parse JSON text into a JobSpec, raising SpecError with every problem.
    Beyond the fields' own rules: at most 1 MB, nested at most 12 deep,
    no NaN or infinity, integers within ±2**53."""
    if len(text) > MAX_SPEC_BYTES:
        raise SpecError([("(file)", f"is {len(text)} characters; a spec is at most {MAX_SPEC_BYTES}")], source)
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SpecError([(f"line {exc.lineno} column {exc.colno}", f"malformed JSON: {exc.msg}")], source) from None
    except (ValueError, RecursionError) as exc:  # an integer of thousands of digits; nesting past Python's stack
        raise SpecError([("(spec)", f"malformed JSON: {str(exc)[:100] or type(exc).__name__}")], source) from None
    if not isinstance(raw, dict):
        raise SpecError([("(spec)", "must be a JSON object")], source)
    problems = list(_unsafe_values(raw, ()))
    if problems:
        raise SpecError(problems, source)
    try:
        return JobSpec.model_validate(raw)
    except ValidationError as exc:
        raise SpecError(problems_of(exc, JobSpec), source) from None


def _unsafe_values(value: Any, path: tuple) -> Any:
    """(field path, message) for every value no spec field may hold."""
    where = ".".join(str(part) for part in path) or "(spec)"
    if len(path) > MAX_SPEC_DEPTH:
        yield where, f"nested deeper than {MAX_SPEC_DEPTH} levels"
    elif isinstance(value, float) and not math.isfinite(value):
        yield where, f"{value} is not allowed: numbers must be finite"
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
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError([("(file)", f"is not UTF-8 text (byte {exc.start}: {raw[exc.start:exc.start + 1]!r}); "
                                    "save the spec as UTF-8 JSON")], source) from None


def load_spec(path: str | os.PathLike) -> JobSpec:
    """Read and validate a spec file; the name defaults to the file's stem."""
    path = Path(path)
    spec = parse_spec(read_spec_text(path), str(path))
    if "name" not in spec.model_fields_set:
        spec = spec.model_copy(update={"name": _safe_name(path.stem)})
    return spec


def _safe_name(stem: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "_.-" else "-" for c in stem).strip("-.") or "job"
    return cleaned[:64]


def json_schema() -> dict[str, Any]:
    return JobSpec.model_json_schema()
