"""The job spec: one Pydantic model that is the single source of truth.

The JSON a user writes, the JSON Schema (`orchestra schema`), the error
messages (`orchestra validate`) and the defaults all come from the classes
below. Validation here is structural and needs no TensorFlow; names of Keras
layers, optimizers, losses and metrics are checked against Keras itself by
`orchestra.model.check_keras_names` before anything is dispatched.

Example:

    >>> spec = JobSpec.model_validate({
    ...     "data": {"source": "mnist", "rescale": "1/255", "flatten": True,
    ...              "labels": "one_hot", "train_size": 700,
    ...              "validation_size": 300},
    ...     "model": {"layers": [{"type": "Dense", "units": 2, "activation": "relu"},
    ...                          {"type": "Dense", "units": 10, "activation": "softmax"}]},
    ...     "compile": {"optimizer": "sgd", "loss": "categorical_crossentropy",
    ...                 "metrics": ["accuracy"]},
    ...     "fit": {"epochs": 3000, "batch_size": 10},
    ...     "callbacks": {"early_stopping": {"patience": 30}},
    ... })
    >>> spec.scaling.workers
    2
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from orchestra.errors import SpecError, printable

Mode = Literal["auto", "min", "max"]

# Losses that need one-hot labels, and those that need integer class labels.
ONE_HOT_LOSSES = frozenset({
    "categorical_crossentropy", "CategoricalCrossentropy",
    "categorical_focal_crossentropy", "CategoricalFocalCrossentropy",
    "categorical_hinge", "CategoricalHinge",
})
SPARSE_LOSSES = frozenset({
    "sparse_categorical_crossentropy", "SparseCategoricalCrossentropy",
})
BINARY_LOSSES = frozenset({
    "binary_crossentropy", "BinaryCrossentropy", "binary_focal_crossentropy", "BinaryFocalCrossentropy",
})
# Metrics that read labels one way only, as the losses above.
ONE_HOT_METRICS = frozenset({
    "categorical_accuracy", "CategoricalAccuracy", "top_k_categorical_accuracy", "TopKCategoricalAccuracy",
    "categorical_crossentropy", "CategoricalCrossentropy",
})
SPARSE_METRICS = frozenset({
    "sparse_categorical_accuracy", "SparseCategoricalAccuracy", "sparse_top_k_categorical_accuracy",
    "SparseTopKCategoricalAccuracy", "sparse_categorical_crossentropy", "SparseCategoricalCrossentropy",
})


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


# One-hot labels hold num_classes floats per example in memory (and `validate` makes them):
# 30,000 classes took 6.6 GB. Past this, a model wants sparse labels anyway.
MAX_CLASSES = 1000


class ImageFolderSpec(StrictModel):
    """A class-per-subfolder tree of image files, as Keras's
    `flow_from_directory` reads it: class names are the subfolder names,
    sorted. Files that are not readable images are skipped and counted."""

    train_dir: str = Field(min_length=1, max_length=PATH_MAX, description="Folder with one subfolder of images per class.")
    validation_dir: str | None = Field(
        default=None, max_length=PATH_MAX, description="The same layout for validation; or use data.validation_split."
    )
    target_size: list[Annotated[int, Field(ge=1, le=4096)]] = Field(
        default=[256, 256], min_length=2, max_length=2, description="Height and width images are resized to."
    )
    color_mode: Literal["rgb", "grayscale"] = "rgb"
    label_mode: Literal["binary", "categorical", "int"] = Field(
        default="categorical",
        description="binary: one 0/1 value (two classes); categorical: one-hot; int: class index.",
    )

    _paths = field_validator("train_dir", "validation_dir")(_usable_path)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (*self.target_size, 3 if self.color_mode == "rgb" else 1)


class AugmentationSpec(StrictModel):
    """Keras's `ImageDataGenerator` transforms, with its meaning and defaults."""

    rotation_range: float = Field(default=0, ge=0, le=360, description="Degrees of random rotation.")
    width_shift_range: float = Field(default=0, ge=0, lt=1, description="Fraction of the width.")
    height_shift_range: float = Field(default=0, ge=0, lt=1, description="Fraction of the height.")
    shear_range: float = Field(default=0, ge=0, le=360, description="Shear angle in degrees.")
    zoom_range: float = Field(default=0, ge=0, lt=1, description="Zoom in [1 - z, 1 + z].")
    horizontal_flip: bool = False
    vertical_flip: bool = False
    fill_mode: Literal["constant", "nearest", "reflect", "wrap"] = "nearest"


class DataSpec(StrictModel):
    """Where the examples come from and how they are prepared.

    `source` is a Keras dataset name (`mnist`, `fashion_mnist`, `cifar10`, …),
    looked up first as `<name>.npz` in the dataset directory
    (`ORCHESTRA_DATASETS` or `--datasets`), or a path to an `.npz` file with
    Keras's arrays `x_train`, `y_train` and optionally `x_test`, `y_test`.
    """

    source: str | None = Field(
        default=None, min_length=1, max_length=PATH_MAX,
        description="Keras dataset name (mnist, fashion_mnist, cifar10, ...) or path to an .npz file.",
    )
    rescale: float | None = Field(
        default=None,
        description="Multiply pixel values by this factor, e.g. '1/255'.",
    )
    flatten: bool = Field(default=False, description="Flatten each example to one dimension.")
    reshape: list[Annotated[int, Field(ge=1)]] | None = Field(
        default=None, description="Reshape each example to this shape (without the batch axis)."
    )
    labels: Literal["sparse", "one_hot"] = Field(
        default="sparse", description="Integer class labels, or one-hot vectors."
    )
    num_classes: int | None = Field(
        default=None, ge=2, le=MAX_CLASSES,
        description=f"Classes for one-hot labels (default: largest label + 1); at most {MAX_CLASSES}.",
    )
    train_size: int | None = Field(
        default=None, ge=1, description="Draw this many training examples at random."
    )
    validation_size: int | None = Field(
        default=None, ge=1,
        description="Draw this many validation examples at random from the training arrays.",
    )
    validation_split: float | None = Field(
        default=None, gt=0, lt=1,
        description="Hold out this fraction of the training arrays for validation.",
    )
    test: bool = Field(
        default=True, description="Evaluate the final model on the dataset's test arrays."
    )
    test_size: int | None = Field(
        default=None, ge=1, description="Evaluate on only the first N test examples."
    )
    seed: int = Field(default=42, ge=0, le=2**32 - 1, description="Seed of the random split and subsets.")
    images: ImageFolderSpec | None = Field(
        default=None, description="Read a class-per-subfolder tree of image files instead of arrays."
    )
    augmentation: AugmentationSpec | None = Field(
        default=None, description="Random transforms of training images (image folders only); never of validation."
    )

    _parse_rescale = field_validator("rescale", mode="before")(_parse_fraction)
    _paths = field_validator("source")(_usable_path)

    @field_validator("rescale")
    @classmethod
    def _rescale_positive(cls, value: float | None) -> float | None:
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ValueError("must be a positive finite number, e.g. '1/255'")
        return value

    @model_validator(mode="after")
    def _one_way_to_validate(self) -> DataSpec:
        if (self.source is None) == (self.images is None):
            raise ValueError("give either source (arrays) or images (an image folder), exactly one")
        if self.augmentation is not None and self.images is None:
            raise ValueError("augmentation applies to image folders: give data.images")
        if self.images is not None and self.validation_size is not None:
            raise ValueError("an image folder takes validation_split or images.validation_dir, not validation_size")
        if self.validation_split is not None and self.validation_size is not None:
            raise ValueError(
                "give either validation_split (a fraction) or validation_size "
                "(a number of examples), not both"
            )
        if self.flatten and self.reshape is not None:
            raise ValueError("give either flatten or reshape, not both")
        return self

    @property
    def has_validation(self) -> bool:
        folder = self.images is not None and self.images.validation_dir is not None
        return folder or self.validation_split is not None or self.validation_size is not None

    @property
    def label_kind(self) -> str:
        """`sparse`, `one_hot` or `binary`: how labels reach the loss."""
        if self.images is None:
            return self.labels
        return {"int": "sparse", "categorical": "one_hot", "binary": "binary"}[self.images.label_mode]

    @property
    def label_field(self) -> str:
        return "data.images.label_mode" if self.images is not None else "data.labels"


class LayerSpec(BaseModel):
    """One Keras layer: `type` is a class in `keras.layers`; every other key
    is passed to its constructor, e.g. `{"type": "Dense", "units": 10}`.
    Arguments are plain values (numbers, strings, booleans, null, lists of
    them): an object would reach Keras's deserializer, which can name
    modules and custom classes."""

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
            problem = _layer_argument_problem(value) or _layer_rule_problem(key, value)
            if problem:
                problems.append(f"{key}{_PATH_END}{problem}")
        if problems:
            raise ValueError("\n".join(problems))
        return self

    @property
    def arguments(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


LAYER_ARGUMENT_DEPTH = 3
LAYER_ARGUMENT_LENGTH = 64
MAX_INT = 2**31 - 1
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


def _layer_argument_problem(value: Any, depth: int = 0) -> str | None:
    """What is wrong with one layer argument, or None."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return None if abs(value) <= MAX_INT else f"{value:.3g} is out of range (at most {MAX_INT} in magnitude)"
    if isinstance(value, float):
        return None if math.isfinite(value) else f"{value} is not a finite number"
    if isinstance(value, str):
        return None if len(value) <= 256 else "strings are at most 256 characters"
    if isinstance(value, list):
        if depth >= LAYER_ARGUMENT_DEPTH or len(value) > LAYER_ARGUMENT_LENGTH:
            return (f"lists are at most {LAYER_ARGUMENT_LENGTH} long and nested "
                    f"{LAYER_ARGUMENT_DEPTH} deep")
        return next(filter(None, (_layer_argument_problem(item, depth + 1) for item in value)), None)
    return ("objects are not layer arguments (Keras would deserialize them, with module and class names): "
            "use numbers, strings, booleans, null or lists of them")


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


class OptimizerSpec(StrictModel):
    """An optimizer with arguments, e.g. `{"type": "adam", "learning_rate": 1e-3}`."""

    type: str = Field(min_length=1, description="A name from keras.optimizers, e.g. adam, sgd.")
    learning_rate: float | None = Field(default=None, gt=0)
    momentum: float | None = Field(default=None, ge=0)


class CompileSpec(StrictModel):
    optimizer: Annotated[str, Field(min_length=1)] | OptimizerSpec = Field(
        default="rmsprop", description="Optimizer name or object.")
    loss: str = Field(min_length=1, description="A name from keras.losses.")
    metrics: list[str] = Field(default_factory=list, description="Names from keras.metrics.")

    @property
    def optimizer_spec(self) -> OptimizerSpec:
        if isinstance(self.optimizer, str):
            return OptimizerSpec(type=self.optimizer)
        return self.optimizer

    @property
    def metric_names(self) -> list[str]:
        """The names Keras logs these metrics under: a class name such as
        `AUC` is logged in snake case (`auc`), any other name as written."""
        return [_snake_case(m) if m[:1].isupper() else m for m in self.metrics]


class FitSpec(StrictModel):
    """Arguments of Keras's `fit`. `batch_size` is the global batch, split
    evenly across the workers."""

    epochs: int = Field(default=1, ge=1, le=1_000_000)
    batch_size: int = Field(default=32, ge=1, description="Global batch size across all workers.")
    shuffle: bool = True
    class_weight: dict[int, Annotated[float, Field(ge=0)]] | None = None
    steps_per_epoch: int | None = Field(default=None, ge=1)
    validation_freq: int = Field(default=1, ge=1)
    validation_batch_size: int | None = Field(default=None, ge=1)
    validation_steps: int | None = Field(default=None, ge=1)
    verbose: Literal[0, 1, 2] = Field(default=0, description="Keras progress output on the workers.")


class EarlyStoppingSpec(StrictModel):
    """Keras's `EarlyStopping`, decided once for the whole job on the driver."""

    monitor: str = "val_loss"
    min_delta: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    patience: int = Field(default=0, ge=0)
    mode: Mode = "auto"
    baseline: float | None = Field(default=None, allow_inf_nan=False)
    restore_best_weights: bool = False
    start_from_epoch: int = Field(default=0, ge=0)


class CheckpointSpec(StrictModel):
    """Keras's `ModelCheckpoint`, written to shared storage by the workers on
    the driver's decision."""

    monitor: str = "val_loss"
    mode: Mode = "auto"
    save_best_only: bool = False
    save_weights_only: bool = False
    keep: int = Field(default=3, ge=1, description="Keep the newest N checkpoints (the best is always kept).")


class TensorBoardSpec(StrictModel):
    update_freq: Literal["epoch", "batch"] = "epoch"
    histogram_freq: int = Field(default=0, ge=0, description="Weight histograms every N epochs (0: off).")


class CallbacksSpec(StrictModel):
    early_stopping: EarlyStoppingSpec | None = None
    checkpoint: CheckpointSpec | None = None
    tensorboard: TensorBoardSpec | None = Field(default_factory=TensorBoardSpec)


# A worker is a TensorFlow process with its own threads and a collective
# server: below a quarter of a CPU it starves, and a job of many such
# workers passes the CPU count of any cluster.
MIN_CPUS_PER_WORKER = 0.25
# One driver follows every worker and one collective ring joins them all.
MAX_WORKERS = 256


class ScalingSpec(StrictModel):
    workers: int = Field(default=2, ge=1, description=f"Ray Train workers (one replica each); at most {MAX_WORKERS}.")
    cpus_per_worker: float = Field(default=1, le=1024, description=f"At least {MIN_CPUS_PER_WORKER}.")
    use_gpu: bool = False
    max_failures: int = Field(
        default=0, ge=0, le=100,
        description="Restart the workers from the latest checkpoint this many times.",
    )

    @field_validator("workers")
    @classmethod
    def _few_enough_workers(cls, value: int) -> int:
        if value > MAX_WORKERS:
            raise ValueError(f"{value} workers; at most {MAX_WORKERS} (one driver follows every worker "
                             "and one collective ring joins them all)")
        return value

    @field_validator("cpus_per_worker")
    @classmethod
    def _enough_cpu(cls, value: float) -> float:
        if not value >= MIN_CPUS_PER_WORKER:
            raise ValueError(f"{value:g} CPU; at least {MIN_CPUS_PER_WORKER} (a worker is a TensorFlow process "
                             "with its own threads: with less it starves)")
        return value


Auto = Literal["auto"]


class PerformanceSpec(StrictModel):
    """orchestra's fast defaults for MultiWorkerMirroredStrategy on CPUs.

    Each keeps Keras's meaning (the same per-epoch metrics within float
    noise, the same early-stopping epoch); each can be overridden.
    """

    steps_per_execution: Annotated[int, Field(ge=1)] | Auto = Field(
        default="auto",
        description="Keras's compile argument; auto: up to 50 steps per call (1 with per-batch TensorBoard).",
    )
    threads_per_worker: Annotated[int, Field(ge=1, le=1024)] | Auto = Field(
        default="auto",
        description="TensorFlow threads per worker; auto: one per CPU the worker holds.",
    )
    gradient_pack_bytes: Annotated[int, Field(ge=0)] | Auto = Field(
        default="auto",
        description="Pack gradients into all-reduces of this many bytes; auto and 0: TensorFlow's default.",
    )
    evaluation_batch_size: Annotated[int, Field(ge=1)] | Auto = Field(
        default="auto",
        description="Global batch of validation and test steps unless fit.validation_batch_size is set; auto: 1024.",
    )
    skip_end_of_data_vote: bool = Field(
        default=True,
        description="Declare the training data endless so workers do not vote each step on whether data remains.",
    )
    single_worker_strategy: Literal["none", "multi_worker_mirrored"] = Field(
        default="none",
        description="With 1 worker, train without a distribution strategy (no collectives) or with one.",
    )


class DataLoaderSpec(StrictModel):
    processes: int = Field(default=2, ge=1, le=64, description="Parallel input-pipeline workers.")
    prefetch: int = Field(default=2, ge=0, le=64, description="Batches prepared ahead of the model.")


class JobSpec(StrictModel):
    """A training job: what to train, on what, how, and where to keep it."""

    name: str = Field(
        default="job", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
        description="Job name; the job id starts with it.",
    )
    comment: str | None = Field(default=None, description="Free text, e.g. which seed it reproduces.")
    seed: int = Field(default=0, ge=0, le=2**32 - 1, description="Seed of initial weights and shuffling.")
    data: DataSpec
    model: ModelSpec
    compile: CompileSpec
    fit: FitSpec = Field(default_factory=FitSpec)
    callbacks: CallbacksSpec = Field(default_factory=CallbacksSpec)
    scaling: ScalingSpec = Field(default_factory=ScalingSpec)
    data_loader: DataLoaderSpec = Field(default_factory=DataLoaderSpec)
    performance: PerformanceSpec = Field(default_factory=PerformanceSpec)
    storage: str | None = Field(
        default=None, max_length=PATH_MAX,
        description="Root of the shared storage (an absolute path, or ~/...); --storage and ORCHESTRA_STORAGE "
        "override it; default ~/orchestra_storage.",
    )

    @field_validator("name")
    @classmethod
    def _usable_in_a_job_id(cls, value: str) -> str:
        if ".." in value:
            raise ValueError(f"{value!r} contains '..', which no job id may hold; use letters, digits, '_', '.', '-'")
        return value

    @field_validator("storage")
    @classmethod
    def _absolute_storage(cls, value: str | None) -> str | None:
        if value is None or ("://" in value and not value.startswith("file://")):
            return value  # a URI: the storage layer says which it supports
        path = _usable_path(value.removeprefix("file://"))
        if not (path.startswith("/") or path == "~" or path.startswith("~/")):
            raise ValueError(f"{value[:60]!r} is relative (to a folder that differs between the submitter and "
                             "the driver); give an absolute path, e.g. /shared/orchestra")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> JobSpec:
        """Rules that span sections; every broken one is reported, each under
        the path of the field to change."""
        problems = list(_text_problems(self.model_dump(), ()))
        loss = self.compile.loss
        kind, field = self.data.label_kind, self.data.label_field
        wanted = {"one_hot": "'one_hot'", "sparse": "'sparse'"}
        if field == "data.images.label_mode":
            wanted = {"one_hot": "'categorical'", "sparse": "'int'"}
        if loss in ONE_HOT_LOSSES and kind != "one_hot":
            problems.append((
                field,
                f"gives {kind} labels but compile.loss '{loss}' expects one-hot labels: "
                f"set {field} to {wanted['one_hot']} or use 'sparse_categorical_crossentropy'",
            ))
        if loss in SPARSE_LOSSES and kind != "sparse":
            problems.append((
                field,
                f"gives {kind} labels but compile.loss '{loss}' expects integer labels: "
                f"set {field} to {wanted['sparse']} or use 'categorical_crossentropy'",
            ))
        if self.data.images is not None and self.model.backbone is not None:
            if list(self.data.images.image_shape) != self.model.backbone.input_shape:
                problems.append((
                    "data.images.target_size",
                    f"gives images of shape {list(self.data.images.image_shape)} but the backbone takes "
                    f"{self.model.backbone.input_shape}",
                ))
        if self.fit.validation_steps is not None and not self.data.has_validation:
            problems.append(("fit.validation_steps", "is set but the job has no validation data"))
        if self.fit.batch_size % self.scaling.workers:
            problems.append((
                "fit.batch_size",
                f"{self.fit.batch_size} must be a multiple of scaling.workers "
                f"{self.scaling.workers} (each worker takes an equal share)",
            ))
        problems += self._metric_problems()
        problems += self.output_problems(self.data.num_classes if kind == "one_hot" else None)
        allowed = self.logged_metrics
        for name, section in (
            ("early_stopping", self.callbacks.early_stopping),
            ("checkpoint", self.callbacks.checkpoint),
        ):
            if section is not None and section.monitor not in allowed:
                problems.append((
                    f"callbacks.{name}.monitor",
                    f"'{section.monitor}' is not a metric this job logs; allowed: {', '.join(allowed)}",
                ))
        board, steps = self.callbacks.tensorboard, self.performance.steps_per_execution
        if board is not None and board.update_freq == "batch" and steps not in ("auto", 1):
            problems.append((
                "performance.steps_per_execution",
                f"{steps} hides all but every {steps}th batch from update_freq 'batch'; use 'auto' or 1",
            ))
        if problems:
            raise ValueError("\n".join(f"{path}{_PATH_END}{message}" for path, message in problems))
        return self

    def _metric_problems(self) -> list[tuple[str, str]]:
        problems, seen = [], {}
        kind, field = self.data.label_kind, self.data.label_field
        for i, (metric, logged) in enumerate(zip(self.compile.metrics, self.compile.metric_names)):
            if logged in seen:
                problems.append((f"compile.metrics.{i}", f"'{metric}' is logged as '{logged}', as is "
                                                         f"compile.metrics.{seen[logged]}: list each metric once"))
            seen.setdefault(logged, i)
            if metric in SPARSE_METRICS and kind != "sparse":
                problems.append((f"compile.metrics.{i}", f"'{metric}' reads integer labels but {field} gives "
                                                         f"{kind} labels; use '{metric.replace('sparse_', '')}'"))
            if metric in ONE_HOT_METRICS and kind != "one_hot":
                problems.append((f"compile.metrics.{i}", f"'{metric}' reads one-hot labels but {field} gives "
                                                         f"{kind} labels; use 'sparse_{metric}' or 'accuracy'"))
        return problems

    @property
    def output_width(self) -> tuple[str, int] | None:
        """(field, width) of the model's output when the spec says it: the
        `units` of a last layer that is `Dense`."""
        last = self.model.layers[-1]
        units = last.arguments.get("units")
        if last.type != "Dense" or not isinstance(units, int):
            return None
        return f"model.layers.{len(self.model.layers) - 1}.units", units

    def output_problems(self, num_classes: int | None) -> list[tuple[str, str]]:
        """The last layer's width against the labels and the loss, as
        (field, message). `num_classes`: the classes of the labels (for
        integer labels, the largest + 1), when known; the spec alone knows
        `data.num_classes` (pre-flight's trial step checks the data's).

            >>> spec = JobSpec.model_validate({
            ...     "data": {"source": "mnist"}, "model": {"layers": [{"type": "Dense", "units": 5}]},
            ...     "compile": {"loss": "sparse_categorical_crossentropy"}})
            >>> spec.output_problems(10)
            [('model.layers.0.units', '5 outputs, but the labels have up to 10 classes: set units to 10')]
        """
        found = self.output_width
        loss, kind = self.compile.loss, self.data.label_kind
        problems = []
        if loss in BINARY_LOSSES and kind != "one_hot" and num_classes is not None and num_classes > 2:
            problems.append(("compile.loss", f"'{loss}' takes labels 0 and 1, but the labels have {num_classes} "
                                             "classes; use 'sparse_categorical_crossentropy'"))
        if found is None:
            return problems
        field, width = found
        if loss in BINARY_LOSSES and kind != "one_hot" and width != 1:
            problems.append((field, f"{width} outputs, but '{loss}' on {kind} labels (one 0/1 value each) "
                                    "needs 1: set units to 1 (activation sigmoid)"))
        elif (loss in ONE_HOT_LOSSES or loss in SPARSE_LOSSES) and width < 2:
            problems.append((field, f"{width} output, but '{loss}' needs one output per class (at least 2)"))
        elif kind == "one_hot" and num_classes is not None and width != num_classes:
            problems.append((field, f"{width} outputs, but the labels have {num_classes} classes: "
                                    f"set units to {num_classes}"))
        elif kind == "sparse" and loss in SPARSE_LOSSES and num_classes is not None and width < num_classes:
            problems.append((field, f"{width} outputs, but the labels have up to {num_classes} classes: "
                                    f"set units to {num_classes}"))
        return problems

    @property
    def default_monitor(self) -> str:
        """What a job is judged by when no callback names a monitor, as
        Keras's callbacks default: `val_loss` with validation data, else `loss`."""
        return "val_loss" if self.data.has_validation else "loss"

    @property
    def logged_metrics(self) -> list[str]:
        """Every key Keras puts in the epoch logs of this job."""
        train = ["loss", *self.compile.metric_names]
        if not self.data.has_validation:
            return train
        return train + [f"val_{name}" for name in train]

    def with_overrides(
        self, *, workers: int | None = None, storage: str | None = None, source: str = "spec"
    ) -> JobSpec:
        """A copy with CLI overrides applied and validated again."""
        data = self.model_dump(mode="json")
        if workers is not None:
            data["scaling"]["workers"] = workers
        if storage is not None:
            # A relative path on the command line means the caller's folder; in a spec it would not.
            relative = "://" not in storage and not storage.startswith(("/", "~"))
            data["storage"] = os.path.abspath(storage) if relative and "\x00" not in storage else storage
        try:
            return JobSpec.model_validate(data)
        except ValidationError as exc:
            raise SpecError(problems_of(exc), source) from None


def problems_of(error: ValidationError) -> list[tuple[str, str]]:
    """Pydantic's errors as (dotted field path, message naming what is allowed)."""
    problems: dict[str, list[str]] = {}
    for item in error.errors():
        loc = item["loc"]
        parts = _field_path(loc[:-1]) + [loc[-1]] if item["type"] == "extra_forbidden" else _field_path(loc)
        path = ".".join(str(part) for part in parts) or "(spec)"
        message = item["msg"].removeprefix("Value error, ").replace("Field required", "required")
        if _PATH_END in message:
            for line in message.splitlines():
                field, _, text = line.partition(_PATH_END)
                problems.setdefault(".".join(filter(None, [path if path != "(spec)" else "", field])), []).append(text)
            continue
        if item["type"] == "extra_forbidden":
            message = "unknown field"
            parent = _model_at(tuple(parts[:-1]))
            if parent is not None:
                message += f"; allowed: {', '.join(parent.model_fields)}"
        problems.setdefault(path, []).append(message.replace("Input should be", "must be"))
        value = item.get("input")
        if item["type"] != "extra_forbidden" and isinstance(value, (int, float, str, bool)) and len(repr(value)) < 60:
            problems[path][-1] += f" (got {value!r})"
    # A union member that got further (`compile.optimizer.learning_rate`) says
    # more than the members that did not (`compile.optimizer`: not a string).
    deeper = [path for path in problems if any(other.startswith(path + ".") for other in problems)]
    for path in deeper:
        del problems[path]
    # One line a field: a value that fits none of a union's members gets each member's rule.
    return [(path, " — or ".join(dict.fromkeys(messages))) for path, messages in problems.items()]


def _field_path(loc: tuple) -> list:
    """A Pydantic error location without the union members it names
    (`int`, `literal['auto']`, `OptimizerSpec`, …): only the fields."""
    path: list = []
    model: Any = JobSpec
    for part in loc:
        if isinstance(part, int):
            path.append(part)
        elif isinstance(model, type) and issubclass(model, BaseModel) and part in model.model_fields:
            path.append(part)
            model = _first_model(model.model_fields[part].annotation)
        elif isinstance(model, type) and issubclass(model, BaseModel) and model.model_config.get("extra") == "allow":
            path.append(part)
        elif part == getattr(model, "__name__", None):
            continue
        elif isinstance(part, str) and part[:1].isupper():  # a union member that is a spec class
            model = globals().get(part, model)
    return path


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The spec class found at a field path, to list its allowed fields."""
    model: Any = JobSpec
    for part in loc:
        if isinstance(part, int) or not (isinstance(model, type) and issubclass(model, BaseModel)):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return None
        model = _first_model(field.annotation)
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _first_model(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _first_model(arg)
        if found is not None:
            return found
    return None


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
        raise SpecError(problems_of(exc), source) from None


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
