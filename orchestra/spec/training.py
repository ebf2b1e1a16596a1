"""The `compile` and `fit` sections: Keras's `compile` and `fit` arguments,
and which losses and metrics read which kind of labels."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    field_validator,
    model_validator,
)

from orchestra.spec._base import _PATH_END, StrictModel, _snake_case
from orchestra.spec.keras_objects import (
    KerasObjectSpec,
    object_or_name,
    object_problems,
)

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


class OptimizerSpec(BaseModel):
    """An optimizer in the short form, its class and arguments side by side:
    `{"type": "adam", "learning_rate": 1e-3, "beta_1": 0.9}`; the same as
    `{"class_name": "Adam", "config": {"learning_rate": 1e-3, "beta_1": 0.9}}`.
    Every key but `type` is an argument of the class's constructor."""

    model_config = ConfigDict(extra="allow", validate_assignment=True, allow_inf_nan=False)

    type: str = Field(min_length=1, description="A name from keras.optimizers, e.g. adam, sgd.")
    learning_rate: Annotated[float, Field(gt=0)] | KerasObjectSpec | None = Field(
        default=None, description="A number, or a keras.optimizers.schedules object, e.g. "
        '{"class_name": "CosineDecay", "config": {"initial_learning_rate": 0.1, "decay_steps": 1000}}.')
    momentum: float | None = Field(default=None, ge=0)

    @property
    def arguments(self) -> dict[str, Any]:
        """The constructor's arguments in Keras's config form (a schedule as its dict)."""
        extra = dict(self.model_extra or {})
        given = {"learning_rate": self.learning_rate, "momentum": self.momentum, **extra}
        return {key: value.model_dump() if isinstance(value, KerasObjectSpec) else value
                for key, value in given.items() if value is not None or key in extra}

    def as_object(self) -> KerasObjectSpec:
        return KerasObjectSpec.model_construct(class_name=self.type, config=self.arguments)


def _form(value: Any) -> str:
    """Which form an optimizer is written in: a name, Keras's config form, the short form."""
    if isinstance(value, (OptimizerSpec, KerasObjectSpec)):
        return type(value).__name__
    if isinstance(value, dict):
        return "OptimizerSpec" if "type" in value and "class_name" not in value else "KerasObjectSpec"
    return "str"


def _name_or_object(value: Any) -> str:
    """Which form a loss or metric is written in: a name or Keras's config form."""
    return "KerasObjectSpec" if isinstance(value, (dict, KerasObjectSpec)) else "str"


Name = Annotated[str, Field(min_length=1, max_length=256)]
NamedObject = Annotated[
    Annotated[Name, Tag("str")] | Annotated[KerasObjectSpec, Tag("KerasObjectSpec")], Discriminator(_name_or_object)]
OptimizerChoice = Annotated[
    Annotated[Name, Tag("str")] | Annotated[KerasObjectSpec, Tag("KerasObjectSpec")]
    | Annotated[OptimizerSpec, Tag("OptimizerSpec")], Discriminator(_form)]

# Metric classes whose default name is not their class name in snake case.
METRIC_DEFAULT_NAMES = {"FBetaScore": "fbeta_score", "KLDivergence": "kullback_leibler_divergence",
                        "LogCoshError": "logcosh"}


def metric_default_name(name: str) -> str:
    """The name Keras logs a metric given by name under: a class name such
    as `AUC` in snake case (`auc`, with Keras's few exceptions), any other
    name (a function's, `accuracy`) as written."""
    if not name[:1].isupper():
        return name
    return METRIC_DEFAULT_NAMES.get(name, _snake_case(name))


class CompileSpec(StrictModel):
    """Arguments of Keras's `compile`: each of optimizer, loss and metrics
    is a name (`"adam"`), or Keras's config form
    (`{"class_name": "Adam", "config": {"beta_1": 0.9}}`); the optimizer
    also takes the short form `{"type": "adam", "learning_rate": 0.01}`."""

    optimizer: OptimizerChoice = Field(
        default="rmsprop", description="A name from keras.optimizers, or {class_name, config}, or {type, ...}.")
    loss: NamedObject = Field(description="A name from keras.losses, or {class_name, config}.")
    metrics: list[NamedObject] = Field(
        default_factory=list, description="Names from keras.metrics or {class_name, config} (a single name is a list of one).")

    @field_validator("metrics", mode="before")
    @classmethod
    def _one_metric(cls, value: Any) -> Any:
        return [value] if isinstance(value, (str, dict)) else value

    @model_validator(mode="after")
    def _plain_arguments(self) -> CompileSpec:
        problems = []
        if isinstance(self.optimizer, OptimizerSpec):
            problems += [(f"optimizer.{path.removeprefix('config.')}", message) for path, message in
                         object_problems(self.optimizer.as_object(), "optimizer")]
        elif isinstance(self.optimizer, KerasObjectSpec):
            problems += [(f"optimizer.{path}", message) for path, message in object_problems(self.optimizer, "optimizer")]
        if isinstance(self.loss, KerasObjectSpec):
            problems += [(f"loss.{path}", message) for path, message in object_problems(self.loss, "loss")]
        for i, metric in enumerate(self.metrics):
            if isinstance(metric, KerasObjectSpec):
                problems += [(f"metrics.{i}.{path}", message) for path, message in object_problems(metric, "metric")]
        if problems:
            raise ValueError("\n".join(f"{path}{_PATH_END}{message}" for path, message in problems))
        return self

    @property
    def optimizer_object(self) -> KerasObjectSpec:
        """The optimizer in Keras's config form, whichever form the spec used."""
        if isinstance(self.optimizer, OptimizerSpec):
            return self.optimizer.as_object()
        return object_or_name(self.optimizer)

    @property
    def optimizer_spec(self) -> OptimizerSpec:
        """The optimizer in the short form (`type`, `learning_rate`, ...)."""
        if isinstance(self.optimizer, OptimizerSpec):
            return self.optimizer
        found = self.optimizer_object
        config = {key: value for key, value in found.config.items() if key != "type"}  # no Keras argument is
        if isinstance(config.get("learning_rate"), dict):
            config["learning_rate"] = KerasObjectSpec.model_validate(config["learning_rate"])
        return OptimizerSpec.model_construct(type=found.class_name, **config)

    @property
    def loss_object(self) -> KerasObjectSpec:
        return object_or_name(self.loss)

    @property
    def loss_name(self) -> str:
        """The loss's name or class name, which the label-kind rules read."""
        return self.loss_object.class_name

    @property
    def metric_objects(self) -> list[KerasObjectSpec]:
        return [object_or_name(metric) for metric in self.metrics]

    @property
    def metric_kinds(self) -> list[str]:
        """Each metric's name or class name, which the label-kind rules read."""
        return [metric.class_name for metric in self.metric_objects]

    @property
    def metric_names(self) -> list[str]:
        """The names Keras logs these metrics under: an object's
        `config.name`, else Keras's default name for its class; a name as
        `metric_default_name` says."""
        names = []
        for metric in self.metrics:
            if isinstance(metric, KerasObjectSpec):
                given = metric.config.get("name")
                names.append(given if isinstance(given, str) and given else metric_default_name(metric.class_name))
            else:
                names.append(metric_default_name(metric))
        return names


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

