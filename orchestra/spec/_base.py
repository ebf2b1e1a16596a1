"""What every spec section shares: the strict base class, path and fraction
parsing, and the marker that carries a field path inside one error message."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from orchestra.errors import printable  # noqa: F401  (re-exported for the sections)

Mode = Literal["auto", "min", "max"]


def _snake_case(name: str) -> str:
    """Keras's own rule for the default name of a metric class."""
    name = re.sub(r"(.)([A-Z][a-z0-9]+)", r"\1_\2", name)
    return re.sub(r"([a-z])([A-Z])", r"\1_\2", name).lower()


# Separates a field path from its message inside one cross-field error.
_PATH_END = " :: "


PATH_MAX = 4096  # Linux's limit; a longer path fails in the OS, not here


def _usable_path(value: str | None) -> str | None:
    """A path field's value, refused when no OS call can take it: a NUL
    character, or `~name` (another user's home, unknown on some machines)."""
    if value is None:
        return value
    if "\x00" in value:
        raise ValueError("contains a NUL character, which no path may hold")
    if value.startswith("~") and not (value == "~" or value.startswith("~/")):
        raise ValueError("another user's home ('~name') is not allowed; give an absolute path or ~/...")
    return value


class StrictModel(BaseModel):
    """Base for every spec section: unknown fields are errors, not ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def _parse_fraction(value: Any) -> Any:
    """Accept `0.5`, `"0.5"` or `"1/255"` (JSON has no way to write 1/255)."""
    if isinstance(value, str) and "/" in value:
        top, _, bottom = value.partition("/")
        try:
            return float(top) / float(bottom)
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"'{value}' is not a number or a fraction like '1/255'") from None
    return value



def _text_problem(text: str) -> str | None:
    """Why a string cannot be written as UTF-8 (a lone surrogate, which a
    JSON escape such as \\ud800 makes), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"is not valid Unicode text (a lone surrogate at character {exc.start}); remove it"
    return None


def _text_problems(value: Any, path: tuple) -> Any:
    """(field path, message) for every string (or key) in `value` that is not valid Unicode."""
    where = ".".join(str(part) for part in path) or "(spec)"
    if isinstance(value, str) and _text_problem(value):
        yield where, _text_problem(value)
    elif isinstance(value, dict):
        for key, item in value.items():
            if isinstance(key, str) and _text_problem(key):
                yield where, f"a key {_text_problem(key)}"
            else:
                yield from _text_problems(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _text_problems(item, (*path, index))
