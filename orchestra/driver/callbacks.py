"""The spec's `callbacks` list → the driver-side callbacks, each constructed explicitly.

Every argument a callback gets is named here, from its spec field: a spec
field that no constructor takes, or a constructor argument no field
feeds, shows up in this file and nowhere else.

They run in the list's order, as Keras runs a `fit`'s callbacks, with two
exceptions that keep Keras's own timing: a LearningRateScheduler decides
after the others (Keras sets the rate when the next epoch begins, after
every callback's `on_epoch_end`), and the loggers, TensorBoard and
CSVLogger, write last, so they log the scalars the others add.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from orchestra.coordinator import (
    Checkpoint,
    CoordinatorCallback,
    CSVLogger,
    EarlyStopping,
    LearningRateScheduler,
    ReduceLROnPlateau,
    TensorBoard,
    TerminateOnNaN,
)
from orchestra.driver.plugins import plugin_callback
from orchestra.spec import (
    BackupAndRestoreSpec,
    CallbackSpec,
    CSVLoggerSpec,
    EarlyStoppingSpec,
    JobSpec,
    LearningRateSchedulerSpec,
    ModelCheckpointSpec,
    ReduceLROnPlateauSpec,
    TensorBoardSpec,
    TerminateOnNaNSpec,
    config_of,
)


def early_stopping(config: EarlyStoppingSpec) -> EarlyStopping:
    return EarlyStopping(
        monitor=config.monitor,
        min_delta=config.min_delta,
        patience=config.patience,
        mode=config.mode,
        baseline=config.baseline,
        restore_best_weights=config.restore_best_weights,
        start_from_epoch=config.start_from_epoch,
    )


def checkpoint_config(spec: JobSpec) -> ModelCheckpointSpec | None:
    """The spec's ModelCheckpoint; for a job that may be restarted
    (`scaling.max_failures` > 0, or a BackupAndRestore listed) and lists
    none, a checkpoint of every epoch by the default monitor, keeping 1: a
    restart needs something to restart from."""
    listed = config_of(spec.callbacks, ModelCheckpointSpec)
    restartable = spec.scaling.max_failures > 0 or config_of(spec.callbacks, BackupAndRestoreSpec) is not None
    if listed is not None or not restartable:
        return listed
    return ModelCheckpointSpec(monitor=spec.default_monitor, keep=1)


def checkpoint(config: ModelCheckpointSpec, directory_for_epoch: Callable[[int], Path]) -> Checkpoint:
    # save_freq is "epoch" (the spec refuses others) and verbose changes nothing the record does not say.
    return Checkpoint(
        directory_for_epoch,
        monitor=config.monitor,
        mode=config.mode,
        save_best_only=config.save_best_only,
        save_weights_only=config.save_weights_only,
        keep=config.keep,
        filepath=config.filepath,
        initial_value_threshold=config.initial_value_threshold,
    )


def tensorboard(config: TensorBoardSpec, logdir: Path, hparams: dict[str, Any], model_summary: str) -> TensorBoard:
    # histogram_freq is the workers' (the weights live there): see worker.histograms.
    return TensorBoard(logdir, update_freq=config.update_freq, hparams=hparams, model_summary=model_summary)


def reduce_lr_on_plateau(config: ReduceLROnPlateauSpec) -> ReduceLROnPlateau:
    return ReduceLROnPlateau(
        monitor=config.monitor,
        factor=config.factor,
        patience=config.patience,
        mode=config.mode,
        min_delta=config.min_delta,
        cooldown=config.cooldown,
        min_lr=config.min_lr,
    )


def csv_logger(config: CSVLoggerSpec, job_dir: Path) -> CSVLogger:
    return CSVLogger(job_dir / config.filename, separator=config.separator, append=config.append)


def make_callbacks(spec: JobSpec, checkpoint_dir: Callable[[int], Path], tensorboard_dir: Path, workers: int,
                   model_summary: str, job_dir: Path | None = None) -> list[CoordinatorCallback]:
    """The driver-side callbacks the spec lists, in the order they run (see
    the module's docstring), plus the default checkpoint of a restartable job.

    Args:
        spec: the job's spec.
        checkpoint_dir: the folder of the checkpoint of an epoch.
        tensorboard_dir: the job's TensorBoard folder.
        workers: how many workers train (a hyperparameter on TensorBoard).
        model_summary: Keras's summary of the model, shown on TensorBoard.
        job_dir: the job's folder (CSVLogger's file is there); default:
            the TensorBoard folder's parent, as storage lays them out.
    """
    job_dir = job_dir if job_dir is not None else tensorboard_dir.parent
    deciders: list[CoordinatorCallback] = []
    schedulers: list[CoordinatorCallback] = []
    loggers: list[CoordinatorCallback] = []
    for i, entry in enumerate(spec.callbacks):
        config = entry.config
        if entry.is_plugin:
            deciders.append(_plugin(entry, f"callbacks.{i}"))
        elif isinstance(config, EarlyStoppingSpec):
            deciders.append(early_stopping(config))
        elif isinstance(config, ModelCheckpointSpec):
            deciders.append(checkpoint(config, checkpoint_dir))
        elif isinstance(config, ReduceLROnPlateauSpec):
            deciders.append(reduce_lr_on_plateau(config))
        elif isinstance(config, TerminateOnNaNSpec):
            deciders.append(TerminateOnNaN())
        elif isinstance(config, LearningRateSchedulerSpec):
            schedulers.append(LearningRateScheduler(config.schedule))
        elif isinstance(config, TensorBoardSpec):
            loggers.append(tensorboard(config, tensorboard_dir, hyperparameters(spec, workers), model_summary))
        elif isinstance(config, CSVLoggerSpec):
            loggers.append(csv_logger(config, job_dir))
        # BackupAndRestore is the default checkpoint below, and the restarts max_failures allows.
    default = checkpoint_config(spec)
    if default is not None and config_of(spec.callbacks, ModelCheckpointSpec) is None:
        deciders.append(checkpoint(default, checkpoint_dir))
    return deciders + schedulers + loggers


def _plugin(entry: CallbackSpec, field: str) -> CoordinatorCallback:
    return plugin_callback(entry.class_name, dict(entry.config), field)


def hyperparameters(spec: JobSpec, workers: int) -> dict[str, Any]:
    """What runs are compared by on TensorBoard's HParams dashboard."""
    optimizer = spec.compile.optimizer_object
    learning_rate = optimizer.config.get("learning_rate")
    if isinstance(learning_rate, dict):  # a schedule, by its class
        learning_rate = str(learning_rate.get("class_name"))
    return {
        "optimizer": optimizer.class_name,
        "learning_rate": learning_rate if learning_rate is not None else "default",
        "batch_size": spec.fit.batch_size,
        "epochs": spec.fit.epochs,
        "layers": " > ".join(_layer_label(layer.type, layer.arguments) for layer in spec.model.layers),
        "workers": workers,
        "seed": spec.seed,
        "loss": spec.compile.loss_name,
    }


def _layer_label(kind: str, arguments: dict[str, Any]) -> str:
    """`Dense(100)`, `Dropout(0.3)`, `Flatten`: a layer by its main argument."""
    main = next((arguments[k] for k in ("units", "rate", "filters", "pool_size") if k in arguments), None)
    return kind if main is None else f"{kind}({main})"
