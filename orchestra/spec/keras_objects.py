"""Keras objects with arguments, in Keras's own serialized form.

A spec names an optimizer, a loss, a metric, a learning-rate schedule or a
layer's initializer, regularizer or constraint as Keras serializes it,
`{"class_name": "Adam", "config": {"beta_1": 0.9, "clipnorm": 1.0}}`, and
never more: Keras's deserializer also reads `module` and `registered_name`
(which import modules and custom classes) and nested objects of any class,
and none of these may reach it from a spec. The rules here are structural
and need no TensorFlow; that the class exists in its Keras namespace and
takes the arguments given is checked against Keras by
`orchestra.build.model.check_keras_names` before anything is dispatched.

Example:

    >>> adam = KerasObjectSpec.model_validate(
    ...     {"class_name": "Adam", "config": {"learning_rate": 1e-3, "beta_1": 0.9}})
    >>> object_problems(adam, "optimizer")
    []
    >>> [path for path, _ in object_problems(
    ...     KerasObjectSpec(class_name="Adam", config={"beta_1": {"class_name": "X"}}), "optimizer")]
    ['config.beta_1']
"""

from __future__ import annotations

import math
import re
from typing import Any

from pydantic import Field, model_validator

from orchestra.spec._base import StrictModel

# The Keras namespace of each slot a spec can fill with a Keras object.
NAMESPACES = {
    "optimizer": "keras.optimizers", "loss": "keras.losses", "metric": "keras.metrics",
    "schedule": "keras.optimizers.schedules", "initializer": "keras.initializers",
    "regularizer": "keras.regularizers", "constraint": "keras.constraints",
}
# The learning-rate schedules an optimizer's `learning_rate` may be.
SCHEDULES = ("CosineDecay", "CosineDecayRestarts", "ExponentialDecay", "InverseTimeDecay",
             "PiecewiseConstantDecay", "PolynomialDecay")
# Where Keras itself takes an object as an argument: (slot, argument) → the slot of that object.
NESTED = {("optimizer", "learning_rate"): "schedule"}
# Keys of Keras's serialized form that would import code; never accepted.
CODE_KEYS = ("module", "registered_name")

MAX_INT = 2**31 - 1
ARGUMENT_DEPTH = 3
ARGUMENT_LENGTH = 64


class KerasObjectSpec(StrictModel):
    """A Keras object as Keras serializes it: a class of the slot's Keras
    namespace and its constructor's arguments, as plain values.

    Args:
        class_name: a class of the slot's namespace, e.g. `Adam` in
            `keras.optimizers`, `CategoricalCrossentropy` in `keras.losses`.
        config: the constructor's arguments (numbers, strings, booleans,
            null, lists of them); an optimizer's `learning_rate` may be a
            `keras.optimizers.schedules` object in the same form.

    Example:

        >>> KerasObjectSpec.model_validate({"class_name": "AUC", "config": {"multi_label": True}}).class_name
        'AUC'
    """

    class_name: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9_]{0,63}$",
                            description="A class of the slot's Keras namespace, e.g. Adam (no module, no dots).")
    config: dict[str, Any] = Field(default_factory=dict, description="The class's constructor arguments.")

    @model_validator(mode="before")
    @classmethod
    def _no_code(cls, value: Any) -> Any:
        if isinstance(value, dict):
            found = [key for key in CODE_KEYS if key in value]
            if found:
                raise ValueError(f"'{found[0]}' is not allowed: a spec names only classes of Keras's own "
                                 "namespaces, by class_name, with their arguments in config")
            if "type" in value and "class_name" not in value:
                raise ValueError('write {"class_name": ..., "config": {...}} (the short form {"type": ...} '
                                 "is compile.optimizer's only)")
        return value


def plain_value_problem(value: Any, depth: int = 0) -> str | None:
    """What keeps `value` from being a plain argument (a finite number, a
    string of at most 256 characters, a boolean, null, or a short list of
    them), or None."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return None if abs(value) <= MAX_INT else f"{value:.3g} is out of range (at most {MAX_INT} in magnitude)"
    if isinstance(value, float):
        return None if math.isfinite(value) else f"{value} is not a finite number"
    if isinstance(value, str):
        return None if len(value) <= 256 else "strings are at most 256 characters"
    if isinstance(value, list):
        if depth >= ARGUMENT_DEPTH or len(value) > ARGUMENT_LENGTH:
            return f"lists are at most {ARGUMENT_LENGTH} long and nested {ARGUMENT_DEPTH} deep"
        return next(filter(None, (plain_value_problem(item, depth + 1) for item in value)), None)
    return "objects are not allowed: use numbers, strings, booleans, null or lists of them"


def object_problems(obj: KerasObjectSpec, slot: str) -> list[tuple[str, str]]:
    """The structural problems of a Keras object in `slot` (a key of
    NAMESPACES), as (path under the object, message): arguments that are not
    plain values, objects where Keras takes none, a schedule that is not one."""
    problems = []
    if slot == "schedule" and obj.class_name not in SCHEDULES:
        problems.append(("class_name", f"'{obj.class_name}' is not a learning-rate schedule; allowed: "
                                       f"{', '.join(SCHEDULES)} (from keras.optimizers.schedules)"))
    for key, value in obj.config.items():
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,63}", key):
            problems.append((f"config.{key[:64]}", "is not a Keras argument name (letters, digits, '_')"))
            continue
        nested = NESTED.get((slot, key))
        if nested is not None and isinstance(value, dict):
            problems += [(".".join(filter(None, (f"config.{key}", path))), message)
                         for path, message in nested_problems(value, nested)]
            continue
        problem = plain_value_problem(value)
        if (slot, key) == ("optimizer", "learning_rate") and _number(value) and value <= 0:
            problem = f"must be greater than 0, or a schedule (got {value!r})"
        if problem and isinstance(value, dict):
            where = ("only an optimizer's learning_rate may be a schedule" if slot == "optimizer"
                     else f"{slot} arguments are plain values")
            problem = f"objects are not arguments here ({where}): use numbers, strings, booleans, null or lists of them"
        if problem:
            problems.append((f"config.{key}", problem))
    return problems


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def nested_problems(value: dict, slot: str) -> list[tuple[str, str]]:
    """The problems of a Keras object given as a dict (not yet validated)
    in `slot`, paths relative to it."""
    from pydantic import ValidationError

    try:
        obj = KerasObjectSpec.model_validate(value)
    except ValidationError as exc:
        return [(".".join(str(part) for part in error["loc"]),
                 error["msg"].removeprefix("Value error, ").replace("Field required", "required")
                 .replace("Extra inputs are not permitted", "unknown field; allowed: class_name, config"))
                for error in exc.errors()]
    return object_problems(obj, slot)


def object_or_name(value: Any) -> KerasObjectSpec:
    """A name or a Keras object as a Keras object (a name has no arguments)."""
    if isinstance(value, KerasObjectSpec):
        return value
    return KerasObjectSpec.model_construct(class_name=value, config={})
