"""The `callbacks` section: Keras's callbacks as Keras serializes them, a list
of `{"class_name": ..., "config": {...}}`, each decided once for the whole
job on the driver and obeyed by every worker in the same epoch.

Only the class names below (Keras's own) and callbacks that installed
packages register (`orchestra.spec.plugins`) can be named; a `config` holds
plain values, never code: a learning-rate schedule is named as a
`keras.optimizers.schedules` config, not written as a function.

Example:

    >>> entries = CallbacksList.validate_python([
    ...     {"class_name": "EarlyStopping", "config": {"patience": 3}},
    ...     {"type": "ReduceLROnPlateau", "factor": 0.5, "patience": 1},
    ... ])
    >>> [(entry.class_name, type(entry.config).__name__) for entry in entries]
    [('EarlyStopping', 'EarlyStoppingSpec'), ('ReduceLROnPlateau', 'ReduceLROnPlateauSpec')]
"""

from __future__ import annotations

import json
import math
import re
import string
from pathlib import PurePosixPath
from typing import Annotated, Any, Literal, TypeVar, Union

from pydantic import (
    BeforeValidator,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from orchestra.errors import close_match
from orchestra.spec._base import _PATH_END, Mode, StrictModel
from orchestra.spec.plugins import registered_callbacks
from orchestra.spec.problems import problems_of

Verbose = Literal[0, 1, 2]
_VERBOSE = "Accepted as Keras takes it; the driver's log and the job record say what the callback did."


def _refused(reason: str):
    """A validator for a Keras argument orchestra decides itself: any value but null is refused with `reason`."""
    def refuse(cls, value: Any) -> None:
        if value is not None:
            raise ValueError(reason)
        return None

    return classmethod(refuse)


class EarlyStoppingSpec(StrictModel):
    """Keras's `EarlyStopping`: every worker stops after the same epoch once
    `monitor` (aggregated over workers) stops improving."""

    monitor: str = "val_loss"
    min_delta: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    patience: int = Field(default=0, ge=0)
    verbose: Verbose = Field(default=0, description=_VERBOSE)
    mode: Mode = "auto"
    baseline: float | None = Field(default=None, allow_inf_nan=False)
    restore_best_weights: bool = False
    start_from_epoch: int = Field(default=0, ge=0)


class ModelCheckpointSpec(StrictModel):
    """Keras's `ModelCheckpoint`: the workers save to shared storage on the
    driver's decision, into `checkpoints/epoch-NNNN/` (what `orchestra
    resume` and restarts continue from); a `filepath` also names the saved
    file as Keras would, inside the job's `checkpoints/` folder."""

    filepath: str | None = Field(
        default=None, max_length=255,
        description="A file name template inside the job's checkpoints/ folder, formatted as Keras does: "
        "`{epoch}` (from 1) and the epoch's metrics, e.g. `best-{epoch:02d}-{val_loss:.2f}.keras`; it ends in "
        "`.keras`, or `.weights.h5` with save_weights_only. No absolute path, no `..`.",
    )
    monitor: str = "val_loss"
    verbose: Verbose = Field(default=0, description=_VERBOSE)
    save_best_only: bool = False
    save_weights_only: bool = False
    mode: Mode = "auto"
    save_freq: Literal["epoch"] = Field(
        default="epoch", description="`epoch` only: checkpoints are decided from whole-epoch metrics.")
    initial_value_threshold: float | None = Field(
        default=None, allow_inf_nan=False,
        description="With save_best_only, a first save needs a `monitor` value better than this.")
    keep: int = Field(default=3, ge=1, description="orchestra's retention: keep the newest N "
                                                   "checkpoints/epoch-NNNN folders (the best is always kept).")

    @field_validator("save_freq", mode="before")
    @classmethod
    def _per_epoch(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            raise ValueError("only 'epoch' is allowed; the driver decides checkpoints from whole-epoch "
                             "metrics aggregated over the workers, so a save every N batches has nothing to "
                             "decide on")
        return value

    @field_validator("filepath")
    @classmethod
    def _inside_the_job(cls, value: str | None) -> str | None:
        return None if value is None else check_job_file(value, "the job's checkpoints/ folder")

    @model_validator(mode="after")
    def _suffix(self) -> ModelCheckpointSpec:
        if self.filepath is None:
            return self
        wanted = ".weights.h5" if self.save_weights_only else ".keras"
        if not self.filepath.endswith(wanted):
            what = "weights (save_weights_only)" if self.save_weights_only else "a whole model"
            raise ValueError(f"filepath{_PATH_END}must end in '{wanted}' for {what}, as Keras requires "
                             f"(got {self.filepath!r})")
        return self


class TensorBoardSpec(StrictModel):
    """Keras's `TensorBoard`, written by the driver into the job's own
    `tensorboard/` folder (`orchestra tensorboard` serves it)."""

    update_freq: Literal["epoch", "batch"] | Annotated[int, Field(ge=1)] = Field(
        default="epoch",
        description="`epoch`; `batch` (every batch's loss); or N: the loss of every Nth batch.")
    histogram_freq: int = Field(default=0, ge=0, description="Weight histograms every N epochs (0: off).")
    log_dir: str | None = Field(default=None, description="Not settable: the job's TensorBoard folder is its own, "
                                                    "`<storage>/<job id>/tensorboard`.")

    _own_folder = field_validator("log_dir", mode="before")(_refused(
        "the job's TensorBoard folder is its own (<storage>/<job id>/tensorboard, served by `orchestra tensorboard`); "
        "remove log_dir"))

    @property
    def batch_every(self) -> int | None:
        """Every how many batches a loss is logged, or None (per epoch only)."""
        if self.update_freq == "epoch":
            return None
        return 1 if self.update_freq == "batch" else self.update_freq


class ReduceLROnPlateauSpec(StrictModel):
    """Keras's `ReduceLROnPlateau`: the driver decides the new learning rate
    and every worker sets it before the next epoch."""

    monitor: str = "val_loss"
    factor: float = Field(default=0.1, gt=0, lt=1, allow_inf_nan=False)
    patience: int = Field(default=10, ge=0)
    verbose: Verbose = Field(default=0, description=_VERBOSE)
    mode: Mode = "auto"
    min_delta: float = Field(default=1e-4, ge=0, allow_inf_nan=False)
    cooldown: int = Field(default=0, ge=0)
    min_lr: float = Field(default=0.0, ge=0, allow_inf_nan=False)


class _ScheduleConfig(StrictModel):
    name: str | None = None


class ExponentialDecaySpec(_ScheduleConfig):
    initial_learning_rate: float = Field(gt=0, allow_inf_nan=False)
    decay_steps: float = Field(gt=0, allow_inf_nan=False)
    decay_rate: float = Field(gt=0, allow_inf_nan=False)
    staircase: bool = False


class InverseTimeDecaySpec(ExponentialDecaySpec):
    pass


class PiecewiseConstantDecaySpec(_ScheduleConfig):
    boundaries: list[float] = Field(min_length=1, max_length=1000)
    values: list[Annotated[float, Field(ge=0, allow_inf_nan=False)]] = Field(min_length=2, max_length=1001)

    @model_validator(mode="after")
    def _one_more_value(self) -> PiecewiseConstantDecaySpec:
        if len(self.values) != len(self.boundaries) + 1:
            raise ValueError(f"values{_PATH_END}needs one value more than boundaries "
                             f"({len(self.boundaries)} boundaries, {len(self.values)} values)")
        return self


class PolynomialDecaySpec(_ScheduleConfig):
    initial_learning_rate: float = Field(gt=0, allow_inf_nan=False)
    decay_steps: float = Field(gt=0, allow_inf_nan=False)
    end_learning_rate: float = Field(default=0.0001, ge=0, allow_inf_nan=False)
    power: float = Field(default=1.0, allow_inf_nan=False)
    cycle: bool = False


class CosineDecaySpec(_ScheduleConfig):
    initial_learning_rate: float = Field(ge=0, allow_inf_nan=False)
    decay_steps: int = Field(gt=0)
    alpha: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    warmup_target: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    warmup_steps: int = Field(default=0, ge=0)


class CosineDecayRestartsSpec(_ScheduleConfig):
    initial_learning_rate: float = Field(ge=0, allow_inf_nan=False)
    first_decay_steps: int = Field(gt=0)
    t_mul: float = Field(default=2.0, gt=0, allow_inf_nan=False)
    m_mul: float = Field(default=1.0, gt=0, allow_inf_nan=False)
    alpha: float = Field(default=0.0, ge=0, allow_inf_nan=False)


SCHEDULES: dict[str, type[_ScheduleConfig]] = {
    "ExponentialDecay": ExponentialDecaySpec,
    "PiecewiseConstantDecay": PiecewiseConstantDecaySpec,
    "PolynomialDecay": PolynomialDecaySpec,
    "InverseTimeDecay": InverseTimeDecaySpec,
    "CosineDecay": CosineDecaySpec,
    "CosineDecayRestarts": CosineDecayRestartsSpec,
}


class ScheduleSpec(StrictModel):
    """A `keras.optimizers.schedules` class by its config, evaluated at the
    epoch index (0 for the first epoch, as Keras passes `epoch` to a
    `LearningRateScheduler`'s function): its "steps" are epochs."""

    class_name: str
    config: Union[tuple(SCHEDULES.values())]  # type: ignore[valid-type]

    @model_validator(mode="before")
    @classmethod
    def _typed_config(cls, value: Any) -> Any:
        if not isinstance(value, dict) or "class_name" not in value:
            return value
        name = value["class_name"]
        if name not in SCHEDULES:
            raise ValueError(f"class_name{_PATH_END}{_unknown(name, list(SCHEDULES), 'schedule')}")
        return {**value, "config": _validated(SCHEDULES[name], value.get("config", {}), "config")}

    def keras_config(self) -> dict[str, Any]:
        """What `keras.optimizers.schedules.deserialize` takes."""
        config = self.config.model_dump(exclude_none=True)
        if self.class_name == "CosineDecay" and "warmup_target" not in config:
            config.pop("warmup_steps", None)
        return {"class_name": self.class_name, "config": config}


class LearningRateSchedulerSpec(StrictModel):
    """Keras's `LearningRateScheduler` with a named schedule (no Python
    function): the learning rate of each epoch is `schedule(epoch index)`,
    decided on the driver and set by every worker before the epoch."""

    schedule: ScheduleSpec
    verbose: Verbose = Field(default=0, description=_VERBOSE)


class TerminateOnNaNSpec(StrictModel):
    """Keras's `TerminateOnNaN`: an epoch whose aggregated loss (or any
    metric) is NaN or infinite ends the job FAILED, naming the metric and
    the epoch. (Keras stops at the batch; the driver sees whole epochs.)"""


_CSV_NAME = "training.log"


class CSVLoggerSpec(StrictModel):
    """Keras's `CSVLogger`: one row per epoch (Keras's `epoch`, from 0, then
    the metrics and the scalars callbacks add, sorted by name), written by
    the driver into the job's folder."""

    filename: str = Field(default=_CSV_NAME, max_length=255,
                          description="A file name inside the job's folder (no absolute path, no `..`).")
    separator: str = Field(default=",", min_length=1, max_length=1)
    append: bool = Field(default=False, description="Append to the file a resumed job already wrote "
                                                    "(a resumed job always continues its own file).")

    @field_validator("filename")
    @classmethod
    def _inside_the_job(cls, value: str) -> str:
        return check_job_file(value, "the job's folder")


class BackupAndRestoreSpec(StrictModel):
    """Keras's `BackupAndRestore`: what orchestra does anyway with a
    checkpoint of every epoch. With it (and no ModelCheckpoint), the job
    checkpoints every epoch, keeping the newest; workers Ray Train restarts
    (`scaling.max_failures`) and `orchestra resume` continue from there."""

    save_freq: Literal["epoch"] = Field(default="epoch", description="`epoch` only, as ModelCheckpoint's.")
    backup_dir: str | None = Field(default=None, description="Not settable: the backups are the job's checkpoints.")

    _own_folder = field_validator("backup_dir", mode="before")(_refused(
        "the backups are the job's own checkpoints (<storage>/<job id>/checkpoints); remove backup_dir"))


_Config = TypeVar("_Config", bound=StrictModel)

BUILT_IN: dict[str, type[StrictModel]] = {
    "EarlyStopping": EarlyStoppingSpec,
    "ModelCheckpoint": ModelCheckpointSpec,
    "TensorBoard": TensorBoardSpec,
    "ReduceLROnPlateau": ReduceLROnPlateauSpec,
    "LearningRateScheduler": LearningRateSchedulerSpec,
    "TerminateOnNaN": TerminateOnNaNSpec,
    "CSVLogger": CSVLoggerSpec,
    "BackupAndRestore": BackupAndRestoreSpec,
}

PLUGIN_CONFIG_DEPTH = 8


def _is_plain(value: Any, depth: int = 0) -> bool:
    """A plugin's argument: JSON's plain values only, nested at most PLUGIN_CONFIG_DEPTH deep."""
    if depth > PLUGIN_CONFIG_DEPTH:
        return False
    if isinstance(value, dict):
        return all(isinstance(key, str) and _is_plain(item, depth + 1) for key, item in value.items())
    if isinstance(value, list):
        return all(_is_plain(item, depth + 1) for item in value)
    return value is None or isinstance(value, (bool, int, str)) or (isinstance(value, float) and math.isfinite(value))


class CallbackSpec(StrictModel):
    """One callback, as Keras serializes it: `class_name` is a Keras callback
    class or the name a plugin package registers (docs/plugins.md), `config`
    its arguments. The short form `{"type": "EarlyStopping", "patience": 3}`
    is the same."""

    class_name: str = Field(description="One of " + ", ".join(BUILT_IN) + ", or a registered plugin's name.")
    config: Union[tuple(BUILT_IN.values())] | dict[str, Any] = Field(  # type: ignore[valid-type]
        default_factory=dict, description="The class's arguments, by Keras's names; a plugin's as plain values.")

    @model_validator(mode="before")
    @classmethod
    def _long_form(cls, value: Any) -> Any:
        if isinstance(value, dict) and "type" in value and "class_name" not in value:
            rest = {key: item for key, item in value.items() if key != "type"}
            return {"class_name": value["type"], "config": rest}
        if isinstance(value, str):
            raise ValueError(f"a callback is an object, as Keras serializes one: "
                             f'{{"class_name": "{value[:40]}", "config": {{...}}}}')
        if isinstance(value, dict) and "class_name" in value and set(value) - {"class_name", "config"}:
            arguments = ", ".join(sorted(set(value) - {"class_name", "config"}))
            raise ValueError(f"{arguments}: the class's arguments go under config, "
                             f'e.g. {{"class_name": "{str(value["class_name"])[:40]}", "config": {{...}}}}')
        if isinstance(value, dict) and "config" not in value:
            return {**value, "config": {}}  # so the class's own defaults fill it
        return value

    @field_validator("class_name")
    @classmethod
    def _known(cls, value: str) -> str:
        registered = registered_callbacks()
        if value not in BUILT_IN and value not in registered:
            plugins = (f"; registered by installed packages: {', '.join(sorted(registered))}" if registered else
                       "; no installed package registers one (entry-point group orchestra.callbacks)")
            raise ValueError(_unknown(value, [*BUILT_IN, *sorted(registered)], "callback", plugins))
        return value

    @field_validator("config", mode="wrap")
    @classmethod
    def _config_of_the_class(cls, value: Any, handler: Any, info: ValidationInfo) -> Any:
        name = info.data.get("class_name")
        if name is None:
            return value  # class_name's own error says what is wrong
        if name in BUILT_IN:
            if isinstance(value, BUILT_IN[name]):
                return value
            return _validated(BUILT_IN[name], value, "")
        if not isinstance(value, dict):
            raise ValueError(f"the arguments of {name!r} are an object of plain values (got {type(value).__name__})")
        if not _is_plain(value) or len(json.dumps(value)) > 64_000:
            raise ValueError(f"the arguments of the plugin {name!r} must be plain values (numbers, strings, "
                             f"booleans, null, and lists or objects of them, nested at most {PLUGIN_CONFIG_DEPTH} "
                             "deep, at most 64,000 characters as JSON)")
        return value

    @property
    def is_plugin(self) -> bool:
        return self.class_name not in BUILT_IN


def _refuse_old_form(value: Any) -> Any:
    """The object form of before (`{"early_stopping": {...}, ...}`) is
    refused with the list that says the same."""
    if isinstance(value, dict):
        raise ValueError(f"is a list of callbacks now, as Keras takes them; this object reads as: "
                         f"{json.dumps(equivalent_list(value), separators=(', ', ': '))}")
    return value


CallbacksList = TypeAdapter(list[CallbackSpec])

# The JobSpec field: a list, TensorBoard alone unless the spec says otherwise.
Callbacks = Annotated[list[CallbackSpec], BeforeValidator(_refuse_old_form)]


def default_callbacks() -> list[CallbackSpec]:
    """A spec without `callbacks` gets TensorBoard (per epoch), as before;
    a list the spec writes is exactly what runs, as in Keras's `fit`."""
    return [CallbackSpec(class_name="TensorBoard", config=TensorBoardSpec())]


_OLD_NAMES = {"early_stopping": "EarlyStopping", "checkpoint": "ModelCheckpoint", "tensorboard": "TensorBoard"}


def equivalent_list(old: dict[str, Any]) -> list[dict[str, Any]]:
    """The list form of an old `callbacks` object: its sections in the order
    they ran, TensorBoard included unless it was null (its old default).

        >>> equivalent_list({"early_stopping": {"patience": 2}})
        [{'class_name': 'EarlyStopping', 'config': {'patience': 2}}, {'class_name': 'TensorBoard', 'config': {}}]
    """
    sections = {"tensorboard": {}, **old}
    return [{"class_name": _OLD_NAMES.get(key, key), "config": sections[key] if isinstance(sections[key], dict)
             else sections[key]}
            for key in ("early_stopping", "checkpoint", "tensorboard", *sorted(set(old) - set(_OLD_NAMES)))
            if key in sections and sections[key] is not None]


def callback_problems(callbacks: list[CallbackSpec], logged: list[str],
                      rate_is_scheduled: bool = False) -> list[tuple[str, str]]:
    """(field, message) for what only the whole spec can tell: a monitor or
    a filepath placeholder that is not a metric the job logs, a class
    listed twice, a callback that sets the learning rate of an optimizer
    whose rate is a schedule (Keras cannot set it either)."""
    problems, seen = [], {}
    for i, entry in enumerate(callbacks):
        if rate_is_scheduled and isinstance(entry.config, (ReduceLROnPlateauSpec, LearningRateSchedulerSpec)):
            problems.append((f"callbacks.{i}.class_name",
                             f"{entry.class_name} sets the optimizer's learning rate, but compile.optimizer's "
                             "learning_rate is a schedule, which cannot be set; give a number there, or use one "
                             "of the two"))
        if entry.class_name in seen:
            problems.append((f"callbacks.{i}.class_name", f"'{entry.class_name}' is listed twice (callbacks."
                                                          f"{seen[entry.class_name]}); list each callback once"))
        seen.setdefault(entry.class_name, i)
        monitor = getattr(entry.config, "monitor", None)
        if monitor is not None and monitor not in logged:
            problems.append((f"callbacks.{i}.config.monitor",
                             f"'{monitor}' is not a metric this job logs; allowed: {', '.join(logged)}"))
        filepath = getattr(entry.config, "filepath", None)
        if filepath is not None:
            problem = _placeholder_problem(filepath, logged)
            if problem:
                problems.append((f"callbacks.{i}.config.filepath", problem))
    return problems


def _placeholder_problem(template: str, logged: list[str]) -> str | None:
    for _, field, _, _ in string.Formatter().parse(template):
        if field is None:
            continue
        name = re.split(r"[.\[]", field, maxsplit=1)[0]
        if name != field:
            return f"{{{field}}}: a placeholder is a name with an optional format ({{epoch:02d}}, {{val_loss:.2f}})"
        if name != "epoch" and name not in logged:
            return f"{{{field}}} is not a placeholder this job fills; allowed: epoch, {', '.join(logged)}"
    try:
        resolved = format_filepath(template, 1, {name: 0.5 for name in logged})
    except (ValueError, TypeError, IndexError, KeyError, AttributeError) as exc:
        return f"cannot be formatted as Keras formats it ({type(exc).__name__}: {exc})"
    try:
        check_job_file(resolved, "the job's checkpoints/ folder")
    except ValueError as exc:
        return f"formats to {resolved!r}, which {exc}"
    return None


def format_filepath(template: str, epoch: int, logs: dict[str, float]) -> str:
    """Keras's `ModelCheckpoint` file name of an epoch (counted from 1)."""
    return template.format(epoch=epoch, **logs)


_RESERVED = re.compile(r"^(epoch-\d+|\..*)$")


def check_job_file(value: str, where: str) -> str:
    """`value` if it names a file inside `where` (a relative path with no
    `..`, `~`, backslash or hidden part, not one of orchestra's own
    `epoch-NNNN` folders); else ValueError saying why."""
    path = PurePosixPath(value)
    if not value or "\x00" in value or "\\" in value or value.startswith("~") or path.is_absolute():
        raise ValueError(f"must be a relative file name inside {where}; no absolute path, '~' or backslash")
    if any(part == ".." for part in path.parts):
        raise ValueError(f"leaves {where} ('..'); name a file inside it")
    if any(_RESERVED.match(part) for part in path.parts) or value.endswith("/"):
        raise ValueError("must not name a hidden file or orchestra's own epoch-NNNN folders")
    return value


def _validated(model: type[StrictModel], value: Any, prefix: str) -> StrictModel:
    """`value` as `model`, or ValueError with one line a field, each under
    its path below `prefix` (the path marker carries it to the spec path)."""
    if value is None:
        value = {}
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        lines = []
        for path, message in problems_of(exc, model):
            field = ".".join(part for part in (prefix, "" if path == "(spec)" else path) if part)
            lines.append(f"{field}{_PATH_END}{message}")
        raise ValueError("\n".join(lines)) from None


def _unknown(name: Any, allowed: list[str], kind: str, plugins: str = "") -> str:
    close = close_match(str(name), allowed)
    hint = f"; did you mean '{close}'?" if close else ""
    built_in = [item for item in allowed if item in BUILT_IN or kind != "callback"]
    return f"{str(name)[:80]!r} is not a {kind} orchestra knows; allowed: {', '.join(built_in)}{plugins}{hint}"


def config_of(callbacks: list[CallbackSpec], kind: type[_Config]) -> _Config | None:
    """The config of the listed callback of class `kind` (e.g.
    `TensorBoardSpec`), or None when the list has none."""
    return next((entry.config for entry in callbacks if isinstance(entry.config, kind)), None)
