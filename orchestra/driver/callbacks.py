"""Spec sections → the driver-side callbacks, each constructed explicitly.

Every argument a callback gets is named here, from its spec field: a spec
field that no constructor takes, or a constructor argument no field
feeds, shows up in this file and nowhere else.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from orchestra.coordinator import (
    Checkpoint,
    CoordinatorCallback,
    EarlyStopping,
    TensorBoard,
)
from orchestra.spec import CheckpointSpec, EarlyStoppingSpec, JobSpec, TensorBoardSpec


def early_stopping(section: EarlyStoppingSpec) -> EarlyStopping:
    return EarlyStopping(
        monitor=section.monitor,
        min_delta=section.min_delta,
        patience=section.patience,
        mode=section.mode,
        baseline=section.baseline,
        restore_best_weights=section.restore_best_weights,
        start_from_epoch=section.start_from_epoch,
    )


def checkpoint_section(spec: JobSpec) -> CheckpointSpec | None:
    """The spec's checkpoint section; for a job that may be restarted
    (`scaling.max_failures` > 0) and names none, a checkpoint of every epoch
    by the default monitor, keeping 1: a restart needs something to restart from."""
    if spec.callbacks.checkpoint is not None or spec.scaling.max_failures == 0:
        return spec.callbacks.checkpoint
    return CheckpointSpec(monitor=spec.default_monitor, keep=1)


def checkpoint(section: CheckpointSpec, directory_for_epoch: Callable[[int], Path]) -> Checkpoint:
    return Checkpoint(
        directory_for_epoch,
        monitor=section.monitor,
        mode=section.mode,
        save_best_only=section.save_best_only,
        save_weights_only=section.save_weights_only,
        keep=section.keep,
    )


def tensorboard(section: TensorBoardSpec, logdir: Path, hparams: dict[str, Any], model_summary: str) -> TensorBoard:
    # histogram_freq is the workers' (the weights live there): see worker.histograms.
    return TensorBoard(logdir, update_freq=section.update_freq, hparams=hparams, model_summary=model_summary)


def make_callbacks(spec: JobSpec, checkpoint_dir: Callable[[int], Path], tensorboard_dir: Path, workers: int,
                   model_summary: str) -> list[CoordinatorCallback]:
    """The driver-side callbacks the spec asks for, in the order they run:
    early stopping, checkpoint, TensorBoard.

    Args:
        spec: the job's spec.
        checkpoint_dir: the folder of the checkpoint of an epoch.
        tensorboard_dir: the job's TensorBoard folder.
        workers: how many workers train (a hyperparameter on TensorBoard).
        model_summary: Keras's summary of the model, shown on TensorBoard.
    """
    callbacks: list[CoordinatorCallback] = []
    if spec.callbacks.early_stopping is not None:
        callbacks.append(early_stopping(spec.callbacks.early_stopping))
    section = checkpoint_section(spec)
    if section is not None:
        callbacks.append(checkpoint(section, checkpoint_dir))
    if spec.callbacks.tensorboard is not None:
        callbacks.append(tensorboard(spec.callbacks.tensorboard, tensorboard_dir,
                                     hyperparameters(spec, workers), model_summary))
    return callbacks


def hyperparameters(spec: JobSpec, workers: int) -> dict[str, Any]:
    """What runs are compared by on TensorBoard's HParams dashboard."""
    optimizer = spec.compile.optimizer_spec
    return {
        "optimizer": optimizer.type,
        "learning_rate": optimizer.learning_rate if optimizer.learning_rate is not None else "default",
        "batch_size": spec.fit.batch_size,
        "epochs": spec.fit.epochs,
        "layers": " > ".join(_layer_label(layer.type, layer.arguments) for layer in spec.model.layers),
        "workers": workers,
        "seed": spec.seed,
        "loss": spec.compile.loss,
    }


def _layer_label(kind: str, arguments: dict[str, Any]) -> str:
    """`Dense(100)`, `Dropout(0.3)`, `Flatten`: a layer by its main argument."""
    main = next((arguments[k] for k in ("units", "rate", "filters", "pool_size") if k in arguments), None)
    return kind if main is None else f"{kind}({main})"
