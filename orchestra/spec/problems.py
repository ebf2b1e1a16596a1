"""Pydantic's validation errors turned into orchestra's: one line a field,
under the dotted path of the field to change, saying what is allowed."""

from __future__ import annotations

import functools
from typing import Any

from pydantic import BaseModel, ValidationError

from orchestra.errors import close_match
from orchestra.spec._base import _PATH_END


def problems_of(error: ValidationError, root: type[BaseModel]) -> list[tuple[str, str]]:
    """Pydantic's errors as (dotted field path, message naming what is allowed);
    `root` is the model that was validated (the JobSpec)."""
    problems: dict[str, list[str]] = {}
    for item in error.errors():
        loc = item["loc"]
        parts = _field_path(root, loc[:-1]) + [loc[-1]] if item["type"] == "extra_forbidden" else _field_path(root, loc)
        path = ".".join(str(part) for part in parts) or "(spec)"
        message = item["msg"].removeprefix("Value error, ").replace("Field required", "required")
        if _PATH_END in message:
            for line in message.splitlines():
                field, _, text = line.partition(_PATH_END)
                problems.setdefault(".".join(filter(None, [path if path != "(spec)" else "", field])), []).append(text)
            continue
        if item["type"] == "extra_forbidden":
            message = "unknown field"
            parent = _model_at(root, tuple(loc[:-1]))
            if parent is not None:
                message += f"; allowed: {', '.join(parent.model_fields)}"
                close = close_match(str(loc[-1]), list(parent.model_fields))
                message += f"; did you mean {close!r}?" if close else ""
        problems.setdefault(path, []).append(message.replace("Input should be", "must be"))
        value = item.get("input")
        if item["type"] != "extra_forbidden" and isinstance(value, (int, float, str, bool)) and len(repr(value)) < 60:
            problems[path][-1] += f" (got {value!r})"
    # A union member that got further (`compile.optimizer.learning_rate`) says
    # more than the members that did not (`compile.optimizer`: not a string).
    parents = {other.rsplit(".", n)[0] for other in problems for n in range(1, other.count(".") + 1)}
    deeper = [path for path in problems if path in parents]  # a set: 100,000 unknown keys stay fast
    for path in deeper:
        del problems[path]
    # One line a field: a value that fits none of a union's members gets each member's rule.
    return [(path, " — or ".join(dict.fromkeys(messages))) for path, messages in problems.items()]


def _field_path(root: type[BaseModel], loc: tuple) -> list:
    """A Pydantic error location without the union members it names
    (`int`, `literal['auto']`, `OptimizerSpec`, …): only the fields."""
    path: list = []
    model: Any = root
    for part in loc:
        if isinstance(part, int):
            path.append(part)
        elif isinstance(model, type) and issubclass(model, BaseModel) and part in model.model_fields:
            path.append(part)
            model = first_model(model.model_fields[part].annotation)
        elif isinstance(model, type) and issubclass(model, BaseModel) and model.model_config.get("extra") == "allow":
            path.append(part)
        elif part == getattr(model, "__name__", None):
            continue
        elif isinstance(part, str) and part[:1].isupper():  # a union member that is a spec class
            model = _models_under(root).get(part, model)
    return path


def _model_at(root: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The spec class found at a field path, to list its allowed fields."""
    model: Any = root
    for part in loc:
        if isinstance(part, str) and part in _models_under(root) and part not in getattr(model, "model_fields", {}):
            model = _models_under(root)[part]  # the union member Pydantic tried
            continue
        if isinstance(part, int) or not (isinstance(model, type) and issubclass(model, BaseModel)):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return None
        model = first_model(field.annotation)
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def first_model(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = first_model(arg)
        if found is not None:
            return found
    return None



@functools.cache
def _models_under(root: type[BaseModel]) -> dict[str, type[BaseModel]]:
    """Every spec class reachable from `root`'s fields, by class name."""
    found: dict[str, type[BaseModel]] = {}

    def visit(annotation: Any) -> None:
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            if annotation.__name__ not in found:
                found[annotation.__name__] = annotation
                for field in annotation.model_fields.values():
                    visit(field.annotation)
        for arg in getattr(annotation, "__args__", ()):
            visit(arg)

    visit(root)
    return found
