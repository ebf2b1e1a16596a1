"""The whole `JobSpec`: its sections, and the rules that span them."""

from __future__ import annotations

import os

from pydantic import Field, ValidationError, field_validator, model_validator

from orchestra.errors import SpecError
from orchestra.spec._base import (
    _PATH_END,
    PATH_MAX,
    StrictModel,
    _text_problems,
    _usable_path,
)
from orchestra.spec.callbacks import (
    Callbacks,
    TensorBoardSpec,
    callback_problems,
    config_of,
    default_callbacks,
)
from orchestra.spec.data import DataLoaderSpec, DataSpec
from orchestra.spec.model import ModelSpec
from orchestra.spec.problems import problems_of
from orchestra.spec.scaling import PerformanceSpec, ScalingSpec
from orchestra.spec.training import (
    BINARY_LOSSES,
    ONE_HOT_LOSSES,
    ONE_HOT_METRICS,
    SPARSE_LOSSES,
    SPARSE_METRICS,
    CompileSpec,
    FitSpec,
)


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
    callbacks: Callbacks = Field(
        default_factory=default_callbacks,
        description="Keras's callbacks, in the order they run: a list of {\"class_name\": ..., \"config\": {...}}; "
        "default: TensorBoard alone. A list given is exactly what runs.",
    )
    scaling: ScalingSpec = Field(default_factory=ScalingSpec)
    data_loader: DataLoaderSpec = Field(default_factory=DataLoaderSpec)
    performance: PerformanceSpec = Field(default_factory=PerformanceSpec)
    storage: str | None = Field(
        default=None, max_length=PATH_MAX,
        description="Root of the shared storage (an absolute path, ~/..., or an S3 bucket: s3://<bucket>/<prefix>); "
        "--storage and ORCHESTRA_STORAGE "
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
        loss = self.compile.loss_name
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
        scheduled = isinstance(self.compile.optimizer_object.config.get("learning_rate"), dict)
        problems += callback_problems(self.callbacks, self.logged_metrics, scheduled)
        board, steps = config_of(self.callbacks, TensorBoardSpec), self.performance.steps_per_execution
        if board is not None and board.batch_every is not None and steps not in ("auto", 1):
            problems.append((
                "performance.steps_per_execution",
                f"{steps} hides all but every {steps}th batch from TensorBoard's update_freq "
                f"{board.update_freq!r}; use 'auto' or 1",
            ))
        if problems:
            raise ValueError("\n".join(f"{path}{_PATH_END}{message}" for path, message in problems))
        return self

    def _metric_problems(self) -> list[tuple[str, str]]:
        problems, seen = [], {}
        kind, field = self.data.label_kind, self.data.label_field
        for i, (metric, logged) in enumerate(zip(self.compile.metric_kinds, self.compile.metric_names)):
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
        loss, kind = self.compile.loss_name, self.data.label_kind
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
            raise SpecError(problems_of(exc, JobSpec), source) from None

