"""The `model` section: a Sequential stack of Keras layers, optionally on a
`keras.applications` backbone, with the rules that keep layer arguments plain
values of sane sizes."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from orchestra.spec._base import _PATH_END, PATH_MAX, StrictModel, _usable_path
from orchestra.spec.keras_objects import (
    ARGUMENT_DEPTH,
    ARGUMENT_LENGTH,
    MAX_INT,  # noqa: F401  (re-exported: the spec reference quotes it)
    nested_problems,
    plain_value_problem,
)


class LayerSpec(BaseModel):
    """One Keras layer: `type` is a class in `keras.layers`; every other key
    is passed to its constructor, e.g. `{"type": "Dense", "units": 10}`.
    Arguments are plain values (numbers, strings, booleans, null, lists of
    them): an object would reach Keras's deserializer, which can name
    modules and custom classes. Only an initializer, regularizer or
    constraint may be an object, in Keras's config form with plain values,
    e.g. `"kernel_regularizer": {"class_name": "L2", "config": {"l2": 1e-4}}`."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9_]{0,63}$",
                      description="A class name from keras.layers, e.g. Dense.")

    @model_validator(mode="after")
    def _plain_arguments(self) -> LayerSpec:
        problems = []
        for key, value in self.arguments.items():
            if not re.fullmatch(r"[a-z][a-z0-9_]{0,63}", key):
                problems.append(f"{key[:64]!r}{_PATH_END}is not a Keras argument name (lower-case letters, digits, '_')")
                continue
            slot = next((slot for slot in OBJECT_ARGUMENTS if key.endswith("_" + slot)), None)
            if slot is not None and isinstance(value, dict):
                problems += [f"{'.'.join(filter(None, (key, path)))}{_PATH_END}{message}"
                             for path, message in nested_problems(value, slot)]
                continue
            problem = _layer_argument_problem(value) or _layer_rule_problem(key, value)
            if problem:
                problems.append(f"{key}{_PATH_END}{problem}")
        if problems:
            raise ValueError("\n".join(problems))
        return self

    @property
    def arguments(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


LAYER_ARGUMENT_DEPTH = ARGUMENT_DEPTH
LAYER_ARGUMENT_LENGTH = ARGUMENT_LENGTH
# Layer arguments (by their name's ending) that may be a Keras object, and its slot.
OBJECT_ARGUMENTS = ("initializer", "regularizer", "constraint")
MAX_LAYERS = 500  # tf-keras builds a Sequential model recursively: 2,000 layers exceed Python's stack
MAX_UNITS = 65_536  # a size argument above it asks for gigabytes in one layer (Dense of 3,000,000: 9.4 GB)
# Arguments that size a layer: whole numbers from 1 to MAX_UNITS (0 aborts the process inside oneDNN).
SIZE_ARGUMENTS = frozenset({
    "units", "filters", "output_dim", "input_dim", "num_heads", "key_dim", "value_dim", "depth_multiplier",
    "kernel_size", "pool_size", "strides", "dilation_rate", "size", "n", "max_tokens", "num_bins",
})
# Fractions of units dropped: below 1 (a rate of 1 drops everything, and Keras divides by 1 - rate).
RATE_ARGUMENTS = frozenset({"rate", "dropout", "recurrent_dropout"})
# Arguments Keras reads a file from when they are a string (lookup and vectorization vocabularies).
FILE_ARGUMENTS = frozenset({"vocabulary", "idf_weights", "stop_words"})


def _layer_rule_problem(key: str, value: Any) -> str | None:
    """What the orchestra-specific rule of argument `key` says of `value`, or None."""
    if key in FILE_ARGUMENTS and isinstance(value, str):
        return ("a string here is a file Keras would read; give the values inline as a list "
                "(layer arguments never name files)")
    if isinstance(value, str) and ("/" in value or "\\" in value or value.startswith("~")):
        return "looks like a file path; layer arguments never name files"
    if key in SIZE_ARGUMENTS and value is not None:  # null: Keras's default (strides = pool_size, ...)
        sizes = value if isinstance(value, list) else [value]
        if not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_UNITS for v in sizes):
            return (f"must be a whole number from 1 to {MAX_UNITS} (or a list of them); got {value!r:.40}: "
                    f"0 aborts TensorFlow, and more than {MAX_UNITS} asks for gigabytes in one layer")
    if key in RATE_ARGUMENTS and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not 0 <= value < 1:
            return f"must be at least 0 and below 1 (a fraction of the units to drop); got {value!r}"
    return None


def _layer_argument_problem(value: Any) -> str | None:
    """What is wrong with one layer argument that is not a Keras object, or None."""
    problem = plain_value_problem(value)
    if problem and isinstance(value, dict):
        return ("objects are not layer arguments (Keras would deserialize them, with module and class names): "
                "use numbers, strings, booleans, null or lists of them; only *_initializer, *_regularizer and "
                '*_constraint take an object, as {"class_name": ..., "config": {...}}')
    return problem


class BackboneSpec(StrictModel):
    """A `keras.applications` model the layers are stacked on (functional API).

    Weights come from a local file or nowhere: orchestra never downloads."""

    name: str = Field(min_length=1, description="A model in keras.applications, e.g. InceptionV3, MobileNetV2.")
    input_shape: list[Annotated[int, Field(ge=1)]] = Field(min_length=3, max_length=3)
    include_top: bool = False
    weights: str | None = Field(default=None, max_length=PATH_MAX, description="Path of a weights file (.h5); none: random weights.")
    trainable: Literal["all", "none"] = Field(default="none", description="Train the backbone's layers or freeze them.")
    trainable_from: str | None = Field(
        default=None, description="Freeze the backbone up to this layer; it and the layers after it train."
    )
    cut_at: str | None = Field(default=None, description="Use the output of this layer, e.g. mixed7.")

    @field_validator("weights")
    @classmethod
    def _local_weights(cls, value: str | None) -> str | None:
        _usable_path(value)
        if value is not None and value.lower() == "imagenet":
            raise ValueError(
                "'imagenet' would download; give the path of a weights file you have (or null for random weights)"
            )
        return value


class ModelSpec(StrictModel):
    """A Sequential stack of Keras layers, optionally on a backbone."""

    backbone: BackboneSpec | None = Field(default=None, description="A keras.applications model to start from.")

    input_shape: list[Annotated[int, Field(ge=1)]] | None = Field(
        default=None,
        description="Shape of one example (without the batch axis); default: the data's shape.",
    )
    layers: list[LayerSpec] = Field(
        min_length=1, description=f"Layers, first to last (after the backbone); at most {MAX_LAYERS}.")

    @field_validator("layers", mode="before")
    @classmethod
    def _not_too_many(cls, value: Any) -> Any:
        if isinstance(value, list) and len(value) > MAX_LAYERS:
            raise ValueError(f"{len(value)} layers; at most {MAX_LAYERS} (tf-keras builds a Sequential model "
                             "recursively, and a deeper stack exceeds Python's stack)")
        return value

    @model_validator(mode="after")
    def _one_input(self) -> ModelSpec:
        if self.backbone is not None and self.input_shape is not None:
            raise ValueError("the backbone's input_shape is the model's: leave model.input_shape out")
        return self

