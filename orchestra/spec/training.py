"""The `compile` and `fit` sections: Keras's `compile` and `fit` arguments,
and which losses and metrics read which kind of labels."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from orchestra.spec._base import StrictModel, _snake_case

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

